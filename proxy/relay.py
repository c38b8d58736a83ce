"""The gateway side of a proxied connection, and the byte splice after an upgrade.

``UpstreamConnection`` relays the gateway's responses to the client as received: it only
finds where each response ends (Content-Length, chunked, or close) so the client side
knows when the next request may be decided. After an upstream ``101`` both directions
become a splice: bytes are written through, with backpressure, half-close and close
propagation, and no frame parsing except a cheap boundary tracker in the
gateway-to-client direction, which lets clawgate inject a clean close frame (1008
revoked, 1001 shutdown) without cutting a frame in half.
"""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING

from .httphead import is_spoofable_header, normalise_header_name

if TYPE_CHECKING:
    from .front import ClientConnection

__all__ = [
    "UpstreamConnection",
    "ChunkedScanner",
    "FrameTracker",
    "BoundaryCloser",
    "close_frame",
    "ResponseError",
]

_MAX_RESPONSE_HEAD = 65536


class ResponseError(Exception):
    """The gateway sent something that is not HTTP/1.1: the exchange is broken (502)."""


def close_frame(code: int, reason: str = "") -> bytes:
    """An unmasked (server-to-client) WebSocket close frame."""
    # A control frame carries at most 125 bytes; cut on a character boundary, since a
    # reason that is not valid UTF-8 makes the client fail the connection with 1007.
    text = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    payload = struct.pack("!H", code) + text
    return bytes((0x88, len(payload))) + payload


# A request body may hold this many chunks, plus one per 4 KiB of chunk data: scanning
# costs a few Python steps per chunk, so a body of 1-byte chunks (8 MB of them stalled the
# event loop for ~2 s) is cut off after ~1,024 steps; a body cut into pieces of a few KiB,
# or a short stream of small writes, is never near it.
REQUEST_FREE_CHUNKS = 1024
_CHUNK_BYTES_SHIFT = 12  # one more chunk allowed per 4 KiB
# Fields that never belong in a request trailer: framing, routing, credentials, and the
# spoof catalogue (checked with httphead.is_spoofable_header).
_TRAILER_FORBIDDEN = frozenset(
    {b"host", b"content-length", b"transfer-encoding", b"trailer", b"te", b"connection",
     b"upgrade", b"keep-alive", b"authorization", b"proxy-authorization", b"cookie",
     b"expect", b"content-type", b"content-encoding"}
)


class ChunkedScanner:
    """Finds the end of a chunked body without copying or decoding it.

    ``feed(data)`` returns the offset in ``data`` just past the end of the message, or -1
    when more is needed. Raises ValueError on malformed framing. With ``request=True`` (a
    client's body) the number of chunks is bounded (see REQUEST_FREE_CHUNKS) and trailer
    fields from the spoof catalogue (forwarding, identity) or framing/credential fields
    are refused: a gateway would read them as ``req.trailers``.
    """

    __slots__ = ("_state", "_remaining", "_line", "_request", "_steps", "_free", "_data",
                 "_identity")

    _SIZE, _DATA, _DATA_CRLF, _TRAILER = range(4)

    def __init__(self, request: bool = False,
                 identity_headers: frozenset[bytes] = frozenset()) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._line = b""
        self._request = request
        self._steps = 0
        # Responses (the gateway's streams, e.g. server-sent events) are not bounded.
        self._free = REQUEST_FREE_CHUNKS if request else 1 << 62
        self._data = 0
        self._identity = identity_headers

    def feed(self, data: bytes) -> int:
        pos = 0
        n = len(data)
        while pos < n:
            st = self._state
            if st == self._DATA:
                take = min(self._remaining, n - pos)
                self._remaining -= take
                pos += take
                if self._remaining == 0:
                    self._state = self._DATA_CRLF
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._line += data[pos:]
                if len(self._line) > 4096:
                    raise ValueError("chunk line too long")
                return -1
            line = self._line + data[pos:nl + 1]
            self._line = b""
            pos = nl + 1
            if not line.endswith(b"\r\n"):
                raise ValueError("bare LF in chunked framing")
            line = line[:-2]
            if st == self._DATA_CRLF:
                if line:
                    raise ValueError("missing CRLF after chunk data")
                self._state = self._SIZE
                continue
            if line:  # a chunk-size line or a trailer field: one more step
                self._steps += 1
                if self._steps > self._free and self._steps > REQUEST_FREE_CHUNKS + (
                        self._data >> _CHUNK_BYTES_SHIFT):
                    raise ValueError("too many chunks (use fewer, larger chunks)")
            if st == self._SIZE:
                size_text = line.split(b";", 1)[0]
                if not size_text or len(size_text) > 16 or size_text.strip(
                        b"0123456789abcdefABCDEF"):
                    raise ValueError("invalid chunk size")
                size = int(size_text, 16)
                if size == 0:
                    self._state = self._TRAILER
                else:
                    self._remaining = size
                    self._data += size
                    self._state = self._DATA
            else:  # trailer section: lines until an empty one
                if not line:
                    self._state = self._SIZE
                    self._steps = self._data = 0
                    return pos
                if line[0] in (0x20, 0x09) or b":" not in line:
                    raise ValueError("malformed trailer")
                if self._request:
                    self._check_trailer(line)
        return -1

    def _check_trailer(self, line: bytes) -> None:
        name = line.split(b":", 1)[0]
        if not name or name != name.strip():
            raise ValueError("malformed trailer")
        norm = normalise_header_name(name)
        if norm in _TRAILER_FORBIDDEN or is_spoofable_header(norm, self._identity):
            raise ValueError("trailer field not allowed (forwarding, identity, framing "
                             "or credential header)")


