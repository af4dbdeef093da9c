"""What the parse stage (the pipeline's hot path) pays for privacy and schema version 2.

Times ParseEventFn itself, in process, over a generated dataset's lines (the same
datasets as `scripts/bench`), so the runner's own per-element costs do not hide a
difference. Variants, interleaved round by round so machine load drifts hit all alike:

    v1            the version-1 schema's rules, no privacy policy (main before this work)
    v2            the current schema (app_version, country), no policy
    v2+key        pseudonymised user, device and session ids
    v2+key+allow  the same and a properties allow-list

    python -m benchmarks.parse_privacy --events 1000000 --rounds 5

Times are the process's CPU seconds (user + sys), not wall time: on a shared,
oversubscribed machine the wall clock mostly measures waiting for a core. Writes
benchmarks/results-parse-privacy-DATE.{json,md} with the load average and CPU count,
each variant's median CPU seconds and its ratio to v1 (median of per-round ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import schemas
from benchmarks.run import dataset
from transforms.parse import EventRules, ParseEventFn
from transforms.pseudonymize import KeySource, PrivacyPolicy

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = 4096  # lines per process() call, as the file source hands them on in lists


def _v1_rules() -> EventRules:
    with open(ROOT / "schemas" / "history" / "event.v1.avsc") as f:
        return EventRules.from_schema(json.load(f))


def _variants(key_file: str) -> dict[str, tuple[PrivacyPolicy | None, bool]]:
    key = KeySource(file=key_file)
    return {
        "v1": (None, True),
        "v2": (None, False),
        "v2+key": (PrivacyPolicy(key=key), False),
        "v2+key+allow": (PrivacyPolicy(key=key, properties_allowlist=frozenset({"feature"})),
                         False),
    }


def time_parse(lines: list[bytes], policy: PrivacyPolicy | None, v1: bool) -> float:
    fn = ParseEventFn(privacy=policy)
    fn.setup()
    if v1:
        fn._rules = _v1_rules()
    started = time.process_time()
    fn.start_bundle()
    valid = 0
    for i in range(0, len(lines), BUNDLE):
        for out in fn.process(lines[i:i + BUNDLE]):
            valid += len(out.value) if hasattr(out, "value") and isinstance(
                out.value, list) else 0
    for out in fn.finish_bundle():
        valid += len(out.value)
    elapsed = time.process_time() - started
    if valid < len(lines) // 2:
        raise RuntimeError(f"only {valid} of {len(lines)} lines parsed as valid")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-dir", default=str(ROOT / ".cache" / "bench-data"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args()
    data = dataset(Path(args.data_dir), args.events, args.seed)
    lines = [line.rstrip(b"\n") for path in sorted(data.glob("events-*.jsonl"))
             for line in path.open("rb")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        key_file = os.path.join(tmp, "key")
        with open(key_file, "wb") as f:
            f.write(os.urandom(32).hex().encode())
        variants = _variants(key_file)
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for round_no in range(args.rounds):
            for name, (policy, v1) in variants.items():
                seconds[name].append(time_parse(lines, policy, v1))
            print(f"round {round_no + 1}/{args.rounds}: " + ", ".join(
                f"{n} {s[-1]:.2f} s" for n, s in seconds.items()), flush=True)
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python -m benchmarks.parse_privacy --events {args.events} "
                   f"--rounds {args.rounds}",
        "lines": len(lines),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "python": platform.python_version(),
        "schema_version": schemas.event_schema()["x-version"],
        "variants": {
            name: {
                "seconds": s,
                "median_s": statistics.median(s),
                "us_per_line": statistics.median(s) / len(lines) * 1e6,
                "ratio_to_v1_median": statistics.median(
                    a / b for a, b in zip(s, seconds["v1"], strict=True)),
                "ratio_to_v1_min": min(a / b for a, b in zip(s, seconds["v1"], strict=True)),
                "ratio_to_v1_max": max(a / b for a, b in zip(s, seconds["v1"], strict=True)),
            } for name, s in seconds.items()},
    }
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    out = Path(args.out)
    (out / f"results-parse-privacy-{stamp}.json").write_text(json.dumps(result, indent=1))
    rows = [f"| {name} | {v['median_s']:.2f} | {v['us_per_line']:.2f} | "
            f"{v['ratio_to_v1_median']:.3f} ({v['ratio_to_v1_min']:.3f}–"
            f"{v['ratio_to_v1_max']:.3f}) |" for name, v in result["variants"].items()]
    (out / f"results-parse-privacy-{stamp}.md").write_text("\n".join([
        f"# Parse stage cost of privacy options ({result['when']})", "",
        f"`{result['command']}`: {len(lines):,} lines, {args.rounds} interleaved rounds, "
        f"{result['cpu_count']} CPUs, load average {load_before[0]:.1f} before and "
        f"{result['loadavg_after'][0]:.1f} after (a shared machine: compare the ratios).",
        "", "| variant | median CPU s | CPU µs/line | ratio to v1, median (min–max) |",
        "|---|---|---|---|", *rows, ""]))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
