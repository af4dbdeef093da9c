#!/usr/bin/env python
"""Run the TestStream scenarios of the pane, lateness, property, changelog-state and
freshness tests on Prism, one pipeline each, and pickle what they produced.

Not a pytest module: tests/test_prism_panes.py runs it in a child process inside a
private network namespace (see ``isolation_prefix`` in tests/test_runner_prism.py):
Prism's job service listens on ":port" and Beam's LOOPBACK worker pool on "[::]:port".
The LOOPBACK worker runs in this process, so the tests' in-process collectors
(tests/streaming.py ``Collect``) work here as they do on the DirectRunner. All the
scenarios run in this one process to pay Python's and Beam's start-up once.

    .venv/bin/python tests/prism_streams.py OUT.pickle [--property-cases N]

The pickle maps a scenario name to {"result": ..., "wall_s": ...} or, if the pipeline
failed, {"error": traceback, "wall_s": ...}; "property" holds a list of
{"case": ..., "result": ...}. The scenarios and their oracles live in the test modules
this imports; only the runner differs.
"""

from __future__ import annotations

import argparse
import pickle
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from runners import preset_args  # noqa: E402
from tests import (  # noqa: E402
    test_changelog_state,
    test_freshness,
    test_panes,
    test_property,
)
from tests.streaming import record_stream, run_stream  # noqa: E402


def property_cases(n: int) -> list[Any]:
    """n arrival orders drawn by test_property's strategy, the same ones every run
    (derandomized), so a failure on Prism can be replayed on the DirectRunner."""
    cases: list[Any] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(test_property.streams())
    def draw(case: Any) -> None:
        cases.append(case)

    draw()
    return cases[:n]


def timed(run: Callable[[], Any]) -> dict[str, Any]:
    started = time.monotonic()
    try:
        out: dict[str, Any] = {"result": run()}
    except Exception:  # reported to the test, which fails with it
        out = {"error": traceback.format_exc()}
    out["wall_s"] = round(time.monotonic() - started, 2)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--property-cases", type=int, default=3)
    args = parser.parse_args(argv)
    prism = preset_args("prism")
    panes, state, lag = test_panes, test_changelog_state, test_freshness
    results: dict[str, Any] = {
        "panes": timed(lambda: record_stream(panes.scenario(), panes.CONFIG, prism)),
        "dedup": timed(lambda: run_stream(panes.dedup_scenario(), panes.CONFIG, prism)),
        "after_final_mark": timed(lambda: state.run(state.pane_after_final_mark(), prism)),
        "after_cleanup": timed(lambda: state.run(state.pane_after_cleanup(), prism)),
        "watermark_lag": timed(lambda: lag.samples(lag.lag_stream(), prism)),
        "property": [dict(timed(lambda c=case: run_stream(  # type: ignore[misc]
            test_property.stream_of(c), test_property.CONFIG, prism)), case=case)
            for case in property_cases(args.property_cases)],
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
    }
    with open(args.out, "wb") as f:
        pickle.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
