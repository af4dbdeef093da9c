"""A local Flink 1.19 session cluster on 127.0.0.1, plus a Beam Python worker pool.

    python -m runners.flink_session start             # JobManager, 2 TaskManagers, pool
    python -m runners.flink_session status            # REST /overview, /jobs/overview
    python -m runners.flink_session submit-args       # FlinkRunner args for this cluster
    python -m runners.flink_session kill-taskmanager 2    # SIGKILL TaskManager 2
    python -m runners.flink_session start-taskmanager 2   # start it again
    python -m runners.flink_session stop              # TERM (then KILL) every PID

All commands take ``--dir DIR`` (default ``$FLINK_SESSION_DIR`` or
``<repo>/.cache/flink/session-<worktree>``): the run directory holding ``conf/``
(config.yaml, log4j.properties), ``logs/``, ``pids/``, ``checkpoints/``, ``tmp/`` and
``session.json`` (ports and sizes). Flink comes from PyPI's ``apache-flink-libraries``
(scripts/fetch_flink, run by ``start`` if needed); there are no start scripts in that
wheel, so the JobManager (``StandaloneSessionClusterEntrypoint``) and each TaskManager
(``TaskManagerRunner``) are started with ``java`` here, with the memory arguments Flink's
own ``BashJavaUtils`` computes from the config (as Flink's bin/ scripts do).

Everything listens on 127.0.0.1 only: JobManager RPC, blob server, REST, TaskManager
RPC and data ports, the metrics query services, and the worker pool (Beam's own
worker_pool_main binds ``[::]``; runners/flink_worker_pool.py binds one address).
``start`` prints the FlinkRunner arguments that submit a pipeline to this cluster
(EXTERNAL environment = this worker pool); submitting needs Beam's Flink job server jar
(scripts/fetch_flink_jobserver).

This module never imports from ``pipeline/`` or ``transforms/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FLINK_VERSION = "1.19.0"  # apache-flink-libraries on PyPI; scripts/fetch_flink pins it too
HOST = "127.0.0.1"
JM_CLASS = "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint"
TM_CLASS = "org.apache.flink.runtime.taskexecutor.TaskManagerRunner"
BASH_JAVA_UTILS = "org.apache.flink.runtime.util.bash.BashJavaUtils"
# The Flink accumulator Beam's Flink runner keeps a job's Beam metrics in (JSON of a
# GetJobMetricsResponse: monitoring infos, base64 payloads).
BEAM_METRICS_ACCUMULATOR = "__metricscontainers"
# What Flink's default config.yaml passes to every JVM on Java 17 (Kryo and Pekko reflect
# into these packages; without them jobs fail at runtime, not at start).
JAVA17_OPTS = (
    "--add-exports=java.base/sun.net.util=ALL-UNNAMED "
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED "
    "--add-exports=jdk.compiler/com.sun.tools.javac.api=ALL-UNNAMED "
    "--add-exports=jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED "
    "--add-exports=jdk.compiler/com.sun.tools.javac.parser=ALL-UNNAMED "
    "--add-exports=jdk.compiler/com.sun.tools.javac.tree=ALL-UNNAMED "
    "--add-exports=jdk.compiler/com.sun.tools.javac.util=ALL-UNNAMED "
    "--add-exports=java.security.jgss/sun.security.krb5=ALL-UNNAMED "
    "--add-opens=java.base/java.lang=ALL-UNNAMED --add-opens=java.base/java.net=ALL-UNNAMED "
    "--add-opens=java.base/java.io=ALL-UNNAMED --add-opens=java.base/java.nio=ALL-UNNAMED "
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED "
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED "
    "--add-opens=java.base/java.text=ALL-UNNAMED --add-opens=java.base/java.time=ALL-UNNAMED "
    "--add-opens=java.base/java.util=ALL-UNNAMED "
    "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED "
    "--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED "
    "--add-opens=java.base/java.util.concurrent.locks=ALL-UNNAMED"
)
LOG4J = """\
# Written by runners/flink_session.py: one log file per process (-Dlog.file).
monitorInterval = 30
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = MainAppender
appender.main.name = MainAppender
appender.main.type = File
appender.main.append = true
appender.main.fileName = ${sys:log.file}
appender.main.layout.type = PatternLayout
appender.main.layout.pattern = %d{yyyy-MM-dd HH:mm:ss,SSS} %-5p %-60c %x - %m%n
logger.pekko.name = org.apache.pekko
logger.pekko.level = INFO
logger.netty.name = org.jboss.netty.channel.DefaultChannelPipeline
logger.netty.level = OFF
"""


class SessionError(RuntimeError):
    """The cluster could not be started, reached or stopped as asked."""


def default_dir() -> Path:
    env = os.environ.get("FLINK_SESSION_DIR")
    # One session per worktree: .cache may be shared between worktrees.
    return Path(env) if env else REPO / ".cache" / "flink" / f"session-{REPO.name}"


def java_binary() -> str:
    """The java to run Flink with ($JAVA_HOME/bin/java, else java on PATH)."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise SessionError("java not found: Flink 1.19 needs a Java 11+ runtime (17 recommended; "
                       "e.g. `apt-get install openjdk-17-jre-headless`) on PATH or JAVA_HOME")


