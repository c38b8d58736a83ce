"""proxy/core/_head.c held to the Python code (the oracle), differentially (issue 15 lever 4).

``_head.parse`` may answer only where ``parse_request_head_py`` returns the very same fields
(values and types), and must answer None for every head Python refuses (400 or 431);
``_head.rewrite`` answers exactly what ``rewrite_request_head_py`` returns, or None. Checked
on hypothesis heads (realistic ones with the framing, Host, Upgrade, Connection,
Authorization, Cookie, forwarding and identity headers, and mutated ones: bytes inserted,
deleted or replaced anywhere), on every byte 0x00..0xff placed in each part of a valid head,
on every head of tests/unit/test_http1.py, and through the public functions (the C path is
taken for common heads; a refused head keeps its reason). Reference counts, GC objects and
traced memory do not grow over 100,000 calls.

The C module is built in the compiled build only: in the pure build these tests skip, for
that reason alone (CI runs both builds); tests/fuzz/fuzz_head.py fuzzes the same properties
and tests/unit/test_fuzz_head.py runs it under AddressSanitizer. The glue in http1 is
checked with a stand-in module where http1 is Python (the pure build, where coverage is
measured).
"""

from __future__ import annotations

import gc
import importlib.machinery
import os
import sys
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proxy.core import http1
from proxy.core.http1 import (
    RequestHead,
    parse_request_head,
    parse_request_head_py,
    rewrite_request_head,
    rewrite_request_head_py,
)
from proxy.errors import BadRequest, HeadTooLarge
from tests.unit import test_http1 as th


def _load_head() -> ModuleType | None:
    try:
        from proxy.core import _head
    except ImportError:
        return None
    return _head


HEAD_MODULE = _load_head()
CORE = Path(__file__).resolve().parents[2] / "proxy" / "core"
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
COMPILED_BUILD = os.environ.get("CLAWGATE_BUILD") == "compiled" or any(CORE.glob("*.so"))
ABSENT = (
    "proxy.core._head is absent: proxy/core/_head.c is built only in the compiled build "
    "(scripts/setup --compiled; CI runs that build too)"
)
needs_head = pytest.mark.skipif(HEAD_MODULE is None, reason=ABSENT)


def H() -> Any:
    """The C module (the tests marked needs_head run only where it is)."""
    assert HEAD_MODULE is not None
    return HEAD_MODULE


def test_the_c_module_is_there_in_the_compiled_build() -> None:
    if not COMPILED_BUILD:
        pytest.skip(ABSENT)
    assert HEAD_MODULE is not None, "compiled build without proxy.core._head"
    assert http1.FAST_HEAD is True


# ----------------------------------------------------------------------------- the oracle

FIELDS = (
    "method",
    "target",
    "version",
    "request_line",
    "lines",
    "names",
    "values",
    "content_length",
    "chunked",
    "websocket",
    "keep_alive",
    "host",
)


def _shape(v: object) -> object:
    """The types of a field, down into lists and tuples (bool is not int, bytes is bytes)."""
    if isinstance(v, list | tuple):
        return (type(v), tuple(_shape(x) for x in v))
    return type(v)


def check_parse(raw: bytes, max_lines: int = http1.DEFAULT_HEAD_LINES) -> bool:
    """_head.parse agrees with parse_request_head_py; True when C answered."""
    got = H().parse(raw, max_lines)
    try:
        want = parse_request_head_py(raw, max_lines)
    except BadRequest as e:
        assert got is None, f"C accepted a head Python refuses ({e.reason}): {raw!r}"
        return False
    if got is None:
        return False
    expected = tuple(getattr(want, f) for f in FIELDS)
    assert type(got) is tuple and len(got) == len(FIELDS), got
    for name, g, w in zip(FIELDS, got, expected, strict=True):
        assert g == w, f"{name}: C {g!r} != Python {w!r} for {raw!r}"
    assert _shape(got) == _shape(expected), raw
    return True


@dataclass(frozen=True)
class Rw:
    """The arguments of a rewrite besides the head."""

    client_ip: str = "100.101.102.103"
    proto: bytes = b"http"
    identity_headers: frozenset[bytes] = frozenset({b"x-openclaw-user"})
    add: Sequence[tuple[bytes, bytes]] = ()
    drop_authorization: bool = False
    session_cookie: bytes | None = None


def c_rewrite(h: RequestHead, a: Rw) -> bytes | None:
    out: bytes | None = H().rewrite(
        h.request_line,
        h.lines,
        h.names,
        h.values,
        h.host,
        h.websocket,
        h.keep_alive,
        h.version == (1, 0),
        a.client_ip,
        a.proto,
        a.identity_headers,
        a.add,
        a.drop_authorization,
        a.session_cookie,
    )
    return out


