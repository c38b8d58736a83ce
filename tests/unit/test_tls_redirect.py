"""The HTTP->HTTPS redirect: the Location table, and RedirectConnection on a real loopback port.

The redirect never proxies and never trusts the client's Host; it keeps the network check.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.config import parse_config
from proxy.runtime import Runtime
from proxy.tls import RedirectConnection, redirect_location

NAME = "web01.tail4c3a9.ts.net"


@pytest.mark.parametrize(
    ("line", "port", "want"),
    [
        (b"GET / HTTP/1.1", 8443, b"https://web01.tail4c3a9.ts.net:8443/"),
        (
            b"GET /chat?session=main&x=%20y HTTP/1.1",
            8443,
            b"https://web01.tail4c3a9.ts.net:8443/chat?session=main&x=%20y",
        ),
        (b"HEAD /a/b/ HTTP/1.0", 443, b"https://web01.tail4c3a9.ts.net/a/b/"),
        (b"POST http://evil.example/x HTTP/1.1", 443, b"https://web01.tail4c3a9.ts.net/"),
        (b"GET //evil.example/x HTTP/1.1", 443, b"https://web01.tail4c3a9.ts.net/"),
        (b'GET /a"onload HTTP/1.1', 443, b"https://web01.tail4c3a9.ts.net/"),
        (b"GET /a\\b HTTP/1.1", 443, b"https://web01.tail4c3a9.ts.net/"),
        (b"OPTIONS * HTTP/1.1", 443, b"https://web01.tail4c3a9.ts.net/"),
        (b"GET /\xff HTTP/1.1", 443, b"https://web01.tail4c3a9.ts.net/"),
    ],
)
def test_location(line: bytes, port: int, want: bytes) -> None:
    assert redirect_location(line, NAME, port) == want


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"GET /",
        b"GET / HTTP/2",
        b"GET  / HTTP/1.1",
        b"GET / HTTP/1.1 x",
        b"G3T / HTTP/1.1",
        b"\x16\x03\x01",
        b"PRI * HTTP/2.0",
    ],
)
def test_not_http(line: bytes) -> None:
    assert redirect_location(line, NAME, 443) is None


@pytest.fixture
async def redirect_port() -> AsyncIterator[tuple[int, Runtime]]:
    cfg = parse_config(
        {
            "log": {"access": "off"},
            "gateway": {"host": "127.0.0.1", "port": 8443},
            "limits": {"headTimeout": 0.3},
        }
    )
    rt = Runtime(cfg, asyncio.get_running_loop())
    srv = await rt.loop.create_server(
        lambda: RedirectConnection(rt, lambda: (NAME, 8443)), "127.0.0.1", 0
    )
    try:
        yield srv.sockets[0].getsockname()[1], rt
    finally:
        srv.close()
        await srv.wait_closed()


async def _exchange(port: int, data: bytes, *, pieces: int = 1) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        writer.write(data[i : i + step])
        await writer.drain()
    out = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return out


async def test_redirects_whole_heads_even_in_pieces(redirect_port: tuple[int, Runtime]) -> None:
    port, _ = redirect_port
    raw = b"GET /x?y=1 HTTP/1.1\r\nHost: evil.example\r\nAccept: */*\r\n\r\n"
    out = await _exchange(port, raw, pieces=7)
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 308 Permanent Redirect"
    assert b"Location: https://web01.tail4c3a9.ts.net:8443/x?y=1" in lines
    assert b"Connection: close" in lines
    assert body == b"use HTTPS: https://web01.tail4c3a9.ts.net:8443/x?y=1\n"


async def test_garbage_gets_400_at_once(redirect_port: tuple[int, Runtime]) -> None:
    port, _ = redirect_port
    assert (await _exchange(port, b"\x16\x03\x01\x02\x00")).startswith(b"HTTP/1.1 400 ")
    assert (await _exchange(port, b"GET /\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await _exchange(port, b"GET /" + b"a" * 5000)).startswith(b"HTTP/1.1 400 ")


async def test_silent_client_is_dropped_after_head_timeout(
    redirect_port: tuple[int, Runtime],
) -> None:
    port, _ = redirect_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\n")  # never finishes the head
    out = await asyncio.wait_for(reader.read(), 3)
    assert out == b""
    writer.close()


async def test_network_check_still_applies() -> None:
    cfg = parse_config(
        {
            "log": {"access": "off"},
            "gateway": {"host": "127.0.0.1", "port": 8443, "allowedNetworks": ["100.64.0.0/10"]},
        }
    )
    rt = Runtime(cfg, asyncio.get_running_loop())
    srv = await rt.loop.create_server(
        lambda: RedirectConnection(rt, lambda: (NAME, 8443)), "127.0.0.1", 0
    )
    try:
        port = srv.sockets[0].getsockname()[1]
        try:
            out = await _exchange(port, b"GET / HTTP/1.1\r\n\r\n")
        except ConnectionResetError:
            out = b""
        assert out == b""  # refused before a byte is read: no redirect, no answer
    finally:
        srv.close()
        await srv.wait_closed()
