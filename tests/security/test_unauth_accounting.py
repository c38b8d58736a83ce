"""limits.unauthenticatedPerIp holds until a credential is verified.

A connection counts as unauthenticated from accept until a credential is verified on it. An
exempt request (``/health``, no credential) does not end that, nor does a credential-less
WebSocket upgrade admitted by the first-frame gate before its first frame is checked: both
once counted as "decided", so one address could hold any number of idle connections. An
idle keep-alive connection that has shown no credential also gets ``headTimeout`` (not the
longer keep-alive allowance) to send its next head.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from tests.fakes.fake_gateway import FakeGateway
from tests.netns import GW_V4, Tailnet
from tests.support import (
    HOST,
    PORT,
    plain_config,
    raw_send,
    running,
    status_of,
)
from tests.util import open_in, read_response, read_to_close

GW_SECRET = "gateway-secret-for-the-gate-0123456789abcdef"
UPGRADE = (
    f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
LIMIT = 3
REFUSED = b"too many unauthenticated connections from this address"


def masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def connect_frame(token: str) -> bytes:
    return masked_text(
        json.dumps(
            {
                "type": "req",
                "id": "c1",
                "method": "connect",
                "params": {"minProtocol": 4, "maxProtocol": 4, "auth": {"token": token}},
            }
        ).encode()
    )


async def another_is(tailnet: Tailnet, status: int) -> bytes:
    resp = await raw_send(
        tailnet,
        "phone",
        (f"GET /health HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").encode(),
    )
    assert status_of(resp) == status, resp[:160]
    return resp


def config(gw: FakeGateway, tmp_path: Path) -> dict[str, object]:
    secret = tmp_path / "gw.token"
    secret.write_text(GW_SECRET + "\n")
    secret.chmod(0o600)
    cfg = plain_config(gw, unauthenticatedPerIp=LIMIT, perSourceIp=100, headTimeout=1)
    cfg["gatewayToken"] = {"file": str(secret), "firstFrameTimeout": 20}
    return cfg


async def test_exempt_requests_stay_unauthenticated(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(tailnet, tmp_path / "cg", config(fake_gateway, tmp_path)) as cg:
        held = []
        for _ in range(LIMIT):
            reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
            writer.write(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            assert (await read_response(reader)).status == 200
            held.append((reader, writer))
        # Still unauthenticated: the address is at its limit.
        assert REFUSED in await another_is(tailnet, 429)
        # And an idle one is closed after headTimeout (1 s), not the keep-alive allowance.
        t0 = time.monotonic()
        rest = await read_to_close(held[0][0], 10)
        took = time.monotonic() - t0
        assert rest == b"" and took < 3, (rest, took)
        for _, w in held:
            w.close()
        await asyncio.sleep(0.3)
        # A connection that shows a token is no longer counted: room for others.
        reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
        writer.write(
            f"GET /echo HTTP/1.1\r\nHost: {HOST}\r\n"
            f"Authorization: Bearer {cg.tokens['phone']}\r\n\r\n".encode()
        )
        assert (await read_response(reader)).status == 200
        others = []
        for _ in range(LIMIT):
            r, w = await open_in(tailnet.ns("phone"), GW_V4, PORT)
            w.write(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            assert (await read_response(r)).status == 200
            others.append(w)
        for w in [writer, *others]:
            w.close()


async def test_gated_upgrades_stay_unauthenticated_until_the_first_frame(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(tailnet, tmp_path / "cg", config(fake_gateway, tmp_path)):
        held = []
        for _ in range(LIMIT):
            reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
            writer.write(UPGRADE.encode())
            assert (await read_response(reader)).status == 101
            held.append((reader, writer))
        # Credential-less tunnels waiting for their first frame: still unauthenticated.
        assert REFUSED in await another_is(tailnet, 429)
        # One shows the gateway token in its first frame: verified, no longer counted.
        held[0][1].write(connect_frame(GW_SECRET))
        await held[0][1].drain()
        await asyncio.sleep(0.5)
        await another_is(tailnet, 200)
        for _, w in held:
            w.close()
