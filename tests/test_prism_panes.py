"""The trigger, lateness, changelog-state and freshness scenarios, on Prism.

The scenarios and their checks are the DirectRunner tests' own (tests/test_panes.py,
test_property.py, test_changelog_state.py, test_freshness.py); only the runner differs.
They all run in one child process (tests/prism_streams.py, one Prism pipeline each),
inside the private network namespace that tests/test_runner_prism.py sets up, because
Prism's job service and the LOOPBACK worker listen on every interface.

What Prism 2.77 honours, and is asserted: final values equal the oracle (hand-made and
property-drawn streams), the changelog's derived timing sequence, late data within the
allowed lateness counted, data past it dropped from the hour window but counted by the
day window and by the too-late counter, the changelog invariant, every window final,
revisions retracted in order, dedup across hours of arrival, the changelog stage's final
mark and state cleanup, the watermark-lag samples. What it does not honour, pane timing
labels and pane order (which the changelog stage does not use), is recorded by
``test_prism_pane_labels_and_order_are_recorded_not_asserted``, which says why.

    .venv/bin/python -m pytest -q tests/test_prism_panes.py    # or: -m prism
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from collections import defaultdict
from typing import Any

import pytest

from tests import test_changelog_state, test_freshness, test_panes, test_property
from tests.streaming import at, rows_for
from tests.test_runner_prism import (  # noqa: F401 - module-scoped fixtures
    ROOT,
    netns_prefix,
    prism_binary,
    run_isolated,
)

pytestmark = [pytest.mark.prism, pytest.mark.integration, pytest.mark.timeout(600)]

CHILD = ROOT / "tests" / "prism_streams.py"
PROPERTY_CASES = 3
JOB_TIMEOUT_S = 300
TIMINGS = ("EARLY", "ON_TIME", "LATE")


@pytest.fixture(scope="module")
def prism(prism_binary: str, netns_prefix: list[str],  # noqa: F811
          tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("prism_streams") / "results.pickle"
    env = dict(os.environ, PRISM_LOCATION=prism_binary)
    cmd = [*netns_prefix, sys.executable, str(CHILD), str(out),
           f"--property-cases={PROPERTY_CASES}"]
    proc = run_isolated(cmd, env, JOB_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"Prism scenarios failed (exit {proc.returncode}); stderr tail:\n"
                    f"{proc.stderr[-3000:]}")
    with open(out, "rb") as f:
        results: dict[str, Any] = pickle.load(f)
    walls = {name: r["wall_s"] for name, r in results.items() if isinstance(r, dict)}
    walls["property"] = [r["wall_s"] for r in results["property"]]
    print(f"\nPrism scenarios, wall seconds each: {walls}")
    return results


def result(prism: dict[str, Any], name: str) -> Any:
    entry = prism[name]
    assert "error" not in entry, f"{name} failed on Prism:\n{entry['error']}"
    return entry["result"]


def test_every_scenario_ran_on_prism_on_loopback_only(prism, netns_prefix  # noqa: F811
                                                      ) -> None:
    failed = {name: r["error"][-800:] for name, r in prism.items()
              if isinstance(r, dict) and "error" in r}
    failed.update({f"property[{i}]": r["error"][-800:]
                   for i, r in enumerate(prism["property"]) if "error" in r})
    assert failed == {}
    assert len(prism["property"]) == PROPERTY_CASES
    if netns_prefix:
        assert prism["interfaces"] == ["lo"]


def test_late_data_is_counted_and_data_past_the_lateness_dropped_from_the_hour(
        prism) -> None:
    """test_panes' scenario: e4 arrives after the on-time pane, within the allowed
    lateness, and counts; e5 arrives past the hour's lateness horizon: the hour drops
    it, the day (still open) counts it, and the too-late counter reports it."""
    run = result(prism, "panes")
    assert run["dead"] == []
    test_panes.assert_late_data_counted_and_too_late_data_dropped(run["changelog"])
    assert run["counters"].get("too_late.hour") == 1
    assert run["counters"].get("too_late.day", 0) == 0


def test_changelog_sums_to_latest_and_every_window_ends_final(prism) -> None:
    changelogs = [result(prism, "panes")["changelog"], result(prism, "dedup")[0]]
    changelogs += [r["result"][0] for r in prism["property"] if "result" in r]
    for changelog in changelogs:
        test_panes.assert_changelog_sums_to_latest_and_every_window_is_final(changelog)


def test_each_new_revision_is_preceded_by_the_retraction_of_the_previous(prism) -> None:
    test_panes.assert_retraction_precedes_each_new_revision(
        result(prism, "panes")["changelog"])


def test_dedup_holds_across_panes_windows_and_hours_of_arrival(prism) -> None:
    test_panes.assert_dedup_held(result(prism, "dedup")[0])


def test_latest_values_equal_the_oracle_for_drawn_arrival_orders(prism) -> None:
    """test_property's oracle on PROPERTY_CASES derandomized draws of its strategy."""
    for entry in prism["property"]:
        assert "error" not in entry, entry["error"]
        changelog, dead = entry["result"]
        assert dead == []
        assert test_property.latest_values(changelog) == \
            test_property.oracle_of(entry["case"])


def test_changelog_state_final_mark_and_cleanup(prism) -> None:
    assert result(prism, "after_final_mark") == \
        test_changelog_state.ROWS_AFTER_FINAL_MARK
    test_changelog_state.assert_window_was_forgotten(result(prism, "after_cleanup"))


def test_watermark_lag_samples(prism) -> None:
    assert result(prism, "watermark_lag") == test_freshness.LAG_SAMPLES


