"""Schema evolution: event.avsc version 2 adds optional app_version and country.

The validator accepts them (and ignores fields no version declares), refuses a field
whose type changed with a reason naming it; an archive written under version 1
(schemas/history/event.v1.avsc) reads with the current schema; finalize over a day
whose first hours were archived under version 1 and the rest under version 2 counts
every event, split by `--events_dimensions country` without a code change.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import UTC, datetime

import fastavro
import orjson
import pytest

import schemas
from pipeline.finalize import run_finalize
from pipeline.job import run
from transforms.archive import archive_files, read_archive_records
from transforms.events import Event
from transforms.metrics import events_dimension_values
from transforms.parse import EventRules, InvalidEvent, decode, validate
from transforms.sink_duckdb import read_rows

HISTORY = os.path.join(os.path.dirname(schemas.__file__), "history")
DAY = "2026-11-01"
NOW_MS = int(datetime(2026, 11, 3, tzinfo=UTC).timestamp() * 1000)
RULES = EventRules.from_schema(schemas.event_schema())


def v1_schema() -> dict:
    with open(os.path.join(HISTORY, "event.v1.avsc")) as f:
        return json.load(f)


def _record(i: int, hour: int, **extra) -> dict:
    return {"event_id": f"e{hour:02d}-{i}", "event_type": ("tap", "view")[i % 2],
            "event_time": f"{DAY}T{hour:02d}:{i % 60:02d}:00Z", "device_id": f"d{i % 7}",
            "user_id": f"u{i % 5}", "properties": {"page": "home"}, **extra}


def test_the_schema_carries_its_version_and_only_adds_optional_fields() -> None:
    current, previous = schemas.event_schema(), v1_schema()
    assert current["x-version"] == 2
    old = {f["name"] for f in previous["fields"]}
    added = [f for f in current["fields"] if f["name"] not in old]
    assert {f["name"] for f in added} == {"app_version", "country"}
    assert all(f["type"][0] == "null" and f["default"] is None for f in added)


def test_new_fields_are_accepted_and_kept_by_both_validator_paths() -> None:
    record = _record(1, 3, app_version="5.13.0", country="DE")
    fast = RULES.fast_path(record, NOW_MS)
    assert fast is not None and fast == validate(record, RULES, NOW_MS)
    assert fast.attributes == {"app_version": "5.13.0", "country": "DE"}
    without = RULES.fast_path(_record(1, 3), NOW_MS)
    assert without is not None and without.attributes == {}
    partial = decode(orjson.dumps(_record(1, 3, country="FR", app_version=None)), RULES,
                     NOW_MS)
    assert partial.attributes == {"country": "FR"}


def test_an_unknown_field_is_ignored_not_a_dead_letter() -> None:
    record = _record(2, 4, os_build="22F66", nested={"a": [1, 2]})
    event = decode(orjson.dumps(record), RULES, NOW_MS)
    assert event.event_id == record["event_id"] and "os_build" not in event.attributes


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("country", 49, "wrong_type.country"),
    ("app_version", ["5", "13"], "wrong_type.app_version"),
    ("country", "Germany", "invalid_value.country"),
    ("device_id", 17, "wrong_type.device_id"),
])
def test_a_field_that_changes_type_is_a_dead_letter_naming_it(field, value, reason) -> None:
    record = dict(_record(3, 5), **{field: value})
    with pytest.raises(InvalidEvent) as refused:
        decode(orjson.dumps(record), RULES, NOW_MS)
    assert refused.value.reason == reason and field in refused.value.detail


def test_an_identifying_or_unknown_dimension_is_refused() -> None:
    for name in ("user_id", "session_id", "no_such_field"):
        with pytest.raises(ValueError, match=name):
            events_dimension_values([name])
    values = events_dimension_values(["platform", "country"])
    assert values(Event("e", "t", 0, "d", None, None, "ios", {}, {"country": "DE"})) == (
        "ios", "DE")
    assert values(Event("e", "t", 0, "d", None, None, None, {})) == ("", "")


def _write_v1_archive(archive: str, records: list[dict]) -> None:
    """What the version-1 job wrote: its schema, no app_version or country."""
    parsed = fastavro.parse_schema(v1_schema())
    by_hour: dict[int, list[dict]] = {}
    for r in records:
        ms = int(datetime.fromisoformat(r["event_time"].replace("Z", "+00:00"))
                 .timestamp() * 1000)
        by_hour.setdefault(ms // 3_600_000 % 24, []).append(dict(
            {k: v for k, v in r.items() if k != "event_time"}, event_time=ms,
            session_id=None, platform=None))
    for hour, rows in by_hour.items():
        part = os.path.join(archive, f"event_date={DAY}", f"event_hour={hour:02d}")
        os.makedirs(part, exist_ok=True)
        with open(os.path.join(part, "part-v1-00000-of-00001.avro"), "wb") as f:
            fastavro.writer(f, parsed, rows)


@pytest.fixture(scope="module")
def spanning_day(tmp_path_factory):
    root = tmp_path_factory.mktemp("evolution")
    archive, db = str(root / "archive"), str(root / "out.duckdb")
    old = [_record(i, h) for h in range(0, 12) for i in range(6)]
    new = [_record(i, h, country=("DE", "FR", None)[i % 3], app_version="5.13.0")
           for h in range(12, 24) for i in range(6)]
    _write_v1_archive(archive, old)
    with open(root / "new.jsonl", "wb") as f:
        f.writelines(orjson.dumps(r) + b"\n" for r in new)
    run(["--input_files", str(root / "new.jsonl"), "--duckdb_path", str(root / "run.duckdb"),
         "--archive_path", archive], progress_every_s=60)
    summary = run_finalize(["--date", DAY, "--archive_path", archive, "--duckdb_path", db,
                            "--events_dimensions", "country", "--distinct", "exact"],
                           clock=lambda: datetime(2026, 11, 9, tzinfo=UTC))
    return archive, db, old, new, summary


@pytest.mark.integration
def test_old_files_read_with_the_new_schema(spanning_day) -> None:
    archive, _, old, new, _ = spanning_day
    records = [r for p in archive_files(archive) for r in read_archive_records(p)]
    assert len(records) == len(old) + len(new)
    v1 = [r for r in records if r["event_id"].split("-")[0] < "e12"]
    assert len(v1) == len(old) and all(r["country"] is None for r in v1)
    assert Counter(r["country"] for r in records if r not in v1) == Counter(
        r.get("country") for r in new)


@pytest.mark.integration
def test_finalize_counts_a_day_spanning_the_change_by_the_new_dimension(spanning_day) -> None:
    _, db, old, new, summary = spanning_day
    assert summary.counters["archive_read"] == len(old) + len(new)
    want = Counter((r["event_type"], r.get("country") or "") for r in old + new)
    rows = read_rows(db, "SELECT dims, value FROM metric_latest WHERE metric = 'events' "
                         "AND granularity = 'day'")
    got = {(json.loads(d)["event_type"], json.loads(d)["country"]): v for d, v in rows}
    assert got == dict(want)
    hourly = read_rows(db, "SELECT sum(value) FROM metric_latest WHERE metric = 'events' "
                           "AND granularity = 'hour'")[0][0]
    assert hourly == len(old) + len(new)
