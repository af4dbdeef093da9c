"""Probe: does Beam's ReadFromPubSub (DirectRunner, streaming) read from the emulator?

Starts Google's Pub/Sub emulator (tests/servers.py), creates a topic and a subscription,
publishes N messages, runs a streaming pipeline reading the subscription for a bounded
time, cancels it, and prints what was read and how long each step took.

    .venv/bin/python scripts/probe_pubsub_emulator.py [N] [SECONDS]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from tests import servers

PROJECT = "probe-project"


class AppendToFile(beam.DoFn):
    def __init__(self, path):
        self.path = path

    def process(self, msg):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"data": msg.data.decode(), "attrs": dict(msg.attributes),
                                "publish_time": str(msg.publish_time)}) + "\n")


def main(n: int = 100, seconds: float = 60.0) -> None:
    t = time.monotonic()
    with servers.pubsub_emulator() as address:
        print(f"emulator ready in {time.monotonic() - t:.2f} s at {address}")
        os.environ["PUBSUB_EMULATOR_HOST"] = address
        from google.cloud import pubsub_v1

        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
        topic = publisher.topic_path(PROJECT, "events")
        sub = subscriber.subscription_path(PROJECT, "events-beam")
        publisher.create_topic(name=topic)
        subscriber.create_subscription(name=sub, topic=topic)
        t = time.monotonic()
        futures = [publisher.publish(topic, f"msg-{i}".encode(), seq=str(i))
                   for i in range(n)]
        for f in futures:
            f.result()
        print(f"published {n} in {time.monotonic() - t:.2f} s")

        out = Path(tempfile.mkdtemp()) / "read.jsonl"
        options = PipelineOptions(["--runner=DirectRunner", "--streaming"])
        p = beam.Pipeline(options=options)
        _ = (p | beam.io.ReadFromPubSub(subscription=sub, with_attributes=True)
             | beam.ParDo(AppendToFile(str(out))))
        t0 = time.monotonic()
        result = p.run()
        print(f"run() returned after {time.monotonic() - t0:.2f} s, state {result.state}")
        first = None
        count = 0
        while time.monotonic() - t0 < seconds:
            count = len(out.read_text().splitlines()) if out.exists() else 0
            if count and first is None:
                first = time.monotonic() - t0
            if count >= n:
                break
            time.sleep(0.2)
        print(f"read {count}/{n} messages; first after "
              f"{first if first is None else round(first, 2)} s; all after "
              f"{time.monotonic() - t0:.2f} s")
        t = time.monotonic()
        result.cancel()
        print(f"cancel() returned after {time.monotonic() - t:.2f} s, "
              f"state {result.state}")
        lines = out.read_text().splitlines() if out.exists() else []
        seqs = sorted(int(json.loads(x)["attrs"]["seq"]) for x in lines)
        print(f"distinct {len(set(seqs))}, duplicates {len(seqs) - len(set(seqs))}")
        t = time.monotonic()
    print(f"emulator stopped in {time.monotonic() - t:.2f} s")


if __name__ == "__main__":
    main(*(float(a) if i else int(a) for i, a in enumerate(sys.argv[1:])))