def check_rewrite(h: RequestHead, a: Rw) -> bool:
    """_head.rewrite agrees with rewrite_request_head_py; True when C answered."""
    got = c_rewrite(h, a)
    try:
        want = rewrite_request_head_py(
            h,
            client_ip=a.client_ip,
            proto=a.proto,
            identity_headers=a.identity_headers,
            add=a.add,
            drop_authorization=a.drop_authorization,
            session_cookie=a.session_cookie,
        )
    except ValueError:  # an injected value with CR/LF/NUL; a client_ip that is not ASCII
        assert got is None, (h, a)
        return False
    if got is None:
        return False
    assert type(got) is bytes
    assert got == want, (h, a)
    return True


def fast_head(raw: bytes, max_lines: int = http1.DEFAULT_HEAD_LINES) -> RequestHead | None:
    t = H().parse(raw, max_lines)
    if t is None:
        return None
    head = RequestHead(raw, *t)
    head.fast = True
    return head


# ----------------------------------------------------------------------------- strategies

METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]
ODD_METHODS = [b"CONNECT", b"TRACE", b"get", b"GETX", b"", b"PRI", b"G"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0"]
ODD_VERSIONS = [b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/1", b"HTTP/1.10", b""]
TARGETS = [
    b"/",
    b"/ws",
    b"/chat?x=1",
    b"/a/b#frag",
    b"/%7E/x?q=a+b&c=d",
    b"//x",
    b"/?",
    b"/a?b?c#d#e",
    b'/{}|\\^`[]"<>',
]
ODD_TARGETS = [b"*", b"http://h/", b"", b"x", b"/a b", b"/\xc3\xa9"]
SPECIAL_NAMES = [
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Upgrade",
    b"Connection",
    b"Authorization",
    b"Cookie",
    b"X-Forwarded-For",
    b"X-Forwarded-Host",
    b"X-Forwarded-Proto",
    b"X-Forwarded-User",
    b"X-Real-IP",
    b"Forwarded",
    b"True-Client-IP",
    b"Tailscale-User-Login",
    b"X-Openclaw-User",
    b"Proxy-Connection",
    b"Keep-Alive",
    b"TE",
    b"Trailer",
    b"Proxy-Authorization",
    b"HTTP2-Settings",
    b"Sec-WebSocket-Key",
    b"Sec-WebSocket-Version",
    b"Origin",
    b"User-Agent",
    b"Accept",
    b"X-Debug",
    b"Content_Length",
    b"transfer_encoding",
    b"http2_settings",
    b"X_Forwarded_For",
    b"x-openclaw_user",
    b"proxy_connection",
]
VALUES: dict[bytes, list[bytes]] = {
    b"host": [b"h", b"gw.example:18789", b"100.64.0.1:18789", b"[::1]:80", b"a b"],
    b"content-length": [
        b"0",
        b"1",
        b"12",
        b"007",
        b"00",
        b"123456789012345",
        b"1234567890123456",
        b"1, 1",
        b"+1",
        b"-1",
        b"1 ",
        b"0x1",
    ],
    b"transfer-encoding": [
        b"chunked",
        b"Chunked",
        b"CHUNKED",
        b"gzip, chunked",
        b"identity",
        b"chunked, gzip",
        b"xchunked",
        b"chunked ",
    ],
    b"upgrade": [b"websocket", b"WebSocket", b"h2c", b"websocket, h2c", b"websockets"],
    b"connection": [
        b"keep-alive",
        b"close",
        b"Upgrade",
        b"keep-alive, Upgrade",
        b"Keep-Alive, CLOSE",
        b"upgrade,close",
        b"X-Forwarded-For",
        b"x_debug, Cookie",
        b"Host, Authorization, X-Openclaw-User",
        b", ,",
        b"upgrade , keep-alive",
        b"HTTP2-Settings",
        b"te, trailer",
        b"Sec_WebSocket_Key",
    ],
    b"authorization": [b"Bearer t", b"Bearer " + b"x" * 43, b"Basic eDp5"],
    b"cookie": [
        b"theme=dark; lang=en",
        b"a=1; clawgate_session=S",
        b"clawgate_session=S",
        b"xclawgate_session=keep",
    ],
}
GENERIC_VALUES = [
    b"1",
    b"127.0.0.1",
    b"admin",
    b"a, b",
    b"Mozilla/5.0 (X11; Linux x86_64)",
    b"*/*",
    b"",
    b" v",
    b"v ",
    b"a\tb",
    b"\xe2\x9c\x93",
    b"a\x7fb",
    b"dGhlIHNhbXBsZSBub25jZQ==",
]
TCHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"
MUTATIONS = [
    b"\r",
    b"\n",
    b"\x00",
    b" ",
    b"\t",
    b"_",
    b"\x7f",
    b"\x80",
    b"\xff",
    b":",
    b",",
    b"\r\n",
    b"\r\n\r\n",
    b"\r\n ",
    b"A",
    b"-",
]

_tchar_names = st.lists(st.sampled_from(list(TCHARS)), min_size=1, max_size=16).map(bytes)
_names = st.one_of(
    st.sampled_from(SPECIAL_NAMES),
    st.sampled_from(SPECIAL_NAMES).map(bytes.swapcase),
    st.sampled_from(SPECIAL_NAMES).map(bytes.lower),
    _tchar_names,
)
_random_values = st.one_of(
    st.lists(st.integers(0x20, 0x7E), max_size=24).map(bytes),
    st.binary(max_size=12),
)


CLEAN_NAMES = [n for n in SPECIAL_NAMES if b"_" not in n and n.lower() != b"http2-settings"]
CLEAN_VALUES: dict[bytes, list[bytes]] = {
    b"content-length": [b"0", b"1", b"12", b"123456789012345"],
    b"transfer-encoding": [b"chunked", b"Chunked"],
    b"upgrade": [b"websocket", b"WebSocket"],
}
_clean_values = st.lists(st.integers(0x20, 0x7E), min_size=1, max_size=24).map(
    lambda b: bytes(b).strip() or b"v"
)


@st.composite
def header_lines(draw: st.DrawFn) -> bytes:
    """One header line: usually well-formed (a name and a value C may accept), one in
    eight anything (odd names, values, separators)."""
    if draw(st.integers(0, 7)) != 7:  # (hypothesis favours 0: the common case is not 0)
        name = draw(st.one_of(st.sampled_from(CLEAN_NAMES), _tchar_names))
        key = name.lower()
        if key in CLEAN_VALUES:
            value = draw(st.sampled_from(CLEAN_VALUES[key]))
        else:
            pool = VALUES.get(key) or [b"1", b"a b", b"*/*"]
            value = draw(st.one_of(st.sampled_from(pool), _clean_values))
        return name + draw(st.sampled_from([b": ", b": ", b":"])) + value
    name = draw(_names)
    pool = VALUES.get(name.lower().replace(b"_", b"-"), []) + GENERIC_VALUES
    value = draw(st.one_of(st.sampled_from(pool), _random_values))
    sep = draw(st.sampled_from([b": ", b":", b":  ", b": \t", b" : ", b"::"]))
    return name + sep + value


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """A head: usually a well-formed one (GET/POST..., HTTP/1.x, a Host line)."""
    odd = draw(st.integers(0, 5)) == 5  # (hypothesis favours 0: the common case is 0)
    method = draw(st.sampled_from(METHODS + ODD_METHODS if odd else METHODS))
    targets = [
        st.sampled_from(TARGETS),
        st.lists(st.integers(0x21, 0x7E), max_size=24).map(lambda b: b"/" + bytes(b)),
    ]
    target = draw(st.one_of(*targets, st.sampled_from(ODD_TARGETS)) if odd else st.one_of(*targets))
    version = draw(
        st.sampled_from(VERSIONS + ODD_VERSIONS if odd else VERSIONS * 2 + [b"HTTP/1.1"])
    )
    lines = draw(st.lists(header_lines(), max_size=draw(st.sampled_from([3, 8, 16]))))
    if draw(st.integers(0, 9)) != 9:  # usually a Host line, first or later
        host = b"Host: " + draw(st.sampled_from(VALUES[b"host"]))
        lines.insert(draw(st.integers(0, len(lines))), host)
    return b"\r\n".join([method + b" " + target + b" " + version, *lines]) + b"\r\n\r\n"


@st.composite
def mutated_heads(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(heads()))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(
            st.one_of(st.sampled_from(MUTATIONS), st.integers(0, 255).map(lambda c: bytes([c])))
        )
        if op == "insert":
            raw[pos:pos] = piece
        elif op == "delete":
            del raw[pos : pos + draw(st.integers(1, 3))]
        else:
            raw[pos : pos + len(piece)] = piece
    return bytes(raw)


_max_lines = st.one_of(
    st.just(http1.DEFAULT_HEAD_LINES),
    st.sampled_from([0, 1, 2, 3, 5, 8, -1, 10**20, -(10**20)]),
)
IDENTITY_POOL = [
    b"x-openclaw-user",
    b"x-forwarded-user",
    b"x-user",
    b"cookie",
    b"authorization",
    b"host",
    b"user-agent",
    b"X-Openclaw-User",
    b"x_openclaw_user",
    b"sec-websocket-key",
    b"origin",
    b"accept",
    b"x-debug",
]
_rewrite_args = st.builds(
    Rw,
    client_ip=st.one_of(
        st.sampled_from(["100.101.102.103", "127.0.0.1", "fd7a:115c:a1e0::6667", "::1"]),
        st.ip_addresses().map(str),
        st.just("caf\u00e9"),
    ),
    proto=st.sampled_from([b"http", b"https"]),
    identity_headers=st.frozensets(
        st.one_of(st.sampled_from(IDENTITY_POOL), _tchar_names.map(bytes.lower)), max_size=12
    ),
    add=st.lists(
        st.tuples(
            st.sampled_from([b"X-Forwarded-User", b"X-Openclaw-User", b"X-Auth-Email"]),
            st.one_of(
                st.sampled_from([b"alice@example.com", b"", b"a\r\nb", b"a\nb", b"a\x00", b"a\rb"]),
                st.binary(max_size=10),
            ),
        ),
        max_size=3,
    ).flatmap(lambda xs: st.sampled_from([xs, tuple(xs)])),
    drop_authorization=st.booleans(),
    session_cookie=st.sampled_from([None, None, b"clawgate_session", b"theme", b"a", b""]),
)


# ----------------------------------------------------------------------------- properties


@needs_head
@settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(heads(), mutated_heads()), _max_lines)
def test_parse_answers_only_what_python_answers(raw: bytes, max_lines: int) -> None:
    event("C answered" if check_parse(raw, max_lines) else "deferred")


@needs_head
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(heads(), heads(), mutated_heads()), _rewrite_args)
def test_rewrite_answers_only_what_python_answers(raw: bytes, a: Rw) -> None:
    try:
        py = parse_request_head_py(raw)
    except BadRequest:
        return
    # On any head Python accepts (the contract is the function's, not only the subset's),
    # and on the head as the C parser gave it (same fields, fast=True).
    answered = check_rewrite(py, a)
    fast = fast_head(raw)
    if fast is not None:
        answered = check_rewrite(fast, a) or answered
        if _rewrite_ok(a):  # and the public function gives the same bytes for both heads
            assert _public_rewrite(fast, a) == _public_rewrite(py, a)
    event("C answered" if answered else "deferred")


