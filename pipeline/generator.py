"""Synthetic clickstream with a known answer.

One simulated day of traffic: diurnal load, Zipf-skewed users, anonymous devices,
sessions that walk the purchase funnel, feature use, at-least-once duplicates,
malformed records of every kind, and devices that sync hours or days late (some past
the allowed lateness). Lines are written in arrival order. Beside them:
`truth.jsonl` (every valid unique event), `arrival_ms.txt` (arrival time per line) and
`expected.json` (the exact metrics and the record counts), which the tests use as the
oracle.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone

from pipeline import oracle
from schemas import GRANULARITY_MS
from transforms.metrics import DEFAULT_FUNNEL

DAY_MS = GRANULARITY_MS["day"]
HOUR_MS = GRANULARITY_MS["hour"]
FEATURES = ("search", "share", "wishlist", "dark_mode", "voice", "compare")
PLATFORMS = ("ios", "android", "web")
PAGES = ("/", "/home", "/search", "/product", "/cart", "/account", "/deals", "/help")
BROWSE_TYPES = ("page_view", "scroll", "tap", "page_view", "tap")
FUNNEL_CONTINUE = (0.35, 0.6, 0.7)  # chance of going on to the next step


@dataclass
class GeneratorConfig:
    events: int = 100_000
    seed: int = 1
    date: str = "2026-11-01"
    shards: int = 4
    duplicate_rate: float = 0.03
    malformed_rate: float = 0.005
    late_hours_rate: float = 0.03
    late_days_rate: float = 0.01
    too_late_rate: float = 0.002  # arrives after the 3-day allowed lateness
    allowed_lateness_s: int = 3 * 86400
    # Of the duplicates, the share a client re-stamps (a retry that stamps its own time,
    # up to RESTAMP_MAX_MS later): same event_id, other bytes and event time, maybe
    # another hour or day. The first copy, by arrival, is the event (oracle.first_copies).
    restamp_rate: float = 0.0
    # Seed of the user population alone: days generated with the same population_seed
    # (and different seeds) share their users, Zipf ranks included, as a product's
    # days do. None: the population comes from `seed`.
    population_seed: int | None = None
    # Users in the population; None: events / 25. A population larger than a day's
    # reach gives the DAU/MAU ratio of a real product (heavy users daily, a long tail).
    users: int | None = None


RESTAMP_MAX_MS = 10 * 60_000


# (reason code the pipeline must give, builder of the bad payload)
def _malformed_payloads(rng: random.Random, good: dict) -> list[tuple[str, bytes]]:
    def dump(record: object) -> bytes:
        return json.dumps(record, separators=(",", ":")).encode()

    def without(field: str) -> dict:
        return {k: v for k, v in good.items() if k != field}

    body = dump(good)
    return [
        ("malformed_json", body[: rng.randint(1, len(body) - 1)]),
        ("not_an_object", dump([good])),
        ("missing_field.event_id", dump(without("event_id"))),
        ("missing_field.device_id", dump(without("device_id"))),
        ("missing_field.event_time", dump(without("event_time"))),
        ("wrong_type.event_id", dump(dict(good, event_id=rng.randint(1, 10**9)))),
        ("wrong_type.user_id", dump(dict(good, user_id=12345))),
        ("invalid_value.event_id", dump(dict(good, event_id=""))),
        ("invalid_value.event_id", dump(dict(good, event_id="x" * 129))),
        ("invalid_value.event_type", dump(dict(good, event_type="Page View"))),
        ("event_time_no_zone", dump(dict(good, event_time="2026-11-01T10:00:00"))),
        ("event_time_unparseable", dump(dict(good, event_time="yesterday"))),
        ("event_time_too_old", dump(dict(good, event_time="1970-01-01T00:00:01Z"))),
        ("event_time_in_future", dump(dict(good, event_time="2999-01-01T00:00:00Z"))),
        ("wrong_type.properties", dump(dict(good, properties={"n": 3}))),
        ("invalid_utf8", body[:-2] + b'\xff\xfe"}'),
        ("payload_too_large", dump(dict(good, properties={"blob": "a" * 70_000}))),
    ]


@dataclass
class _Line:
    arrival_ms: int
    payload: bytes


class ClickstreamGenerator:
    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        day = datetime.fromisoformat(config.date).replace(tzinfo=UTC)
        self.day_start_ms = int(day.timestamp() * 1000)
        n_users = config.users or max(10, config.events // 25)
        population = self.rng if config.population_seed is None else random.Random(
            config.population_seed)
        self.users = [f"u{population.getrandbits(40):010x}" for _ in range(n_users)]
        # Zipf(1.1): a few heavy users, a long tail.
        weights = [1.0 / (rank + 1) ** 1.1 for rank in range(n_users)]
        total = sum(weights)
        self.cum_weights = list(_accumulate(w / total for w in weights))
        self.devices = {u: [f"d{population.getrandbits(48):012x}"
                            for _ in range(population.choice((1, 1, 2)))] for u in self.users}

    def _event_id(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def _diurnal_time(self) -> int:
        # Rejection-sample a day with a 5x peak-to-trough ratio, peak at 20:00 UTC.
        while True:
            t = self.rng.random()
            density = 1 + 0.66 * math.cos(2 * math.pi * (t - 20 / 24))
            if self.rng.random() * 1.66 <= density:
                return self.day_start_ms + int(t * DAY_MS)

    def _format_time(self, ms: int) -> object:
        choice = self.rng.random()
        if choice < 0.3:
            return ms
        dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
        if choice < 0.8:
            return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        offset = timedelta(hours=self.rng.choice((-8, -5, 1, 2, 5.5, 9)))
        return dt.astimezone(timezone(offset)).isoformat(timespec="milliseconds")

    def _sessions(self) -> Iterator[list[tuple[str, int, dict]]]:
        """Yields sessions: lists of (event_type, event_time_ms, extra fields)."""
        rng = self.rng
        while True:
            user = self.users[_bisect(self.cum_weights, rng.random())]
            device = rng.choice(self.devices[user])
            anonymous = rng.random() < 0.25
            user_field: dict = {}
            if not anonymous:
                user_field["user_id"] = user
            else:
                style = rng.random()
                if style < 0.4:
                    user_field["user_id"] = None
                elif style < 0.6:
                    user_field["user_id"] = ""
            base = {"device_id": device, "session_id": f"s{rng.getrandbits(48):012x}",
                    "platform": rng.choice(PLATFORMS), **user_field}
            t = self._diurnal_time()
            session: list[tuple[str, int, dict]] = []
            for _ in range(rng.randint(2, 14)):
                session.append((rng.choice(BROWSE_TYPES), t, base))
                t += rng.randint(0, 90_000)
            if rng.random() < 0.2:
                session.append(("feature_use", t, dict(base, feature=rng.choice(FEATURES))))
                t += rng.randint(0, 30_000)
            step = 0
            while step < len(DEFAULT_FUNNEL) and (step == 0 or rng.random() <
                                                  FUNNEL_CONTINUE[step - 1]):
                if step > 0 or rng.random() < 0.5:
                    # Same-millisecond steps happen (batched client logging).
                    session.append((DEFAULT_FUNNEL[step], t, base))
                    t += rng.choice((0, rng.randint(1, 120_000)))
                step += 1
            yield session

    def _restamped(self, record: dict, event_time: int) -> bytes:
        """The record as a retrying client resends it: stamped up to RESTAMP_MAX_MS
        later. Never earlier: a bounded run keeps the earliest-stamped copy (it has no
        arrival order), which is then also the first to arrive."""
        later = event_time + self.rng.randint(1, RESTAMP_MAX_MS)
        return json.dumps(dict(record, event_time=self._format_time(later)),
                          separators=(",", ":")).encode()

    def _arrival_delay_ms(self) -> int:
        c, r = self.config, self.rng.random()
        if r < c.too_late_rate:
            # A full day clear of the lateness horizon, so that whether an event is
            # too late never depends on how far a runner's watermark lags.
            return c.allowed_lateness_s * 1000 + 2 * DAY_MS + self.rng.randint(0, DAY_MS)
        if r < c.too_late_rate + c.late_days_rate:
            return self.rng.randint(DAY_MS, 2 * DAY_MS)
        if r < c.too_late_rate + c.late_days_rate + c.late_hours_rate:
            return self.rng.randint(HOUR_MS, 12 * HOUR_MS)
        return self.rng.randint(200, 20_000)

    def generate(self) -> tuple[list[_Line], list[oracle.TruthEvent], Counter]:
        c, rng = self.config, self.rng
        lines: list[_Line] = []
        truth: list[oracle.TruthEvent] = []
        reasons: Counter = Counter()
        sessions = self._sessions()
        while len(lines) < c.events:
            session = next(sessions)
            delay = self._arrival_delay_ms()
            # Hours late: the session arrives after its time. Days late: a device that
            # was offline syncs, during the simulated day, a session from days before.
            offline = delay > DAY_MS
            for event_type, t, fields in session:
                event_time = t - delay if offline else t
                arrival = (t if offline else t + delay) + rng.randint(0, 500)
                record = {"event_id": self._event_id(), "event_type": event_type,
                          "event_time": self._format_time(event_time)}
                record.update({k: v for k, v in fields.items() if k != "feature"})
                properties = {"page": rng.choice(PAGES), "app_version": "5.12.1"}
                if "feature" in fields:
                    properties["feature"] = fields["feature"]
                record["properties"] = properties
                payload = json.dumps(record, separators=(",", ":")).encode()
                if rng.random() < c.malformed_rate:
                    reason, bad = rng.choice(_malformed_payloads(rng, record))
                    reasons[reason] += 1
                    lines.append(_Line(arrival, bad))
                    continue
                lines.append(_Line(arrival, payload))
                user = fields.get("user_id")
                truth.append(oracle.TruthEvent(
                    str(record["event_id"]), event_type, event_time,
                    user if user else "device:" + fields["device_id"],
                    fields.get("feature"), arrival))
                if rng.random() < c.duplicate_rate:
                    for _ in range(rng.choice((1, 1, 2))):
                        redelivery = rng.choice((0, rng.randint(1, HOUR_MS)))
                        copy = payload
                        if c.restamp_rate and rng.random() < c.restamp_rate:
                            redelivery += 1  # a retry comes after the original
                            copy = self._restamped(record, event_time)
                        lines.append(_Line(arrival + redelivery, copy))
        lines.sort(key=lambda line: line.arrival_ms)
        return lines, truth, reasons


def _accumulate(values) -> Iterator[float]:
    total = 0.0
    for v in values:
        total += v
        yield total


def _bisect(cum: list[float], x: float) -> int:
    lo, hi = 0, len(cum) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cum[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


# Event types of the default funnel plus a feature use, so every metric has work.
LIVE_EVENT_TYPES = ("page_view", "page_view", "page_view", "add_to_cart", "checkout",
                    "purchase", "feature_use")


def live_event(n: int, now_ms: int, id_prefix: str = "live",
               event_types: Sequence[str] = LIVE_EVENT_TYPES,
               timestamp_attribute: str = "event_time",
               device_id: str = "") -> tuple[bytes, dict[str, str]]:
    """The n-th valid event of a live stream, happening at ``now_ms``, as a Pub/Sub
    publisher sends it: (payload, attributes with the event time in epoch ms).
    ``device_id``: the sending device (empty: one of 997 by n)."""
    event_type = event_types[n % len(event_types)]
    event = {"event_id": f"{id_prefix}-{n}", "event_type": event_type,
             "event_time": now_ms, "device_id": device_id or f"d{n % 997}",
             "user_id": f"u{n % 997}",
             "session_id": f"s{n % 997}", "platform": "web",
             "properties": ({"feature": f"f{n % 5}"} if event_type == "feature_use"
                            else {"page": "/home"})}
    return json.dumps(event).encode(), {timestamp_attribute: str(now_ms)}


def write_dataset(out_dir: str, config: GeneratorConfig) -> dict:
    """Writes the shards, truth, arrivals and expected metrics; returns the summary."""
    lines, truth, reasons = ClickstreamGenerator(config).generate()
    return _write(out_dir, lines, truth, reasons, config.shards, config.__dict__)


def day_configs(config: GeneratorConfig, days: int) -> list[GeneratorConfig]:
    """`days` consecutive days from `config.date`: each its own traffic (seed + i), all
    one user population (`population_seed`, default `config.seed`)."""
    first = datetime.fromisoformat(config.date).date()
    population = config.seed if config.population_seed is None else config.population_seed
    return [replace(config, date=(first + timedelta(days=i)).isoformat(),
                    seed=config.seed + i, population_seed=population)
            for i in range(days)]


def write_days(out_dir: str, config: GeneratorConfig, days: int) -> dict:
    """A multi-day dataset: the days of `day_configs`, merged in arrival order."""
    sources = []
    for day in day_configs(config, days):
        sources.append(os.path.join(out_dir, "days", day.date))
        write_dataset(sources[-1], day)
    return merge_datasets(out_dir, sources, config.shards)


def merge_datasets(out_dir: str, sources: Sequence[str], shards: int = 4) -> dict:
    """One dataset, in arrival order, out of several written by write_dataset.

    One generated day only sends too-late events for days before it; merging day D
    with a day about a week later gives D both its own traffic and, days past its
    lateness horizon, events of D from devices that were offline: the case the daily
    finalize job corrects.
    """
    lines: list[_Line] = []
    truth: list[oracle.TruthEvent] = []
    reasons: Counter = Counter()
    for source in sources:
        with open(os.path.join(source, "arrival_ms.txt")) as f:
            arrivals = [int(x) for x in f]
        payloads: list[bytes] = []
        for path in sorted(glob.glob(os.path.join(source, "events-*.jsonl"))):
            with open(path, "rb") as f:
                payloads.extend(line.rstrip(b"\n") for line in f)
        lines.extend(_Line(a, p) for a, p in zip(arrivals, payloads, strict=True))
        truth.extend(read_truth(source))
        with open(os.path.join(source, "expected.json")) as f:
            reasons.update(json.load(f)["counts"]["dead_letter_by_reason"])
    lines.sort(key=lambda line: line.arrival_ms)
    return _write(out_dir, lines, truth, reasons, shards, {"merged": list(sources)})


def _write(out_dir: str, lines: list[_Line], truth: list[oracle.TruthEvent],
           reasons: Counter, shards: int, config: dict) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    per_shard = math.ceil(len(lines) / shards)
    for shard in range(shards):
        path = os.path.join(out_dir, f"events-{shard:05d}-of-{shards:05d}.jsonl")
        with open(path, "wb") as f:
            for line in lines[shard * per_shard:(shard + 1) * per_shard]:
                f.write(line.payload + b"\n")
    with open(os.path.join(out_dir, "arrival_ms.txt"), "w") as f:
        f.writelines(f"{line.arrival_ms}\n" for line in lines)
    with open(os.path.join(out_dir, "truth.jsonl"), "w") as f:
        f.writelines(event.to_json() + "\n" for event in truth)
    metrics = oracle.expected_metrics(truth, DEFAULT_FUNNEL)
    counts = {
        "read": len(lines),
        "unique": len(truth),
        "duplicates": len(lines) - len(truth) - sum(reasons.values()),
        "dead_letter": sum(reasons.values()),
        "dead_letter_by_reason": dict(sorted(reasons.items())),
    }
    expected = {"config": config, "counts": counts,
                "funnel_steps": list(DEFAULT_FUNNEL), "metrics": oracle.to_json(metrics)}
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    return counts


def read_truth(out_dir: str) -> list[oracle.TruthEvent]:
    with open(os.path.join(out_dir, "truth.jsonl")) as f:
        return [oracle.TruthEvent.from_json(line) for line in f]
