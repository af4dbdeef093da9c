"""Dataflow flex template entry point: build the clickstream job, submit it, return.

The image runs this file (FLEX_TEMPLATE_PYTHON_PY_FILE) for both templates of this
directory, with the template parameters as ``--name=value`` arguments plus the Beam
options Dataflow adds itself (runner, project, region, temp and staging locations,
``--setup_file`` when the image sets FLEX_TEMPLATE_PYTHON_SETUP_FILE,
``--sdk_container_image`` when given):

- ``metadata.json`` (bounded): ``--input_files`` → a batch job;
- ``metadata-streaming.json`` (streaming): ``--input_subscription`` → a streaming job
  reading Pub/Sub, ``--streaming`` set here (``pipeline.job.select_mode``).

Exactly one of the two inputs is required. Either way it builds the same graph as
``clickstream run`` (``pipeline.job.select_mode`` then ``pipeline.job.build``: the
runner-dependent choices, such as Pub/Sub ``id_label`` only where the runner honours it,
are made there) and calls ``run()`` only. Dataflow's docs require the launcher program to
exit after ``run``: ``wait_until_finish`` blocks and keeps the flex template from
starting the job, and a streaming job never finishes. So none of what ``clickstream run``
adds around a streaming run is done here: no waiting, no signal handling, no
``--max_run_s``, no summary; the job runs until drained or cancelled.

A streaming job on Dataflow is refused unless it writes BigQuery or Bigtable: DuckDB is
a file on each worker's disk, lost with the workers, so the launcher turns it off there
(``duckdb_path`` is empty). At-least-once streaming mode is refused too: a redelivery
under it could be counted twice by the dedup and changelog state.

It is a file run by path, not a module of the ``pipeline`` package: the script's own
directory goes first on ``sys.path``, and this directory holds no module that could shadow
a top-level import, whereas running ``pipeline/flex_main.py`` by path would put every
module of ``pipeline/`` (``options``, ``graph``, ``report``, ...) on the path as top-level
names.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    DebugOptions,
    GoogleCloudOptions,
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)
from apache_beam.runners.runner import PipelineResult

from pipeline.job import build, explain_sink_failures, select_mode
from pipeline.options import ClickstreamOptions
from runners import dataflow

log = logging.getLogger("clickstream.flex")

AT_LEAST_ONCE = dataflow.STREAMING_MODES["at_least_once"]
EXACTLY_ONCE = dataflow.STREAMING_MODES["exactly_once"]
# The production settings of runners/dataflow.py's preset a streaming launch applies when
# the user gave none, by the options view that holds each.
PRESET_SETTINGS = {
    "enable_streaming_engine": GoogleCloudOptions,
    "enable_hot_key_logging": GoogleCloudOptions,
    "autoscaling_algorithm": WorkerOptions,
    "max_num_workers": WorkerOptions,
}


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
    setup = options.view_as(SetupOptions)
    if (_on_dataflow(options) and not worker.sdk_container_image
            and not setup.setup_file and not setup.extra_packages):
        raise SystemExit(
            "Dataflow workers need the clickstream-beam package: give "
            "--sdk_container_image (the image built from templates/Dockerfile, target "
            "sdk) or --setup_file (set by FLEX_TEMPLATE_PYTHON_SETUP_FILE, target launcher)")


def _on_dataflow(options: PipelineOptions) -> bool:
    return "dataflow" in str(options.view_as(StandardOptions).runner or "").lower()


def _streaming_on_dataflow(options: PipelineOptions) -> None:
    """What a streaming job on Dataflow needs beyond ``clickstream run``'s set-up.

    - Exactly-once mode: the event_id dedup and the retracting changelog keep state; in
      at-least-once mode Dataflow may deliver a record to them twice, and the metrics
      would count it twice. Refused if asked for; otherwise made explicit.
    - The preset's production settings (PRESET_SETTINGS) where the user gave none.
    - A store that outlives the workers: DuckDB would be a file on each worker's disk, so
      it is turned off, and BigQuery or Bigtable must be given.
    """
    service = options.view_as(GoogleCloudOptions)
    modes = set(service.dataflow_service_options or []) | set(
        options.view_as(DebugOptions).experiments or [])
    if AT_LEAST_ONCE in modes:
        raise SystemExit(
            f"{AT_LEAST_ONCE}: this template counts each event exactly once; at-least-once "
            "mode could feed a redelivered event into the dedup and changelog state again "
            "and count it twice. Drop the option (exactly-once is the default)")
    if EXACTLY_ONCE not in modes:
        service.dataflow_service_options = [
            *(service.dataflow_service_options or []), EXACTLY_ONCE]
    # Streaming Engine, throughput-based autoscaling, the worker cap and hot key logging,
    # as `runners.preset_args("dataflow")` sets them for `clickstream run`: a template
    # launch gets the same production behaviour unless its parameters say otherwise.
    preset = PipelineOptions(dataflow.preset_args()).get_all_options()
    for name, view in PRESET_SETTINGS.items():
        given = options.view_as(view)
        if getattr(given, name) in (None, False):
            setattr(given, name, preset[name])
    clickstream = options.view_as(ClickstreamOptions)
    clickstream.duckdb_path = ""  # a file on each worker's disk: lost with the workers
    if not clickstream.durable_stores():
        raise SystemExit(
            "a streaming job on Dataflow needs a sink that outlives its workers: give "
            "bigquery_dataset (and bigquery_project, default: the job's project) and/or "
            "bigtable_project, bigtable_instance and bigtable_table")


def launch(argv: Sequence[str]) -> PipelineResult:
    """Build the job from ``argv``, submit it, and return without waiting for it."""
    options = PipelineOptions(list(argv))
    clickstream = options.view_as(ClickstreamOptions)
    if bool(clickstream.input_files) == bool(clickstream.input_subscription):
        given = ("both input_files and input_subscription given" if clickstream.input_files
                 else "neither input_files nor input_subscription given")
        raise SystemExit(
            f"{given}: give input_files for a bounded job (template "
            "metadata.json) or input_subscription for a streaming one (template "
            "metadata-streaming.json)")
    if options.view_as(StandardOptions).streaming and clickstream.input_files:
        raise SystemExit("--streaming with input_files: a streaming job reads Pub/Sub; "
                         "give input_subscription instead (template metadata-streaming.json)")
    streaming = select_mode(options)
    if streaming and _on_dataflow(options):
        _streaming_on_dataflow(options)
    _worker_code(options)
    p = beam.Pipeline(options=options)
    build(p, clickstream)
    with explain_sink_failures(clickstream):
        result = p.run()
    # No wait_until_finish(): the launcher must return once the job is submitted.
    job_id = getattr(result, "job_id", None)
    log.info("submitted %s clickstream job%s reading %s; state %s",
             "streaming" if streaming else "bounded",
             f" {job_id()}" if callable(job_id) else "",
             clickstream.input_subscription or clickstream.input_files, result.state)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    launch(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
