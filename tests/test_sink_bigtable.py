"""WriteChangelogToBigtable against Google's Bigtable emulator (tests/servers.py)."""

from __future__ import annotations

from datetime import timedelta

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from tests.changelog_samples import CHANGELOG, CLICK, T0, VIEW, row
from tests.fixtures_servers import bigtable_emulator  # noqa: F401  (fixture)
from transforms import sink_bigtable
from transforms.sink_bigtable import (
    WriteChangelogToBigtable,
    read_all_rows,
    read_series_from_bigtable,
)

PROJECT, INSTANCE = "test-project", "test-instance"




def run_write(table):
    options = PipelineOptions(["--runner=DirectRunner"])
    with beam.Pipeline(options=options) as p:
        _ = (p | beam.Create(CHANGELOG)
             | WriteChangelogToBigtable(PROJECT, INSTANCE, table, flush_count=3))


def raw_cell_count(table):
    tbl = sink_bigtable._table(PROJECT, INSTANCE, table)
    return sum(len(cells) for r in tbl.read_rows()
               for cols in r.cells.values() for cells in cols.values())


@pytest.fixture
def table(bigtable_emulator, request):  # noqa: F811
    name = "metric_latest_" + request.node.name.replace("[", "_").strip("]")
    sink_bigtable.ensure_table(PROJECT, INSTANCE, name)
    sink_bigtable.ensure_table(PROJECT, INSTANCE, name)  # idempotent
    return name


@pytest.mark.integration
def test_one_row_per_window_with_latest_revision(table):
    run_write(table)
    rows = {r["row_key"]: r for r in read_all_rows(PROJECT, INSTANCE, table)}
    assert len(rows) == 5

    series = read_series_from_bigtable(PROJECT, INSTANCE, table, "events", "hour",
                                       {"event_type": "click"})
    assert [(r["window_start"], r["value"], r["revision"], r["timing"], r["is_final"])
            for r in series] == [
        (T0, 11, 3, "LATE", True),
        (T0 + timedelta(hours=1), 3, 1, "EARLY", False),
    ]
    assert series[0]["window_end"] == T0 + timedelta(hours=1)
    assert series[0]["dims"] == CLICK

    view = read_series_from_bigtable(PROJECT, INSTANCE, table, "events", "hour", VIEW)
    assert [(r["value"], r["revision"]) for r in view] == [(9, 2)]
    day = read_series_from_bigtable(PROJECT, INSTANCE, table, "events", "day", CLICK)
    assert [(r["window_start"], r["value"]) for r in day] == [(T0.replace(hour=0), 14)]
    users = read_series_from_bigtable(PROJECT, INSTANCE, table, "active_users", "hour")
    assert [r["value"] for r in users] == [2]

    # time bounds: start inclusive, end exclusive
    only_7 = read_series_from_bigtable(PROJECT, INSTANCE, table, "events", "hour", CLICK,
                                       start=T0 + timedelta(hours=1))
    assert [r["value"] for r in only_7] == [3]
    only_6 = read_series_from_bigtable(PROJECT, INSTANCE, table, "events", "hour", CLICK,
                                       end=T0 + timedelta(hours=1))
    assert [r["value"] for r in only_6] == [11]


@pytest.mark.integration
def test_replayed_write_does_not_double(table):
    run_write(table)
    first = sorted(read_all_rows(PROJECT, INSTANCE, table), key=lambda r: r["row_key"])
    cells = raw_cell_count(table)
    run_write(table)
    second = sorted(read_all_rows(PROJECT, INSTANCE, table), key=lambda r: r["row_key"])
    assert second == first
    assert len(second) == 5
    # same revisions -> same cell timestamps -> overwrites, not new versions
    assert raw_cell_count(table) == cells


def test_row_key_shape():
    r = row(CLICK, T0, 1, +1, 1)
    key = sink_bigtable.row_key(r).decode()
    assert key == f"events#hour#{sink_bigtable.dims_hash(CLICK)}#2026112806"
    assert key.startswith(sink_bigtable.series_prefix("events", "hour", CLICK).decode())
    cells = sink_bigtable.encode_cells(r)
    back = sink_bigtable.decode_cells(cells)
    assert {k: back[k] for k in back} == {k: r[k] for k in back}
