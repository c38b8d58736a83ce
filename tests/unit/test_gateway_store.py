"""The read-only view of the gateway's pairing store: a real SQLite file in WAL mode, with
the columns openclaw 2026.9.6 writes (the e2e suite reads the real gateway's own)."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.core.connect_auth import StoreSnapshot, StoreUnavailable
from proxy.core.tokens import digest
from proxy.gateway_store import GatewayStore, default_state_dir, read_snapshot, store_version
from tests.fakes.pairing_store import FakeDevice, PairingStore

DEV = FakeDevice.new()


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[PairingStore]:
    g = PairingStore(tmp_path / "openclaw-state")
    yield g
    g.close()


def test_snapshot_holds_digests_only(gw: PairingStore) -> None:
    gw.pair(DEV, "device-token-1")
    gw.bootstrap("boot-1", 1_800_000_000_000)
    snap = read_snapshot(str(gw.db))
    assert snap.devices[DEV.device_id].public_key == DEV.public_key
    assert snap.devices[DEV.device_id].tokens["operator"].digest == digest("device-token-1")
    assert not snap.devices[DEV.device_id].tokens["operator"].revoked
    assert [b.digest for b in snap.bootstrap] == [digest("boot-1")]
    assert "device-token-1" not in repr(snap) and "boot-1" not in repr(snap)


def test_every_commit_changes_the_version(gw: PairingStore) -> None:
    # Many commits within one timestamp tick, rows of the same size: still all distinct.
    seen = {store_version(str(gw.db))}
    for i in range(20):
        gw.pair(DEV, f"device-token-{i % 2}", revoked=bool(i % 2))
        seen.add(store_version(str(gw.db)))
    assert len(seen) == 21


def test_revocation_is_seen_on_the_next_use(gw: PairingStore) -> None:
    gw.pair(DEV, "device-token-1")
    store = GatewayStore(str(gw.db.parent.parent))
    assert store.current() is None  # nothing read yet
    snap = asyncio.run(store.refresh())
    assert isinstance(snap, StoreSnapshot)
    assert not snap.devices[DEV.device_id].tokens["operator"].revoked
    assert store.current() is snap  # unchanged: no re-read
    gw.pair(DEV, "device-token-1", revoked=True)
    assert store.current() is None  # changed: must re-read before deciding
    snap2 = asyncio.run(store.refresh())
    assert isinstance(snap2, StoreSnapshot)
    assert snap2.devices[DEV.device_id].tokens["operator"].revoked
    assert store.reads == 2


def test_concurrent_refreshes_share_one_read(gw: PairingStore) -> None:
    gw.pair(DEV, "device-token-1")
    store = GatewayStore(str(gw.db.parent.parent))

    async def many() -> list[object]:
        return list(await asyncio.gather(*(store.refresh() for _ in range(10))))

    results = asyncio.run(many())
    assert store.reads == 1 and all(r is results[0] for r in results)


def test_the_store_is_never_written(gw: PairingStore) -> None:
    gw.pair(DEV, "device-token-1")
    before = store_version(str(gw.db))
    read_snapshot(str(gw.db))
    assert store_version(str(gw.db)) == before


def test_missing_store_fails_closed_with_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = GatewayStore(str(tmp_path / "nowhere"))
    with caplog.at_level(logging.ERROR, logger="clawgate"):
        for _ in range(3):
            snap = store.current()
            assert isinstance(snap, StoreUnavailable)
    assert isinstance(snap, StoreUnavailable)  # (for mypy: the loop ran)
    assert "does not exist" in snap.reason
    lines = [r.getMessage() for r in caplog.records if "device store unavailable" in r.getMessage()]
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


def test_garbage_rows_are_skipped(gw: PairingStore) -> None:
    gw.conn.execute(
        "INSERT INTO device_pairing_paired (device_id, public_key, tokens_json, "
        "created_at_ms, approved_at_ms) VALUES ('a', 'k', 'not json', 1, 1), "
        "('b', 'k', '{\"operator\": 5}', 1, 1), "
        "('c', 'k', '{\"operator\": {\"token\": \"  \"}}', 1, 1)"
    )
    snap = read_snapshot(str(gw.db))
    assert {k: dict(v.tokens) for k, v in snap.devices.items()} == {"a": {}, "b": {}, "c": {}}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"OPENCLAW_STATE_DIR": "/srv/oc"}, "/srv/oc"),
        ({"OPENCLAW_HOME": "/home/gw"}, "/home/gw/.openclaw"),
        ({"OPENCLAW_STATE_DIR": " ", "OPENCLAW_HOME": "/h"}, "/h/.openclaw"),
    ],
)
def test_default_state_dir(env: dict[str, str], expected: str) -> None:
    assert default_state_dir(env) == expected