def _rewrite_ok(a: Rw) -> bool:
    """Python's rewrite does not raise for these arguments."""
    return a.client_ip.isascii() and not any(
        b"\r" in v or b"\n" in v or b"\x00" in v for _, v in a.add
    )


# ----------------------------------------------------------------------------- every byte

BASE = b"GET /p?q HTTP/1.1\r\nHost: h\r\nX-Name: val ue\r\n\r\n"
POST_BASE = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 1@\r\nConnection: keep-alive\r\n\r\n"
# '@' marks where each byte goes (no '@' in the heads otherwise).
PLACES: dict[str, bytes] = {
    "method start": b"@" + BASE,
    "method middle": BASE.replace(b"GET", b"G@T", 1),
    "method end": BASE.replace(b"GET", b"GET@", 1),
    "method": BASE.replace(b"GET", b"@", 1),
    "target start": BASE.replace(b"/p?q", b"@/p?q"),
    "target after /": BASE.replace(b"/p?q", b"/@p?q"),
    "target query": BASE.replace(b"/p?q", b"/p?@q"),
    "target end": BASE.replace(b"/p?q", b"/p?q@"),
    "version": BASE.replace(b"HTTP/1.1", b"HTTP/1.1@"),
    "version digit": BASE.replace(b"HTTP/1.1", b"HTTP/1.@"),
    "line start": BASE.replace(b"X-Name", b"@X-Name"),
    "name middle": BASE.replace(b"X-Name", b"X-N@ame"),
    "name end": BASE.replace(b"X-Name", b"X-Name@"),
    "after colon": BASE.replace(b"X-Name: ", b"X-Name:@"),
    "value start": BASE.replace(b"val ue", b"@val ue"),
    "value middle": BASE.replace(b"val ue", b"va@l ue"),
    "value end": BASE.replace(b"val ue", b"val ue@"),
    "host value": BASE.replace(b"Host: h", b"Host: h@"),
    "in a CRLF": BASE.replace(b"X-Name: val ue\r\n", b"X-Name: val ue\r@\n"),
    "in the end": BASE[:-2] + b"@" + BASE[-2:],
    "after the end": BASE + b"@",
    "content-length": POST_BASE,
    "connection token": POST_BASE.replace(b"1@", b"1").replace(b"keep-alive", b"keep-@alive"),
}
PRINTABLE = set(range(0x21, 0x7F))
# What C answers for, in a few places (the rest of the subset: defer).
ACCEPTED: dict[str, set[int]] = {
    "target after /": PRINTABLE,
    "target query": PRINTABLE,
    "name middle": set(TCHARS) | {ord(":")},  # X-N:ame: the name X-N
    "value middle": PRINTABLE | {0x20},
    "value start": PRINTABLE,
    "after colon": PRINTABLE | {0x20},
    "content-length": set(range(0x30, 0x3A)),
    "method": set(),
    "in the end": set(),
}


