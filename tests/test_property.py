"""Property: whatever the arrival order, bundling, copies and watermark jumps, once the
stream ends the latest values equal the exact oracle's (TestStream, DirectRunner).

A drawn stream covers several days; each event arrives one to three times, the copies
differing in bytes (event time as epoch ms or RFC 3339 in another zone, another page
property) but sharing event_id and instant. The watermark advances in drawn jumps, some
past the allowed lateness of events still to arrive, so the drop paths run: the oracle
counts an event in a granularity only if its first copy arrived while the watermark
was within its window's end + allowed lateness (Beam drops data whose window is past
that when it reaches the GroupByKey), and dedup's first-copy rule decides which copy
is the event.

Pipelines are slow to start, so CASES_PER_RUN drawn streams run in one pipeline, each
in its own stretch of event time (SPAN_DAYS apart, past every horizon of the one
before), and each is checked against its own oracle.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta, timezone

import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.oracle import TruthEvent, expected_metrics, first_copies
from schemas import GRANULARITY_SECONDS
from tests.streaming import DAY, run_stream
from transforms.metrics import DEFAULT_FUNNEL, MetricsConfig

TYPES = ("page_view", "tap", "add_to_cart", "checkout", "purchase", "feature_use")
LATENESS_S = 6 * 3600
CONFIG = MetricsConfig(allowed_lateness_s=LATENESS_S, late_firing_s=0)
DAYS = 3                 # a stream's events fall on days 0..DAYS-1 of its stretch
SPAN_DAYS = DAYS + 2     # past the last day's horizon (day end + LATENESS_S)
STEP_S = 1800            # watermark jumps come in half hours ...
STEP_OFFSET_S = 900      # ... at :15 and :45, never on a window end + lateness
MAX_STEP = (DAYS * 86400 + LATENESS_S) // STEP_S + 4
CASES_PER_RUN = 20
# × CASES_PER_RUN = 100 drawn streams in CI; PROPERTY_EXAMPLES=N for a longer run.
EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "5"))


@st.composite
def streams(draw):
    """(events, copies in arrival order, chunk cuts, watermark steps): each event a
    dict with its instant in ms; a copy is (event index, its payload bytes)."""
    n = draw(st.integers(min_value=1, max_value=14))
    events = []
    for i in range(n):
        t_ms = ((draw(st.integers(0, DAYS - 1)) * 24 + draw(st.integers(0, 23))) * 3600
                + draw(st.integers(0, 3599))) * 1000
        events.append({
            "event_id": f"e{i}",
            "event_type": draw(st.sampled_from(TYPES)),
            "t_ms": t_ms,
            "device_id": f"d{draw(st.integers(0, 3))}",
            "user_id": draw(st.sampled_from([None, "", "u1", "u2"])),
            "feature": draw(st.sampled_from(["search", "share"])),
        })
    copies = [(i, draw(st.sampled_from(("ms", "z", "offset"))), draw(st.integers(0, 1)))
              for i in range(n) for _ in range(draw(st.integers(1, 3)))]
    arrival = draw(st.permutations(copies))
    cuts = sorted(draw(st.lists(st.integers(0, len(arrival)), max_size=5)))
    steps = sorted(set(draw(st.lists(st.integers(0, MAX_STEP), min_size=len(cuts),
                                     max_size=len(cuts)))))
    return events, arrival, cuts, steps


def payload_of(event: dict, form: str, page: int, base_ms: int) -> bytes:
    """One copy's bytes: the same event and instant, written differently."""
    ms = base_ms + event["t_ms"]
    instant = datetime.fromtimestamp(ms / 1000, tz=UTC)
    event_time: object = ms
    if form == "z":
        event_time = instant.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    elif form == "offset":
        event_time = instant.astimezone(timezone(timedelta(hours=-5))).isoformat(
            timespec="milliseconds")
    record = {"event_id": event["event_id"], "event_type": event["event_type"],
              "event_time": event_time, "device_id": event["device_id"],
              "user_id": event["user_id"],
              "properties": {"feature": event["feature"], "page": f"/p{page}"}}
    return json.dumps(record).encode()


