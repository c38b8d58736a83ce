"""Path normalisation against the exempt paths, against the live proxy.

``/health`` and ``/healthz`` skip the token; nothing else may. Every near miss a
normalising server could map onto them, or walk out of them (percent-encoding, double
slash, dot segments, backslash, case, ``;`` parameters, NUL, overlong UTF-8), needs a
token (401) or is malformed (400), and a WebSocket upgrade is never exempt: the gateway
accepts upgrades on any path, so an exempt upgrade would be a token-free session.
"""

from __future__ import annotations

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
from tests.util import open_in, read_response

EXEMPT_OK = [b"/health", b"/healthz", b"/health?x=1", b"/healthz?probe=k8s"]

NEAR_MISSES = [
    b"/health/",
    b"//health",
    b"/./health",
    b"/health/.",
    b"/health/..",
    b"/health/../headers",
    b"/healthz/../headers",
    b"/health/./../headers",
    b"/%68ealth",
    b"/%68%65%61%6c%74%68",
    b"/health%2F..%2Fheaders",
    b"/health%2f..%2fheaders",
    b"/%2Fhealth",
    b"/%2e/health",
    b"/%2e%2e/health",
    b"/health/%2e%2e/headers",
    b"/HEALTH",
    b"/Health",
    b"/HEALTHZ",
    b"/health;x=1",
    b"/health;/../headers",
    b"/..;/health",
    b"/health/..;/headers",
    b"/health%00",
    b"/health%00/../headers",
    b"/health\\..\\headers",
    b"/\\health",
    b"/health%5C..%5Cheaders",
    b"/%C0%AEhealth",
    b"/%C0%AE%C0%AE/headers",
    b"/health%C0%AF..%C0%AFheaders",
    b"/health%E0%80%AF..%E0%80%AFheaders",
    b"/health#x",
    b"/health%23",
    b"/health%20",
    b"/health%09",
    b"/health.",
    b"/health~",
    b"/health*",
    b"/healt%68",
    b"/health/x",
    b"/healthzz",
    b"/healthy",
]
MALFORMED = [
    b"/health\x00",
    b"/\xc0\xaehealth",
    b"/health\xc0\xaf..",
    b"/health\x7f",
    b"/health\t",
    b"health",
    b"*",
]


async def test_near_misses_need_a_token(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(tailnet, tmp_path / "cg", plain_config(fake_gateway)):
        got = {}
        for target in EXEMPT_OK + NEAR_MISSES + MALFORMED:
            resp = await raw_send(
                tailnet,
                "phone",
                b"GET "
                + target
                + b" HTTP/1.1\r\nHost: "
                + HOST.encode()
                + b"\r\nConnection: close\r\n\r\n",
            )
            got[target] = status_of(resp)
        want = {
            **{t: 200 for t in EXEMPT_OK},
            **{t: 401 for t in NEAR_MISSES},
            **{t: 400 for t in MALFORMED},
        }
        assert got == want
        # The gateway saw the exempt paths and nothing else.
        assert sorted(r.target.encode() for r in fake_gateway.requests) == sorted(EXEMPT_OK)


async def test_websocket_upgrade_on_an_exempt_path_needs_a_token(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(tailnet, tmp_path / "cg", plain_config(fake_gateway)) as cg:
        upgrade = (
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        )
        for path in ("/health", "/healthz", "/health?x=1"):
            resp = await raw_send(
                tailnet, "phone", (f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n{upgrade}\r\n").encode()
            )
            assert status_of(resp) == 401, (path, resp[:80])
        assert fake_gateway.requests == []
        # With a token the same upgrade is an ordinary session.
        reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
        writer.write(
            (
                f"GET /health HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer "
                f"{cg.tokens['phone']}\r\n{upgrade}\r\n"
            ).encode()
        )
        assert (await read_response(reader)).status == 101
        writer.close()
