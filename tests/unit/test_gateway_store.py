"""The read-only view of the gateway's pairing store: a real SQLite file in WAL mode, with
the columns openclaw 2026.9.6 writes (the e2e suite reads the real gateway's own)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from pathlib import Path

import pytest

from proxy.access.connect_auth import StoreSnapshot, StoreUnavailable
from proxy.access.tokens import digest
from proxy.gateway_store import GatewayStore, default_state_dir, read_snapshot, store_version

KEY = "wHUlMJIgB-H4wp3zJ67rfJm9OVPSqa-yTeGRSt7qzFw"
DEV = "bf900af3c23530056b71b523c9e9de1fa6ebf88daab9b54d487f7ac0e606f720"

SCHEMA = """
CREATE TABLE device_pairing_paired (device_id TEXT PRIMARY KEY, public_key TEXT NOT NULL,
  display_name TEXT, client_id TEXT, client_mode TEXT, role TEXT, roles_json TEXT,
  scopes_json TEXT, approved_scopes_json TEXT, tokens_json TEXT, created_at_ms INTEGER,
  approved_at_ms INTEGER);
CREATE TABLE device_bootstrap_tokens (token_key TEXT PRIMARY KEY, token TEXT NOT NULL,
  setup_id TEXT, ts INTEGER, device_id TEXT, public_key TEXT, profile_json TEXT,
  redeemed_profile_json TEXT, pending_profile_json TEXT, issued_at_ms INTEGER NOT NULL,
  last_used_at_ms INTEGER);
