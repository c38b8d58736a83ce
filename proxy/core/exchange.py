"""The per-connection HTTP/1 exchange as a state machine: events in, commands out.

``front.ClientConnection`` is the asyncio side of one client connection. Everything it
decides about the HTTP/1 conversation is here, with no I/O, so it is table-tested
in-process (tests/unit/test_exchange.py): an :class:`Exchange` receives the events of one
connection (client bytes, end of the client's stream, the head deadline, the decision,
the gateway connected, the gateway's response ended or lost) and answers each with a tuple
of commands, which front carries out in order:

=================  ==============================================================
command            front does
=================  ==============================================================
:class:`Authorize` stop the head deadline; decide the head (token, identity, policy)
:class:`Local`     stop the head deadline; answer clawgate's own endpoint
:class:`Dial`      connect to the gateway; then call :meth:`Exchange.connected`
:class:`SendHead`  write the rewritten head to the gateway
:class:`Forward`   write request-body bytes to the gateway
:class:`Refuse`    a logged refusal: status + reason, then close
:class:`Answer`    a plain status + reason (not a decision), then close (lingering)
:class:`BadGateway` count an upstream error, answer 502 + reason, close
:class:`Close`     close both sides with this reason
:class:`Pause`     stop (True) or resume (False) reading the client
:class:`Deadline`  (re)arm the head deadline: a next head must come within it
:data:`DROP_UPSTREAM` forget the idle gateway connection (dial again next time)
=================  ==============================================================

States: HEAD -> DECIDING -> BODY -> AWAIT -> HEAD (keep-alive) ...; LOCAL_BODY for a body
to clawgate's own endpoint; after an upstream 101, TUNNEL (or GATED while the first-frame
gate holds the client's bytes), which front handles itself: the splice is a direct
transport-to-transport write and never comes here. CLOSING drops what still arrives.
Every terminal command (Refuse, Answer, BadGateway, Close) moves the exchange to CLOSING
first, so nothing that arrives after it is acted on.
"""

from __future__ import annotations

from typing import Final, NamedTuple, Protocol

from ..errors import BadRequest
from .http1 import (
    BODY_CHUNKED,
    BODY_NONE,
    ChunkedScanner,
    RequestHead,
    find_head_end,
    parse_request_head,
)

__all__ = [
    "HEAD",
    "DECIDING",
    "BODY",
    "AWAIT",
    "TUNNEL",
    "GATED",
    "LOCAL_BODY",
    "CLOSING",
    "HEAD_TOO_LARGE",
    "NEED_MORE",
    "LOCAL_PREFIX",
    "LOCAL_BODY_LIMIT",
    "HOLD_SLACK",
    "Limits",
    "Exchange",
    "Authorize",
    "Local",
    "Dial",
    "SendHead",
    "Forward",
    "Refuse",
    "Answer",
    "BadGateway",
    "Close",
    "Pause",
    "Deadline",
    "DropUpstream",
    "DROP_UPSTREAM",
    "PAUSE",
    "RESUME",
    "Command",
    "scan_head",
    "request_body",
    "after_response",
]

# States. Small ints: front compares one on every data_received.
HEAD: Final = 0
DECIDING: Final = 1
BODY: Final = 2
AWAIT: Final = 3
TUNNEL: Final = 4
GATED: Final = 5
LOCAL_BODY: Final = 6
CLOSING: Final = 7

NEED_MORE: Final = -1
HEAD_TOO_LARGE: Final = -2

# clawgate's own endpoints (login pages): answered by clawgate, never forwarded.
LOCAL_PREFIX: Final = b"/__clawgate/"
LOCAL_BODY_LIMIT: Final = 8192
# What a client may send while its request is decided or answered (a pipelined request,
# early frames) beyond limits.headBytes before reading it is paused.
HOLD_SLACK: Final = 65536


class Limits(Protocol):
    """The part of config.Limits the exchange reads (the snapshot of the moment)."""

    @property
    def head_bytes(self) -> int: ...
    @property
    def head_lines(self) -> int: ...
    @property
    def head_timeout(self) -> float: ...


# ---------------------------------------------------------------------------- commands


class Authorize(NamedTuple):
    head: RequestHead


class Local(NamedTuple):
    head: RequestHead
    body: bytes


class Dial(NamedTuple):
    head: RequestHead
    out: bytes


class SendHead(NamedTuple):
    head: RequestHead
    out: bytes


class Forward(NamedTuple):
    data: bytes


class Refuse(NamedTuple):
    status: int
    reason: str
    counter: str | None = None  # the metrics.refused key, when it has one


class Answer(NamedTuple):
    status: int
    reason: str
    linger: bool = False


class BadGateway(NamedTuple):
    reason: str


class Close(NamedTuple):
    reason: str
    counter: str | None = None


class Pause(NamedTuple):
    on: bool


class Deadline(NamedTuple):
    seconds: float


class DropUpstream(NamedTuple):
    pass


