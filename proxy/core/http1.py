"""Request heads: strict parsing, smuggling checks, and the forwarding rewrite.

Pure functions over bytes, no I/O. httptools (llhttp, as used by uvicorn) parses; our own
checks run first on the raw lines for the shapes that differ between parsers (bare CR or
LF, obs-fold, NUL); duplicate or conflicting framing headers are llhttp's strict-mode
errors, pinned by the unit tests, and the rest (Host, Authorization, Upgrade, '_' in
framing names, HTTP/1.0 chunked) is checked on what it parsed. The rewrite keeps every
surviving header line byte for byte, removes hop-by-hop, Connection-listed, forwarding and
identity headers sent by the client, and puts the headers clawgate vouches for first, right
after the request line: a gateway whose parser keeps only the first N header lines (Node's
``maxHeadersCount``) must never lose them to a flood of client lines.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Final

import httptools

from ..errors import BadRequest, HeadTooLarge


def _load_fast() -> ModuleType | None:
    """proxy/core/_head.c, built with the compiled build; None in the pure build."""
    try:
        from . import _head
    except ImportError:
        return None
    return _head


# The common request head in C (issue 15, lever 4): parse() answers for a narrow subset of
# heads or defers (None) to the Python parser below, never refusing by itself; rewrite()
# copies rewrite_request_head for the heads parse() accepted. tests/unit/test_head_fast.py
# and tests/fuzz/fuzz_head.py hold it to the Python code, the oracle.
_FAST: Final = _load_fast()
FAST_HEAD: Final = _FAST is not None

__all__ = [
    "DEFAULT_HEAD_LINES",
    "RequestHead",
    "HeadTooLarge",
    "parse_request_head",
    "rewrite_request_head",
    "parse_request_head_py",
    "rewrite_request_head_py",
    "FAST_HEAD",
    "find_head_end",
    "normalise_header_name",
    "is_spoofable_header",
    "strip_cookie",
    "ChunkedScanner",
    "REQUEST_FREE_CHUNKS",
    "ResponseError",
    "response_framing",
    "BODY_NONE",
    "BODY_CHUNKED",
    "BODY_UNTIL_CLOSE",
]

_CRLF: Final = b"\r\n"
_CTL_RE: Final = re.compile(rb"[\x00-\x20\x7f]")
_HEAD_END: Final = b"\r\n\r\n"
_METHODS: Final = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"})
# End-to-end headers a client must not get removed by listing them in Connection.
_PROTECTED: Final = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"upgrade",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
        b"origin",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        # The credential the decision saw and forwarded (the gateway's own token).
        b"authorization",
    }
)
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"http2-settings",
    }
)
# Client-supplied claims about the client: never believed, never forwarded.
_SPOOF_EXACT: Final = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"x-client-ip",
        b"true-client-ip",
        b"client-ip",
        b"x-cluster-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-original-forwarded-for",
        b"x-remote-ip",
        b"x-remote-addr",
        b"x-originating-ip",
    }
)
_SPOOF_PREFIXES: Final = (b"x-forwarded-", b"tailscale-")
_UNDERSCORE_FRAMING: Final = frozenset({b"content_length", b"transfer_encoding"})
# limits.headLines: far above a browser's ~20 lines, far below Node's 1,000-line cut.
DEFAULT_HEAD_LINES: Final = 100


def find_head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Offset just past the blank line ending the head, or -1."""
    i = buf.find(_HEAD_END, max(0, start - 3))
    return -1 if i < 0 else i + 4


def normalise_header_name(name: bytes) -> bytes:
    """Lower case with '_' read as '-' (some servers treat them alike)."""
    return name.lower().replace(b"_", b"-")


def is_spoofable_header(norm: bytes, identity_headers: frozenset[bytes]) -> bool:
    return norm in _SPOOF_EXACT or norm.startswith(_SPOOF_PREFIXES) or norm in identity_headers


@dataclass(slots=True)
class RequestHead:
    """A validated request head. ``lines`` are the raw header lines, in order."""

    raw: bytes
    method: bytes
    target: bytes
    version: tuple[int, int]
    request_line: bytes
    lines: list[bytes]
    names: list[bytes]  # lower-case names, parallel to ``lines``
    values: list[bytes]  # raw values, parallel to ``lines``
    content_length: int | None
    chunked: bool
    websocket: bool
    keep_alive: bool
    host: bytes | None = None  # the Host value (at most one Host line is accepted)
    fast: bool = False  # parsed by proxy/core/_head.c (so its rewrite applies)

    @property
    def path(self) -> bytes:
        q = self.target.find(b"?")
        return self.target if q < 0 else self.target[:q]

    def header(self, lname: bytes) -> bytes | None:
        """First value of a header (lower-case name), or None."""
        for n, v in zip(self.names, self.values, strict=True):
            if n == lname:
                return v
        return None

    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class _Collector:
    __slots__ = ("url", "names", "values", "_last_was_value", "done")

    def __init__(self) -> None:
        self.url = b""
        self.names: list[bytes] = []
        self.values: list[bytes] = []
        self._last_was_value = True
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.names.append(name)
        self.values.append(value)

    def on_headers_complete(self) -> None:
        self.done = True


