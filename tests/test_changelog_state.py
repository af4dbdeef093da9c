"""The changelog stage's per-window state: kept past the final mark (a pane that still
arrives continues the revisions), then forgotten CLEANUP_AFTER_S of event time later.

Panes are fed straight to RetractingChangelog with TestStream (BundleBasedDirectRunner),
so the test controls exactly when a pane arrives relative to the watermark.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import apache_beam as beam
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from tests.streaming import _COLLECTED, Collect, streaming_options
from transforms.metrics import MetricPane
from transforms.retract import CLEANUP_AFTER_S, RetractingChangelog

LATENESS_S = 3600
START = datetime(2026, 11, 1, 10, tzinfo=UTC)
END = START + timedelta(hours=1)
HORIZON_S = END.timestamp() + LATENESS_S


def pane(value: int, index: int, timing: str) -> TimestampedValue:
    return TimestampedValue(
        MetricPane("events", "{}", "hour", START, END, value, index, timing),
        END.timestamp() - 0.001)


def run(stream: TestStream, runner_args: Sequence[str] | None = None
        ) -> list[tuple[int, int, int, bool]]:
    with beam.Pipeline(options=streaming_options(runner_args)) as p:
        (p | stream | RetractingChangelog(LATENESS_S)
         | beam.ParDo(Collect("state-test")))
    rows = _COLLECTED.pop("state-test", [])
    return sorted((r["revision"], r["sign"], r["value"], r["is_final"]) for r in rows)


def pane_after_final_mark() -> TestStream:
    return (TestStream()
            .add_elements([pane(3, 0, "ON_TIME")])
            .advance_watermark_to(HORIZON_S + 1)                  # final mark
            .add_elements([pane(4, 1, "LATE")])                   # still remembered
            .advance_watermark_to_infinity())


# (revision, sign, value, is_final); a retraction repeats the revision it retracts. The
# pane comes before the watermark passes the window end, so it is EARLY whatever its
# label (revision 1); the stage's window-end timer writes it ON_TIME (2), the horizon
# timer final (3), and the pane after that continues at 4.
ROWS_AFTER_FINAL_MARK = [(1, -1, 3, False), (1, 1, 3, False), (2, -1, 3, False),
                         (2, 1, 3, False), (3, -1, 3, True), (3, 1, 3, True),
                         (4, 1, 4, True)]


def pane_after_cleanup() -> TestStream:
    return (TestStream()
            .add_elements([pane(3, 0, "ON_TIME")])
            .advance_watermark_to(HORIZON_S + CLEANUP_AFTER_S + 1)  # forgotten
            .add_elements([pane(4, 1, "LATE")])  # an impossible straggler: starts over
            .advance_watermark_to_infinity())


def assert_window_was_forgotten(rows: list[tuple[int, int, int, bool]]) -> None:
    assert (1, 1, 3, False) in rows and (3, 1, 3, True) in rows
    assert (1, 1, 4, False) in rows  # no memory of revisions 1-2: the state was cleared


def test_a_pane_after_the_final_mark_continues_the_revisions() -> None:
    assert run(pane_after_final_mark()) == ROWS_AFTER_FINAL_MARK


def test_the_window_is_forgotten_after_the_cleanup_delay() -> None:
    assert_window_was_forgotten(run(pane_after_cleanup()))
