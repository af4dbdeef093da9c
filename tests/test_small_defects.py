"""Small defects a review of the core graph found (issue 13, item 8), each pinned."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import schemas
from pipeline import oracle
from pipeline.compare import changelog_mismatches
from transforms.sink_duckdb import connect, create_tables, write_changelog

ROOT = Path(__file__).resolve().parent.parent


def test_python_requires_admits_no_python_without_datetime_utc() -> None:
    """The code uses datetime.UTC (3.11+): pip must refuse older interpreters."""
    spec = re.search(r'python_requires=">=(\d+)\.(\d+)"', (ROOT / "setup.py").read_text())
    assert spec is not None
    assert (int(spec.group(1)), int(spec.group(2))) >= (3, 11)
    assert hasattr(__import__("datetime"), "UTC")  # and this interpreter has it


def test_oracle_dims_are_the_contracts_canonical_dims_for_non_ascii() -> None:
    event = oracle.TruthEvent("e1", "feature_use", 1_793_527_200_000, "u1", "café", 0)
    keys = oracle.expected_metrics([event], ("page_view",))
    dims = {key[1] for key in keys if key[0] == "feature_users"}
    assert dims == {schemas.canonical_dims({"feature": "café"})}


def test_changelog_check_reports_keys_with_a_changelog_but_no_latest_row(tmp_path) -> None:
    db = str(tmp_path / "check.duckdb")
    start = datetime(2026, 11, 1, 10, tzinfo=UTC)
    row: schemas.ChangelogRow = {
        "metric": "events", "dims": "{}", "granularity": "hour", "window_start": start,
        "window_end": start.replace(hour=11), "value": 3, "sign": 1, "revision": 1,
        "pane_index": 0, "timing": "EARLY", "is_final": False, "emitted_at": start}
    con = connect(db)
    try:
        create_tables(con)
        write_changelog(con, [row])
    finally:
        con.close()
    assert changelog_mismatches(db) == []
    con = connect(db)
    try:
        con.execute("DELETE FROM metric_latest")  # a latest row lost, the changelog kept
    finally:
        con.close()
    assert [m[:3] for m in changelog_mismatches(db)] == [("events", "{}", "hour")]