def _strict_lines(raw: bytes, max_lines: int) -> list[bytes]:
    """Split a head (ending in CRLF CRLF) into lines; reject parser-differential shapes."""
    if b"\x00" in raw:
        raise BadRequest("NUL byte in request head")
    body = raw[:-4]
    # Whole-buffer counts (C speed): every CR and every LF must be part of a CRLF.
    crlf = body.count(_CRLF)
    if crlf > max_lines:  # one CRLF per header line (the request line ends in the first)
        raise HeadTooLarge(f"too many header lines (limit {max_lines})")
    if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
        raise BadRequest("bare CR or LF in request head")
    if b"\r\n\r\n" in body:
        raise BadRequest("empty header line")
    if b"\r\n " in body or b"\r\n\t" in body:
        raise BadRequest("obsolete line folding in header")
    return body.split(_CRLF)


def parse_request_head(raw: bytes, max_lines: int = DEFAULT_HEAD_LINES) -> RequestHead:
    """Parse and validate a complete head (``raw`` ends with CRLF CRLF).

    Raises BadRequest (400) for anything malformed or smuggling-shaped, HeadTooLarge (431)
    for more than ``max_lines`` header lines.
    """
    if _FAST is not None:
        t = _FAST.parse(raw, max_lines)
        if t is not None:
            return RequestHead(
                raw, t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11], True
            )
    return parse_request_head_py(raw, max_lines)


def parse_request_head_py(raw: bytes, max_lines: int = DEFAULT_HEAD_LINES) -> RequestHead:
    """parse_request_head in Python, for every head (the oracle _head.c is held to)."""
    lines = _strict_lines(raw, max_lines)
    request_line = lines[0]
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method, target, proto = parts
    if method not in _METHODS:
        if method == b"CONNECT":
            raise BadRequest("CONNECT is not supported")
        raise BadRequest("unsupported method")
    if proto not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest("unsupported HTTP version")
    if not target.startswith(b"/"):
        raise BadRequest("request target must be origin-form (/path)")
    if _CTL_RE.search(target):
        raise BadRequest("control character in request target")

    col = _Collector()
    parser = httptools.HttpRequestParser(col)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        raise BadRequest("malformed request head") from None
    if not col.done:
        raise BadRequest("malformed request head")
    header_lines = lines[1:]
    if len(col.names) != len(header_lines):
        raise BadRequest("malformed header line")

    names = [n.lower() for n in col.names]
    values = col.values
    content_length: int | None = None
    chunked = False
    host_count = 0
    host: bytes | None = None
    upgrade: bytes | None = None
    conn_tokens: set[bytes] = set()
    for i, name in enumerate(names):
        # A second Content-Length or Transfer-Encoding, or both, is llhttp's own strict-mode
        # error above (tests/unit/test_http1.py pins it): one of each at most gets here.
        if name == b"content-length":
            v = values[i].strip()
            if not v.isdigit() or len(v) > 15:
                raise BadRequest("invalid Content-Length")
            content_length = int(v)
        elif name == b"transfer-encoding":
            if values[i].strip().lower() != b"chunked":
                raise BadRequest("unsupported Transfer-Encoding")
            chunked = True
        elif name == b"host":
            host_count += 1
            host = values[i]
        elif name == b"upgrade":
            if upgrade is not None:
                raise BadRequest("more than one Upgrade")
            upgrade = values[i].strip().lower()
        elif name == b"connection":
            conn_tokens.update(t.strip().lower() for t in values[i].split(b","))
        elif name == b"http2-settings":
            raise BadRequest("HTTP/2 upgrade (h2c) is not supported")
        elif name in _UNDERSCORE_FRAMING:
            # Servers that read '_' as '-' would frame the body by it; we would not.
            raise BadRequest("framing header spelled with '_'")
    if names.count(b"authorization") > 1:  # C speed; parsers differ on which one counts
        raise BadRequest("more than one Authorization")
    if host_count > 1:
        raise BadRequest("more than one Host")
    if host_count == 0 and proto == b"HTTP/1.1":
        raise BadRequest("missing Host")
    if chunked and proto == b"HTTP/1.0":
        raise BadRequest("chunked body in HTTP/1.0")
    websocket = False
    if upgrade is not None:
        if upgrade != b"websocket":
            raise BadRequest("only the websocket upgrade is supported")
        if b"upgrade" in conn_tokens:
            if method != b"GET":
                raise BadRequest("websocket upgrade must be GET")
            if chunked or content_length:
                raise BadRequest("websocket upgrade with a body")
            websocket = True
    if proto == b"HTTP/1.1":
        keep_alive = b"close" not in conn_tokens
        version = (1, 1)
    else:
        keep_alive = b"keep-alive" in conn_tokens
        version = (1, 0)
    return RequestHead(
        raw=raw,
        method=method,
        target=target,
        version=version,
        request_line=request_line,
        lines=header_lines,
        names=names,
        values=values,
        content_length=content_length,
        chunked=chunked,
        websocket=websocket,
        keep_alive=keep_alive,
        host=host,
    )


