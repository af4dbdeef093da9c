"""The raw archive: every unique event as Avro, partitioned by event date and hour.

    {base}/event_date=YYYY-MM-DD/event_hour=HH/part-{run}-{bucket}-of-{buckets}[-pN].avro

The archive is the source of truth for the batch recompute, so it must hold every event,
including those too late for their metric windows. It is therefore written in the global
window, where nothing is ever late: the windowing that drops data sits on the metrics
branch only. Files go through Beam's file systems (`fileio.WriteToFiles`), so a `gs://`
base works in production and a local directory in tests.

Files and idempotence. Each event goes to one (partition, bucket) destination, the bucket
being a stable hash of its event_id, and every destination is written as one file per
firing (all records take WriteToFiles' sharded path: one shard, no per-bundle files, whose
number would depend on bundling). A bounded run names its files by (run id, partition,
bucket) only, so running the same input again with the same run id rewrites the same
names with the same events: nothing is duplicated. Different run ids never overwrite
each other, because two inputs may share partitions (a file of one day's arrivals holds
events of earlier days); events archived by both (e.g. a backfill over a day the stream
already archived) are then stored twice, which the recompute absorbs because it
deduplicates by event_id anyway. Without an explicit run id a run gets a fresh one:
never overwriting is the safe default, idempotent re-runs need a stable id (the bounded
job derives it from its input). An unbounded run also names each firing by its pane
index, so the files of successive firings never replace each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import uuid
import zlib
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import apache_beam as beam
import fastavro
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger as triggers
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

import schemas
from schemas import GRANULARITY_MS, METRICS_NAMESPACE
from transforms.batching import BundleBatcher, EventBatch, in_global_window
from transforms.events import Event, decode_events, encode_events

ARCHIVE_GLOB = "event_date=*/event_hour=*/*.avro"
DEFAULT_FILE_BUCKETS = 8
DEFAULT_FLUSH_S = 60

Destination = tuple[str, int]  # partition directory, bucket


def partition_of(event_time_ms: int) -> str:
    """`event_date=YYYY-MM-DD/event_hour=HH` of a UTC epoch-milliseconds event time."""
    t = datetime.fromtimestamp(event_time_ms / 1000, tz=UTC)
    return f"event_date={t:%Y-%m-%d}/event_hour={t:%H}"


def archive_bucket(event_id: str, buckets: int) -> int:
    """A stable (cross-process, cross-run) bucket of an event_id."""
    return zlib.crc32(event_id.encode("utf-8")) % buckets


def run_id_for(*parts: str) -> str:
    """A short stable run id from what identifies a run's input (e.g. its file glob)."""
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:12]


