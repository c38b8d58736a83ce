"""Whois cache poisoning: an address reused by another node after a network map change.

clawgate caches whois answers by peer IP. When tailscaled says the network map changed
(alice's device removed, bob's device added with the same 100.x address), the next
connection from that address must be bob, not alice from the cache; and a whois answer
that was in flight across the change must not be cached either (it may describe the old
owner). The fake tailscaled is a real LocalAPI server; the held answer below is computed
before the change and delivered after it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.fakes.fake_gateway import FakeGateway
from tests.fakes.fake_tailscaled import FakeTailscaled, user_peer
from tests.netns import CI_V4, PHONE_V4, PHONE_V6, Tailnet
from tests.support import (
    ALICE,
    HOST,
    IDENTITY_HEADER,
    identity_config,
    iso_in,
    raw_send,
    running,
    status_of,
    tailnet_peers,
)

BOB = "bob@example.com"
_ids = itertools.count()


def bob_body() -> dict[str, Any]:
    """bob's phone, a different node (IDs, key) that got alice's old addresses."""
    body = user_peer(PHONE_V4, BOB, "bob-phone", ipv6=PHONE_V6, display_name="Bob Example")
    node = body["Node"]
    node["StableID"], node["ID"], node["Key"] = "nB0BB0BB0BCNTRL", 4242, "nodekey:" + "b" * 64
    return body


class HoldingTailscaled(FakeTailscaled):
    """Answers one chosen whois with the table as it is NOW, but only when released."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, peers=tailnet_peers())
        self.self_key_expiry = iso_in(days=60)
        self.hold_ip: str | None = None
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def _whois(self, request: web.Request) -> web.StreamResponse:
        addr = request.query.get("addr", "")
        ip = addr.rsplit(":", 1)[0] if addr.count(":") == 1 else addr
        if ip != self.hold_ip:
            return await super()._whois(request)
        self.hold_ip = None
        self.whois_calls[ip] += 1
        data = json.dumps(self._nodes[self._by_ip[ip]], indent="\t").encode()
        self.entered.set()
        await self.release.wait()
        return web.Response(body=data, headers={"Content-Type": "application/json"})


@pytest.fixture
async def ts() -> AsyncIterator[HoldingTailscaled]:
    d = tempfile.mkdtemp(prefix="cgts-", dir="/tmp")
    fake = HoldingTailscaled(Path(d) / "tailscaled.sock")
    await fake.start()
    try:
        yield fake
    finally:
        fake.release.set()
        await fake.stop()
        shutil.rmtree(d, ignore_errors=True)


async def who(tailnet: Tailnet, gw: FakeGateway, role: str, token: str) -> str | None:
    n = next(_ids)
    resp = await raw_send(
        tailnet,
        role,
        (
            f"GET /headers?n={n} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n"
        ).encode(),
    )
    assert status_of(resp) == 200, resp[:200]
    (rec,) = [r for r in gw.requests if r.target == f"/headers?n={n}"]
    users = rec.header_all(IDENTITY_HEADER)
    assert len(users) == 1
    return users[0]


async def reassign_phone_address(
    tailnet: Tailnet, gw: FakeGateway, ts: HoldingTailscaled, token: str
) -> None:
    """alice's node leaves, bob's arrives on the same IP; wait until clawgate flushed.

    The CI server's identity is cached: once asking for it makes a new whois call, the
    flush has happened (the bus is asynchronous; this is its observable effect).
    """
    ci_calls = ts.whois_calls[CI_V4]
    ts.remove_peer(PHONE_V4)
    ts.add_peer(PHONE_V4, bob_body())

    async def probe() -> bool:
        await who(tailnet, gw, "ci", token)
        return ts.whois_calls[CI_V4] > ci_calls

    for _ in range(100):
        if await probe():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the network map change was not seen")


async def test_reused_address_is_the_new_node(
    tailnet: Tailnet, fake_gateway: FakeGateway, ts: HoldingTailscaled, tmp_path: Path
) -> None:
    async with running(
        tailnet, tmp_path / "cg", identity_config(fake_gateway, ts.socket_path)
    ) as cg:
        token = cg.tokens["phone"]
        assert await who(tailnet, fake_gateway, "phone", token) == ALICE
        assert await who(tailnet, fake_gateway, "phone", token) == ALICE
        assert ts.whois_calls[PHONE_V4] == 1  # the second one came from the cache
        await who(tailnet, fake_gateway, "ci", token)
        await reassign_phone_address(tailnet, fake_gateway, ts, token)
        assert await who(tailnet, fake_gateway, "phone", token) == BOB
        assert ts.whois_calls[PHONE_V4] == 2
        assert await who(tailnet, fake_gateway, "phone", token) == BOB


async def test_answer_in_flight_across_the_change_is_not_cached(
    tailnet: Tailnet, fake_gateway: FakeGateway, ts: HoldingTailscaled, tmp_path: Path
) -> None:
    async with running(
        tailnet, tmp_path / "cg", identity_config(fake_gateway, ts.socket_path)
    ) as cg:
        token = cg.tokens["phone"]
        await who(tailnet, fake_gateway, "ci", token)  # cached: the flush probe
        ts.hold_ip = PHONE_V4
        first = asyncio.ensure_future(who(tailnet, fake_gateway, "phone", token))
        async with asyncio.timeout(5):
            await ts.entered.wait()  # alice's answer is computed and held
        await reassign_phone_address(tailnet, fake_gateway, ts, token)
        ts.release.set()  # ... and delivered after the change
        assert await first in (ALICE, BOB)  # that connection's own, one-off answer
        assert await who(tailnet, fake_gateway, "phone", token) == BOB
        assert ts.whois_calls[PHONE_V4] == 2  # asked again: the held answer was not stored
