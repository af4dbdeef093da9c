"""The raw archive holds every unique event exactly once, in its event date/hour
partition, including events too late for their windows; re-running a bounded job with
the same run id duplicates nothing; the too-late counter finds exactly the events the
windowing drops."""

from __future__ import annotations

import glob
import os
from collections import Counter
from datetime import UTC, datetime

import apache_beam as beam
import fastavro
import pytest
from apache_beam.coders import BytesCoder
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.generator import GeneratorConfig, read_truth, write_dataset
from pipeline.replay import build_stream, read_arrivals, watermark_at
from tests.streaming import _COLLECTED, Collect
from transforms.archive import ARCHIVE_GLOB, WriteRawArchive, partition_of
from transforms.dedup import DeduplicateEvents
from transforms.lateness import CountTooLate
from transforms.parse import ParseEvents

LATENESS_S = 3 * 86400
SIZES_MS = {"hour": 3_600_000, "day": 86_400_000}
STEP_S, LAG_S = 3600, 300


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("archive-data"))
    # The default too_late_rate gives no too-late session in 3000 events at seed 4.
    write_dataset(out, GeneratorConfig(events=3000, seed=4, too_late_rate=0.01))
    return out


def read_archive(base: str) -> list[tuple[str, dict]]:
    """(partition directory relative to base, record) for every archived record."""
    records = []
    for path in sorted(glob.glob(os.path.join(base, ARCHIVE_GLOB))):
        partition = os.path.relpath(os.path.dirname(path), base)
        with open(path, "rb") as f:
            records.extend((partition, record) for record in fastavro.reader(f))
    return records


def event_time_ms(record: dict) -> int:
    t = record["event_time"]
    return int(t.timestamp() * 1000) if isinstance(t, datetime) else int(t)


def assert_archive_equals_truth(base: str, truth_ids: dict[str, int]) -> None:
    records = read_archive(base)
    ids = Counter(r["event_id"] for _, r in records)
    assert not [i for i, n in ids.items() if n > 1], "event archived more than once"
    assert set(ids) == set(truth_ids)
    for partition, record in records:
        assert event_time_ms(record) == truth_ids[record["event_id"]]
        assert partition == partition_of(truth_ids[record["event_id"]])


def run_batch(dataset: str, base: str, run_id: str) -> list:
    """Runs the bounded archive (and too-late counter); returns the too-late rows."""
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = False
    with beam.Pipeline(options=options) as p:
        lines = p | beam.io.ReadFromText(os.path.join(dataset, "events-*.jsonl"),
                                         coder=BytesCoder())
        events, _ = lines | ParseEvents()
        unique = (events | DeduplicateEvents(LATENESS_S, 16, bounded=True)).unique
        unique | WriteRawArchive(base, run_id=run_id, buckets=4, bounded=True)
        (unique | CountTooLate(LATENESS_S, bounded=True)
         | beam.ParDo(Collect("batch_too_late")))
    return _COLLECTED.pop("batch_too_late", [])


def test_bounded_archive_holds_every_unique_event_once_in_its_partition(
        dataset, tmp_path) -> None:
    truth = read_truth(dataset)
    too_late = [e for e in truth
                if e.arrival_ms - e.event_time_ms > (LATENESS_S + 86400) * 1000]
    assert too_late, "the dataset must contain events past the allowed lateness"
    base = str(tmp_path / "archive")
    assert run_batch(dataset, base, run_id="r1") == []  # bounded input drops nothing
    truth_ids = {e.event_id: e.event_time_ms for e in truth}
    assert_archive_equals_truth(base, truth_ids)
    partitions = {os.path.relpath(os.path.dirname(p), base)
                  for p in glob.glob(os.path.join(base, ARCHIVE_GLOB))}
    assert {partition_of(e.event_time_ms) for e in too_late} <= partitions

    # Same input, same base, same run id: the same files are rewritten, nothing doubles.
    files = sorted(glob.glob(os.path.join(base, ARCHIVE_GLOB)))
    run_batch(dataset, base, run_id="r1")
    assert sorted(glob.glob(os.path.join(base, ARCHIVE_GLOB))) == files
    assert_archive_equals_truth(base, truth_ids)


def test_file_names_are_one_per_partition_bucket_and_run(dataset, tmp_path) -> None:
    base = str(tmp_path / "archive")
    run_batch(dataset, base, run_id="r2")
    for path in glob.glob(os.path.join(base, ARCHIVE_GLOB)):
        name = os.path.basename(path)
        assert name.startswith("part-r2-") and name.endswith("-of-00004.avro"), name


@pytest.fixture(scope="module")
def replayed(tmp_path_factory) -> tuple[str, str, list[tuple]]:
    """A smaller generated dataset replayed in arrival order as a TestStream through
    parse → streaming dedup → archive and the too-late counter. The archive flushes
    every 60 s of processing time, and each replay step advances it 61 s."""
    root = tmp_path_factory.mktemp("archive-stream")
    data, base = str(root / "data"), str(root / "archive")
    write_dataset(data, GeneratorConfig(events=1500, seed=5, too_late_rate=0.02))
    records = read_arrivals(data)
    options = PipelineOptions(["--runner=BundleBasedDirectRunner"])
    options.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=options) as p:
        events, _ = p | build_stream(records, STEP_S, LAG_S) | ParseEvents()
        # Wired as pipeline/graph.py wires them: events past the dedup horizon are
        # archived and counted too late, never windowed.
        unique, past_horizon = events | DeduplicateEvents(LATENESS_S, 16)
        ((unique, past_horizon) | beam.Flatten()
         | WriteRawArchive(base, run_id="s1", buckets=2))  # flushed every 60 s
        ((unique, past_horizon) | CountTooLate(LATENESS_S)
         | beam.ParDo(Collect("archive_too_late")))
    return data, base, _COLLECTED.pop("archive_too_late", [])


@pytest.mark.integration  # the `replayed` TestStream: 25 s at load 8
def test_streaming_archive_holds_every_unique_event_including_too_late(replayed) -> None:
    data, base, _ = replayed
    truth = read_truth(data)
    assert_archive_equals_truth(base, {e.event_id: e.event_time_ms for e in truth})
    names = [os.path.basename(p) for p in glob.glob(os.path.join(base, ARCHIVE_GLOB))]
    assert all(name.startswith("part-s1-") and "-p" in name for name in names)


@pytest.mark.integration  # the `replayed` TestStream
def test_too_late_counts_are_exactly_what_the_windowing_drops(replayed) -> None:
    data, _, rows = replayed
    truth = read_truth(data)
    want: Counter = Counter()
    for e in truth:
        for granularity, size in SIZES_MS.items():
            start = e.event_time_ms // size * size
            if (start + size) / 1000 + LATENESS_S < watermark_at(e.arrival_ms, STEP_S, LAG_S):
                want[(granularity, datetime.fromtimestamp(start / 1000, tz=UTC))] += 1
    assert sum(want.values()) > 0
    got: Counter = Counter()
    for row in rows:
        got[(row.granularity, row.window_start)] += row.events
    assert +got == +want
