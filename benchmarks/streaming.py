"""Streaming lag benchmark: `scripts/bench --streaming --rates 20 50 100 [--duration-s 60]`.

For each publish rate R (messages/s) and each graph (the job; the baseline with Beam's
DeduplicatePerKey): start Google's Pub/Sub emulator on 127.0.0.1, create a topic and a
subscription, start the streaming job as its own process (`clickstream run
--input_subscription ... --timestamp_attribute event_time --early_firing_s K`, or
`python -m benchmarks.baseline` with the same flags), warm it up until the sink shows a
first event, then publish events of "now" at a steady R for the duration (each event's
event_time is its send time; a share of messages resend an earlier event_id, as Pub/Sub's
at-least-once delivery does). Meanwhile poll the DuckDB file read-only for the day
windows' `events` count and measure:

- freshness lag: at each sample, now minus the send time of the N-th unique event, N the
  count the sink shows (0 once it shows every event sent so far): p50/p95/max, and the
  catch-up time from the last publish until the sink shows every unique event;
- throughput: the slope of the sink's count over the second half of publishing (what the
  job sustains), events per CPU-second of the job process (/proc, user+sys, all threads,
  from the first steady message to the end of measuring), its peak RSS (VmHWM);
- the job's own watermark lag (transforms/freshness.py), from its output: the gauge in
  its progress lines, or the probe's log line where the runner drops the gauge;
- correctness: after the job stops, every hour and day window's `events` value equals the
  unique events sent in it, and the changelog sums (sign × value) to the latest value.

Then SIGTERM the job (it cancels itself and prints its summary) and stop the emulator by
PID. Timing lives here, never in pass/fail tests; the pure parts (lag from send times and
samples) are tested in tests/test_bench_streaming.py.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.procs import cpu_s, status_mib
from benchmarks.run import (
    ROOT,
    _clock,
    _forward,
    runs_table,
    say,
    verdict,
)
from pipeline import generator
from schemas import GRANULARITY_MS

PROJECT = "clickstream-bench"
TIMESTAMP_ATTRIBUTE = "event_time"
DAY_EVENTS_SQL = ("SELECT coalesce(sum(value), 0) FROM metric_latest "
                  "WHERE metric = 'events' AND granularity = 'day'")
WINDOW_EVENTS_SQL = ("SELECT granularity, window_start, sum(value) FROM metric_latest "
                     "WHERE metric = 'events' GROUP BY ALL")
# The progress line's gauge ("watermark lag 3 s") and the probe's own log line
# ("watermark lag sample: 2.5 s"), which is all this runner's output carries.
WATERMARK_LAG = re.compile(r"watermark lag(?: sample:)? ([\d,.]+) s")
READY = "streaming from "
KEEP_ALIVE_S = 0.5
# The stream's events: the generator's live events, with ids of their own.
live_event = functools.partial(generator.live_event, id_prefix="bench",
                               timestamp_attribute=TIMESTAMP_ATTRIBUTE)


# --- pure functions (tests/test_bench_streaming.py) ------------------------------------

def freshness_lags(unique_send_s: Sequence[float],
                   samples: Sequence[tuple[float, int]]) -> list[float]:
    """The sink's staleness at each sample (t, unique events it shows).

    `unique_send_s`: the send time of each unique event, ascending. A sink showing N
    events is as fresh as the N-th event sent: lag = t - send time of the N-th (t - the
    first send while it shows none). Once it shows every event sent by t, the lag is 0.
    Pub/Sub does not promise order, so the N shown need not be the first N sent: this
    reads the count, as a dashboard does. Samples before the first send are skipped.
    """
    lags = []
    for t, shown in samples:
        sent = bisect.bisect_right(unique_send_s, t)
        if sent == 0:
            continue
        if shown >= sent:
            lags.append(0.0)
        else:
            lags.append(max(0.0, t - unique_send_s[max(shown, 1) - 1]))
    return lags


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def catch_up_s(samples: Sequence[tuple[float, int]], total: int,
               last_send_s: float) -> float | None:
    """Seconds from the last publish until the first sample showing all `total` unique
    events (None: never within the samples)."""
    for t, shown in samples:
        if shown >= total:
            return max(0.0, t - last_send_s)
    return None


def sink_rate(samples: Sequence[tuple[float, int]], start_s: float,
              end_s: float) -> float | None:
    """Events/s the sink's count grew by over the samples in [start_s, end_s]: the
    least-squares slope, as the count moves in steps (a pane at a time) and the two
    end samples alone would land anywhere on a step (None: fewer than two samples)."""
    inside = [(t, n) for t, n in samples if start_s <= t <= end_s]
    if len(inside) < 2:
        return None
    times = [t for t, _ in inside]
    if len(set(times)) < 2:
        return None
    return statistics.linear_regression(times, [n for _, n in inside]).slope


def expected_windows(unique_event_ms: Sequence[int]) -> dict[tuple[str, int], int]:
    """(granularity, window start in epoch ms) → unique events in that window."""
    want: dict[tuple[str, int], int] = {}
    for ms in unique_event_ms:
        for granularity, size in GRANULARITY_MS.items():
            key = (granularity, ms // size * size)
            want[key] = want.get(key, 0) + 1
    return want


# --- the stream -----------------------------------------------------------------------

@dataclass
class Stream:
    """What was published: each unique event's send time (s) and event time (ms), in
    send order, and the message count (unique + resent)."""

    send_s: list[float] = field(default_factory=list)
    event_ms: list[int] = field(default_factory=list)
    messages: int = 0
    keep_alive: int = 0  # resent after the steady part (Publisher.keep_alive)
    _payloads: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)

    @property
    def unique(self) -> int:
        return len(self.send_s)

    @property
    def duplicates(self) -> int:
        return self.messages - self.unique


class Publisher:
    """Publishes live events to a topic, recording what it sent."""

    def __init__(self, topic: str, duplicate_share: float, seed: int = 1) -> None:
        from google.cloud import pubsub_v1  # type: ignore[attr-defined]

        self._client = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(max_messages=100,
                                                         max_latency=0.01))
        self._topic = topic
        self._duplicate_share = duplicate_share
        self._random = random.Random(seed)
        self._futures: list[Any] = []
        self.stream = Stream()

    def send_one(self, resend: bool = False) -> None:
        """A new event, or (`resend`, or by the duplicate share) an earlier one again."""
        stream = self.stream
        if stream.unique and (resend or self._random.random() < self._duplicate_share):
            # Redeliver one of the last ~100 events: same event_id, payload, attributes.
            back = self._random.randrange(min(stream.unique, 100))
            payload, attributes = stream._payloads[-1 - back]
        else:
            now = time.time()
            now_ms = int(now * 1000)
            payload, attributes = live_event(stream.unique, now_ms)
            stream.send_s.append(now)
            stream.event_ms.append(now_ms)
            stream._payloads.append((payload, attributes))
            del stream._payloads[:-100]
        self._futures.append(self._client.publish(self._topic, payload, **attributes))
        stream.messages += 1
        if len(self._futures) >= 500:
            self.flush()

    def steady(self, rate: float, duration_s: float) -> tuple[float, float]:
        """`rate` messages/s for `duration_s`, paced against the start so client latency
        does not add up. Returns (first, last) send time."""
        started = time.monotonic()
        first = time.time()
        for i in range(int(rate * duration_s)):
            ahead = started + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            self.send_one()
        self.flush()
        return first, time.time()

    def keep_alive(self, stop: threading.Event, every_s: float) -> None:
        """Resend earlier events every `every_s` until `stop`: the DirectRunner's Pub/Sub
        read blocks ~30 s on an empty pull, and processing-time triggers (the early
        panes that show the last events) wait with it; a live stream never goes quiet.
        Resent events are duplicates: they must change no count."""
        while not stop.wait(every_s):
            self.send_one(resend=True)
            self.stream.keep_alive += 1
            self.flush()

    def flush(self) -> None:
        for future in self._futures:
            future.result(timeout=60)  # raises if Pub/Sub refused a message
        self._futures = []

    def close(self) -> None:
        self.flush()
        self._client.stop()


# --- the job process ------------------------------------------------------------------

def job_command(mode: str, subscription: str, duckdb_path: str, early_firing_s: int,
                max_run_s: int) -> list[str]:
    """The graph runs as a user runs it (`clickstream run`); the baseline through
    benchmarks.baseline, which takes the same flags."""
    entry = (["-m", "pipeline.cli", "run"] if mode == "graph"
             else ["-m", "benchmarks.baseline"])
    return [sys.executable, *entry, "--input_subscription", subscription,
            "--duckdb_path", duckdb_path, "--timestamp_attribute", TIMESTAMP_ATTRIBUTE,
            "--early_firing_s", str(early_firing_s), "--max_run_s", str(max_run_s)]


def sink_events(duckdb_path: str) -> int | None:
    """The day windows' `events` total in the sink (None: not readable yet)."""
    from transforms.sink_duckdb import read_rows

    if not os.path.exists(duckdb_path):
        return None
    try:
        return int(read_rows(duckdb_path, DAY_EVENTS_SQL)[0][0])
    except Exception:  # tables not created yet
        return None


