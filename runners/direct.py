"""DirectRunner preset: tests and the local demo.

Beam 2.77's DirectRunner first tries Prism (downloading it from a release page,
which fails at once offline) and then falls back to the FnApiRunner for batch
graphs or the BundleBasedDirectRunner for streaming / TestStream / processing-time
timers. To run on Prism on purpose use the ``prism`` preset.
"""

from __future__ import annotations

import os

from runners import OptionValue, render_args


def _default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def preset_args(**overrides: object) -> list[str]:
    """Direct runner args; see ``runners.preset_args`` for override rules."""
    defaults: dict[str, OptionValue] = {
        "runner": "DirectRunner",
        # One worker per core: the FnApiRunner runs bundles in parallel across workers.
        "direct_num_workers": _default_workers(),
        # Threads share one process: no per-process pickling/start-up, and the SDK's
        # per-bundle state-cache cost is paid once; use multi_processing to escape the GIL.
        "direct_running_mode": "multi_threading",
    }
    return render_args(defaults, overrides)
