"""proxy/core/exchange.py as tables: the decisions of one client connection, in-process.

Rows mirror the HTTP/1 rows of the functional tests (tests/functional/test_limits.py,
test_hotpath.py, tests/security/test_slowloris.py, test_smuggling.py), which stay: they are
the proof that front.py only carries these answers out.
"""

from __future__ import annotations

import pytest

from proxy.core.exchange import (
    HEAD_TOO_LARGE,
    NEED_MORE,
    after_response,
    request_body,
    scan_head,
)
from proxy.core.http1 import BODY_CHUNKED, BODY_NONE, parse_request_head

HEAD = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"  # 27 bytes


@pytest.mark.parametrize(
    ("buf", "searched", "limit", "expect"),
    [
        (HEAD, 0, 1024, len(HEAD)),
        (HEAD + b"GET /y HTTP/1.1\r\n", 0, 1024, len(HEAD)),  # pipelined bytes stay in buf
        (HEAD[:-1], 0, 1024, NEED_MORE),
        (HEAD[:-2], 0, 1024, NEED_MORE),
        (b"", 0, 1024, NEED_MORE),
        # The end found across reads: the search resumes three bytes before the new data.
        (HEAD, len(HEAD) - 1, 1024, len(HEAD)),
        (HEAD, len(HEAD) - 3, 1024, len(HEAD)),
        # limits.headBytes: a head ending exactly at the limit is fine, one byte more is 431.
        (HEAD, 0, len(HEAD), len(HEAD)),
        (HEAD, 0, len(HEAD) - 1, HEAD_TOO_LARGE),
        # No end yet, but more than the limit already: 431 at once (slowloris with a big head).
        (b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 100, 0, 64, HEAD_TOO_LARGE),
        (b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 40, 0, 64, NEED_MORE),
    ],
)
def test_scan_head(buf: bytes, searched: int, limit: int, expect: int) -> None:
    assert scan_head(buf, searched, limit) == expect


def test_scan_head_byte_by_byte_finds_the_same_end() -> None:
    buf = b""
    for i in range(len(HEAD)):
        searched = len(buf)
        buf += HEAD[i : i + 1]
        got = scan_head(buf, searched, 1024)
        assert got == (len(HEAD) if i == len(HEAD) - 1 else NEED_MORE)


@pytest.mark.parametrize(
    ("head", "expect"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", BODY_NONE),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", BODY_NONE),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n", 12),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", BODY_CHUNKED),
        (
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            BODY_NONE,
        ),
    ],
)
def test_request_body(head: bytes, expect: int) -> None:
    assert request_body(parse_request_head(head)) == expect


def _reuse(**kw: object) -> str | None:
    args: dict[str, object] = {
        "keep_alive": True,
        "body_unfinished": False,
        "client_eof": False,
        "request_keep_alive": True,
        "draining": False,
    }
    args.update(kw)
    return after_response(**args)  # type: ignore[arg-type]


NOT_REUSABLE = "response complete, connection not reusable"


@pytest.mark.parametrize(
    ("kw", "expect"),
    [
        ({}, None),  # keep-alive: the next request is read on this connection
        ({"keep_alive": False}, NOT_REUSABLE),  # the gateway said Connection: close / HTTP/1.0
        ({"request_keep_alive": False}, NOT_REUSABLE),  # the client said Connection: close
        ({"request_keep_alive": None}, NOT_REUSABLE),  # no request (a refused head)
        ({"client_eof": True}, NOT_REUSABLE),  # the client half-closed after its request
        ({"body_unfinished": True}, NOT_REUSABLE),  # a 413 before the whole body was sent
        ({"draining": True}, "server shutting down"),
        # Not reusable wins over draining: the close reason says why the connection ended.
        ({"draining": True, "keep_alive": False}, NOT_REUSABLE),
    ],
)
def test_after_response(kw: dict[str, object], expect: str | None) -> None:
    assert _reuse(**kw) == expect


@pytest.mark.parametrize(
    ("raw", "keep"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", True),
    ],
)
def test_after_response_with_parsed_heads(raw: bytes, keep: bool) -> None:
    head = parse_request_head(raw)
    assert (_reuse(request_keep_alive=head.keep_alive) is None) is keep
