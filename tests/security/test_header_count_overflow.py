"""Header-count overflow: a head with very many lines must not hide clawgate's own headers.

clawgate once appended its X-Forwarded-* and identity headers after every client line. A
gateway whose parser keeps only the first N header lines (llhttp under Node keeps
``maxHeadersCount`` = 1,000 lines; Node before 24 dropped the rest silently) then saw a
header-less loopback request: "direct local", fully trusted. Now clawgate's own headers come
right after the request line, and a head with more than ``limits.headLines`` lines (default
100) gets 431 from clawgate, never reaching the gateway. The gateway here is a real Node
HTTP server (node_echo.js), on the token-less exempt path, a token request and a 101 upgrade.

Measured with the installed Node 24.21: over ``maxHeadersCount`` lines it answers 431 itself
(HPE_HEADER_OVERFLOW) rather than truncating; the ordering test below therefore also reads
where clawgate's headers sit in Node's ``rawHeaders``, which is what a truncating parser keeps.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tests.netns import PHONE_V4, Tailnet
from tests.security.node_support import NodeEcho, node_echo
from tests.support import (
    ALICE,
    HOST,
    IDENTITY_HEADER,
    PORT,
    fake_tailscaled,
    identity_config,
    raw_send,
    running,
    status_of,
)
from tests.util import open_in, read_response

GW = "100.64.0.1"
UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)
OWN = {
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    IDENTITY_HEADER.lower(),
    "tailscale-user-login",
    "tailscale-user-name",
    "tailscale-user-profile-pic",
}


def node_config(node: NodeEcho, socket_path: str, **limits: Any) -> dict[str, Any]:
    cfg = identity_config(node, socket_path)
    cfg["limits"].update(limits)
    return cfg


def flood(n: int) -> str:
    return "a:\r\n" * n


async def read_ws_text(reader: asyncio.StreamReader, timeout: float = 10.0) -> dict[str, Any]:
    """The JSON inside the one unmasked text frame node_echo.js sends after its 101.

    Read exactly one frame: its 2-byte header, the extended length, then the payload. The
    frame is ~7 KiB here and may arrive in several segments, so one read() is not enough.
    """
    async with asyncio.timeout(timeout):
        hdr = await reader.readexactly(2)
        ln = hdr[1] & 0x7F
        if ln == 126:
            ln = int.from_bytes(await reader.readexactly(2), "big")
        elif ln == 127:
            ln = int.from_bytes(await reader.readexactly(8), "big")
        data: dict[str, Any] = json.loads(await reader.readexactly(ln))
    return data


async def test_a_thousand_header_lines_get_431_and_never_reach_node(
    tailnet: Tailnet, tmp_path: Path
) -> None:
    async with (
        node_echo(tailnet) as node,
        fake_tailscaled() as ts,
        running(tailnet, tmp_path / "cg", node_config(node, ts.socket_path)) as cg,
    ):
        token = cg.tokens["phone"]
        cases = {
            "exempt /health, no token": f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n",
            "token request": (
                f"GET /x HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n"
            ),
            "token upgrade": (
                f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n{UPGRADE}"
            ),
        }
        for label, head in cases.items():
            for lines in (1030, 101):
                resp = await raw_send(tailnet, "phone", (head + flood(lines) + "\r\n").encode())
                assert status_of(resp) == 431, (label, lines, resp[:200])
                assert b"too many header lines" in resp, (label, lines, resp[:200])
        seen = await node.seen()
        # Refused by clawgate: Node got no connection but this query's own.
        assert seen["connections"] == 1, seen["clientErrors"]
        assert seen["requests"] == [] and seen["upgrades"] == []
        # Just under the limit still works (100 lines including Host etc.).
        resp = await raw_send(
            tailnet,
            "phone",
            (cases["exempt /health, no token"] + flood(90) + "Connection: close\r\n\r\n").encode(),
        )
        assert status_of(resp) == 200, resp[:200]


async def test_clawgate_headers_come_first_even_with_headlines_raised(
    tailnet: Tailnet, tmp_path: Path
) -> None:
    # Node told to take any number of lines, clawgate told to pass 5,000: where do
    # clawgate's own headers sit in what Node received?
    async with (
        node_echo(tailnet, max_headers_count=0) as node,
        fake_tailscaled() as ts,
        running(
            tailnet,
            tmp_path / "cg",
            node_config(node, ts.socket_path, headLines=5000, headBytes=65536),
        ) as cg,
    ):
        token = cg.tokens["phone"]
        heads = {
            "exempt": f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n{flood(1030)}"
            "Connection: close\r\n\r\n",
            "token": f"GET /x HTTP/1.1\r\nHost: {HOST}\r\n{flood(1030)}"
            f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n",
        }
        views = {}
        for label, head in heads.items():
            resp = await raw_send(tailnet, "phone", head.encode())
            assert status_of(resp) == 200, (label, resp[:200])
            views[label] = json.loads(resp.split(b"\r\n\r\n", 1)[1])
        reader, writer = await open_in(tailnet.ns("phone"), GW, PORT)
        writer.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\n{flood(1030)}"
                f"Authorization: Bearer {token}\r\n{UPGRADE}\r\n"
            ).encode()
        )
        first = await read_response(reader, timeout=10)
        assert first.status == 101, first.raw
        views["upgrade"] = await read_ws_text(reader)
        writer.close()
        for label, view in views.items():
            raw = view["rawHeaders"]
            names = [n.lower() for n in raw[0::2]]
            # A parser keeping only the first 1,000 lines (2,000 rawHeaders entries) sees
            # every header clawgate vouches for: they are the first lines of the head.
            kept = names[:1000]
            assert "x-forwarded-for" in kept, (label, names[:8])
            own_positions = [i for i, n in enumerate(names) if n in OWN]
            assert own_positions == list(range(len(own_positions))), (label, names[:10])
            assert view["headers"]["x-forwarded-for"] == PHONE_V4
            assert view["headers"]["x-forwarded-proto"] == "http"
            assert view["headers"]["x-forwarded-host"] == HOST
            if label != "exempt":  # an exempt request is not looked up (no identity)
                assert view["headers"][IDENTITY_HEADER.lower()] == ALICE
                assert view["headers"]["tailscale-user-login"] == ALICE
