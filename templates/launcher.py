"""Dataflow flex template entry point: build the clickstream job, submit it, return.

The template's image runs this file (FLEX_TEMPLATE_PYTHON_PY_FILE) with the template
parameters as ``--name=value`` arguments, plus the Beam options Dataflow adds itself
(runner, project, region, temp and staging locations, ``--setup_file`` when the image sets
FLEX_TEMPLATE_PYTHON_SETUP_FILE, ``--sdk_container_image`` when given). It builds the same
graph as ``clickstream run`` (``pipeline.job.build``) and calls ``run()`` only: Dataflow's
docs require the launcher program to exit after ``run``, because ``wait_until_finish``
blocks and keeps the flex template from starting the job.

It is a file run by path, not a module of the ``pipeline`` package: the script's own
directory goes first on ``sys.path``, and this directory holds no module that could shadow
a top-level import, whereas running ``pipeline/flex_main.py`` by path would put every
module of ``pipeline/`` (``options``, ``graph``, ``report``, ...) on the path as top-level
names.

What the graph cannot do yet (so the template is bounded, ``"streaming": false``):
- no Pub/Sub (or any unbounded) source: ``--input_files`` is the only input, so a
  streaming template has nothing to read; the launcher refuses ``--streaming``;
- the only sink is DuckDB, a file local to each worker VM: on Dataflow the tables end up
  on the workers' disks and are lost with them. BigQuery/Bigtable sinks are not wired
  into ``pipeline.job.build`` yet.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)
from apache_beam.runners.runner import PipelineResult

from pipeline.job import build
from pipeline.options import ClickstreamOptions

log = logging.getLogger("clickstream.flex")

STREAMING_NOT_SUPPORTED = (
    "this template builds the bounded job (--input_files); the graph reads Pub/Sub "
    "(`clickstream run --input_subscription`), but a streaming template (streaming "
    "metadata, sinks that outlive the workers) is not built yet")


def _worker_code(options: PipelineOptions) -> None:
    """Make sure Dataflow workers will have the ``clickstream-beam`` package.

    Either the launcher stages it (``--setup_file``, from FLEX_TEMPLATE_PYTHON_SETUP_FILE)
    or the workers run an image that has it installed (``--sdk_container_image``; the
    image's SDK_CONTAINER_IMAGE, the variable ``runners.dataflow`` reads too, is the
    default). Without either, every worker would fail on ``import pipeline``/``transforms``
    after minutes of VM start-up, so fail here instead.
    """
    worker = options.view_as(WorkerOptions)
    if not worker.sdk_container_image and os.environ.get("SDK_CONTAINER_IMAGE"):
        worker.sdk_container_image = os.environ["SDK_CONTAINER_IMAGE"]
    runner = str(options.view_as(StandardOptions).runner or "")
    setup = options.view_as(SetupOptions)
    if ("dataflow" in runner.lower() and not worker.sdk_container_image
            and not setup.setup_file and not setup.extra_packages):
        raise SystemExit(
            "Dataflow workers need the clickstream-beam package: give "
            "--sdk_container_image (the image built from templates/Dockerfile, target "
            "sdk) or --setup_file (set by FLEX_TEMPLATE_PYTHON_SETUP_FILE, target launcher)")


def launch(argv: Sequence[str]) -> PipelineResult:
    """Build the job from ``argv``, submit it, and return without waiting for it."""
    options = PipelineOptions(list(argv))
    standard = options.view_as(StandardOptions)
    if standard.streaming:
        raise SystemExit(f"--streaming: {STREAMING_NOT_SUPPORTED}")
    if options.view_as(ClickstreamOptions).input_subscription:
        # `clickstream run` streams from Pub/Sub; this template's metadata, sinks and
        # launch mode are the bounded job's, so a streaming template is still to come.
        raise SystemExit(f"--input_subscription: {STREAMING_NOT_SUPPORTED}")
    standard.streaming = False
    _worker_code(options)
    p = beam.Pipeline(options=options)
    build(p, options.view_as(ClickstreamOptions))
    result = p.run()
    # No wait_until_finish(): the launcher must return once the job is submitted.
    job_id = getattr(result, "job_id", None)
    log.info("submitted clickstream job%s; state %s",
             f" {job_id()}" if callable(job_id) else "", result.state)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    launch(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
