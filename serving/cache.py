"""Whole answers reused while the store's data is unchanged (an ASGI middleware).

A dashboard's viewers and its auto-refresh ask the same questions over and over, and the
data only changes when the job writes. For a store that can tell its data version
cheaply (DuckDB: the file's and WAL's mtime and size, see serving/stores.py), a GET under
/api/ whose answer was a 200 at the current version is sent again without running the
endpoint. The version is read before the endpoint runs, so an answer is never kept under
a version newer than its data. /api/health is never reused (it reports ages against now),
nor an answer read from outside the store (`reads_elsewhere`: the raw archive).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

Message = dict[str, Any]


class ResponseCache:
    def __init__(self, app: Any, version: Callable[[], Hashable | None],
                 reads_elsewhere: Callable[[str, bytes], bool] = lambda path, query: False,
                 entries: int = 4096, skip: tuple[str, ...] = ("/api/health",)) -> None:
        self.app = app
        self._version = version
        self._reads_elsewhere = reads_elsewhere
        self._entries: OrderedDict[tuple, tuple[Hashable, Message, bytes]] = OrderedDict()
        self._limit = entries
        self._skip = skip
        self._lock = threading.Lock()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if (scope["type"] != "http" or scope["method"] != "GET"
                or not scope["path"].startswith("/api/") or scope["path"] in self._skip
                or self._reads_elsewhere(scope["path"], scope["query_string"])):
            await self.app(scope, receive, send)
            return
        version = self._version()
        if version is None:
            await self.app(scope, receive, send)
            return
        key = (scope["path"], scope["query_string"])
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None and hit[0] == version:
            await send(hit[1])
            await send({"type": "http.response.body", "body": hit[2]})
            return
        start: Message = {}
        body: list[bytes] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, capture)
        if start.get("status") == 200:
            with self._lock:
                self._entries[key] = (version, start, b"".join(body))
                self._entries.move_to_end(key)
                while len(self._entries) > self._limit:
                    self._entries.popitem(last=False)