@needs_head
@pytest.mark.parametrize("place", list(PLACES))
def test_every_byte_in_every_part_of_a_head(place: str) -> None:
    template = PLACES[place]
    assert template.count(b"@") == 1
    accepted = {c for c in range(256) if check_parse(template.replace(b"@", bytes([c])))}
    if place in ACCEPTED:
        assert accepted == ACCEPTED[place], sorted(accepted ^ ACCEPTED[place])
    for c in sorted(accepted):  # and each accepted one rewrites as Python does
        raw = template.replace(b"@", bytes([c]))
        h = fast_head(raw)
        assert h is not None
        assert check_rewrite(h, Rw(drop_authorization=True))


# ----------------------------------------------------------------------------- test_http1's heads


def _params(fn: Callable[..., object]) -> list[tuple[Any, ...]]:
    """The argument rows of a test's (only) parametrize mark."""
    (mark,) = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
    return [v if isinstance(v, tuple) else (v,) for v in mark.args[1]]


def http1_table_heads() -> list[tuple[bytes, int, Rw]]:
    """Every head tests/unit/test_http1.py parses, with the rewrite arguments it uses."""
    head = th.head
    ident = th.IDENTITY
    ws = (
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    )
    base = Rw(client_ip=th.PEER, identity_headers=ident)
    rows: list[tuple[bytes, int, Rw]] = []

    def add(raw: bytes, a: Rw = base, limit: int = http1.DEFAULT_HEAD_LINES) -> None:
        rows.append((raw, limit, a))

    for spoof in th.SPOOFS:
        add(head("Host: gw.example:18789", *spoof))
        add(head("Host: gw.example:18789", *spoof, *ws))
    add(head("Host: h", "Connection: X-Forwarded-For, X-Forwarded-Proto, Host"))
    add(head("Host: h", "X-Forwarded-For: 10.0.0.1, 10.0.0.2"))
    for ip in ["fd7a:115c:a1e0::6667", "127.0.0.1", "100.64.0.1"]:
        add(head("Host: h"), replace(base, client_ip=ip, proto=b"https"))
    add(head(request_line=b"GET / HTTP/1.0"))
    add(head(*th.PRESERVED))
    add(
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
    for (protected,) in _params(th.test_connection_cannot_remove_end_to_end_headers):
        lines = ["Host: h", "Origin: https://h", "Sec-WebSocket-Key: k"]
        request_line = b"GET / HTTP/1.1"
        if protected == "Content-Length":
            lines.append("Content-Length: 3")
            request_line = b"POST / HTTP/1.1"
        if protected == "Transfer-Encoding":
            lines.append("Transfer-Encoding: chunked")
            request_line = b"POST / HTTP/1.1"
        add(head(*lines, f"Connection: {protected}", request_line=request_line))
    add(
        head(
            "Host: h",
            "Connection: keep-alive, Upgrade",
            "Upgrade: websocket",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        )
    )
    add(head("Host: h", "Connection: close"))
    auth = head("Host: h", "Authorization: Bearer clawgate-token", "X-A: 1")
    add(auth)
    add(auth, replace(base, drop_authorization=True))
    for cookie, _ in _params(th.test_session_cookie_removed_others_kept):
        add(
            head("Host: h", b"Cookie: " + cookie), replace(base, session_cookie=b"clawgate_session")
        )
    for bad in [b"a\r\nX-Forwarded-For: 1.1.1.1", b"a\nb", b"a\x00"]:
        add(head("Host: h"), replace(base, add=[(b"X-Openclaw-User", bad)]))
    add(
        head("Host: h", "X-Openclaw-User: spoof"),
        replace(base, add=[(b"X-Openclaw-User", b"alice@example.com")]),
    )
    add(head("Host: h", "Content-Length: 12", request_line=b"POST /api/x?y=1 HTTP/1.1"))
    for lines, request_line, _ in _params(th.test_keep_alive):
        add(head(*lines, request_line=request_line))
    add(head("Host: h", "Upgrade: WebSocket", "Connection: keep-alive, Upgrade"))
    add(head("Host: h", "Upgrade: websocket"))
    for raw, _ in _params(th.test_smuggling_shapes_are_bad_requests):
        add(raw)
    for lines, request_line, *_ in _params(th.test_framing_fields):
        add(head(*lines, request_line=request_line))
    for extra, limit, _ in _params(th.test_more_header_lines_than_the_limit_is_431):
        add(head("Host: h", *["a:"] * extra), limit=limit)
    add(
        head("Host: h", *["a:"] * 50, "Cookie: x=1"),
        replace(base, add=[(b"X-Forwarded-User", b"alice@example.com")]),
    )
    add(b"GET /x HTTP/1.0\r\nHost: gw\r\nConnection: keep-alive\r\n\r\n")
    add(b"GET /x HTTP/1.0\r\nHost: gw\r\n\r\n")
    return rows


@needs_head
def test_every_head_of_test_http1() -> None:
    rows = http1_table_heads()
    parsed = rewritten = 0
    for raw, limit, a in rows:
        parsed += check_parse(raw, limit)
        try:
            py = parse_request_head_py(raw, limit)
        except BadRequest:
            continue
        for variant in (a, replace(a, drop_authorization=not a.drop_authorization)):
            rewritten += check_rewrite(py, variant)
            fast = fast_head(raw, limit)
            if fast is not None:
                check_rewrite(fast, variant)
    assert len(rows) > 150
    # Most of test_http1's heads are unusual on purpose; the ordinary ones take the C path.
    assert parsed >= 40 and rewritten >= 80, (parsed, rewritten)


# ----------------------------------------------------------------------------- the public path

BROWSER_GET = (
    b"GET /chat?session=main HTTP/1.1\r\nHost: 100.64.0.1:18789\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\nCookie: theme=dark; lang=en\r\nUpgrade-Insecure-Requests: 1\r\n"
    b"Sec-Fetch-Dest: document\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-Site: none\r\n"
    b"Sec-Fetch-User: ?1\r\nPriority: u=0, i\r\n\r\n"
)
WS_BEARER = (
    b"GET /ws HTTP/1.1\r\nHost: 100.64.0.1:18789\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n"
    b"Accept: */*\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Sec-WebSocket-Version: 13\r\nOrigin: http://100.64.0.1:18789\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: keep-alive, Upgrade\r\n"
    b"Cookie: theme=dark; lang=en\r\nPragma: no-cache\r\nCache-Control: no-cache\r\n"
    b"Authorization: Bearer " + b"x" * 43 + b"\r\nUpgrade: websocket\r\n\r\n"
)
POST_CL = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw.example:18789\r\n"
    b"Content-Type: application/json\r\nContent-Length: 27\r\n"
    b"Authorization: Bearer t0k3n\r\nAccept: */*\r\n\r\n"
)
REWRITE = Rw(
    identity_headers=frozenset({b"x-forwarded-user"}),
    add=[(b"X-Forwarded-User", b"alice@example.com")],
    drop_authorization=True,
    session_cookie=b"clawgate_session",
)


