"""A bundle that fails after its state read and is retried ends exact, even where the
runner hands the retry the very state object the failed attempt read.

The SDK harness (Prism, Flink, Dataflow) caches decoded state across bundles and does
not invalidate it when a bundle fails (sdk_worker discards the bundle processor only),
so a DoFn that changes the value it read in place leaks uncommitted ids or rows into
the retry. No runner here both retries bundles and keeps such a cache: the FnApiRunner
does not retry (apache/beam#18640), Prism fails the job (apache/beam#27887), Flink
restarts the failed task from its checkpoint with new operators whose state handlers
draw new cache tokens (a random UUID each: StateRequestHandlers.createCacheToken in
Beam's runners-java-fn-execution), and the BundleBasedDirectRunner, which retries a
bundle up to 4 times, decodes state afresh on every read. So these tests run the
BundleBasedDirectRunner's real retries with a fake state cache in its
ReadModifyWriteState (the same decoded object for the same committed bytes, as the
SDK's cache does), and a DoFn that raises once after reading its state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.runners.direct import direct_userstate
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from pipeline import oracle
from pipeline.graph import ClickstreamMetrics
from tests.streaming import _COLLECTED, Collect, at, payload, streaming_options
from tests.test_panes import assert_changelog_sums_to_latest_and_every_window_is_final
from tests.test_property import latest_values
from transforms import dedup, retract
from transforms.metrics import DEFAULT_FUNNEL, MetricsConfig

CONFIG = MetricsConfig(allowed_lateness_s=2 * 3600, late_firing_s=0)
failed_once: set[str] = set()  # which injected failures have happened (once each)


@pytest.fixture
def fake_state_cache(monkeypatch) -> Iterator[None]:
    cache: dict[bytes, Any] = {}

    def read(self):
        if self._cleared:
            return None
        if self._value is direct_userstate.UNREAD_VALUE:
            self._value = self._current_value_accessor()
        if not self._value:
            return None
        encoded = self._value[0]
        if encoded not in cache:
            cache[encoded] = self._decode(encoded)
        return cache[encoded]

    monkeypatch.setattr(direct_userstate.ReadModifyWriteRuntimeState, "read", read)
    failed_once.clear()
    yield


class FailOnceAfterStateRead(dedup.DropRepeatedEventIdsFn):
    """Raises once, after a complete attempt on the batch holding `late-id`."""

    def process(self, batch, input_value=beam.DoFn.WindowedValueParam,
                seen_state=beam.DoFn.StateParam(dedup.DropRepeatedEventIdsFn.SEEN_IDS),
                expiry=beam.DoFn.TimerParam(dedup.DropRepeatedEventIdsFn.EXPIRY)):
        values = list(batch[1])
        out = list(super().process((batch[0], values), input_value, seen_state, expiry))
        if "dedup" not in failed_once and any(b"late-id" in v for v in values):
            failed_once.add("dedup")
            raise RuntimeError("injected failure after the state read (test)")
        yield from out


class FailOnceOnLatePane(retract.EmitRetractionsFn):
    """Raises once, after a complete attempt on the hour's pane of value 3."""

    def process(self, keyed, state=beam.DoFn.StateParam(retract.EmitRetractionsFn.STATE),
                window_end_timer=beam.DoFn.TimerParam(retract.EmitRetractionsFn.WINDOW_END),
                horizon_timer=beam.DoFn.TimerParam(retract.EmitRetractionsFn.HORIZON)):
        out = list(super().process(keyed, state, window_end_timer, horizon_timer))
        pane = keyed[1]
        if ("retract" not in failed_once and pane.metric == "events" and pane.value == 3
                and pane.granularity == "hour"):
            failed_once.add("retract")
            raise RuntimeError("injected failure after the state read (test)")
        yield from out


def arrive(event_id: str, t: float) -> TimestampedValue:
    return TimestampedValue(payload(event_id, t), t)


def stream() -> TestStream:
    """Two events on time, then (past the window end) a late one and a repeat."""
    return (TestStream()
            .advance_watermark_to(at(10))
            .add_elements([arrive("e1", at(10, 5)), arrive("e2", at(10, 10))])
            .advance_processing_time(61)
            .advance_watermark_to(at(11, 30))
            .add_elements([arrive("late-id", at(10, 20)), arrive("e1", at(10, 5))])
            .advance_processing_time(61)
            .advance_watermark_to_infinity())


def expected() -> dict:
    truth = [oracle.TruthEvent(i, "page_view", int(t * 1000), "u1", None, 0)
             for i, t in (("e1", at(10, 5)), ("e2", at(10, 10)), ("late-id", at(10, 20)))]
    return oracle.expected_metrics(truth, DEFAULT_FUNNEL)


def run() -> list[dict]:
    with beam.Pipeline(options=streaming_options()) as p:
        changelog, _ = p | stream() | ClickstreamMetrics(CONFIG, dedup_buckets=1)
        changelog | beam.ParDo(Collect("retry"))
    return _COLLECTED.pop("retry", [])


def test_dedup_retried_after_its_state_read_with_a_fake_state_cache(
        fake_state_cache, monkeypatch) -> None:
    monkeypatch.setattr(dedup, "DropRepeatedEventIdsFn", FailOnceAfterStateRead)
    changelog = run()
    assert failed_once == {"dedup"}  # the failure happened, and the retry went through
    assert latest_values(changelog) == expected()
    assert_changelog_sums_to_latest_and_every_window_is_final(changelog)


def test_changelog_retried_after_its_state_read_with_a_fake_state_cache(
        fake_state_cache, monkeypatch) -> None:
    monkeypatch.setattr(retract, "EmitRetractionsFn", FailOnceOnLatePane)
    changelog = run()
    assert failed_once == {"retract"}
    assert latest_values(changelog) == expected()
    assert_changelog_sums_to_latest_and_every_window_is_final(changelog)
