#!/usr/bin/env python
"""Run the bounded clickstream job on Prism and print its summary as JSON (last line).

Not a pytest module: tests/test_runner_prism.py runs it in a child process, inside a
private network namespace (see ``isolation_prefix`` there), because Prism's job service
listens on ":port" (every interface; Prism 2.77 has no bind-host flag) and Beam's
LOOPBACK worker pool on "[::]:port". In the namespace only loopback is up, so nothing
the job starts can be reached from outside this machine.

    .venv/bin/python tests/prism_job.py --input_files 'DIR/events-*.jsonl' \
        --duckdb_path DIR/out.duckdb [more job args]

Every argument is passed to ``pipeline.job.run`` after ``runners.preset_args('prism')``.
The JSON has the counters (from Prism's job metrics), the pipeline state, the wall time
and the network interfaces the process could see.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Appended, not prepended: an explicit PYTHONPATH (e.g. a patched checkout) still wins.
# Needed because the editable install may predate runners/.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from pipeline import job  # noqa: E402
from runners import preset_args  # noqa: E402


def main(argv: list[str]) -> int:
    started = time.monotonic()
    summary = job.run(preset_args("prism") + argv, progress_every_s=60)
    print(json.dumps({
        "counters": summary.counters,
        "state": summary.state,
        "elapsed_s": round(summary.elapsed_s, 2),
        "wall_s": round(time.monotonic() - started, 2),
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
    }, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