def _public_rewrite(h: RequestHead, a: Rw) -> bytes:
    return rewrite_request_head(
        h,
        client_ip=a.client_ip,
        proto=a.proto,
        identity_headers=a.identity_headers,
        add=a.add,
        drop_authorization=a.drop_authorization,
        session_cookie=a.session_cookie,
    )


@needs_head
@pytest.mark.parametrize("raw", [BROWSER_GET, WS_BEARER, POST_CL], ids=["browser", "ws", "post"])
def test_the_public_functions_take_the_c_path(raw: bytes) -> None:
    h = parse_request_head(raw)
    py = parse_request_head_py(raw)
    assert h.fast is True and py.fast is False
    assert h == replace(py, fast=True)
    assert _public_rewrite(h, REWRITE) == _public_rewrite(py, REWRITE)
    assert c_rewrite(h, REWRITE) == rewrite_request_head_py(
        py,
        client_ip=REWRITE.client_ip,
        proto=REWRITE.proto,
        identity_headers=REWRITE.identity_headers,
        add=REWRITE.add,
        drop_authorization=True,
        session_cookie=b"clawgate_session",
    )
    assert (h.websocket, h.content_length) == {
        BROWSER_GET: (False, None),
        WS_BEARER: (True, None),
        POST_CL: (False, 27),
    }[raw]


