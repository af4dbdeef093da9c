"""Start and stop the real local servers the tests talk to.

Each helper is a context manager that starts one server on a free 127.0.0.1 port, waits
until it answers, yields its ``host:port`` and stops it by PID (SIGTERM, then SIGKILL):

- ``bigtable_emulator()``: Google's Bigtable emulator (``cbtemulator``) from the Google
  Cloud CLI's ``platform/`` dir. Clients find it through BIGTABLE_EMULATOR_HOST.
- ``pubsub_emulator()``: Google's Pub/Sub emulator; its launcher script execs java, so the
  PID we hold is java's. Clients find it through PUBSUB_EMULATOR_HOST.
- ``bigquery_server()``: ``local-bigquery`` (PyPI), a server that speaks the BigQuery REST
  API, from its own Python 3.13 virtualenv made by ``scripts/setup_bigquery_server``.

``LocalBigQueryTestClient`` is a picklable object for ``WriteToBigQuery(test_client=...)``
that sends both the apitools table calls and ``insert_rows_json`` to that server.

Environment overrides: CLOUDSDK_ROOT (the Google Cloud CLI's install dir),
BIGQUERY_SERVER_DIR (default ``<repo>/.cache/bigquery-server``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIGQUERY_SERVER_DIR = Path(os.environ.get("BIGQUERY_SERVER_DIR",
                                          REPO / ".cache" / "bigquery-server"))


class ServerError(RuntimeError):
    """A server did not start, or is not installed here."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cloud_sdk_root() -> Path:
    """The Google Cloud CLI's install dir (the one holding ``platform/``)."""
    env = os.environ.get("CLOUDSDK_ROOT")
    if env:
        return Path(env)
    gcloud = shutil.which("gcloud")
    if gcloud:
        root = Path(os.path.realpath(gcloud)).parent.parent
        if (root / "platform").is_dir():
            return root
    for candidate in ("/usr/lib/google-cloud-sdk", "/usr/share/google-cloud-sdk",
                      "/opt/google-cloud-sdk"):
        if (Path(candidate) / "platform").is_dir():
            return Path(candidate)
    raise ServerError("Google Cloud CLI not found (set CLOUDSDK_ROOT)")


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError):
        return False


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop one process by its PID: SIGTERM, wait, then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


@contextlib.contextmanager
def _running(cmd: list, ready, timeout: float, name: str, env: dict | None = None,
             cwd: str | None = None) -> Iterator[subprocess.Popen]:
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read()[-4000:].decode("utf-8", "replace")
                    why = (f"exited with {proc.returncode}" if proc.poll() is not None
                           else f"not ready after {timeout:.0f} s")
                    raise ServerError(f"{name} {why}: {' '.join(map(str, cmd))}\n{tail}")
                time.sleep(0.05)
            yield proc
        finally:
            stop_process(proc)


@contextlib.contextmanager
def bigtable_emulator_process(timeout: float = 30.0
                              ) -> Iterator[tuple[str, subprocess.Popen]]:
    """Google's Bigtable emulator on 127.0.0.1; yields (``host:port``, its process), the
    process for fault tests that pause (SIGSTOP) and resume (SIGCONT) it by PID."""
    binary = cloud_sdk_root() / "platform" / "bigtable-emulator" / "cbtemulator"
    if not binary.exists():
        raise ServerError(f"{binary} not found")
    port = free_port()
    cmd = [str(binary), "-host", "127.0.0.1", "-port", str(port)]
    with _running(cmd, lambda: _tcp_open(port), timeout, "Bigtable emulator") as proc:
        yield f"127.0.0.1:{port}", proc


@contextlib.contextmanager
def bigtable_emulator(timeout: float = 30.0) -> Iterator[str]:
    """Google's Bigtable emulator on 127.0.0.1; yields ``host:port``."""
    with bigtable_emulator_process(timeout) as (address, _):
        yield address


@contextlib.contextmanager
def pubsub_emulator(timeout: float = 60.0) -> Iterator[str]:
    """Google's Pub/Sub emulator on 127.0.0.1; yields ``host:port``."""
    binary = (cloud_sdk_root() / "platform" / "pubsub-emulator" / "bin"
              / "cloud-pubsub-emulator")
    if not binary.exists():
        raise ServerError(f"{binary} not found")
    if not shutil.which("java"):
        raise ServerError("the Pub/Sub emulator needs java on PATH")
    port = free_port()
    cmd = [str(binary), "--host=127.0.0.1", f"--port={port}"]
    # The emulator answers "Ok" on GET / once its gRPC/HTTP server is up.
    with _running(cmd, lambda: _http_ok(f"http://127.0.0.1:{port}/"), timeout,
                  "Pub/Sub emulator"):
        yield f"127.0.0.1:{port}"


_BIGQUERY_SERVER_MAIN = ("import sys; from local_bigquery.cli import main; "
                         "sys.argv[0] = 'local-bigquery'; sys.exit(main())")


def bigquery_server_python() -> Path:
    return BIGQUERY_SERVER_DIR / "venv" / "bin" / "python"


