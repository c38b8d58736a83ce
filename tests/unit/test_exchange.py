"""proxy/core/exchange.py as tables: the decisions of one client connection, in-process.

Rows mirror the HTTP/1 rows of the functional tests (tests/functional/test_limits.py,
test_hotpath.py, tests/security/test_slowloris.py, test_smuggling.py), which stay: they are
the proof that front.py only carries these answers out.
"""

from __future__ import annotations

import dataclasses

import pytest

from proxy.core import exchange as ex
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


# ------------------------------------------------------------------------------------------
# The Exchange: events in, commands out. One row per HTTP/1 behaviour of the functional and
# security tests named in each row's comment; the commands are shown as short tuples.


@dataclasses.dataclass(frozen=True)
class _Limits:
    head_bytes: int = 1024
    head_lines: int = 10
    head_timeout: float = 10.0


LIM = _Limits()
IDENT = frozenset({b"x-clawgate-user"})
GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
GET_CLOSE = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
POST5 = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
CHUNKED = b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
WS = (
    b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
LOGIN = b"GET /__clawgate/login HTTP/1.1\r\nHost: a\r\n\r\n"
LOGIN_POST = b"POST /__clawgate/login HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n"
OUT = b"<rewritten head>"


def _show(c: ex.Command) -> tuple[object, ...]:
    match c:
        case ex.Authorize(head):
            return ("authorize", head.target)
        case ex.Local(head, body):
            return ("local", head.target, body)
        case ex.Dial(head, _):
            return ("dial", head.target)
        case ex.SendHead(head, _):
            return ("send_head", head.target)
        case ex.Forward(data):
            return ("forward", data)
        case ex.Refuse(status, reason, counter):
            return ("refuse", status, reason, counter)
        case ex.Answer(status, reason, linger):
            return ("answer", status, reason, linger)
        case ex.BadGateway(reason):
            return ("502", reason)
        case ex.Close(reason, counter):
            return ("close", reason, counter)
        case ex.Pause(on):
            return ("pause",) if on else ("resume",)
        case ex.Deadline(seconds):
            return ("deadline", seconds)
        case ex.DropUpstream():
            return ("drop_upstream",)
    raise AssertionError(c)  # pragma: no cover - every command is shown above


def _drive(events: list[tuple[object, ...]]) -> tuple[ex.Exchange, list[object]]:
    """Run events through one Exchange; the result per event: commands shown, or a value."""
    x = ex.Exchange()
    seen: list[object] = []
    for event in events:
        name, *args = event
        if name == "recv":
            got: object = [_show(c) for c in x.received(args[0], LIM)]  # type: ignore[arg-type]
        elif name == "eof":
            got = x.eof()
        elif name == "timeout":
            got = [_show(c) for c in x.head_timeout()]
        elif name == "allow":
            assert x.head is not None
            got = [
                _show(c)
                for c in x.allowed(
                    x.head, OUT, connected=bool(args and args[0]), identity_headers=IDENT
                )
            ]
        elif name == "connected":
            assert x.head is not None
            got = [_show(c) for c in x.connected(x.head, OUT, IDENT)]
        elif name == "done":
            keep_alive, draining, authenticated = (list(args) + [True, False, True][len(args) :])[
                :3
            ]
            got = [
                _show(c)
                for c in x.response_done(
                    keep_alive=bool(keep_alive),
                    draining=bool(draining),
                    authenticated=bool(authenticated),
                    limits=LIM,
                )
            ]
        elif name == "upgraded":
            got = x.upgraded(gated=bool(args[0]))
        elif name == "gate_passed":
            x.gate_passed()
            got = None
        elif name == "lost":
            got = [_show(c) for c in x.upstream_lost(got_any=bool(args[0]))]
        else:  # pragma: no cover - a typo in a table row
            raise AssertionError(name)
        seen.append(got)
    return x, seen


AUTH_X = [("authorize", b"/x")]
DIAL_X = [("dial", b"/x")]
SENT_X = [("send_head", b"/x"), ("resume",)]
NOT_REUSABLE_CLOSE = [("close", NOT_REUSABLE, None)]
KEEP_ALIVE = [("deadline", 60.0)]  # authenticated: 6 x headTimeout between requests

ROWS: list[tuple[str, list[tuple[object, ...]], list[object], int]] = [
    # --- test_hotpath / every proxied request: head -> decide -> dial -> head out -> answer
    (
        "get_keep_alive",
        [("recv", GET), ("allow",), ("connected",), ("done",)],
        [AUTH_X, DIAL_X, SENT_X, KEEP_ALIVE],
        ex.HEAD,
    ),
    (
        "second_request_on_the_open_gateway_connection",
        [("recv", GET), ("allow",), ("connected",), ("done",), ("recv", GET), ("allow", True)],
        [AUTH_X, DIAL_X, SENT_X, KEEP_ALIVE, AUTH_X, SENT_X],
        ex.AWAIT,
    ),
    (
        "exempt_request_keep_alive_gets_head_timeout_only",  # limits: unauthenticated allowance
        [("recv", GET), ("allow",), ("connected",), ("done", True, False, False)],
        [AUTH_X, DIAL_X, SENT_X, [("deadline", 10.0)]],
        ex.HEAD,
    ),
    (
        "client_says_connection_close",
        [("recv", GET_CLOSE), ("allow",), ("connected",), ("done",)],
        [AUTH_X, DIAL_X, SENT_X, NOT_REUSABLE_CLOSE],
        ex.CLOSING,
    ),
    (
        "gateway_says_connection_close",
        [("recv", GET), ("allow",), ("connected",), ("done", False)],
        [AUTH_X, DIAL_X, SENT_X, NOT_REUSABLE_CLOSE],
        ex.CLOSING,
    ),
    (
        "draining_closes_after_the_response",  # test_drain
        [("recv", GET), ("allow",), ("connected",), ("done", True, True)],
        [AUTH_X, DIAL_X, SENT_X, [("close", "server shutting down", None)]],
        ex.CLOSING,
    ),
    (
        "client_half_close_waits_for_the_answer",
        [("recv", GET), ("allow",), ("eof",), ("connected",), ("eof",), ("done",)],
        [AUTH_X, DIAL_X, True, SENT_X, True, NOT_REUSABLE_CLOSE],
        ex.CLOSING,
    ),
    ("eof_between_requests_closes", [("eof",)], [False], ex.HEAD),
    (
        "head_split_byte_by_byte",
        [("recv", GET[i : i + 1]) for i in range(len(GET))],
        [[]] * (len(GET) - 1) + [AUTH_X],
        ex.DECIDING,
    ),
    # --- test_limits::test_head_too_large_431, test_slowloris
    (
        "head_too_large_431",
        [("recv", b"GET / HTTP/1.1\r\nX: " + b"a" * 1100 + b"\r\n\r\n")],
        [[("refuse", 431, "request head too large", None)]],
        ex.CLOSING,
    ),
    (
        "oversized_dribble_431_before_the_deadline",
        [("recv", b"GET / HTTP/1.1\r\nX: " + b"a" * 600), ("recv", b"a" * 600)],
        [[], [("refuse", 431, "request head too large", None)]],
        ex.CLOSING,
    ),
    (
        "slow_head_408_at_the_deadline",
        [("recv", b"GET / HTTP/1.1\r\nHo"), ("timeout",)],
        [[], [("refuse", 408, "request head not received in time", "head_timeout")]],
        ex.CLOSING,
    ),
    (
        "no_byte_at_all_408",
        [("timeout",)],
        [[("refuse", 408, "request head not received in time", "head_timeout")]],
        ex.CLOSING,
    ),
    (
        "idle_keep_alive_closed_without_an_answer",
        [("recv", GET), ("allow",), ("connected",), ("done",), ("timeout",)],
        [AUTH_X, DIAL_X, SENT_X, KEEP_ALIVE, [("close", "idle keep-alive", "head_timeout")]],
        ex.CLOSING,
    ),
    (
        "deadline_ignored_while_the_gateway_answers",
        [("recv", GET), ("allow",), ("connected",), ("timeout",)],
        [AUTH_X, DIAL_X, SENT_X, []],
        ex.AWAIT,
    ),
    # --- test_malformed_heads (every parser refusal is a logged, counted refusal)
    (
        "malformed_head_400",
        [("recv", b"GET /x HTTP/1.1\r\nHost a\r\n\r\n")],
        [[("refuse", 400, "malformed request head", "bad_request")]],
        ex.CLOSING,
    ),
    (
        "too_many_header_lines_431",  # issue 12 item 1: limits.headLines
        [("recv", b"GET / HTTP/1.1\r\nHost: a\r\n" + b"a: b\r\n" * 10 + b"\r\n")],
        [[("refuse", 431, "too many header lines (limit 10)", "bad_request")]],
        ex.CLOSING,
    ),
    (
        "bytes_after_a_refusal_are_dropped",
        [("recv", b"\x16\x03\x01 not http\r\n\r\n"), ("recv", GET)],
        [[("refuse", 400, "unsupported method", "bad_request")], []],
        ex.CLOSING,
    ),
    # --- request bodies (test_hotpath, test_exempt_body_stall, test_trailers)
    (
        "content_length_body_in_pieces",
        [("recv", POST5), ("allow",), ("connected",), ("recv", b"ab"), ("recv", b"cde")],
        [
            [("authorize", b"/p")],
            [("dial", b"/p")],
            [("send_head", b"/p"), ("resume",)],
            [("forward", b"ab")],
            [("forward", b"cde")],
        ],
        ex.AWAIT,
    ),
    (
        "body_with_the_head_goes_out_after_it",
        [("recv", POST5 + b"hello"), ("allow",), ("connected",)],
        [
            [("authorize", b"/p")],
            [("dial", b"/p")],
            [("send_head", b"/p"), ("resume",), ("forward", b"hello")],
        ],
        ex.AWAIT,
    ),
    (
        "pipelined_request_after_a_body_waits_for_the_response",
        [("recv", POST5), ("allow",), ("connected",), ("recv", b"hello" + GET), ("done",)],
        [
            [("authorize", b"/p")],
            [("dial", b"/p")],
            [("send_head", b"/p"), ("resume",)],
            [("forward", b"hello")],
            [("deadline", 60.0), ("authorize", b"/x")],
        ],
        ex.DECIDING,
    ),
    (
        "gateway_answers_before_the_body_ends",  # a 413 mid-body: not reusable
        [("recv", POST5), ("allow",), ("connected",), ("recv", b"ab"), ("done",)],
        [
            [("authorize", b"/p")],
            [("dial", b"/p")],
            [("send_head", b"/p"), ("resume",)],
            [("forward", b"ab")],
            NOT_REUSABLE_CLOSE,
        ],
        ex.CLOSING,
    ),
    (
        "chunked_body_to_its_end",
        [
            ("recv", CHUNKED),
            ("allow",),
            ("connected",),
            ("recv", b"3\r\nabc\r\n"),
            ("recv", b"0\r\n\r\nGET"),
        ],
        [
            [("authorize", b"/c")],
            [("dial", b"/c")],
            [("send_head", b"/c"), ("resume",)],
            [("forward", b"3\r\nabc\r\n")],
            [("forward", b"0\r\n\r\n")],
        ],
        ex.AWAIT,
    ),
    (
        "chunked_framing_error_400_lingering",  # test_smuggling: a bad chunk size
        [("recv", CHUNKED), ("allow",), ("connected",), ("recv", b"zz\r\n")],
        [
            [("authorize", b"/c")],
            [("dial", b"/c")],
            [("send_head", b"/c"), ("resume",)],
            [("answer", 400, "bad chunked body: invalid chunk size", True)],
        ],
        ex.CLOSING,
    ),
    (
        "spoofed_identity_trailer_400",  # test_trailers: never reaches the gateway
        [("recv", CHUNKED + b"0\r\nX-Clawgate-User: root\r\n\r\n"), ("allow",), ("connected",)],
        [
            [("authorize", b"/c")],
            [("dial", b"/c")],
            [
                ("send_head", b"/c"),
                ("resume",),
                (
                    "answer",
                    400,
                    "bad chunked body: trailer field not allowed"
                    " (forwarding, identity, framing or credential header)",
                    True,
                ),
            ],
        ],
        ex.CLOSING,
    ),
    # --- held bytes while deciding or answering (test_hotpath: pipelining, early frames)
    (
        "too_much_held_pauses_reading",
        [("recv", GET), ("recv", b"a" * 1024), ("recv", b"a" * 65537)],
        [AUTH_X, [], [("pause",)]],
        ex.DECIDING,
    ),
    # --- WebSocket upgrade (test_upgrade): frames before the 101 are held, then spliced
    (
        "upgrade_holds_early_frames_then_tunnels",
        [("recv", WS + b"\x81\x80"), ("allow",), ("connected",), ("upgraded", False)],
        [
            [("authorize", b"/ws")],
            [("dial", b"/ws")],
            [("send_head", b"/ws"), ("resume",)],
            b"\x81\x80",
        ],
        ex.TUNNEL,
    ),
    (
        "upgrade_through_the_first_frame_gate",  # issue 16: GATED, then TUNNEL
        [("recv", WS), ("allow",), ("connected",), ("upgraded", True), ("gate_passed",)],
        [
            [("authorize", b"/ws")],
            [("dial", b"/ws")],
            [("send_head", b"/ws"), ("resume",)],
            b"",
            None,
        ],
        ex.TUNNEL,
    ),
    # --- the gateway goes away (test_faults)
    (
        "idle_gateway_connection_closed_redial_next_time",
        [("recv", GET), ("allow",), ("connected",), ("done",), ("lost", False)],
        [AUTH_X, DIAL_X, SENT_X, KEEP_ALIVE, [("drop_upstream",)]],
        ex.HEAD,
    ),
    (
        "gateway_closed_without_a_response_502",
        [("recv", GET), ("allow",), ("connected",), ("lost", False)],
        [AUTH_X, DIAL_X, SENT_X, [("502", "gateway closed the connection without a response")]],
        ex.CLOSING,
    ),
    (
        "gateway_closed_mid_body_502",
        [("recv", POST5), ("allow",), ("connected",), ("lost", False)],
        [
            [("authorize", b"/p")],
            [("dial", b"/p")],
            [("send_head", b"/p"), ("resume",)],
            [("502", "gateway closed the connection without a response")],
        ],
        ex.CLOSING,
    ),
    (
        "gateway_closed_mid_response",
        [("recv", GET), ("allow",), ("connected",), ("lost", True)],
        [AUTH_X, DIAL_X, SENT_X, [("close", "gateway closed mid-response", None)]],
        ex.CLOSING,
    ),
    # --- clawgate's own endpoints (test_ops_admin login pages)
    ("local_get", [("recv", LOGIN)], [[("local", b"/__clawgate/login", b"")]], ex.DECIDING),
    (
        "local_post_body_in_pieces",
        [("recv", LOGIN_POST + b"a="), ("recv", b"bc")],
        [[("deadline", 10.0)], [("local", b"/__clawgate/login", b"a=bc")]],
        ex.DECIDING,
    ),
    (
        "local_post_with_its_body",
        [("recv", LOGIN_POST + b"a=bc")],
        [[("local", b"/__clawgate/login", b"a=bc")]],
        ex.DECIDING,
    ),
    (
        "local_body_too_large_413",
        [("recv", LOGIN_POST.replace(b"Length: 4", b"Length: 9000"))],
        [[("refuse", 413, "body too large", None)]],
        ex.CLOSING,
    ),
    (
        "local_chunked_411",
        [("recv", LOGIN_POST.replace(b"Content-Length: 4", b"Transfer-Encoding: chunked"))],
        [[("refuse", 411, "length required", None)]],
        ex.CLOSING,
    ),
    (
        # Bug found by this table: a login POST whose body never came was closed as an
        # "idle keep-alive" with no answer; it is a 408 like any other late head.
        "local_body_that_never_comes_408",
        [("recv", LOGIN_POST), ("timeout",)],
        [
            [("deadline", 10.0)],
            [("refuse", 408, "request head not received in time", "head_timeout")],
        ],
        ex.CLOSING,
    ),
]


@pytest.mark.parametrize(
    ("events", "expect", "state"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_exchange(events: list[tuple[object, ...]], expect: list[object], state: int) -> None:
    x, seen = _drive(events)
    assert seen == expect
    assert x.state == state


def test_exchange_counts_requests_and_is_idle_only_between_them() -> None:
    x, _ = _drive([("recv", GET), ("allow",), ("connected",)])
    assert (x.requests, x.idle, x.awaiting_upgrade) == (1, False, False)
    x.response_done(keep_alive=True, draining=False, authenticated=True, limits=LIM)
    assert x.idle
    x.received(b"G", LIM)
    assert not x.idle  # part of a next head
    fresh = ex.Exchange()
    assert not fresh.idle  # a new connection is not an idle keep-alive one


def test_exchange_awaits_the_upgrade_only_for_a_websocket_request() -> None:
    x, _ = _drive([("recv", WS), ("allow",)])
    assert x.awaiting_upgrade
    x.response_done(keep_alive=True, draining=False, authenticated=True, limits=LIM)
    assert not x.awaiting_upgrade  # the gateway answered without a 101


def test_malformed_head_forgets_the_previous_request() -> None:
    # The answer to a malformed head is not shaped by the last good request (HEAD: no body).
    x, _ = _drive([("recv", GET.replace(b"GET", b"HEAD")), ("allow",), ("connected",), ("done",)])
    assert x.head is not None and x.head.method == b"HEAD"
    x.received(b"BAD\r\n\r\n", LIM)
    assert x.head is None
