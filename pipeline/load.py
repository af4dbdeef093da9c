"""`clickstream load`: live load on a Kafka topic, shaped like production traffic.

Events are the generator's live events (pipeline.generator.live_event), event time =
send time, keyed by device so each device stays on one partition. On top of a constant
or diurnal rate:

- a burst: `--burst 5x:120s[@60s]` multiplies the rate by 5 for 120 s (from 60 s in;
  default: a third of the way in);
- a hot key: `--hot_key_share 0.3` sends that share of events from one bot device,
  whose records all land on one partition (the hot-partition case);
- late device syncs: `--late_share 0.01` sends that share with an event time 1-6 h in
  the past (inside the allowed lateness: they become late panes);
- at-least-once duplicates: `--duplicate_share 0.05` resends that share of an earlier
  event (same event_id and payload), which the job's dedup must drop.

confluent-kafka batches (pipeline/kafka.py), paced against the start in ticks of a few
ms so the producer's own latency does not add up; `--rate 0` sends as fast as it can,
which measures the generator's ceiling. `run_load` is the Python entry point (the
streaming benchmark and lag alerts drive it; `stop` ends it early).
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.generator import live_event
from pipeline.kafka import ensure_topic, producer

log = logging.getLogger("clickstream")

HOT_DEVICE = "d-hot-bot"
LATE_S = (3600, 6 * 3600)
TICK_S = 0.005
RESEND_WINDOW = 1000  # duplicates resend one of the last this many events
_BURST = re.compile(r"^(?P<factor>[\d.]+)x:(?P<length>[\d.]+)s(?:@(?P<start>[\d.]+)s)?$")


@dataclass(frozen=True)
class Burst:
    factor: float
    length_s: float
    start_s: float | None = None  # None: a third of the way into the run

    @classmethod
    def parse(cls, text: str) -> Burst:
        """'5x:120s' or '5x:120s@60s' (factor, length, optional start)."""
        match = _BURST.match(text.strip())
        if not match:
            raise ValueError(f"burst {text!r}: expected FACTORx:SECONDSs[@STARTs], "
                             "e.g. 5x:120s or 5x:120s@60s")
        start = match.group("start")
        return cls(float(match.group("factor")), float(match.group("length")),
                   float(start) if start is not None else None)


@dataclass
class LoadConfig:
    bootstrap: str
    topic: str
    rate: float  # mean events/s before shape and burst; 0: as fast as possible
    duration_s: float
    shape: str = "constant"  # or "diurnal": one 5x peak-to-trough cycle per run
    burst: Burst | None = None
    hot_key_share: float = 0.0
    late_share: float = 0.0
    duplicate_share: float = 0.0
    seed: int = 1
    id_prefix: str = "load"
    partitions: int = 4

    def rate_at(self, t: float) -> float:
        """Target events/s at `t` seconds into the run."""
        rate = self.rate
        if self.shape == "diurnal":
            # Same shape as the generator's day (5x peak to trough), one cycle per run,
            # starting at the trough.
            rate *= (1 - 0.66 * math.cos(2 * math.pi * t / self.duration_s)) / 1.0
        if self.burst is not None:
            start = (self.burst.start_s if self.burst.start_s is not None
                     else self.duration_s / 3)
            if start <= t < start + self.burst.length_s:
                rate *= self.burst.factor
        return rate


@dataclass
class LoadSummary:
    sent: int = 0
    unique: int = 0
    duplicates: int = 0
    late: int = 0
    hot: int = 0
    elapsed_s: float = 0.0
    target: float = 0.0  # events the schedule asked for
    max_behind_s: float = 0.0  # worst lag of the generator behind its own schedule
    # (wall time, unique events sent by then), a point per tick: for freshness
    progress: list[tuple[float, int]] = field(default_factory=list, repr=False)

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s else 0.0

    def render(self) -> str:
        return (f"sent {self.sent:,} events in {self.elapsed_s:.1f} s ({self.rate:,.0f}/s; "
                f"schedule {self.target:,.0f}, at worst {self.max_behind_s:.1f} s behind): "
                f"{self.unique:,} unique, {self.duplicates:,} resent, {self.late:,} late, "
                f"{self.hot:,} from the hot device {HOT_DEVICE}")


def run_load(config: LoadConfig, stop: threading.Event | None = None,
             clock: Callable[[], float] = time.time) -> LoadSummary:
    """Produce the load `config` describes; returns once every record is acknowledged
    (raises if the broker refused any)."""
    ensure_topic(config.bootstrap, config.topic, config.partitions)
    client = producer(config.bootstrap)
    rng = random.Random(config.seed)
    recent: list[tuple[bytes, bytes]] = []
    failures: list[str] = []
    summary = LoadSummary()

    def delivered(error: Any, _message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    def send_one(now_s: float) -> None:
        if recent and rng.random() < config.duplicate_share:
            payload, key = recent[rng.randrange(len(recent))]
            summary.duplicates += 1
        else:
            now_ms = int(now_s * 1000)
            hot = rng.random() < config.hot_key_share
            device = HOT_DEVICE if hot else f"d{rng.randrange(100_000)}"
            event_ms = now_ms
            if rng.random() < config.late_share:
                event_ms -= int(rng.uniform(*LATE_S) * 1000)
                summary.late += 1
            payload, _ = live_event(summary.unique, event_ms, config.id_prefix,
                                    device_id=device)
            key = device.encode()
            summary.unique += 1
            summary.hot += hot
            recent.append((payload, key))
            if len(recent) > 2 * RESEND_WINDOW:
                del recent[:RESEND_WINDOW]
        while True:
            try:
                client.produce(config.topic, payload, key, on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: let librdkafka drain it
                client.poll(0.05)
        summary.sent += 1

    started = time.monotonic()
    target = 0.0
    last = 0.0
    next_log = 10.0
    while True:
        t = time.monotonic() - started
        if t >= config.duration_s or (stop is not None and stop.is_set()):
            break
        now_s = clock()
        if config.rate > 0:
            target += config.rate_at(t) * (t - last)
            last = t
            due = int(target) - summary.sent
            for _ in range(max(0, min(due, 50_000))):
                send_one(now_s)
            behind = (int(target) - summary.sent) / max(config.rate_at(t), 1e-9)
            summary.max_behind_s = max(summary.max_behind_s, behind)
        else:
            for _ in range(1000):
                send_one(now_s)
        client.poll(0)
        summary.progress.append((now_s, summary.unique))
        if t >= next_log:
            log.info("load: %s s, %s events sent (%s/s)", f"{t:.0f}", f"{summary.sent:,}",
                     f"{summary.sent / t:,.0f}")
            next_log += 10.0
        if config.rate > 0:
            pause = TICK_S - (time.monotonic() - started - t)
            if pause > 0:
                time.sleep(pause)
    left = client.flush(120)
    summary.elapsed_s = time.monotonic() - started
    summary.target = target if config.rate > 0 else float(summary.sent)
    summary.progress.append((clock(), summary.unique))
    if left or failures:
        raise RuntimeError(f"Kafka did not take {left + len(failures):,} of "
                           f"{summary.sent:,} records: {failures[:3]}")
    return summary


def main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="clickstream load",
        description="Live clickstream load on a Kafka topic (docs/streaming.md).")
    parser.add_argument("--kafka_bootstrap", required=True, help="HOST:PORT")
    parser.add_argument("--kafka_topic", required=True,
                        help="Created (time retention off) if missing.")
    parser.add_argument("--rate", type=float, required=True,
                        help="Mean events/s (0: as fast as possible, to measure the "
                             "generator's own ceiling).")
    parser.add_argument("--duration_s", type=float, required=True)
    parser.add_argument("--shape", choices=("constant", "diurnal"), default="constant")
    parser.add_argument("--burst", default="",
                        help="FACTORx:SECONDSs[@STARTs], e.g. 5x:120s (default start: a "
                             "third of the way in).")
    parser.add_argument("--hot_key_share", type=float, default=0.0,
                        help="Share of events from one bot device (one partition).")
    parser.add_argument("--late_share", type=float, default=0.0,
                        help="Share of events from devices syncing 1-6 h late.")
    parser.add_argument("--duplicate_share", type=float, default=0.0,
                        help="Share of sends that resend an earlier event.")
    parser.add_argument("--partitions", type=int, default=4,
                        help="Partitions of the topic if it is created here.")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--id_prefix", default="load",
                        help="Prefix of event_ids (runs with the same prefix resend "
                             "the same ids).")
    args = parser.parse_args(list(argv))
    for name in ("hot_key_share", "late_share", "duplicate_share"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name} must be between 0 and 1")
    try:
        burst = Burst.parse(args.burst) if args.burst else None
    except ValueError as exc:
        parser.error(str(exc))
    summary = run_load(LoadConfig(
        args.kafka_bootstrap, args.kafka_topic, args.rate, args.duration_s, args.shape,
        burst, args.hot_key_share, args.late_share, args.duplicate_share, args.seed,
        args.id_prefix, args.partitions))
    print(summary.render())
    return 0