class Poller(threading.Thread):
    """Samples (wall time, sink events) every `every_s` until stopped."""

    def __init__(self, duckdb_path: str, every_s: float) -> None:
        super().__init__(daemon=True)
        self._path, self._every_s = duckdb_path, every_s
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while True:
            shown = sink_events(self._path)
            self.samples.append((time.time(), shown or 0))
            if self.stop.wait(self._every_s):
                return

    def latest(self) -> int:
        return self.samples[-1][1] if self.samples else 0


def _wait(condition: Callable[[], bool], timeout_s: float, job: subprocess.Popen,
          every_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        if job.poll() is not None:
            return False
        time.sleep(every_s)
    return condition()


@dataclass
class StreamSettings:
    duration_s: float
    early_firing_s: int
    catch_up_cap_s: float
    poll_s: float
    duplicate_share: float
    warm_up_cap_s: float = 90.0
    startup_cap_s: float = 120.0


def run_stream(mode: str, rate: float, settings: StreamSettings, out_dir: Path
               ) -> dict[str, Any]:
    """One measured streaming run: its own emulator, subscription, job process, DuckDB."""
    work = Path(tempfile.mkdtemp(prefix="clickstream-bench-stream-"))
    try:
        return _run_stream(mode, rate, settings, out_dir, str(work / "stream.duckdb"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_stream(mode: str, rate: float, settings: StreamSettings, out_dir: Path,
                db: str) -> dict[str, Any]:
    from pipeline.compare import changelog_mismatches
    from pipeline.publish import ensure_subscription
    from tests.servers import pubsub_emulator, stop_process
    from transforms.sink_duckdb import read_rows

    prefix = f"[{mode} @ {rate:g}/s]"
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"streaming-{rate:g}-{mode}.log"
    result: dict[str, Any] = {"mode": mode, "rate": rate, "log": str(log_path),
                              "load_1m_start": os.getloadavg()[0]}
    max_run_s = int(settings.startup_cap_s + settings.warm_up_cap_s + settings.duration_s
                    + settings.catch_up_cap_s + 120)
    watermark: list[tuple[float, float]] = []
    ready, stopped_by_sigterm = threading.Event(), threading.Event()

    def watch(line: str) -> None:
        if READY in line:
            ready.set()
        if "stopping (SIGTERM)" in line:
            stopped_by_sigterm.set()
        match = WATERMARK_LAG.search(line)
        if match:
            watermark.append((time.time(), float(match.group(1).replace(",", ""))))

    tail: list[str] = []
    started = time.monotonic()
    with contextlib.ExitStack() as cleanup, pubsub_emulator() as host, \
            open(log_path, "w") as log:
        os.environ["PUBSUB_EMULATOR_HOST"] = host  # this process's publisher, the job
        cleanup.callback(os.environ.pop, "PUBSUB_EMULATOR_HOST", None)
        name = f"events-{mode}-{int(rate)}"
        topic = f"projects/{PROJECT}/topics/{name}"
        subscription = f"projects/{PROJECT}/subscriptions/{name}-job"
        ensure_subscription(topic, subscription)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                          env.get("PYTHONPATH")]))
        command = job_command(mode, subscription, db, settings.early_firing_s, max_run_s)
        say(f"{prefix} emulator on {host}; starting the job (log: {log_path})")
        job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace")
        assert job.stdout is not None
        reader = threading.Thread(target=_forward,
                                  args=(job.stdout, prefix, log, tail, watch), daemon=True)
        reader.start()
        publisher = Publisher(topic, settings.duplicate_share)
        poller = Poller(db, settings.poll_s)
        stop_keep_alive = threading.Event()
        keep_alive: threading.Thread | None = None
        try:
            if not _wait(ready.is_set, settings.startup_cap_s, job):
                raise RuntimeError("the job did not start")
            result["startup_s"] = time.monotonic() - started
            # Warm-up: a message a second until the sink shows one (tables created, first
            # pane written), so start-up is not counted as lag.
            warm0 = time.monotonic()
            while sink_events(db) in (None, 0):
                if time.monotonic() - warm0 > settings.warm_up_cap_s or job.poll() is not None:
                    raise RuntimeError("the sink showed nothing during the warm-up")
                publisher.send_one()
                publisher.flush()
                time.sleep(1.0)
            result["warm_up_s"] = time.monotonic() - warm0
            result["warm_up_messages"] = publisher.stream.messages
            say(f"{prefix} warm ({result['warm_up_s']:.0f} s); publishing "
                f"{rate:g} messages/s for {settings.duration_s:g} s")
            cpu0, wall0 = cpu_s(job.pid), time.time()
            poller.start()
            first_s, last_s = publisher.steady(rate, settings.duration_s)
            total = publisher.stream.unique
            keep_alive = threading.Thread(target=publisher.keep_alive,
                                          args=(stop_keep_alive, KEEP_ALIVE_S), daemon=True)
            keep_alive.start()
            say(f"{prefix} published {publisher.stream.messages:,} messages "
                f"({total:,} unique); sink shows {poller.latest():,}; waiting for it "
                f"to catch up (at most {settings.catch_up_cap_s:g} s)")
            _wait(lambda: poller.latest() >= total, settings.catch_up_cap_s, job,
                  every_s=settings.poll_s / 2)
            # The sample that saw everything (or the cap) ends the measured interval.
            time.sleep(settings.poll_s * 1.5)
            cpu1, wall1 = cpu_s(job.pid), time.time()
            result["peak_rss_mib"] = status_mib(job.pid, "VmHWM")
        finally:
            poller.stop.set()
            poller.join(timeout=30)
            job_stop0 = time.monotonic()
            stop_process(job, timeout=120)  # SIGTERM: the job cancels itself and prints
            reader.join(timeout=10)
            stop_keep_alive.set()
            if keep_alive is not None:
                keep_alive.join(timeout=30)
            publisher.close()
        result["stop_s"] = time.monotonic() - job_stop0
        result["exit_code"] = job.returncode

    stream, samples = publisher.stream, poller.samples
    lags = freshness_lags(stream.send_s, [s for s in samples if s[0] >= first_s])
    got = {(g, int(w.timestamp() * 1000)): int(v) for g, w, v in read_rows(
        db, WINDOW_EVENTS_SQL)}
    want = expected_windows(stream.event_ms)
    counted = sink_events(db) or 0
    mismatches = len(changelog_mismatches(db))
    shown_at_end = samples[-1][1] if samples else 0
    cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
    counted_in_interval = shown_at_end - (samples[0][1] if samples else 0)
    result.update({
        "duration_s": settings.duration_s,
        "early_firing_s": settings.early_firing_s,
        "messages": stream.messages,
        "unique": stream.unique,
        "duplicates": stream.duplicates,
        "keep_alive_messages": stream.keep_alive,
        "published_rate": (stream.messages - stream.keep_alive
                           - result["warm_up_messages"]) / max(last_s - first_s, 1e-9),
        "lag_p50_s": percentile(lags, 50),
        "lag_p95_s": percentile(lags, 95),
        "lag_max_s": max(lags) if lags else None,
        "catch_up_s": catch_up_s(samples, stream.unique, last_s),
        "shown_at_end_of_measuring": shown_at_end,
        "sink_events_per_s": sink_rate(samples, first_s + settings.duration_s / 2, last_s),
        "cpu_s": cpu,
        "measured_wall_s": wall1 - wall0,
        "events_per_cpu_s": counted_in_interval / cpu if cpu else None,
        "cpu_per_wall": cpu / (wall1 - wall0) if cpu is not None else None,
        "watermark_lag_samples": [(round(t - first_s, 1), v) for t, v in watermark],
        "watermark_lag_max_s": max((v for t, v in watermark if t >= first_s),
                                   default=None),
        "watermark_lag_count": sum(t >= first_s for t, _ in watermark),
        "sink_events": counted,
        "sink_equals_sent": got == want,
        "windows_over_sent": sum(v > want.get(k, 0) for k, v in got.items()),
        "window_differences": sorted(
            f"{k}: sink={got.get(k)} sent={want.get(k)}"
            for k in set(got) | set(want) if got.get(k) != want.get(k))[:10],
        "changelog_sums_to_latest": mismatches == 0,
        "stopped_cleanly": result["exit_code"] == 0 and stopped_by_sigterm.is_set(),
        "samples": [(round(t - first_s, 2), n) for t, n in samples],
        "load_1m_end": os.getloadavg()[0],
        "process_s": time.monotonic() - started,
    })
    say(f"{prefix} done: lag p50 {_num(result['lag_p50_s'])} s, p95 "
        f"{_num(result['lag_p95_s'])} s, max {_num(result['lag_max_s'])} s; catch-up "
        f"{_num(result['catch_up_s'])} s; sink {_num(result['sink_events_per_s'], 0)} "
        f"events/s; {_num(result['events_per_cpu_s'], 0)} events/CPU-s; peak RSS "
        f"{_num(result['peak_rss_mib'], 0)} MiB; {stream_verdict(result)} "
        f"(process {_clock(result['process_s'])}, stop {result['stop_s']:.0f} s)")
    return result


