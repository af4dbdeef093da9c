"""Fuzzing the input contract: no input crashes the parser or the graph.

Every input ends as a valid Event or as InvalidEvent with a contract reason (never an
other exception, which the pipeline would file as internal_error), and through the
whole graph read = unique + duplicates + dead letter, with no internal_error.

Two generators: arbitrary bytes, and near-valid JSON built from a valid event with the
hostile shapes the contract has to survive (deep nesting, huge numbers, NaN/Infinity,
lone surrogates, duplicate keys, BOM, NUL, CRLF, sizes around the 64 KiB limit, every
timestamp form the contract allows and near-misses of each).

CI runs a bounded, derandomized number of examples; FUZZ_EXAMPLES=N runs N per target
(docs/correctness.md records the longer run):

    FUZZ_EXAMPLES=200000 .venv/bin/python -m pytest -q tests/test_fuzz.py -k "not graph"
"""

from __future__ import annotations

import json
import os
import time

import apache_beam as beam
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from pipeline.job import counters_of
from transforms.events import Event
from transforms.parse import EventRules, InvalidEvent, Reason, decode

RULES = EventRules.from_schema(schemas.event_schema())
NOW_MS = int(time.time() * 1000)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "500"))
REASONS = {v for k, v in vars(Reason).items() if k.isupper()}
MAX_BYTES = RULES.max_record_bytes

VALID = {"event_id": "e-1", "event_type": "page_view", "event_time": "2026-11-01T10:00:00Z",
         "device_id": "d1", "user_id": "u1", "session_id": "s1", "platform": "web",
         "properties": {"page": "/home"}}

# RFC 3339 forms the contract accepts, and near-misses of each.
TIMESTAMPS = [
    "2026-11-01T10:00:00Z", "2026-11-01t10:00:00z", "2026-11-01 10:00:00Z",
    "2026-11-01T10:00:00.1Z", "2026-11-01T10:00:00.123456789Z", "2026-11-01T10:00:00+05:30",
    "2026-11-01T10:00:00-00:00", "2026-11-01T23:59:59.999-12:00", 1793527200000, 0, -1,
    946684800000, 946684799999, 2**63, -(2**63), 2**64, 10**30, 1.5, 1e300, True, None,
    "2026-11-01T10:00:00", "2026-11-01T10:00:00.Z", "2026-11-01T10:00:00.1234567890Z",
    "2026-11-01T24:00:00Z", "2026-11-01T23:59:60Z", "2026-02-30T10:00:00Z",
    "0000-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2026-11-01T10:00:00+24:00",
    "2026-11-01T10:00:00+05", "2026-11-01T10:00Z", "2026-11-01", "", " ",
    "２０２６-11-01T10:00:00Z", "2026-11-01T10:00:00Z\n", "2026-11-01T10:00:00\u0000Z",
    "1999-12-31T23:59:59.999Z", "2000-01-01T00:00:00Z", "yesterday", [], {},
]


def _check(payload: bytes) -> Event | str:
    """The contract's answer for one payload: the Event, or the refusal's reason."""
    try:
        event = decode(payload, RULES, NOW_MS)
    except InvalidEvent as invalid:
        assert invalid.reason.split(".", 1)[0] in REASONS, invalid.reason
        return invalid.reason
    assert isinstance(event, Event)
    assert isinstance(event.event_id, str) and 1 <= len(event.event_id) <= 128
    assert isinstance(event.event_time_ms, int) and not isinstance(event.event_time_ms, bool)
    assert RULES.min_event_time_ms <= event.event_time_ms <= NOW_MS + RULES.max_ahead_ms
    assert all(isinstance(v, str) for v in event.properties.values())
    return event