def strip_cookie(value: bytes, cookie_name: bytes) -> bytes:
    """Remove ``cookie_name=...`` pairs from a Cookie header value, keep the rest as is."""
    kept = [p for p in value.split(b";") if p.strip().partition(b"=")[0].strip() != cookie_name]
    return b";".join(kept).strip()


def rewrite_request_head(
    head: RequestHead,
    *,
    client_ip: str,
    proto: bytes,
    identity_headers: frozenset[bytes],
    add: Sequence[tuple[bytes, bytes]] = (),
    drop_authorization: bool = False,
    session_cookie: bytes | None = None,
) -> bytes:
    """The head to send upstream.

    First, right after the request line, what clawgate vouches for: X-Forwarded-For
    (``client_ip``, replaced, never appended), X-Forwarded-Proto, X-Forwarded-Host, ``add``
    and the connection's own Upgrade/Connection lines. Then the client's lines, byte for
    byte, less hop-by-hop headers, every header named in Connection (except the protected
    end-to-end ones), all client-sent forwarding and identity headers (any case, '_' for
    '-'), the proxy's own credential (every Authorization line with ``drop_authorization``)
    and the ``session_cookie`` pair in every Cookie line. ``identity_headers`` holds
    normalised names (lower case, '-').
    """
    if head.fast and _FAST is not None:
        done: bytes | None = _FAST.rewrite(
            head.request_line,
            head.lines,
            head.names,
            head.values,
            head.host,
            head.websocket,
            head.keep_alive,
            head.version == (1, 0),
            client_ip,
            proto,
            identity_headers,
            add,
            drop_authorization,
            session_cookie,
        )
        if done is not None:
            return done
    return rewrite_request_head_py(
        head,
        client_ip=client_ip,
        proto=proto,
        identity_headers=identity_headers,
        add=add,
        drop_authorization=drop_authorization,
        session_cookie=session_cookie,
    )


def rewrite_request_head_py(
    head: RequestHead,
    *,
    client_ip: str,
    proto: bytes,
    identity_headers: frozenset[bytes],
    add: Sequence[tuple[bytes, bytes]] = (),
    drop_authorization: bool = False,
    session_cookie: bytes | None = None,
) -> bytes:
    """rewrite_request_head in Python, for every head (the oracle _head.c is held to)."""
    out: list[bytes] = [
        head.request_line,
        b"X-Forwarded-For: " + client_ip.encode("ascii"),
        b"X-Forwarded-Proto: " + proto,
    ]
    if head.host is not None:
        out.append(b"X-Forwarded-Host: " + head.host)
    for name, value in add:
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            raise ValueError("control character in an injected header value")
        out.append(name + b": " + value)
    if head.websocket:
        out.append(b"Upgrade: websocket")
        out.append(b"Connection: Upgrade")
    elif not head.keep_alive:
        out.append(b"Connection: close")
    elif head.version == (1, 0):
        # HTTP/1.0 closes by default: pass on the client's wish to keep the connection.
        out.append(b"Connection: keep-alive")
    named: set[bytes] = set()
    for n, v in zip(head.names, head.values, strict=True):
        if n == b"connection":
            for tok in v.split(b","):
                t = normalise_header_name(tok.strip())
                if t and t not in _PROTECTED:
                    named.add(t)
    for line, n, v in zip(head.lines, head.names, head.values, strict=True):
        norm = normalise_header_name(n)
        if norm in _HOP_BY_HOP or norm in named:
            continue
        if is_spoofable_header(norm, identity_headers):
            continue
        if drop_authorization and norm == b"authorization":
            continue
        if session_cookie is not None and norm == b"cookie" and session_cookie in v:
            stripped = strip_cookie(v, session_cookie)
            if stripped != v.strip():
                if stripped:
                    out.append(b"Cookie: " + stripped)
                continue
        out.append(line)
    out.append(b"")
    out.append(b"")
    return _CRLF.join(out)


class ResponseError(Exception):
    """The gateway sent something that is not HTTP/1.1: the exchange is broken (502)."""


