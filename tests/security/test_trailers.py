"""Chunked trailers: no spoofed forwarding or identity field reaches the gateway's req.trailers.

clawgate filters the head, but a chunked body ends in a trailer section that Node hands the
gateway as ``req.trailers``: an ``X-Forwarded-User`` there is a claim clawgate never vouched
for. A request trailer with a field from the spoof catalogue (any spelling), the configured
identity header, or a framing/credential field is refused (400, connection closed) before
the message can complete; an ordinary trailer passes. The gateway is a real Node server.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.netns import GW_V4, Tailnet
from tests.security.node_support import node_echo
from tests.support import (
    HOST,
    IDENTITY_HEADER,
    PORT,
    fake_tailscaled,
    identity_config,
    running,
    status_of,
)
from tests.util import open_in, read_response, read_to_close

SPOOFED = [
    "X-Forwarded-User: admin@example.com",
    "x-forwarded-for: 127.0.0.1",
    "X_Forwarded_User: admin@example.com",
    "X-FORWARDED-PROTO: https",
    "Forwarded: for=127.0.0.1",
    "X-Real-IP: 127.0.0.1",
    "True-Client-IP: 127.0.0.1",
    "Tailscale-User-Login: admin@example.com",
    "tailscale_user_name: Admin",
    f"{IDENTITY_HEADER}: admin@example.com",
    f"{IDENTITY_HEADER.lower().replace('-', '_')}: a",
    "Authorization: Bearer x",
    "Cookie: clawgate_session=x",
    "Host: evil.example",
    "Content-Length: 5",
    "Transfer-Encoding: chunked",
]


def chunked(trailers: list[str], token: str) -> bytes:
    head = (
        f"POST /upload HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n"
        "Transfer-Encoding: chunked\r\nTrailer: X-Checksum\r\nConnection: close\r\n\r\n"
    )
    body = "5\r\nhello\r\n0\r\n" + "".join(t + "\r\n" for t in trailers) + "\r\n"
    return (head + body).encode()


async def test_no_spoofed_trailer_reaches_node(tailnet: Tailnet, tmp_path: Path) -> None:
    async with (
        node_echo(tailnet) as node,
        fake_tailscaled() as ts,
        running(tailnet, tmp_path / "cg", identity_config(node, ts.socket_path)) as cg,
    ):
        token = cg.tokens["phone"]
        got = {}
        for line in SPOOFED:
            reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
            writer.write(chunked(["X-Checksum: abc", line], token))
            got[line] = await read_to_close(reader, 10)
            writer.close()
        wrong = {
            k: v[:120]
            for k, v in got.items()
            if status_of(v) != 400 or b"trailer field not allowed" not in v
        }
        assert wrong == {}
        # An ordinary trailer still reaches the gateway.
        reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
        writer.write(chunked(["X-Checksum: abc"], token))
        resp = await read_response(reader, timeout=10)
        writer.close()
        assert resp.status == 200, resp.raw
        assert json.loads(resp.body)["trailers"] == {"x-checksum": "abc"}
        seen = await node.seen()
        complete = [r for r in seen["requests"] if r["complete"]]
        assert len(complete) == 1
        for rec in seen["requests"]:
            assert set(rec["trailers"]) <= {"x-checksum"}, rec["trailers"]
