"""A small hand-written changelog that every sink test writes: revisions listed out of
order, a replayed revision, two windows, a day window and a metric without dims."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

T0 = datetime(2026, 11, 28, 6, tzinfo=UTC)
CLICK = '{"event_type":"click"}'
VIEW = '{"event_type":"view"}'


def row(dims: str, start: datetime, value: int, sign: int, revision: int,
        timing: str = "EARLY", is_final: bool = False, granularity: str = "hour",
        metric: str = "events") -> dict[str, Any]:
    length = timedelta(hours=1) if granularity == "hour" else timedelta(days=1)
    return {
        "metric": metric, "dims": dims, "granularity": granularity,
        "window_start": start, "window_end": start + length, "value": value,
        "sign": sign, "revision": revision, "pane_index": revision - 1,
        "timing": timing, "is_final": is_final,
        "emitted_at": T0 + timedelta(minutes=revision),
    }


CHANGELOG = [
    # window 06:00 click: 5 -> 8 -> 11 (final); revision 3 listed first on purpose
    row(CLICK, T0, 8, -1, 3, "LATE", True),
    row(CLICK, T0, 11, +1, 3, "LATE", True),
    row(CLICK, T0, 5, +1, 1),
    row(CLICK, T0, 5, -1, 2, "ON_TIME"),
    row(CLICK, T0, 8, +1, 2, "ON_TIME"),
    row(CLICK, T0, 8, +1, 2, "ON_TIME"),  # a replayed revision
    # window 07:00 click, one early pane
    row(CLICK, T0 + timedelta(hours=1), 3, +1, 1),
    # window 06:00 view
    row(VIEW, T0, 7, +1, 1),
    row(VIEW, T0, 7, -1, 2),
    row(VIEW, T0, 9, +1, 2, "ON_TIME"),
    # the day window, and a metric with no dims
    row(CLICK, T0.replace(hour=0), 14, +1, 1, granularity="day"),
    row("{}", T0, 2, +1, 1, metric="active_users"),
]
