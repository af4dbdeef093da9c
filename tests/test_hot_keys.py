"""Hot keys and the bot policy against a plain-Python oracle: one bot device with ~30% of
the traffic among hundreds of ordinary devices, with at-least-once duplicates."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from pipeline import oracle
from pipeline.compare import differences, latest_from_duckdb
from pipeline.job import run
from transforms.events import Event, EventBatch
from transforms.hot_keys import (
    SUSPECTED_AUTOMATION,
    DetectHotKeys,
    FrequentKeys,
    HotKeyConfig,
    top_keys,
)
from transforms.metrics import DEFAULT_FUNNEL
from transforms.sink_duckdb import read_rows

START_MS = 1_793_534_400_000  # 2026-11-01T10:00:00Z
MINUTE_MS = 60_000
BOT = "bot-device-1"
BOT_SHARE = 0.3
BOT_LIMIT = 120  # events per device per minute


def make_events(n: int, seed: int, minutes: int = 10) -> list[Event]:
    """Unique events over `minutes` minutes: ~30% from BOT (in bursts over the limit in
    some minutes only), the rest from 400 devices with Zipf-ish weights."""
    rng = random.Random(seed)
    devices = [f"dev-{i:03d}" for i in range(400)]
    weights = [1 / (rank + 1) for rank in range(len(devices))]
    events = []
    for i in range(n):
        minute = rng.randrange(minutes)
        # The bot is quiet in the first two minutes: those minutes stay under the limit.
        bot = minute >= 2 and rng.random() < BOT_SHARE * minutes / (minutes - 2)
        device = BOT if bot else rng.choices(devices, weights)[0]
        events.append(Event(f"e{i:07d}", rng.choice(("page_view", "tap", "scroll")),
                            START_MS + minute * MINUTE_MS + rng.randrange(MINUTE_MS),
                            device, None if bot else f"u-{device}", None, None, {}))
    return events


def to_line(event: Event) -> str:
    record = {k: v for k, v in event._asdict().items() if v is not None}
    record["event_time"] = record.pop("event_time_ms")
    return json.dumps(record)


# --- detection -------------------------------------------------------------------------

def test_top_keys_bound_the_true_counts_and_miss_no_hot_key() -> None:
    events = make_events(30_000, seed=3)
    counts = Counter(e.device_id for e in events)
    keys = FrequentKeys(lg_max_k=6)  # deliberately small: the sketch has to approximate
    for device, n in counts.items():
        keys.sketch.update(device, n)
    total, hot = top_keys(keys, min_share=0.02, top=50)
    assert total == len(events)
    reported = {k.key: k for k in hot}
    must = {d for d, n in counts.items() if n >= 0.02 * total}
    assert BOT in must and must <= set(reported)  # no false negatives
    for key in hot:
        assert key.lower <= counts[key.key] <= key.upper
    assert abs(reported[BOT].share - counts[BOT] / total) <= keys.sketch.epsilon


def test_detect_hot_keys_per_window_equals_the_oracle() -> None:
    events = make_events(12_000, seed=5)
    # The oracle: exact shares per minute window.
    per_window: dict[int, Counter] = defaultdict(Counter)
    for e in events:
        per_window[(e.event_time_ms - e.event_time_ms % MINUTE_MS) // 1000][e.device_id] += 1
    want = {}
    for start, counts in per_window.items():
        total = sum(counts.values())
        hot = {d for d, n in counts.items() if n >= 0.1 * total}
        want[start] = (total, hot if total >= 1100 else set())

    def check(reports) -> None:
        got = {r.window_start_s: r for r in reports}
        assert set(got) == {s for s, (_, hot) in want.items() if hot}
        for start, report in got.items():
            total, hot = want[start]
            assert report.total == total
            assert {k.key for k in report.keys} == hot, start
            for key in report.keys:  # lg_max_k 10 holds every device here: exact
                assert key.share == per_window[start][key.key] / total

    batches = [EventBatch(events[i:i + 500]) for i in range(0, len(events), 500)]
    with TestPipeline() as p:
        reports = (p | beam.Create(batches)
                   | DetectHotKeys(HotKeyConfig(window_s=60, min_share=0.1, min_events=1100)))
        assert_that(reports, check)


# --- the bot policy through the whole job ------------------------------------------------

@pytest.fixture(scope="module")
def bot_run(tmp_path_factory):
    events = make_events(8_000, seed=7)
    out = tmp_path_factory.mktemp("bots")
    lines = [to_line(e) for e in events]
    lines += [to_line(e) for e in random.Random(1).sample(events, 400)]  # redelivered
    random.Random(2).shuffle(lines)
    with open(out / "events-0.jsonl", "w") as f:
        f.write("\n".join(lines) + "\n")
    db = str(out / "out.duckdb")
    summary = run(["--input_files", str(out / "events-*.jsonl"), "--duckdb_path", db,
                   "--bot_max_events", str(BOT_LIMIT), "--bot_window_s", "60"],
                  progress_every_s=60)
    return events, summary, db


def suspected_oracle(events: list[Event]) -> set[str]:
    groups: dict[tuple[str, int], list[str]] = defaultdict(list)
    for e in events:
        groups[(e.device_id, e.event_time_ms // MINUTE_MS)].append(e.event_id)
    return {i for ids in groups.values() if len(ids) > BOT_LIMIT for i in ids}


def test_bot_policy_sets_apart_exactly_the_events_over_the_rate(bot_run) -> None:
    events, summary, db = bot_run
    want = suspected_oracle(events)
    assert 1000 < len(want) < 0.35 * len(events)  # the bot's busy minutes, nothing else
    rows = read_rows(db, "SELECT payload, reason, detail FROM dead_letter")
    got = {json.loads(payload)["event_id"] for payload, reason, _ in rows
           if reason == SUSPECTED_AUTOMATION}
    assert got == want
    assert all(f"limit {BOT_LIMIT}" in detail for _, reason, detail in rows
               if reason == SUSPECTED_AUTOMATION)
    assert summary.counters["suspected_bot"] == len(want)
    assert summary.reconciles
    assert summary.counters["unique"] == len(events)


def test_metrics_count_only_the_kept_events(bot_run) -> None:
    events, _, db = bot_run
    suspected = suspected_oracle(events)
    kept = [oracle.TruthEvent(e.event_id, e.event_type, e.event_time_ms, e.identity, None, 0)
            for e in events if e.event_id not in suspected]
    want = oracle.expected_metrics(kept, DEFAULT_FUNNEL)
    assert differences(latest_from_duckdb(db), want) == []
