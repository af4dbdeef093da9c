"""FlinkRunner preset: self-hosted scale-out.

``--flink_master=[local]`` runs an embedded Flink inside Beam's Flink job server (a
Java process started by the Python FlinkRunner); ``host:8081`` submits to a Flink
session cluster. The job server jar comes from scripts/fetch_flink_jobserver: Beam's
published jar where the registry serves it, else the one the job server kit builds (Beam
2.70.0's Java side, Flink 1.19.0); either is found here, so no user types a jar path.

Checkpointing and state-backend options belong to Beam's *Java* FlinkPipelineOptions.
The Python FlinkRunner (job-server mode) drops options it does not know, so this
module declares them as a Python ``PipelineOptions`` subclass: once this module is
imported they are parsed and shipped to the job server, which maps
``checkpointing_interval`` to ``checkpointingInterval`` and so on.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
from pathlib import Path

from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.version import __version__ as BEAM_VERSION

from runners import RUNNER_NAMES, OptionValue, render_args
from runners.flink_session import JAVA17_OPTS

CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache"
JAR_DIR = CACHE_DIR / "jars"
# Where a streaming run on this machine keeps its checkpoints unless told otherwise.
CHECKPOINT_DIR = CACHE_DIR / "flink-checkpoints"
# Where scripts/fetch_flink_jobserver has ../shared/flink-jobserver build the jar.
KIT_JAR_DIR = CACHE_DIR / "flink-jobserver"
# The Flink the job server embeds and the session cluster runs (runners/flink_session.py
# pins its patch release). 1.19 is in Beam 2.77's published list (1.19 ... 2.2) and the
# only Flink the kit's job server is built for; Beam's own default (2.2) would not match.
DEFAULT_FLINK_VERSION = "1.19"
# Names the temporary directory each process gives the job servers it starts, with the
# process id after it: java.io.tmpdir of the embedded ([local]) Flink.
JOB_SERVER_TMP_PREFIX = "clickstream-flink-jobserver-"


class FlinkCheckpointOptions(PipelineOptions):
    """Java FlinkPipelineOptions that Beam's Python SDK does not declare itself."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--checkpointing_interval",
            type=int,
            default=None,
            help="Milliseconds between Flink checkpoints (unset: no checkpoints).",
        )
        parser.add_argument(
            "--checkpointing_mode",
            default=None,
            choices=["EXACTLY_ONCE", "AT_LEAST_ONCE"],
            help="Flink checkpointing guarantee.",
        )
        parser.add_argument(
            "--min_pause_between_checkpoints",
            type=int,
            default=None,
            help="Minimal pause in ms between the end of one checkpoint and the next.",
        )
        parser.add_argument(
            "--checkpoint_timeout_millis",
            type=int,
            default=None,
            help="A checkpoint taking longer than this is discarded.",
        )
        parser.add_argument(
            "--state_backend",
            default=None,
            choices=["rocksdb", "hashmap", "filesystem"],
            help="Flink state backend for Beam state and timers.",
        )
        parser.add_argument(
            "--state_backend_storage_path",
            default=None,
            help="Checkpoint directory URI (file://, hdfs://, gs://, s3://).",
        )
        parser.add_argument(
            "--externalized_checkpoints_enabled",
            action="store_true",
            default=None,
            help="Keep completed checkpoints outside the job so it can be restored.",
        )
        parser.add_argument(
            "--retain_externalized_checkpoints_on_cancellation",
            action="store_true",
            default=None,
            help="Do not delete externalized checkpoints on cancel.",
        )
        parser.add_argument(
            "--savepoint_path",
            default=None,
            help="Start the job from this savepoint (or retained checkpoint): its state "
                 "and source positions. Undeclared, the Python FlinkRunner drops it and "
                 "the job starts empty.",
        )
        parser.add_argument(
            "--allow_non_restored_state",
            action="store_true",
            default=None,
            help="Start from a savepoint that holds state for steps no longer in the "
                 "graph (that state is discarded).",
        )
        parser.add_argument(
            "--finish_bundle_before_checkpointing",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="Finish each open bundle before the checkpoint barrier (Java default: "
                 "off; streaming runs here default it on). Off, a bundle finished inside "
                 "the snapshot has its outputs buffered while the operator may already "
                 "send a newer watermark downstream, so those outputs arrive late "
                 "(docs/flink.md, finding 7).",
        )
        parser.add_argument(
            "--max_bundle_size",
            type=int,
            default=None,
            help="Elements per bundle the runner hands the Python SDK harness (Beam Java "
                 "default: 1000).",
        )
        parser.add_argument(
            # Java's option is maxBundleTimeMills (sic): Beam maps this name onto it.
            "--max_bundle_time_mills",
            type=int,
            default=None,
            help="Milliseconds after which a bundle is closed (Java default: 1000).",
        )
        parser.add_argument(
            "--number_of_execution_retries",
            type=int,
            default=None,
            help="Task restarts before the job fails (-1: Flink's configured default).",
        )