@needs_head
def test_a_deferred_rewrite_is_pythons() -> None:
    h = parse_request_head(b"GET / HTTP/1.1\r\nHost: h\r\nCookie: a=1; clawgate_session=S\r\n\r\n")
    assert h.fast and c_rewrite(h, REWRITE) is None
    assert b"clawgate_session" not in _public_rewrite(h, REWRITE)
    with pytest.raises(ValueError):
        _public_rewrite(h, replace(REWRITE, add=[(b"X-A", b"a\r\nb")]))


def _refusal(fn: Callable[[bytes, int], RequestHead], raw: bytes, limit: int) -> tuple[Any, ...]:
    with pytest.raises(BadRequest) as ei:
        fn(raw, limit)
    return type(ei.value), ei.value.status, ei.value.reason


@needs_head
def test_a_refused_head_keeps_its_reason_through_the_public_function() -> None:
    rows = [
        (raw, http1.DEFAULT_HEAD_LINES)
        for raw, _ in _params(th.test_smuggling_shapes_are_bad_requests)
    ]
    rows += [(th.head("Host: h", *["a:"] * 100), 100), (th.head("Host: h", "a:"), 0)]
    rows += [(th.head("Host: h", "a:", "a:"), -1)]
    for raw, limit in rows:
        assert H().parse(raw, limit) is None
        got = _refusal(parse_request_head, raw, limit)
        assert got == _refusal(parse_request_head_py, raw, limit), raw
    assert _refusal(parse_request_head, rows[-3][0], 100)[:2] == (HeadTooLarge, 431)


