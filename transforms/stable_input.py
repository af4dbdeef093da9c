"""Make a PCollection stable before a sink writes it: Beam's ``@RequiresStableInput``.

A streaming runner that restarts from a checkpoint recomputes what came after it, and
what it recomputes may differ from what the failed attempt had already written: panes
fired by the processing-time clock, or by a watermark that is the minimum over
partitions read at other speeds, hold other elements the second time. The sinks' keyed
writes make a repeated row a no-op, so a revision written by the failed attempt keeps
its first contents while the restarted attempt's revisions build on the second: the
changelog no longer sums to the latest value, and a window's last revision can be the
failed attempt's partial one (docs/flink.md, finding 10).

A ParDo that requires stable input sees only elements the runner has made durable: on
Flink, the operator buffers its input in checkpointed state and processes it only when
the checkpoint holding it completes, so after a restart it replays exactly those
elements. Java marks the DoFn with ``@RequiresStableInput``; the Python SDK has no
annotation for it, so :class:`RequireStableInput` sets the ParDo payload's
``requires_stable_input`` flag (and the pipeline requirement) itself. Flink refuses such a
job unless it checkpoints exactly-once; the cost is latency: sink writes wait for the
next completed checkpoint.
"""

from __future__ import annotations

from typing import Any, TypeVar

import apache_beam as beam
from apache_beam.portability import common_urns

T = TypeVar("T")


class _PassThroughFn(beam.DoFn):
    def process(self, element: T) -> Any:
        yield element


class _StableInputParDo(beam.ParDo):
    """A ParDo whose payload says it requires stable input."""

    def to_runner_api_parameter(  # type: ignore[override]  # as beam.ParDo declares it
            self, context: Any, **extra_kwargs: Any) -> Any:
        urn, payload = super().to_runner_api_parameter(context, **extra_kwargs)
        payload.requires_stable_input = True
        context.add_requirement(common_urns.requirements.REQUIRES_STABLE_INPUT.urn)
        return urn, payload


class RequireStableInput(beam.PTransform):
    """Elements pass through unchanged, once the runner has made them stable; the steps
    fused after it (a sink's writer) see only those.

    The Reshuffle (a rebalance on Flink, no grouping) starts a new stage: without it the
    pass-through fuses into the keyed, stateful stage before it (the changelog's), whose
    stable-input buffer Flink flushes holding the keyed state lock, while the flushed
    bundle's own state reads wait for that lock (a deadlock, docs/flink.md, finding 10)."""

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        return (pcoll
                | "NewStage" >> beam.Reshuffle()
                | "PassThrough" >> _StableInputParDo(_PassThroughFn()).with_output_types(
                    pcoll.element_type))