_job_server_tmpdir: Path | None = None


def job_server_tmpdir() -> Path:
    """This process's temporary directory for the Flink job servers it starts, removed
    when the process exits (and, if it was killed, by the next process that asks).

    The embedded Flink of a ``[local]`` job server puts a ``minicluster_*`` working
    directory, RocksDB's local databases included, in java.io.tmpdir, and Beam stops the
    job server in a way that leaves it there: a test suite that runs Flink jobs filled
    the disk (docs/flink.md, finding 12). Beam registers the job server's own stop at
    exit after this, so it runs first."""
    global _job_server_tmpdir
    if _job_server_tmpdir is None:
        root = Path(tempfile.gettempdir())
        remove_orphaned_job_server_tmpdirs(root)
        _job_server_tmpdir = Path(tempfile.mkdtemp(
            prefix=f"{JOB_SERVER_TMP_PREFIX}{os.getpid()}-", dir=root))
        atexit.register(shutil.rmtree, _job_server_tmpdir, True)
    return _job_server_tmpdir


def remove_orphaned_job_server_tmpdirs(root: Path) -> list[Path]:
    """Remove the job server temporary directories whose process is gone; return them."""
    removed = []
    for path in root.glob(f"{JOB_SERVER_TMP_PREFIX}*"):
        pid = path.name[len(JOB_SERVER_TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def use_job_server_tmpdir(options: PipelineOptions) -> None:
    """Point the java.io.tmpdir of the job server Beam starts for a FlinkRunner run at
    ``job_server_tmpdir()``, unless the run names one or uses a running job server.
    Other runners' options are left as they are."""
    from apache_beam.options.pipeline_options import (
        JobServerOptions,
        PortableOptions,
        StandardOptions,
    )

    runner = str(options.view_as(StandardOptions).runner or "")
    if RUNNER_NAMES.get(runner.strip().lower()) != "flink":
        return
    if options.view_as(PortableOptions).job_endpoint:
        return
    jvm = options.view_as(JobServerOptions)
    properties = list(jvm.job_server_jvm_properties or [])
    if not any(p.startswith("-Djava.io.tmpdir=") for p in properties):
        jvm.job_server_jvm_properties = [
            *properties, f"-Djava.io.tmpdir={job_server_tmpdir()}"]


def job_server_jar(flink_version: str = DEFAULT_FLINK_VERSION) -> Path:
    """Where scripts/fetch_flink_jobserver caches Beam's published job server jar."""
    return JAR_DIR / f"beam-runners-flink-{flink_version}-job-server-{BEAM_VERSION}.jar"


def kit_job_server_jar(flink_version: str = DEFAULT_FLINK_VERSION) -> Path | None:
    """The job server jar the kit built (with its Kafka and RocksDB extras), if any."""
    built = sorted(KIT_JAR_DIR.glob(
        f"beam-runners-flink-{flink_version}-job-server-*-kit-kafka-rocksdb.jar"))
    return built[-1] if built else None


def job_server_jar_path(flink_version: str | None = None) -> Path:
    """The job server jar to use: $FLINK_JOB_SERVER_JAR, else Beam's published jar if
    cached, else the kit-built one; when neither is there, the published jar's path."""
    env = os.environ.get("FLINK_JOB_SERVER_JAR")
    if env:
        return Path(env)
    version = flink_version or os.environ.get("FLINK_VERSION") or DEFAULT_FLINK_VERSION
    published = job_server_jar(version)
    if published.is_file():
        return published
    return kit_job_server_jar(version) or published


def job_server_artifact(flink_version: str = DEFAULT_FLINK_VERSION) -> str:
    """Maven coordinates of the job server jar for this Beam and Flink version."""
    return f"org.apache.beam:beam-runners-flink-{flink_version}-job-server:{BEAM_VERSION}"


class JobServerJarMissing(RuntimeError):
    """FlinkRunner was asked for, and Beam's Flink job server jar is not here."""


def resolve_job_server_jar(argv: list[str]) -> list[str]:
    """Check a FlinkRunner command line before Beam sees it; return the argv to use.

    Beam's FlinkRunner, given no ``--flink_job_server_jar``, downloads the jar from
    Maven Central at run time (and fails late, with a 404 or a network error, where that
    is unreachable). Here: another runner, ``--job_endpoint`` (a job server already
    running) or an existing/URL jar pass unchanged; no jar but a cached one adds
    ``--flink_job_server_jar=<cache>``; no jar at all raises JobServerJarMissing naming
    the artifact and scripts/fetch_flink_jobserver.
    """
    from apache_beam.options.pipeline_options import (
        FlinkRunnerOptions,
        JobServerOptions,
        PortableOptions,
        StandardOptions,
    )

    options = PipelineOptions(list(argv))
    runner = str(options.view_as(StandardOptions).runner or "")
    if RUNNER_NAMES.get(runner.strip().lower()) != "flink":
        return list(argv)
    if options.view_as(PortableOptions).job_endpoint:
        return list(argv)
    flink = options.view_as(FlinkRunnerOptions)
    argv = list(argv)
    if not any(a == "--flink_version" or a.startswith("--flink_version=") for a in argv):
        argv.append(f"--flink_version={DEFAULT_FLINK_VERSION}")
        flink.flink_version = DEFAULT_FLINK_VERSION
    version = str(flink.flink_version)
    given = flink.flink_job_server_jar
    if not options.view_as(JobServerOptions).job_server_jvm_properties:
        # The job server started here hosts the [local] cluster: it needs the JVM options
        # a Flink cluster runs with on Java 17 (stable input's buffer is serialized by
        # Kryo, which reflects into java.util).
        argv += [f"--job_server_jvm_properties={opt}" for opt in JAVA17_OPTS.split()]
    if given and ("://" in given or Path(given).is_file()):
        return argv
    cached = job_server_jar_path(version)
    if not given and cached.is_file():
        return [*argv, f"--flink_job_server_jar={cached}"]
    where = f"--flink_job_server_jar={given} does not exist" if given else (
        f"it is not in {cached}")
    raise JobServerJarMissing(
        f"FlinkRunner needs Beam's Flink job server jar {job_server_artifact(version)} and "
        f"{where}. Fetch it with `FLINK_VERSION={version} scripts/fetch_flink_jobserver` "
        "(Maven, else the job server kit; prints the jar's path), or pass "
        "--flink_job_server_jar=PATH, or --job_endpoint=HOST:PORT of a running Flink job "
        "server. (Without it Beam would try to download the jar from Maven Central at run "
        "time.)")


def preset_args(**overrides: object) -> list[str]:
    """Flink runner args; see ``runners.preset_args`` for override rules."""
    flink_version = str(
        overrides.get("flink_version")
        or os.environ.get("FLINK_VERSION")
        or DEFAULT_FLINK_VERSION
    )
    jar = str(job_server_jar_path(flink_version))
    checkpoint_dir = CHECKPOINT_DIR
    defaults: dict[str, OptionValue] = {
        "runner": "FlinkRunner",
        # [local]: embedded Flink in the job server; give host:port for a session cluster.
        "flink_master": "[local]",
        # Must match the job server jar (each jar embeds one Flink version).
        "flink_version": flink_version,
        # The cached (published or kit-built) jar; None lets Beam try to download it.
        "flink_job_server_jar": jar if Path(jar).is_file() else None,
        # Default operator parallelism; size to total task slots of the cluster.
        "parallelism": os.cpu_count() or 1,
        # Fixed number of key groups: keyed state (dedup, windows) can be rescaled from a
        # savepoint up to this parallelism, and never beyond.
        "max_parallelism": 128,
        # Checkpoint every 60 s: bounds replay after a failure; sinks see data per checkpoint.
        "checkpointing_interval": 60_000,
        # Exactly-once state snapshots (barrier alignment), the design counts events once.
        "checkpointing_mode": "EXACTLY_ONCE",
        # Leave processing time between checkpoints under backpressure.
        "min_pause_between_checkpoints": 30_000,
        # Outputs of a bundle finished inside a snapshot can trail the watermark: finish
        # bundles before the barrier instead (docs/flink.md, finding 7).
        "finish_bundle_before_checkpointing": True,
        # RocksDB keeps 3 days of lateness state for ~1e9 events/day off the JVM heap.
        "state_backend": "rocksdb",
        # Checkpoint storage; use a durable shared URI (hdfs://, gs://, s3://) on a cluster.
        "state_backend_storage_path": checkpoint_dir.as_uri(),
        # Keep checkpoints after cancel so a redeploy can resume from them.
        "externalized_checkpoints_enabled": True,
        "retain_externalized_checkpoints_on_cancellation": True,
        # LOOPBACK runs the Python SDK harness in the launching process: right for [local];
        # on a cluster use PROCESS (SDK installed on TaskManagers) or DOCKER.
        "environment_type": "LOOPBACK",
    }
    return render_args(defaults, overrides)
