"""Tell consumers about corrected windows: one Pub/Sub message per BATCH revision.

A sink of (changelog rows, dead-letter rows) like the others, so the finalize job adds
it next to them and it sees exactly the rows they store. The changelog already says
everything (a consumer that polls for revisions needs nothing else); the message saves
a finance or reporting consumer from polling: it carries the window, the value it may
have read (`old`, the retracted row; null for a window the sink did not have), the
`new` one and its `revision`, so a consumer can check it against the changelog.

Pub/Sub delivers at least once, and a retried bundle publishes again: consumers key a
message by (metric, dims, granularity, window_start, revision), which is also the
changelog's key. Written for bounded input (the finalize job), where the grouping
below sees a window's retraction and its new row together.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any, Tuple  # noqa: UP035 - Beam reads typing.Tuple hints

import apache_beam as beam
from apache_beam.metrics import Metrics

import schemas
from schemas import METRICS_NAMESPACE
from transforms.correct import WindowKey, row_key

PUBLISH_TIMEOUT_S = 60.0

_Keyed = Tuple[Tuple[str, str, str, str], Any]  # noqa: UP006


def correction_message(rows: Sequence[schemas.ChangelogRow]) -> dict | None:
    """One window's rows of a run → its notification, or None if nothing was corrected
    (a final mark alone changes no value)."""
    batch = [r for r in rows if r["sign"] > 0 and r["timing"] == schemas.BATCH_TIMING]
    if not batch:
        return None
    new = max(batch, key=lambda r: r["revision"])
    old = next((r for r in rows if r["sign"] < 0 and r["revision"] == new["revision"] - 1),
               None)
    return {
        "metric": new["metric"],
        "dims": json.loads(new["dims"]),
        "granularity": new["granularity"],
        "window_start": new["window_start"].isoformat(),
        "old": None if old is None else old["value"],
        "new": new["value"],
        "revision": new["revision"],
    }


class PublishFn(beam.DoFn):
    """Publishes JSON messages to a topic; a bundle ends only when Pub/Sub has them."""

    def __init__(self, topic: str) -> None:
        self._topic = topic
        self._published = Metrics.counter(METRICS_NAMESPACE, "notifications_published")

    def setup(self) -> None:
        # Imported here: the client is only needed on workers that publish. It finds
        # the emulator by PUBSUB_EMULATOR_HOST.
        from google.cloud import pubsub_v1  # type: ignore[attr-defined]

        self._client = pubsub_v1.PublisherClient()

    def start_bundle(self) -> None:
        self._futures: list[Future] = []

    def process(self, message: dict) -> None:
        data = json.dumps(message, sort_keys=True, separators=(",", ":")).encode()
        self._futures.append(self._client.publish(
            self._topic, data, metric=message["metric"],
            granularity=message["granularity"], revision=str(message["revision"])))

    def finish_bundle(self) -> None:
        for future in self._futures:  # raises if a publish failed: the bundle is retried
            future.result(timeout=PUBLISH_TIMEOUT_S)
        self._published.inc(len(self._futures))
        self._futures = []


def _message(grouped: tuple[WindowKey, Iterable[schemas.ChangelogRow]]) -> Iterable[dict]:
    message = correction_message(list(grouped[1]))
    if message is not None:
        yield message


class NotifyCorrections(beam.PTransform):
    """(changelog rows, dead-letter rows) → a message per corrected window on `topic`
    (`projects/P/topics/T`)."""

    def __init__(self, topic: str) -> None:
        super().__init__()
        self._topic = topic

    def expand(self, outputs: tuple[beam.PCollection, beam.PCollection]
               ) -> beam.pvalue.PDone:
        changelog, _ = outputs
        (changelog
         | "KeyByWindow" >> beam.Map(lambda r: (row_key(r), r)).with_output_types(_Keyed)
         | "GroupByWindow" >> beam.GroupByKey()
         | "ToMessage" >> beam.FlatMap(_message)
         | "Publish" >> beam.ParDo(PublishFn(self._topic)))
        return beam.pvalue.PDone(changelog.pipeline)
