"""On a TLS listener, a refused source is reset before any TLS work.

The network check must not cost a handshake: a source outside allowedNetworks that sends a
real ClientHello gets no ServerHello (not a byte), only a reset, at once. An allowed source
gets its ServerHello, and one that never finishes the handshake is cut at the head deadline
(not after the 60 s default handshake timeout).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

from tests.fakes.fake_gateway import FakeGateway
from tests.netns import GW_V4, PUBLIC_V4, Tailnet, connect_in
from tests.support import (
    raw_send,
    running,
)
from tests.tlsutil import DOMAIN, client_context, make_ca, make_leaf, write_pems
from tests.util import open_in, read_to_close

TLS_PORT = 8443


def client_hello() -> bytes:
    """The first flight of a real TLS client, as bytes."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=DOMAIN)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


async def test_refused_source_gets_no_server_hello(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    ca = make_ca()
    cert, key = write_pems(tmp_path / "pems", make_leaf(ca))
    cfg = {
        "gateway": {
            "host": GW_V4,
            "port": TLS_PORT,
            "requireToken": True,
            "allowedNetworks": ["100.64.0.0/10"],
        },
        "upstream": f"http://127.0.0.1:{fake_gateway.port}",
        "tailscale": {"requireIdentity": False},
        "tls": {"certFile": str(cert), "keyFile": str(key)},
        "limits": {"headTimeout": 1.0},
    }
    hello = client_hello()
    assert hello[:1] == b"\x16"  # a handshake record
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        # Allowed source: the same bytes get a ServerHello (the control for the check below).
        answer = await raw_send(tailnet, "phone", hello, port=TLS_PORT, timeout=5)
        assert answer[:2] == b"\x16\x03", answer[:16]
        # Refused source: nothing at all, at once.
        for _ in range(3):
            t0 = time.monotonic()
            answer = await raw_send(tailnet, "public", hello, port=TLS_PORT, timeout=5)
            assert answer == b"", answer[:16]
            assert time.monotonic() - t0 < 0.5
        rec = await cg.wait_log(lambda r: r.get("event") == "refused")
        assert rec["peer"] == PUBLIC_V4 and rec["reason"] == "network not allowed"
        # An allowed source that never finishes the handshake is cut at headTimeout.
        reader, writer = await open_in(tailnet.ns("phone"), GW_V4, TLS_PORT)
        t0 = time.monotonic()
        assert await read_to_close(reader, timeout=10) == b""
        assert 0.8 < time.monotonic() - t0 < 3.0
        writer.close()
        # And a real client is served as before.
        sock = await connect_in(tailnet.ns("phone"), GW_V4, TLS_PORT)
        r, w = await asyncio.open_connection(
            sock=sock, ssl=client_context(ca), server_hostname=DOMAIN
        )
        w.write(
            f"GET /headers HTTP/1.1\r\nHost: {DOMAIN}\r\nAuthorization: Bearer "
            f"{cg.tokens['phone']}\r\nConnection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(r.read(), 10)
        w.close()
        assert data.startswith(b"HTTP/1.1 200 ")
        assert fake_gateway.requests[-1].header("X-Forwarded-Proto") == "https"
