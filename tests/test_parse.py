"""Input contract: one dead-letter test per rule, valid variants, and the pipeline's
dead-letter branch (payload kept byte for byte, stable ids, never a crash)."""

from __future__ import annotations

import json
import time

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given
from hypothesis import strategies as st

import schemas
from pipeline.generator import GeneratorConfig, write_dataset
from transforms.parse import EventRules, InvalidEvent, ParseEvents, decode, validate

RULES = EventRules.from_schema(schemas.event_schema())
NOW_MS = int(time.time() * 1000)
GOOD = {"event_id": "e-1", "event_type": "page_view",
        "event_time": "2026-11-01T10:00:00.123Z", "device_id": "d-1"}


def encode(record: object) -> bytes:
    return json.dumps(record).encode()


def with_(**changes: object) -> bytes:
    return encode({**GOOD, **changes})


def without(field: str) -> bytes:
    return encode({k: v for k, v in GOOD.items() if k != field})


INVALID = [
    ("payload_too_large", with_(properties={"blob": "x" * 65_536})),
    ("invalid_utf8", b'{"event_id": "\xff\xfe", "event_type": "tap"}'),
    ("malformed_json", b'{"event_id": "e-1", '),
    ("malformed_json", b""),
    ("not_an_object", b'["e-1"]'),
    ("not_an_object", b'"just a string"'),
    ("missing_field.event_id", without("event_id")),
    ("missing_field.event_id", with_(event_id=None)),
    ("wrong_type.event_id", with_(event_id=12345)),
    ("invalid_value.event_id", with_(event_id="")),
    ("invalid_value.event_id", with_(event_id="x" * 129)),
    ("missing_field.event_type", without("event_type")),
    ("invalid_value.event_type", with_(event_type="PageView")),
    ("invalid_value.event_type", with_(event_type="9lives")),
    ("invalid_value.event_type", with_(event_type="a" * 65)),
    ("missing_field.event_time", without("event_time")),
    ("event_time_no_zone", with_(event_time="2026-11-01T10:00:00")),
    ("event_time_unparseable", with_(event_time="2026-11-01")),
    ("event_time_unparseable", with_(event_time="tomorrow at noon")),
    ("wrong_type.event_time", with_(event_time=1.5e12)),
    ("wrong_type.event_time", with_(event_time=True)),
    ("event_time_too_old", with_(event_time="1999-12-31T23:59:59Z")),
    ("event_time_too_old", with_(event_time=0)),
    ("event_time_in_future", with_(event_time=NOW_MS + 25 * 3600 * 1000)),
    ("event_time_in_future", with_(event_time="2999-01-01T00:00:00+00:00")),
    ("missing_field.device_id", without("device_id")),
    ("invalid_value.device_id", with_(device_id="")),
    ("wrong_type.user_id", with_(user_id=7)),
    ("wrong_type.session_id", with_(session_id=["s"])),
    ("wrong_type.platform", with_(platform={"os": "ios"})),
    ("wrong_type.properties", with_(properties=["a"])),
    ("wrong_type.properties", with_(properties={"n": 1})),
]


@pytest.mark.parametrize("reason,payload", INVALID,
                         ids=[f"{r}-{i}" for i, (r, _) in enumerate(INVALID)])
def test_each_rule_has_its_reason(reason: str, payload: bytes) -> None:
    with pytest.raises(InvalidEvent) as refused:
        decode(payload, RULES, NOW_MS)
    assert refused.value.reason == reason
    assert refused.value.detail


@pytest.mark.parametrize("event_time,expected_ms", [
    ("2026-11-01T10:00:00Z", 1793527200000),
    ("2026-11-01T10:00:00.5z", 1793527200500),
    ("2026-11-01T11:00:00+01:00", 1793527200000),
    ("2026-11-01T05:30:00-04:30", 1793527200000),
    (1793527200000, 1793527200000),
])
def test_event_time_forms(event_time: object, expected_ms: int) -> None:
    assert decode(with_(event_time=event_time), RULES, NOW_MS).event_time_ms == expected_ms


