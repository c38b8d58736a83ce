"""The per-connection HTTP/1 exchange, decision by decision (the start of the state machine).

``front.ClientConnection`` is the asyncio side of one client connection; the choices it
makes between its I/O calls are here, as pure functions of what it has seen, so they are
table-tested in-process (tests/unit/test_exchange.py):

- :func:`scan_head`: where a request head ends in what has arrived, or that it is too large;
- :func:`request_body`: how the forwarded request's body is framed (what front waits for
  before the response may be the next request's);
- :func:`after_response`: whether the connection is reused for a next request, or why not.

The states are front's (HEAD -> DECIDING -> BODY/AWAIT -> HEAD or TUNNEL/GATED; CLOSING).
The next step (docs/architecture.md) is an ``Exchange`` object that owns those states and
answers each event with commands, so front only carries the commands out.
"""

from __future__ import annotations

from typing import Final

from .http1 import BODY_CHUNKED, BODY_NONE, RequestHead, find_head_end

__all__ = ["HEAD_TOO_LARGE", "NEED_MORE", "scan_head", "request_body", "after_response"]

NEED_MORE: Final = -1
HEAD_TOO_LARGE: Final = -2


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
