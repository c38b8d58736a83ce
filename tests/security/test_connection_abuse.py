"""``Connection``-listed header removal abuse, against the live proxy.

A proxy must drop the headers a client lists in ``Connection`` (they are hop-by-hop), so a
client can try to make clawgate drop what it sets itself (X-Forwarded-*, the identity
headers) or what the gateway relies on (Host, Origin, the framing headers, the WebSocket
handshake, the gateway's own token). None of that may work: the gateway still gets every
one of them, and the body and the upgrade still work.
"""

from __future__ import annotations

from pathlib import Path

from tests.fakes.fake_gateway import FakeGateway
from tests.netns import GW_V4, PHONE_V4, Tailnet
from tests.support import (
    ALICE,
    ALICE_PIC,
    HOST,
    IDENTITY_HEADER,
    PORT,
    fake_tailscaled,
    forwarding_view,
    identity_config,
    norm,
    plain_config,
    running,
)
from tests.util import open_in, read_response

ALL_LISTED = (
    "Host, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, "
    f"{IDENTITY_HEADER}, Tailscale-User-Login, Tailscale-User-Name, "
    "Tailscale-User-Profile-Pic, Origin, Content-Length, Transfer-Encoding, "
    "Upgrade, Sec-WebSocket-Key, Sec-WebSocket-Version, Sec-WebSocket-Protocol, "
    "Authorization"
)
EXPECTED = {
    "x-forwarded-for": [PHONE_V4],
    "x-forwarded-proto": ["http"],
    "x-forwarded-host": [HOST],
    norm(IDENTITY_HEADER): [ALICE],
    "tailscale-user-login": [ALICE],
    "tailscale-user-name": ["Alice Example"],
    "tailscale-user-profile-pic": [ALICE_PIC],
}


async def _one(tailnet: Tailnet, raw: bytes) -> tuple[int, bytes]:
    reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
    try:
        writer.write(raw)
        resp = await read_response(reader, timeout=10)
        return resp.status, resp.body
    finally:
        writer.close()


def _req(lines: list[str], body: bytes = b"") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_connection_cannot_remove_what_clawgate_sets_or_the_gateway_needs(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with (
        fake_tailscaled() as ts,
        running(tailnet, tmp_path / "cg", identity_config(fake_gateway, ts.socket_path)) as cg,
    ):
        auth = f"Authorization: Bearer {cg.tokens['phone']}"
        # Plain request: every header clawgate sets is still there, Host and Origin too.
        for listed in (
            ALL_LISTED,
            ALL_LISTED.lower(),
            ALL_LISTED.replace("-", "_"),
            "keep-alive, " + ALL_LISTED + ", close",
        ):
            fake_gateway.clear()
            status, _ = await _one(
                tailnet,
                _req(
                    [
                        "GET /headers HTTP/1.1",
                        f"Host: {HOST}",
                        auth,
                        "Origin: http://ui.example",
                        f"Connection: {listed}",
                    ]
                ),
            )
            assert status == 200
            (rec,) = fake_gateway.requests
            assert forwarding_view(rec) == EXPECTED, (listed, forwarding_view(rec))
            assert rec.header_all("Host") == [HOST]
            assert rec.header_all("Origin") == ["http://ui.example"]

        # A body: its framing header survives, so the gateway reads exactly the body.
        fake_gateway.clear()
        status, body = await _one(
            tailnet,
            _req(
                [
                    "POST /echo HTTP/1.1",
                    f"Host: {HOST}",
                    auth,
                    "Content-Length: 11",
                    "Connection: Content-Length",
                ],
                b"hello world",
            ),
        )
        assert (status, body) == (200, b"hello world")
        assert fake_gateway.requests[0].header_all("Content-Length") == ["11"]
        fake_gateway.clear()
        chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        status, body = await _one(
            tailnet,
            _req(
                [
                    "POST /echo HTTP/1.1",
                    f"Host: {HOST}",
                    auth,
                    "Transfer-Encoding: chunked",
                    "Connection: Transfer-Encoding, keep-alive",
                ],
                chunked,
            ),
        )
        assert (status, body) == (200, b"hello world")

        # The WebSocket handshake survives being listed: the gateway still answers 101.
        fake_gateway.clear()
        status, _ = await _one(
            tailnet,
            _req(
                [
                    "GET /ws HTTP/1.1",
                    f"Host: {HOST}",
                    auth,
                    "Upgrade: websocket",
                    "Connection: Upgrade, Sec-WebSocket-Key, Sec-WebSocket-Version, Host, "
                    f"Origin, X-Forwarded-For, {IDENTITY_HEADER}, Upgrade",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                    "Sec-WebSocket-Version: 13",
                    "Origin: http://ui.example",
                ]
            ),
        )
        assert status == 101
        (rec,) = fake_gateway.requests
        assert rec.header_all("Sec-WebSocket-Key") == ["dGhlIHNhbXBsZSBub25jZQ=="]
        assert rec.header_all("Sec-WebSocket-Version") == ["13"]
        assert rec.header_all("Upgrade") == ["websocket"]
        assert rec.header_all("Connection") == ["Upgrade"]
        assert forwarding_view(rec) == EXPECTED


async def test_connection_cannot_remove_the_gateway_token(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    """The gateway's own token is decided on and forwarded; listing it must not drop it."""
    secret = tmp_path / "gw.token"
    secret.write_text("gateway-secret-0123456789abcdef-0123\n")
    secret.chmod(0o600)
    cfg = plain_config(fake_gateway)
    cfg["gatewayToken"] = {"file": str(secret)}
    async with running(tailnet, tmp_path / "cg", cfg):
        for listed in ("Authorization", "authorization, keep-alive", "AUTHORIZATION"):
            fake_gateway.clear()
            status, _ = await _one(
                tailnet,
                _req(
                    [
                        "GET /headers HTTP/1.1",
                        f"Host: {HOST}",
                        f"Connection: {listed}",
                        "Authorization: Bearer gateway-secret-0123456789abcdef-0123",
                    ]
                ),
            )
            assert status == 200
            (rec,) = fake_gateway.requests
            assert rec.header_all("Authorization") == [
                "Bearer gateway-secret-0123456789abcdef-0123"
            ], listed
