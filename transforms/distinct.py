"""Distinct counting: exact sets, or Apache DataSketches HLL sketches.

Exact sets are right for tests and batch recompute; HLL keeps a day window's state at a
few KiB however many identities it sees, at a relative standard error of about
1.04 / sqrt(2^lg_k) (lg_k=12: ~1.6%, ~3.2% at two standard deviations).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import apache_beam as beam
import datasketches

DEFAULT_LG_K = 12
# Sketches are stored in HLL_8 (one byte a register): the type the pipeline builds, so a
# stored sketch deserializes without conversion; unions read any type.
SKETCH_TYPE = datasketches.tgt_hll_type.HLL_8


class SketchedCount(NamedTuple):
    """A window's distinct count and the serialized sketch it was estimated from, which
    the sinks store so any range of windows can be counted by a union at query time."""

    value: int
    sketch: bytes


def hll_relative_error(lg_k: int, std_devs: int = 2) -> float:
    """Upper bound of the sketch's relative error at `std_devs` standard deviations."""
    return abs(datasketches.hll_sketch.get_rel_err(True, True, lg_k, std_devs))


class _Sketch:
    """An HLL sketch that pickles (the binding's objects do not)."""

    __slots__ = ("sketch",)

    def __init__(self, sketch: datasketches.hll_sketch) -> None:
        self.sketch = sketch

    def __reduce__(self):
        return _Sketch._restore, (self.sketch.serialize_compact(),)

    @staticmethod
    def _restore(data: bytes) -> _Sketch:
        return _Sketch(datasketches.hll_sketch.deserialize(data))


class ExactDistinctFn(beam.CombineFn):
    """Number of distinct strings, exactly."""

    def create_accumulator(self) -> set[str]:
        return set()

    def add_input(self, acc: set[str], value: str) -> set[str]:
        acc.add(value)
        return acc

    def add_inputs(self, acc: set[str], values: Iterable[str]) -> set[str]:
        acc.update(values)
        return acc

    def merge_accumulators(self, accs: Iterable[set[str]]) -> set[str]:
        accs = iter(accs)
        merged = next(accs, set())
        for acc in accs:
            merged |= acc
        return merged

    def extract_output(self, acc: set[str]) -> int:
        return len(acc)


class HllDistinctFn(beam.CombineFn):
    """Approximate number of distinct strings with a mergeable HLL sketch."""

    def __init__(self, lg_k: int = DEFAULT_LG_K) -> None:
        self._lg_k = lg_k

    def create_accumulator(self) -> _Sketch:
        return _Sketch(datasketches.hll_sketch(self._lg_k, SKETCH_TYPE))

    def add_input(self, acc: _Sketch, value: str) -> _Sketch:
        acc.sketch.update(value)
        return acc

    def merge_accumulators(self, accs: Iterable[_Sketch]) -> _Sketch:
        union = datasketches.hll_union(self._lg_k)
        for acc in accs:
            union.update(acc.sketch)
        return _Sketch(union.get_result(SKETCH_TYPE))

    def extract_output(self, acc: _Sketch) -> SketchedCount:
        return SketchedCount(round(acc.sketch.get_estimate()),
                             acc.sketch.serialize_compact())


def hll_relative_standard_error(lg_k: int) -> float:
    """One standard deviation of the estimate's relative error, for an answer to state."""
    return hll_relative_error(lg_k, std_devs=1)


class UnionEstimate(NamedTuple):
    estimate: int
    lg_k: int  # the union's: the smallest lg_k among the sketches it merged
    relative_standard_error: float
    lower_bound_2sd: int
    upper_bound_2sd: int


def union_estimate(sketches: Sequence[bytes]) -> UnionEstimate:
    """Distinct identities over several windows: the union of their stored sketches.

    A union has the precision of its coarsest input, so the union is built at the
    largest lg_k among the sketches and the error reported is the result's."""
    parsed = [datasketches.hll_sketch.deserialize(data) for data in sketches]
    union = datasketches.hll_union(max((s.lg_config_k for s in parsed), default=DEFAULT_LG_K))
    for sketch in parsed:
        union.update(sketch)
    result = union.get_result(SKETCH_TYPE)
    result_lg_k = result.lg_config_k
    return UnionEstimate(
        round(result.get_estimate()), result_lg_k,
        hll_relative_standard_error(result_lg_k),
        round(result.get_lower_bound(2)), round(result.get_upper_bound(2)))


def distinct_count_fn(mode: str, lg_k: int = DEFAULT_LG_K) -> beam.CombineFn:
    if mode == "exact":
        return ExactDistinctFn()
    if mode == "hll":
        return HllDistinctFn(lg_k)
    raise ValueError(f"--distinct must be exact or hll, not {mode!r}")