def fetch_flink() -> Path:
    """Run scripts/fetch_flink (cached, idempotent) and return the Flink directory."""
    env = dict(os.environ)
    env.setdefault("PYTHON", sys.executable)
    proc = subprocess.run([str(REPO / "scripts" / "fetch_flink")], env=env,
                          stdout=subprocess.PIPE, text=True)
    home = Path(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else None
    if proc.returncode != 0 or home is None or not (home / "lib").is_dir():
        raise SessionError(f"scripts/fetch_flink failed (exit {proc.returncode}); it "
                           f"pip-downloads apache-flink-libraries=={FLINK_VERSION}")
    return home


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Settings:
    """Sizes and timings of a session; saved in session.json by ``start``."""

    taskmanagers: int = 2
    slots: int = 2
    jm_memory: str = "1024m"
    tm_memory: str = "1536m"
    heartbeat_interval_ms: int = 1000
    # A dead TaskManager's RPC fails at once: after heartbeat.rpc-failure-threshold (2)
    # failed heartbeats it is gone; the timeout covers a hung (not dead) one.
    heartbeat_timeout_ms: int = 10_000
    restart_attempts: int = 20
    restart_delay_ms: int = 2000
    rest_port: int = 0
    rpc_port: int = 0
    blob_port: int = 0
    worker_pool_port: int = 0
    flink_home: str = ""
    extra_config: dict[str, str] = field(default_factory=dict)


class FlinkSession:
    """One session cluster's run directory, and the processes started from it."""

    def __init__(self, run_dir: Path | str | None = None) -> None:
        self.dir = Path(run_dir or default_dir()).resolve()
        self.conf = self.dir / "conf"
        self.logs = self.dir / "logs"
        self.pids = self.dir / "pids"
        self.checkpoints = self.dir / "checkpoints"
        self.state_file = self.dir / "session.json"

    # ---------------------------------------------------------------- state and config
    def settings(self) -> Settings:
        if not self.state_file.is_file():
            raise SessionError(f"no session in {self.dir} (run `start` first)")
        return Settings(**json.loads(self.state_file.read_text()))

    @property
    def rest_url(self) -> str:
        return f"http://{HOST}:{self.settings().rest_port}"

    def config(self, s: Settings) -> dict[str, str]:
        tmp = self.dir / "tmp"
        cfg = {
            # Every listener on loopback: the advertised addresses and the bind hosts.
            "jobmanager.rpc.address": HOST,
            "jobmanager.bind-host": HOST,
            "jobmanager.rpc.port": str(s.rpc_port),
            "taskmanager.host": HOST,
            "taskmanager.bind-host": HOST,
            "rest.address": HOST,
            "rest.bind-address": HOST,
            "rest.port": str(s.rest_port),
            "blob.server.port": str(s.blob_port),
            "jobmanager.memory.process.size": s.jm_memory,
            "taskmanager.memory.process.size": s.tm_memory,
            "taskmanager.numberOfTaskSlots": str(s.slots),
            "parallelism.default": str(s.slots),
            # A lost TaskManager is noticed in seconds, not Flink's default 50 s.
            # Plain milliseconds: Flink 1.19 reads these two as longs (2.x as durations).
            "heartbeat.interval": str(s.heartbeat_interval_ms),
            "heartbeat.timeout": str(s.heartbeat_timeout_ms),
            # Jobs restart from their last checkpoint after a failure (e.g. a lost TM).
            "restart-strategy.type": "fixed-delay",
            "restart-strategy.fixed-delay.attempts": str(s.restart_attempts),
            "restart-strategy.fixed-delay.delay": f"{s.restart_delay_ms} ms",
            "jobmanager.execution.failover-strategy": "region",
            # Flink 1.19's keys (2.x renamed them to execution.checkpointing.*).
            "state.checkpoints.dir": self.checkpoints.as_uri(),
            "state.savepoints.dir": (self.dir / "savepoints").as_uri(),
            "execution.checkpointing.externalized-checkpoint-retention":
                "RETAIN_ON_CANCELLATION",
            # Nothing outside the run directory: temp files, blobs, uploaded jars.
            "io.tmp.dirs": str(tmp),
            "web.tmpdir": str(tmp / "web"),
            "blob.storage.directory": str(tmp / "blobs"),
            "web.upload.dir": str(tmp / "web-upload"),
            "env.java.opts.all": JAVA17_OPTS,
        }
        cfg.update(s.extra_config)
        return cfg

    def write_config(self, s: Settings) -> None:
        for d in (self.conf, self.logs, self.pids, self.checkpoints, self.dir / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        # Flat keys are valid in config.yaml (read since Flink 1.19); JSON strings are valid YAML.
        lines = ["# Written by runners/flink_session.py; every socket on 127.0.0.1."]
        lines += [f"{key}: {json.dumps(value)}" for key, value in self.config(s).items()]
        (self.conf / "config.yaml").write_text("\n".join(lines) + "\n")
        (self.conf / "log4j.properties").write_text(LOG4J)
        self.state_file.write_text(json.dumps(asdict(s), indent=2) + "\n")

    # ---------------------------------------------------------------- processes
    def _classpath(self, s: Settings) -> str:
        return str(Path(s.flink_home) / "lib" / "*")

    def _resource_params(self, s: Settings, kind: str) -> tuple[list[str], list[str]]:
        """The JVM and -D args Flink's BashJavaUtils derives from the memory config."""
        cache = self.conf / f"{kind}-params.json"
        if cache.is_file():
            jvm, dyn = json.loads(cache.read_text())
            return jvm, dyn
        command = "GET_TM_RESOURCE_PARAMS" if kind == "tm" else "GET_JM_RESOURCE_PARAMS"
        cp = self._classpath(s) + os.pathsep + str(Path(s.flink_home) / "bash-java-utils.jar")
        proc = subprocess.run([java_binary(), "-Xmx128m", "-cp", cp, BASH_JAVA_UTILS, command,
                               "--configDir", str(self.conf)],
                              capture_output=True, text=True, timeout=120)
        prefix = "BASH_JAVA_UTILS_EXEC_RESULT:"
        results = [line[len(prefix):] for line in proc.stdout.splitlines()
                   if line.startswith(prefix)]
        if proc.returncode != 0 or len(results) < 2:
            raise SessionError(f"BashJavaUtils {command} failed: {proc.stdout[-2000:]}"
                               f"{proc.stderr[-2000:]}")
        jvm, dyn = shlex.split(results[0]), shlex.split(results[1])
        cache.write_text(json.dumps([jvm, dyn]))
        return jvm, dyn

    def _spawn(self, name: str, command: list[str]) -> int:
        out = open(self.logs / f"{name}.out", "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=self.dir,
                                    start_new_session=True, close_fds=True)
        finally:
            out.close()
        # The start time (clock ticks since boot) tells this process from a later one that
        # reuses its PID: stop/kill never signal a process they did not start.
        (self.pids / f"{name}.pid").write_text(f"{proc.pid} {_start_ticks(proc.pid)}\n")
        return proc.pid

    def _java_command(self, s: Settings, name: str, jvm: list[str], main: str,
                      args: list[str]) -> list[str]:
        return [java_binary(), *jvm, *JAVA17_OPTS.split(),
                f"-Dlog.file={self.logs / (name + '.log')}",
                f"-Dlog4j.configurationFile=file:{self.conf / 'log4j.properties'}",
                "-cp", self._classpath(s), main, "--configDir", str(self.conf), *args]

    def start_jobmanager(self, s: Settings) -> int:
        jvm, dyn = self._resource_params(s, "jm")
        return self._spawn("jobmanager", self._java_command(s, "jobmanager", jvm, JM_CLASS,
                                                            dyn))

    def start_taskmanager(self, n: int, wait_s: float = 60.0) -> float:
        """Start TaskManager ``n`` (1-based); wait until REST lists it; return seconds."""
        s = self.settings()
        name = f"taskmanager-{n}"
        if self.pid_alive(name):
            raise SessionError(f"{name} is already running (pid {self.pid(name)})")
        before = self.taskmanager_count()
        started = time.monotonic()
        jvm, dyn = self._resource_params(s, "tm")
        self._spawn(name, self._java_command(s, name, jvm, TM_CLASS,
                                             [*dyn, "-D", f"taskmanager.resource-id={name}"]))
        if wait_s:
            self.wait_for_taskmanagers(before + 1, wait_s, watch=[name])
        return time.monotonic() - started

    def start_worker_pool(self, s: Settings) -> int:
        return self._spawn("worker-pool", [
            sys.executable, "-m", "runners.flink_worker_pool", "--host", HOST,
            "--port", str(s.worker_pool_port), "--dir", str(self.dir)])

    def pid(self, name: str) -> int | None:
        path = self.pids / f"{name}.pid"
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _started(self, pid: int) -> int | None:
        """The start time recorded for ``pid`` in its pid file."""
        for path in self.pids.glob("*.pid"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = path.read_text().split()
                if int(fields[0]) == pid:
                    return int(fields[1])
        return None

    def _ours(self, pid: int) -> bool:
        """Is ``pid`` alive and the very process this session started? (PIDs get reused;
        the start time in the pid file must match /proc's.)"""
        stat = _stat(pid)
        return stat is not None and stat[0] != "Z" and stat[1] == self._started(pid)

    def pid_alive(self, name: str) -> bool:
        pid = self.pid(name)
        return pid is not None and self._ours(pid)

    def process_names(self) -> list[str]:
        return sorted(p.stem for p in self.pids.glob("*.pid")) if self.pids.is_dir() else []

    def running(self) -> dict[str, int]:
        """Name -> PID of every process of this session that is alive."""
        out = {}
        for name in self.process_names():
            pid = self.pid(name)
            if pid is not None and self._ours(pid):
                out[name] = pid
        return out

    def _terminate(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 15.0
                   ) -> None:
        pid = self.pid(name)
        if pid is None or not self._ours(pid):
            (self.pids / f"{name}.pid").unlink(missing_ok=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while self._ours(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if self._ours(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while self._ours(pid):
                _reap(pid)
                time.sleep(0.05)
        (self.pids / f"{name}.pid").unlink(missing_ok=True)

    # ---------------------------------------------------------------- REST
    def rest(self, path: str, timeout_s: float = 5.0) -> Any:
        return rest_get(self.rest_url, path, timeout_s)

    def taskmanager_count(self) -> int:
        try:
            return int(self.rest("/overview")["taskmanagers"])
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return 0

    def jobs(self) -> list[dict[str, Any]]:
        """REST /jobs/overview: every job's id (``jid``), ``name`` and ``state``."""
        return list(self.rest("/jobs/overview")["jobs"])

    def job_checkpoints(self, job_id: str) -> dict[str, Any]:
        """REST /jobs/:id/checkpoints: ``counts`` (completed, failed, restored, ...),
        ``latest`` (completed, restored: the checkpoint a restart resumed from)."""
        return dict(self.rest(f"/jobs/{job_id}/checkpoints"))

    def cancel_job(self, job_id: str) -> None:
        """Cancel a job through REST (PATCH /jobs/:id?mode=cancel). Cancelling Beam's
        job (``result.cancel()``) stops the job server's side, not a job it submitted to
        a session cluster."""
        request = urllib.request.Request(f"{self.rest_url}/jobs/{job_id}?mode=cancel",
                                         method="PATCH")
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()

    def beam_metrics(self, job_id: str) -> Any:
        """The Beam metrics of a job as it runs (see ``beam_metrics_at``)."""
        return beam_metrics_at(self.rest_url, job_id)

    def wait_for_taskmanagers(self, count: int, timeout_s: float,
                              watch: Iterable[str] = ()) -> dict[str, Any]:
        """Poll REST /overview until it lists ``count`` TaskManagers and their slots.

        A TaskManager registers first and reports its slots right after, so both are
        waited for: "2 TaskManagers" alone can still mean 2 of 4 slots."""
        slots = count * self.settings().slots
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] | str = "no answer"
        while time.monotonic() < deadline:
            for name in ("jobmanager", *watch):
                if not self.pid_alive(name):
                    raise SessionError(f"{name} exited; see {self.logs / name}.log and .out")
            try:
                overview = self.rest("/overview")
                last = overview
                if (overview.get("taskmanagers"), overview.get("slots-total")) == (count,
                                                                                  slots):
                    return overview
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.2)
        raise SessionError(f"REST /overview did not show {count} TaskManagers in "
                           f"{timeout_s:.0f} s (last: {last}); logs in {self.logs}")

    # ---------------------------------------------------------------- commands
    def start(self, settings: Settings | None = None, timeout_s: float = 90.0) -> float:
        """Start the JobManager, the TaskManagers and the worker pool; return seconds."""
        if self.running():
            raise SessionError(f"a session is already running in {self.dir}: "
                               f"{self.running()} (run `stop` first)")
        started = time.monotonic()
        s = settings or Settings()
        s.flink_home = s.flink_home or str(fetch_flink())
        java_binary()
        s.rest_port = s.rest_port or free_port()
        s.rpc_port = s.rpc_port or free_port()
        s.blob_port = s.blob_port or free_port()
        s.worker_pool_port = s.worker_pool_port or free_port()
        for cached in self.conf.glob("*-params.json"):
            cached.unlink()  # sizes may have changed since the last start
        self.write_config(s)
        try:
            # The pool and the JobManager start while BashJavaUtils sizes the TaskManagers.
            self.start_worker_pool(s)
            self.start_jobmanager(s)
            for n in range(1, s.taskmanagers + 1):
                self.start_taskmanager(n, wait_s=0)
            self.wait_for_taskmanagers(s.taskmanagers, timeout_s,
                                       watch=[f"taskmanager-{n}"
                                              for n in range(1, s.taskmanagers + 1)])
            wait_for_port(HOST, s.worker_pool_port, 30, lambda: self.pid_alive("worker-pool"))
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - started

    def stop(self, timeout_s: float = 15.0) -> list[str]:
        """Stop every process of the session by PID (TERM, KILL after ``timeout_s``)."""
        names = self.process_names()
        # TaskManagers first (they would otherwise try to reconnect), then the rest.
        order = sorted(names, key=lambda n: (not n.startswith("taskmanager"), n))
        for name in order:
            self._terminate(name, signal.SIGTERM, timeout_s)
        return order

    def kill_taskmanager(self, n: int, sig: int = signal.SIGKILL, wait_s: float = 60.0
                         ) -> float:
        """Kill TaskManager ``n`` by PID; return seconds until REST no longer lists it."""
        name = f"taskmanager-{n}"
        if not self.pid_alive(name):
            raise SessionError(f"{name} is not running")
        before = self.taskmanager_count()
        started = time.monotonic()
        self._terminate(name, sig, timeout_s=15.0)
        if wait_s:
            self.wait_for_taskmanagers(before - 1, wait_s)
        return time.monotonic() - started

    def status(self) -> dict[str, Any]:
        s = self.settings()
        out: dict[str, Any] = {"dir": str(self.dir), "rest": self.rest_url,
                               "processes": self.running(),
                               "listening": listening_sockets(self.running().values())}
        try:
            out["overview"] = self.rest("/overview")
            out["taskmanagers"] = [
                {k: tm.get(k) for k in ("id", "slotsNumber", "freeSlots")}
                for tm in self.rest("/taskmanagers")["taskmanagers"]]
            out["jobs"] = self.rest("/jobs/overview")["jobs"]
        except (urllib.error.URLError, OSError, ValueError) as exc:
            out["rest_error"] = str(exc)
        out["worker_pool"] = f"{HOST}:{s.worker_pool_port}"
        return out

    def submit_args(self, **overrides: object) -> list[str]:
        """FlinkRunner args that submit a pipeline to this cluster (see runners.flink)."""
        from runners import flink

        s = self.settings()
        options: dict[str, object] = {
            "flink_master": f"{HOST}:{s.rest_port}",
            "environment_type": "EXTERNAL",
            "environment_config": f"{HOST}:{s.worker_pool_port}",
            "flink_job_server_jar": str(flink.job_server_jar_path()),
            "parallelism": s.taskmanagers * s.slots,
            # Checkpoint often so a lost TaskManager replays little; the run dir keeps them.
            "checkpointing_interval": 10_000,
            "min_pause_between_checkpoints": 5_000,
            "state_backend_storage_path": self.checkpoints.as_uri(),
            "streaming": True,
        }
        options.update(overrides)
        return flink.preset_args(**options)


def rest_get(rest_url: str, path: str, timeout_s: float = 5.0) -> Any:
    with urllib.request.urlopen(rest_url + path, timeout=timeout_s) as resp:
        return json.load(resp)


def beam_metrics_at(rest_url: str, job_id: str) -> Any:
    """The Beam metrics of a job on the Flink cluster at ``rest_url`` as it runs (a
    MetricResults, attempted values), from the accumulator Beam's Flink runner keeps them
    in; None before the first report.

    Beam's job service answers GetJobMetrics only for a finished job, so this is how
    a streaming job's counters are read while it runs. The values are those of the
    current execution attempt: a job restarted from a checkpoint counts from zero."""
    from apache_beam.portability.api import beam_job_api_pb2
    from apache_beam.runners.portability.portable_runner import PortableMetrics
    from google.protobuf import json_format

    accumulators = rest_get(rest_url, f"/jobs/{job_id}/accumulators")
    for item in accumulators.get("user-task-accumulators", []):
        if item.get("name") == BEAM_METRICS_ACCUMULATOR:
            response = json_format.Parse(item["value"],
                                         beam_job_api_pb2.GetJobMetricsResponse(),
                                         ignore_unknown_fields=True)
            return PortableMetrics(response)
    return None


def running_beam_metrics(rest_url: str) -> Any:
    """The Beam metrics of the one RUNNING job on the cluster at ``rest_url``."""
    running = [j["jid"] for j in rest_get(rest_url, "/jobs/overview")["jobs"]
               if j["state"] == "RUNNING"]
    if len(running) != 1:
        raise RuntimeError(f"{len(running)} running jobs on {rest_url}; expected one")
    metrics = beam_metrics_at(rest_url, running[0])
    if metrics is None:
        raise RuntimeError("the running job has reported no Beam metrics yet")
    return metrics


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of ``pid`` from /proc, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)


def _start_ticks(pid: int) -> int:
    stat = _stat(pid)
    return stat[1] if stat else -1


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our child (in tests it is), so it does not stay a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def wait_for_port(host: str, port: int, timeout_s: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise SessionError(f"the process for {host}:{port} exited")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SessionError(f"nothing answered on {host}:{port} in {timeout_s:.0f} s")


def _decode_address(hex_addr: str) -> str:
    ip_hex, port_hex = hex_addr.split(":")
    port = int(port_hex, 16)
    raw = bytes.fromhex(ip_hex)
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{port}"
    # /proc/net/tcp6 stores the address as four little-endian 32-bit words.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{port}"


def listening_sockets(pids: Iterable[int]) -> dict[int, list[str]]:
    """PID -> the TCP addresses it listens on, from /proc (no ss needed)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes[target[8:-1]] = pid
    out: dict[int, list[str]] = {pid: [] for pid in set(inodes.values())}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    out[inodes[fields[9]]].append(_decode_address(fields[1]))
    return out


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.flink_session",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None,
                        help=f"run directory (default {default_dir()})")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="JobManager, TaskManagers, worker pool")
    start.add_argument("--taskmanagers", type=int, default=Settings.taskmanagers)
    start.add_argument("--slots", type=int, default=Settings.slots)
    start.add_argument("--jm-memory", default=Settings.jm_memory)
    start.add_argument("--tm-memory", default=Settings.tm_memory)
    start.add_argument("--rest-port", type=int, default=0, help="0: a free port")
    start.add_argument("--worker-pool-port", type=int, default=0, help="0: a free port")
    start.add_argument("--heartbeat-timeout-ms", type=int,
                       default=Settings.heartbeat_timeout_ms)
    start.add_argument("--timeout", type=float, default=90.0)
    start.add_argument("-D", dest="extra", action="append", default=[],
                       metavar="KEY=VALUE", help="extra Flink config (repeatable)")
    sub.add_parser("status", help="REST /overview, /taskmanagers, /jobs/overview")
    sub.add_parser("submit-args", help="the FlinkRunner args for this cluster")
    sub.add_parser("stop", help="stop every process by PID")
    kill = sub.add_parser("kill-taskmanager", help="kill TaskManager N by PID (SIGKILL)")
    kill.add_argument("n", type=int)
    kill.add_argument("--signal", default="KILL", choices=["KILL", "TERM"])
    again = sub.add_parser("start-taskmanager", help="start TaskManager N again")
    again.add_argument("n", type=int)
    args = parser.parse_args(argv)
    session = FlinkSession(args.dir)
    try:
        if args.command == "start":
            extra = dict(item.split("=", 1) for item in args.extra)
            seconds = session.start(Settings(
                taskmanagers=args.taskmanagers, slots=args.slots, jm_memory=args.jm_memory,
                tm_memory=args.tm_memory, rest_port=args.rest_port,
                worker_pool_port=args.worker_pool_port,
                heartbeat_timeout_ms=args.heartbeat_timeout_ms, extra_config=extra),
                timeout_s=args.timeout)
            s = session.settings()
            print(f"Flink {FLINK_VERSION} session up in {seconds:.1f} s: "
                  f"{s.taskmanagers} TaskManagers x {s.slots} slots, REST {session.rest_url}, "
                  f"worker pool {HOST}:{s.worker_pool_port}, run dir {session.dir}")
            print("processes:", json.dumps(session.running()))
            print("submit a pipeline with these FlinkRunner args:")
            print("  " + " ".join(shlex.quote(a) for a in session.submit_args()))
            _warn_missing_jar()
        elif args.command == "status":
            print(json.dumps(session.status(), indent=2))
        elif args.command == "submit-args":
            print(" ".join(shlex.quote(a) for a in session.submit_args()))
            _warn_missing_jar()
        elif args.command == "stop":
            stopped = session.stop()
            print(f"stopped {', '.join(stopped) or 'nothing'}; still running: "
                  f"{session.running() or 'nothing'}")
        elif args.command == "kill-taskmanager":
            sig = signal.SIGKILL if args.signal == "KILL" else signal.SIGTERM
            seconds = session.kill_taskmanager(args.n, sig)
            print(f"taskmanager-{args.n} killed ({args.signal}); REST shows "
                  f"{session.taskmanager_count()} TaskManagers {seconds:.1f} s later")
        elif args.command == "start-taskmanager":
            seconds = session.start_taskmanager(args.n)
            print(f"taskmanager-{args.n} registered in {seconds:.1f} s; REST shows "
                  f"{session.taskmanager_count()} TaskManagers")
    except SessionError as exc:
        print(f"flink_session: {exc}", file=sys.stderr)
        return 1
    return 0


def _warn_missing_jar() -> None:
    from runners import flink

    jar = flink.job_server_jar_path()
    if not jar.is_file():
        print(f"note: {jar} is missing: fetch it with scripts/fetch_flink_jobserver "
              f"({flink.job_server_artifact()}) before submitting", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