# The hour's page views in the changelog, exactly. Prism keeps an accumulating window's
# elements pending for its later panes until the last one (the window's horizon), and
# pending elements pin a stage's watermark (aggregateStageKind.buildEventTimeBundle and
# minPendingTimestampLocked in Prism 2.77's engine/elementmanager.go): the changelog
# stage's input watermark reaches 11:00 only once the hour's 2 h lateness has passed.
# So e4, added at 11:01 within the lateness, reaches the stage before its window-end
# timer: EARLY there, and the timer's ON_TIME revision holds it. Prism runs each
# TestStream event only once the pipeline is quiescent (checkForQuiescence), so this is
# the one sequence: 54 runs of the scenario alone gave it every time, also with the
# watermark at 11:02, 11:59 or 12:59 and an hour of processing time before e4. (The
# DirectRunner, which releases the hold at the window end, gives test_panes' sequence
# with e4 LATE; so does Flink for late arrivals, tests/test_kafka_flink.py.)
HOUR_SEQUENCE = [(3, "EARLY", False), (4, "EARLY", False), (4, "ON_TIME", False),
                 (4, "ON_TIME", True)]


def test_changelog_timing_is_derived_exactly(prism) -> None:
    """The changelog stage derives timing from its own window-end timer, whatever
    labels and order Prism gives its panes (recorded below): per key, EARLY revisions,
    exactly one ON_TIME, then LATE ones, values never decreasing, the last one final
    and repeating the timing it closes; the hour's page views exactly HOUR_SEQUENCE."""
    changelog = result(prism, "panes")["changelog"]
    hour = [(r["value"], r["timing"], r["is_final"]) for r in rows_for(
        changelog, "events", "hour", at(10), test_panes.PAGE_VIEWS) if r["sign"] > 0]
    assert hour == HOUR_SEQUENCE
    by_key = defaultdict(list)
    for row in changelog:
        if row["sign"] > 0:
            by_key[(row["metric"], row["dims"], row["granularity"],
                    row["window_start"])].append(row)
    assert by_key
    for key, rows in by_key.items():
        rows.sort(key=lambda r: r["revision"])
        timings = [r["timing"] for r in rows[:-1]]
        on_time = timings.index("ON_TIME")
        assert set(timings[:on_time]) <= {"EARLY"}, key
        assert set(timings[on_time + 1:]) <= {"LATE"}, key
        assert rows[-1]["is_final"] and rows[-1]["timing"] == rows[-2]["timing"], key
        values = [r["value"] for r in rows]
        assert values == sorted(values), key


def test_prism_pane_labels_and_order_are_recorded_not_asserted(
        prism, record_property) -> None:
    """What Prism 2.77 does with the runner's panes (before the changelog stage), for
    the events of test_panes' scenario.

    Measured in 15 runs (10 of this module, 5 probes), the same every time: no value-2
    EARLY pane after TestStream's first 61 s of processing time (the hour's first pane
    already holds e3); the hour's panes labelled ON_TIME, EARLY, ON_TIME, EARLY,
    ON_TIME, LATE by index (EARLY after ON_TIME, three ON_TIME panes); the day's EARLY,
    EARLY, EARLY, ON_TIME, LATE. Not the same every time: the order in which the panes
    reach the next stage (the hour's never in index order in 10 runs, its last pane
    before indices 2-4 in 6; the day's in order in 2). So test_panes' exact sequence
    (2 EARLY, 3 EARLY, 3 ON_TIME, 4 LATE, final) cannot hold on Prism: its trigger and
    pane support is incomplete, tracked upstream in apache/beam#31438 ("[prism]
    Triggers and Panes and Windowing Strategies", open), where extra ON_TIME panes for
    non-watermark triggers are a known discrepancy with Dataflow (apache/beam#36069)
    and pane info overwritten between bundles is still open (apache/beam#36188).

    Asserted instead, what holds in every run: each window's pane indices are 0..n-1,
    values never decrease with the index, and the last pane holds the final value. The
    observed labels and arrival order are printed and kept as a test property (junit
    XML)."""
    run = result(prism, "panes")
    panes = [p for p in run["panes"]
             if p["metric"] == "events" and p["dims"] == test_panes.PAGE_VIEWS]
    by_window = defaultdict(list)
    for p in panes:  # in arrival order
        by_window[(p["granularity"], p["window_start"])].append(p)
    expected_final = {("hour", at(10)): 4, ("day", at(0)): 5}
    assert {(g, start.timestamp()) for g, start in by_window} == set(expected_final)
    observed: dict[str, Any] = {}
    for (granularity, start), arrived in by_window.items():
        by_index = sorted(arrived, key=lambda p: p["index"])
        assert [p["index"] for p in by_index] == list(range(len(by_index)))
        values = [p["value"] for p in by_index]
        assert values == sorted(values)
        assert values[-1] == expected_final[(granularity, start.timestamp())]
        observed[granularity] = {
            "by_index": [(p["value"], p["timing"]) for p in by_index],
            "arrival_order": [p["index"] for p in arrived],
            "label_order_is_beams": [p["timing"] for p in by_index] == sorted(
                (p["timing"] for p in by_index), key=TIMINGS.index),
            "in_order": [p["index"] for p in arrived] == sorted(p["index"] for p in arrived),
        }
    observed["panes_out_of_order"] = run["counters"].get("panes_out_of_order", 0)
    record_property("prism_panes", json.dumps(observed))
    print(f"\nPrism panes (events, page_view): {json.dumps(observed)}")

