"""Publish a generated dataset to a Pub/Sub or Kafka topic in arrival order, for the demo
and tests.

Each line of `clickstream generate`'s shards becomes one message whose data is the line's
bytes, exactly as the file source would yield them. Attributes:

- the timestamp attribute (default `event_time`): the event time in epoch milliseconds
  where the line passes validation, so a runner that estimates the watermark from it
  (`--timestamp_attribute`) sees event time; otherwise the publish time, so every
  message has it (the Python DirectRunner falls back to the publish time when it is
  missing, but a runner that requires it would fail the whole read on one bad message);
- the id attribute (default `event_id`): the event_id where the line has a valid one,
  for `--id_label` where the runner supports Pub/Sub-level dedup.

Order: messages are published in the generator's arrival order, but Pub/Sub does not
promise delivery order without ordering keys. The job's results do not depend on it:
dedup keeps one copy whatever the order, and lateness depends on each event's window
and the watermark, not on its neighbours.

Kafka (publish_to_kafka): each line is one record whose value is the line's bytes, whose
key is the sender's identity (the device_id, so one device's events stay in order on one
partition; none for a line without one) and whose timestamp (CreateTime, which the job's
watermark follows) is either the line's simulated arrival time from arrival_ms.txt, so a
compressed replay behaves like the days it simulates (late devices are late, events past
the horizon too late), or the send time. Records go out in arrival order, so every
partition is in timestamp order: the source's zero out-of-orderness holds.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

import schemas
from pipeline.replay import read_arrivals
from transforms.parse import EventRules, InvalidEvent, decode

log = logging.getLogger("clickstream")


@dataclass
class PublishSummary:
    published: int
    with_event_time: int
    elapsed_s: float
    kafka_timestamps: str = ""  # Kafka: what the record timestamps are ("arrival", "now")
    # Kafka: the newest record timestamp each partition took. The job's source watermark
    # (minimum over partitions of the newest CreateTime read) reaches at least the
    # smallest of them once it has read everything published.
    newest_by_partition: dict[int, int] = field(default_factory=dict)

    def render(self) -> str:
        rate = self.published / self.elapsed_s if self.elapsed_s else 0.0
        if self.kafka_timestamps:
            return (f"published {self.published:,} records in {self.elapsed_s:.1f} s "
                    f"({rate:,.0f}/s), timestamped with their {self.kafka_timestamps} "
                    "time")
        return (f"published {self.published:,} messages in {self.elapsed_s:.1f} s "
                f"({rate:,.0f}/s); {self.with_event_time:,} carry their event time, "
                f"{self.published - self.with_event_time:,} (invalid) the publish time")


def message_attributes(payload: bytes, rules: EventRules, now_ms: int,
                       timestamp_attribute: str, id_attribute: str
                       ) -> tuple[dict[str, str], bool]:
    """The attributes a line is published with (see the module docstring), and whether
    they carry its event time (the line is a valid event)."""
    try:
        event = decode(payload, rules, now_ms)
    except InvalidEvent:
        attributes = {timestamp_attribute: str(now_ms)}
        # An id that is present but the event invalid still identifies redeliveries.
        try:
            record = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return attributes, False
        event_id = record.get("event_id") if isinstance(record, dict) else None
        if id_attribute and isinstance(event_id, str) and 0 < len(event_id) <= 128:
            attributes[id_attribute] = event_id
        return attributes, False
    attributes = {timestamp_attribute: str(event.event_time_ms)}
    if id_attribute:
        attributes[id_attribute] = event.event_id
    return attributes, True


def ensure_subscription(topic: str, subscription: str, ack_deadline_s: int = 60) -> None:
    """Create the topic and the subscription if missing (the demo and tests read a
    subscription made before publishing: one made later misses earlier messages)."""
    from google.api_core.exceptions import AlreadyExists
    from google.cloud import pubsub_v1  # type: ignore[attr-defined]

    publisher = pubsub_v1.PublisherClient()
    with contextlib.suppress(AlreadyExists):
        publisher.create_topic(name=topic)
    subscriber = pubsub_v1.SubscriberClient()
    try:
        with contextlib.suppress(AlreadyExists):
            subscriber.create_subscription(name=subscription, topic=topic,
                                           ack_deadline_seconds=ack_deadline_s)
    finally:
        subscriber.close()


def publish_dataset(topic: str, replay_dir: str, limit: int = 0,
                    timestamp_attribute: str = "event_time", id_attribute: str = "event_id",
                    rate: float = 0.0, clock: Callable[[], float] = time.time
                    ) -> PublishSummary:
    """Publish the dataset's lines in arrival order; `rate` messages/s (0: as fast as the
    client batches them). Returns once every message is acknowledged by Pub/Sub."""
    from google.cloud import pubsub_v1  # type: ignore[attr-defined]

    records = read_arrivals(replay_dir, limit)
    rules = EventRules.from_schema(schemas.event_schema())
    publisher = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=500, max_latency=0.05))
    started = time.monotonic()
    futures = []
    with_event_time = 0
    for i, (_arrival_ms, payload) in enumerate(records):
        if rate > 0:
            # Pace against the start, not per message, so client latency does not add up.
            ahead = started + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        now_ms = int(clock() * 1000)
        attributes, has_event_time = message_attributes(payload, rules, now_ms,
                                                        timestamp_attribute, id_attribute)
        with_event_time += has_event_time
        futures.append(publisher.publish(topic, payload, **attributes))
        if (i + 1) % 10_000 == 0:
            log.info("publish: %s of %s messages sent", f"{i + 1:,}", f"{len(records):,}")
    for future in futures:
        future.result(timeout=120)  # raises if Pub/Sub refused a message
    return PublishSummary(len(futures), with_event_time, time.monotonic() - started)


def identity_key(payload: bytes) -> bytes | None:
    """The record key of a line: its device_id (the sender), or None when it has none."""
    try:
        record = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    device = record.get("device_id") if isinstance(record, dict) else None
    return device.encode() if isinstance(device, str) and device else None


def publish_to_kafka(bootstrap: str, topic: str, replay_dir: str, limit: int = 0,
                     rate: float = 0.0, timestamps: str = "arrival",
                     clock: Callable[[], float] = time.time,
                     arrived: tuple[int, int | None] = (0, None)) -> PublishSummary:
    """Produce the dataset's lines to `topic` in arrival order (module docstring); `rate`
    records/s (0: as fast as the client batches them); `timestamps` "arrival" or "now";
    `arrived` (from_ms, until_ms): only the lines whose simulated arrival is in that
    half-open range (a replay published in parts, e.g. a day and then the late syncs
    that follow it; None: no end). Creates the topic if missing (time retention off).
    Returns once the broker has acknowledged every record; raises if it refused any."""
    from pipeline.kafka import ensure_topic, producer

    if timestamps not in ("arrival", "now"):
        raise ValueError(f"timestamps must be 'arrival' or 'now', not {timestamps!r}")
    since_ms, until_ms = arrived
    records = [(arrival_ms, payload) for arrival_ms, payload in read_arrivals(replay_dir, limit)
               if arrival_ms >= since_ms and (until_ms is None or arrival_ms < until_ms)]
    ensure_topic(bootstrap, topic)
    client = producer(bootstrap)
    failures: list[str] = []
    newest: dict[int, int] = {}

    def delivered(error: Any, message: Any) -> None:
        if error is not None:
            failures.append(str(error))
            return
        _kind, stamp = message.timestamp()
        newest[message.partition()] = max(stamp, newest.get(message.partition(), stamp))

    started = time.monotonic()
    for i, (arrival_ms, payload) in enumerate(records):
        if rate > 0:
            ahead = started + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        stamp = arrival_ms if timestamps == "arrival" else int(clock() * 1000)
        while True:
            try:
                client.produce(topic, payload, identity_key(payload), timestamp=stamp,
                               on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: let it drain
                client.poll(0.1)
        client.poll(0)
        if (i + 1) % 100_000 == 0:
            log.info("publish: %s of %s records sent", f"{i + 1:,}", f"{len(records):,}")
    left = client.flush(120)
    if left or failures:
        raise RuntimeError(f"Kafka did not take {left + len(failures):,} of "
                           f"{len(records):,} records: {failures[:3]}")
    return PublishSummary(len(records), len(records), time.monotonic() - started,
                          "simulated arrival" if timestamps == "arrival" else "send",
                          newest)


def main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="clickstream publish",
        description="Publish a generated dataset in arrival order to Pub/Sub (--topic; "
                    "PUBSUB_EMULATOR_HOST points the client at the emulator) or Kafka "
                    "(--kafka_bootstrap and --kafka_topic).")
    parser.add_argument("--topic", default="", help="Pub/Sub: projects/P/topics/T")
    parser.add_argument("--kafka_bootstrap", default="",
                        help="Kafka: bootstrap servers HOST:PORT (`scripts/kafka start`).")
    parser.add_argument("--kafka_topic", default="",
                        help="Kafka: the topic (created with time retention off if "
                             "missing).")
    parser.add_argument("--timestamps", choices=("arrival", "now"), default="arrival",
                        help="Kafka: each record's timestamp, the line's simulated arrival "
                             "time (arrival_ms.txt) or the send time.")
    parser.add_argument("--replay_dir", required=True,
                        help="A directory written by `clickstream generate`.")
    parser.add_argument("--subscription", default="",
                        help="projects/P/subscriptions/S: create the topic and this "
                             "subscription first if missing.")
    parser.add_argument("--timestamp_attribute", default="event_time",
                        help="Attribute for the event time (epoch ms); the job's "
                             "--timestamp_attribute.")
    parser.add_argument("--id_attribute", default="event_id",
                        help="Attribute for the event_id; the job's --id_label "
                             "(empty: none).")
    parser.add_argument("--limit", type=int, default=0, help="Only the first N lines.")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="Messages per second (0: as fast as possible).")
    args = parser.parse_args(list(argv))
    kafka = bool(args.kafka_bootstrap or args.kafka_topic)
    if kafka == bool(args.topic):
        parser.error("give --topic (Pub/Sub) or --kafka_bootstrap with --kafka_topic")
    if kafka:
        if not (args.kafka_bootstrap and args.kafka_topic):
            parser.error("--kafka_bootstrap and --kafka_topic go together")
        summary = publish_to_kafka(args.kafka_bootstrap, args.kafka_topic,
                                   args.replay_dir, args.limit, args.rate, args.timestamps)
        print(summary.render())
        return 0
    if args.subscription:
        ensure_subscription(args.topic, args.subscription)
    summary = publish_dataset(args.topic, args.replay_dir, args.limit,
                              args.timestamp_attribute, args.id_attribute, args.rate)
    print(summary.render())
    return 0
