"""The alert rules (monitoring/alerts.yml): valid for Prometheus, and every alert fires on
its synthetic series and stays silent on the nearby normal case (promtool test rules)."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.prometheus import RULE_TESTS, RULES, binary, load_rules

pytestmark = pytest.mark.integration  # runs promtool, an external program


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True,
                          timeout=120, cwd=RULES.parent)


def alert_names(rules: dict) -> set[str]:
    return {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}


def test_rule_file_is_valid() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_case_where_it_fires() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())
    fired = {case["alertname"] for test in tests["tests"]
             for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert alert_names(load_rules()) == fired
    assert {"ClickstreamWatermarkLagHigh", "ClickstreamConsumerLagGrowing",
            "ClickstreamHotPartition", "ClickstreamDeadLetterRateHigh",
            "ClickstreamDuplicatesRateAnomaly", "ClickstreamSinkRetries",
            "ClickstreamJobRestarts", "ClickstreamCheckpointFailures"} <= fired


def test_every_alert_links_its_runbook_section() -> None:
    runbook = (RULES.parents[1] / "docs" / "operations.md").read_text().lower()
    for name in alert_names(load_rules()):
        assert f"### {name.lower()}" in runbook, f"docs/operations.md has no section {name}"


def test_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_fail_when_a_threshold_moves(tmp_path) -> None:
    """The cases pin the thresholds: the same tests against a rule file with the
    dead-letter threshold raised must fail (so a passing run means something)."""
    rules = RULES.read_text().replace("dead_letter_ratio:rate5m > 0.01",
                                      "dead_letter_ratio:rate5m > 0.05")
    assert rules != RULES.read_text()
    (tmp_path / "alerts.yml").write_text(rules)
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["tests"] = [t for t in tests["tests"] if any(
        c["alertname"] == "ClickstreamDeadLetterRateHigh" for c in t["alert_rule_test"])]
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests))
    result = subprocess.run([binary("promtool"), "test", "rules", "alerts_test.yml"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert "ClickstreamDeadLetterRateHigh" in result.stdout + result.stderr


def test_scrape_config_is_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
