"""Dead letters are never dropped by windowing, and each true repeat is its own row.

Streaming (TestStream, BundleBasedDirectRunner) into a DuckDB file, as a streaming job
writes: malformed payloads stamped far behind the watermark (an offline device's event
read with --timestamp_attribute), the same bad payload again in other minutes, and a
bundle of the numbering step that fails once and is retried (a redelivery of what the
runner never committed): every copy sent is one row in dead_letter, no more, no less.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from pipeline.graph import ClickstreamMetrics, write_to_sinks
from tests.streaming import at, streaming_options
from transforms import parse
from transforms.metrics import MetricsConfig
from transforms.sink_duckdb import WriteToDuckDB, read_rows

CONFIG = MetricsConfig(allowed_lateness_s=3600, late_firing_s=0)
BAD = b'{"event_id": "x", "event_type": '           # truncated JSON
OLD_BAD = b'{"event_id": "y", "event_time": "yesterday"}'
failed_once: set[str] = set()


class FailOnceNumbering(parse.NumberRepeatsFn):
    """Raises once, after numbering (and writing the count of) the third copy of BAD."""

    def process(self, keyed, timestamp=beam.DoFn.TimestampParam,
                copies=beam.DoFn.StateParam(parse.NumberRepeatsFn.COPIES),
                forget=beam.DoFn.TimerParam(parse.NumberRepeatsFn.FORGET)):
        out = list(super().process(keyed, timestamp, copies, forget))
        if "numbering" not in failed_once and out[0]["dead_letter_id"].endswith("-2"):
            failed_once.add("numbering")
            raise RuntimeError("injected failure after the state write (test)")
        yield from out


def sent() -> list[tuple[bytes, float]]:
    """(payload, timestamp): BAD in three different minutes and twice in one; OLD_BAD
    stamped two days behind the watermark, twice, in different minutes."""
    return [(BAD, at(10, 1)), (BAD, at(10, 1)), (BAD, at(10, 7)), (BAD, at(10, 30)),
            (OLD_BAD, at(8, 0, -2)), (OLD_BAD, at(8, 5, -2))]


def stream() -> TestStream:
    s = TestStream().advance_watermark_to(at(10))
    for minute, (payload, t) in enumerate(sent()):
        s = (s.add_elements([TimestampedValue(payload, t)])
             .advance_processing_time(61)
             .advance_watermark_to(at(10, 31 + minute)))  # past every minute sent today
    return s.advance_watermark_to_infinity()


def run(db: str) -> None:
    with beam.Pipeline(options=streaming_options()) as p:
        outputs = p | stream() | ClickstreamMetrics(CONFIG)
        write_to_sinks(outputs, {"DuckDB": WriteToDuckDB(db)})


def assert_every_copy_stored_once(db: str) -> None:
    rows = read_rows(db, "SELECT payload, reason, dead_letter_id FROM dead_letter")
    by_payload = {p: sorted(r for q, r, _ in rows if q == p) for p, _ in sent()}
    assert by_payload == {BAD: ["malformed_json"] * 4,
                          OLD_BAD: ["missing_field.event_type"] * 2}
    assert len({i for _, _, i in rows}) == len(sent())
    assert sorted(i.rsplit("-", 1)[1] for p, _, i in rows if p == BAD) == \
        ["0", "1", "2", "3"]  # repeats numbered in arrival order


def test_every_dead_copy_is_stored_once_even_behind_the_watermark(tmp_path) -> None:
    db = str(tmp_path / "dead.duckdb")
    run(db)
    assert_every_copy_stored_once(db)


def test_a_retried_numbering_bundle_stores_no_copy_twice(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(parse, "NumberRepeatsFn", FailOnceNumbering)
    failed_once.clear()
    db = str(tmp_path / "dead.duckdb")
    run(db)
    assert failed_once == {"numbering"}  # the retried bundle happened
    assert_every_copy_stored_once(db)
