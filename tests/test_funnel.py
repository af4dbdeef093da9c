"""The funnel rule: steps 1..k in order of event time, equal times count as in order."""

from __future__ import annotations

from pipeline.oracle import TruthEvent, expected_metrics
from transforms.funnel import FunnelFn, steps_reached

STEPS = ("page_view", "add_to_cart", "checkout", "purchase")


def test_steps_in_order() -> None:
    assert steps_reached([(1, 0), (2, 1), (3, 2), (4, 3)], 4) == 4


def test_out_of_order_step_does_not_count() -> None:
    assert steps_reached([(5, 1), (6, 0)], 4) == 1  # cart before the page view
    assert steps_reached([(1, 0), (2, 2), (3, 1)], 4) == 2  # checkout before cart


def test_equal_times_count_as_in_order() -> None:
    assert steps_reached([(7, 1), (7, 0), (7, 2)], 4) == 3


def test_combine_fn_merges_partial_accumulators_like_one() -> None:
    fn = FunnelFn(4)
    hits = [("u1", 1, 0), ("u1", 2, 1), ("u2", 1, 1), ("u2", 3, 0), ("u1", 9, 2)]
    left = fn.create_accumulator()
    right = fn.create_accumulator()
    for hit in hits[:2]:
        left = fn.add_input(left, hit)
    for hit in hits[2:]:
        right = fn.add_input(right, hit)
    merged = fn.merge_accumulators([left, right])
    assert fn.extract_output(merged) == [2, 1, 1, 0]


def test_oracle_agrees_on_the_same_cases() -> None:
    def ev(identity: str, t: int, step: int) -> TruthEvent:
        return TruthEvent(f"{identity}-{t}-{step}", STEPS[step], t, identity, None, t)

    events = [ev("u1", 7, 1), ev("u1", 7, 0), ev("u1", 7, 2), ev("u2", 5, 1), ev("u2", 6, 0)]
    metrics = expected_metrics(events, STEPS)
    funnel = sorted((k[1], v) for k, v in metrics.items() if k[0] == "funnel_step")
    assert funnel == [('{"name":"add_to_cart","step":"2"}', 1),
                      ('{"name":"checkout","step":"3"}', 1),
                      ('{"name":"page_view","step":"1"}', 2),
                      ('{"name":"purchase","step":"4"}', 0)]
