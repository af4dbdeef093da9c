"""Sources of raw event payloads: bytes, one record each, never decoded here."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.transforms.window import FixedWindows, GlobalWindows
from apache_beam.utils import windowed_value

from transforms.progress import DEFAULT_EVERY, ProgressMeter

log = logging.getLogger("clickstream")
_SUBSCRIPTION = re.compile(r"^projects/[^/]+/subscriptions/[^/]+$")


LINES_PER_ELEMENT = 1024


class SplitLinesFn(beam.DoFn):
    """A matched file → its lines as bytes, without the line terminator, handed on in
    lists of up to LINES_PER_ELEMENT (the parse step takes single payloads or lists).

    Lists, because every element handed to the next step cost the runner ~2.4 µs (py-spy,
    1M events): per line that was a tenth of the run. Logs progress as it reads (every
    `progress_every` lines per worker; 0: never).
    """

    def __init__(self, progress_every: int = DEFAULT_EVERY) -> None:
        self._progress_every = progress_every

    def setup(self) -> None:
        self._meter = (ProgressMeter("records read", self._progress_every)
                       if self._progress_every > 0 else None)

    def process(self, readable: fileio.ReadableFile) -> Iterable[list[bytes]]:
        lines: list[bytes] = []
        with readable.open() as f:
            for line in f:
                if line.endswith(b"\n"):
                    line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
                lines.append(line)
                if len(lines) == LINES_PER_ELEMENT:
                    self._count(lines)
                    yield lines
                    lines = []
        if lines:
            self._count(lines)
            yield lines

    def _count(self, lines: list[bytes]) -> None:
        if self._meter is not None:
            self._meter.add(len(lines))


class ReadEventFiles(beam.PTransform):
    """Newline-delimited files (any Beam file system, compression by extension) → raw
    bytes per line, in lists (see SplitLinesFn).

    Bytes, not str: a UTF-8 text source fails the whole read on one invalid line
    (docs/design.md#utf-8-text-sources); decoding belongs to validation, which
    dead-letters such a line.
    Each file is read by one worker, line by line at C speed: textio's splittable read
    spent ~5.5 µs a line on range tracking (measured), more than parsing's JSON step,
    and landing zones and the generator write many shards rather than one huge file.
    """

    def __init__(self, file_pattern: str, progress_every: int = DEFAULT_EVERY) -> None:
        super().__init__()
        self._file_pattern = file_pattern
        self._progress_every = progress_every

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self._file_pattern)
            | "Open" >> fileio.ReadMatches()
            | "SplitLines" >> beam.ParDo(SplitLinesFn(self._progress_every)))


def runner_supports_id_label(runner: object) -> bool:
    """Whether `runner` (a name, class or instance) honours ReadFromPubSub's id_label.

    Only Dataflow implements Pub/Sub reads natively with id_label dedup. The Python
    DirectRunner raises NotImplementedError for it (docs/design.md#pubsub-on-the-directrunner),
    and the portable runners (Prism, Flink) have no native Pub/Sub read of their own.
    Elsewhere the graph's event_id dedup is what removes redeliveries, so dropping
    id_label there loses nothing but an earlier, cheaper filter.
    """
    name = runner if isinstance(runner, str) else (
        runner.__name__ if isinstance(runner, type) else type(runner).__name__)
    return "dataflow" in name.lower()


class StampIngestTimeFn(beam.DoFn):
    """Gives each payload its processing time as element timestamp.

    Valid events are re-stamped with their payload's event time by the parse stage; what
    keeps the message timestamp is the dead letter, which is windowed (to number identical
    payloads) with no allowed lateness. A malformed message whose timestamp attribute is
    old (or whose publish time is, after a backlog) would be dropped there silently as
    late. Ingest time is never behind the watermark, so no dead letter is lost. The
    source's watermark is unaffected: it is still estimated from the attribute.
    """

    def process(self, payload: bytes, window=beam.DoFn.WindowParam) -> Iterable[Any]:
        # windowed_value.create: a TimestampedValue costs ~10 µs more per element.
        yield windowed_value.create(payload, int(time.time() * 1_000_000), (window,))


class ReadEventMessages(beam.PTransform):
    """A Pub/Sub subscription → the raw payload bytes of each message, like ReadEventFiles.

    The message data is the payload the file source yields per line, so the graph after
    the source is the same for both. `timestamp_attribute` (empty: publish time) names the
    attribute the runner estimates the watermark from; the event time itself still comes
    from the payload. `id_label` (empty: none) is passed on only where the runner honours
    it (runner_supports_id_label): on the DirectRunner it raises NotImplementedError. The
    graph's event_id dedup holds on every runner either way.

    Read a subscription created before the messages were published: reading a topic makes
    a new subscription at run time and misses everything published before.
    """

    def __init__(self, subscription: str, timestamp_attribute: str = "",
                 id_label: str = "") -> None:
        super().__init__()
        if not _SUBSCRIPTION.match(subscription):
            raise ValueError(f"not a subscription path: {subscription!r} "
                             "(expected projects/PROJECT/subscriptions/NAME)")
        self._subscription = subscription
        self._timestamp_attribute = timestamp_attribute
        self._id_label = id_label

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        id_label = self._id_label or None
        if id_label and not runner_supports_id_label(pbegin.pipeline.runner):
            log.warning("id_label %r ignored: %s does not support Pub/Sub id_label dedup; "
                        "the event_id dedup stage removes redeliveries", id_label,
                        type(pbegin.pipeline.runner).__name__)
            id_label = None
        payloads = (
            pbegin
            | "ReadPubSub" >> beam.io.ReadFromPubSub(
                subscription=self._subscription, with_attributes=False,
                timestamp_attribute=self._timestamp_attribute or None, id_label=id_label)
            | "StampIngestTime" >> beam.ParDo(StampIngestTimeFn()))
        if "DirectRunner" in type(pbegin.pipeline.runner).__name__:
            # Its output is stamped at the end of its ingest-time window: still never
            # before the ingest time, and held by the runner until it is processed.
            payloads = payloads | "Rebundle" >> Rebundle()
        return payloads


class Rebundle(beam.PTransform):
    """Gathers the small bundles of `window_s` seconds of ingest time into one bundle.

    The DirectRunner's Pub/Sub read pulls 10 messages per bundle, and its streaming
    runner pays a fixed cost per bundle and step (a fresh DoFn, signature inspection, a
    DuckDB connect): the whole graph ran at ~4 messages/s on 10-message bundles
    (measured; py-spy: most of the time in per-bundle set-up). Other runners bundle by
    themselves, and there this shuffle would only cost, so the source adds it on the
    DirectRunner only. Input must be stamped with ingest time. The group fires on the
    watermark (the wall clock there), not on a processing-time trigger: a
    Repeatedly(AfterProcessingTime) fired once and then never again on that runner
    (measured), the stall of docs/design.md#late-trigger-stall. One key: the runner has
    one worker thread anyway.
    """

    def __init__(self, window_s: float = 5.0) -> None:
        super().__init__()
        self._window_s = window_s

    def expand(self, payloads: beam.PCollection) -> beam.PCollection:
        return (
            payloads
            | "IngestWindows" >> beam.WindowInto(FixedWindows(self._window_s))
            | "OneKey" >> beam.Map(lambda payload: (0, payload))
            | "Group" >> beam.GroupByKey()
            | "Ungroup" >> beam.FlatMap(lambda keyed: keyed[1])
            | "GlobalWindow" >> beam.WindowInto(GlobalWindows()))


class ReadEventRecords(beam.PTransform):
    """A Kafka topic → the raw value bytes of each record, like ReadEventFiles.

    Beam's cross-language ReadFromKafka (Java KafkaIO, expanded by `expansion_service`).
    The record value is the payload the file source yields per line, so the graph after
    the source is the same for every source; the key (the sender's identity) only places
    the record on a partition.

    Watermark: each record's timestamp is its CreateTime (the producer's send time, or
    the simulated arrival time of a replay), and the source's watermark is the minimum
    over partitions of the newest CreateTime read, with a bounded out-of-orderness of
    zero: that is KafkaIO's create-time policy as its cross-language expansion builds it
    (``withCreateTime(Duration.ZERO)``; the Python API has no delay parameter). Zero is
    right for producers that send each partition in timestamp order, as `clickstream
    publish` and `clickstream load` do; events whose *event* time trails (late devices)
    are handled by the windows' allowed lateness, not by the source. A caught-up
    partition's watermark advances to the wall clock, so publish a replay before the job
    starts reading it (docs/streaming.md).

    Offsets are committed to `group` only when a Flink checkpoint that covers them
    completes (commit_offset_in_finalize, auto commit off): a restarted job re-reads
    from the last completed checkpoint, and the graph's event_id dedup removes what it
    reads twice. Each record is then stamped with ingest time (StampIngestTimeFn): the
    dead letter is windowed with no allowed lateness, and ingest time is never behind
    the watermark (which never passes the wall clock).
    """

    def __init__(self, bootstrap: str, topic: str, group: str,
                 expansion_service: str) -> None:
        super().__init__()
        self._bootstrap = bootstrap
        self._topic = topic
        self._group = group
        self._expansion_service = expansion_service

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        from apache_beam.io.kafka import ReadFromKafka

        return (
            pbegin
            | "ReadKafka" >> ReadFromKafka(
                consumer_config={"bootstrap.servers": self._bootstrap,
                                 "group.id": self._group,
                                 "auto.offset.reset": "earliest",
                                 "enable.auto.commit": "false"},
                topics=[self._topic],
                with_metadata=False,
                timestamp_policy=ReadFromKafka.create_time_policy,
                commit_offset_in_finalize=True,
                expansion_service=self._expansion_service)
            | "Values" >> beam.Map(_record_value).with_output_types(bytes)
            | "StampIngestTime" >> beam.ParDo(StampIngestTimeFn()))


def _record_value(record: tuple[bytes | None, bytes]) -> bytes:
    return record[1]
