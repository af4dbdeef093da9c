"""`clickstream serve`: flags, the store they name, and uvicorn on 127.0.0.1."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Mapping

from pipeline.query import STORES, add_bigquery_arguments
from serving.app import ServeConfig, create_app
from serving.stores import open_store
from serving.uniques import MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="store", default="duckdb", choices=STORES,
                        help="the store to read (default duckdb)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--distinct", default="hll", choices=MODES,
                        help="default mode of range uniques: hll (union of stored daily "
                        "sketches; the job must run with --distinct hll) or exact (from "
                        "--archive_path); a request may ask for the other with ?mode=")
    parser.add_argument("--archive_path", default="",
                        help="the job's raw archive base path, for exact range uniques")
    parser.add_argument("--metrics_url", default="",
                        help="the job's Prometheus text endpoint (e.g. "
                        "http://127.0.0.1:9464/metrics), for watermark lag and backlog")
    parser.add_argument("--refresh_s", type=int, default=30,
                        help="the dashboard's auto-refresh period")
    parser.add_argument("--no_cache", action="store_true",
                        help="DuckDB: open the file for every read instead of reusing "
                        "answers while the file is unchanged (benchmarks)")
    parser.add_argument("--max_staleness_s", type=float, default=0.0,
                        help="Bigtable/BigQuery, which cannot tell cheaply whether the data "
                        "changed: reuse an answer for up to this many seconds (default 0: "
                        "read per request). Values change at most once per pane "
                        "(--early_firing_s, 60 s by default), so a few seconds cost a "
                        "dashboard nothing and spare the store its viewers' refreshes.")
    add_bigquery_arguments(parser)


def serve(args: argparse.Namespace, settings: Mapping[str, str]) -> None:
    """Build the app over the store and run it until interrupted."""
    import uvicorn

    store = open_store(args.store, {**settings, "bigquery_project": args.bigquery_project,
                                    "bigquery_dataset": args.bigquery_dataset,
                                    "bigquery_endpoint": args.bigquery_endpoint,
                                    "cache": "0" if args.no_cache else "1"})
    app = create_app(store, ServeConfig(
        distinct=args.distinct, archive_path=args.archive_path,
        metrics_url=args.metrics_url, refresh_s=args.refresh_s,
        max_staleness_s=args.max_staleness_s))
    # Bound here, not by uvicorn, so --port 0 can print the port the OS gave.
    sock = socket.create_server((args.host, args.port))
    # Accepted connections inherit it: without it, a keep-alive client waits ~40 ms for
    # every response (Nagle against the client's delayed ACK), as uvicorn's own bind avoids.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    host, port = sock.getsockname()[:2]
    # The line a caller (scripts/demo, the tests) waits for and reads the port from.
    print(f"clickstream serve: dashboard http://{host}:{port}/  API docs "
          f"http://{host}:{port}/docs  (store: {store.name})", flush=True)
    # Keep-alive longer than uvicorn's 5 s: a dashboard refreshing every few seconds
    # reuses its connections instead of racing their close.
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                  timeout_keep_alive=30)).run(sockets=[sock])
