"""One client connection: accept, network check, head, decision, forward, splice.

``ClientConnection`` is an ``asyncio.Protocol``. The network check runs in
``connection_made`` before a byte is read. The request head is read into a bounded
buffer under a deadline, parsed strictly, and decided; allowed requests are rewritten and
forwarded to the gateway over a connection this client owns. Plain HTTP is proxied one
request at a time (each decided again); after an upstream 101 the connection becomes a
splice. Everything that is not a clear allow ends in a short status and a close.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from typing import TYPE_CHECKING, Any

from .core.exchange import (
    CLOSING,
    GATED,
    TUNNEL,
    Answer,
    Authorize,
    BadGateway,
    Close,
    Command,
    Commands,
    Deadline,
    Dial,
    DropUpstream,
    Exchange,
    Forward,
    Local,
    Pause,
    Refuse,
    SendHead,
)
from .core.http1 import RequestHead
from .core.networks import is_loopback
from .core.policy import ALLOW_EXEMPT, Decision
from .core.wsframe import close_frame
from .errors import AccessError
from .upstream import BoundaryCloser, UpstreamConnection, dial

if TYPE_CHECKING:
    from .authz import Grant
    from .runtime import Runtime

__all__ = ["ClientConnection", "STATUS_TEXT"]

STATUS_TEXT = {
    200: "OK",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    421: "Misdirected Request",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

# How long end_session waits for the gateway's current frame to end (revocation must
# end a session within about a second).
END_SESSION_GRACE = 1.0
# How long a client refused in the middle of its body may go on sending (read and dropped)
# after the answer: closing at once, with its bytes unread, resets the connection and the
# client never sees the status and reason.
LINGER_SECONDS = 2.0

_ids = itertools.count(1)


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "rt",
        "transport",
        "up",
        "up_t",
        "ex",
        "conn_id",
        "peer_ip",
        "peer_port",
        "started",
        "bytes_up",
        "bytes_down",
        "grant",
        "_head_timer",
        "_paused_state",
        "_paused_bp",
        "_up_eof",
        "_task",
        "close_reason",
        "_closed",
        "gate",
        "counted_ip",
        "proto",
        "tls",
        "unauth_counted",
        "was_tunnel",
        "counted_identity",
        "_end_timer",
    )

    def __init__(self, rt: Runtime, *, tls: bool = False) -> None:
        self.rt = rt
        self.tls = tls
        self.proto = b"https" if tls else b"http"
        self.transport: asyncio.Transport | None = None
        self.up: UpstreamConnection | None = None
        self.up_t: asyncio.Transport | None = None
        self.ex = Exchange()  # the HTTP/1 state: what to do with each event (core)
        self.conn_id = 0
        self.peer_ip = ""
        self.peer_port = 0
        self.started = 0.0
        self.bytes_up = 0
        self.bytes_down = 0
        self.grant: Grant | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._paused_state = False
        self._paused_bp = False
        self._up_eof = False
        self._task: asyncio.Task[Any] | None = None
        self.close_reason = ""
        self._closed = False
        self.gate: Any = None
        self.counted_ip = False
        self.unauth_counted = False  # counted in rt.admission.unauth_per_ip until the first allow
        self.counted_identity: str | None = None  # the rt.admission.per_identity key counted
        self._end_timer: asyncio.TimerHandle | None = None
        self.was_tunnel = False

    # ------------------------------------------------------------------ accept

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        rt = self.rt
        m = rt.metrics
        m.accepted += 1
        peer = transport.get_extra_info("peername")
        ip = peer[0] if peer else ""
        if not rt.networks.contains(ip):
            # Refused before reading a byte: RST rather than FIN, nothing is said.
            m.refused["network"] += 1
            transport.abort()  # type: ignore[attr-defined]
            rt.log.refused({"event": "refused", "peer": ip, "reason": "network not allowed"})
            return
        self.transport = transport  # type: ignore[assignment]
        self.peer_ip = ip[7:] if ip.startswith("::ffff:") and "." in ip else ip
        self.peer_port = peer[1]
        self.conn_id = next(_ids)
        self.started = time.monotonic()
        refusal = rt.admit(self)
        if refusal is not None:
            status, reason, retry = refusal
            self._deny_and_close(status, reason, retry_after=retry, log_level="refused")
            # Never counted as active: connection_lost must not "close" it again (each
            # refusal would otherwise free a slot it never held, defeating the limit).
            self._closed = True
            return
        m.active += 1
        rt.conns.add(self)
        transport.set_write_buffer_limits(high=rt.cfg.limits.high_water)  # type: ignore[attr-defined]
        self._head_timer = rt.loop.call_later(rt.cfg.limits.head_timeout, self._head_timeout)

    # ------------------------------------------------------------------ reading

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        st = ex.state
        if st == TUNNEL:
            # HOT PATH: client -> gateway splice.
            self.bytes_up += len(data)
            self.up_t.write(data)  # type: ignore[union-attr]
            return
        if st == GATED:
            self.gate.feed(data)
            return
        cmds = ex.received(data, self.rt.cfg.limits)
        if cmds:
            self._run(cmds)

    def eof_received(self) -> bool | None:
        ex = self.ex
        keep = ex.eof()
        if ex.state == TUNNEL:
            if self._up_eof:
                # Both sides are done: closing sends the FIN (after what is buffered), so a
                # shutdown(SHUT_WR) first would be one more syscall for the same bytes.
                return None
            if self.up_t is not None and self.up_t.can_write_eof():
                self.up_t.write_eof()
            return True  # half-close: keep sending the gateway's bytes to the client
        return True if keep else None  # the response may still come; close after it

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # refused in connection_made; never counted as active
        self._finalise("client closed" if exc is None else "client reset")
        if self.up is not None and self.up.closed:
            self.forget_upstream()

    def forget_upstream(self) -> None:
        """Both sides are gone: drop the client <-> upstream reference cycle, so the
        connection's objects are freed by refcounting at once (measured: the cyclic GC
        otherwise collected ~11 objects per connection, ~14 us of CPU per connection)."""
        self.up = None
        self.up_t = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self._closed:
            self._run(self.ex.head_timeout())

    # ------------------------------------------------------------------ commands

    def _run(self, cmds: Commands) -> None:
        """Carry out the exchange's commands, in order (core/exchange.py lists them).

        Dispatch on the exact type, commonest first: a ``match`` over class patterns cost
        ~3x as much per command (measured), and this runs several times per connection.
        """
        for c in cmds:
            kind = type(c)
            if kind is Forward:
                assert isinstance(c, Forward)
                self.bytes_up += len(c.data)
                self.up_t.write(c.data)  # type: ignore[union-attr]
            elif kind is Authorize:
                assert isinstance(c, Authorize)
                self._stop_deadline()
                self._authorize(c.head)
            elif kind is SendHead:
                assert isinstance(c, SendHead)
                self._send_head(c.head, c.out)
            elif kind is Dial:
                assert isinstance(c, Dial)
                self._dial(c.head, c.out)
            elif kind is Pause:
                assert isinstance(c, Pause)
                self._pause(c.on)
            else:
                self._run_rare(c)

    def _run_rare(self, c: Command) -> None:
        match c:
            case Deadline(seconds):
                self._stop_deadline()
                self._head_timer = self.rt.loop.call_later(seconds, self._head_timeout)
            case Close(reason, counter):
                if counter is not None:
                    self.rt.metrics.refused[counter] += 1
                self._close(reason)
            case Refuse(status, reason, counter):
                if counter is not None:
                    self.rt.metrics.refused[counter] += 1
                self._deny_and_close(status, reason)
            case Local(head, body):
                self._stop_deadline()
                self._local_respond(head, body)
            case Answer(status, reason, linger):
                self._send_simple(status, reason, close=True, linger=linger)
            case BadGateway(reason):
                self.rt.metrics.upstream_errors += 1
                self._send_simple(502, reason, close=True)
            case DropUpstream():
                self.up = None
                self.up_t = None
            case _:
                raise AssertionError(f"not a command of this connection: {c!r}")

    def _stop_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    # ------------------------------------------------------------------ the decision

    def _authorize(self, head: RequestHead) -> None:
        rt = self.rt
        try:
            grant = rt.authz.authorize_sync(self, head)
        except AccessError as exc:
            self._deny(head, exc.status, exc.reason, getattr(exc, "retry_after", None))
            return
        if grant is None:
            # Identity not cached: ask tailscaled without blocking other connections.
            self._pause(True)
            self._task = rt.spawn(self._decide_async(head), f"decide-{self.conn_id}")
            return
        self._apply(head, grant)

    async def _decide_async(self, head: RequestHead) -> None:
        try:
            grant = await self.rt.authz.authorize(self, head)
        except AccessError as exc:
            if not self._closed:
                self._deny(head, exc.status, exc.reason, getattr(exc, "retry_after", None))
            return
        if not self._closed:
            self._apply(head, grant)

    def _apply(self, head: RequestHead, grant: Grant) -> None:
        rt = self.rt
        d: Decision = grant.decision
        if d.allow:
            over = rt.admit_identity(self, grant)
            if over is not None:
                # limits.perIdentity: the same grant, turned into a 429 (one log line).
                grant = dataclasses.replace(
                    grant, decision=Decision(False, 429, over), retry_after=1
                )
                d = grant.decision
        rt.log_decision(self, head, grant)
        if not d.allow:
            rt.metrics.decisions[("deny", d.status)] += 1
            if grant.identity is not None:
                # The close line names the device too (per-device log); the connection
                # is closing, so this grant never lets a byte through.
                self.grant = grant
            self._send_denial(head, d.status, d.reason, grant.retry_after, grant)
            return
        if d is not ALLOW_EXEMPT and not grant.gated:
            # A credential (or identity) was verified. An exempt request shows none, and a
            # gated upgrade only once its first frame is checked (gate_passed): until then
            # the connection counts against limits.unauthenticatedPerIp.
            rt.decided(self)
        rt.metrics.decisions[("allow", 200)] += 1
        self.grant = grant
        try:
            out = rt.authz.rewrite(self, head, grant)
        except ValueError:
            self._deny(head, 403, "identity value not representable in a header")
            return
        connected = self.up_t is not None and not self.up.closed  # type: ignore[union-attr]
        self._run(
            self.ex.allowed(head, out, connected=connected, identity_headers=rt.authz.identity_norm)
        )

    def _dial(self, head: RequestHead, out: bytes) -> None:
        # The connect task itself (uvloop's create_connection is a coroutine), owned by
        # this connection (cancelled in _finalise), and a plain timer for connectTimeout:
        # a wrapping coroutine task with asyncio.timeout cost ~4% of the CPU per connection.
        rt = self.rt
        up = UpstreamConnection(self)
        task = dial(rt.loop, rt.cfg.upstream, up, rt.tasks)
        up.pending = (rt.loop.call_later(rt.cfg.upstream.connect_timeout, task.cancel), head, out)
        self._task = task
        task.add_done_callback(up.dialed)  # -> self._dialed(task, timer, up, head, out)

    def _dialed(
        self,
        task: asyncio.Task[tuple[asyncio.Transport, Any]],
        timer: asyncio.TimerHandle,
        up: UpstreamConnection,
        head: RequestHead,
        out: bytes,
    ) -> None:
        timer.cancel()
        self._task = None
        rt = self.rt
        if task.cancelled():
            if self._closed:
                return  # the client went away (_finalise cancelled the dial)
            exc: BaseException | None = TimeoutError()  # the timer cancelled it
        else:
            exc = task.exception()
        if exc is not None:
            rt.metrics.upstream_errors += 1
            if not self._closed:
                reason = "gateway unreachable"
                if isinstance(exc, TimeoutError):
                    reason = "gateway did not accept the connection in time"
                elif isinstance(exc, ConnectionRefusedError):
                    reason = "gateway refused the connection (is it running?)"
                self._send_simple(502, reason, close=True)
                rt.log.write(
                    {
                        "event": "upstream_error",
                        "conn": self.conn_id,
                        "peer": self.peer_ip,
                        "reason": reason,
                    }
                )
            if not isinstance(exc, OSError | TimeoutError):
                raise exc  # a bug, not the network: the loop's exception handler logs it
            return
        transport = task.result()[0]
        if self._closed:
            transport.abort()
            return
        self.up = up
        self.up_t = transport
        self._run(self.ex.connected(head, out, rt.authz.identity_norm))

    def _send_head(self, head: RequestHead, out: bytes) -> None:
        assert self.up is not None and self.up_t is not None
        self.up.expect_response(head.method == b"HEAD")
        self.up_t.write(out)
        if self.ex.requests == 1:
            self.rt.metrics.observe_handshake(time.monotonic() - self.started)

    # ------------------------------------------------------------------ responses

    def write_response(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.bytes_down += len(data)
            self.transport.write(data)

    @property
    def awaiting_upgrade(self) -> bool:
        return self.ex.awaiting_upgrade

    def response_done(self, status: int, keep_alive: bool) -> None:
        """The gateway finished a response; decide the next request (or close)."""
        rt = self.rt
        self._run(
            self.ex.response_done(
                keep_alive=keep_alive,
                draining=rt.draining,
                authenticated=not self.unauth_counted,
                limits=rt.cfg.limits,
            )
        )

    def become_tunnel(self, early: bytes) -> None:
        """The gateway answered 101: from now on, splice (or gate the first frame)."""
        rt = self.rt
        rt.metrics.tunnels += 1
        self.was_tunnel = True
        gate = rt.make_gate(self)
        if gate is not None:
            self.gate = gate
        pending = self.ex.upgraded(gated=gate is not None)
        if early:
            self.up.data_received(early)  # type: ignore[union-attr]
        if pending:
            self.data_received(pending)

    def gate_passed(self, released: bytes) -> None:
        """The first-frame gate verified the client: release what it held and splice."""
        self.gate = None
        self.ex.gate_passed()
        self.rt.decided(self)  # the gateway token was verified: no longer unauthenticated
        if released:
            self.bytes_up += len(released)
            self.up_t.write(released)  # type: ignore[union-attr]

    def upstream_eof(self) -> None:
        self._up_eof = True
        client_eof = self.ex.client_eof
        t = self.transport
        if t is not None and not self._closed and t.can_write_eof():
            if client_eof:
                # The close sends the FIN after what is buffered: no shutdown(SHUT_WR) first.
                self._close("both sides closed")
                return
            t.write_eof()
        elif t is not None and not self._closed:
            # TLS cannot half-close (no write_eof on SSL transports): the gateway has
            # nothing more to send, so flush and close, or the client waits for a FIN that
            # never comes (websockets: close_timeout, then the TLS shutdown timeout).
            self._close("gateway closed")
            return
        if client_eof:
            self._close("both sides closed")

    def upstream_lost(self) -> None:
        if self.ex.state == CLOSING and self.gate is not None:
            return  # the first-frame gate refused: it closes the client side (lingering)
        self._close(self.close_reason or "gateway closed")

    def upstream_lost_during_exchange(self, got_any: bool) -> None:
        if self._closed or (self.ex.state == CLOSING and self._end_timer is not None):
            return  # gone, or lingering after a refusal (our own close of the gateway side)
        self._run(self.ex.upstream_lost(got_any=got_any))

    def upstream_broken(self, reason: str, started: bool) -> None:
        self.rt.metrics.upstream_errors += 1
        self.rt.log.write(
            {
                "event": "upstream_error",
                "conn": self.conn_id,
                "peer": self.peer_ip,
                "reason": reason,
            }
        )
        if self.up_t is not None:
            self.up_t.abort()
        self._abort(reason)

    # ------------------------------------------------------------------ flow control

    def _pause(self, on: bool) -> None:
        self._paused_state = on
        self._apply_pause()

    def pause_reading_for_upstream(self) -> None:
        self._paused_bp = True
        self._apply_pause()

    def resume_reading_for_upstream(self) -> None:
        self._paused_bp = False
        self._apply_pause()

    def _apply_pause(self) -> None:
        t = self.transport
        if t is None or self._closed:
            return
        want = self._paused_state or self._paused_bp
        if want and t.is_reading():
            t.pause_reading()
        elif not want and not t.is_reading():
            t.resume_reading()

    def pause_writing(self) -> None:
        if self.up_t is not None:
            self.up_t.pause_reading()

    def resume_writing(self) -> None:
        if self.up_t is not None and not self.up_t.is_closing():
            self.up_t.resume_reading()

    # ------------------------------------------------------------------ local endpoints

    def _local_respond(self, head: RequestHead, body: bytes) -> None:
        refused = self.rt.local_misdirected(self, head)
        if refused is not None:
            self._local_send(head, refused)
            return
        if self.rt.authz.login_needs_identity(head):
            # A login POST: whois first, so failures count against the peer's node.
            self._pause(True)
            self._task = self.rt.spawn(self._local_async(head, body), f"local-{self.conn_id}")
            return
        self._local_send(head, self.rt.authz.login_endpoint(self, head, body))

    async def _local_async(self, head: RequestHead, body: bytes) -> None:
        answer = await self.rt.authz.login_endpoint_async(self, head, body)
        if not self._closed:
            self._local_send(head, answer)

    def _local_send(
        self, head: RequestHead, answer: tuple[int, list[tuple[str, str]], bytes]
    ) -> None:
        status, headers, payload = answer
        self.rt.log.write(
            {
                "event": "local",
                "conn": self.conn_id,
                "peer": self.peer_ip,
                "method": head.method.decode("latin-1"),
                "path": head.path.decode("latin-1"),
                "status": status,
            }
        )
        self._send(status, headers, payload, close=True)

    # ------------------------------------------------------------------ answering

    def _deny(
        self, head: RequestHead, status: int, reason: str, retry_after: int | None = None
    ) -> None:
        from .authz import Grant  # local: authz imports front's types only for typing

        grant = Grant(Decision(False, status, reason), retry_after=retry_after)
        self.rt.log_decision(self, head, grant)
        self.rt.metrics.decisions[("deny", status)] += 1
        self._send_denial(head, status, reason, retry_after, grant)

    def _send_denial(
        self,
        head: RequestHead,
        status: int,
        reason: str,
        retry_after: int | None,
        grant: Grant | None,
    ) -> None:
        self.rt.note_denied(self, status)
        headers: list[tuple[str, str]] = []
        body = None
        if status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="clawgate"'))
            if not head.websocket and b"text/html" in (head.header(b"accept") or b""):
                body = self.rt.authz.login_page(head.target.decode("latin-1"), "")
                headers.append(("Content-Type", "text/html; charset=utf-8"))
        if retry_after is not None:
            headers.append(("Retry-After", str(retry_after)))
        if body is None:
            body = (reason + "\n").encode("utf-8", "replace")
            headers.append(("Content-Type", "text/plain; charset=utf-8"))
        # A body may be on its way: linger, so the client reads the answer.
        self._send(status, headers, body, close=True, linger=head.has_body())

    def _deny_and_close(
        self, status: int, reason: str, retry_after: int | None = None, log_level: str = "deny"
    ) -> None:
        rt = self.rt
        record = {
            "event": "refused" if log_level == "refused" else "decision",
            "conn": self.conn_id,
            "peer": self.peer_ip,
            "decision": "deny",
            "status": status,
            "reason": reason,
        }
        if log_level == "refused":
            rt.log.refused(record)
        else:
            rt.log.write(record)
        rt.metrics.decisions[("deny", status)] += 1
        headers = [("Content-Type", "text/plain; charset=utf-8")]
        if retry_after is not None:
            headers.append(("Retry-After", str(retry_after)))
        self._send(status, headers, (reason + "\n").encode(), close=True)

    def _send_simple(self, status: int, reason: str, close: bool, linger: bool = False) -> None:
        self._send(
            status,
            [("Content-Type", "text/plain; charset=utf-8")],
            (reason + "\n").encode(),
            close=close,
            linger=linger,
        )

    def _send(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        close: bool,
        linger: bool = False,
    ) -> None:
        t = self.transport
        if t is None or self._closed:
            return
        lines = [f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Error')}"]
        lines.extend(f"{k}: {v}" for k, v in headers)
        lines.append(f"Content-Length: {len(body)}")
        lines.append("Cache-Control: no-store")
        if close:
            lines.append("Connection: close")
        head = self.ex.head
        if head is not None and head.method == b"HEAD":
            body = b""  # a response to HEAD has no body (Content-Length still says its size)
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        self.bytes_down += len(data)
        t.write(data)
        if close:
            self.close_reason = self.close_reason or f"{status} sent"
            self.ex.state = CLOSING
            if linger and t.can_write_eof() and self._end_timer is None:
                # FIN after the answer; the client's bytes are read and dropped (CLOSING)
                # until it closes, or LINGER_SECONDS pass.
                t.write_eof()
                if self.up_t is not None and not self.up_t.is_closing():
                    self.up_t.close()
                self._paused_state = self._paused_bp = False
                self._apply_pause()  # keep reading (and dropping) what still comes
                self._end_timer = self.rt.loop.call_later(
                    LINGER_SECONDS, self._close, self.close_reason
                )
                return
            self._close(self.close_reason)

    # ------------------------------------------------------------------ ending

    def end_session(self, code: int, reason: str) -> None:
        """End a live session: a clean close frame when a WebSocket is open."""
        if self._closed or self._end_timer is not None:
            return
        self.close_reason = reason
        t = self.transport
        up, up_t = self.up, self.up_t
        if self.ex.state not in (TUNNEL, GATED) or t is None or up is None or up_t is None:
            self._close(reason)
            return
        frame = close_frame(code, reason)
        if up.frames.at_boundary:
            t.write(frame)
            self._close(reason)
            return
        # Mid-frame: relay the gateway's bytes up to the end of the current frame, then
        # inject the close frame there (the splice itself never looks at frames).
        up_t.set_protocol(BoundaryCloser(self, up, frame, reason))
        self._end_timer = self.rt.loop.call_later(END_SESSION_GRACE, self._end_overdue)

    def _end_overdue(self) -> None:
        # The frame did not end in time (a stalled gateway or a client not reading):
        # a close frame now would corrupt the stream, so cut the connection instead.
        self._end_timer = None
        if not self._closed:
            self.close_reason = (
                f"{self.close_reason} (no frame boundary within {END_SESSION_GRACE:.0f}s)"
            )
            self._abort(self.close_reason)

    def finish_end_session(self, reason: str, clean: bool = True) -> None:
        """The close frame went out at a frame edge (or cannot): close both sides."""
        if self._end_timer is not None:
            self._end_timer.cancel()
            self._end_timer = None
        if clean:
            self._close(reason)
        else:
            self.close_reason = reason
            self._abort(reason)

    def close_if_idle(self, reason: str) -> None:
        """Close a keep-alive connection waiting between requests (drain)."""
        if self.ex.idle and not self._closed:
            self.close_reason = reason
            self._close(reason)

    def _abort(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        if self.transport is not None and not self._closed:
            self.transport.abort()
        self._finalise(self.close_reason)

    def _close(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        self.ex.state = CLOSING
        if self.transport is not None and not self._closed:
            self.transport.close()
        if self.up_t is not None and not self.up_t.is_closing():
            self.up_t.close()

    def _finalise(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.ex.state = CLOSING
        if self._end_timer is not None:
            self._end_timer.cancel()
            self._end_timer = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.up_t is not None and not self.up_t.is_closing():
            self.up_t.close()
        if self.gate is not None:
            self.gate.cancel()
        self.rt.connection_closed(self, self.close_reason or reason)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def is_tunnel(self) -> bool:
        return self.ex.state in (TUNNEL, GATED)

    @property
    def requests(self) -> int:
        return self.ex.requests

    @property
    def is_loopback_peer(self) -> bool:
        return is_loopback(self.peer_ip)

    def age(self) -> float:
        return time.monotonic() - self.started
