"""The in-pipeline form of a valid event, shared by every stage after parsing.

A NamedTuple keeps elements small and fast to pickle between stages; the field order
matches schemas/event.avsc.
"""

from __future__ import annotations

from typing import NamedTuple


class Event(NamedTuple):
    event_id: str
    event_type: str
    event_time_ms: int
    device_id: str
    user_id: str | None
    session_id: str | None
    platform: str | None
    properties: dict[str, str]

    @property
    def identity(self) -> str:
        """Who did it: the user when signed in, else the device (as `device:<id>`)."""
        if self.user_id:
            return self.user_id
        return "device:" + self.device_id

    def to_avro(self) -> dict:
        record = self._asdict()
        record["event_time"] = record.pop("event_time_ms")
        return record
