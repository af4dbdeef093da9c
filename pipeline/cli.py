"""`clickstream`: run the job, generate data, replay or publish a stream, put live load on
Kafka, finalize a day, print a report, query a metric's series, forget an identity, apply
retention."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _generate(args: argparse.Namespace) -> int:
    from pipeline.generator import GeneratorConfig, write_dataset, write_days

    config = GeneratorConfig(events=args.events, seed=args.seed, date=args.date,
                             shards=args.shards, too_late_rate=args.too_late_rate)
    counts = write_days(args.out, config, args.days) if args.days > 1 else \
        write_dataset(args.out, config)
    print(f"wrote {counts['read']:,} lines to {args.out} "
          f"({counts['unique']:,} unique, {counts['duplicates']:,} duplicates, "
          f"{counts['dead_letter']:,} malformed); oracle in {args.out}/expected.json")
    return 0


def _run(argv: Sequence[str]) -> int:
    from pipeline.job import run
    from pipeline.report import print_report

    summary = run(argv)
    print(summary.render())
    if _duckdb_path(argv):  # empty: no DuckDB sink, nothing local to report from
        print_report(_duckdb_path(argv))
    # No counters from the runner: the sink tally printed above is the reconciliation.
    return 0 if summary.reconciles or (summary.sink and not summary.counters_available) else 1


def _replay(argv: Sequence[str]) -> int:
    from pipeline.replay import replay_reconciliation, run_replay
    from pipeline.report import print_report

    duckdb_path = _duckdb_path(argv)
    summary = run_replay(argv)
    print(replay_reconciliation(duckdb_path, summary))
    print_report(duckdb_path, changelog=True)
    return 0


def _finalize(argv: Sequence[str]) -> int:
    from pipeline.finalize import run_finalize
    from pipeline.report import print_day_revisions

    summary = run_finalize(argv)
    print(summary.render())
    print_day_revisions(_duckdb_path(argv), summary.day)
    return 0


def _forget(argv: Sequence[str]) -> int:
    from pipeline.forget import run_forget

    print(run_forget(argv).render())
    return 0


def _retention(argv: Sequence[str]) -> int:
    from pipeline.retention import run_retention

    print(run_retention(argv).render())
    return 0


def _options(argv: Sequence[str]):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import ClickstreamOptions

    return PipelineOptions(list(argv)).view_as(ClickstreamOptions)


def _duckdb_path(argv: Sequence[str]) -> str:
    return _options(argv).duckdb_path


def _query(argv: Sequence[str]) -> int:
    from pipeline.query import add_arguments, run_query

    parser = argparse.ArgumentParser(
        prog="clickstream query", epilog="Connection flags as for `clickstream run`: "
        "--duckdb_path, --bigtable_project/--bigtable_instance/--bigtable_table, "
        "--bigquery_project/--bigquery_dataset (plus --bigquery_endpoint for a local "
        "BigQuery server).")
    add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    # The stores' connection flags are the job's own options, parsed the same way.
    options = _options(rest)
    print(run_query(args, {name: getattr(options, name) for name in (
        "duckdb_path", "bigtable_project", "bigtable_instance", "bigtable_table")}))
    return 0


def _reads_kafka(argv: Sequence[str]) -> bool:
    return any(arg == "--kafka_topic" or arg.startswith("--kafka_topic=") for arg in argv)


def _serve(argv: Sequence[str]) -> int:
    from pipeline.query import QueryError
    from serving.command import add_arguments, serve

    parser = argparse.ArgumentParser(
        prog="clickstream serve", epilog="Connection flags as for `clickstream query`: "
        "--duckdb_path, --bigtable_project/--bigtable_instance/--bigtable_table, "
        "--bigquery_project/--bigquery_dataset (plus --bigquery_endpoint).")
    add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    options = _options(rest)
    try:
        serve(args, {name: getattr(options, name) for name in (
            "duckdb_path", "bigtable_project", "bigtable_instance", "bigtable_table")})
    except QueryError as exc:
        print(f"clickstream serve: {exc}", file=sys.stderr)
        return 2
    return 0


def configure_logging() -> None:
    """INFO lines with a timestamp (the job's progress lines), Beam's own at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("apache_beam", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\n\ncommands:\n"
              "  run      --input_files GLOB --duckdb_path FILE [--distinct exact|hll] "
              "[--runner R] [Beam options]\n"
              "  run      --input_subscription projects/P/subscriptions/S --duckdb_path FILE "
              "[--timestamp_attribute A] [--max_run_s N]  streaming; Ctrl-C stops it\n"
              "  run      --kafka_bootstrap HOST:PORT --kafka_topic T [--kafka_group G] "
              "[--stop_when_idle_s N]  streaming on FlinkRunner (docs/streaming.md)\n"
              "  publish  --topic projects/P/topics/T --replay_dir DIR [--subscription S]  "
              "publish a generated dataset in arrival order\n"
              "  publish  --kafka_bootstrap HOST:PORT --kafka_topic T --replay_dir DIR "
              "[--rate N] [--timestamps arrival|now]  the same, to Kafka\n"
              "  load     --kafka_bootstrap HOST:PORT --kafka_topic T --rate R --duration_s D "
              "[--burst 5x:120s] [--hot_key_share S] [--late_share S] "
              "[--duplicate_share S]  live load\n"
              "  replay   --replay_dir DIR --duckdb_path FILE [...]  stream a generated "
              "dataset in arrival order (TestStream)\n"
              "  finalize --date YYYY-MM-DD --archive_path BASE --duckdb_path FILE "
              "[--distinct exact]  recompute a day from the raw archive, correct the "
              "sinks, mark it final\n"
              "  forget   --user_id U [--device_id D] | --ids_file F  --archive_path BASE "
              "--duckdb_path FILE [store flags] [--pseudonymize_key_file K]  remove an "
              "identity's events from the archive, dead letters and (re-finalized) "
              "aggregates; logged in deletion_audit\n"
              "  retention --retention_days N [--aggregate_retention_days M] "
              "--archive_path BASE --duckdb_path FILE [store flags]  delete expired raw "
              "partitions, dead letters and aggregates\n"
              "  generate --out DIR --events N --seed S [--date YYYY-MM-DD] [--days N] "
              "[--too_late_rate R]\n"
              "  merge    --out DIR SOURCE_DIR...  one arrival-ordered dataset from several "
              "generated ones (e.g. day D and a day a week later)\n"
              "  report   --duckdb_path FILE\n"
              "  query    --metric M --granularity hour|day [--dims JSON] [--start ISO] "
              "[--end ISO] --from duckdb|bigtable|bigquery [--format table|json] "
              "[connection flags]\n"
              "  serve    [--from duckdb|bigtable|bigquery] [--port N] [--distinct hll|exact] "
              "[--archive_path BASE] [--metrics_url URL] [connection flags]  the HTTP API "
              "and dashboard on 127.0.0.1\n"
              "Run `clickstream run --help` for every pipeline option.")
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("run", "replay", "finalize", "forget"):
        # FlinkRunner: use the cached job server jar, or refuse with what to fetch, before
        # Beam tries to download it; importing runners.flink also declares the Flink
        # checkpointing options so they reach the job server.
        from runners.flink import JobServerJarMissing, resolve_job_server_jar

        if command == "run" and _reads_kafka(rest) and not any(
                arg == "--runner" or arg.startswith("--runner=") for arg in rest):
            rest = [*rest, "--runner=FlinkRunner"]  # the Kafka read runs on Flink
        try:
            rest = resolve_job_server_jar(rest)
        except JobServerJarMissing as exc:
            print(f"clickstream {command}: {exc}", file=sys.stderr)
            return 2
    if command == "generate":
        from pipeline.generator import GeneratorConfig

        parser = argparse.ArgumentParser(prog="clickstream generate")
        parser.add_argument("--out", required=True)
        parser.add_argument("--events", type=int, default=100_000)
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--date", default="2026-11-01")
        parser.add_argument("--shards", type=int, default=4)
        parser.add_argument("--days", type=int, default=1,
                            help="consecutive days from --date, --events each, one user "
                            "population (for WAU/MAU), merged in arrival order")
        parser.add_argument("--too_late_rate", type=float,
                            default=GeneratorConfig.too_late_rate,
                            help="Share of sessions that arrive past the allowed lateness "
                                 "(from devices offline for days).")
        return _generate(parser.parse_args(rest))
    if command == "merge":
        from pipeline.generator import merge_datasets

        parser = argparse.ArgumentParser(prog="clickstream merge")
        parser.add_argument("--out", required=True)
        parser.add_argument("sources", nargs="+")
        args = parser.parse_args(rest)
        counts = merge_datasets(args.out, args.sources)
        print(f"wrote {counts['read']:,} lines to {args.out} ({counts['unique']:,} unique)")
        return 0
    if command == "run":
        return _run(rest)
    if command == "replay":
        return _replay(rest)
    if command == "query":
        return _query(rest)
    if command == "serve":
        return _serve(rest)
    if command == "publish":
        from pipeline.publish import main as publish_main

        return publish_main(rest)
    if command == "load":
        from pipeline.load import main as load_main

        return load_main(rest)
    if command == "finalize":
        return _finalize(rest)
    if command == "forget":
        return _forget(rest)
    if command == "retention":
        return _retention(rest)
    if command == "report":
        from pipeline.report import print_report

        print_report(_duckdb_path(rest))
        return 0
    print(f"unknown command {command!r}; try `clickstream --help`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
