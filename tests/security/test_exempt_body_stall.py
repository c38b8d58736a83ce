"""One client must not stall the event loop with a body of tiny chunks.

The attack: ``POST /health`` (exempt: no token needed) with ``Transfer-Encoding: chunked``
and 8 MB of 1-byte chunks. clawgate finds the end of a chunked body itself (to know when the
next request may be decided); done one chunk at a time in Python that is ~1.4 million loop
iterations on the event loop, and every other client waits. Now an exempt path takes no body
(413, nothing forwarded), and a chunked body may hold at most ~1,024 chunks plus one per
4 KiB of data (400 past that), so scanning costs a bounded number of Python steps however the
body is cut. While the attack runs, another client's small requests keep their latency.

The gateway is the real Node server (node_echo.js), which reads a whole body before it
answers, as a Node gateway does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from tests.netns import GW_V4, Tailnet
from tests.security.node_support import node_echo
from tests.support import (
    HOST,
    PORT,
    plain_config,
    running,
    status_of,
)
from tests.util import open_in, read_response, read_to_close

BODY = b"1\r\nx\r\n" * (8 * 1024 * 1024 // 6) + b"0\r\n\r\n"  # 8 MB of 1-byte chunks
VICTIM_REQUESTS = 200


async def attack(tailnet: Tailnet, path: str, auth: str = "") -> tuple[bytes, float]:
    """Send the 8 MB body; the response and how long the attack lasted."""
    t0 = time.perf_counter()
    reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)

    async def send() -> None:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            writer.write(
                (
                    f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\n{auth}"
                    "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                ).encode()
            )
            for i in range(0, len(BODY), 1 << 16):
                writer.write(BODY[i : i + (1 << 16)])
                await writer.drain()

    sender = asyncio.ensure_future(send())
    try:
        resp = await read_to_close(reader, 60)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()
    return resp, time.perf_counter() - t0


async def victim(tailnet: Tailnet, started: asyncio.Event, done: asyncio.Event) -> list[float]:
    """Small keep-alive GET /health requests from another host while the attack runs."""
    out: list[float] = []
    reader, writer = await open_in(tailnet.ns("ci"), GW_V4, PORT)
    try:
        started.set()
        deadline = time.monotonic() + 30
        while len(out) < VICTIM_REQUESTS and time.monotonic() < deadline:
            t0 = time.perf_counter()
            writer.write(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            resp = await read_response(reader, timeout=30)
            assert resp.status == 200, resp.raw
            out.append(time.perf_counter() - t0)
            if done.is_set() and len(out) >= 20:
                break
            await asyncio.sleep(0.005)
    finally:
        writer.close()
    return out


def p99(values: list[float]) -> float:
    vals = sorted(values)
    return vals[min(len(vals) - 1, int(len(vals) * 0.99))]


async def measured(tailnet: Tailnet, path: str, auth: str = "") -> dict[str, Any]:
    """The attack, again and again (at most 300 times, 10 s), while the victim measures."""
    started, done = asyncio.Event(), asyncio.Event()
    vtask = asyncio.ensure_future(victim(tailnet, started, done))
    await started.wait()
    attacks: list[tuple[bytes, float]] = []
    t0 = time.monotonic()
    try:
        while not vtask.done() and len(attacks) < 300 and time.monotonic() - t0 < 10:
            attacks.append(await attack(tailnet, path, auth))
    finally:
        done.set()
    lat = await vtask
    statuses = {status_of(r) for r, _ in attacks}
    return {
        "status": statuses.pop() if len(statuses) == 1 else statuses,
        "resp": attacks[0][0][:300],
        "attacks": len(attacks),
        "attack_s": round(max(t for _, t in attacks), 3),
        "victim_p99_ms": round(p99(lat) * 1000, 1),
        "victim_max_ms": round(max(lat) * 1000, 1),
        "victim_n": len(lat),
    }


async def test_tiny_chunks_to_an_exempt_path_do_not_stall_other_clients(
    tailnet: Tailnet, tmp_path: Path
) -> None:
    async with (
        node_echo(tailnet) as node,
        running(tailnet, tmp_path / "cg", plain_config(node)) as cg,
    ):
        idle = asyncio.Event()
        idle.set()
        alone = await victim(tailnet, asyncio.Event(), idle)
        got = await measured(tailnet, "/health")
        print("no attack: victim p99 ms", round(p99(alone) * 1000, 1), "; exempt attack:", got)
        # Refused at once (an exempt path takes no body); nothing reached the gateway.
        assert got["status"] == 413, got
        assert b"takes no request body" in got["resp"], got
        seen = await node.seen()
        assert [r for r in seen["requests"] if r["method"] == "POST"] == []
        assert got["victim_p99_ms"] < 100, got
        assert cg.proc is not None and cg.proc.poll() is None


async def test_tiny_chunks_with_a_token_are_cut_off(tailnet: Tailnet, tmp_path: Path) -> None:
    async with (
        node_echo(tailnet) as node,
        running(tailnet, tmp_path / "cg", plain_config(node)) as cg,
    ):
        got = await measured(tailnet, "/upload", f"Authorization: Bearer {cg.tokens['phone']}\r\n")
        print("token attack:", got)
        assert got["status"] == 400, got
        assert b"too many chunks" in got["resp"], got
        assert got["victim_p99_ms"] < 100, got
        # A chunked body of ordinary pieces still goes through whole, byte for byte.
        token = cg.tokens["phone"]
        pieces = b"".join(b"%x\r\n" % 4096 + b"y" * 4096 + b"\r\n" for _ in range(600))
        pieces += b"".join(b"10\r\n" + b"z" * 16 + b"\r\n" for _ in range(800)) + b"0\r\n\r\n"
        reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
        writer.write(
            (
                f"POST /upload HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}"
                "\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            ).encode()
            + pieces
        )
        resp = await read_response(reader, timeout=30)
        writer.close()
        assert resp.status == 200, resp.raw
        assert json.loads(resp.body)["bodyBytes"] == 600 * 4096 + 800 * 16
