"""What a benchmark reads about processes from Linux /proc: CPU seconds, memory figures,
and the processes below one (a job's Java job server, a worker pool's SDK harnesses)."""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> tuple[str, list[str]]:
    """(command name, the fields after it) of /proc/PID/stat; the name may hold spaces
    and parentheses, so it is cut at the last ')'."""
    with open(f"/proc/{pid}/stat") as f:
        head, rest = f.read().rsplit(")", 1)
    return head.split("(", 1)[1], rest.split()


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process, every thread (None: it is gone)."""
    try:
        fields = _stat_fields(pid)[1]
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def status_mib(pid: int, key: str = "VmRSS") -> float | None:
    """A memory figure of a process: VmRSS (current resident set), VmHWM (its peak)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def descendants(pid: int, name: str = "java") -> list[int]:
    """PIDs of the processes below `pid` (children, theirs, ...) whose command name
    starts with `name` (java, python, python3.11, ...)."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm, fields = _stat_fields(int(entry))
            parents[int(entry)] = (int(fields[1]), comm)
        except (OSError, ValueError, IndexError):
            continue
    below, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in parents.items()
                    if parent in frontier and child not in below}
        below |= frontier
    return sorted(child for child in below if parents[child][1].startswith(name))
