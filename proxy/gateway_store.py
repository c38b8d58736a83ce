"""The gateway's pairing store, read-only, as the digest-only snapshot the edge gate needs.

OpenClaw 2026.9.6 keeps paired devices (``device_pairing_paired``, role tokens in
``tokens_json``) and setup-code tokens (``device_bootstrap_tokens``) in plaintext in its
SQLite state database, ``<stateDir>/state/openclaw.sqlite`` (WAL mode). This module opens
it read-only, keeps only SHA-256 digests, and re-reads it when it has changed: a cheap
version key (stat of the database and its WAL, the WAL-index header, the database's change
counter) is compared on every use, and a changed store is re-read in a worker thread, one
read at a time. A store that cannot be read is an error snapshot: the gate fails closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from typing import Any

from .core.connect_auth import (
    BootstrapRecord,
    DeviceRecord,
    DeviceTokenRecord,
    StoreSnapshot,
    StoreUnavailable,
    normalize_public_key,
)
from .core.tokens import digest

__all__ = ["DB_RELATIVE", "GatewayStore", "default_state_dir", "read_snapshot", "store_version"]

log = logging.getLogger("clawgate")

DB_RELATIVE = os.path.join("state", "openclaw.sqlite")
# A store that failed to read is retried at most this often while it looks unchanged.
ERROR_RETRY_SECONDS = 1.0
_BROWSER_CLIENT_IDS = frozenset({"openclaw-control-ui", "webchat-ui"})

Version = tuple[Any, ...]


def default_state_dir(env: dict[str, str] | None = None) -> str:
    """The gateway's own default: $OPENCLAW_STATE_DIR, else ~/.openclaw."""
    env = dict(os.environ) if env is None else env
    override = (env.get("OPENCLAW_STATE_DIR") or "").strip()
    if override:
        return os.path.expanduser(override)
    home = (env.get("OPENCLAW_HOME") or "").strip() or os.path.expanduser("~")
    return os.path.join(home, ".openclaw")


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _head(path: str, n: int, offset: int = 0) -> bytes | None:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(n)
    except FileNotFoundError:
        return None


def store_version(db: str) -> Version:
    """Changes whenever a transaction commits: file timestamps alone are too coarse (a
    jiffy), so the WAL-index header (its change counter and frame count) and the database
    header's change counter are part of it. Raises OSError if the database is unreadable."""
    db_key = _stat_key(db)
    if db_key is None:
        raise FileNotFoundError(f"{db} does not exist")
    return (db_key, _head(db, 4, 24), _stat_key(db + "-wal"), _head(db + "-shm", 48))


def _json(value: Any) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return None