def _validate_or_reason(record: object) -> object:
    try:
        return validate(record, RULES, NOW_MS)
    except InvalidEvent as invalid:
        return invalid.reason


def _assert_fast_path_agrees(record: object) -> None:
    """The compiled fast path may decline (None) but never decides differently."""
    fast = RULES.fast_path(record, NOW_MS)
    if fast is not None:
        assert fast == _validate_or_reason(record), record


# Rules on the bytes are checked before any field is looked at.
_FIELD_RULES = [(r, p) for r, p in INVALID
                if r not in ("payload_too_large", "invalid_utf8", "malformed_json")]


@pytest.mark.parametrize("reason,payload", _FIELD_RULES,
                         ids=[f"{r}-{i}" for i, (r, _) in enumerate(_FIELD_RULES)])
def test_fast_path_declines_every_invalid_case(reason: str, payload: bytes) -> None:
    assert RULES.fast_path(json.loads(payload), NOW_MS) is None


def test_fast_path_accepts_the_generated_events_exactly(tmp_path) -> None:
    write_dataset(str(tmp_path), GeneratorConfig(events=3000, seed=5, shards=1))
    accepted = 0
    for line in (tmp_path / "events-00000-of-00001.jsonl").read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        _assert_fast_path_agrees(record)
        accepted += RULES.fast_path(record, NOW_MS) is not None
    assert accepted > 2500  # the common case takes the fast path


_TIME_TEXT = st.from_regex(
    r"\A\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{0,11})?([Zz]|[+-]\d{2}:?\d{2})?\Z")


@given(event_time=st.one_of(_TIME_TEXT, st.integers(), st.booleans(), st.none(),
                            st.floats(allow_nan=False), st.text(max_size=40)),
       user_id=st.one_of(st.none(), st.text(max_size=3), st.integers()),
       event_type=st.one_of(st.sampled_from(["page_view", "Tap", "a" * 65, ""]),
                            st.text(max_size=5)),
       properties=st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.one_of(
           st.text(max_size=3), st.integers()), max_size=2), st.lists(st.text())))
def test_fast_path_never_disagrees_with_the_rules(event_time, user_id, event_type,
                                                  properties) -> None:
    _assert_fast_path_agrees({**GOOD, "event_time": event_time, "user_id": user_id,
                              "event_type": event_type, "properties": properties})


def test_optional_fields_and_identity() -> None:
    anonymous = decode(with_(user_id=None, properties={"feature": "search"}), RULES, NOW_MS)
    assert anonymous.identity == "device:d-1"
    assert anonymous.properties == {"feature": "search"}
    assert decode(with_(user_id=""), RULES, NOW_MS).identity == "device:d-1"
    assert decode(with_(user_id="u-9"), RULES, NOW_MS).identity == "u-9"
    assert decode(without("user_id"), RULES, NOW_MS).user_id is None


def test_a_record_at_the_size_limit_is_accepted() -> None:
    base = with_(properties={"pad": ""})
    padded = with_(properties={"pad": "x" * (65_536 - len(base))})
    assert len(padded) == 65_536
    assert decode(padded, RULES, NOW_MS).event_id == "e-1"


def test_pipeline_dead_letters_keep_payload_and_number_copies() -> None:
    bad = b'{"event_id": \xff'
    payloads = [with_(event_id="ok-1"), bad, bad, b"[1]", without("device_id")]
    with TestPipeline() as p:
        events, dead = p | beam.Create(payloads) | ParseEvents()
        assert_that(events | beam.FlatMap(lambda batch: [e.event_id for e in batch]),
                    equal_to(["ok-1"]),
                    label="Valid")
        assert_that(
            dead | beam.Map(lambda r: (r["payload"], r["reason"],
                                       r["dead_letter_id"].rsplit("-", 1)[1],
                                       r["ingest_time"].tzinfo is not None)),
            equal_to([(bad, "invalid_utf8", "0", True), (bad, "invalid_utf8", "1", True),
                      (b"[1]", "not_an_object", "0", True),
                      (without("device_id"), "missing_field.device_id", "0", True)]),
            label="DeadLetters")