DROP_UPSTREAM = DropUpstream()
PAUSE = Pause(True)
RESUME = Pause(False)

Command = (
    Authorize
    | Local
    | Dial
    | SendHead
    | Forward
    | Refuse
    | Answer
    | BadGateway
    | Close
    | Pause
    | Deadline
    | DropUpstream
)
Commands = tuple[Command, ...]

_NOTHING: Commands = ()
_PAUSE: Commands = (PAUSE,)


# ---------------------------------------------------------------------------- pure steps


def scan_head(buf: bytes, searched: int, limit: int) -> int:
    """The offset just past the head's CRLF CRLF in ``buf``, NEED_MORE or HEAD_TOO_LARGE.

    ``searched``: how many bytes of ``buf`` were already searched (the previous reads);
    ``limit``: limits.headBytes. A head is too large when it ends past the limit, or when
    more than the limit has arrived without its end: refused at once, not at the deadline.
    """
    end = find_head_end(buf, searched)
    if end < 0:
        return HEAD_TOO_LARGE if len(buf) > limit else NEED_MORE
    return HEAD_TOO_LARGE if end > limit else end


def request_body(head: RequestHead) -> int:
    """BODY_CHUNKED, BODY_NONE, or the Content-Length of the request body to forward."""
    if head.chunked:
        return BODY_CHUNKED
    if head.content_length:
        return head.content_length
    return BODY_NONE


def after_response(
    *,
    keep_alive: bool,
    body_unfinished: bool,
    client_eof: bool,
    request_keep_alive: bool | None,
    draining: bool,
) -> str | None:
    """None when the next request may follow on this connection, else the close reason.

    ``keep_alive``: the gateway's response allows it; ``body_unfinished``: the gateway
    answered before the request body was complete (a 413, say), so the rest of the body
    cannot be framed reliably; ``request_keep_alive``: the request's own Connection
    semantics (None when there is no request to speak of).
    """
    if body_unfinished or not keep_alive or client_eof or not request_keep_alive:
        return "response complete, connection not reusable"
    if draining:
        return "server shutting down"
    return None


# ---------------------------------------------------------------------------- the machine


