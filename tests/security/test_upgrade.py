"""h2c and other Upgrade values against the live proxy.

Only a WebSocket upgrade is ever forwarded, and it reaches the gateway in one canonical
form (``Upgrade: websocket``, ``Connection: Upgrade``). Every other protocol (h2c,
HTTP/2.0, TLS/1.0, lists mixing websocket with something else, near-miss spellings) is a
400 before the gateway sees a byte; an Upgrade header without ``Connection: upgrade`` is
no upgrade at all and is forwarded without it.
"""

from __future__ import annotations

from pathlib import Path

from tests.fakes.fake_gateway import FakeGateway
from tests.netns import GW_V4, Tailnet
from tests.support import (
    HOST,
    PORT,
    plain_config,
    running,
)
from tests.util import open_in, read_response

KEY = ["Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]

REFUSED: list[tuple[str, list[str]]] = [
    (
        "h2c",
        [
            "Upgrade: h2c",
            "Connection: Upgrade, HTTP2-Settings",
            "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
        ],
    ),
    ("h2c without settings", ["Upgrade: h2c", "Connection: Upgrade"]),
    ("h2c not in Connection", ["Upgrade: h2c"]),
    ("HTTP/2.0", ["Upgrade: HTTP/2.0", "Connection: Upgrade"]),
    ("websocket, h2c", ["Upgrade: websocket, h2c", "Connection: Upgrade", *KEY]),
    ("h2c, websocket", ["Upgrade: h2c, websocket", "Connection: Upgrade", *KEY]),
    (
        "websocket then h2c header",
        ["Upgrade: websocket", "Upgrade: h2c", "Connection: Upgrade", *KEY],
    ),
    (
        "two websocket headers",
        ["Upgrade: websocket", "Upgrade: websocket", "Connection: Upgrade", *KEY],
    ),
    ("TLS/1.0", ["Upgrade: TLS/1.0", "Connection: Upgrade"]),
    ("TLS/1.0, HTTP/1.1", ["Upgrade: TLS/1.0, HTTP/1.1", "Connection: Upgrade"]),
    ("websockets", ["Upgrade: websockets", "Connection: Upgrade", *KEY]),
    ("websocket/13", ["Upgrade: websocket/13", "Connection: Upgrade", *KEY]),
    ("web socket", ["Upgrade: web socket", "Connection: Upgrade", *KEY]),
    ("websocket;x", ["Upgrade: websocket;x", "Connection: Upgrade", *KEY]),
    ("IRC/6.9", ["Upgrade: IRC/6.9", "Connection: Upgrade"]),
    ("empty", ["Upgrade:", "Connection: Upgrade"]),
    (
        "websocket + h2 settings",
        [
            "Upgrade: websocket",
            "Connection: Upgrade, HTTP2-Settings",
            "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
            *KEY,
        ],
    ),
]

ACCEPTED: list[tuple[str, list[str]]] = [
    ("canonical", ["Upgrade: websocket", "Connection: Upgrade", *KEY]),
    ("trailing space", ["Upgrade: websocket ", "Connection: Upgrade", *KEY]),
    ("no space", ["Upgrade:websocket", "Connection:Upgrade", *KEY]),
    ("mixed case", ["Upgrade: WebSocket", "Connection: upgrade", *KEY]),
    ("upper case", ["Upgrade: WEBSOCKET", "Connection: UPGRADE", *KEY]),
    ("keep-alive, Upgrade", ["Upgrade: websocket", "Connection: keep-alive, Upgrade", *KEY]),
    ("tab padded", ["Upgrade: \twebsocket", "Connection: Upgrade", *KEY]),
]


async def _ask(tailnet: Tailnet, lines: list[str], token: str, path: str) -> int:
    reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
    try:
        writer.write(
            (
                "\r\n".join(
                    [
                        f"GET {path} HTTP/1.1",
                        f"Host: {HOST}",
                        f"Authorization: Bearer {token}",
                        *lines,
                    ]
                )
                + "\r\n\r\n"
            ).encode()
        )
        return (await read_response(reader, timeout=10)).status
    finally:
        writer.close()


async def test_only_websocket_is_upgraded(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(tailnet, tmp_path / "cg", plain_config(fake_gateway)) as cg:
        t = cg.tokens["phone"]
        refused = {label: await _ask(tailnet, lines, t, "/ws") for label, lines in REFUSED}
        assert refused == {label: 400 for label, _ in REFUSED}
        assert fake_gateway.requests == []
        assert fake_gateway.connections_opened == 0

        accepted = {label: await _ask(tailnet, lines, t, "/ws") for label, lines in ACCEPTED}
        assert accepted == {label: 101 for label, _ in ACCEPTED}
        await fake_gateway.wait_until(lambda: len(fake_gateway.requests) == len(ACCEPTED))
        for rec in fake_gateway.requests:
            assert rec.websocket
            assert rec.header_all("Upgrade") == ["websocket"], rec.raw_head
            assert rec.header_all("Connection") == ["Upgrade"], rec.raw_head
            assert not rec.header_all("HTTP2-Settings")


async def test_upgrade_without_connection_is_not_an_upgrade(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(tailnet, tmp_path / "cg", plain_config(fake_gateway)) as cg:
        t = cg.tokens["phone"]
        assert (
            await _ask(tailnet, ["Upgrade: websocket", *KEY, "Connection: close"], t, "/headers")
            == 200
        )
        assert await _ask(tailnet, ["Connection: Upgrade, close"], t, "/headers") == 200
        assert len(fake_gateway.requests) == 2
        for rec in fake_gateway.requests:
            assert not rec.websocket
            assert rec.header_all("Upgrade") == []
            assert rec.header_all("Connection") == ["close"]
