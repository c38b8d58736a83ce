"""Failed authentications count against the Tailscale node, not against 127.0.0.1.

Under userspace networking (``tailscaled --tun=userspace-networking``) every tailnet peer
arrives from 127.0.0.1. The attack: one peer sends a few wrong tokens (or wrong logins)
and the whole tailnet is locked out. With whois naming each peer, the lockout is that
node's; other peers, and local processes (whose own key is "local"), are served.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from tests.fakes.fake_gateway import FakeGateway
from tests.fakes.fake_tailscaled import FakeTailscaled, user_peer
from tests.netns import Tailnet
from tests.support import (
    ALICE,
    PORT,
    alice_body,
    ci_body,
    clawgate_config,
    connect_bound,
    fake_tailscaled,
    loopback_socket,
    running,
    stable_id,
)
from tests.util import build_request, read_response

COUNT = 3
BOB = user_peer("100.77.0.9", "bob@example.com", "bob-phone")


async def as_peer(
    tailnet: Tailnet, ts: FakeTailscaled, body: dict[str, Any] | None, request: bytes
) -> int:
    """One request from 127.0.0.1:<ephemeral>, which whois names ``body`` (None: a local
    process)."""
    sock, port = await loopback_socket(tailnet)
    if body is not None:
        ts.add_loopback(port, body)
    try:
        await connect_bound(sock, "127.0.0.1", PORT)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(request)
            return (await read_response(reader, timeout=10)).status
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    finally:
        ts.remove_loopback(port)


def bearer(token: str) -> bytes:
    return build_request(
        "GET",
        "/echo",
        [("Authorization", f"Bearer {token}"), ("Connection", "close")],
        host=f"127.0.0.1:{PORT}",
    )


def login(token: str) -> bytes:
    return build_request(
        "POST",
        "/__clawgate/login",
        [("Content-Type", "application/x-www-form-urlencoded")],
        f"token={token}".encode(),
        host=f"127.0.0.1:{PORT}",
    )


async def test_one_userspace_peer_cannot_lock_out_the_others(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with fake_tailscaled() as ts:
        ts.tun = False
        cfg = clawgate_config(
            fake_gateway, ts.socket_path, host="127.0.0.1", tailscale={"requireIdentity": False}
        )
        cfg["gateway"]["requireToken"] = True
        cfg["limits"] = {"failedAuthCount": COUNT, "failedAuthWindow": 60, "failedAuthLockout": 300}
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            token = cg.tokens["phone"]
            alice, ci = alice_body(), ci_body()

            # alice guesses tokens: after COUNT failures alice (her node) is locked out.
            for _ in range(COUNT):
                assert await as_peer(tailnet, ts, alice, bearer("wrong")) == 401
            assert await as_peer(tailnet, ts, alice, bearer(token)) == 429
            assert await as_peer(tailnet, ts, alice, login(token)) == 429
            # Everyone else from 127.0.0.1 is served.
            assert await as_peer(tailnet, ts, ci, bearer(token)) == 200
            assert await as_peer(tailnet, ts, BOB, bearer(token)) == 200
            assert await as_peer(tailnet, ts, None, bearer(token)) == 200
            (lock,) = [r for r in cg.access_log() if r.get("event") == "lockout"]
            assert lock["key"] == f"node:{stable_id(alice)}" and lock["login"] == ALICE

            # Guessing at the login page counts against the node too (whois first).
            for _ in range(COUNT):
                assert await as_peer(tailnet, ts, ci, login("wrong")) == 401
            assert await as_peer(tailnet, ts, ci, login(token)) == 429
            assert await as_peer(tailnet, ts, ci, bearer(token)) == 429
            assert await as_peer(tailnet, ts, BOB, login(token)) == 303
            assert await as_peer(tailnet, ts, None, login(token)) == 303

            # A local process (no whois match) locks out local processes only.
            for _ in range(COUNT):
                assert await as_peer(tailnet, ts, None, bearer("wrong")) == 401
            assert await as_peer(tailnet, ts, None, bearer(token)) == 429
            assert await as_peer(tailnet, ts, BOB, bearer(token)) == 200
            keys = [r["key"] for r in cg.access_log() if r.get("event") == "lockout"]
            assert keys == [f"node:{stable_id(alice)}", f"node:{stable_id(ci)}", "local"]
