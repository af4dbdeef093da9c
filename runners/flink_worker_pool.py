"""A Beam Python worker pool for ``--environment_type=EXTERNAL``, bound to one address.

Beam's own ``python -m apache_beam.runners.worker.worker_pool_main`` binds ``[::]:port``
(every interface). This launcher serves the same ``BeamFnExternalWorkerPoolServicer``
on a gRPC server bound to ``--host`` only (127.0.0.1 by default), so the Flink
TaskManagers on this machine can start SDK harnesses and nothing outside can.

    python -m runners.flink_worker_pool --port 50000 [--host 127.0.0.1] [--threads]

Each StartWorker request from a TaskManager starts one SDK harness: a ``python``
subprocess by default (parallel, no shared GIL), or a thread with ``--threads``. The
subprocesses run this interpreter (its directory goes first on PATH, Beam spawns
``python``), so they import the pipeline from the same virtualenv. SIGTERM or SIGINT
stops the server and the harnesses it started. ``--dir`` is only recorded in the
command line (so `pgrep -af DIR` finds every process of one session).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

import grpc
from apache_beam.portability.api import beam_fn_api_pb2_grpc
from apache_beam.runners.worker.worker_pool_main import (
    BeamFnExternalWorkerPoolServicer,
    kill_process_gracefully,
)
from apache_beam.utils import thread_pool_executor

log = logging.getLogger("flink_worker_pool")


def serve(host: str, port: int, use_process: bool = True, state_cache_size: int = 0,
          data_buffer_time_limit_ms: int = 0) -> tuple[grpc.Server,
                                                      BeamFnExternalWorkerPoolServicer, int]:
    """Start the worker pool on ``host:port`` (0: any free port); return it and the port."""
    # Same keep-alive options as Beam's worker_pool_main: the runner may ping an idle pool.
    server = grpc.server(thread_pool_executor.shared_unbounded_instance(),
                         options=[("grpc.http2.max_pings_without_data", 0),
                                  ("grpc.http2.max_ping_strikes", 0)])
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"worker pool: cannot bind {host}:{port}")
    servicer = BeamFnExternalWorkerPoolServicer(
        use_process=use_process, state_cache_size=state_cache_size,
        data_buffer_time_limit_ms=data_buffer_time_limit_ms)
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(servicer, server)
    server.start()
    return server, servicer, bound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.flink_worker_pool")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50000)
    parser.add_argument("--threads", action="store_true",
                        help="run SDK harnesses as threads of this process")
    # Beam's worker_pool_main defaults: no cross-bundle state cache, no buffer time limit.
    parser.add_argument("--state_cache_size", type=int, default=0)
    parser.add_argument("--data_buffer_time_limit_ms", type=int, default=0)
    parser.add_argument("--dir", default="", help="session run directory (recorded only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Beam spawns harnesses as plain `python`: make that this interpreter.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get(
        "PATH", "")
    server, servicer, port = serve(args.host, args.port, not args.threads,
                                   args.state_cache_size, args.data_buffer_time_limit_ms)
    log.info("worker pool listening on %s:%d (pid %d)", args.host, port, os.getpid())
    stopped = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping the worker pool", signum)
        stopped.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stopped.wait(1.0):
        pass
    server.stop(grace=2).wait()
    for proc in list(servicer._worker_processes.values()):
        kill_process_gracefully(proc, timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