class FrameTracker:
    """Tracks WebSocket frame boundaries in a server-to-client byte stream.

    The fast path is one compare and one subtraction per chunk while inside a frame.
    ``at_boundary`` is true when the bytes relayed so far end exactly at a frame edge.
    """

    __slots__ = ("remaining", "_hdr")

    def __init__(self) -> None:
        self.remaining = 0  # payload bytes of the current frame still to come
        self._hdr = b""  # a partial frame header carried over between chunks

    @property
    def at_boundary(self) -> bool:
        return self.remaining == 0 and not self._hdr

    def feed(self, data: bytes) -> None:
        n = len(data)
        r = self.remaining
        if r >= n and not self._hdr:
            self.remaining = r - n
            return
        if self._hdr:
            data = self._hdr + data
            self._hdr = b""
            n = len(data)
            pos = 0
        else:
            pos = r
        while pos < n:
            if pos + 2 <= n:
                b1 = data[pos + 1]
                if b1 < 126:
                    # Unmasked with a 7-bit length: the gateway's usual frame (measured:
                    # 0.15 -> 0.09 us per frame when a read holds many small frames).
                    pos += 2 + b1
                    continue
            avail = n - pos
            if avail < 2:
                self._hdr = data[pos:]
                self.remaining = 0
                return
            b1 = data[pos + 1]
            ln = b1 & 0x7F
            hlen = 2
            if ln == 126:
                hlen = 4
            elif ln == 127:
                hlen = 10
            if b1 & 0x80:
                hlen += 4
            if avail < hlen:
                self._hdr = data[pos:]
                self.remaining = 0
                return
            if ln == 126:
                ln = int.from_bytes(data[pos + 2:pos + 4], "big")
            elif ln == 127:
                ln = int.from_bytes(data[pos + 2:pos + 10], "big")
            pos += hlen + ln
        self.remaining = pos - n

    def bytes_to_boundary(self, data: bytes) -> int:
        """Feed ``data`` only up to the next frame edge: how many bytes that took.

        0 when already at a boundary; -1 when all of ``data`` was fed without reaching one.
        Not on the hot path: used only while a session is being ended.
        """
        used = 0
        n = len(data)
        while not self.at_boundary:
            if used >= n:
                return -1
            if self._hdr or self.remaining == 0:
                # Inside a frame header (at most 14 bytes): one byte at a time.
                take = 1
            else:
                take = min(self.remaining, n - used)
            self.feed(data[used:used + take])
            used += take
        return used


class BoundaryCloser(asyncio.Protocol):
    """Takes over a gateway connection whose session is being ended mid-frame.

    Relays the rest of the current frame to the client, then the close frame, then
    closes both sides; nothing after that frame edge reaches the client.
    """

    def __init__(self, client: ClientConnection, up: UpstreamConnection, frame: bytes,
                 reason: str) -> None:
        self.client = client
        self.up = up
        self.frame = frame
        self.reason = reason
        self.done = False

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        client = self.client
        t = client.transport
        n = self.up.frames.bytes_to_boundary(data)
        if t is None:
            return
        if n < 0:
            client.bytes_down += len(data)
            t.write(data)
            return
        self.done = True
        client.bytes_down += n + len(self.frame)
        t.write(data[:n] + self.frame)
        client.finish_end_session(self.reason)

    def eof_received(self) -> bool | None:
        self._lost()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.up.closed = True
        self._lost()

    def _lost(self) -> None:
        if not self.done:
            # The gateway ended mid-frame: no clean close is possible any more.
            self.done = True
            self.client.finish_end_session(self.reason + " (gateway closed mid-frame)",
                                           clean=False)

    def pause_writing(self) -> None:
        pass  # nothing more is forwarded to the gateway

    def resume_writing(self) -> None:
        pass