def read_snapshot(db: str) -> StoreSnapshot:
    """Read both tables in one read transaction. Raises sqlite3.Error/OSError/ValueError."""
    # mode=ro: never writes the gateway's database (nor creates it if it is missing).
    conn = sqlite3.connect(
        f"file:{db}?mode=ro", uri=True, timeout=2.0, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute("PRAGMA query_only = 1")
        conn.execute("BEGIN")
        paired = conn.execute(
            "SELECT device_id, public_key, client_id, client_mode, tokens_json "
            "FROM device_pairing_paired"
        ).fetchall()
        boot = conn.execute(
            "SELECT token, issued_at_ms, device_id, public_key FROM device_bootstrap_tokens"
        ).fetchall()
        conn.execute("COMMIT")
    finally:
        conn.close()
    devices: dict[str, DeviceRecord] = {}
    for device_id, public_key, client_id, client_mode, tokens_json in paired:
        if not isinstance(device_id, str) or not isinstance(public_key, str):
            continue
        tokens: dict[str, DeviceTokenRecord] = {}
        raw = _json(tokens_json)
        if isinstance(raw, dict):
            for role, entry in raw.items():
                if (
                    not isinstance(entry, dict)
                    or not isinstance(entry.get("token"), str)
                    or not entry["token"].strip()
                ):
                    continue
                issuer_raw = entry.get("issuer")
                issuer: dict[str, Any] = issuer_raw if isinstance(issuer_raw, dict) else {}
                kind = issuer.get("kind") if isinstance(issuer.get("kind"), str) else None
                gen = issuer.get("generation")
                tokens[str(role).strip()] = DeviceTokenRecord(
                    digest=digest(entry["token"]),
                    revoked=bool(entry.get("revokedAtMs")),
                    issuer_kind=kind,
                    issuer_generation=gen if isinstance(gen, str) else None,
                )
        browser = (isinstance(client_mode, str) and client_mode.strip().lower() == "webchat") or (
            isinstance(client_id, str) and client_id.strip().lower() in _BROWSER_CLIENT_IDS
        )
        devices[device_id.strip()] = DeviceRecord(
            public_key=normalize_public_key(public_key) or public_key,
            tokens=tokens,
            browser=browser,
        )
    bootstrap = []
    for token, issued, b_device, b_key in boot:
        if not isinstance(token, str) or not token.strip() or not isinstance(issued, int | float):
            continue
        bootstrap.append(
            BootstrapRecord(
                digest=digest(token.strip()),
                issued_at_ms=int(issued),
                device_id=b_device.strip()
                if isinstance(b_device, str) and b_device.strip()
                else None,
                public_key=(normalize_public_key(b_key) or b_key)
                if isinstance(b_key, str) and b_key.strip()
                else None,
            )
        )
    return StoreSnapshot(devices=devices, bootstrap=tuple(bootstrap))


class GatewayStore:
    """A cached, version-checked view of one gateway state database."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.db = os.path.join(state_dir, DB_RELATIVE)
        self._snap: StoreSnapshot | StoreUnavailable | None = None
        self._version: Version | None = None
        self._failed_at = 0.0
        self._reading: asyncio.Future[StoreSnapshot | StoreUnavailable] | None = None
        self._last_error: str | None = None
        self.reads = 0

    def current(self) -> StoreSnapshot | StoreUnavailable | None:
        """The snapshot if it is still current, else None (call ``refresh``)."""
        try:
            version = store_version(self.db)
        except OSError as exc:
            return self._failed(f"cannot read {self.db}: {exc.strerror or exc}")
        if self._snap is None or version != self._version:
            return None
        if (
            isinstance(self._snap, StoreUnavailable)
            and time.monotonic() - self._failed_at >= ERROR_RETRY_SECONDS
        ):
            return None
        return self._snap

    def _failed(self, reason: str) -> StoreUnavailable:
        snap = StoreUnavailable(reason)
        if reason != self._last_error:
            # One line per distinct failure, not one per refused client.
            log.error(
                "gateway device store unavailable, device and bootstrap tokens are "
                "refused at the edge: %s",
                reason,
            )
            self._last_error = reason
        self._snap, self._version, self._failed_at = snap, None, time.monotonic()
        return snap

    async def refresh(self) -> StoreSnapshot | StoreUnavailable:
        """Re-read the store in a worker thread; concurrent callers share one read."""
        if self._reading is not None:
            return await asyncio.shield(self._reading)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[StoreSnapshot | StoreUnavailable] = loop.create_future()
        self._reading = fut
        try:
            result = await asyncio.to_thread(self._read_versioned)
        except BaseException as exc:
            self._reading = None
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it themselves
            raise
        self._reading = None
        snap, version = result
        if isinstance(snap, StoreUnavailable):
            snap = self._failed(snap.reason)
        else:
            if self._last_error is not None:
                log.info("gateway device store readable again: %s", self.db)
                self._last_error = None
            self._snap, self._version = snap, version
        fut.set_result(snap)
        return snap

    def _read_versioned(self) -> tuple[StoreSnapshot | StoreUnavailable, Version | None]:
        # The version is taken before the read: a commit during the read leaves the
        # cached version older than the data, so the next use reads again (never newer).
        self.reads += 1
        try:
            version = store_version(self.db)
            return read_snapshot(self.db), version
        except (OSError, sqlite3.Error, ValueError) as exc:
            return StoreUnavailable(f"cannot read {self.db}: {exc}"), None
