"""`clickstream forget`: honour a deletion request in every store.

    ids ─► stored form (pseudonyms under the job's key) ─► archive files holding them
        ─► audit row "started" ─► rewrite those files without them (atomically, per file)
        ─► purge DuckDB dead letters carrying the clear id ─► re-finalize the affected
        days ─► purge BigQuery dead letters ─► audit row "done"

The archive is the source of truth, so once it no longer holds an identity's events,
finalize (pipeline/finalize.py, reused as is) recomputes each affected day and writes a
BATCH revision wherever a store's aggregates still count the identity, in every
configured store. Only files that hold a matching event are rewritten. Each step is
idempotent, and the request as a whole too: run again, it finds nothing to remove and
changes nothing. A crash leaves every file old or new (transforms/archive.py
rewrite_archive_file) and the audit row at "started"; the next forget (any request)
re-finalizes the days of unfinished requests, so their aggregates catch up.

The audit row names who asked, when, and which partitions changed, with identities in
their stored form: pseudonyms when the job pseudonymises. Dead letters are refused
input kept byte for byte, so they hold clear ids even then: a dead letter whose payload
contains an id as a JSON string ("U", quotes included) is deleted.
"""

from __future__ import annotations

import getpass
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

import schemas
from pipeline.finalize import build_finalize
from pipeline.job import explain_sink_failures
from pipeline.options import ClickstreamOptions
from transforms.archive import archive_files, read_archive_records, rewrite_archive_file
from transforms.correct import utc_now
from transforms.pseudonymize import pseudonym
from transforms.sink_bigquery import DEAD_LETTER_TABLE
from transforms.sink_duckdb import connect

log = logging.getLogger("clickstream")


class ForgetOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        group = parser.add_argument_group("forget")
        group.add_argument("--user_id", action="append", default=[],
                           help="A user to forget (repeatable), as the producer sent it.")
        group.add_argument("--device_id", action="append", default=[],
                           help="A device to forget (repeatable): its anonymous events "
                                "carry no user_id.")
        group.add_argument("--ids_file", default="",
                           help="Batch form: a file of JSON lines, each with user_id "
                                "and/or device_id.")
        group.add_argument("--requested_by", default="",
                           help="Who asked (ticket, operator); default: the OS user.")
        group.add_argument("--audit_duckdb_path", default="",
                           help="DuckDB file of the deletion_audit table (default: "
                                "--duckdb_path).")


@dataclass(frozen=True)
class Identities:
    users: frozenset[str] = frozenset()
    devices: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.users or self.devices)

    def matches(self, record: dict) -> bool:
        return record.get("user_id") in self.users or record.get("device_id") in self.devices

    def to_json(self) -> str:
        return json.dumps({"user_id": sorted(self.users), "device_id": sorted(self.devices)})


