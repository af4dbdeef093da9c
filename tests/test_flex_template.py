"""The Dataflow flex template in templates/: metadata, launcher, Dockerfile.

Nothing here talks to Google Cloud: a fake runner stands in for Dataflow, the Dockerfile
is read (no Docker engine runs here), and gcloud, where installed, only prints the
template spec it would upload (--print-only).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import apache_beam as beam
import pytest
from apache_beam.io.gcp.pubsub import parse_subscription
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
    WorkerOptions,
)
from apache_beam.runners.runner import PipelineResult, PipelineRunner, PipelineState

import runners
from pipeline import job
from pipeline.job import build, select_mode
from pipeline.options import ClickstreamOptions, PrivacyOptions
from transforms.retract import held_by_window
from transforms.sources import _SUBSCRIPTION as SUBSCRIPTION_PATH

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
DOCKERFILE = TEMPLATES / "Dockerfile"
LAUNCHER = TEMPLATES / "launcher.py"


@dataclass(frozen=True)
class Template:
    """One flex template: its metadata file, its mode, the parameter that selects the
    mode (the launcher streams when given input_subscription), and the options of
    ClickstreamOptions it deliberately does not offer, each with the reason."""

    metadata: Path
    streaming: bool
    input: str
    left_out: Mapping[str, str]

    def __str__(self) -> str:
        return self.metadata.name


FLINK_ONLY = ("Flink's checkpoint-gated sink input; Dataflow commits a stage's outputs "
              "with its state, so a retried bundle never writes other rows")
# A template's workers have neither the launcher's files nor an environment it sets.
KEY_ON_WORKERS = {
    "pseudonymize_key_file": "a file each worker reads; use pseudonymize_key_secret",
    "pseudonymize_key_env": "the workers' environment; use pseudonymize_key_secret",
}
# One template per mode, as Google's own templates do. Everything ClickstreamOptions and
# PrivacyOptions declare is a parameter of a template unless listed here.
BOUNDED = Template(TEMPLATES / "metadata.json", streaming=False, input="input_files",
                   left_out={
    "input_subscription": "the streaming template's input",
    "timestamp_attribute": "a Pub/Sub message attribute",
    "id_label": "a Pub/Sub message attribute",
    "early_firing_s": "a bounded job emits one on-time pane per window",
    "late_firing_s": "a bounded job emits one on-time pane per window",
    "max_run_s": "`clickstream run` cancels itself; the launcher returns at submission",
    "stable_sink_input": FLINK_ONLY,
    **KEY_ON_WORKERS,
})
STREAMING = Template(TEMPLATES / "metadata-streaming.json", streaming=True,
                     input="input_subscription", left_out={
    "input_files": "the bounded template's input",
    "duckdb_path": "a file on each worker's disk; the launcher turns DuckDB off there",
    "max_run_s": "`clickstream run` cancels itself; the launcher returns at submission",
    "stable_sink_input": FLINK_ONLY,
    **KEY_ON_WORKERS,
})
ALL_TEMPLATES = [BOUNDED, STREAMING]
each_template = pytest.mark.parametrize("template", ALL_TEMPLATES, ids=str)

# Fields of Dataflow's TemplateMetadata / ParameterMetadata (API v1b3): a misspelt key
# (e.g. "isOptonal") is carried into the spec by gcloud and silently ignored by Dataflow.
TEMPLATE_KEYS = {"name", "description", "parameters", "streaming", "supportsAtLeastOnce",
                 "supportsExactlyOnce", "defaultStreamingMode", "yamlDefinition"}
PARAMETER_KEYS = {"name", "label", "helpText", "isOptional", "regexes", "paramType",
                  "customMetadata", "groupName", "parentName", "parentTriggerValues",
                  "enumOptions", "defaultValue", "isHiddenUi"}


JOB_OPTIONS = (ClickstreamOptions, PrivacyOptions)


def clickstream_actions() -> dict[str, argparse.Action]:
    """Every option the job's own options classes declare, by dest, read from argparse
    itself."""
    parser = argparse.ArgumentParser(add_help=False)
    for options in JOB_OPTIONS:
        options._add_argparse_args(parser)
    return {action.dest: action for action in parser._actions}


def metadata(template: Template) -> dict:
    return json.loads(template.metadata.read_text())


def parameters(template: Template) -> dict[str, dict]:
    return {param["name"]: param for param in metadata(template)["parameters"]}


def full_match(param: dict, value: str) -> bool:
    return all(re.fullmatch(regex, value) for regex in param.get("regexes", []))


def load_launcher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("clickstream_flex_launcher", LAUNCHER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- (a) each metadata file and ClickstreamOptions agree -----------------------------------

@each_template
def test_metadata_parameters_are_exactly_the_clickstream_options(template):
    actions = clickstream_actions()
    params = parameters(template)
    assert len(params) == len(metadata(template)["parameters"]), "duplicate parameter names"
    assert set(template.left_out) <= set(actions), "left out options the job does not have"
    assert template.input in params and template.input not in template.left_out
    assert set(params) - set(actions) == set(), "metadata parameters the job does not parse"
    assert set(actions) - set(template.left_out) - set(params) == set(), (
        f"options missing from {template}")
    assert set(params) & set(template.left_out) == set(), "offered and left out"
    for name in params:
        # The flex launcher passes each parameter as --name=value.
        assert f"--{name}" in actions[name].option_strings


def test_only_max_run_s_flink_and_worker_key_options_are_left_out_of_both_templates():
    # The launcher returns once the job is submitted, so nothing would apply max_run_s.
    assert set(BOUNDED.left_out) & set(STREAMING.left_out) == {
        "max_run_s", "stable_sink_input", *KEY_ON_WORKERS}


def test_parameters_of_both_templates_take_the_same_values():
    bounded, streaming = parameters(BOUNDED), parameters(STREAMING)
    for name in set(bounded) & set(streaming):
        assert bounded[name]["regexes"] == streaming[name]["regexes"], name
        assert bounded[name]["isOptional"] == streaming[name]["isOptional"], name


@each_template
def test_metadata_uses_dataflow_fields_only(template):
    meta = metadata(template)
    assert set(meta) <= TEMPLATE_KEYS
    assert meta["name"] and meta["description"]
    assert meta["streaming"] is template.streaming
    # Exactly-once counting is the design: in at-least-once mode Dataflow may hand a
    # redelivered record to the dedup and changelog state again, which double counts.
    assert meta["supportsExactlyOnce"] is True
    assert meta["supportsAtLeastOnce"] is False
    assert "defaultStreamingMode" not in meta  # only valid when both modes are supported
    if template.streaming:
        assert "at-least-once" in meta["description"] and "twice" in meta["description"]
    for param in meta["parameters"]:
        assert set(param) <= PARAMETER_KEYS, param["name"]
        assert param["label"].strip() and param["helpText"].strip(), param["name"]
        assert isinstance(param["isOptional"], bool), param["name"]
        for regex in param.get("regexes", []):
            assert regex.startswith("^") and regex.endswith("$"), (param["name"], regex)
            re.compile(regex)


def test_templates_describe_each_other_not_a_missing_mode():
    assert "metadata-streaming.json" in metadata(BOUNDED)["description"]
    assert "metadata.json" in metadata(STREAMING)["description"]
    assert "no streaming template" not in metadata(BOUNDED)["description"]


@each_template
def test_required_parameters_are_the_input_and_the_options_without_default(template):
    actions = clickstream_actions()
    for name, param in parameters(template).items():
        # Optional options default to a value or to "" (off); only the input that picks
        # the template's mode is required (input_files has no default; input_subscription
        # defaults to "" because `clickstream run` reads files without it).
        assert param["isOptional"] is (name != template.input), name
        if name != template.input:
            assert actions[name].default is not None, name


@each_template
def test_regexes_follow_the_option_types(template):
    actions = clickstream_actions()
    for name, param in parameters(template).items():
        action = actions[name]
        if action.choices:
            assert param.get("regexes"), name
            for choice in action.choices:
                assert full_match(param, str(choice)), (name, choice)
            assert not full_match(param, "something-else"), name
        if action.type is int:
            assert param.get("regexes"), name
            for bad in ("abc", "1.5", "-1", "", "1 2"):
                assert not full_match(param, bad), (name, bad)


@each_template
def test_regexes_reject_values_the_job_cannot_use(template):
    params = parameters(template)
    assert not full_match(params["hll_lg_k"], "3")  # DataSketches HLL: 4 <= lg_k <= 21
    assert not full_match(params["hll_lg_k"], "22")
    assert full_match(params["hll_lg_k"], "21")
    assert not full_match(params["dedup_buckets"], "0")
    assert not full_match(params["funnel_steps"], "page_view,,purchase")
    assert not full_match(params["funnel_steps"], "Page View")
    assert full_match(params["archive_path"], "gs://bucket/clickstream/archive")
    assert not full_match(params["archive_path"], "/local/archive")  # not on workers
    if "input_files" in params:
        assert full_match(params["input_files"], "gs://bucket/day=2026-11-01/*.jsonl")
        assert not full_match(params["input_files"], "/local/path/*.jsonl")


def _job_accepts_subscription(value: str) -> bool:
    """What the job itself accepts: the graph's source and Beam's ReadFromPubSub."""
    try:
        parse_subscription(value)
    except ValueError:
        return False
    return bool(SUBSCRIPTION_PATH.match(value))


def test_subscription_regex_accepts_only_what_the_pubsub_source_accepts():
    param = parameters(STREAMING)["input_subscription"]
    assert param["paramType"] == "PUBSUB_SUBSCRIPTION"
    for good in ("projects/your-project/subscriptions/clickstream-events",
                 "projects/example.com:your-project/subscriptions/events.v2"):
        assert full_match(param, good) and _job_accepts_subscription(good), good
    for bad in ("projects/p/subscriptions/s",  # Beam: project ids have 6-63 characters
                "projects/your-project/topics/events", "projects/your-project/subscriptions/",
                "projects/your-project/subscriptions/a/b", "clickstream-events", ""):
        # Refused at launch, not minutes later when the launcher builds the graph.
        assert not full_match(param, bad) and not _job_accepts_subscription(bad), bad


# --- (b) every default validates against its metadata regex --------------------------------

@each_template
def test_each_option_default_validates_against_its_metadata_regexes(template):
    actions = clickstream_actions()
    params = parameters(template)
    for name, param in params.items():
        if name == template.input:
            continue  # required: its default (None or "") is never what the job gets
        default = actions[name].default
        assert full_match(param, str(default)), (name, default)
        # And the value the launcher would get back parses to the same default.
        given = PipelineOptions([f"--{name}={default}"])
        assert any(getattr(given.view_as(options), name, object()) == default
                   for options in JOB_OPTIONS), name


# --- (c) the launcher submits and returns: a fake stands in for Dataflow -------------------

class FakeDataflowResult(PipelineResult):
    """A job that was submitted and never finishes."""

    def __init__(self) -> None:
        super().__init__(PipelineState.RUNNING)
        self.waited = False

    def job_id(self) -> str:
        return "fake-2026-11-01_00_00_00-1"

    def wait_until_finish(self, duration=None):
        self.waited = True
        raise AssertionError("the flex template launcher waited for the job to finish")


class FakeDataflowRunner(PipelineRunner):
    """Stands in for DataflowRunner: records the submitted pipeline, runs nothing."""

    submitted: ClassVar[list[tuple[beam.Pipeline, PipelineOptions, FakeDataflowResult]]] = []

    def run_pipeline(self, pipeline, options):
        result = FakeDataflowResult()
        FakeDataflowRunner.submitted.append((pipeline, options, result))
        return result


FAKE_RUNNER = f"{__name__}.FakeDataflowRunner"


def _labels(pipeline: beam.Pipeline) -> list[str]:
    labels: list[str] = []

    class Visitor(beam.pipeline.PipelineVisitor):
        def enter_composite_transform(self, node):
            labels.append(node.full_label)

        def visit_transform(self, node):
            labels.append(node.full_label)

    pipeline.visit(Visitor())
    return sorted(labels)


@pytest.fixture
def events_file(tmp_path: Path) -> Path:
    path = tmp_path / "events-00000.jsonl"
    path.write_text('{"event_id": "e1"}\n')
    return path


@pytest.fixture
def fake_dataflow(monkeypatch):
    FakeDataflowRunner.submitted = []
    monkeypatch.delenv("SDK_CONTAINER_IMAGE", raising=False)
    # A streaming launch reads what the stores hold (pipeline.job.held_at_launch); the
    # example project's stores do not exist, and reading real ones at launch is
    # tests/test_relaunch.py's subject: here they hold nothing.
    monkeypatch.setattr(job, "held_at_launch", lambda *_args, **_kw: held_by_window([]))
    yield FakeDataflowRunner.submitted
    FakeDataflowRunner.submitted = []


def test_launcher_returns_after_submitting_to_a_fake_standing_in_for_dataflow(
        fake_dataflow, events_file, tmp_path):
    launcher = load_launcher()
    argv = [f"--runner={FAKE_RUNNER}", f"--input_files={events_file}",
            f"--duckdb_path={tmp_path / 'out.duckdb'}", "--distinct=hll",
            "--dedup_buckets=64", "--sdk_container_image=example/clickstream:test"]

    assert launcher.main(argv) == 0  # returned: it did not block on the running job

    assert len(fake_dataflow) == 1, "the launcher must submit exactly one job"
    pipeline, options, result = fake_dataflow[0]
    assert result.state == PipelineState.RUNNING
    assert not result.waited, "the launcher called wait_until_finish()"
    clickstream = options.view_as(ClickstreamOptions)
    assert (clickstream.input_files, clickstream.distinct, clickstream.dedup_buckets) == (
        str(events_file), "hll", 64)
    assert options.view_as(WorkerOptions).sdk_container_image == "example/clickstream:test"

    # The same graph as `clickstream run` (pipeline.job.build), not a copy of it.
    reference = beam.Pipeline(options=PipelineOptions(argv))
    build(reference, PipelineOptions(argv).view_as(ClickstreamOptions))
    assert _labels(pipeline) == _labels(reference)
    assert {"ReadFiles", "Clickstream", "WriteDuckDB"} <= set(_labels(pipeline))


def test_launcher_defaults_the_worker_image_to_the_images_sdk_container_image(
        fake_dataflow, events_file, monkeypatch):
    monkeypatch.setenv("SDK_CONTAINER_IMAGE", "example/clickstream:from-env")
    load_launcher().launch([f"--runner={FAKE_RUNNER}", f"--input_files={events_file}"])
    _, options, _ = fake_dataflow[0]
    assert options.view_as(WorkerOptions).sdk_container_image == (
        "example/clickstream:from-env")


def test_launcher_refuses_a_dataflow_job_whose_workers_lack_the_package(
        fake_dataflow, events_file):
    with pytest.raises(SystemExit, match="sdk_container_image"):
        load_launcher().launch([f"--runner={FAKE_RUNNER}", f"--input_files={events_file}"])
    assert fake_dataflow == []


SUBSCRIPTION = "projects/your-project/subscriptions/clickstream-events"
DURABLE_SINKS = ["--bigquery_project=your-project", "--bigquery_dataset=clickstream",
                 "--bigtable_project=your-project", "--bigtable_instance=serving",
                 "--bigtable_table=metric_latest"]


def _streaming_argv(*extra: str) -> list[str]:
    """What Dataflow would pass the launcher for the streaming template (the runner is a
    fake standing in for DataflowRunner)."""
    return [f"--runner={FAKE_RUNNER}", f"--input_subscription={SUBSCRIPTION}",
            "--timestamp_attribute=event_time", "--id_label=event_id",
            "--sdk_container_image=example/clickstream:test", "--distinct=hll",
            "--early_firing_s=30", "--late_firing_s=120", *extra]


def _transforms(pipeline: beam.Pipeline) -> dict[str, beam.PTransform]:
    found: dict[str, beam.PTransform] = {}

    class Visitor(beam.pipeline.PipelineVisitor):
        def enter_composite_transform(self, node):
            found[node.full_label] = node.transform

        def visit_transform(self, node):
            found[node.full_label] = node.transform

    pipeline.visit(Visitor())
    return found


def test_streaming_launcher_returns_after_submitting_to_a_fake_standing_in_for_dataflow(
        fake_dataflow):
    argv = _streaming_argv(*DURABLE_SINKS)

    assert load_launcher().main(argv) == 0  # returned: it did not block on the job

    assert len(fake_dataflow) == 1, "the launcher must submit exactly one job"
    pipeline, options, result = fake_dataflow[0]
    assert result.state == PipelineState.RUNNING
    assert not result.waited, "the launcher called wait_until_finish()"
    assert options.view_as(StandardOptions).streaming is True
    assert "streaming_mode_exactly_once" in options.view_as(
        GoogleCloudOptions).dataflow_service_options
    clickstream = options.view_as(ClickstreamOptions)
    assert clickstream.input_subscription == SUBSCRIPTION
    assert clickstream.duckdb_path == ""  # no DuckDB file on the workers' disks
    # runners/dataflow.py's production settings, as `clickstream run` would get them.
    preset = PipelineOptions(runners.preset_args("dataflow")).get_all_options()
    submitted = options.get_all_options()
    for name in ("enable_streaming_engine", "enable_hot_key_logging",
                 "autoscaling_algorithm", "max_num_workers"):
        assert submitted[name] == preset[name] not in (None, False), name

    labels = set(_labels(pipeline))
    assert {"ReadMessages", "ReadMessages/ReadPubSub", "Clickstream", "WriteBigQuery",
            "WriteBigtable"} <= labels
    assert not {"ReadFiles", "WriteDuckDB"} & labels
    # The same graph as `clickstream run --input_subscription ... --duckdb_path ''`
    # (pipeline.job.select_mode + build), not a copy of it.
    reference_options = PipelineOptions([*argv, "--duckdb_path="])
    assert select_mode(reference_options) is True
    reference = beam.Pipeline(options=reference_options)
    build(reference, reference_options.view_as(ClickstreamOptions))
    assert _labels(pipeline) == _labels(reference)

    transforms = _transforms(pipeline)
    # Dataflow honours id_label (the DirectRunner would raise), so build() keeps it ...
    pubsub = transforms["ReadMessages/ReadPubSub"]
    assert (pubsub._source.full_subscription, pubsub._source.id_label,
            pubsub._source.timestamp_attribute) == (SUBSCRIPTION, "event_id", "event_time")
    # ... and the processing-time late trigger (forced to 0 only on the DirectRunner).
    config = transforms["Clickstream"]._config
    assert (config.early_firing_s, config.late_firing_s, config.distinct) == (30, 120, "hll")


def test_streaming_launcher_keeps_the_users_worker_settings(fake_dataflow):
    load_launcher().launch(_streaming_argv(*DURABLE_SINKS, "--max_num_workers=50",
                                           "--autoscaling_algorithm=NONE"))
    (_, options, _), = fake_dataflow
    worker = options.view_as(WorkerOptions)
    assert (worker.max_num_workers, worker.autoscaling_algorithm) == (50, "NONE")
    assert options.view_as(GoogleCloudOptions).enable_streaming_engine is True


def test_streaming_launcher_writes_bigquery_alone_or_bigtable_alone(fake_dataflow):
    launcher = load_launcher()
    launcher.launch(_streaming_argv(*DURABLE_SINKS[:2]))
    launcher.launch(_streaming_argv(*DURABLE_SINKS[2:]))
    (bigquery_only, _, _), (bigtable_only, _, _) = fake_dataflow
    assert {"WriteBigQuery"} == {"WriteBigQuery", "WriteBigtable", "WriteDuckDB"} & set(
        _labels(bigquery_only))
    assert {"WriteBigtable"} == {"WriteBigQuery", "WriteBigtable", "WriteDuckDB"} & set(
        _labels(bigtable_only))


def test_select_mode_is_what_clickstream_run_and_the_launcher_share(events_file):
    streaming = PipelineOptions([f"--input_subscription={SUBSCRIPTION}"])
    assert select_mode(streaming) is True
    assert streaming.view_as(StandardOptions).streaming is True
    assert streaming.view_as(StandardOptions).runner == "BundleBasedDirectRunner"
    bounded = PipelineOptions([f"--input_files={events_file}", "--streaming"])
    assert select_mode(bounded) is False
    assert bounded.view_as(StandardOptions).streaming is False


@pytest.mark.parametrize(("argv", "message"), [
    pytest.param(_streaming_argv(), r"outlives its workers: give bigquery_dataset",
                 id="streaming-without-a-sink-that-outlives-the-workers"),
    pytest.param(_streaming_argv("--duckdb_path=/tmp/x.duckdb"), r"outlives its workers",
                 id="duckdb-is-not-such-a-sink"),
    pytest.param(_streaming_argv(*DURABLE_SINKS,
                                 "--dataflow_service_options=streaming_mode_at_least_once"),
                 r"count it twice", id="at-least-once-service-option"),
    pytest.param(_streaming_argv(*DURABLE_SINKS,
                                 "--experiments=streaming_mode_at_least_once"),
                 r"count it twice", id="at-least-once-experiment"),
    pytest.param(_streaming_argv(*DURABLE_SINKS, "--input_files=gs://b/*.jsonl"),
                 r"both input_files and input_subscription", id="both-inputs"),
    pytest.param([f"--runner={FAKE_RUNNER}", "--setup_file=setup.py", *DURABLE_SINKS],
                 r"neither input_files nor input_subscription",
                 id="neither-input"),
    pytest.param([f"--runner={FAKE_RUNNER}", "--input_files=gs://b/*.jsonl",
                  "--setup_file=setup.py", "--streaming"],
                 r"--streaming with input_files.*input_subscription",
                 id="streaming-flag-with-files"),
    pytest.param([f"--runner={FAKE_RUNNER}", f"--input_subscription={SUBSCRIPTION}",
                  *DURABLE_SINKS], r"sdk_container_image", id="workers-lack-the-package"),
    pytest.param(_streaming_argv("--bigtable_project=your-project"),
                 r"go together", id="half-a-bigtable-sink"),
])
def test_launcher_refusals_with_a_fake_standing_in_for_dataflow(fake_dataflow, argv,
                                                                message):
    with pytest.raises(SystemExit, match=message):
        load_launcher().launch(argv)
    assert fake_dataflow == [], "a refused launch must submit nothing"


# --- (d) the Dockerfile references files that exist ---------------------------------------

def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    assert not pending, "dangling line continuation"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined]


def _stages() -> list[dict]:
    """Per stage: base image, WORKDIR, COPY src -> absolute dest, ENV."""
    args: dict[str, str] = {}
    stages: list[dict] = []

    def expand(text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)

    for instruction, rest in _dockerfile_instructions():
        if instruction == "ARG":
            name, _, default = rest.partition("=")
            args.setdefault(name.strip(), default.strip().strip('"'))
        elif instruction == "FROM":
            words = expand(rest).split()
            stages.append({"from": words[0], "name": words[2] if len(words) > 2 else None,
                           "workdir": "/", "copies": [], "copy_from": [], "env": {}})
        elif instruction == "WORKDIR":
            stages[-1]["workdir"] = expand(rest)
        elif instruction == "COPY":
            words = shlex.split(expand(rest))
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            *sources, dest = paths
            source_stage = next((named for named in stages for f in flags
                                 if f == f"--from={named['name']}"), None)
            if source_stage is not None and source_stage["from"] == "scratch":
                # The files a project stage gathered land under this stage's dest.
                dest = dest if dest.startswith("/") else f"{stages[-1]['workdir']}/{dest}"
                for source, there in source_stage["copies"]:
                    here = os.path.join(dest, os.path.relpath(there, sources[0]))
                    stages[-1]["copies"].append((source, here + ("/" if there.endswith("/")
                                                                 else "")))
                continue
            if any(f.startswith("--from=") for f in flags):
                stages[-1]["copy_from"].append((flags, sources, dest))
                continue
            dest = dest if dest.startswith("/") else f"{stages[-1]['workdir']}/{dest}"
            for source in sources:
                stages[-1]["copies"].append((source, dest))
        elif instruction == "ENV":
            name, _, value = rest.partition("=")
            stages[-1]["env"][name.strip()] = expand(value.strip().strip('"'))
    return stages


def _source_of(stage: dict, image_path: str) -> Path:
    """The file of this repository that a stage copies to ``image_path``."""
    target = os.path.normpath(image_path)
    for source, dest in stage["copies"]:
        src = ROOT / source
        if src.is_dir():
            relative = os.path.relpath(target, os.path.normpath(dest))
            if not relative.startswith(".."):
                return src / relative
        else:
            landed = os.path.join(dest, src.name) if dest.endswith("/") else dest
            if os.path.normpath(landed) == target:
                return src
    raise AssertionError(f"{image_path} is not copied into stage {stage['name']}")


def test_dockerfile_copies_files_that_exist():
    stages = _stages()
    copies = [source for stage in stages for source, _ in stage["copies"]]
    assert copies, "no COPY found"
    for source in copies:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
    for needed in ("setup.py", "constraints.txt", "templates/launcher.py"):
        assert needed in {c.rstrip("/") for c in copies}, needed
    # The packages setup.py installs are all in the image.
    for package in ("pipeline", "transforms", "schemas", "runners"):
        assert f"{package}/" in copies, package


def test_dockerfile_flex_variables_point_at_copied_files():
    stages = {stage["name"]: stage for stage in _stages()}
    launcher, sdk = stages["launcher"], stages["sdk"]
    for stage in (launcher, sdk):
        py_file = stage["env"]["FLEX_TEMPLATE_PYTHON_PY_FILE"]
        assert _source_of(stage, py_file).resolve() == LAUNCHER.resolve(), stage["name"]
    setup_file = launcher["env"]["FLEX_TEMPLATE_PYTHON_SETUP_FILE"]
    assert _source_of(launcher, setup_file).resolve() == (ROOT / "setup.py").resolve()
    # The worker image has the package installed; a staged sdist would be reinstalled.
    assert "FLEX_TEMPLATE_PYTHON_SETUP_FILE" not in sdk["env"]
    # Both targets install the project with the lock file.
    text = DOCKERFILE.read_text()
    assert text.count("pip install --no-cache-dir -c constraints.txt .") == 2


def test_dockerfile_base_images_are_pinned_and_match_the_lock():
    stages = _stages()
    bases = {stage["from"] for stage in stages if stage["from"] not in
             {s["name"] for s in stages} | {"scratch"}}
    launcher_base = [b for b in bases if "python311-template-launcher-base" in b]
    beam_sdk = [b for b in bases if b.startswith("apache/beam_python3.11_sdk")]
    assert len(launcher_base) == 1 and len(beam_sdk) == 1, bases
    for image in bases:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "$" not in tag, image
    lock = re.search(r"^apache-beam==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert lock is not None
    assert beam_sdk[0].endswith(f":{lock.group(1)}") and lock.group(1) == beam.__version__
    copy_from = [entry for stage in stages for entry in stage["copy_from"]]
    assert copy_from == [(["--from=launcher-base"],
                          ["/opt/google/dataflow/python_template_launcher"],
                          "/opt/google/dataflow/python_template_launcher")]


# --- gcloud turns metadata.json into a template spec (print only, no upload) ---------------

@each_template
def test_gcloud_accepts_the_metadata_file(tmp_path, template):
    # The Google Cloud CLI is on the project's machines (the emulator tests need it too);
    # without it this fails rather than skips.
    assert shutil.which("gcloud"), "install the Google Cloud CLI (gcloud) to run this test"
    env = {**os.environ, "CLOUDSDK_CONFIG": str(tmp_path / "gcloud-config"),
           "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
    out = subprocess.run(
        ["gcloud", "dataflow", "flex-template", "build", "gs://example-bucket/t.json",
         "--image=example-docker.example/project/clickstream:test",
         "--sdk-language=PYTHON", f"--metadata-file={template.metadata}", "--print-only",
         "--format=json"],
        env=env, capture_output=True, text=True, timeout=120, check=True)
    spec = json.loads(json.loads(out.stdout))
    assert spec["sdkInfo"]["language"] == "PYTHON"
    assert spec["metadata"]["name"] == metadata(template)["name"]
    assert [p["name"] for p in spec["metadata"]["parameters"]] == [
        p["name"] for p in metadata(template)["parameters"]]