# How a response body is framed (the third value of response_framing); a value >= 0 is a
# Content-Length.
BODY_NONE: Final = -1
BODY_CHUNKED: Final = -2
BODY_UNTIL_CLOSE: Final = -3


def response_framing(head: bytes, head_request: bool) -> tuple[int, bool, int]:
    """(status, keep_alive, body) of a response head (``head`` ends CRLF CRLF).

    ``body`` is a Content-Length, or BODY_NONE / BODY_CHUNKED / BODY_UNTIL_CLOSE; an
    interim (1xx) response has BODY_NONE. Raises ResponseError on a malformed head.
    """
    lines = head[:-4].split(b"\r\n")
    first = lines[0].split(b" ", 2)
    if len(first) < 2 or not first[0].startswith(b"HTTP/1.") or not first[1].isdigit():
        raise ResponseError("malformed response status line")
    status = int(first[1])
    if status < 200:
        return status, True, BODY_NONE
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
    if head_request or status in (204, 304):
        return status, keep_alive, BODY_NONE
    if chunked:
        return status, keep_alive, BODY_CHUNKED
    if length is not None:
        return status, keep_alive, length
    return status, False, BODY_UNTIL_CLOSE


# A request body may hold this many chunks, plus one per 4 KiB of chunk data: scanning
# costs a few Python steps per chunk, so a body of 1-byte chunks (8 MB of them stalled the
# event loop for ~2 s) is cut off after ~1,024 steps; a body cut into pieces of a few KiB,
# or a short stream of small writes, is never near it.
REQUEST_FREE_CHUNKS: Final = 1024
_CHUNK_BYTES_SHIFT: Final = 12  # one more chunk allowed per 4 KiB
# Fields that never belong in a request trailer: framing, routing, credentials, and the
# spoof catalogue (checked with http1.is_spoofable_header).
_TRAILER_FORBIDDEN: Final = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"trailer",
        b"te",
        b"connection",
        b"upgrade",
        b"keep-alive",
        b"authorization",
        b"proxy-authorization",
        b"cookie",
        b"expect",
        b"content-type",
        b"content-encoding",
    }
)


# ChunkedScanner's states (module constants: mypyc compiles them to plain integers).
_ST_SIZE: Final = 0
_ST_DATA: Final = 1
_ST_DATA_CRLF: Final = 2
_ST_TRAILER: Final = 3


class ChunkedScanner:
    """Finds the end of a chunked body without copying or decoding it.

    ``feed(data)`` returns the offset in ``data`` just past the end of the message, or -1
    when more is needed. Raises ValueError on malformed framing. With ``request=True`` (a
    client's body) the number of chunks is bounded (see REQUEST_FREE_CHUNKS) and trailer
    fields from the spoof catalogue (forwarding, identity) or framing/credential fields
    are refused: a gateway would read them as ``req.trailers``.
    """

    __slots__ = (
        "_state",
        "_remaining",
        "_line",
        "_request",
        "_steps",
        "_free",
        "_data",
        "_identity",
    )

    def __init__(
        self, request: bool = False, identity_headers: frozenset[bytes] = frozenset()
    ) -> None:
        self._state = _ST_SIZE
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
            if st == _ST_DATA:
                take = min(self._remaining, n - pos)
                self._remaining -= take
                pos += take
                if self._remaining == 0:
                    self._state = _ST_DATA_CRLF
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._line += data[pos:]
                if len(self._line) > 4096:
                    raise ValueError("chunk line too long")
                return -1
            line = self._line + data[pos : nl + 1]
            self._line = b""
            pos = nl + 1
            if not line.endswith(b"\r\n"):
                raise ValueError("bare LF in chunked framing")
            line = line[:-2]
            if st == _ST_DATA_CRLF:
                if line:
                    raise ValueError("missing CRLF after chunk data")
                self._state = _ST_SIZE
                continue
            if line:  # a chunk-size line or a trailer field: one more step
                self._steps += 1
                if self._steps > self._free and self._steps > REQUEST_FREE_CHUNKS + (
                    self._data >> _CHUNK_BYTES_SHIFT
                ):
                    raise ValueError("too many chunks (use fewer, larger chunks)")
            if st == _ST_SIZE:
                size_text = line.split(b";", 1)[0]
                if (
                    not size_text
                    or len(size_text) > 16
                    or size_text.strip(b"0123456789abcdefABCDEF")
                ):
                    raise ValueError("invalid chunk size")
                size = int(size_text, 16)
                if size == 0:
                    self._state = _ST_TRAILER
                else:
                    self._remaining = size
                    self._data += size
                    self._state = _ST_DATA
            else:  # trailer section: lines until an empty one
                if not line:
                    self._state = _ST_SIZE
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
            raise ValueError(
                "trailer field not allowed (forwarding, identity, framing or credential header)"
            )