def _problems(r: dict[str, Any]) -> list[str]:
    behind = r["catch_up_s"] is None
    return [text for failed, text in (
        # A run that never caught up is stopped with work in flight (the DirectRunner
        # acknowledges messages when it pulls them): the sink may hold less, never more.
        (not behind and not r["sink_equals_sent"],
         f"sink {r['sink_events']:,} != sent {r['unique']:,} unique"),
        (behind and r["windows_over_sent"],
         f"{r['windows_over_sent']} windows count more than was sent"),
        (not r["changelog_sums_to_latest"], "changelog does not sum to latest"),
        (not r["stopped_cleanly"], f"did not stop cleanly (exit {r['exit_code']})"),
    ) if failed]


def stream_verdict(r: dict[str, Any]) -> str:
    return verdict(r, _problems)


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


# --- report ---------------------------------------------------------------------------

def markdown_rows(report: dict[str, Any]) -> list[str]:
    """The streaming table (benchmarks.run.markdown adds the title and notes)."""
    return runs_table(
        report["runs"], lambda r: f"{r['rate']:g}",
        ("rate msg/s:", "run", "sent: unique + resent (+ keep-alive):", "published msg/s:",
         "freshness lag p50 / p95 / max s:", "catch-up s:", "sink events/s (2nd half):",
         "events/CPU-s:", "CPU/wall:", "peak RSS MiB:", "watermark lag max s (samples):",
         "load 1m start → end:", "sink = sent, changelog sums"),
        _row)


