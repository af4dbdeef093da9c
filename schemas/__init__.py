"""The project's contracts: the input event schema and the output rows.

Everything that crosses a module boundary is defined here, so that sources, transforms
and sinks agree without importing each other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from importlib import resources
from typing import Any, NotRequired, TypedDict

GRANULARITIES = ("hour", "day")
# The output contract's fixed UTC windows, per granularity.
GRANULARITY_SECONDS = {"hour": 3600, "day": 86400}
GRANULARITY_MS = {g: s * 1000 for g, s in GRANULARITY_SECONDS.items()}
# The Beam metrics namespace of every counter the job reports (read by the CLI, the
# job's summary and the benchmarks).
METRICS_NAMESPACE = "clickstream"
TIMINGS = ("EARLY", "ON_TIME", "LATE", "BATCH")
# BATCH: a revision written by the daily finalize job (recomputed from the raw archive),
# not by a streaming pane.
BATCH_TIMING = "BATCH"

CHANGELOG_COLUMNS = (
    "metric", "dims", "granularity", "window_start", "window_end", "value", "sign",
    "revision", "pane_index", "timing", "is_final", "emitted_at",
)
LATEST_COLUMNS = (
    "metric", "dims", "granularity", "window_start", "window_end", "value", "revision",
    "timing", "is_final", "emitted_at",
)
# Optional on a changelog row: the serialized HLL sketch of a distinct count's window
# (--distinct hll), stored beside the value so ranges can be counted by a union.
SKETCH_COLUMN = "sketch"
DEAD_LETTER_COLUMNS = ("dead_letter_id", "payload", "reason", "detail", "ingest_time")


class ChangelogRow(TypedDict):
    """One row of `metric_changelog`; timestamps are timezone-aware UTC datetimes."""

    metric: str
    dims: str
    granularity: str
    window_start: datetime
    window_end: datetime
    value: int
    sign: int
    revision: int
    pane_index: int
    timing: str
    is_final: bool
    emitted_at: datetime
    sketch: NotRequired[bytes | None]


class DeadLetterRow(TypedDict):
    """One row of `dead_letter`: the raw payload byte for byte and why it was refused."""

    dead_letter_id: str
    payload: bytes
    reason: str
    detail: str
    ingest_time: datetime


def canonical_dims(dims: Mapping[str, Any]) -> str:
    """Dims as canonical JSON: sorted keys, string values, no spaces; `{}` for none."""
    return json.dumps({k: str(v) for k, v in dims.items()}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False)


def dims_text(dims: str | Mapping[str, Any]) -> str:
    """Dims given as canonical JSON already, or as a mapping to canonicalise."""
    return dims if isinstance(dims, str) else canonical_dims(dims)


def changelog_key(row: Mapping[str, Any]) -> tuple:
    """The identity of a changelog row: retried writes of the same key are one row."""
    return (row["metric"], row["dims"], row["granularity"], row["window_start"],
            row["revision"], row["sign"])


def read_text(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def event_schema() -> dict:
    """The Avro schema of a valid event (schemas/event.avsc), parsed."""
    return json.loads(read_text("event.avsc"))
