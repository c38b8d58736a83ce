"""Request smuggling shapes against the live proxy: CL.TE, TE.CL, TE.TE, chunk-size tricks
and pipelining.

The property under test is that clawgate and the gateway always agree on where a request
ends, and that every request is decided on its own: each case is followed on the same
connection by a request WITHOUT a token (``/headers?smuggled``). Either clawgate refuses
the shape (400 and a close), or it frames it exactly as the gateway does, in which case
the follower is decided again and refused (401). The gateway never sees the follower.
(The plain malformed shapes, e.g. CL with TE or duplicate CLs, are in test_malformed_heads.)
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from tests.fakes.fake_gateway import FakeGateway
from tests.netns import GW_V4, Tailnet
from tests.support import (
    HOST,
    PORT,
    plain_config,
    running,
)
from tests.util import Response, open_in, read_response

FOLLOWER = f"GET /headers?smuggled HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


def post(headers: list[str], body: bytes, token: str, target: str = "/echo") -> bytes:
    lines = [f"POST {target} HTTP/1.1", f"Host: {HOST}", f"Authorization: Bearer {token}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def pipeline(tailnet: Tailnet, data: bytes, methods: list[str]) -> list[Response]:
    """Send everything at once; read up to len(methods) responses (fewer if it closes)."""
    reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
    out: list[Response] = []
    try:
        writer.write(data)
        for method in methods:
            try:
                out.append(await read_response(reader, head_request=method == "HEAD", timeout=5))
            except (asyncio.IncompleteReadError, ConnectionResetError):
                break
            if out[-1].status == 101 or out[-1].header("connection") == b"close":
                break
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return out


def statuses(resps: list[Response]) -> list[int]:
    return [r.status for r in resps]


async def test_framing_tricks_are_refused_or_framed_like_the_gateway(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(tailnet, tmp_path / "cg", plain_config(fake_gateway)) as cg:
        t = cg.tokens["phone"]
        chunked = b"5\r\nhello\r\n0\r\n\r\n"
        # (label, request, what the proxy must answer: "refused" = 400 and the follower
        # never answered, or the echoed body followed by a 401 for the follower)
        table: list[tuple[str, bytes, str | bytes]] = [
            (
                "CL.TE underscore CL",
                post(["Content_Length: 5", "Transfer-Encoding: chunked"], chunked, t),
                "refused",
            ),
            ("underscore CL alone", post(["Content_Length: 5"], b"hello", t), "refused"),
            ("underscore TE alone", post(["Transfer_Encoding: chunked"], chunked, t), "refused"),
            (
                "TE.CL underscore TE",
                post(["Transfer_Encoding: chunked", "Content-Length: 5"], b"hello", t),
                "refused",
            ),
            (
                "TE.TE chunked + identity",
                post(["Transfer-Encoding: chunked", "Transfer-encoding: identity"], chunked, t),
                "refused",
            ),
            (
                "TE.TE chunked + cow",
                post(["Transfer-Encoding: chunked", "TRANSFER-ENCODING: cow"], chunked, t),
                "refused",
            ),
            ("TE quoted", post(['Transfer-Encoding: "chunked"'], chunked, t), "refused"),
            ("TE vertical tab", post(["Transfer-Encoding:\x0bchunked"], chunked, t), "refused"),
            ("TE chunked;x", post(["Transfer-Encoding: chunked;x"], chunked, t), "refused"),
            ("TE x, chunked", post(["Transfer-Encoding: x, chunked"], chunked, t), "refused"),
            ("TE upper case", post(["Transfer-Encoding: CHUNKED"], chunked, t), b"hello"),
            ("TE tab padded", post(["Transfer-Encoding:\tchunked\t"], chunked, t), "refused"),
            ("CL leading zeros", post(["Content-Length: 005"], b"hello", t), b"hello"),
            ("CL padded", post(["Content-Length:   5  "], b"hello", t), b"hello"),
            ("CL with sign", post(["Content-Length: +5"], b"hello", t), "refused"),
            ("CL hex", post(["Content-Length: 0x5"], b"hello", t), "refused"),
            ("CL float", post(["Content-Length: 5.0"], b"hello", t), "refused"),
            ("CL comma list", post(["Content-Length: 5,5"], b"hello", t), "refused"),
            # Chunk-size tricks: a lenient parser (the fake gateway's int(x, 16) is one)
            # would read these differently from a strict one.
            (
                "chunk size 0x",
                post(["Transfer-Encoding: chunked"], b"0x5\r\nhello\r\n0\r\n\r\n", t),
                "refused",
            ),
            (
                "chunk size +",
                post(["Transfer-Encoding: chunked"], b"+5\r\nhello\r\n0\r\n\r\n", t),
                "refused",
            ),
            (
                "chunk size -",
                post(["Transfer-Encoding: chunked"], b"-5\r\nhello\r\n0\r\n\r\n", t),
                "refused",
            ),
            (
                "chunk size underscore",
                post(["Transfer-Encoding: chunked"], b"0_5\r\nhello\r\n0\r\n\r\n", t),
                "refused",
            ),
            (
                "chunk size space after",
                post(["Transfer-Encoding: chunked"], b"5 \r\nhello\r\n0\r\n\r\n", t),
                "refused",
            ),
            (
                "chunk size space before",
                post(["Transfer-Encoding: chunked"], b" 5\r\nhello\r\n0\r\n\r\n", t),
                "refused",
            ),
            (
                "chunk size overflow",
                post(
                    ["Transfer-Encoding: chunked"], b"1" + b"0" * 16 + b"5\r\nhello\r\n0\r\n\r\n", t
                ),
                "refused",
            ),
            (
                "chunk bare LF",
                post(["Transfer-Encoding: chunked"], b"5\nhello\n0\n\n", t),
                "refused",
            ),
            (
                "chunk data too long",
                post(["Transfer-Encoding: chunked"], b"5\r\nhelloXX\r\n0\r\n\r\n", t),
                "refused",
            ),
            (
                "chunk data too short",
                post(["Transfer-Encoding: chunked"], b"5\r\nhell\r\n0\r\n\r\n", t),
                "refused",
            ),
            (
                "trailer folded",
                post(["Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\nX: a\r\n b\r\n\r\n", t),
                "refused",
            ),
            (
                "chunk extension",
                post(["Transfer-Encoding: chunked"], b"5;name=value\r\nhello\r\n0;end\r\n\r\n", t),
                b"hello",
            ),
            (
                "upper-case hex size",
                post(["Transfer-Encoding: chunked"], b"A\r\nhelloworld\r\n0\r\n\r\n", t),
                b"helloworld",
            ),
            (
                "zeros last chunk",
                post(["Transfer-Encoding: chunked"], b"5\r\nhello\r\n000\r\n\r\n", t),
                b"hello",
            ),
            # A framing field in a trailer is refused (tests/security/test_trailers.py).
            (
                "trailer with TE",
                post(
                    ["Transfer-Encoding: chunked"],
                    b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n",
                    t,
                ),
                "refused",
            ),
            (
                "a request inside the body",
                post(
                    [f"Content-Length: {len(FOLLOWER)}"],
                    FOLLOWER.replace(b"smuggled", b"in-body1"),
                    t,
                ),
                FOLLOWER.replace(b"smuggled", b"in-body1"),
            ),
        ]
        problems = []
        for label, raw, want in table:
            resps = await pipeline(tailnet, raw + FOLLOWER, ["POST", "GET"])
            if want == "refused":
                if statuses(resps) != [400]:
                    problems.append(f"{label}: {statuses(resps)}, want [400]")
            elif statuses(resps) != [200, 401] or resps[0].body != want:
                problems.append(f"{label}: {statuses(resps)} {resps[:1] and resps[0].body!r}")
        assert problems == [], problems
        # The gateway never saw a follower, nor a request that was hidden in a body.
        seen = [r.target for r in fake_gateway.requests]
        assert not [s for s in seen if "smuggled" in s or "in-body" in s], seen


async def test_every_pipelined_request_is_decided_again(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(tailnet, tmp_path / "cg", plain_config(fake_gateway)) as cg:
        t = cg.tokens["phone"]
        good = f"GET /headers?n=1 HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {t}\r\n\r\n"
        cases: list[tuple[str, bytes, list[str], list[int]]] = [
            ("token then none", (good).encode() + FOLLOWER, ["GET", "GET"], [200, 401]),
            (
                "exempt then none",
                f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode() + FOLLOWER,
                ["GET", "GET"],
                [200, 401],
            ),
            (
                "token then a wrong one",
                good.encode()
                + FOLLOWER.replace(b"\r\n\r\n", b"\r\nAuthorization: Bearer nope\r\n\r\n"),
                ["GET", "GET"],
                [200, 401],
            ),
            (
                "token then a spoofed peer",
                good.encode()
                + FOLLOWER.replace(
                    b"\r\n\r\n", b"\r\nX-Forwarded-For: 127.0.0.1\r\nX-Real-IP: 127.0.0.1\r\n\r\n"
                ),
                ["GET", "GET"],
                [200, 401],
            ),
            (
                "HEAD then none",
                good.replace("GET", "HEAD", 1).encode() + FOLLOWER,
                ["HEAD", "GET"],
                [200, 401],
            ),
            (
                "three, the last without",
                (good * 2).encode() + FOLLOWER,
                ["GET"] * 3,
                [200, 200, 401],
            ),
            (
                "token then a websocket without",
                good.encode()
                + FOLLOWER.replace(
                    b"\r\n\r\n",
                    b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"\r\n",
                ),
                ["GET", "GET"],
                [200, 401],
            ),
        ]
        problems = []
        for label, raw, methods, want in cases:
            got = statuses(await pipeline(tailnet, raw, methods))
            if got != want:
                problems.append(f"{label}: {got}, want {want}")
        assert problems == []

        # Bytes pipelined behind an allowed upgrade are WebSocket bytes, never a request.
        upgrade = (
            f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {t}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ).encode()
        assert statuses(await pipeline(tailnet, upgrade + FOLLOWER, ["GET", "GET"])) == [101]
        await fake_gateway.wait_until(lambda: fake_gateway.active_connections == 0)
        seen = [r.target for r in fake_gateway.requests]
        assert not [s for s in seen if "smuggled" in s], seen
        assert seen.count("/ws") == 1
