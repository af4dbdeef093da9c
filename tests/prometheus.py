"""A real Prometheus (Debian's package, installed by scripts/install_prometheus) on a free
127.0.0.1 port, for the exporter and alert tests: scrape every second, evaluate rules every
second, query the HTTP API."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.servers import ServerError, _http_ok, _running, free_port

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "monitoring" / "alerts.yml"
RULE_TESTS = REPO / "monitoring" / "alerts_test.yml"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServerError(f"{name} not found: run scripts/install_prometheus "
                          "(scripts/test does)")
    return path


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query → {sorted labels (without __name__): value}."""
        return {tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")):
                float(r["value"][1]) for r in self.get("/api/v1/query", query=expr)["result"]}

    def alerts(self) -> list[dict]:
        return self.get("/api/v1/alerts")["alerts"]

    def targets_up(self) -> list[dict]:
        return [t for t in self.get("/api/v1/targets")["activeTargets"]
                if t["health"] == "up"]

    def wait_for(self, what: str, check: Callable[[], Any], timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus: {what} not seen within {timeout_s:.0f} s")
            time.sleep(0.5)


@contextlib.contextmanager
def prometheus(targets: Sequence[str], rules: dict | None = None,
               job: str = "clickstream", timeout: float = 30.0) -> Iterator[Prometheus]:
    """Prometheus scraping `targets` (host:port) as job `job` every second, with the rule
    groups `rules` (a parsed rule file) evaluated every second."""
    with tempfile.TemporaryDirectory(prefix="prometheus-") as tmp:
        config: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        if rules is not None:
            (Path(tmp) / "rules.yml").write_text(yaml.safe_dump(rules))
            config["rule_files"] = [str(Path(tmp) / "rules.yml")]
        (Path(tmp) / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        cmd = [binary("prometheus"), f"--config.file={tmp}/prometheus.yml",
               f"--storage.tsdb.path={tmp}/data", f"--web.listen-address=127.0.0.1:{port}",
               "--log.level=warn"]
        url = f"http://127.0.0.1:{port}"
        with _running(cmd, lambda: _http_ok(f"{url}/-/ready"), timeout, "Prometheus"):
            yield Prometheus(url)


def load_rules(path: Path = RULES) -> dict:
    return yaml.safe_load(path.read_text())


def with_short_waits(rules: dict, for_s: int, windows: dict[str, str] | None = None) -> dict:
    """The rule file with every alert's `for:` set to `for_s` seconds (and range windows
    renamed, e.g. {"[5m]": "[20s]"}), for a live test that cannot wait minutes; the
    expressions and thresholds stay those of the file."""
    shortened = json.loads(json.dumps(rules))
    for group in shortened["groups"]:
        for rule in group["rules"]:
            if "alert" in rule and "for" in rule:
                rule["for"] = f"{for_s}s"
            for old, new in (windows or {}).items():
                rule["expr"] = rule["expr"].replace(old, new)
    return shortened
