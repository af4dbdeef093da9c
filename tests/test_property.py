"""Property: whatever the arrival order, bundling and duplicate pattern, once the stream
ends the latest values equal the exact oracle (TestStream on the DirectRunner)."""

from __future__ import annotations

import json
from datetime import UTC

import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.oracle import TruthEvent, expected_metrics
from tests.streaming import at, run_stream
from transforms.metrics import DEFAULT_FUNNEL, MetricsConfig

TYPES = ("page_view", "tap", "add_to_cart", "checkout", "purchase", "feature_use")
CONFIG = MetricsConfig(allowed_lateness_s=3 * 86400, late_firing_s=0)


@st.composite
def streams(draw):
    n = draw(st.integers(min_value=1, max_value=18))
    events = []
    for i in range(n):
        events.append({
            "event_id": f"e{i}",
            "event_type": draw(st.sampled_from(TYPES)),
            "event_time": int(at(draw(st.integers(0, 23)), draw(st.integers(0, 59)),
                                 draw(st.integers(0, 1))) * 1000),
            "device_id": f"d{draw(st.integers(0, 3))}",
            "user_id": draw(st.sampled_from([None, "", "u1", "u2"])),
            "properties": {"feature": draw(st.sampled_from(["search", "share"]))},
        })
    copies = [e for e in events for _ in range(draw(st.integers(1, 3)))]
    arrival = draw(st.permutations(copies))
    cuts = sorted(draw(st.lists(st.integers(0, len(arrival)), max_size=4)))
    watermark_steps = draw(st.lists(st.integers(0, 47), min_size=len(cuts),
                                    max_size=len(cuts)))
    return events, arrival, cuts, sorted(watermark_steps)


def truth(record: dict) -> TruthEvent:
    identity = record["user_id"] or "device:" + record["device_id"]
    feature = record["properties"]["feature"] if record["event_type"] == "feature_use" \
        else None
    return TruthEvent(record["event_id"], record["event_type"], record["event_time"],
                      identity, feature, 0)


def stream_of(case) -> TestStream:
    """The case's arrival order as a TestStream. The watermark only moves within the
    allowed lateness of every event, so nothing is dropped and the oracle counts every
    unique event."""
    _, arrival, cuts, watermark_steps = case
    stream = TestStream()
    start = 0
    watermark = -1
    for cut, step in zip([*cuts, len(arrival)], [*watermark_steps, 47], strict=False):
        chunk = arrival[start:cut]
        if chunk:
            stream = stream.add_elements(
                [TimestampedValue(json.dumps(r).encode(), r["event_time"] / 1000)
                 for r in chunk])
        stream = stream.advance_processing_time(61)
        if step > watermark:  # TestStream needs a strictly advancing watermark
            stream = stream.advance_watermark_to(at(step))
            watermark = step
        start = cut
    return stream.advance_watermark_to_infinity()


def latest_values(changelog: list[dict]) -> dict:
    """The value of each key's highest revision, keyed as the oracle keys it."""
    latest: dict[tuple, tuple[int, int]] = {}
    for row in changelog:
        if row["sign"] > 0:
            key = (row["metric"], row["dims"], row["granularity"],
                   row["window_start"].astimezone(UTC).isoformat())
            if key not in latest or row["revision"] > latest[key][0]:
                latest[key] = (row["revision"], row["value"])
    return {key: value for key, (_, value) in latest.items()}


def oracle_of(case) -> dict:
    events = case[0]
    return expected_metrics([truth(e) for e in events], DEFAULT_FUNNEL)


@pytest.mark.integration  # a TestStream pipeline per example: >10 s in all
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(streams())
def test_latest_values_equal_the_oracle(case) -> None:
    changelog, dead = run_stream(stream_of(case), CONFIG)
    assert dead == []
    assert latest_values(changelog) == oracle_of(case)
