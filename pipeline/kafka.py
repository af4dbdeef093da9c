"""Kafka plumbing outside the graph: topics, producers, consumer lag, and the Java
expansion service that lets Python's ReadFromKafka expand without Docker.

The broker itself is `scripts/kafka start` (a real Apache Kafka 4.x process); the
clients here are confluent-kafka (librdkafka), which batches and compresses in C.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("clickstream")

DEFAULT_PARTITIONS = 4
# Producer settings shared by `clickstream publish` and `clickstream load`: batches of
# up to 10k records or 20 ms, lz4, and an unbounded-enough local queue that a paced
# producer never blocks on a short broker hiccup.
PRODUCER_CONFIG = {
    "linger.ms": 20,
    "batch.num.messages": 10_000,
    "batch.size": 1_000_000,
    "compression.type": "lz4",
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
    "enable.idempotence": False,
    "acks": "1",
}
EXPANSION_MAIN = "org.apache.beam.sdk.expansion.service.ExpansionService"
# EMBEDDED: the expanded Java stages run in the Flink TaskManager JVM (no Docker here);
# use_deprecated_read: KafkaIO's UnboundedSource read, which Flink runs as a native
# source; KafkaIO's default SDF read hardly delivered in streaming (docs/streaming.md).
EXPANSION_ARGS = ("--defaultEnvironmentType=EMBEDDED", "--experiments=use_deprecated_read")


def ensure_topic(bootstrap: str, topic: str, partitions: int = DEFAULT_PARTITIONS,
                 timeout_s: float = 30.0) -> None:
    """Create `topic` if missing, with time-based retention off: a replay stamps records
    with simulated arrival times days old, and Kafka's time retention deletes by record
    timestamp, so the records would vanish minutes after they were published. Records
    stamped ahead of the broker's clock are accepted too: a simulated day placed on the
    wall clock has arrivals still to come, and Kafka 4 refuses records more than an
    hour ahead by default (message.timestamp.after.max.ms)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    if topic in admin.list_topics(timeout=timeout_s).topics:
        return
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                            replication_factor=1,
                                            config={"retention.ms": "-1",
                                                    "message.timestamp.after.max.ms":
                                                        str(2**63 - 1)})])
    try:
        futures[topic].result(timeout=timeout_s)
    except KafkaException as exc:
        if "TOPIC_ALREADY_EXISTS" not in str(exc):
            raise


def producer(bootstrap: str, **overrides: object):
    """A batched confluent-kafka Producer for `bootstrap`."""
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": bootstrap, **PRODUCER_CONFIG, **overrides})


@dataclass
class PartitionLag:
    partition: int
    end_offset: int
    committed: int | None  # None: the group has committed nothing there

    @property
    def lag(self) -> int:
        return self.end_offset - (self.committed or 0)


def consumer_lag(bootstrap: str, topic: str, group: str, timeout_s: float = 10.0
                 ) -> list[PartitionLag]:
    """End offset and the group's committed offset per partition of `topic`.

    The job commits offsets only as Flink checkpoints complete
    (commit_offset_in_finalize), so lag 0 means every record is read AND covered by a
    completed checkpoint, i.e. has passed every stage of the graph once.
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
        partitions = [TopicPartition(topic, p) for p in sorted(metadata.partitions)]
        committed = consumer.committed(partitions, timeout=timeout_s)
        lags = []
        for tp in committed:
            _low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, tp.partition), timeout=timeout_s, cached=False)
            lags.append(PartitionLag(tp.partition, high,
                                     tp.offset if tp.offset >= 0 else None))
        return lags
    finally:
        consumer.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class ExpansionServiceError(RuntimeError):
    """The Java expansion service could not be started."""


@contextlib.contextmanager
def expansion_service(jar: str, timeout_s: float = 90.0) -> Iterator[str]:
    """Beam's Java expansion service from `jar` on a free port; yields ``localhost:PORT``
    and stops it by PID on exit.

    `jar` must be the Flink job server jar the job runs on, built with KafkaIO in it:
    with the EMBEDDED environment the Java stages load their classes from the job
    server's classpath. Beam's service listens on every interface (gRPC
    ``ServerBuilder.forPort``), like the LOOPBACK worker: run the job in a private
    network namespace (docs/streaming.md).
    """
    if not shutil.which("java"):
        raise ExpansionServiceError("java not found: the Kafka read needs Java 17+")
    if not Path(jar).is_file():
        raise ExpansionServiceError(
            f"no job server jar at {jar}: ReadFromKafka needs the Flink job server jar "
            "built with KafkaIO (--flink_job_server_jar)")
    port = _free_port()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            ["java", "-Xmx512m", "-cp", jar, EXPANSION_MAIN, str(port), *EXPANSION_ARGS],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while not _port_open(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    out.seek(0)
                    tail = out.read()[-3000:].decode("utf-8", "replace")
                    raise ExpansionServiceError(
                        f"expansion service on port {port} did not start "
                        f"(exit {proc.poll()}): {tail}")
                time.sleep(0.2)
            log.info("Kafka expansion service on localhost:%d (pid %d)", port, proc.pid)
            yield f"localhost:{port}"
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=20)