def _row(r: dict[str, Any]) -> list[str]:
    catch_up = _num(r["catch_up_s"])
    if r["catch_up_s"] is None:
        catch_up += (f" (not within {r['catch_up_cap_s']:g} s: "
                     f"{r['shown_at_end_of_measuring']:,} of {r['unique']:,})")
    verdict = stream_verdict(r)
    if verdict == "exact" and r["catch_up_s"] is None:
        verdict = (f"behind: {r['sink_events']:,} of {r['unique']:,} when stopped, none "
                   "over; changelog sums")
    return [
        f"{r['unique']:,} + {r['duplicates'] - r['keep_alive_messages']:,} "
        f"(+ {r['keep_alive_messages']:,})",
        f"{r['published_rate']:.1f}",
        f"{_num(r['lag_p50_s'])} / {_num(r['lag_p95_s'])} / {_num(r['lag_max_s'])}",
        catch_up, _num(r["sink_events_per_s"]), _num(r["events_per_cpu_s"], 0),
        _num(r["cpu_per_wall"], 2), _num(r["peak_rss_mib"], 0),
        f"{_num(r['watermark_lag_max_s'])} ({r['watermark_lag_count']})",
        f"{r['load_1m_start']:.2f} → {r['load_1m_end']:.2f}",
        "yes" if verdict == "exact" else
        verdict if verdict.startswith("behind") else f"**{verdict}**"]


def run_all(rates: Sequence[float], modes: Sequence[str], settings: StreamSettings,
            out_dir: Path) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    total = len(rates) * len(modes)
    started = time.monotonic()
    for rate in rates:
        for mode in modes:
            say(f"--- streaming run {len(runs) + 1}/{total}: {mode} @ {rate:g} messages/s "
                f"(total elapsed {_clock(time.monotonic() - started)})")
            try:
                result = run_stream(mode, rate, settings, out_dir)
            except Exception as exc:  # one failed run must not lose the others
                say(f"[{mode} @ {rate:g}/s] FAILED: {exc}")
                result = {"mode": mode, "rate": rate, "error": str(exc)}
            result["catch_up_cap_s"] = settings.catch_up_cap_s
            result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
            runs.append(result)
    return runs
