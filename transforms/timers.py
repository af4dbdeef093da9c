"""Event-time timers that do not hold the watermark.

Beam's Python SDK gives every event-time timer a watermark hold at its firing time (the
"output timestamp" of Java's timers), and has no way to ask for none: Java has
``Timer.withNoOutputTimestamp()``, Python nothing yet (apache/beam#20705,
apache/beam#21554). Runners that honour the hold (Flink, Dataflow, Prism) then keep the
stage's output watermark at its earliest pending timer. A timer that only forgets state
(dedup's id expiry, a day or more past the events it guards) would hold every stage
downstream that far behind: no window there would see its end until the state expires.

A timer whose callback emits nothing needs no hold, so these are set with the hold at
the end of time, which never is the minimum. docs/flink.md, finding 5.
"""

from __future__ import annotations

from typing import Any

from apache_beam.runners.worker.bundle_processor import OutputTimer
from apache_beam.transforms.userstate import Timer
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp


def set_without_hold(timer: Any, fire_at: Timestamp) -> None:
    """``timer.set(fire_at)``, without holding the output watermark at ``fire_at``.

    Only for timers whose callback outputs nothing. On the portable SDK harness the
    timer is written with the hold at the end of time; the Python DirectRunner has no
    holds, so there it is an ordinary ``set``.
    """
    if not isinstance(timer, OutputTimer):
        timer.set(fire_at)
        return
    # OutputTimer.set with the hold changed: the harness exposes no parameter for it.
    encoded = Timer(
        user_key=timer._key, dynamic_timer_tag="", windows=(timer._window,),
        clear_bit=False, fire_timestamp=Timestamp.of(fire_at),
        hold_timestamp=MAX_TIMESTAMP, paneinfo=timer._paneinfo)
    timer._timer_coder_impl.encode_to_stream(encoded, timer._output_stream, True)
    timer._output_stream.maybe_flush()