@needs_head
def test_arguments_out_of_the_subset_defer() -> None:
    fields = H().parse(WS_BEARER, 100)
    assert fields is not None
    for raw, limit in [
        (bytearray(WS_BEARER), 100),
        (memoryview(WS_BEARER), 100),
        (WS_BEARER.decode(), 100),
        (WS_BEARER, 100.0),
        (WS_BEARER, True),
        (WS_BEARER, None),
    ]:
        assert H().parse(raw, limit) is None
    assert H().parse(WS_BEARER, 10**30) == fields
    h = parse_request_head(WS_BEARER)
    args: list[Any] = [
        h.request_line,
        h.lines,
        h.names,
        h.values,
        h.host,
        h.websocket,
        h.keep_alive,
        False,
        "1.2.3.4",
        b"http",
        frozenset({b"x-openclaw-user"}),
        [(b"X-Openclaw-User", b"alice")],
        True,
        None,
    ]
    assert isinstance(H().rewrite(*args), bytes)
    assert isinstance(H().rewrite(*args[:10], {b"x-a"}, (), False, b"s"), bytes)
    bad: list[tuple[int, object]] = [
        (0, "GET / HTTP/1.1"),
        (1, tuple(h.lines)),
        (1, [*h.lines[:-1], "Upgrade: websocket"]),
        (2, h.names[:-1]),
        (3, [*h.values[:-1], bytearray(b"websocket")]),
        (4, "h"),
        (5, 1),
        (6, None),
        (7, 0),
        (8, b"1.2.3.4"),
        (8, "1.2.3.\u0664"),
        (9, "http"),
        (10, [b"x-openclaw-user"]),
        (10, frozenset({"x-openclaw-user"})),
        (10, frozenset({b"x-a", 1})),
        (11, iter([(b"X-A", b"a")])),
        (11, [[b"X-A", b"a"]]),
        (11, [(b"X-A", b"a", b"b")]),
        (11, [(b"X-A", "a")]),
        (11, [(b"X-A", b"a\x00")]),
        (12, 1),
        (13, "clawgate_session"),
    ]
    for i, value in bad:
        assert H().rewrite(*args[:i], value, *args[i + 1 :]) is None, (i, value)
    with pytest.raises(TypeError):
        H().parse(WS_BEARER)
    with pytest.raises(TypeError):
        H().rewrite(*args[:-1])


# ----------------------------------------------------------------------------- big heads


@needs_head
def test_big_heads_and_many_tokens() -> None:
    """Past the C code's stack buffers: 64 header lines, 128 kept lines, 32 Connection
    tokens, 8 identity headers."""
    tokens = ", ".join(f"X-Tok-{i}" for i in range(40))
    lines = [f"X-Tok-{i}: {i}" for i in range(45)] + [f"X-Keep-{i}: v" for i in range(150)]
    raw = th.head("Host: h", f"Connection: keep-alive, {tokens}", *lines)
    assert check_parse(raw, 500)
    assert not check_parse(raw, 100)
    h = fast_head(raw, 500)
    assert h is not None
    ids = frozenset({b"x-keep-%d" % i for i in range(0, 150, 7)} | {b"x-openclaw-user"})
    assert check_rewrite(h, Rw(identity_headers=ids))
    assert check_rewrite(h, Rw(identity_headers=frozenset(list(ids)[:3])))
    assert check_rewrite(h, Rw(identity_headers=frozenset()))


