"""Per-bundle batches: the project's way around the SDK's per-element costs.

Several stages gather a bundle's events into a few batches (per dedup bucket, per
archive file, or one per bundle) so that the next shuffle or step handles one element
per batch instead of one per event. Each batch is stamped with its earliest event time,
so it holds the watermark no later than its events would, and lands in the same
windows, as on time or as late, as its earliest event.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.events import Event

K = TypeVar("K", bound=Hashable)

# A batch of unique events, as DeduplicateEvents emits them: stamped with the earliest.
EventBatch = list[Event]


class BundleBatcher(Generic[K]):
    """Events of one bundle grouped by key, with each group's earliest event time."""

    def __init__(self) -> None:
        self._batches: dict[K, list[Event]] = {}
        self._earliest_ms: dict[K, int] = {}

    def add(self, key: K, event: Event) -> None:
        batch = self._batches.get(key)
        if batch is None:
            self._batches[key] = [event]
            self._earliest_ms[key] = event.event_time_ms
            return
        if event.event_time_ms < self._earliest_ms[key]:
            self._earliest_ms[key] = event.event_time_ms
        batch.append(event)

    def drain(self) -> Iterator[tuple[K, list[Event], Timestamp]]:
        """Every (key, batch, earliest event time), emptying the batcher."""
        batches, earliest = self._batches, self._earliest_ms
        self._batches, self._earliest_ms = {}, {}
        for key, batch in batches.items():
            yield key, batch, Timestamp(micros=earliest[key] * 1000)


def in_global_window(value: object, timestamp: Timestamp) -> WindowedValue:
    """A finish_bundle output: bundles have no window of their own to give."""
    return WindowedValue(value, timestamp, (GlobalWindow(),))
