"""The dashboard in a real headless browser: Debian's chromium (scripts/install_chromium)
driven by Playwright's Python package through `executable_path` (no browser download),
against `clickstream serve` running as its own process over the served data set.

The page loads with no console errors, its charts and tables show the oracle's numbers,
and a late revision written to the DuckDB sink while the page is open shows up at the
next auto-refresh, drawn as late. Screenshots go to out/test-artifacts/ (kept after the
run) for a person to look at.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.serve_data import (  # noqa: F401 - served is a fixture
    DAYS,
    FIRST_DAY,
    clickstream_serve,
    late_revision,
    served,
    within_hll_error,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "out" / "test-artifacts"
LAST_DAY = FIRST_DAY + timedelta(days=DAYS - 1)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install_chromium", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def db(served, tmp_path) -> str:  # noqa: F811
    """A copy of the served DuckDB file: the test writes a late revision into it."""
    path = str(tmp_path / "dashboard.duckdb")
    shutil.copy(served.db, path)
    return path


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 1500})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(f"{url}/?refresh=1")
    page.wait_for_function("Number(document.getElementById('refreshed').dataset.count) >= 1")
    return page, problems


def table_points(page, section: str) -> dict[str, dict]:
    return {row.get_attribute("data-window"): {
        "value": int(row.get_attribute("data-value")),
        "state": row.get_attribute("data-state"),
        "revision": int(row.get_attribute("data-revision"))}
        for row in page.query_selector_all(f"#{section} table.points tr[data-window]")}


def bars(page, section: str) -> dict[str, int]:
    return {row.get_attribute("data-key"): int(row.get_attribute("data-value"))
            for row in page.query_selector_all(f"#{section} table.bars tr[data-key]")}


def test_the_dashboard_shows_the_oracles_numbers_and_a_late_revision(
        browser, served, db) -> None:  # noqa: F811
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with clickstream_serve("--duckdb_path", db, "--archive_path", served.archive) as url:
        page, problems = open_page(browser, url)
        try:
            dau = table_points(page, "dau")
            want = {w: v for (m, d, g, w), v in served.want.items()
                    if (m, d, g) == ("active_users", "{}", "day")}
            shown_days = {w.replace("Z", "+00:00"): p for w, p in dau.items()}
            # Every generated day is on the chart, each within the sketch's error of the
            # oracle, and drawn final (a bounded run ends every window final).
            for day in range(DAYS):
                key = f"{(FIRST_DAY + timedelta(days=day)).isoformat()}T00:00:00+00:00"
                assert within_hll_error(shown_days[key]["value"], want[key], 0.0162)
                assert shown_days[key]["state"] == "final"
            hau = table_points(page, "hau")
            assert len(hau) >= 24
            hours = {w: v for (m, d, g, w), v in served.want.items()
                     if (m, d, g) == ("active_users", "{}", "hour")}
            for window, point in hau.items():
                assert within_hll_error(point["value"], hours[window.replace("Z", "+00:00")],
                                        0.0162)
            newest = max(datetime.fromisoformat(w.replace("Z", "+00:00")) for w in dau)
            newest_day = newest.date()
            for tile in page.query_selector_all("#uniques [data-window]"):
                days = int(tile.get_attribute("data-window"))
                truth = served.identities(newest_day - timedelta(days=days - 1), newest_day)
                assert tile.get_attribute("data-mode") == "hll"
                assert within_hll_error(int(tile.get_attribute("data-value")), truth, 0.0162)
            funnel = bars(page, "funnel")
            steps = served.expected["funnel_steps"]
            assert list(funnel) == steps
            assert list(funnel.values()) == [served.want.get(("funnel_step", json.dumps(
                {"name": n, "step": str(i + 1)}, sort_keys=True, separators=(",", ":")),
                "day", newest.isoformat()), 0) for i, n in enumerate(steps)]
            assert bars(page, "dead_letters") == served.expected["counts"][
                "dead_letter_by_reason"]
            assert page.text_content('[data-field="watermark_lag"]') == "unknown"
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # A late pane lands in the sink for the last generated day.
            late_day = datetime.combine(LAST_DAY, datetime.min.time(), tzinfo=UTC)
            key = late_day.isoformat().replace("+00:00", "Z")
            before = dau[key]
            new_value = late_revision(db, late_day, extra_users=40)
            assert new_value > before["value"]
            page.wait_for_function(
                "(v) => document.querySelector(`#dau tr[data-window='" + key +
                "']`)?.dataset.value == v", arg=str(new_value), timeout=15_000)
            after = table_points(page, "dau")[key]
            assert after == {"value": new_value, "state": "late",
                             "revision": before["revision"] + 1}
            page.screenshot(path=str(ARTIFACTS / "dashboard-late-revision.png"),
                            full_page=True)
            assert problems == []
        finally:
            page.close()