class UpstreamConnection(asyncio.Protocol):
    """One connection to the gateway, owned by one client connection."""

    __slots__ = (
        "client", "transport", "tunnel", "_buf", "_scanner", "_body_left", "_until_close",
        "_in_body", "_status", "_keep_alive", "_head_request", "_eof", "_got_any",
        "frames", "closed",
    )

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.tunnel = False
        self._buf = b""
        self._scanner: ChunkedScanner | None = None
        self._body_left = 0
        self._until_close = False
        self._in_body = False
        self._status = 0
        self._keep_alive = True
        self._head_request = False
        self._eof = False
        self._got_any = False
        self.frames = FrameTracker()
        self.closed = False

    # ---------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(  # type: ignore[attr-defined]
            high=self.client.rt.cfg.limits.high_water)

    def expect_response(self, head_request: bool) -> None:
        """The client forwarded a request head: the next bytes are its response."""
        self._head_request = head_request
        self._got_any = False

    def data_received(self, data: bytes) -> None:
        client = self.client
        if self.tunnel:
            # HOT PATH: gateway -> client splice.
            client.bytes_down += len(data)
            self.frames.feed(data)
            client.transport.write(data)  # type: ignore[union-attr]
            return
        self._got_any = True
        try:
            self._response_bytes(data)
        except ResponseError as exc:
            client.upstream_broken(str(exc), started=True)

    def _response_bytes(self, data: bytes) -> None:
        client = self.client
        while data:
            if not self._in_body:
                buf = self._buf + data
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_RESPONSE_HEAD:
                        raise ResponseError("response head too large")
                    self._buf = buf
                    return
                self._buf = b""
                head, data = buf[:end + 4], buf[end + 4:]
                status = self._parse_head(head)
                client.write_response(head)
                if status == 101 and client.awaiting_upgrade:
                    self.tunnel = True
                    client.become_tunnel(data)
                    return
                if 100 <= status < 200:
                    continue  # interim response; the final one follows
                if not self._in_body:
                    self._finish()
                continue
            # in a body
            if self._until_close:
                client.write_response(data)
                return
            if self._scanner is not None:
                end = self._scanner_feed(data)
                if end < 0:
                    client.write_response(data)
                    return
                client.write_response(data[:end])
                data = data[end:]
                self._finish()
                continue
            take = min(self._body_left, len(data))
            client.write_response(data[:take] if take < len(data) else data)
            self._body_left -= take
            data = data[take:]
            if self._body_left == 0:
                self._finish()

    def _scanner_feed(self, data: bytes) -> int:
        assert self._scanner is not None
        try:
            return self._scanner.feed(data)
        except ValueError as exc:
            raise ResponseError(f"bad chunked response: {exc}") from None

    def _parse_head(self, head: bytes) -> int:
        lines = head[:-4].split(b"\r\n")
        first = lines[0].split(b" ", 2)
        if len(first) < 2 or not first[0].startswith(b"HTTP/1.") or not first[1].isdigit():
            raise ResponseError("malformed response status line")
        status = int(first[1])
        self._status = status
        if status < 200:
            return status
        keep_alive = first[0] == b"HTTP/1.1"
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ResponseError("malformed response header")
            lname = name.strip().lower()
            if lname == b"content-length":
                v = value.strip()
                if not v.isdigit() or (length is not None and int(v) != length):
                    raise ResponseError("invalid Content-Length in response")
                length = int(v)
            elif lname == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif lname == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
        self._keep_alive = keep_alive
        self._scanner = None
        self._until_close = False
        if self._head_request or status in (204, 304):
            self._in_body = False
        elif chunked:
            self._scanner = ChunkedScanner()
            self._in_body = True
        elif length is not None:
            self._body_left = length
            self._in_body = length > 0
        else:
            self._until_close = True
            self._keep_alive = False
            self._in_body = True
        return status

    def _finish(self) -> None:
        self._in_body = False
        self._scanner = None
        self.client.response_done(self._status, self._keep_alive)

    def eof_received(self) -> bool | None:
        self._eof = True
        if self.tunnel:
            self.client.upstream_eof()
            return True  # keep our write side open: the client may still be sending
        if self._in_body and self._until_close:
            self._in_body = False
            self.client.response_done(self._status, False)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        client = self.client
        if self.tunnel:
            client.upstream_lost()
        elif self._in_body and self._until_close:
            self._in_body = False
            client.response_done(self._status, False)
        else:
            client.upstream_lost_during_exchange(self._got_any)
        if client.closed and client.up is self:
            client.forget_upstream()

    def pause_writing(self) -> None:
        self.client.pause_reading_for_upstream()

    def resume_writing(self) -> None:
        self.client.resume_reading_for_upstream()
