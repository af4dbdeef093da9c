"""The local Flink session cluster (runners/flink_session.py) and the FlinkRunner guard.

One real Flink 1.19.0 session (JobManager, 2 TaskManagers x 2 slots, from PyPI's
apache-flink-libraries via scripts/fetch_flink) and a Beam worker pool are started once
for this module in a temp dir; the tests run in file order against it: REST shows 2
TaskManagers / 4 slots, the worker pool answers a gRPC call on 127.0.0.1, no process
listens beyond loopback, a TaskManager killed by PID drops out of REST and a restarted
one comes back, and `stop` leaves no PID alive. Memory is kept small (JM 768 MB, TMs 1 GB
each, no job runs). A machine without java fails here, saying what to install.

Submitting the pipeline to a session, and losing a TaskManager under a running job, are
in tests/test_flink_cluster.py; the last tests here check how the submit path finds Beam's
Flink job server jar (scripts/fetch_flink_jobserver), and that it says at once what to
fetch when there is none instead of trying to download it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from apache_beam.options.pipeline_options import (
    FlinkRunnerOptions,
    JobServerOptions,
    PipelineOptions,
    PortableOptions,
)
from apache_beam.portability.api import beam_fn_api_pb2, beam_fn_api_pb2_grpc

from runners import flink
from runners.flink_session import (
    JAVA17_OPTS,
    FlinkSession,
    SessionError,
    Settings,
    _stat,
    is_loopback,
    listening_sockets,
)

# Seconds measured by the tests, printed at the end (pytest -s) and kept for the README.
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlinkSession]:
    s = FlinkSession(tmp_path_factory.mktemp("flink-session"))
    try:
        TIMINGS["start"] = s.start(Settings(jm_memory="768m", tm_memory="1024m"),
                                   timeout_s=90)
    except SessionError as exc:
        # A missing real part is a failure, not a skip: CI installs java and fetches Flink.
        pytest.fail(f"Flink session did not start: {exc}", pytrace=False)
    try:
        yield s
    finally:
        s.stop()
        print(f"\nflink session timings (s): {TIMINGS}")


@pytest.mark.integration
def test_rest_overview_shows_two_taskmanagers_with_four_slots(session: FlinkSession):
    overview = session.rest("/overview")
    assert overview["flink-version"] == "1.19.0"
    assert overview["taskmanagers"] == 2
    assert overview["slots-total"] == 4
    ids = sorted(tm["id"] for tm in session.rest("/taskmanagers")["taskmanagers"])
    assert ids == ["taskmanager-1", "taskmanager-2"]
    assert session.rest("/jobs/overview")["jobs"] == []
    status = session.status()
    assert set(status["processes"]) == {"jobmanager", "taskmanager-1", "taskmanager-2",
                                        "worker-pool"}
    assert TIMINGS["start"] < 60


@pytest.mark.integration
def test_worker_pool_answers_on_loopback(session: FlinkSession):
    port = session.settings().worker_pool_port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolStub(channel)
        # A real round trip to BeamFnExternalWorkerPoolServicer; no worker by that id.
        response = stub.StopWorker(beam_fn_api_pb2.StopWorkerRequest(worker_id="none"),
                                   timeout=10)
    assert response.error == ""


@pytest.mark.integration
def test_nothing_listens_beyond_loopback(session: FlinkSession):
    running = session.running()
    sockets = listening_sockets(running.values())
    s = session.settings()
    for name, pid in running.items():
        assert sockets.get(pid), f"{name} (pid {pid}) listens on nothing?"
        wide = [a for a in sockets[pid] if not is_loopback(a)]
        assert not wide, f"{name} (pid {pid}) listens beyond loopback: {wide}"
    everything = [a for addrs in sockets.values() for a in addrs]
    assert any(a.endswith(f":{s.rest_port}") for a in everything)
    assert any(a.endswith(f":{s.worker_pool_port}") for a in everything)
    assert any(a.endswith(f":{s.rpc_port}") for a in everything)
    assert any(a.endswith(f":{s.blob_port}") for a in everything)


@pytest.mark.integration
def test_config_binds_everything_to_loopback_and_checkpoints_in_run_dir(
        session: FlinkSession):
    config = (session.conf / "config.yaml").read_text()
    for key in ("jobmanager.rpc.address", "jobmanager.bind-host", "taskmanager.host",
                "taskmanager.bind-host", "rest.address", "rest.bind-address"):
        assert f'{key}: "127.0.0.1"' in config
    assert f'state.checkpoints.dir: "{session.checkpoints.as_uri()}"' in config
    assert 'restart-strategy.type: "fixed-delay"' in config


@pytest.mark.integration
def test_killed_taskmanager_drops_out_of_rest_and_a_restarted_one_returns(
        session: FlinkSession):
    pid = session.pid("taskmanager-2")
    assert pid is not None
    TIMINGS["tm_loss_detected"] = session.kill_taskmanager(2, wait_s=30)
    assert not session.pid_alive("taskmanager-2")
    assert _stat(pid) is None or _stat(pid)[0] == "Z"
    overview = session.rest("/overview")
    assert overview["taskmanagers"] == 1
    assert overview["slots-total"] == 2
    # Heartbeat interval 1 s: a dead TaskManager's heartbeat RPCs fail at once.
    assert TIMINGS["tm_loss_detected"] < 15
    TIMINGS["tm_restart"] = session.start_taskmanager(2, wait_s=45)
    overview = session.rest("/overview")
    assert overview["taskmanagers"] == 2
    assert overview["slots-total"] == 4


@pytest.mark.integration
def test_submit_args_target_this_cluster(session: FlinkSession):
    s = session.settings()
    args = session.submit_args()
    options = PipelineOptions(args)
    assert options.view_as(FlinkRunnerOptions).flink_master == f"127.0.0.1:{s.rest_port}"
    portable = options.view_as(PortableOptions)
    assert portable.environment_type == "EXTERNAL"
    assert portable.environment_config == f"127.0.0.1:{s.worker_pool_port}"
    checkpoints = options.view_as(flink.FlinkCheckpointOptions)
    assert checkpoints.checkpointing_interval == 10_000
    assert checkpoints.state_backend_storage_path == session.checkpoints.as_uri()
    assert f"--flink_job_server_jar={flink.job_server_jar_path()}" in args


@pytest.mark.integration
def test_stop_leaves_no_process_running(session: FlinkSession):
    running = session.running()
    assert len(running) == 4
    before = {name: _stat(pid) for name, pid in running.items()}
    started = time.monotonic()
    session.stop(timeout_s=15)
    TIMINGS["stop"] = time.monotonic() - started
    assert session.running() == {}
    for name, pid in running.items():
        now = _stat(pid)  # gone, a zombie, or a new process that reuses the PID
        assert now is None or now[0] == "Z" or now[1] != before[name][1], \
            f"{name} (pid {pid}) still alive"
    assert session.taskmanager_count() == 0  # REST no longer answers


# ------------------------------------------------------------------ the submit path


def test_flinkrunner_without_job_server_jar_refuses_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    from pipeline.cli import main

    missing = tmp_path / "no-such-job-server.jar"
    monkeypatch.setenv("FLINK_JOB_SERVER_JAR", str(missing))
    started = time.monotonic()
    code = main(["run", "--runner", "FlinkRunner", "--input_files",
                 str(tmp_path / "*.jsonl"), "--duckdb_path", str(tmp_path / "o.duckdb")])
    err = capsys.readouterr().err
    assert code == 2
    assert "scripts/fetch_flink_jobserver" in err
    assert "org.apache.beam:beam-runners-flink-1.19-job-server:" in err
    assert str(missing) in err
    assert time.monotonic() - started < 10  # no download attempt, no hang


def test_flink_job_server_jar_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    jar = tmp_path / "job-server.jar"
    monkeypatch.setenv("FLINK_JOB_SERVER_JAR", str(jar))
    argv = ["--runner=FlinkRunner", "--flink_master=127.0.0.1:8081"]
    with pytest.raises(flink.JobServerJarMissing, match="fetch_flink_jobserver"):
        flink.resolve_job_server_jar(argv)
    with pytest.raises(flink.JobServerJarMissing, match="does not exist"):
        flink.resolve_job_server_jar([*argv, f"--flink_job_server_jar={tmp_path}/x.jar"])
    # Other runners, a running job server, or a jar that is there pass.
    assert flink.resolve_job_server_jar(["--runner=DirectRunner"]) == ["--runner=DirectRunner"]
    with_endpoint = [*argv, "--job_endpoint=127.0.0.1:8099"]
    assert flink.resolve_job_server_jar(with_endpoint) == with_endpoint
    jar.write_bytes(b"PK")
    # No --flink_version: the project's (the jar's) is added, not Beam's default 2.2; the
    # job server started here gets the JVM options of a Flink cluster on Java 17.
    jvm = [f"--job_server_jvm_properties={opt}" for opt in JAVA17_OPTS.split()]
    assert "--job_server_jvm_properties=--add-opens=java.base/java.util=ALL-UNNAMED" in jvm
    assert flink.resolve_job_server_jar(argv) == [
        *argv, "--flink_version=1.19", *jvm, f"--flink_job_server_jar={jar}"]
    given = [*argv, "--flink_version=1.19", "--job_server_jvm_properties=-Xmx2g"]
    assert flink.resolve_job_server_jar(given) == [*given, f"--flink_job_server_jar={jar}"]
    assert os.environ["FLINK_JOB_SERVER_JAR"] == str(jar)


def test_a_flink_run_gives_its_job_server_a_temporary_directory_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(flink, "_job_server_tmpdir", None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    options = PipelineOptions(["--runner=FlinkRunner", "--job_server_jvm_properties=-Xmx2g"])
    flink.use_job_server_tmpdir(options)
    properties = options.view_as(JobServerOptions).job_server_jvm_properties
    mine = flink.job_server_tmpdir()
    assert properties == ["-Xmx2g", f"-Djava.io.tmpdir={mine}"]
    assert mine.parent == tmp_path and mine.name.startswith(
        f"{flink.JOB_SERVER_TMP_PREFIX}{os.getpid()}-")
    flink.use_job_server_tmpdir(options)  # once only
    assert options.view_as(JobServerOptions).job_server_jvm_properties == properties
    # Another runner, a running job server, or a directory the run names: left alone.
    for argv in (["--runner=DirectRunner"],
                 ["--runner=FlinkRunner", "--job_endpoint=127.0.0.1:8099"],
                 ["--runner=FlinkRunner", "--job_server_jvm_properties=-Djava.io.tmpdir=/x"]):
        given = PipelineOptions(argv)
        before = given.view_as(JobServerOptions).job_server_jvm_properties
        flink.use_job_server_tmpdir(given)
        assert given.view_as(JobServerOptions).job_server_jvm_properties == before


def test_a_killed_process_job_server_directory_is_removed_by_the_next(tmp_path: Path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    orphan = tmp_path / f"{flink.JOB_SERVER_TMP_PREFIX}{dead_pid}-abc"
    (orphan / "minicluster_1" / "tm_0").mkdir(parents=True)
    alive = tmp_path / f"{flink.JOB_SERVER_TMP_PREFIX}{os.getpid()}-def"
    alive.mkdir()
    unrelated = tmp_path / "minicluster_2"
    unrelated.mkdir()
    assert flink.remove_orphaned_job_server_tmpdirs(tmp_path) == [orphan]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, unrelated.name])


def test_kit_built_jar_is_found_without_a_flag(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("FLINK_JOB_SERVER_JAR", raising=False)
    monkeypatch.setattr(flink, "JAR_DIR", tmp_path / "jars")
    monkeypatch.setattr(flink, "KIT_JAR_DIR", tmp_path / "kit")
    assert flink.job_server_jar_path("1.19") == flink.job_server_jar("1.19")  # neither
    kit = tmp_path / "kit" / "beam-runners-flink-1.19-job-server-2.70.0-kit-kafka-rocksdb.jar"
    kit.parent.mkdir()
    kit.write_bytes(b"PK")
    assert flink.job_server_jar_path("1.19") == kit
    assert flink.job_server_jar_path("2.2") == flink.job_server_jar("2.2")  # kit: 1.19 only
    published = flink.job_server_jar("1.19")
    published.parent.mkdir()
    published.write_bytes(b"PK")
    assert flink.job_server_jar_path("1.19") == published  # Beam's own jar wins


def test_missing_java_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from runners.flink_session import java_binary

    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SessionError, match="openjdk-17-jre-headless"):
        java_binary()
