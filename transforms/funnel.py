"""How far each identity got through an ordered funnel within a window.

An identity reaches step k when its events contain steps 1..k in order of event time;
events at the same time count as in order. Sorting by (time, step) and matching
greedily finds the longest such prefix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import apache_beam as beam

FunnelHit = tuple[str, int, int]  # identity, event_time_ms, step index (0-based)


def steps_reached(hits: Iterable[tuple[int, int]], n_steps: int) -> int:
    """Longest funnel prefix matched in time order by one identity's (time, step) hits."""
    reached = 0
    for _, step in sorted(hits):
        if step == reached:
            reached += 1
            if reached == n_steps:
                break
    return reached


class FunnelFn(beam.CombineFn):
    """Per window: how many identities reached each step (a list, one count per step)."""

    def __init__(self, n_steps: int) -> None:
        self._n_steps = n_steps

    def create_accumulator(self) -> dict[str, list[tuple[int, int]]]:
        return {}

    def add_input(self, acc: dict[str, list[tuple[int, int]]], hit: FunnelHit
                  ) -> dict[str, list[tuple[int, int]]]:
        identity, time_ms, step = hit
        acc.setdefault(identity, []).append((time_ms, step))
        return acc

    def merge_accumulators(self, accs: Iterable[dict[str, list[tuple[int, int]]]]
                           ) -> dict[str, list[tuple[int, int]]]:
        accs = iter(accs)
        merged = next(accs, {})
        for acc in accs:
            for identity, hits in acc.items():
                merged.setdefault(identity, []).extend(hits)
        return merged

    def extract_output(self, acc: dict[str, list[tuple[int, int]]]) -> list[int]:
        counts = [0] * self._n_steps
        for hits in acc.values():
            for step in range(steps_reached(hits, self._n_steps)):
                counts[step] += 1
        return counts


def funnel_dims(steps: Sequence[str]) -> list[dict[str, str]]:
    """The dims of each funnel step: {step: "1", name: "page_view"}, ..."""
    return [{"step": str(i + 1), "name": name} for i, name in enumerate(steps)]
