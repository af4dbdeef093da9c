"""Progress lines from inside the workers, for long bounded runs.

The batch DirectRunner runs the whole job inside `Pipeline.run()`, so a driver-side
monitor sees nothing until the end; a worker that logs every N elements shows progress
on every runner (on Dataflow, in the worker logs). Sources count as they read
(`ProgressMeter`), which costs no extra step per element; `LogProgress` is the
pass-through step for any other collection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import apache_beam as beam

log = logging.getLogger("clickstream")

DEFAULT_EVERY = 100_000


class ProgressMeter:
    """Counts elements on one worker and logs a line every `every` of them."""

    def __init__(self, what: str, every: int = DEFAULT_EVERY) -> None:
        self._what = what
        self._every = every
        self._count = 0
        self._started = time.monotonic()

    def add(self, n: int = 1) -> None:
        before = self._count
        self._count += n
        if before // self._every != self._count // self._every:
            elapsed = max(time.monotonic() - self._started, 1e-9)
            log.info("progress: %s %s in %.0f s (%s/s) on this worker", f"{self._count:,}",
                     self._what, elapsed, f"{self._count / elapsed:,.0f}")


class LogProgressFn(beam.DoFn):
    def __init__(self, what: str, every: int) -> None:
        self._what = what
        self._every = every

    def setup(self) -> None:
        self._meter = ProgressMeter(self._what, self._every)

    def process(self, element: Any) -> Iterable[Any]:
        self._meter.add()
        yield element


class LogProgress(beam.PTransform):
    def __init__(self, what: str = "records", every: int = DEFAULT_EVERY) -> None:
        super().__init__()
        self._what = what
        self._every = every

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        return pcoll | beam.ParDo(LogProgressFn(self._what, self._every))
