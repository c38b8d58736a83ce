"""Tests of proxy/core/http1.py: strict head parsing and the forwarding rewrite.

No spoofed forwarding or identity header survives the rewrite, in any case or spelling;
X-Forwarded-For is replaced, never appended; every other header line (Host, Origin,
User-Agent, Cookie, unknown ones) reaches the gateway byte for byte; and the proxy's own
credential is removed. Hypothesis drives random header lists through parse and rewrite.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proxy.core.http1 import (
    BODY_CHUNKED,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    HeadTooLarge,
    ResponseError,
    find_head_end,
    is_spoofable_header,
    normalise_header_name,
    parse_request_head,
    response_framing,
    rewrite_request_head,
    strip_cookie,
)
from proxy.errors import BadRequest

IDENTITY = frozenset({b"x-openclaw-user"})  # a configured identity header, normalised
PEER = "100.101.102.103"


def head(*lines: str | bytes, request_line: bytes = b"GET /chat?x=1 HTTP/1.1") -> bytes:
    raw = [request_line] + [ln.encode("latin-1") if isinstance(ln, str) else ln for ln in lines]
    return b"\r\n".join(raw) + b"\r\n\r\n"


def rewrite(raw: bytes, **kw: object) -> bytes:
    opts: dict[str, object] = {"client_ip": PEER, "proto": b"http", "identity_headers": IDENTITY}
    opts.update(kw)
    return rewrite_request_head(parse_request_head(raw), **opts)  # type: ignore[arg-type]


def out_lines(out: bytes) -> list[bytes]:
    assert out.endswith(b"\r\n\r\n")
    return out[:-4].split(b"\r\n")


def out_names(out: bytes) -> list[bytes]:
    return [ln.split(b":", 1)[0].lower() for ln in out_lines(out)[1:]]


def values(out: bytes, name: bytes) -> list[bytes]:
    return [
        ln.split(b":", 1)[1].strip()
        for ln in out_lines(out)[1:]
        if ln.split(b":", 1)[0].lower() == name
    ]


def assert_no_spoofable(out: bytes) -> None:
    ours = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
    for name in out_names(out):
        norm = normalise_header_name(name)
        if norm in ours:
            continue
        assert not is_spoofable_header(norm, IDENTITY), name
        assert not norm.startswith((b"x-forwarded", b"tailscale-")), name
        assert norm not in (b"forwarded", b"x-real-ip", b"x-openclaw-user"), name


# ----------------------------------------------------------------------------- spoofing

SPOOFS: list[tuple[str, ...]] = [
    ("X-Forwarded-For: 127.0.0.1",),
    ("x-forwarded-for: 127.0.0.1",),
    ("X-FORWARDED-FOR: 127.0.0.1",),
    ("X_Forwarded_For: 127.0.0.1",),
    ("x_forwarded-For: 127.0.0.1",),
    ("X-Forwarded-For: 127.0.0.1", "X-Forwarded-For: 10.0.0.1"),
    ("X-Forwarded-For: 127.0.0.1, 100.101.102.103",),
    ("X-Forwarded-For:127.0.0.1",),
    ("X-Forwarded-For: 127.0.0.1", "Connection: X-Forwarded-For"),
    ("Connection: keep-alive, X-Forwarded-For", "X-Forwarded-For: 127.0.0.1"),
    ("X-Forwarded-Host: evil.example",),
    ("X-Forwarded-Proto: https",),
    ("X-Forwarded-Port: 443",),
    ("X-Forwarded-Server: spoofsrv",),
    ("X-Forwarded-User: admin@example.com",),
    ("X_Forwarded_User: admin@example.com",),
    ("Forwarded: for=127.0.0.1",),
    ("forwarded: for=127.0.0.1;proto=https",),
    ('FORWARDED: for="[::1]"',),
    ("X-Real-IP: 127.0.0.1",),
    ("x_real_ip: 127.0.0.1",),
    ("X-Client-IP: 127.0.0.1",),
    ("True-Client-IP: 127.0.0.1",),
    ("CF-Connecting-IP: 127.0.0.1",),
    ("Tailscale-User-Login: admin@example.com",),
    ("tailscale-user-login: admin@example.com",),
    ("Tailscale_User_Login: admin@example.com",),
    ("TAILSCALE-USER-NAME: Admin",),
    ("Tailscale-User-Profile-Pic: https://spoof.pic",),
    ("Tailscale-Headers-Info: spoofinfo",),
    ("X-Openclaw-User: admin",),  # the configured identity header
    ("x-openclaw-user: admin",),
    ("X_OPENCLAW_USER: admin",),
    ("X-Openclaw-User: admin", "X-Openclaw-User: root"),
    ("Connection: X-Openclaw-User", "X-Openclaw-User: admin"),
]


@pytest.mark.parametrize("spoof", SPOOFS, ids=[" | ".join(s)[:60] for s in SPOOFS])
@pytest.mark.parametrize("websocket", [False, True])
def test_spoofed_headers_never_survive(spoof: tuple[str, ...], websocket: bool) -> None:
    extra: tuple[str, ...] = ()
    if websocket:
        extra = (
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        )
    out = rewrite(head("Host: gw.example:18789", *spoof, *extra))
    assert_no_spoofable(out)
    assert values(out, b"x-forwarded-for") == [PEER.encode()]
    assert values(out, b"x-forwarded-proto") == [b"http"]
    assert values(out, b"x-forwarded-host") == [b"gw.example:18789"]
    for line in spoof:
        value = line.split(":", 1)[1].strip().encode()
        if b"X-Forwarded-For" in value or b"X-Openclaw-User" in value:
            continue  # a Connection header naming one: the name itself is not spoofing
        assert value not in out.split(b"\r\n", 1)[1], line


def test_forwarding_headers_we_set_may_be_listed_in_connection() -> None:
    # 'Connection: X-Forwarded-For' must not make clawgate drop its own XFF.
    out = rewrite(head("Host: h", "Connection: X-Forwarded-For, X-Forwarded-Proto, Host"))
    assert values(out, b"x-forwarded-for") == [PEER.encode()]
    assert values(out, b"x-forwarded-proto") == [b"http"]
    assert values(out, b"host") == [b"h"]


def test_xff_is_replaced_not_appended() -> None:
    out = rewrite(head("Host: h", "X-Forwarded-For: 10.0.0.1, 10.0.0.2"))
    assert values(out, b"x-forwarded-for") == [PEER.encode()]
    assert b"10.0.0.1" not in out


@pytest.mark.parametrize("ip", ["fd7a:115c:a1e0::6667", "127.0.0.1", "100.64.0.1"])
def test_xff_is_the_peer(ip: str) -> None:
    out = rewrite(head("Host: h"), client_ip=ip, proto=b"https")
    assert values(out, b"x-forwarded-for") == [ip.encode()]
    assert values(out, b"x-forwarded-proto") == [b"https"]


def test_no_host_no_forwarded_host() -> None:
    out = rewrite(head(request_line=b"GET / HTTP/1.0"))
    assert values(out, b"x-forwarded-host") == []
    assert values(out, b"x-forwarded-for") == [PEER.encode()]


# ----------------------------------------------------------------------------- byte for byte

PRESERVED = [
    b"Host: Gateway.Example:18789",
    b"Origin: https://gateway.example:18789",
    b"User-Agent:  Mozilla/5.0 (X11; Linux x86_64)  ",
    b"Cookie: theme=dark; openclaw_sid=abc",
    b"cookie:a=1;b=2",
    b"X-Custom-Thing: \xe2\x9c\x93 utf-8 value",
    b"Accept: text/html,*/*;q=0.8",
    b"Sec-WebSocket-Protocol: openclaw.v1",
    b"authorization: Bearer gateway-owned",
    b"X-Empty:",
    b"Content-Type: application/json",
    b"x_custom_underscore: kept",
]


def test_other_headers_pass_byte_for_byte() -> None:
    raw = head(*PRESERVED)
    out = rewrite(raw)
    lines = out_lines(out)
    assert lines[0] == b"GET /chat?x=1 HTTP/1.1"
    # Same lines, same order, same bytes, after clawgate's own (which come first: a
    # gateway keeping only the first N lines must not lose them).
    assert lines[-len(PRESERVED) :] == PRESERVED
    assert lines[1].startswith(b"X-Forwarded-For: ")


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    out = rewrite(
        head(
            "Host: h",
            "Connection: keep-alive, X-Debug, Cookie",
            "Keep-Alive: 5",
            "Proxy-Connection: keep-alive",
            "TE: trailers",
            "Trailer: X",
            "Proxy-Authorization: Basic eDp5",
            "X-Debug: 1",
            "Cookie: a=1",
            "Upgrade: websocket",
            "X-Stays: 1",
        )
    )
    names = out_names(out)
    for gone in [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"proxy-authorization",
        b"x-debug",
        b"cookie",
        b"upgrade",
    ]:
        assert gone not in names, gone
    assert b"x-stays" in names


@pytest.mark.parametrize(
    "protected", ["Host", "Content-Length", "Origin", "Sec-WebSocket-Key", "Transfer-Encoding"]
)
def test_connection_cannot_remove_end_to_end_headers(protected: str) -> None:
    lines = ["Host: h", "Origin: https://h", "Sec-WebSocket-Key: k"]
    request_line = b"GET / HTTP/1.1"
    if protected == "Content-Length":
        lines.append("Content-Length: 3")
        request_line = b"POST / HTTP/1.1"
    if protected == "Transfer-Encoding":
        lines.append("Transfer-Encoding: chunked")
        request_line = b"POST / HTTP/1.1"
    out = rewrite(head(*lines, f"Connection: {protected}", request_line=request_line))
    assert protected.lower().encode() in out_names(out)


def test_websocket_upgrade_is_forwarded_with_a_clean_connection_header() -> None:
    out = rewrite(
        head(
            "Host: h",
            "Connection: keep-alive, Upgrade",
            "Upgrade: websocket",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        )
    )
    assert values(out, b"upgrade") == [b"websocket"]
    assert values(out, b"connection") == [b"Upgrade"]
    assert b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==" in out_lines(out)


def test_connection_close_is_kept_as_close() -> None:
    out = rewrite(head("Host: h", "Connection: close"))
    assert values(out, b"connection") == [b"close"]


# ----------------------------------------------------------------------------- credentials


def test_proxy_authorization_is_removed_when_asked() -> None:
    raw = head("Host: h", "Authorization: Bearer clawgate-token", "X-A: 1")
    assert b"clawgate-token" in rewrite(raw)
    out = rewrite(raw, drop_authorization=True)
    assert b"authorization" not in out_names(out)
    assert b"clawgate-token" not in out


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        (b"clawgate_session=SID", None),
        (b"clawgate_session=SID; theme=dark", b"Cookie: theme=dark"),
        (b"theme=dark; clawgate_session=SID", b"Cookie: theme=dark"),
        (b"a=1; clawgate_session=SID; b=2", b"Cookie: a=1; b=2"),
        (b"a=1;clawgate_session=SID;b=2", b"Cookie: a=1;b=2"),
        (b"xclawgate_session=keep; a=1", b"Cookie: xclawgate_session=keep; a=1"),
        (b"theme=dark", b"Cookie: theme=dark"),
    ],
)
def test_session_cookie_removed_others_kept(cookie: bytes, expected: bytes | None) -> None:
    out = rewrite(head("Host: h", b"Cookie: " + cookie), session_cookie=b"clawgate_session")
    cookies = [ln for ln in out_lines(out) if ln.lower().startswith(b"cookie:")]
    assert cookies == ([] if expected is None else [expected])
    assert b"SID" not in out


def test_strip_cookie() -> None:
    assert strip_cookie(b"a=1; s=2; b=3", b"s") == b"a=1; b=3"
    assert strip_cookie(b"s=2", b"s") == b""
    assert strip_cookie(b" s = 2 ;a=1", b"s") == b"a=1"


def test_injected_values_must_not_carry_control_characters() -> None:
    for bad in [b"a\r\nX-Forwarded-For: 1.1.1.1", b"a\nb", b"a\x00"]:
        with pytest.raises(ValueError):
            rewrite(head("Host: h"), add=[(b"X-Openclaw-User", bad)])
    out = rewrite(
        head("Host: h", "X-Openclaw-User: spoof"), add=[(b"X-Openclaw-User", b"alice@example.com")]
    )
    assert values(out, b"x-openclaw-user") == [b"alice@example.com"]


# ----------------------------------------------------------------------------- parsing


def test_parse_fields() -> None:
    h = parse_request_head(
        head("Host: h", "Content-Length: 12", request_line=b"POST /api/x?y=1 HTTP/1.1")
    )
    assert (h.method, h.target, h.path, h.version) == (b"POST", b"/api/x?y=1", b"/api/x", (1, 1))
    assert h.content_length == 12 and not h.chunked and h.has_body()
    assert h.keep_alive and not h.websocket
    assert h.header(b"host") == b"h" and h.header(b"nope") is None


@pytest.mark.parametrize(
    ("lines", "request_line", "keep_alive"),
    [
        ((), b"GET / HTTP/1.0", False),
        (("Connection: keep-alive",), b"GET / HTTP/1.0", True),
        (("Host: h",), b"GET / HTTP/1.1", True),
        (("Host: h", "Connection: close"), b"GET / HTTP/1.1", False),
        (("Host: h", "Connection: Keep-Alive, CLOSE"), b"GET / HTTP/1.1", False),
    ],
)
def test_keep_alive(lines: tuple[str, ...], request_line: bytes, keep_alive: bool) -> None:
    assert parse_request_head(head(*lines, request_line=request_line)).keep_alive is keep_alive


def test_websocket_detection() -> None:
    ws = ("Host: h", "Upgrade: WebSocket", "Connection: keep-alive, Upgrade")
    assert parse_request_head(head(*ws)).websocket
    assert not parse_request_head(head("Host: h", "Upgrade: websocket")).websocket


POST = b"POST / HTTP/1.1"
WS = ("Host: h", "Upgrade: websocket", "Connection: Upgrade")
# llhttp's own strict checks (duplicate or conflicting framing headers, invalid lengths and
# codings): pinned here so a parser that turned lenient would fail these rows.
LLHTTP = "malformed request head"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (
            head("Host: h", "Content-Length: 1", "Transfer-Encoding: chunked", request_line=POST),
            LLHTTP,
        ),
        (
            head("Host: h", "Transfer-Encoding: chunked", "Content-Length: 1", request_line=POST),
            LLHTTP,
        ),
        (head("Host: h", "Content-Length: 1", "Content-Length: 1", request_line=POST), LLHTTP),
        (head("Host: h", "Content-Length: 1", "content-length: 2", request_line=POST), LLHTTP),
        (head("Host: h", "Content-Length: 0", "Content-Length: 0"), LLHTTP),
        (head(*WS, "Content-Length: 0", "Content-Length: 0"), LLHTTP),
        (head(*WS, "Content-Length: 0", "Transfer-Encoding: chunked"), LLHTTP),
        (
            head(
                "Host: h",
                "Transfer-Encoding: chunked",
                "Transfer-Encoding: chunked",
                request_line=POST,
            ),
            LLHTTP,
        ),
        (
            head(
                "Host: h",
                "Transfer-Encoding: chunked",
                "Transfer-Encoding: gzip",
                request_line=POST,
            ),
            LLHTTP,
        ),
        (head("Host: h", "Transfer-Encoding: xchunked", request_line=POST), LLHTTP),
        (head("Host: h", "Transfer-Encoding: identity", request_line=POST), LLHTTP),
        (head("Host: h", "Content-Length: abc", request_line=POST), LLHTTP),
        (head("Host: h", "Content-Length: +1", request_line=POST), LLHTTP),
        (head("Host: h", "Content-Length: 1, 1", request_line=POST), LLHTTP),
        (head("Host: h", "Content-Length:", request_line=POST), LLHTTP),
        (head("Host: h", "X a"), LLHTTP),  # no colon
        (head("Host: h", ": v"), LLHTTP),  # no name
        (head("Host: h", "X : v"), LLHTTP),  # space before the colon
        # A head cut before its blank line is never taken as complete.
        (b"GET / HTTP/1.1\r\nHost: hxxxx", LLHTTP),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: 1\r\n", LLHTTP),
        # Our own checks, on the raw lines and on what llhttp let through.
        (
            head("Host: h", "Content-Length: 1234567890123456", request_line=POST),
            "invalid Content-Length",
        ),
        (
            head("Host: h", "Transfer-Encoding: gzip, chunked", request_line=POST),
            "unsupported Transfer-Encoding",
        ),
        (
            head(
                "Host: h",
                "Transfer-Encoding: gzip",
                "Transfer-Encoding: chunked",
                request_line=POST,
            ),
            "unsupported Transfer-Encoding",
        ),
        (
            head("Host: h", "Content_Length: 5", request_line=POST),
            "framing header spelled with '_'",
        ),
        (
            head("Host: h", "transfer_encoding: chunked", request_line=POST),
            "framing header spelled with '_'",
        ),
        (
            head("Transfer-Encoding: chunked", request_line=b"POST / HTTP/1.0"),
            "chunked body in HTTP/1.0",
        ),
        (
            head(
                "Host: h",
                "Upgrade: h2c",
                "Connection: Upgrade, HTTP2-Settings",
                "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
            ),
            "HTTP/2 upgrade (h2c) is not supported",
        ),
        (
            head("Host: h", "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA"),
            "HTTP/2 upgrade (h2c) is not supported",
        ),
        (
            head("Host: h", "Upgrade: websocket, h2c", "Connection: Upgrade"),
            "only the websocket upgrade is supported",
        ),
        (
            head("Host: h", "Upgrade: h2c", "Connection: Upgrade"),
            "only the websocket upgrade is supported",
        ),
        (head(*WS, "Upgrade: websocket"), "more than one Upgrade"),
        (head(*WS, request_line=POST), "websocket upgrade must be GET"),
        (head(*WS, "Content-Length: 3"), "websocket upgrade with a body"),
        (head(*WS, "Transfer-Encoding: chunked"), "websocket upgrade with a body"),
        (head("Host: h", "X: a\nY: b"), "bare CR or LF in request head"),
        (head("Host: h", "X: a\rY: b"), "bare CR or LF in request head"),
        (head("Host: h", "X: a", " folded"), "obsolete line folding in header"),
        (head("Host: h", "X: a", "\tfolded"), "obsolete line folding in header"),
        (head("Host: h", "X: a\x00"), "NUL byte in request head"),
        # A blank line inside what is handed over as one head: a second request behind it.
        (b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET /x HTTP/1.1\r\n\r\n", "empty header line"),
        # One CRLF too many after the blank line: an empty header line llhttp never reports.
        (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n\r\n", "malformed header line"),
        (
            head("Host: h", request_line=b"GET http://evil/ HTTP/1.1"),
            "request target must be origin-form (/path)",
        ),
        (
            head("Host: h", request_line=b"OPTIONS * HTTP/1.1"),
            "request target must be origin-form (/path)",
        ),
        (
            head("Host: h", request_line=b"GET /a\tb HTTP/1.1"),
            "control character in request target",
        ),
        (
            head("Host: h", request_line=b"GET /a\x01b HTTP/1.1"),
            "control character in request target",
        ),
        (
            head("Host: h", request_line=b"GET /a\x7fb HTTP/1.1"),
            "control character in request target",
        ),
        (head("Host: h", request_line=b"CONNECT h:443 HTTP/1.1"), "CONNECT is not supported"),
        (head("Host: h", request_line=b"TRACE / HTTP/1.1"), "unsupported method"),
        (head("Host: h", request_line=b"get / HTTP/1.1"), "unsupported method"),
        (head("Host: h", request_line=b"GET / HTTP/2.0"), "unsupported HTTP version"),
        (head(request_line=b"GET /"), "malformed request line"),
        (head("Host: h", request_line=b"GET  / HTTP/1.1"), "malformed request line"),
        (head("X: a"), "missing Host"),  # HTTP/1.1 without Host
        (head("Host: a", "Host: b"), "more than one Host"),
        (
            head("Host: a", "Authorization: Bearer x", "authorization: Bearer y"),
            "more than one Authorization",
        ),
        (
            head("Host: a", "Authorization: Bearer x", "AUTHORIZATION: Bearer x"),
            "more than one Authorization",
        ),
    ],
)
def test_smuggling_shapes_are_bad_requests(raw: bytes, reason: str) -> None:
    with pytest.raises(BadRequest) as ei:
        parse_request_head(raw)
    assert (ei.value.status, ei.value.reason) == (400, reason)


@pytest.mark.parametrize(
    ("lines", "request_line", "content_length", "chunked", "websocket"),
    [
        (("Host: h", "Content-Length: 123456789012345"), POST, 123456789012345, False, False),
        (("Host: h", "Content-Length:  7 "), POST, 7, False, False),
        (("Host: h", "Transfer-Encoding: Chunked"), POST, None, True, False),
        ((*WS, "Content-Length: 0"), b"GET / HTTP/1.1", 0, False, True),
        (("Content-Length: 2",), b"POST / HTTP/1.0", 2, False, False),
    ],
)
def test_framing_fields(
    lines: tuple[str, ...],
    request_line: bytes,
    content_length: int | None,
    chunked: bool,
    websocket: bool,
) -> None:
    h = parse_request_head(head(*lines, request_line=request_line))
    assert (h.content_length, h.chunked, h.websocket) == (content_length, chunked, websocket)


def test_head_too_large_is_431() -> None:
    assert HeadTooLarge("x").status == 431


@pytest.mark.parametrize(
    ("extra", "limit", "ok"),
    [
        (98, 100, True),
        (99, 100, True),
        (100, 100, False),
        (1030, 100, False),
        (1030, 5000, True),
        (7, 8, True),
        (8, 8, False),
    ],
)
def test_more_header_lines_than_the_limit_is_431(extra: int, limit: int, ok: bool) -> None:
    # Host plus ``extra`` lines of ``a:``: the flood that once pushed clawgate's own
    # headers past the 1,000 lines a Node gateway keeps.
    raw = head("Host: h", *["a:"] * extra)
    if ok:
        assert len(parse_request_head(raw, limit).lines) == extra + 1
        return
    with pytest.raises(HeadTooLarge) as ei:
        parse_request_head(raw, limit)
    assert ei.value.status == 431 and "too many header lines" in ei.value.reason


def test_clawgate_headers_come_right_after_the_request_line() -> None:
    out = rewrite(
        head("Host: h", *["a:"] * 50, "Cookie: x=1"),
        add=[(b"X-Forwarded-User", b"alice@example.com")],
    )
    lines = out_lines(out)
    assert lines[1:5] == [
        b"X-Forwarded-For: " + PEER.encode(),
        b"X-Forwarded-Proto: http",
        b"X-Forwarded-Host: h",
        b"X-Forwarded-User: alice@example.com",
    ]
    assert lines[5] == b"Host: h"


@pytest.mark.parametrize(
    ("buf", "start", "end"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 0, 18),
        (b"GET / HTTP/1.1\r\n\r\nrest", 0, 18),
        (b"GET / HTTP/1.1\r\n\r\n", 17, 18),
        (b"GET / HTTP/1.1\r\n", 0, -1),
        (b"\r\n\r\n", 0, 4),
    ],
)
def test_find_head_end(buf: bytes, start: int, end: int) -> None:
    assert find_head_end(buf, start) == end


# ----------------------------------------------------------------------------- fuzz

_SPOOF_NAMES = [
    b"X-Forwarded-For",
    b"x_forwarded_for",
    b"X-FORWARDED-HOST",
    b"X-Forwarded-Proto",
    b"Forwarded",
    b"X-Real-IP",
    b"x_real_ip",
    b"Tailscale-User-Login",
    b"tailscale_user_name",
    b"X-Openclaw-User",
    b"x_openclaw_user",
    b"X-Forwarded-User",
    b"True-Client-IP",
]
_OTHER_NAMES = [
    b"Host",
    b"Origin",
    b"User-Agent",
    b"Cookie",
    b"Accept",
    b"X-Custom",
    b"Authorization",
    b"Content-Type",
    b"Sec-WebSocket-Key",
    b"Connection",
    b"Keep-Alive",
    b"TE",
    b"Upgrade",
]
_token_chars = st.sampled_from(
    list(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~")
)
_names = st.one_of(
    st.sampled_from(_SPOOF_NAMES + _OTHER_NAMES),
    st.lists(_token_chars, min_size=1, max_size=20).map(bytes),
    st.sampled_from(_SPOOF_NAMES).map(lambda n: n.swapcase()),
)
_values = st.one_of(
    st.binary(max_size=30).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F)),
    st.sampled_from(
        [
            b"127.0.0.1",
            b"X-Forwarded-For",
            b"close",
            b"Upgrade, X-Real-IP",
            b"websocket",
            b"a=1; clawgate_session=S",
            b"Bearer t",
            b"\t x \t",
        ]
    ),
    st.binary(max_size=10),  # control characters too: parse must refuse those
)


@settings(max_examples=600, deadline=None)
@given(
    st.lists(st.tuples(_names, _values), max_size=12),
    st.sampled_from([b"GET /x HTTP/1.1", b"POST /y HTTP/1.1", b"GET / HTTP/1.0"]),
    st.booleans(),
    st.booleans(),
)
def test_random_heads_rewrite_safely(
    pairs: list[tuple[bytes, bytes]], request_line: bytes, drop_auth: bool, strip_session: bool
) -> None:
    raw = head(*[n + b": " + v for n, v in pairs], request_line=request_line)
    try:
        parsed = parse_request_head(raw)
    except BadRequest:
        return
    out = rewrite_request_head(
        parsed,
        client_ip=PEER,
        proto=b"http",
        identity_headers=IDENTITY,
        drop_authorization=drop_auth,
        session_cookie=b"clawgate_session" if strip_session else None,
    )
    lines = out_lines(out)
    for ln in lines:
        assert b"\r" not in ln and b"\n" not in ln and ln
    assert_no_spoofable(out)
    assert values(out, b"x-forwarded-for") == [PEER.encode()]
    assert len(values(out, b"x-forwarded-proto")) == 1
    assert len(values(out, b"x-forwarded-host")) <= 1
    if drop_auth:
        assert b"authorization" not in out_names(out)
    if strip_session:
        assert not any(
            b"clawgate_session=" in ln for ln in lines if ln.lower().startswith(b"cookie:")
        )
    # Every surviving client line is one of the original lines, unchanged, in order.
    originals = parsed.lines
    ours = len(lines) - 1
    # (Connection is hop-by-hop: the client's is always dropped and clawgate writes its
    # own, which may equal a client line byte for byte, so it is not "kept".)
    kept = [ln for ln in lines[1:] if ln in originals and not ln.lower().startswith(b"connection:")]
    assert kept == [ln for ln in originals if ln in kept]
    assert ours >= 2
    # And parsing the rewrite again succeeds: the gateway gets a well-formed head.
    assume(b"host" in out_names(out) or request_line.endswith(b"1.0"))
    reparsed = parse_request_head(out)
    assert reparsed.method == parsed.method and reparsed.target == parsed.target


def test_http10_keep_alive_is_passed_on() -> None:
    raw = b"GET /x HTTP/1.0\r\nHost: gw\r\nConnection: keep-alive\r\n\r\n"
    out = rewrite_request_head(
        parse_request_head(raw), client_ip=PEER, proto=b"http", identity_headers=IDENTITY
    )
    assert b"\r\nConnection: keep-alive\r\n" in out
    raw10 = b"GET /x HTTP/1.0\r\nHost: gw\r\n\r\n"
    out10 = rewrite_request_head(
        parse_request_head(raw10), client_ip=PEER, proto=b"http", identity_headers=IDENTITY
    )
    assert b"\r\nConnection: close\r\n" in out10


# ---- response framing (core.http1.response_framing) ---------------------------------------


@pytest.mark.parametrize(
    ("head", "head_request", "expect"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", False, (200, True, 5)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False, (200, True, 0)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", True, (200, True, BODY_NONE)),
        (b"HTTP/1.1 204 No Content\r\n\r\n", False, (204, True, BODY_NONE)),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", False, (304, True, BODY_NONE)),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            False,
            (200, True, BODY_CHUNKED),
        ),
        (b"HTTP/1.1 200 OK\r\n\r\n", False, (200, False, BODY_UNTIL_CLOSE)),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", False, (200, False, 1)),
        (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            False,
            (200, True, 1),
        ),
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            False,
            (200, False, 1),
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            False,
            (101, True, BODY_NONE),
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\n", False, (100, True, BODY_NONE)),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            False,
            (200, True, 5),
        ),
    ],
)
def test_response_framing_table(
    head: bytes, head_request: bool, expect: tuple[int, bool, int]
) -> None:
    assert response_framing(head, head_request) == expect


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"HTTP/2 200 OK\r\n\r\n", "status line"),
        (b"ICY 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 2xx OK\r\n\r\n", "status line"),
        (b"HTTP/1.1\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "Content-Length"),
    ],
)
def test_response_framing_refuses(head: bytes, reason: str) -> None:
    with pytest.raises(ResponseError, match=reason):
        response_framing(head, False)
