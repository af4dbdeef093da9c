"""The pipeline's health as the API reports it: freshness from the store, watermark lag
and backlog from the job's metrics when a Prometheus text endpoint is given.

The job's exporter (`clickstream run --metrics_port N`) serves
`clickstream_watermark_lag_seconds` (transforms/freshness.py's gauge) and, for a source
with a backlog, `clickstream_kafka_consumer_lag` (records behind, per partition) or a
`*backlog*` gauge. Without `--metrics_url`, or when it cannot be read, both are reported
as "unknown" with the reason, never as 0.
"""

from __future__ import annotations

import math
import re
import urllib.request
from collections.abc import Iterable
from typing import Any

UNKNOWN = "unknown"
WATERMARK_LAG = ("clickstream_watermark_lag_seconds", "clickstream_watermark_lag_s")
BACKLOG_EXACT = ("clickstream_kafka_consumer_lag",)
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus_text(text: str) -> Iterable[tuple[str, float]]:
    """(metric name, value) of every sample of the text exposition format."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            try:
                yield match.group(1), float(match.group(3))
            except ValueError:
                continue


def job_metrics(url: str, timeout_s: float = 2.0) -> dict[str, Any]:
    """Watermark lag (s, the largest reported) and backlog (summed) from `url`."""
    if not url:
        return {"watermark_lag_s": UNKNOWN, "backlog": UNKNOWN,
                "metrics_source": None,
                "metrics_error": "no --metrics_url given (the job's Prometheus endpoint)"}
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        return {"watermark_lag_s": UNKNOWN, "backlog": UNKNOWN, "metrics_source": url,
                "metrics_error": f"could not read {url}: {exc}"}
    lags, backlog = [], []
    for name, value in parse_prometheus_text(text):
        if math.isnan(value):
            continue
        if name in WATERMARK_LAG:
            lags.append(value)
        elif name in BACKLOG_EXACT or "backlog" in name:
            backlog.append(value)
    return {"watermark_lag_s": max(lags) if lags else UNKNOWN,
            "backlog": sum(backlog) if backlog else UNKNOWN,
            "metrics_source": url,
            "metrics_error": None if lags else
            f"{url} has no {WATERMARK_LAG[0]} sample (is it the job's exporter?)"}
