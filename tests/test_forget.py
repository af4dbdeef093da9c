"""`clickstream forget`: generate, run (pseudonymised, into DuckDB, the Bigtable emulator
and local-bigquery), forget three users; then every store equals the oracle computed
without them, the archive and the dead letters hold none of their events, the audit
log names the request without a clear id, and the same request again changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from datetime import UTC, datetime

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import oracle
from pipeline.compare import changelog_mismatches, differences, latest_from_duckdb
from pipeline.forget import run_forget
from pipeline.generator import GeneratorConfig, read_truth, write_dataset
from pipeline.job import build
from pipeline.options import ClickstreamOptions
from tests import servers
from tests.fixtures_servers import bigquery_server, bigtable_emulator  # noqa: F401
from tests.sent import sent_records
from transforms.archive import archive_files, read_archive_records, rewrite_archive_file
from transforms.metrics import DEFAULT_FUNNEL
from transforms.pseudonymize import pseudonym
from transforms.sink_bigquery import read_latest_rows_from_bigquery
from transforms.sink_bigtable import read_latest_rows_from_bigtable
from transforms.sink_duckdb import read_rows

DAY = "2026-11-01"
KEY = b"forget-test-key-0123456789abcdef"
PROJECT, INSTANCE, TABLE = "test-project", "test-instance", "forget_latest"
BQ_PROJECT, BQ_DATASET = "local", "forget"
FORGOTTEN_AT = datetime(2026, 11, 9, 3, 0, tzinfo=UTC)
EVERYTHING = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))


def _latest(rows) -> dict[oracle.MetricKey, int]:
    return {(r["metric"], r["dims"], r["granularity"],
             r["window_start"].astimezone(UTC).isoformat()): r["value"] for r in rows}


def _without_retracted(values: dict, want: dict) -> dict:
    # A window only the forgotten users had is retracted to 0, not deleted.
    return {k: v for k, v in values.items() if v != 0 or k in want}


def _bigquery_dead_letters(client) -> list[bytes]:
    rows = client.query(f"SELECT payload FROM `{BQ_PROJECT}.{BQ_DATASET}.dead_letter` "
                        "ORDER BY dead_letter_id").result()
    return [bytes(row["payload"]) for row in rows]


def _archive_digest(archive: str) -> dict[str, str]:
    return {path: hashlib.sha256(open(path, "rb").read()).hexdigest()
            for path in archive_files(archive)}


@pytest.fixture(scope="module")
def forgotten(bigtable_emulator, bigquery_server, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("forget")
    data, archive, db = str(root / "data"), str(root / "archive"), str(root / "out.duckdb")
    # No devices offline for days: the forgotten users' events then span a day or two,
    # and re-finalizing fewer days keeps the test short.
    write_dataset(data, GeneratorConfig(events=1500, seed=17, date=DAY, too_late_rate=0.0))
    (root / "key").write_bytes(KEY)
    client = servers.LocalBigQueryTestClient(bigquery_server, BQ_PROJECT)
    stores = ["--duckdb_path", db, "--bigtable_project", PROJECT, "--bigtable_instance",
              INSTANCE, "--bigtable_table", TABLE, "--bigquery_project", BQ_PROJECT,
              "--bigquery_dataset", BQ_DATASET, "--archive_path", archive,
              "--pseudonymize_key_file", str(root / "key")]
    options = PipelineOptions(["--input_files", os.path.join(data, "events-*.jsonl"),
                               "--archive_run_id", "all", *stores])
    p = beam.Pipeline(options=options)
    build(p, options.view_as(ClickstreamOptions), bigquery_test_client=client)
    p.run().wait_until_finish()

    # The three heaviest signed-in users, and every device they used.
    sent = sent_records(data)
    heaviest = [u for u, _ in Counter(r["user_id"] for r in sent
                                      if isinstance(r.get("user_id"), str)
                                      and r["user_id"]).most_common(3)]
    devices: dict[str, set[str]] = defaultdict(set)
    for r in sent:
        if r.get("user_id") in heaviest and isinstance(r.get("device_id"), str):
            devices[r["user_id"]].add(r["device_id"])
    dead_before = read_rows(db, "SELECT payload FROM dead_letter")
    bigquery_dead_before = _bigquery_dead_letters(client)

    first = run_forget(["--user_id", heaviest[0],
                        *[f"--device_id={d}" for d in sorted(devices[heaviest[0]])],
                        "--requested_by", "ticket-1", *stores],
                       clock=lambda: FORGOTTEN_AT, bigquery_test_client=client)
    ids_file = root / "ids.jsonl"
    ids_file.write_text("".join(
        json.dumps({"user_id": u, "device_id": d}) + "\n"
        for u in heaviest[1:] for d in sorted(devices[u])))
    batch_argv = ["--ids_file", str(ids_file), "--requested_by", "ticket-2", *stores]
    second = run_forget(batch_argv, clock=lambda: FORGOTTEN_AT, bigquery_test_client=client)

    gone = set(heaviest) | {"device:" + d for u in heaviest for d in devices[u]}
    want = oracle.expected_metrics([e for e in read_truth(data) if e.identity not in gone],
                                   DEFAULT_FUNNEL)

    def snapshot() -> dict:
        return {
            "duckdb": latest_from_duckdb(db),
            "bigtable": _latest(read_latest_rows_from_bigtable(PROJECT, INSTANCE, TABLE,
                                                               *EVERYTHING)),
            "bigquery": _latest(read_latest_rows_from_bigquery(BQ_PROJECT, BQ_DATASET,
                                                               *EVERYTHING, client=client)),
            "archive": _archive_digest(archive),
            "dead_letter": read_rows(db, "SELECT * FROM dead_letter ORDER BY ALL"),
            "bigquery_dead_letter": _bigquery_dead_letters(client),
        }

    after = snapshot()
    again = run_forget(batch_argv, clock=lambda: FORGOTTEN_AT, bigquery_test_client=client)
    return dict(heaviest=heaviest, devices=devices, want=want, after=after,
                after_again=snapshot(), first=first, second=second, again=again,
                archive=archive, db=db, dead_before=dead_before,
                bigquery_dead_before=bigquery_dead_before)


@pytest.mark.integration
@pytest.mark.parametrize("store", ["duckdb", "bigtable", "bigquery"])
def test_every_store_equals_the_oracle_without_the_forgotten(forgotten, store) -> None:
    want = forgotten["want"]
    got = _without_retracted(forgotten["after"][store], want)
    assert differences(got, want) == []


@pytest.mark.integration
def test_the_archive_holds_none_of_their_events(forgotten) -> None:
    users = {pseudonym(KEY, u) for u in forgotten["heaviest"]}
    devices = {pseudonym(KEY, d) for ds in forgotten["devices"].values() for d in ds}
    records = [r for path in archive_files(forgotten["archive"])
               for r in read_archive_records(path)]
    assert records
    assert not [r for r in records if r["user_id"] in users or r["device_id"] in devices]
    assert forgotten["first"].events_removed > 0 and forgotten["second"].events_removed > 0


@pytest.mark.integration
def test_dead_letters_carrying_their_ids_are_purged(forgotten) -> None:
    clear = [json.dumps(i).encode() for i in forgotten["heaviest"]] + [
        json.dumps(d).encode() for ds in forgotten["devices"].values() for d in ds]
    carrying = [p for (p,) in forgotten["dead_before"] if any(c in p for c in clear)]
    assert carrying, "the generator's malformed lines should include one of theirs"
    assert not [p for (_, p, *_) in forgotten["after"]["dead_letter"]
                if any(c in p for c in clear)]
    in_bigquery = [p for p in forgotten["bigquery_dead_before"] if any(c in p for c in clear)]
    assert len(in_bigquery) == len(carrying)
    assert not [p for p in forgotten["after"]["bigquery_dead_letter"]
                if any(c in p for c in clear)]
    assert len(forgotten["after"]["bigquery_dead_letter"]) == len(
        forgotten["bigquery_dead_before"]) - len(in_bigquery)
    purged = forgotten["first"].dead_letters_purged + forgotten["second"].dead_letters_purged
    assert purged >= 2 * len(carrying)


@pytest.mark.integration
def test_the_same_request_again_changes_nothing(forgotten) -> None:
    assert forgotten["again"].events_removed == 0
    assert forgotten["again"].days_refinalized == []
    assert forgotten["after_again"] == forgotten["after"]


@pytest.mark.integration
def test_audit_log_names_the_requests_without_clear_ids(forgotten) -> None:
    rows = read_rows(forgotten["db"], "SELECT requested_by, requested_at, partitions, "
                     "identities, status, events_removed FROM deletion_audit "
                     "ORDER BY requested_by, events_removed DESC")
    assert [r[0] for r in rows] == ["ticket-1", "ticket-2", "ticket-2"]
    assert all(r[4] == "done" for r in rows)
    assert rows[0][5] == forgotten["first"].events_removed
    assert json.loads(rows[0][2]) and json.loads(rows[2][2]) == []
    text = json.dumps([[str(c) for c in r] for r in rows])
    clear = set(forgotten["heaviest"]) | {d for ds in forgotten["devices"].values()
                                          for d in ds}
    assert not [c for c in clear if c in text]
    assert pseudonym(KEY, forgotten["heaviest"][0]) in rows[0][3]
    assert changelog_mismatches(forgotten["db"]) == []


def test_a_crash_mid_rewrite_leaves_the_old_file_whole(tmp_path, monkeypatch) -> None:
    from transforms.events import Event

    part = tmp_path / "event_date=2026-11-01" / "event_hour=00"
    part.mkdir(parents=True)
    path = str(part / "part-x.avro")
    events = [Event(f"e{i}", "tap", 1_793_500_000_000 + i, "d", "u", None, None, {})
              for i in range(3)]
    rewrite_archive_file(path, [e.to_avro() for e in events])
    before = open(path, "rb").read()  # noqa: SIM115

    def crash(*_args) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        rewrite_archive_file(path, [])
    assert open(path, "rb").read() == before  # noqa: SIM115
    assert len(read_archive_records(path)) == 3
    assert os.listdir(part) == ["part-x.avro"], "the temporary file is cleaned up"
    monkeypatch.undo()
    rewrite_archive_file(path, [])
    assert read_archive_records(path) == [] and archive_files(str(tmp_path)) == [path]
