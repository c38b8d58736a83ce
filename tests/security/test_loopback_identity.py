"""Loopback is never granted an identity, against the live proxy.

A connection from 127.0.0.1 is a local process unless tailscaled's whois names a tailnet
peer for that exact ip:port (userspace networking). With no whois match it has no
identity: where identity is required it gets 403 (never "local, so trusted"), and where
it is not, whatever identity headers it sends are removed, so the gateway sees none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fakes.fake_gateway import FakeGateway
from tests.netns import GW_V4, Tailnet
from tests.support import (
    ALICE,
    IDENTITY_HEADER,
    PORT,
    fake_tailscaled,
    forwarding_view,
    identity_config,
    raw_send,
    running,
    status_of,
)

SPOOFS = [
    f"{IDENTITY_HEADER}: {ALICE}",
    f"X-Forwarded-User: {ALICE}",
    f"Tailscale-User-Login: {ALICE}",
    "Tailscale-User-Name: Alice",
    "X-Forwarded-For: 100.101.102.103",
    "X_Forwarded_For: 100.101.102.103",
    "Forwarded: for=100.101.102.103",
]


def _config(gw: FakeGateway, sock: str, **ts: Any) -> dict[str, Any]:
    cfg = identity_config(gw, sock, **ts)
    cfg["gateway"]["host"] = [GW_V4, "127.0.0.1"]
    return cfg


async def _local(tailnet: Tailnet, token: str | None, *, spoof: bool) -> int | None:
    lines = ["GET /headers HTTP/1.1", f"Host: 127.0.0.1:{PORT}", "Connection: close"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if spoof:
        lines += SPOOFS
    return status_of(
        await raw_send(tailnet, "gw", ("\r\n".join(lines) + "\r\n\r\n").encode(), host="127.0.0.1")
    )


async def test_loopback_without_whois_match_is_refused_when_identity_is_required(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with fake_tailscaled() as ts:
        async with running(
            tailnet, tmp_path / "both", _config(fake_gateway, ts.socket_path, requireIdentity=True)
        ) as cg:
            token = cg.tokens["phone"]
            assert await _local(tailnet, token, spoof=False) == 403
            assert await _local(tailnet, token, spoof=True) == 403
            assert fake_gateway.requests == []
            rec = await cg.wait_log(
                lambda r: r.get("event") == "decision" and r.get("peer") == "127.0.0.1"
            )
            assert rec["status"] == 403 and "login" not in rec
        # authMode identity: identity alone would do; loopback has none, so nothing does.
        async with running(
            tailnet,
            tmp_path / "identity",
            _config(fake_gateway, ts.socket_path, authMode="identity"),
        ) as cg:
            assert await _local(tailnet, None, spoof=True) == 403
            assert await _local(tailnet, cg.tokens["phone"], spoof=True) == 403
            assert fake_gateway.requests == []
        assert ts.whois_calls["127.0.0.1"] >= 4  # asked every time, never assumed


async def test_loopback_identity_headers_are_stripped(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with (
        fake_tailscaled() as ts,
        running(
            tailnet, tmp_path / "cg", _config(fake_gateway, ts.socket_path, requireIdentity=False)
        ) as cg,
    ):
        assert await _local(tailnet, cg.tokens["phone"], spoof=True) == 200
        (rec,) = fake_gateway.requests
        assert forwarding_view(rec) == {
            "x-forwarded-for": ["127.0.0.1"],
            "x-forwarded-proto": ["http"],
            "x-forwarded-host": [f"127.0.0.1:{PORT}"],
        }
        assert ALICE.encode() not in rec.raw_head
