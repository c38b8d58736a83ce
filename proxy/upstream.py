"""The gateway side of a proxied connection: the dialer, the response relay, the splice.

:func:`dial` connects to the gateway (TCP or a unix socket, upstream.url).

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
from typing import TYPE_CHECKING, Any, Protocol

from .core.http1 import (
    BODY_CHUNKED,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    ChunkedScanner,
    ResponseError,
    response_framing,
)
from .core.wsframe import FrameTracker
from .tasks import spawn

if TYPE_CHECKING:
    from .config import Config, UpstreamConfig
    from .core.http1 import RequestHead

__all__ = ["UpstreamConnection", "BoundaryCloser", "Client", "dial"]


class _Configured(Protocol):
    @property
    def cfg(self) -> Config: ...


class Client(Protocol):
    """The client side as the gateway side drives it (front.ClientConnection is one).

    A Protocol, not the class: front imports this module, so naming front here would
    close an import cycle.
    """

    bytes_down: int

    @property
    def rt(self) -> _Configured: ...
    @property
    def transport(self) -> asyncio.Transport | None: ...
    @property
    def up(self) -> UpstreamConnection | None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def awaiting_upgrade(self) -> bool: ...
    def write_response(self, data: bytes) -> None: ...
    def response_done(self, status: int, keep_alive: bool) -> None: ...
    def become_tunnel(self, early: bytes) -> None: ...
    def upstream_eof(self) -> None: ...
    def upstream_lost(self) -> None: ...
    def upstream_lost_during_exchange(self, got_any: bool) -> None: ...
    def upstream_broken(self, reason: str, started: bool) -> None: ...
    def finish_end_session(self, reason: str, clean: bool = True) -> None: ...
    def forget_upstream(self) -> None: ...
    def pause_reading_for_upstream(self) -> None: ...
    def resume_reading_for_upstream(self) -> None: ...
    def _dialed(
        self,
        task: asyncio.Task[tuple[asyncio.Transport, Any]],
        timer: asyncio.TimerHandle,
        up: UpstreamConnection,
        head: RequestHead,
        out: bytes,
    ) -> None: ...


_MAX_RESPONSE_HEAD = 65536


def dial(
    loop: asyncio.AbstractEventLoop,
    u: UpstreamConfig,
    up: UpstreamConnection,
    owner: set[asyncio.Task[Any]],
) -> asyncio.Task[tuple[asyncio.Transport, Any]]:
    """Start connecting ``up`` to the gateway; the caller owns the task and its timeout
    (uvloop's create_connection is a coroutine: a task, cancelled on connectTimeout)."""
    # ``up`` is its own protocol factory (UpstreamConnection.__call__): no closure per dial.
    if u.unix_path is not None:
        coro = loop.create_unix_connection(up, u.unix_path)
    else:
        assert u.host is not None and u.port is not None
        coro = loop.create_connection(up, u.host, u.port)
    # Owned by the connection (it cancels it on close); a failure is its to handle.
    return spawn(coro, "dial", owner, loop=loop)


class BoundaryCloser(asyncio.Protocol):
    """Takes over a gateway connection whose session is being ended mid-frame.

    Relays the rest of the current frame to the client, then the close frame, then
    closes both sides; nothing after that frame edge reaches the client.
    """

    def __init__(self, client: Client, up: UpstreamConnection, frame: bytes, reason: str) -> None:
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
            self.client.finish_end_session(self.reason + " (gateway closed mid-frame)", clean=False)

    def pause_writing(self) -> None:
        pass  # nothing more is forwarded to the gateway

    def resume_writing(self) -> None:
        pass


class UpstreamConnection(asyncio.Protocol):
    """One connection to the gateway, owned by one client connection."""

    __slots__ = (
        "client",
        "transport",
        "tunnel",
        "_buf",
        "_scanner",
        "_body_left",
        "_until_close",
        "_in_body",
        "_status",
        "_keep_alive",
        "_head_request",
        "_eof",
        "_got_any",
        "frames",
        "closed",
        "pending",
    )

    def __init__(self, client: Client) -> None:
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
        # While dialing: (connect timer, request head, rewritten head) for the client's
        # _dialed; held here so the dial's done-callback is a bound method, not a closure.
        self.pending: tuple[asyncio.TimerHandle, RequestHead, bytes] | None = None

    def __call__(self) -> UpstreamConnection:
        """Its own protocol factory, for create_connection."""
        return self

    def dialed(self, task: asyncio.Task[tuple[asyncio.Transport, Any]]) -> None:
        """The dial task is done: hand it to the client with what it stored for it."""
        assert self.pending is not None
        timer, head, out = self.pending
        self.pending = None
        self.client._dialed(task, timer, self, head, out)  # noqa: SLF001 - its owner

    # ---------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(  # type: ignore[attr-defined]
            high=self.client.rt.cfg.limits.high_water
        )

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
                head, data = buf[: end + 4], buf[end + 4 :]
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
        status, keep_alive, body = response_framing(head, self._head_request)
        self._status = status
        if status < 200:
            return status
        self._keep_alive = keep_alive
        self._scanner = None
        self._until_close = False
        if body == BODY_NONE:
            self._in_body = False
        elif body == BODY_CHUNKED:
            self._scanner = ChunkedScanner()
            self._in_body = True
        elif body == BODY_UNTIL_CLOSE:
            self._until_close = True
            self._in_body = True
        else:
            self._body_left = body
            self._in_body = body > 0
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
