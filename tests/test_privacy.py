"""Pseudonymisation and the properties allow-list at parse time.

The same generated data runs with and without a key: both runs' metrics equal the
oracle computed on the clear data (generator's expected.json), the pseudonymised run's
archive holds no clear user or device id, and only allow-listed properties are stored.
"""

from __future__ import annotations

import json
import os

import pytest

from pipeline import oracle
from pipeline.compare import differences, latest_from_duckdb
from pipeline.generator import GeneratorConfig, write_dataset
from pipeline.job import run
from tests.sent import sent_records
from transforms.archive import archive_files, read_archive_records
from transforms.events import Event
from transforms.pseudonymize import (
    PSEUDONYM_HEX_DIGITS,
    KeySource,
    PrivacyPolicy,
    pseudonym,
)

KEY = b"k" * 16 + b"0123456789abcdef"  # 32 bytes
ALLOWED = "feature,page"


def test_pseudonym_is_keyed_truncated_hex_and_deterministic() -> None:
    a = pseudonym(KEY, "u1")
    assert a == pseudonym(KEY, "u1") and len(a) == PSEUDONYM_HEX_DIGITS
    int(a, 16)
    assert a != pseudonym(KEY, "u2")
    assert a != pseudonym(KEY[::-1], "u1"), "another key must give another pseudonym"


def test_short_keys_are_refused_with_what_to_do(tmp_path, monkeypatch) -> None:
    (tmp_path / "short").write_bytes(b"too short\n")
    with pytest.raises(ValueError, match="/dev/urandom"):
        KeySource(file=str(tmp_path / "short")).load()
    monkeypatch.setenv("CLICKSTREAM_TEST_KEY", KEY.decode() + "\n")
    assert KeySource(env="CLICKSTREAM_TEST_KEY").load() == KEY


def test_secret_manager_key_source_with_a_fake_client(monkeypatch) -> None:
    # No Secret Manager emulator exists: this fakes the client, and checks only that the
    # source asks for the named version and takes its payload as the key.
    from google.cloud import secretmanager

    asked = []

    class FakeClient:
        def access_secret_version(self, name: str):
            asked.append(name)
            return type("Response", (), {"payload": type("P", (), {"data": KEY + b"\n"})})

    monkeypatch.setattr(secretmanager, "SecretManagerServiceClient", FakeClient)
    name = "projects/p/secrets/clickstream-key/versions/3"
    assert KeySource(secret=name).load() == KEY and asked == [name]


def test_policy_keeps_empty_user_ids_empty_and_drops_unlisted_properties(tmp_path) -> None:
    (tmp_path / "key").write_bytes(KEY)
    bound = PrivacyPolicy(key=KeySource(file=str(tmp_path / "key")),
                          properties_allowlist=frozenset({"feature"})).bind()
    signed_in = Event("e1", "tap", 1, "d1", "u1", "s1", "ios", {"feature": "x", "email": "@"})
    anonymous = Event("e2", "tap", 1, "d1", "", None, None, {})
    out = bound.apply([signed_in, anonymous])
    assert out[0].user_id == pseudonym(KEY, "u1")
    assert out[0].device_id == out[1].device_id == pseudonym(KEY, "d1")
    assert out[0].session_id == pseudonym(KEY, "s1")
    assert out[0].properties == {"feature": "x"}
    # "" is "no user": the identity must stay the device, as in the clear run.
    assert out[1].user_id == "" and out[1].identity == "device:" + pseudonym(KEY, "d1")
    # The per-worker HMAC (precomputed key states) equals the reference one, for
    # short and long (pre-hashed, RFC 2104) keys alike.
    (tmp_path / "long").write_bytes(KEY * 3)
    long_key = PrivacyPolicy(key=KeySource(file=str(tmp_path / "long"))).bind()
    for value in ("u1", "d" * 300, "é"):
        assert long_key.of(value) == pseudonym(KEY * 3, value)
        assert bound.of(value) == pseudonym(KEY, value)
    dropped = PrivacyPolicy(session_ids="drop").bind().apply([signed_in])[0]
    assert dropped.session_id is None and dropped.user_id == "u1"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy")
    data = str(root / "data")
    write_dataset(data, GeneratorConfig(events=3000, seed=21))
    (root / "key").write_bytes(KEY + b"\n")
    out = {}
    for name, flags in (("clear", []),
                        ("pseudonymized", ["--pseudonymize_key_file", str(root / "key"),
                                           "--properties_allowlist", ALLOWED])):
        db, archive = str(root / f"{name}.duckdb"), str(root / f"{name}-archive")
        summary = run(["--input_files", os.path.join(data, "events-*.jsonl"),
                       "--duckdb_path", db, "--archive_path", archive, *flags],
                      progress_every_s=60)
        records = [r for path in archive_files(archive) for r in read_archive_records(path)]
        out[name] = (summary, latest_from_duckdb(db), records)
    return data, out


@pytest.mark.integration
@pytest.mark.parametrize("name", ["clear", "pseudonymized"])
def test_metrics_equal_the_oracle_on_clear_data(runs, name) -> None:
    data, out = runs
    with open(os.path.join(data, "expected.json")) as f:
        want = oracle.from_json(json.load(f)["metrics"])
    summary, latest, _ = out[name]
    assert summary.reconciles
    assert differences(latest, want) == []


@pytest.mark.integration
def test_archive_holds_pseudonyms_only(runs) -> None:
    _, out = runs
    clear_records = out["clear"][2]
    stored = out["pseudonymized"][2]
    assert len(stored) == len(clear_records) > 0
    users = {r["user_id"] for r in clear_records if r["user_id"]}
    devices = {r["device_id"] for r in clear_records}
    sessions = {r["session_id"] for r in clear_records if r["session_id"]}
    stored_users = {r["user_id"] for r in stored if r["user_id"]}
    assert stored_users == {pseudonym(KEY, u) for u in users}
    assert {r["device_id"] for r in stored} == {pseudonym(KEY, d) for d in devices}
    assert {r["session_id"] for r in stored if r["session_id"]} == {
        pseudonym(KEY, s) for s in sessions}
    blob = json.dumps(stored, default=str)
    assert not any(clear in blob for clear in users | devices)


@pytest.mark.integration
def test_only_allowlisted_properties_are_archived_and_the_rest_counted(runs) -> None:
    data, out = runs
    summary, _, stored = out["pseudonymized"]
    allowed = set(ALLOWED.split(","))
    assert {k for r in stored for k in r["properties"]} <= allowed
    clear = out["clear"][2]
    want_dropped = sum(len(set(r["properties"]) - allowed) for r in clear)
    assert want_dropped > 0  # the generator sends app_version, which is not listed
    # Counted before dedup: duplicates' properties are dropped (and counted) as well.
    by_id = {r["event_id"] for r in clear}
    sent = [r for r in sent_records(data) if r.get("event_id") in by_id]
    assert summary.counters["properties_dropped"] >= want_dropped
    assert summary.counters["properties_dropped"] == sum(
        len(set(r.get("properties") or {}) - allowed) for r in sent
        if isinstance(r.get("properties"), dict))