def requested_identities(options: ForgetOptions) -> Identities:
    users, devices = set(options.user_id), set(options.device_id)
    if options.ids_file:
        with open(options.ids_file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                entry = json.loads(line)
                if not isinstance(entry, dict) or not (entry.get("user_id")
                                                       or entry.get("device_id")):
                    raise SystemExit(f"{options.ids_file}:{number}: expected a JSON object "
                                     "with user_id and/or device_id")
                users.update([entry["user_id"]] if entry.get("user_id") else [])
                devices.update([entry["device_id"]] if entry.get("device_id") else [])
    users.discard("")
    devices.discard("")
    return Identities(frozenset(users), frozenset(devices))


def stored_form(ids: Identities, key: bytes | None) -> Identities:
    """The identities as the archive holds them."""
    if key is None:
        return ids
    return Identities(frozenset(pseudonym(key, u) for u in ids.users),
                      frozenset(pseudonym(key, d) for d in ids.devices))


@dataclass
class ForgetSummary:
    request_id: str
    files_rewritten: dict[str, int] = field(default_factory=dict)  # path → events removed
    dead_letters_purged: int = 0
    days_refinalized: list[str] = field(default_factory=list)

    @property
    def events_removed(self) -> int:
        return sum(self.files_rewritten.values())

    def render(self) -> str:
        return "\n".join([
            f"forget request {self.request_id}: {self.events_removed:,} events removed "
            f"from {len(self.files_rewritten):,} archive files",
            f"dead letters purged: {self.dead_letters_purged:,}",
            "days re-finalized: " + (", ".join(self.days_refinalized) or "none"),
        ])


def day_of(path: str) -> str:
    """The event date of an archive file, from its partition directory."""
    return path.split("event_date=", 1)[1][:10]


def find_matches(base_path: str, ids: Identities) -> dict[str, tuple[list[dict], int]]:
    """Archive files holding a matching event → (their records without those events,
    how many there were)."""
    rewrites = {}
    for path in archive_files(base_path):
        records = read_archive_records(path)
        kept = [r for r in records if not ids.matches(r)]
        if len(kept) != len(records):
            rewrites[path] = (kept, len(records) - len(kept))
    return rewrites


def dead_letter_tokens(ids: Identities) -> list[bytes]:
    """The clear ids as they appear in a JSON payload: quoted, so "u1" does not match
    "u10"."""
    return [json.dumps(i, ensure_ascii=False).encode("utf-8")
            for i in sorted(ids.users | ids.devices)]


def purge_duckdb_dead_letters(path: str, tokens: Sequence[bytes]) -> int:
    con = connect(path)
    try:
        schemas_sql = schemas.read_text("duckdb.sql")
        con.execute(schemas_sql)
        rows = con.execute("SELECT dead_letter_id, payload FROM dead_letter").fetchall()
        doomed = [(i,) for i, payload in rows if any(t in payload for t in tokens)]
        if doomed:
            con.executemany("DELETE FROM dead_letter WHERE dead_letter_id = ?", doomed)
        return len(doomed)
    finally:
        con.close()


class FinalizeDay(beam.PTransform):
    """finalize's graph for one day (pipeline/finalize.py build_finalize), as a
    composite: one pipeline re-finalizes every affected day, not one job per day."""

    def __init__(self, options: ClickstreamOptions, day: str,
                 clock: Callable[[], datetime], bigquery_test_client: Any) -> None:
        super().__init__()
        self._options = options
        self._day = day
        self._clock = clock
        self._bigquery_test_client = bigquery_test_client

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.pvalue.PDone:
        build_finalize(pbegin, self._options, self._day, self._clock,
                       bigquery_test_client=self._bigquery_test_client)
        return beam.pvalue.PDone(pbegin.pipeline)


def refinalize(options: PipelineOptions, days: Sequence[str],
               clock: Callable[[], datetime], bigquery_test_client: Any = None) -> None:
    """Recompute `days` from the archive and correct every configured store (BATCH
    revisions), as `clickstream finalize --force_before_horizon` would day by day."""
    options.view_as(StandardOptions).streaming = False
    clickstream = options.view_as(ClickstreamOptions)
    p = beam.Pipeline(options=options)
    for day in days:
        p | f"Finalize_{day}" >> FinalizeDay(clickstream, day, clock, bigquery_test_client)
    with explain_sink_failures(clickstream):
        p.run().wait_until_finish()


def purge_bigquery_dead_letters(project: str, dataset: str, tokens: Sequence[bytes],
                                client: Any = None) -> int:
    """Deletes BigQuery dead letters whose payload contains a token. BigQuery refuses
    DML on rows still in the streaming buffer (up to ~90 minutes after their insert):
    that failure is reported with what to do, and the request stays `started`."""
    from google.cloud import bigquery

    if client is None:
        client = bigquery.Client(project=project)
    table = f"`{project}.{dataset}.{DEAD_LETTER_TABLE}`"
    rows = client.query(f"SELECT dead_letter_id, payload FROM {table}").result()
    doomed = [row["dead_letter_id"] for row in rows
              if any(t in bytes(row["payload"]) for t in tokens)]
    if doomed:
        try:
            client.query(f"DELETE FROM {table} WHERE dead_letter_id IN UNNEST(@ids)",
                         job_config=bigquery.QueryJobConfig(query_parameters=[
                             bigquery.ArrayQueryParameter("ids", "STRING", doomed)])).result()
        except Exception as exc:
            if "streaming buffer" not in str(exc).lower():
                raise
            raise SystemExit(
                f"{len(doomed)} BigQuery dead letters carrying the ids are still in the "
                "streaming buffer, where BigQuery refuses deletes: run the same forget "
                "again in ~90 minutes (the archive and aggregates are already done)"
            ) from exc
    return len(doomed)


def _audit(path: str, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
    con = connect(path)
    try:
        con.execute(schemas.read_text("deletion_audit.sql"))
        result = con.execute(sql, list(params))
        return result.fetchall() if result.description else []
    finally:
        con.close()


def run_forget(argv: Sequence[str], clock: Callable[[], datetime] = utc_now,
               bigquery_test_client: Any = None) -> ForgetSummary:
    options = PipelineOptions(list(argv))
    forget = options.view_as(ForgetOptions)
    clickstream = options.view_as(ClickstreamOptions)
    ids = requested_identities(forget)
    if not ids:
        raise SystemExit("nothing to forget: give --user_id, --device_id or --ids_file")
    if not clickstream.archive_path:
        raise SystemExit("--archive_path is required: the raw archive the job writes")
    audit_path = forget.audit_duckdb_path or clickstream.duckdb_path
    if not audit_path:
        raise SystemExit("--audit_duckdb_path (or --duckdb_path) is required: where the "
                         "deletion_audit table is kept")
    key_source = clickstream.privacy_policy().key
    stored = stored_form(ids, key_source.load() if key_source is not None else None)
    summary = ForgetSummary(request_id=f"{clock():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}")
    # Days of earlier requests that did not finish: their files are rewritten already,
    # so this request's scan would not find them again.
    unfinished = _audit(audit_path, "SELECT request_id, days_refinalized FROM deletion_audit "
                                    "WHERE status = 'started'")
    rewrites = find_matches(clickstream.archive_path, stored)
    days = sorted({day_of(path) for path in rewrites}
                  | {d for _, text in unfinished for d in json.loads(text)})
    partitions = [{"file": path, "events_removed": removed}
                  for path, (_, removed) in sorted(rewrites.items())]
    _audit(audit_path, "INSERT INTO deletion_audit VALUES (?, ?, ?, ?, ?, ?, 0, 0, ?, "
                       "'started')",
           (summary.request_id, clock(), forget.requested_by or getpass.getuser(),
            key_source is not None, stored.to_json(), json.dumps(partitions),
            json.dumps(days)))
    for path, (kept, removed) in sorted(rewrites.items()):
        rewrite_archive_file(path, kept)
        summary.files_rewritten[path] = removed
        log.info("forget: rewrote %s without %d events", path, removed)
    tokens = dead_letter_tokens(ids)
    if clickstream.duckdb_path:
        summary.dead_letters_purged += purge_duckdb_dead_letters(clickstream.duckdb_path,
                                                                 tokens)
    if days:
        log.info("forget: re-finalizing %s", ", ".join(days))
        refinalize(options, days, clock, bigquery_test_client)
        summary.days_refinalized = days
    bigquery_target = clickstream.bigquery_target()
    if bigquery_target is not None:
        summary.dead_letters_purged += purge_bigquery_dead_letters(
            *bigquery_target, tokens, bigquery_test_client)
    _audit(audit_path, "UPDATE deletion_audit SET events_removed = ?, "
                       "dead_letters_purged = ?, status = 'done' WHERE request_id = ?",
           (summary.events_removed, summary.dead_letters_purged, summary.request_id))
    for request_id, _ in unfinished:
        _audit(audit_path, "UPDATE deletion_audit SET status = 'done' WHERE request_id = ?",
               (request_id,))
    return summary