def fresh_run_id() -> str:
    """A run id that no other run has: UTC launch time and a random suffix."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


class AvroEventSink(fileio.FileSink):
    """Writes (destination, encoded events) elements as Avro records of
    schemas/event.avsc."""

    def __init__(self, codec: str = "deflate") -> None:
        self._codec = codec
        self._schema = fastavro.parse_schema(schemas.event_schema())

    def open(self, fh: Any) -> None:
        self._writer = fastavro.write.Writer(fh, self._schema, codec=self._codec)

    def write(self, record: tuple[Destination, bytes]) -> None:
        _, encoded = record
        for event in decode_events(encoded):
            self._writer.write(event.to_avro())

    def flush(self) -> None:
        self._writer.flush()


class _AvroSinkFactory:
    """WriteToFiles builds a sink per destination; a sink *instance* would be rebuilt
    with no arguments, so the codec is carried by this picklable factory instead."""

    def __init__(self, codec: str) -> None:
        self._codec = codec

    def __call__(self, destination: Destination) -> AvroEventSink:
        return AvroEventSink(self._codec)


def _destination(record: tuple[Destination, bytes]) -> Destination:
    return record[0]


class ArchiveFileNaming:
    """Final file name of a destination's firing, relative to the archive base.

    The partition directory is created here, just before WriteToFiles renames the
    temporary file into it: the local file system does not create parent directories on
    rename (object stores have none to create), and WriteToFiles only logs a failed rename
    at debug level (VerifyArchiveFilesFn below turns that into an error).
    """

    def __init__(self, base_path: str, run_id: str, buckets: int, per_pane: bool) -> None:
        self._base_path = base_path
        self._run_id = run_id
        self._buckets = buckets
        self._per_pane = per_pane

    def __call__(self, window: Any, pane: Any, shard_index: int, total_shards: int,
                 compression: Any, destination: Destination) -> str:
        partition, bucket = destination
        name = f"part-{self._run_id}-{bucket:05d}-of-{self._buckets:05d}"
        if self._per_pane:
            name += f"-p{pane.index if pane is not None else 0:06d}"
        with contextlib.suppress(OSError):  # already there
            FileSystems.mkdirs(FileSystems.join(self._base_path, partition))
        return f"{partition}/{name}.avro"


class BatchByDestinationFn(beam.DoFn):
    """Per bundle, gathers events into one batch per (partition, bucket).

    WriteToFiles then shuffles one element per destination and bundle instead of one per
    event. The batch is bytes (encode_events), not a list of Events, because the SDK
    sizes grouped values by walking every object in them (see transforms/dedup). A batch
    carries its earliest event time, like its events would.
    """

    def __init__(self, buckets: int) -> None:
        self._buckets = buckets
        self._events = Metrics.counter(METRICS_NAMESPACE, "archive_events")
        self._partitions: dict[int, str] = {}  # hour index → partition directory

    def start_bundle(self) -> None:
        self._batcher: BundleBatcher[Destination] = BundleBatcher()

    def process(self, unique: EventBatch) -> Iterable[WindowedValue]:
        for event in unique:
            hour = event.event_time_ms // GRANULARITY_MS["hour"]
            partition = self._partitions.get(hour)
            if partition is None:
                if len(self._partitions) > 10_000:
                    self._partitions.clear()
                partition = self._partitions[hour] = partition_of(event.event_time_ms)
            full = self._batcher.add(
                (partition, archive_bucket(event.event_id, self._buckets)), event)
            if full is not None:
                yield self._encoded(*full)

    def finish_bundle(self) -> Iterable[WindowedValue]:
        for batch in self._batcher.drain():
            yield self._encoded(*batch)

    def _encoded(self, destination: Destination, events: list[Event],
                 earliest: Timestamp) -> WindowedValue:
        self._events.inc(len(events))
        return in_global_window((destination, encode_events(events)), earliest)


class VerifyArchiveFilesFn(beam.DoFn):
    """Fails the bundle if a file WriteToFiles reported is not at its final path.

    WriteToFiles swallows rename errors (a retried bundle's rename finds its source
    gone); this check keeps that from becoming silent loss.
    """

    def __init__(self, base_path: str) -> None:
        self._base_path = base_path
        self._files = Metrics.counter(METRICS_NAMESPACE, "archive_files")

    def process(self, result: fileio.FileResult) -> Iterable[str]:
        path = FileSystems.join(self._base_path, result.file_name)
        if not FileSystems.exists(path):
            raise OSError(f"archive file {path} was not written (rename failed?)")
        self._files.inc()
        yield path


class WriteRawArchive(beam.PTransform):
    """Unique events (EventBatches) → Avro files under `base_path`, by event date and hour.

    Returns the paths of the files written. `bounded` input is written once at the end;
    unbounded input is re-windowed into the global window and flushed every `flush_s`
    seconds of processing time (0: after every bundle), one file per destination and
    flush. `buckets` files per partition and run (per flush when unbounded) bound the
    file size; see the module docstring for `run_id`.
    """

    def __init__(self, base_path: str, run_id: str | None = None,
                 buckets: int = DEFAULT_FILE_BUCKETS, bounded: bool = False,
                 flush_s: int = DEFAULT_FLUSH_S, codec: str = "deflate") -> None:
        super().__init__()
        self._base_path = base_path.rstrip("/")
        self._run_id = run_id or fresh_run_id()
        self._buckets = buckets
        self._bounded = bounded
        self._flush_s = flush_s
        self._codec = codec

    def expand(self, events: beam.PCollection) -> beam.PCollection:
        if self._bounded:
            windowed = events | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
        else:
            fire = (triggers.AfterProcessingTime(self._flush_s) if self._flush_s > 0
                    else triggers.AfterCount(1))
            # AfterWatermark fires the rest when the global window closes (end of a
            # bounded stream, a drain); with the processing-time trigger alone, a
            # TestStream run on the DirectRunner never finished (measured).
            windowed = events | "GlobalWindowFlushed" >> beam.WindowInto(
                GlobalWindows(), trigger=triggers.Repeatedly(
                    triggers.AfterAny(fire, triggers.AfterWatermark())),
                accumulation_mode=triggers.AccumulationMode.DISCARDING)
        results = (
            windowed
            | "BatchByDestination" >> beam.ParDo(BatchByDestinationFn(self._buckets))
            | "WriteAvro" >> fileio.WriteToFiles(
                path=self._base_path,
                destination=_destination,
                sink=_AvroSinkFactory(self._codec),
                file_naming=ArchiveFileNaming(self._base_path, self._run_id,
                                              self._buckets, per_pane=not self._bounded),
                # No per-bundle files: every record takes the sharded path, one shard
                # per destination, so a destination's files do not depend on bundling.
                shards=1,
                max_writers_per_bundle=0))
        return results | "VerifyFiles" >> beam.ParDo(VerifyArchiveFilesFn(self._base_path))


def day_glob(base_path: str, date: str) -> str:
    """The files of one event date (YYYY-MM-DD), every hour and run."""
    return FileSystems.join(base_path.rstrip("/"), f"event_date={date}", "event_hour=*",
                            "*.avro")


class _FromAvroFn(beam.DoFn):
    """Avro records → EventBatches, as the parse stage emits them (each stamped with
    its earliest event time, so the same windowing puts it in the same windows)."""

    def __init__(self) -> None:
        self._read = Metrics.counter(METRICS_NAMESPACE, "archive_read")

    def start_bundle(self) -> None:
        self._batcher: BundleBatcher[None] = BundleBatcher()

    def process(self, record: dict) -> Iterable[WindowedValue]:
        self._read.inc()
        full = self._batcher.add(None, Event.from_avro(record))
        if full is not None:
            yield in_global_window(full[1], full[2])

    def finish_bundle(self) -> Iterable[WindowedValue]:
        for _, batch, earliest in self._batcher.drain():
            yield in_global_window(batch, earliest)


class ReadRawArchive(beam.PTransform):
    """One event date of the archive → EventBatches, as the parse stage emits them.

    Not deduplicated: a day can hold an event twice (two runs over overlapping input,
    see the module docstring), so readers deduplicate as the streaming path does.
    Read with Beam's Avro source (fastavro underneath), so `gs://` works as well.
    """

    def __init__(self, base_path: str, date: str) -> None:
        super().__init__()
        self._pattern = day_glob(base_path, date)

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "ReadAvro" >> beam.io.ReadFromAvro(self._pattern)
            | "ToEventBatches" >> beam.ParDo(_FromAvroFn()).with_output_types(EventBatch))


def archive_files(base_path: str) -> list[str]:
    """Every file of the archive under `base_path`, sorted."""
    pattern = FileSystems.join(base_path.rstrip("/"), ARCHIVE_GLOB)
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def reader_schema() -> Any:
    """The current event schema, parsed for fastavro: files written under an earlier
    version read through it by Avro schema resolution (added fields take defaults)."""
    return fastavro.parse_schema(schemas.event_schema())


def read_archive_records(path: str) -> list[dict]:
    """One archive file's records, resolved to the current schema."""
    with FileSystems.open(path) as fh:
        return [record for record in fastavro.reader(fh, reader_schema=reader_schema())
                if isinstance(record, dict)]


def rewrite_archive_file(path: str, records: list[dict], codec: str = "deflate") -> None:
    """Replaces an archive file with `records` (current schema) so that a crash at any
    point leaves the old file or the new one, never neither and never half of one.

    Locally: write a temporary file beside it (not matching ``*.avro``, so no reader
    picks it up), fsync, then ``os.replace`` (atomic rename over the old name) and fsync
    the directory. An object store (gs://) has no rename, but a single-object write is
    itself atomic: readers see the old object until the new upload completes, so the
    new content is written to the same name in one upload.
    """
    buffer = io.BytesIO()
    fastavro.writer(buffer, reader_schema(), records, codec=codec)
    data = buffer.getvalue()
    if "://" in path:
        with FileSystems.create(path) as fh:
            fh.write(data)
        return
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)