"""


class Gateway:
    """Plays the gateway's writer: one connection, WAL mode, as the real one runs."""

    def __init__(self, state_dir: Path) -> None:
        (state_dir / "state").mkdir(parents=True)
        self.db = state_dir / "state" / "openclaw.sqlite"
        self.conn = sqlite3.connect(self.db, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.executescript(SCHEMA)

    def pair(self, token: str, *, revoked: bool = False, client_id: str = "cli") -> None:
        entry: dict[str, object] = {"token": token, "role": "operator", "scopes": [],
                                    "createdAtMs": 1}
        if revoked:
            entry["revokedAtMs"] = 2
        self.conn.execute(
            "INSERT OR REPLACE INTO device_pairing_paired (device_id, public_key, client_id, "
            "client_mode, tokens_json, created_at_ms, approved_at_ms) VALUES (?,?,?,?,?,1,1)",
            (DEV, KEY, client_id, "cli", json.dumps({"operator": entry})))

    def bootstrap(self, token: str, issued: int) -> None:
        self.conn.execute("INSERT INTO device_bootstrap_tokens (token_key, token, ts, "
                          "issued_at_ms) VALUES (?,?,?,?)", (token, token, issued, issued))

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def gw(tmp_path: Path) -> Gateway:
    g = Gateway(tmp_path / "openclaw-state")
    yield g  # type: ignore[misc]
    g.close()


def test_snapshot_holds_digests_only(gw: Gateway) -> None:
    gw.pair("device-token-1")
    gw.bootstrap("boot-1", 1_800_000_000_000)
    snap = read_snapshot(str(gw.db))
    assert snap.devices[DEV].public_key == KEY
    assert snap.devices[DEV].tokens["operator"].digest == digest("device-token-1")
    assert not snap.devices[DEV].tokens["operator"].revoked
    assert [b.digest for b in snap.bootstrap] == [digest("boot-1")]
    assert "device-token-1" not in repr(snap) and "boot-1" not in repr(snap)


def test_every_commit_changes_the_version(gw: Gateway) -> None:
    # Many commits within one timestamp tick, rows of the same size: still all distinct.
    seen = {store_version(str(gw.db))}
    for i in range(20):
        gw.pair(f"device-token-{i % 2}", revoked=bool(i % 2))
        seen.add(store_version(str(gw.db)))
    assert len(seen) == 21


def test_revocation_is_seen_on_the_next_use(gw: Gateway) -> None:
    gw.pair("device-token-1")
    store = GatewayStore(str(gw.db.parent.parent))
    assert store.current() is None  # nothing read yet
    snap = asyncio.run(store.refresh())
    assert isinstance(snap, StoreSnapshot) and not snap.devices[DEV].tokens["operator"].revoked
    assert store.current() is snap  # unchanged: no re-read
    gw.pair("device-token-1", revoked=True)
    assert store.current() is None  # changed: must re-read before deciding
    snap2 = asyncio.run(store.refresh())
    assert isinstance(snap2, StoreSnapshot) and snap2.devices[DEV].tokens["operator"].revoked
    assert store.reads == 2


def test_concurrent_refreshes_share_one_read(gw: Gateway) -> None:
    gw.pair("device-token-1")
    store = GatewayStore(str(gw.db.parent.parent))

    async def many() -> list[object]:
        return list(await asyncio.gather(*(store.refresh() for _ in range(10))))

    results = asyncio.run(many())
    assert store.reads == 1 and all(r is results[0] for r in results)


def test_the_store_is_never_written(gw: Gateway) -> None:
    gw.pair("device-token-1")
    before = store_version(str(gw.db))
    read_snapshot(str(gw.db))
    assert store_version(str(gw.db)) == before


def test_missing_store_fails_closed_with_one_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = GatewayStore(str(tmp_path / "nowhere"))
    with caplog.at_level(logging.ERROR, logger="clawgate"):
        for _ in range(3):
            snap = store.current()
            assert isinstance(snap, StoreUnavailable)
    assert "does not exist" in snap.reason
    lines = [r.getMessage() for r in caplog.records if "device store unavailable" in
             r.getMessage()]
    assert len(lines) == 1 and str(tmp_path / "nowhere") in lines[0]
    assert not (tmp_path / "nowhere").exists()  # mode=ro never creates it


def test_unreadable_schema_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    conn = sqlite3.connect(tmp_path / "state" / "openclaw.sqlite")
    conn.execute("CREATE TABLE something_else (x)")
    conn.commit()
    conn.close()
    snap = asyncio.run(GatewayStore(str(tmp_path)).refresh())
    assert isinstance(snap, StoreUnavailable) and "no such table" in snap.reason


def test_store_that_is_not_a_database_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "state" / "openclaw.sqlite").mkdir(parents=True)  # a directory, not a file
    store = GatewayStore(str(tmp_path))
    assert isinstance(store.current(), StoreUnavailable)
    snap = asyncio.run(store.refresh())
    assert isinstance(snap, StoreUnavailable) and snap.reason.startswith("cannot read ")
    (tmp_path / "other").write_bytes(b"garbage, not sqlite" * 100)
    (tmp_path / "other-state").mkdir()
    os.rename(tmp_path / "other", tmp_path / "other-state" / "x")
    assert isinstance(read_or_error(tmp_path / "other-state" / "x"), StoreUnavailable)


def read_or_error(db: Path) -> object:
    store = GatewayStore(str(db.parent))
    store.db = str(db)
    return asyncio.run(store.refresh())


def test_garbage_rows_are_skipped(gw: Gateway) -> None:
    gw.conn.execute("INSERT INTO device_pairing_paired (device_id, public_key, tokens_json) "
                    "VALUES ('a', 'k', 'not json'), ('b', 'k', '{\"operator\": 5}'), "
                    "('c', 'k', '{\"operator\": {\"token\": \"  \"}}')")
    snap = read_snapshot(str(gw.db))
    assert {k: dict(v.tokens) for k, v in snap.devices.items()} == {"a": {}, "b": {}, "c": {}}


@pytest.mark.parametrize(("env", "expected"), [
    ({"OPENCLAW_STATE_DIR": "/srv/oc"}, "/srv/oc"),
    ({"OPENCLAW_HOME": "/home/gw"}, "/home/gw/.openclaw"),
    ({"OPENCLAW_STATE_DIR": " ", "OPENCLAW_HOME": "/h"}, "/h/.openclaw"),
])
def test_default_state_dir(env: dict[str, str], expected: str) -> None:
    assert default_state_dir(env) == expected