class Exchange:
    """The HTTP/1 state of one client connection (see the module docstring)."""

    __slots__ = (
        "state",
        "buf",
        "head",
        "requests",
        "client_eof",
        "awaiting_upgrade",
        "_body_left",
        "_chunks",
        "_local_head",
    )

    def __init__(self) -> None:
        self.state = HEAD
        self.buf = b""  # bytes received and not yet acted on (a partial or next head)
        self.head: RequestHead | None = None  # the request being answered
        self.requests = 0
        self.client_eof = False
        self.awaiting_upgrade = False  # a WebSocket upgrade was forwarded; 101 may come
        self._body_left = 0
        self._chunks: ChunkedScanner | None = None
        self._local_head: RequestHead | None = None

    # ---------------------------------------------------------------- client events

    def received(self, data: bytes, limits: Limits) -> Commands:
        """Client bytes, in any state but TUNNEL/GATED (front's own)."""
        st = self.state
        if st == BODY:
            return self._body_bytes(data)
        if st == HEAD:
            old = self.buf
            buf = old + data if old else data
            end = scan_head(buf, len(old), limits.head_bytes)
            if end < 0:
                if end == HEAD_TOO_LARGE:
                    self.buf = b""
                    return self._end(Refuse(431, "request head too large"))
                self.buf = buf
                return _NOTHING
            self.buf = buf[end:]
            return self._on_head(buf[:end], limits)
        if st == LOCAL_BODY:
            self.buf += data
            return self._local_progress()
        if st == CLOSING:
            return _NOTHING
        # DECIDING / AWAIT: hold what arrives (a pipelined request, early frames).
        self.buf += data
        if len(self.buf) > limits.head_bytes + HOLD_SLACK:
            return _PAUSE
        return _NOTHING

    def eof(self) -> bool:
        """The client ended its stream: True to keep the connection open for the answer."""
        self.client_eof = True
        st = self.state
        return st == AWAIT or st == DECIDING

    def head_timeout(self) -> Commands:
        """The head deadline passed."""
        if self.state != HEAD and self.state != LOCAL_BODY:
            return _NOTHING
        if self.buf or self.requests == 0 or self.state == LOCAL_BODY:
            return self._end(Refuse(408, "request head not received in time", "head_timeout"))
        return self._end(Close("idle keep-alive", "head_timeout"))

    # ---------------------------------------------------------------- decision events

    def allowed(
        self, head: RequestHead, out: bytes, *, connected: bool, identity_headers: frozenset[bytes]
    ) -> Commands:
        """The head was allowed and rewritten to ``out``; ``connected``: a kept-alive
        gateway connection is open for it."""
        self.awaiting_upgrade = head.websocket
        if connected:
            return self.connected(head, out, identity_headers)
        # Reading stays on while dialing: DECIDING holds early bytes (bounded, pausing past
        # the head limit); a pause/resume pair here cost two epoll_ctl per connection.
        self.state = DECIDING
        return (Dial(head, out),)

    def connected(
        self, head: RequestHead, out: bytes, identity_headers: frozenset[bytes]
    ) -> Commands:
        """The gateway connection is open: the head goes out, then the body it frames."""
        body = request_body(head)
        if body == BODY_CHUNKED:
            self._chunks = ChunkedScanner(request=True, identity_headers=identity_headers)
            self.state = BODY
        elif body > 0:
            self._body_left = body
            self.state = BODY
        else:
            self.state = AWAIT
        pending = self.buf
        if pending and self.state == BODY:
            self.buf = b""
            return (SendHead(head, out), RESUME, *self._body_bytes(pending))
        # Early bytes with no body to frame (frames before the 101, a pipelined request)
        # stay held until the response ends.
        return (SendHead(head, out), RESUME)

    # ---------------------------------------------------------------- gateway events

    def response_done(
        self, *, keep_alive: bool, draining: bool, authenticated: bool, limits: Limits
    ) -> Commands:
        """The gateway finished a response: the next request may follow, or the end."""
        self.awaiting_upgrade = False
        head = self.head
        why = after_response(
            keep_alive=keep_alive,
            body_unfinished=self.state == BODY,
            client_eof=self.client_eof,
            request_keep_alive=head.keep_alive if head is not None else None,
            draining=draining,
        )
        if why is not None:
            return self._end(Close(why))
        self.state = HEAD
        # Keep-alive allowance for a connection that showed a credential; one that has not
        # (exempt requests only) gets headTimeout, like a new connection.
        wait = limits.head_timeout
        deadline = Deadline(wait if not authenticated else wait * 6)
        if not self.buf:
            return (deadline,)
        pending, self.buf = self.buf, b""
        return (deadline, *self.received(pending, limits))

    def upgraded(self, *, gated: bool) -> bytes:
        """The gateway answered 101: TUNNEL (or GATED); returns the client bytes held."""
        self.awaiting_upgrade = False
        self.state = GATED if gated else TUNNEL
        pending, self.buf = self.buf, b""
        return pending

    def gate_passed(self) -> None:
        self.state = TUNNEL

    def upstream_lost(self, *, got_any: bool) -> Commands:
        """The gateway connection ended before or during a response (not a tunnel)."""
        st = self.state
        if not got_any:
            if st == HEAD:
                # An idle keep-alive connection closed by the gateway: dial again next time.
                return (DROP_UPSTREAM,)
            if st == AWAIT or st == BODY:
                return self._end(BadGateway("gateway closed the connection without a response"))
        return self._end(Close("gateway closed mid-response"))

    # ---------------------------------------------------------------- queries

    @property
    def idle(self) -> bool:
        """Between requests on a kept-alive connection, with nothing of a next one."""
        return self.state == HEAD and self.requests > 0 and not self.buf

    # ---------------------------------------------------------------- steps

    def _end(self, command: Command) -> Commands:
        self.state = CLOSING
        return (command,)

    def _on_head(self, raw: bytes, limits: Limits) -> Commands:
        try:
            head = parse_request_head(raw, limits.head_lines)
        except BadRequest as exc:
            self.head = None  # the answer is to this malformed head, not the last request
            return self._end(Refuse(exc.status, exc.reason, "bad_request"))
        self.requests += 1
        self.head = head
        if head.path.startswith(LOCAL_PREFIX):
            return self._local(head, limits)
        self.state = DECIDING
        return (Authorize(head),)

    def _body_bytes(self, data: bytes) -> Commands:
        chunks = self._chunks
        if chunks is not None:
            try:
                end = chunks.feed(data)
            except ValueError as exc:
                return self._end(Answer(400, f"bad chunked body: {exc}", linger=True))
            if end < 0:
                return (Forward(data),)
            self._chunks = None
        else:
            end = min(self._body_left, len(data))
            self._body_left -= end
            if self._body_left > 0:
                return (Forward(data),)
        rest = data[end:]
        self.state = AWAIT
        if rest:
            self.buf += rest
            return (Forward(data[:end]),)
        return (Forward(data),)

    def _local(self, head: RequestHead, limits: Limits) -> Commands:
        if head.content_length:
            if head.content_length > LOCAL_BODY_LIMIT:
                return self._end(Refuse(413, "body too large"))
            self._local_head = head
            self._body_left = head.content_length
            self.state = LOCAL_BODY
            progress = self._local_progress()
            if progress:
                return progress
            return (Deadline(limits.head_timeout),)
        if head.chunked:
            return self._end(Refuse(411, "length required"))
        self.state = DECIDING
        return (Local(head, b""),)

    def _local_progress(self) -> Commands:
        head = self._local_head
        if head is None or len(self.buf) < self._body_left:
            return _NOTHING
        body, self.buf = self.buf[: self._body_left], self.buf[self._body_left :]
        self._local_head = None
        self.state = DECIDING
        return (Local(head, body),)
