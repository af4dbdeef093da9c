"""PrismRunner preset: Beam's portable local runner, built by scripts/fetch_prism.

Prism runs streaming semantics (watermarks, timers, triggers, TestStream) in one
local Go process, with the Python SDK harness in-process (LOOPBACK).
"""

from __future__ import annotations

import os
from pathlib import Path

from runners import OptionValue, render_args

# Where scripts/fetch_prism puts the binary (GOBIN), relative to the repository root.
PRISM_BINARY = Path(__file__).resolve().parent.parent / ".cache" / "bin" / "prism"


def prism_location() -> str:
    """Path of the locally built Prism binary ($PRISM_LOCATION wins)."""
    return os.environ.get("PRISM_LOCATION") or str(PRISM_BINARY)


def preset_args(**overrides: object) -> list[str]:
    """Prism runner args; see ``runners.preset_args`` for override rules."""
    defaults: dict[str, OptionValue] = {
        "runner": "PrismRunner",
        # Use the binary built from the Go module; without it Beam downloads Prism from a
        # release page, which is unreachable here.
        "prism_location": prism_location(),
        # The SDK harness runs inside this Python process: no Docker, no extra processes.
        "environment_type": "LOOPBACK",
        # One Prism server per pipeline: Beam shares one per process, and a DirectRunner run
        # earlier in the process (which tries Prism with no location) poisons that singleton.
        "experiments": ["disable_prism_server_singleton"],
        # Prism logs every job state change at info; warn keeps test output readable.
        "prism_log_level": "warn",
    }
    return render_args(defaults, overrides)
