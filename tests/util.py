"""Small HTTP/1.1 client helpers for tests that talk to the proxy over raw sockets.

Raw bytes on purpose: the tests must send exactly what they mean (malformed heads,
duplicate headers, keep-alive sequences) and read exactly what came back, with no client
library normalising either side. Also a deadline-based poll for conditions without events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tests.netns import connect_in

__all__ = [
    "Response",
    "build_request",
    "exchange",
    "open_in",
    "poll_until",
    "read_response",
    "read_to_close",
    "send_and_read_all",
]


@dataclass
class Response:
    status: int
    raw_head: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> bytes | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[bytes]:
        lname = name.lower().encode()
        return [v for n, v in self.headers if n.lower() == lname]

    @property
    def raw(self) -> bytes:
        return self.raw_head + self.body


def build_request(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    host: str = "100.64.0.1:18789",
    content_length: bool = True,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body and content_length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = b""
    while True:
        line = await reader.readuntil(b"\r\n")
        out += line
        size = int(line.split(b";", 1)[0], 16)
        if size == 0:
            while True:
                t = await reader.readuntil(b"\r\n")
                out += t
                if t == b"\r\n":
                    return out
        out += await reader.readexactly(size + 2)


async def read_response(
    reader: asyncio.StreamReader, *, head_request: bool = False, timeout: float = 10.0
) -> Response:
    """Read one response; the body is raw (chunked framing kept)."""
    async with asyncio.timeout(timeout):
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip()))
        resp = Response(status, raw, headers, b"")
        if head_request or status in (204, 304) or 100 <= status < 200:
            return resp
        te = resp.header("transfer-encoding")
        cl = resp.header("content-length")
        if te is not None and te.lower().endswith(b"chunked"):
            resp.body = await _read_chunked(reader)
        elif cl is not None:
            resp.body = await reader.readexactly(int(cl))
        else:
            resp.body = await reader.read()
        return resp


async def read_to_close(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Everything until EOF; a reset counts as EOF (what arrived before it is returned)."""
    out = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                data = await reader.read(65536)
            except ConnectionResetError:
                return out
            if not data:
                return out
            out += data


async def open_in(
    ns: str, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = await connect_in(ns, host, port)
    return await asyncio.open_connection(sock=sock, limit=1 << 20)


async def exchange(
    ns: str,
    host: str,
    port: int,
    request: bytes,
    *,
    head_request: bool = False,
    timeout: float = 10.0,
) -> Response:
    """One request on a fresh connection from namespace ns; returns the parsed response."""
    reader, writer = await open_in(ns, host, port)
    try:
        writer.write(request)
        return await read_response(reader, head_request=head_request, timeout=timeout)
    finally:
        writer.close()


async def send_and_read_all(
    ns: str, host: str, port: int, data: bytes, timeout: float = 10.0
) -> bytes:
    """Send raw bytes, then read until the server closes."""
    reader, writer = await open_in(ns, host, port)
    try:
        try:
            writer.write(data)
            await writer.drain()
        except ConnectionResetError:
            return b""
        return await read_to_close(reader, timeout)
    finally:
        writer.close()


async def poll_until(
    predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02
) -> None:
    """Re-check predicate until it holds or the deadline passes (then AssertionError)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
