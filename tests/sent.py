"""What a generated dataset sent, read as plain JSON by the tests themselves (not by the
parser under test)."""

from __future__ import annotations

import glob
import json
import os


def sent_records(data: str) -> list[dict]:
    """Every line of the dataset's event files that is a JSON object, as sent."""
    records = []
    for path in sorted(glob.glob(os.path.join(data, "events-*.jsonl"))):
        with open(path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    return records