def _base_ms(index: int) -> int:
    """The start of the index-th stretch: consecutive stretches ending at DAY (in the
    past: the parser refuses event times more than a day ahead of the clock)."""
    return int(DAY.timestamp() * 1000) - (CASES_PER_RUN - index) * SPAN_DAYS * 86_400_000


def _watermark_s(base_ms: int, step: int) -> float:
    return base_ms / 1000 + step * STEP_S + STEP_OFFSET_S


def chunks(case, base_ms: int):
    """(watermark when the chunk arrives or None, its copies), in arrival order."""
    _, arrival, cuts, steps = case
    start, watermark = 0, None
    for cut, step in zip([*cuts, len(arrival)], [*steps, None], strict=False):
        yield watermark, arrival[start:cut]
        start = cut
        if step is not None:
            watermark = _watermark_s(base_ms, step)


def stream_of(case, index: int = 0, stream: TestStream | None = None) -> TestStream:
    """The case's arrival order as a TestStream (appended to `stream`), in the index-th
    stretch of event time, ending with the watermark past every window's horizon."""
    events = case[0]
    base_ms = _base_ms(index)
    stream = stream or TestStream()
    last_watermark = None
    for n, (watermark, chunk) in enumerate(chunks(case, base_ms)):
        if watermark is not None and watermark != last_watermark:
            stream = stream.advance_watermark_to(watermark)
            last_watermark = watermark
        if chunk:
            stream = stream.add_elements(
                [TimestampedValue(payload_of(events[i], form, page, base_ms),
                                  (base_ms + events[i]["t_ms"]) / 1000)
                 for i, form, page in chunk])
        if n == 0:
            # Early panes once per stream: each TestStream step runs the whole graph to
            # rest, and the final values do not depend on how many early panes fired.
            stream = stream.advance_processing_time(61)
    return stream.advance_watermark_to(_base_ms(index + 1) / 1000 - 1)


def streams_of(cases) -> TestStream:
    stream = TestStream()
    for index, case in enumerate(cases):
        stream = stream_of(case, index, stream)
    return stream.advance_watermark_to_infinity()


def truth(event: dict, base_ms: int) -> TruthEvent:
    identity = event["user_id"] or "device:" + event["device_id"]
    feature = event["feature"] if event["event_type"] == "feature_use" else None
    return TruthEvent(event["event_id"], event["event_type"], base_ms + event["t_ms"],
                      identity, feature, 0)


def oracle_of(case, index: int = 0) -> dict:
    """The oracle's values for the case: first copies by arrival, each counted in a
    granularity only if it came while the watermark was within that window's end +
    allowed lateness."""
    events = case[0]
    base_ms = _base_ms(index)
    arrived_at: dict[str, float | None] = {}
    arrivals = []
    for watermark, chunk in chunks(case, base_ms):
        for i, _, _ in chunk:
            arrivals.append(truth(events[i], base_ms))
            arrived_at.setdefault(events[i]["event_id"], watermark)

    def counted(event: TruthEvent, granularity: str) -> bool:
        watermark = arrived_at[event.event_id]
        size = GRANULARITY_SECONDS[granularity]
        end_s = (event.event_time_ms // 1000 // size + 1) * size
        return watermark is None or watermark <= end_s + LATENESS_S

    return expected_metrics(first_copies(arrivals), DEFAULT_FUNNEL, counted)


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


def in_stretch(values: dict, index: int) -> dict:
    start = datetime.fromtimestamp(_base_ms(index) / 1000, tz=UTC).isoformat()
    end = datetime.fromtimestamp(_base_ms(index + 1) / 1000, tz=UTC).isoformat()
    return {k: v for k, v in values.items() if start <= k[3] < end}


@pytest.mark.integration
@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(streams(), min_size=CASES_PER_RUN, max_size=CASES_PER_RUN))
def test_latest_values_equal_the_oracle(cases) -> None:
    changelog, dead = run_stream(streams_of(cases), CONFIG)
    assert dead == []
    latest = latest_values(changelog)
    for index, case in enumerate(cases):
        assert in_stretch(latest, index) == oracle_of(case, index), index