# ----------------------------------------------------------------------------- reference counts

LOOPS = 100_000


@needs_head
def test_no_reference_object_or_memory_growth_over_100k_calls() -> None:
    deferred = th.head("Host: h", "Transfer-Encoding: gzip", request_line=b"POST / HTTP/1.1")
    big = th.head(
        "Host: h",
        "Connection: " + ", ".join(f"x-{i}" for i in range(40)),
        *[f"X-{i}: {i}" for i in range(140)],
    )
    raws = [BROWSER_GET, WS_BEARER, POST_CL, deferred, big, b"\x00"]
    heads = [parse_request_head_py(r, 500) for r in (WS_BEARER, POST_CL, big)]
    many_ids = frozenset({b"x-%d" % i for i in range(0, 140, 3)})
    calls: list[tuple[RequestHead, Rw]] = [
        (heads[0], REWRITE),
        (heads[1], replace(REWRITE, session_cookie=None)),
        (heads[2], replace(REWRITE, identity_headers=many_ids)),
        (parse_request_head_py(BROWSER_GET), replace(REWRITE, session_cookie=b"theme")),  # defers
        (heads[0], replace(REWRITE, add=[(b"X-A", b"a\rb")])),  # defers
    ]
    c = H()

    def run(n: int) -> None:
        for _ in range(n):
            for raw in raws:
                c.parse(raw, 500)
            for h, a in calls:
                c_rewrite(h, a)

    watched: list[object] = [*raws]
    for h, a in calls:
        watched += [h.request_line, h.lines, h.names, h.values, h.host, *h.lines, *h.names]
        watched += [*h.values, a.client_ip, a.proto, a.identity_headers, a.add, *a.add]
        watched += [*a.identity_headers, a.session_cookie]
    t = c.parse(WS_BEARER, 100)
    watched += [t[0], t[2]]  # the method and version objects are shared statics
    # (None and the bools are shared by everything: their counts move with the interpreter.)
    watched = [o for o in watched if o is not None and not isinstance(o, bool)]
    run(1000)
    gc.collect()
    refs = [sys.getrefcount(o) for o in watched]
    objects = len(gc.get_objects())
    run(LOOPS)
    gc.collect()
    assert [sys.getrefcount(o) for o in watched] == refs
    assert len(gc.get_objects()) - objects < 50
    tracemalloc.start()
    try:
        run(1000)
        before = tracemalloc.get_traced_memory()[0]
        run(LOOPS // 5)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown


# ----------------------------------------------------------------------------- the glue


class _StandIn:
    """A module like _head, in Python: answers with the oracle, or defers."""

    def __init__(self) -> None:
        self.answer = True
        self.rewritten: bytes | None = None
        self.calls: list[str] = []

    def parse(self, raw: bytes, max_lines: int) -> tuple[Any, ...] | None:
        self.calls.append("parse")
        if not self.answer:
            return None
        h = parse_request_head_py(raw, max_lines)
        return tuple(getattr(h, f) for f in FIELDS)

    def rewrite(self, *args: object) -> bytes | None:
        self.calls.append("rewrite")
        assert len(args) == 14
        return self.rewritten


@pytest.mark.skipif(
    (http1.__file__ or "").endswith(".so"),
    reason="http1 is compiled (mypyc): its _FAST is not patchable; the real _head is used there",
)
def test_the_glue_uses_the_module_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in = _StandIn()
    monkeypatch.setattr(http1, "_FAST", stand_in)
    raw = th.head("Host: h", "X-A: 1")
    h = parse_request_head(raw)
    assert h.fast and h == replace(parse_request_head_py(raw), fast=True)
    want = _public_rewrite(parse_request_head_py(raw), Rw())
    assert _public_rewrite(h, Rw()) == want  # rewrite deferred (None): Python's
    stand_in.rewritten = b"from C"
    assert _public_rewrite(h, Rw()) == b"from C"
    assert stand_in.calls == ["parse", "rewrite", "rewrite"]
    stand_in.answer = False
    slow = parse_request_head(raw)
    assert not slow.fast
    assert _public_rewrite(slow, Rw()) == want  # a head C did not parse: never C's rewrite
    assert stand_in.calls == ["parse", "rewrite", "rewrite", "parse"]
    with pytest.raises(BadRequest, match="missing Host"):
        parse_request_head(th.head("X: 1"))


def test_the_glue_loads_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    import proxy.core

    stand_in = ModuleType("proxy.core._head")
    monkeypatch.setitem(sys.modules, "proxy.core._head", stand_in)
    monkeypatch.delattr(proxy.core, "_head", raising=False)
    assert http1._load_fast() is stand_in
