"""The streaming benchmark's pure parts: lag, catch-up and rate from send times and
sampled sink counts (benchmarks/streaming.py). No timing is asserted here: the
benchmark itself lives in benchmarks/, outside pass/fail tests."""

from __future__ import annotations

import json

from benchmarks.streaming import (
    catch_up_s,
    expected_windows,
    freshness_lags,
    live_event,
    percentile,
    sink_rate,
)

SENDS = [10.0, 11.0, 12.0, 13.0]  # one unique event a second


def test_lag_is_now_minus_the_send_time_of_the_last_event_shown() -> None:
    samples = [(9.0, 0),    # before the first send: no lag to speak of, skipped
               (10.5, 0),   # one sent, none shown: as old as the first send
               (12.5, 1),   # three sent, the first shown
               (13.5, 3),   # four sent, three shown
               (14.0, 4)]   # everything shown: fresh
    assert freshness_lags(SENDS, samples) == [0.5, 2.5, 1.5, 0.0]


def test_a_sink_that_shows_everything_sent_so_far_has_no_lag() -> None:
    assert freshness_lags(SENDS, [(11.2, 2), (30.0, 4)]) == [0.0, 0.0]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 95) == 3.0
    assert percentile([], 50) is None


def test_catch_up_counts_from_the_last_publish_to_the_first_complete_sample() -> None:
    samples = [(13.0, 2), (15.0, 3), (16.5, 4), (17.0, 4)]
    assert catch_up_s(samples, total=4, last_send_s=13.0) == 3.5
    assert catch_up_s(samples[:2], total=4, last_send_s=13.0) is None


def test_sink_rate_is_the_slope_inside_the_interval() -> None:
    samples = [(0.0, 0), (10.0, 100), (20.0, 300), (30.0, 400)]
    assert sink_rate(samples, 10.0, 30.0) == 15.0
    assert sink_rate(samples, 25.0, 30.0) is None  # one sample: no slope


def test_sink_rate_of_a_stepping_count_is_its_average_pace() -> None:
    # A pane every 5 s brings 50 events: 10 events/s, sampled every second. The end
    # samples alone would say 45/29 or 50/29 per second depending on the phase.
    samples = [(float(t), (t // 5) * 50) for t in range(0, 60)]
    assert abs(sink_rate(samples, 0.0, 59.0) - 10.0) < 0.3


def test_expected_windows_count_each_unique_event_in_its_hour_and_day() -> None:
    hour, day = 3_600_000, 86_400_000
    want = expected_windows([day + 5, day + hour + 1, day + hour + 2])
    assert want == {("hour", day): 1, ("hour", day + hour): 2, ("day", day): 3}


def test_live_events_are_valid_and_carry_their_event_time() -> None:
    import schemas
    from transforms.parse import EventRules, decode

    rules = EventRules.from_schema(schemas.event_schema())
    now_ms = 1_790_000_000_000
    for n in range(14):  # every event type the stream uses
        payload, attributes = live_event(n, now_ms)
        event = decode(payload, rules, now_ms)
        assert event.event_id == json.loads(payload)["event_id"] == f"bench-{n}"
        assert event.event_time_ms == int(attributes["event_time"]) == now_ms
