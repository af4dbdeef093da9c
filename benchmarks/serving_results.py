"""What the serving benchmarks share: the report's header fields and writing it."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.run import environment, say


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def new_report(module: str, argv: Sequence[str] | None, config: dict[str, Any]
               ) -> dict[str, Any]:
    """Start time, environment, load average (the machine is shared) and command."""
    args = list(argv if argv is not None else sys.argv[1:])
    return {"started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "environment": environment(),
            "load_start": [round(x, 2) for x in os.getloadavg()],
            "command": " ".join(["python -m", module, *args]), "config": config}


def report_header(report: dict[str, Any], title: str) -> list[str]:
    """The results page's first lines: title, when, where, the load, the command."""
    env = report["environment"]
    return [f"# {title}", "",
            f"{report['started']} · {env['cpus']} CPUs · load average (1/5/15 min) at "
            f"start {report['load_start']}, at end {report['load_end']} · commit "
            f"{env['commit']}", "", f"`{report['command']}`", ""]


def write_report(report: dict[str, Any], name: str, out: str,
                 render: Callable[[dict[str, Any]], str]) -> None:
    """results-NAME-DATE.{json,md} in `out`, with the load average at the end."""
    report["load_end"] = [round(x, 2) for x in os.getloadavg()]
    stem = Path(out) / f"results-{name}-{report['started'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(report))
    say(render(report))
    say(f"wrote {stem}.json and {stem}.md")