def ensure_bigquery_server_installed() -> None:
    """Run scripts/setup_bigquery_server (idempotent; a no-op once installed)."""
    subprocess.run(["bash", str(REPO / "scripts" / "setup_bigquery_server")],
                   check=True, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def bigquery_server(project: str = "local", timeout: float = 120.0,
                    install: bool = True, data_dir: str | None = None,
                    port: int | None = None) -> Iterator[str]:
    """``local-bigquery`` on 127.0.0.1; yields ``host:port``.

    REST is served under ``http://host:port/bigquery/v2/``. Its DuckDB extensions are
    installed in the venv dir's ``home/`` (HOME is pointed there), never downloaded.
    ``data_dir`` None: a fresh temporary one. Give a ``data_dir`` and ``port`` to restart
    a stopped server with its data (tables live in DuckLake files there) at the same
    address; its insertId memory (best-effort dedup, 60 s) is in-process and is lost.
    """
    if install:
        ensure_bigquery_server_installed()
    python = bigquery_server_python()
    if not python.exists():
        raise ServerError(f"{python} missing: run scripts/setup_bigquery_server")
    port, grpc_port = port or free_port(), free_port()
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="bigquery-data-"))
        os.makedirs(data_dir, exist_ok=True)
        env = dict(os.environ, HOME=str(BIGQUERY_SERVER_DIR / "home"))
        # Through the venv's python, not its console script: the script's shebang names
        # the path the venv was installed through, and .cache/ is shared by worktrees
        # (a symlink), so that path may be another worktree's, since removed.
        cmd = [str(python), "-c", _BIGQUERY_SERVER_MAIN, "serve", "--host", "127.0.0.1",
               "--port", str(port), "--grpc-port", str(grpc_port), "--project", project,
               "--data-dir", data_dir]
        url = f"http://127.0.0.1:{port}/bigquery/v2/projects/{project}/datasets"
        with _running(cmd, lambda: _http_ok(url), timeout, "BigQuery server", env=env,
                      cwd=data_dir):
            yield f"127.0.0.1:{port}"


class LocalBigQueryTestClient:
    """A picklable stand-in for ``WriteToBigQuery(test_client=...)``.

    Beam's ``BigQueryWrapper(client=test_client)`` uses the one object both as its apitools
    ``BigqueryV2`` client (``.tables``, ``.datasets``, ``.jobs``, ``.tabledata``) and as its
    google-cloud-bigquery client (``insert_rows_json``). This object builds both, pointed
    at the local server, lazily in each process, and pickles as just (endpoint, project).
    """

    def __init__(self, endpoint: str, project: str = "local"):
        self.endpoint = endpoint if "://" in endpoint else f"http://{endpoint}"
        self.project = project
        self._apitools = None
        self._cloud = None

    def __getstate__(self):
        return {"endpoint": self.endpoint, "project": self.project}

    def __setstate__(self, state):
        self.__init__(state["endpoint"], state["project"])

    @property
    def apitools(self):
        if self._apitools is None:
            from apache_beam.io.gcp.internal.clients import bigquery as bq_api
            self._apitools = bq_api.BigqueryV2(
                url=f"{self.endpoint}/bigquery/v2/", get_credentials=False,
                credentials=None, response_encoding="utf8")
        return self._apitools

    @property
    def cloud(self):
        if self._cloud is None:
            from google.api_core.client_options import ClientOptions
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import bigquery
            self._cloud = bigquery.Client(
                project=self.project, credentials=AnonymousCredentials(),
                client_options=ClientOptions(api_endpoint=self.endpoint))
        return self._cloud

    def query(self, *args, **kwargs):
        """google-cloud-bigquery's query, for readers given this object as their client."""
        return self.cloud.query(*args, **kwargs)

    # apitools services
    @property
    def tables(self):
        return self.apitools.tables

    @property
    def datasets(self):
        return self.apitools.datasets

    @property
    def jobs(self):
        return self.apitools.jobs

    @property
    def tabledata(self):
        return self.apitools.tabledata

    @property
    def projects(self):
        return self.apitools.projects

    # google-cloud-bigquery calls
    def insert_rows_json(self, *args, **kwargs):
        return self.cloud.insert_rows_json(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.cloud, name)


@contextlib.contextmanager
def kafka_broker(state_dir: str | None = None, timeout: float = 180.0) -> Iterator[str]:
    """One Apache Kafka broker (KRaft, 127.0.0.1, a free port) by ``scripts/kafka``;
    yields its bootstrap ``host:port`` and stops it by PID (``scripts/kafka stop``).
    ``state_dir`` None: a fresh temporary one (data, config, logs, PID file)."""
    script = REPO / "scripts" / "kafka"
    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="kafka-"))
        env = dict(os.environ, KAFKA_STATE_DIR=state_dir)
        try:
            started = subprocess.run([str(script), "start"], env=env, capture_output=True,
                                     text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            subprocess.run([str(script), "stop"], env=env, capture_output=True, timeout=60)
            raise ServerError(f"scripts/kafka start timed out after {timeout:.0f} s") from exc
        stack.callback(subprocess.run, [str(script), "stop"], env=env, capture_output=True,
                       timeout=60)
        if started.returncode != 0:
            raise ServerError(f"scripts/kafka start failed:\n{started.stderr[-3000:]}")
        yield started.stdout.strip().splitlines()[-1]