@st.composite
def near_valid(draw) -> bytes:
    record: dict = dict(VALID, properties=dict(VALID["properties"]))
    field = draw(st.sampled_from(sorted(VALID)))
    mutation = draw(st.sampled_from([
        "value", "drop", "nest", "timestamp", "huge_int", "surrogate", "properties"]))
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
        | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
            st.text(max_size=5), inner, max_size=3), max_leaves=8)
    if mutation == "value":
        record[field] = draw(json_values)
    elif mutation == "drop":
        del record[field]
    elif mutation == "nest":
        depth = draw(st.integers(1, 3000))
        record[field] = json.loads("[" * min(depth, 200) + "]" * min(depth, 200))
    elif mutation == "timestamp":
        record["event_time"] = draw(st.sampled_from(TIMESTAMPS))
    elif mutation == "huge_int":
        record[field] = draw(st.integers(min_value=2**63 - 2, max_value=2**70))
    elif mutation == "surrogate":
        record[field] = draw(st.sampled_from(["\ud800", "a\udfffb", "\ud83d\ude00"]))
    else:
        record["properties"] = draw(st.dictionaries(st.text(max_size=8), json_values,
                                                    max_size=4))
    text = json.dumps(record, ensure_ascii=draw(st.booleans()))
    tweak = draw(st.sampled_from(["none", "bom", "nul", "crlf", "nan", "infinity",
                                  "duplicate_key", "size", "deep_raw", "trailing"]))
    if tweak == "nan":
        text = text.replace('"e-1"', "NaN", 1)
    elif tweak == "infinity":
        text = text.replace('"e-1"', "-Infinity", 1)
    elif tweak == "duplicate_key":
        text = text[:-1] + ', "event_id": "e-2"}'
    elif tweak == "deep_raw":
        depth = draw(st.integers(100, 5_000))  # orjson refuses past 1,024 levels
        text = text[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
    elif tweak == "trailing":
        text += draw(st.sampled_from([" ", "\n", "x", "{}", "\x00"]))
    payload = text.encode("utf-8", "surrogatepass")
    if tweak == "bom":
        payload = b"\xef\xbb\xbf" + payload
    elif tweak == "nul":
        at = draw(st.integers(0, len(payload)))
        payload = payload[:at] + b"\x00" + payload[at:]
    elif tweak == "crlf":
        payload = payload + b"\r\n"
    elif tweak == "size":
        target = MAX_BYTES + draw(st.sampled_from([-1, 0, 1]))
        record["properties"] = {"pad": ""}
        base = json.dumps(record).encode()
        record["properties"]["pad"] = "x" * max(0, target - len(base))
        payload = json.dumps(record).encode()
        assert len(payload) == target or len(base) > target
    return payload


SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, database=None,
                    deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(st.binary(max_size=512))
def test_arbitrary_bytes_end_as_an_event_or_a_reason(payload: bytes) -> None:
    _check(payload)


@SETTINGS
@given(near_valid())
def test_near_valid_json_ends_as_an_event_or_a_reason(payload: bytes) -> None:
    _check(payload)


def test_the_size_limit_is_exact() -> None:
    for delta, valid in ((-1, True), (0, True), (1, False)):
        base = json.dumps(dict(VALID, properties={"pad": ""})).encode()
        padded = json.dumps(dict(VALID, properties={
            "pad": "x" * (MAX_BYTES + delta - len(base))})).encode()
        assert len(padded) == MAX_BYTES + delta
        outcome = _check(padded)
        assert isinstance(outcome, Event) if valid else outcome == Reason.PAYLOAD_TOO_LARGE


def drawn_payloads(n: int) -> list[bytes]:
    """n inputs of both generators, the same every run, plus repeats of some."""
    drawn: list[bytes] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(near_valid(), st.binary(max_size=256)))
    def draw(payload: bytes) -> None:
        drawn.append(payload)

    draw()
    return drawn + drawn[::7]


def test_the_graph_accounts_for_every_fuzzed_input() -> None:
    """Through the whole bounded graph: read = unique + duplicates + dead letter, with
    the dead letters and unique events the parser alone gives, and no internal_error."""
    from pipeline.graph import ClickstreamMetrics
    from transforms.metrics import MetricsConfig

    payloads = drawn_payloads(200)
    outcomes = [_check(p) for p in payloads]
    with beam.Pipeline() as p:
        _ = p | beam.Create(payloads) | ClickstreamMetrics(
            MetricsConfig().for_bounded_input())
    counters = counters_of(p.result)
    assert counters.get("dead_letter.internal_error", 0) == 0
    assert counters["read"] == len(payloads)
    assert counters["dead_letter"] == sum(isinstance(o, str) for o in outcomes)
    assert counters["unique"] == len({o.event_id for o in outcomes if isinstance(o, Event)})
    assert counters["read"] == (counters["unique"] + counters.get("duplicates", 0)
                                + counters["dead_letter"])
