"""Privacy at parse time: keyed pseudonyms for the identifying fields, and an allow-list
for the free-form properties.

A pseudonym is HMAC-SHA-256(key, id) truncated to 128 bits, as 32 hex digits. The same
id under the same key always gives the same pseudonym, so everything computed from
identities (active users, feature users, funnels, dedup by event_id) is unchanged: the
mapping is injective up to collisions, and with 128 bits the chance that any two of n
distinct ids collide is about n² / 2¹²⁹ (n = 10⁹ ids: ~1.5·10⁻²¹). Without the key the
pseudonym cannot be recomputed from a guessed id, which an unkeyed hash could.

The key never enters the pipeline graph: a `KeySource` names where it is (a file, an
environment variable, a Secret Manager secret version) and each worker reads it in
`setup`. docs/privacy.md says what a key rotation changes and what to recompute.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from apache_beam.metrics import Metrics

from transforms.events import Event

METRICS_NAMESPACE = "clickstream"
PSEUDONYM_HEX_DIGITS = 32  # 128 of HMAC-SHA-256's 256 bits
MIN_KEY_BYTES = 32  # a shorter key is guessable faster than the HMAC is breakable
KEY_ENV_DEFAULT = "CLICKSTREAM_PSEUDONYMIZE_KEY"
SESSION_ID_POLICIES = ("pseudonymize", "keep", "drop")
# Ids already seen per worker: users and devices repeat within a bundle and across
# bundles (a heavy user sends thousands of events), and a dict lookup is far cheaper
# than an HMAC. Cleared when full, so memory stays bounded.
_CACHE_LIMIT = 200_000


def pseudonym(key: bytes, value: str) -> str:
    """The stored form of an identifier under `key`."""
    return hmac.digest(key, value.encode("utf-8"), "sha256").hex()[:PSEUDONYM_HEX_DIGITS]


@dataclass(frozen=True)
class KeySource:
    """Where the pseudonymisation key is: a file, an environment variable, or a Secret
    Manager secret version (projects/P/secrets/S/versions/V, Dataflow's way to hand
    workers a secret). Exactly one is set; the key is its bytes, surrounding
    whitespace stripped."""

    file: str = ""
    env: str = ""
    secret: str = ""

    def load(self) -> bytes:
        if self.file:
            with open(self.file, "rb") as f:
                key = f.read().strip()
            where = f"key file {self.file}"
        elif self.env:
            key = os.environ.get(self.env, "").strip().encode("utf-8")
            where = f"environment variable {self.env}"
        elif self.secret:
            from google.cloud import secretmanager

            response = secretmanager.SecretManagerServiceClient().access_secret_version(
                name=self.secret)
            key = response.payload.data.strip()
            where = f"secret {self.secret}"
        else:
            raise ValueError("KeySource names no key")
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(
                f"the pseudonymisation key from {where} has {len(key)} bytes, fewer than "
                f"{MIN_KEY_BYTES}: make one with `head -c 32 /dev/urandom | base64`")
        return key


@dataclass(frozen=True)
class PrivacyPolicy:
    """What parse does to a valid event before anything stores it.

    `key`: pseudonymise user_id and device_id (None: keep them). `session_ids`: what
    happens to session_id ("pseudonymize" needs a key). `properties_allowlist`: the
    property keys kept (None: all)."""

    key: KeySource | None = None
    session_ids: str = "pseudonymize"
    properties_allowlist: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.session_ids not in SESSION_ID_POLICIES:
            raise ValueError(f"session id policy {self.session_ids!r} is not one of "
                             f"{SESSION_ID_POLICIES}")

    @property
    def active(self) -> bool:
        """Whether the policy changes any event (else parse skips it entirely)."""
        return (self.key is not None or self.properties_allowlist is not None
                or self.session_ids == "drop")

    def bind(self) -> Pseudonymizer:
        """The per-worker function (loads the key: call it in DoFn.setup)."""
        return Pseudonymizer(self)


class Pseudonymizer:
    """Applies a PrivacyPolicy to events; counts dropped properties with a Beam counter
    (`properties_dropped`, flushed by `flush_counters`)."""

    def __init__(self, policy: PrivacyPolicy) -> None:
        self._key = policy.key.load() if policy.key is not None else None
        self._cache: dict[str, str] = {}
        self._allowed = policy.properties_allowlist
        keep_sessions = policy.session_ids == "keep" or (
            policy.session_ids == "pseudonymize" and self._key is None)
        self._session: Callable[[str | None], str | None] = (
            (lambda s: s) if keep_sessions
            else (lambda s: None) if policy.session_ids == "drop"
            else self._optional)
        self._dropped = Metrics.counter(METRICS_NAMESPACE, "properties_dropped")
        self._dropped_n = 0

    def of(self, value: str) -> str:
        """The pseudonym of one id (cached)."""
        cached = self._cache.get(value)
        if cached is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            cached = self._cache[value] = pseudonym(self._key, value)  # type: ignore[arg-type]
        return cached

    def _optional(self, value: str | None) -> str | None:
        # "" is no user (Event.identity falls back to the device): it must stay "".
        return self.of(value) if value else value

    def apply(self, events: Iterable[Event]) -> list[Event]:
        # Unpacked and rebuilt positionally: NamedTuple._replace cost ~3x as much.
        key, allowed, cache, of = self._key, self._allowed, self._cache, self.of
        session = self._session
        out: list[Event] = []
        append = out.append
        for (event_id, event_type, t, device, user, session_id, platform, properties,
             attributes) in events:
            if allowed is not None and properties:
                kept = {k: v for k, v in properties.items() if k in allowed}
                self._dropped_n += len(properties) - len(kept)
                properties = kept
            if key is not None:
                device = cache.get(device) or of(device)
                # "" is no user (Event.identity falls back to the device): it stays "".
                if user:
                    user = cache.get(user) or of(user)
            append(Event(event_id, event_type, t, device, user, session(session_id),
                         platform, properties, attributes))
        return out

    def flush_counters(self) -> None:
        if self._dropped_n:
            self._dropped.inc(self._dropped_n)
            self._dropped_n = 0
