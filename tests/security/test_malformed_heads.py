"""A corpus of malformed and hostile request heads, sent to the real proxy from the tailnet.

Every head carries a valid token, so a refusal is about the head itself: each gets 400
(431 when too large, 408 when too slow) and a close, and the gateway never sees a byte of
it. Afterwards the proxy still serves a good request and its open file descriptors return
to their baseline. The same corpus is also run through parse_request_head directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.core.http1 import parse_request_head
from proxy.errors import BadRequest
from tests.fakes.fake_gateway import FakeGateway
from tests.harness import ClawgateProcess
from tests.netns import GW_V4, Tailnet
from tests.util import build_request, exchange, open_in, poll_until, read_to_close

PORT = 18789
AUTH = b"Authorization: Bearer {TOKEN}"
H = b"Host: 100.64.0.1:18789"


def req(*lines: bytes, request_line: bytes = b"GET /headers HTTP/1.1", auth: bool = True) -> bytes:
    head = [request_line, *lines]
    if auth:
        head.append(AUTH)
    return b"\r\n".join(head) + b"\r\n\r\n"


# (id, bytes, expected status)
CORPUS: list[tuple[str, bytes, int]] = [
    ("bare-LF-in-head", req(H + b"\nX-Injected: 1"), 400),
    ("bare-LF-in-value", req(H, b"X-A: a\nb"), 400),
    ("bare-CR-in-value", req(H, b"X-A: a\rb"), 400),
    ("bare-CR-after-request-line", b"GET /headers HTTP/1.1\r" + req(H)[21:], 400),
    ("obs-fold-space", req(H, b"X-A: a", b" folded"), 400),
    ("obs-fold-tab", req(H, b"X-A: a", b"\tfolded"), 400),
    ("NUL-in-value", req(H, b"X-A: a\x00b"), 400),
    ("NUL-in-target", req(H, request_line=b"GET /head\x00ers HTTP/1.1"), 400),
    (
        "CL-and-TE",
        req(
            H,
            b"Content-Length: 5",
            b"Transfer-Encoding: chunked",
            request_line=b"POST /echo HTTP/1.1",
        ),
        400,
    ),
    (
        "TE-and-CL",
        req(
            H,
            b"Transfer-Encoding: chunked",
            b"Content-Length: 5",
            request_line=b"POST /echo HTTP/1.1",
        ),
        400,
    ),
    (
        "two-CL-same",
        req(H, b"Content-Length: 5", b"Content-Length: 5", request_line=b"POST /echo HTTP/1.1"),
        400,
    ),
    (
        "two-CL-different",
        req(H, b"Content-Length: 5", b"Content-Length: 6", request_line=b"POST /echo HTTP/1.1"),
        400,
    ),
    ("CL-list", req(H, b"Content-Length: 5, 5", request_line=b"POST /echo HTTP/1.1"), 400),
    (
        "TE-chunked-twice",
        req(
            H,
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: chunked",
            request_line=b"POST /echo HTTP/1.1",
        ),
        400,
    ),
    (
        "TE-chunked-chunked",
        req(H, b"Transfer-Encoding: chunked, chunked", request_line=b"POST /echo HTTP/1.1"),
        400,
    ),
    (
        "TE-xchunked",
        req(H, b"Transfer-Encoding: xchunked", request_line=b"POST /echo HTTP/1.1"),
        400,
    ),
    (
        "TE-gzip-chunked",
        req(H, b"Transfer-Encoding: gzip, chunked", request_line=b"POST /echo HTTP/1.1"),
        400,
    ),
    (
        "TE-identity",
        req(H, b"Transfer-Encoding: identity", request_line=b"POST /echo HTTP/1.1"),
        400,
    ),
    (
        "TE-in-HTTP/1.0",
        req(H, b"Transfer-Encoding: chunked", request_line=b"POST /echo HTTP/1.0"),
        400,
    ),
    (
        "upgrade-h2c",
        req(
            H,
            b"Connection: Upgrade, HTTP2-Settings",
            b"Upgrade: h2c",
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        ),
        400,
    ),
    ("upgrade-h2c-alone", req(H, b"Connection: Upgrade", b"Upgrade: h2c"), 400),
    ("http2-settings-alone", req(H, b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"), 400),
    ("upgrade-websocket-h2c", req(H, b"Connection: Upgrade", b"Upgrade: websocket, h2c"), 400),
    (
        "upgrade-two-headers",
        req(H, b"Connection: Upgrade", b"Upgrade: websocket", b"Upgrade: h2c"),
        400,
    ),
    (
        "websocket-via-POST",
        req(
            H,
            b"Connection: Upgrade",
            b"Upgrade: websocket",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Sec-WebSocket-Version: 13",
            request_line=b"POST /ws HTTP/1.1",
        ),
        400,
    ),
    (
        "websocket-with-body",
        req(
            H,
            b"Connection: Upgrade",
            b"Upgrade: websocket",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Sec-WebSocket-Version: 13",
            b"Content-Length: 4",
            request_line=b"GET /ws HTTP/1.1",
        ),
        400,
    ),
    ("absolute-form", req(H, request_line=b"GET http://127.0.0.1:18789/headers HTTP/1.1"), 400),
    ("authority-form-CONNECT", req(H, request_line=b"CONNECT 127.0.0.1:18789 HTTP/1.1"), 400),
    ("asterisk-form", req(H, request_line=b"OPTIONS * HTTP/1.1"), 400),
    ("HTTP/0.9", b"GET /headers\r\n\r\n", 400),
    ("HTTP/2.0-line", req(H, request_line=b"GET /headers HTTP/2.0"), 400),
    ("HTTP/2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ("HTTP/1.2", req(H, request_line=b"GET /headers HTTP/1.2"), 400),
    ("lowercase-version", req(H, request_line=b"GET /headers http/1.1"), 400),
    ("space-before-colon", req(b"Host : 100.64.0.1:18789"), 400),
    ("space-before-colon-XFF", req(H, b"X-Forwarded-For : 127.0.0.1"), 400),
    ("invalid-CL", req(H, b"Content-Length: abc", request_line=b"POST /echo HTTP/1.1"), 400),
    ("negative-CL", req(H, b"Content-Length: -1", request_line=b"POST /echo HTTP/1.1"), 400),
    ("plus-CL", req(H, b"Content-Length: +5", request_line=b"POST /echo HTTP/1.1"), 400),
    (
        "huge-CL",
        req(H, b"Content-Length: 99999999999999999999", request_line=b"POST /echo HTTP/1.1"),
        400,
    ),
    ("8-bit-header-name", req(H, b"X-\xe9t\xe9: 1"), 400),
    ("8-bit-target", req(H, request_line=b"GET /\xff HTTP/1.1"), 400),
    ("control-char-in-target", req(H, request_line=b"GET /a\x01b HTTP/1.1"), 400),
    ("DEL-in-value", req(H, b"X-A: a\x7f"), 400),
    ("missing-Host", req(), 400),
    ("two-Hosts", req(H, b"Host: evil.example"), 400),
    ("two-Hosts-case", req(H, b"HOST: evil.example"), 400),
    ("tabs-in-request-line", req(H, request_line=b"GET\t/headers\tHTTP/1.1"), 400),
    ("double-space-request-line", req(H, request_line=b"GET  /headers HTTP/1.1"), 400),
    ("trailing-space-request-line", req(H, request_line=b"GET /headers HTTP/1.1 "), 400),
    ("lowercase-method", req(H, request_line=b"get /headers HTTP/1.1"), 400),
    ("unknown-method", req(H, request_line=b"FOO /headers HTTP/1.1"), 400),
    ("TRACE", req(H, request_line=b"TRACE /headers HTTP/1.1"), 400),
    ("header-without-colon", req(H, b"NoColonHere"), 400),
    ("empty-header-name", req(H, b": value"), 400),
    ("leading-empty-line", b"\r\n" + req(H), 400),
    ("only-blank-lines", b"\r\n\r\n", 400),
    ("binary-garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\r\n\r\n", 400),
    ("huge-head", req(H, *[b"X-Pad-%d: %s" % (i, b"a" * 1000) for i in range(20)]), 431),
    ("huge-single-header", req(H, b"Cookie: " + b"a" * 20000), 431),
]


def _with_token(raw: bytes, token: str) -> bytes:
    return raw.replace(b"{TOKEN}", token.encode())


@pytest.mark.parametrize(("name", "raw", "status"), CORPUS, ids=[c[0] for c in CORPUS])
def test_parser_refuses(name: str, raw: bytes, status: int) -> None:
    raw = _with_token(raw, "t" * 43)
    if status == 431:
        return  # refused on size before parsing; see the process test
    end = raw.find(b"\r\n\r\n")
    with pytest.raises(BadRequest) as ei:
        parse_request_head(raw[: end + 4])
    assert ei.value.status == 400


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 30
    assert len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.fixture
async def proxy(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> AsyncIterator[ClawgateProcess]:
    cfg = {
        "gateway": {
            "host": GW_V4,
            "port": PORT,
            "requireToken": True,
            "allowedNetworks": ["100.64.0.0/10"],
        },
        "upstream": f"http://127.0.0.1:{fake_gateway.port}",
        "tailscale": {"requireIdentity": False},
        "limits": {"headTimeout": 1.0},
    }
    p = ClawgateProcess(tmp_path / "clawgate", cfg, netns=tailnet.ns("gw"))
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def _send(tailnet: Tailnet, data: bytes) -> bytes:
    reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
    try:
        try:
            writer.write(data)
            await writer.drain()
        except ConnectionResetError:
            pass
        return await read_to_close(reader, timeout=5)
    finally:
        writer.close()


def _status(resp: bytes) -> int | None:
    if not resp.startswith(b"HTTP/1.1 "):
        return None
    return int(resp[9:12])


async def _good(tailnet: Tailnet, p: ClawgateProcess) -> int:
    resp = await exchange(
        tailnet.ns("phone"),
        GW_V4,
        PORT,
        build_request(
            "GET",
            "/headers",
            [("Authorization", f"Bearer {p.tokens['phone']}"), ("Connection", "close")],
        ),
    )
    return resp.status


async def test_corpus_against_the_proxy(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway
) -> None:
    # Baseline after one good request: the lazily opened files (log, sockets) exist.
    assert await _good(tailnet, proxy) == 200
    await fake_gateway.wait_until(lambda: fake_gateway.active_connections == 0)
    baseline = proxy.fd_count()
    fake_gateway.clear()
    opened = fake_gateway.connections_opened

    results: dict[str, tuple[int | None, bytes]] = {}
    for name, raw, _status_expected in CORPUS:
        resp = await _send(tailnet, _with_token(raw, proxy.tokens["phone"]))
        results[name] = (_status(resp), resp.split(b"\r\n", 1)[0])
    wrong = {
        name: got
        for (name, _, want), got in zip(CORPUS, results.values(), strict=True)
        if got[0] != want
    }
    assert wrong == {}, wrong
    assert fake_gateway.requests == [], [r.raw_head[:80] for r in fake_gateway.requests]
    assert fake_gateway.connections_opened == opened  # not even a connection

    # Still serving, and nothing leaked.
    assert await _good(tailnet, proxy) == 200
    await poll_until(lambda: proxy.fd_count() <= baseline, timeout=5)
    assert proxy.proc is not None and proxy.proc.poll() is None


async def test_slow_and_partial_heads(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway
) -> None:
    baseline = proxy.fd_count()
    partial = (
        f"GET /headers HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer "
        f"{proxy.tokens['phone']}\r\n".encode()
    )
    reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
    t0 = time.monotonic()
    writer.write(partial)  # never finished: the head deadline (1 s here) ends it
    resp = await read_to_close(reader, timeout=5)
    elapsed = time.monotonic() - t0
    writer.close()
    assert _status(resp) == 408
    assert 0.8 < elapsed < 3.0, elapsed

    # Many idle connections that never send a byte are closed by the same deadline.
    conns = [await open_in(tailnet.ns("phone"), GW_V4, PORT) for _ in range(20)]
    outs = await asyncio.gather(*(read_to_close(r, timeout=5) for r, _ in conns))
    for _, w in conns:
        w.close()
    assert all(_status(o) in (408, None) for o in outs)
    assert fake_gateway.requests == []
    await poll_until(lambda: proxy.fd_count() <= baseline, timeout=5)
    assert await _good(tailnet, proxy) == 200
