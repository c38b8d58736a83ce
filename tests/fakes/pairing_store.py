"""A stand-in for the OpenClaw gateway's pairing store: the same SQLite tables and columns
that openclaw 2026.9.6 writes (``device_pairing_paired``, ``device_bootstrap_tokens`` in
``<stateDir>/state/openclaw.sqlite``, WAL mode), written the way the gateway does, with one
connection. For tests that need a store without running the real gateway."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["FakeDevice", "PairingStore", "SCHEMA"]

SCHEMA = """
CREATE TABLE device_pairing_paired (device_id TEXT PRIMARY KEY, public_key TEXT NOT NULL,
  display_name TEXT, operator_label TEXT, platform TEXT, device_family TEXT, client_id TEXT,
  client_mode TEXT, browser_origin TEXT, role TEXT, roles_json TEXT, scopes_json TEXT,
  approved_scopes_json TEXT, remote_ip TEXT, tokens_json TEXT, approved_via TEXT,
  node_surface_json TEXT, pending_node_surface_json TEXT, created_at_ms INTEGER NOT NULL,
  approved_at_ms INTEGER NOT NULL, last_seen_at_ms INTEGER, last_seen_reason TEXT);
CREATE TABLE device_bootstrap_tokens (token_key TEXT PRIMARY KEY, token TEXT NOT NULL,
  setup_id TEXT, ts INTEGER NOT NULL, device_id TEXT, public_key TEXT, profile_json TEXT,
  redeemed_profile_json TEXT, pending_profile_json TEXT, issued_at_ms INTEGER NOT NULL,
  last_used_at_ms INTEGER);
"""


@dataclass(frozen=True)
class FakeDevice:
    """An Ed25519 device identity as OpenClaw clients make one."""

    device_id: str  # sha256 hex of the raw public key
    public_key: str  # raw, base64url without padding

    @classmethod
    def new(cls) -> FakeDevice:
        pub = Ed25519PrivateKey.generate().public_key()
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(
            hashlib.sha256(raw).hexdigest(), base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        )


class PairingStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        (state_dir / "state").mkdir(parents=True, exist_ok=True)
        self.db = state_dir / "state" / "openclaw.sqlite"
        self.conn = sqlite3.connect(self.db, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.executescript(SCHEMA)

    def pair(
        self,
        dev: FakeDevice,
        token: str,
        *,
        role: str = "operator",
        revoked: bool = False,
        client_id: str = "cli",
        client_mode: str = "cli",
        issuer: dict[str, str] | None = None,
    ) -> None:
        entry: dict[str, object] = {"token": token, "role": role, "scopes": [], "createdAtMs": 1}
        if revoked:
            entry["revokedAtMs"] = 2
        if issuer is not None:
            entry["issuer"] = issuer
        self.conn.execute(
            "INSERT OR REPLACE INTO device_pairing_paired (device_id, public_key, client_id, "
            "client_mode, role, tokens_json, created_at_ms, approved_at_ms) "
            "VALUES (?,?,?,?,?,?,1,1)",
            (
                dev.device_id,
                dev.public_key,
                client_id,
                client_mode,
                role,
                json.dumps({role: entry}),
            ),
        )

    def unpair(self, dev: FakeDevice) -> None:
        self.conn.execute("DELETE FROM device_pairing_paired WHERE device_id = ?", (dev.device_id,))

    def bootstrap(self, token: str, issued_at_ms: int, dev: FakeDevice | None = None) -> None:
        self.conn.execute(
            "INSERT INTO device_bootstrap_tokens (token_key, token, ts, device_id, public_key, "
            "issued_at_ms) VALUES (?,?,?,?,?,?)",
            (
                token,
                token,
                issued_at_ms,
                dev.device_id if dev else None,
                dev.public_key if dev else None,
                issued_at_ms,
            ),
        )

    def close(self) -> None:
        self.conn.close()
