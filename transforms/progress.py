"""Progress lines from inside the workers, for long bounded runs.

The batch DirectRunner runs the whole job inside `Pipeline.run()`, so a driver-side
monitor sees nothing until the end; a pass-through step that logs every N elements
per worker shows progress on every runner (on Dataflow, in the worker logs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import apache_beam as beam

log = logging.getLogger("clickstream")


class LogProgressFn(beam.DoFn):
    def __init__(self, what: str, every: int) -> None:
        self._what = what
        self._every = every

    def setup(self) -> None:
        self._count = 0
        self._started = time.monotonic()

    def process(self, element: Any) -> Iterable[Any]:
        self._count += 1
        if self._count % self._every == 0:
            elapsed = time.monotonic() - self._started
            log.info("progress: %s %s in %.0f s (%s/s) on this worker", f"{self._count:,}",
                     self._what, elapsed, f"{self._count / elapsed:,.0f}")
        yield element


class LogProgress(beam.PTransform):
    def __init__(self, what: str = "records", every: int = 100_000) -> None:
        super().__init__()
        self._what = what
        self._every = every

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        return pcoll | beam.ParDo(LogProgressFn(self._what, self._every))
