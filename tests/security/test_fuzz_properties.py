"""Hypothesis properties of the head parser and the rewrite, on hostile input.

What tests/unit does not already cover: arbitrary bytes and byte-level mutations of valid
heads (flips, CR/LF/NUL insertion, truncation, duplicated lines) never raise anything but
BadRequest; whatever parses is rewritten into a head that a strict, independent checker
accepts (no control characters, exactly one X-Forwarded-For = the peer, no client
forwarding or identity header, no conflicting framing); and the identity cache key of a
peer agrees with ipaddress (v4-mapped unmapped, loopback keyed with its port).
"""

from __future__ import annotations

import ipaddress
import re
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.http1 import normalise_header_name, parse_request_head, rewrite_request_head
from proxy.errors import BadRequest
from proxy.tailscale import cache_key

IDENTITY = frozenset({b"x-auth-request-user"})
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

VALID = [
    b"GET /chat?session=1 HTTP/1.1\r\nHost: gw:18789\r\nUser-Agent: t\r\nCookie: a=1\r\n"
    b"Authorization: Bearer abc\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nConnection: X-Real-IP\r\n"
    b"X-Real-IP: 9.9.9.9\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
    b"Tailscale-User-Login: admin\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nForwarded: for=1.1.1.1\r\n\r\n",
]
INSERTS = [
    b"\r",
    b"\n",
    b"\x00",
    b"\r\n",
    b"\r\n\r\n",
    b" ",
    b"\t",
    b":",
    b"\r\n ",
    b"\x7f",
    b"\xff",
    b"_",
    b",",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 3\r\n",
    b"X_Forwarded_For: 1.1.1.1\r\n",
]


@st.composite
def mutated_heads(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(VALID))[:-2])  # without the final CRLF
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == 0 and raw:
            raw[pos] = draw(st.integers(0, 255))
        elif op == 1:
            raw[pos:pos] = draw(st.sampled_from(INSERTS))
        elif op == 2:
            del raw[pos:]
        elif op == 3:
            lines = bytes(raw).split(b"\r\n")
            if len(lines) > 2:
                i = draw(st.integers(1, len(lines) - 2))
                lines.insert(i, lines[i])
                raw = bytearray(b"\r\n".join(lines))
        else:
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=6))
    data = bytes(raw) + b"\r\n"
    end = data.find(b"\r\n\r\n")
    return data[: end + 4] if end >= 0 else data + b"\r\n"


def check_forwarded(out: bytes, peer: str) -> None:
    """An independent strict reading of the head the gateway would get."""
    assert out.endswith(b"\r\n\r\n") and out.count(b"\r\n\r\n") == 1
    lines = out[:-4].split(b"\r\n")
    method, target, version = lines[0].split(b" ")
    assert version in (b"HTTP/1.1", b"HTTP/1.0") and target.startswith(b"/")
    seen: dict[bytes, list[bytes]] = {}
    for ln in lines[1:]:
        name, sep, value = ln.partition(b":")
        assert sep and _TOKEN.match(name), ln
        assert not any((c < 0x20 and c != 0x09) or c == 0x7F for c in value), ln
        seen.setdefault(normalise_header_name(name), []).append(value.strip(b" \t"))
    assert seen.pop(b"x-forwarded-for") == [peer.encode()]
    assert len(seen.pop(b"x-forwarded-proto")) == 1
    assert len(seen.pop(b"x-forwarded-host", [])) <= 1
    assert seen.pop(b"x-auth-request-user", [b"alice@example.com"]) == [b"alice@example.com"]
    for name in seen:
        assert not name.startswith((b"x-forwarded-", b"tailscale-")), name
        assert name not in (b"forwarded", b"x-real-ip", b"true-client-ip"), name
    assert not (b"content-length" in seen and b"transfer-encoding" in seen)
    assert len(seen.get(b"content-length", [])) <= 1


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated_heads(), st.binary(max_size=300).map(lambda b: b + b"\r\n\r\n")))
def test_parse_raises_only_bad_request_and_rewrites_cleanly(raw: bytes) -> None:
    try:
        head = parse_request_head(raw)
    except BadRequest as exc:
        assert 400 <= exc.status < 500
        return
    out = rewrite_request_head(
        head,
        client_ip="100.101.102.103",
        proto=b"http",
        identity_headers=IDENTITY,
        add=[(b"X-Auth-Request-User", b"alice@example.com")],
    )
    check_forwarded(out, "100.101.102.103")
    again = parse_request_head(out)  # the gateway gets something we would accept too
    assert (again.method, again.target, again.content_length, again.chunked) == (
        head.method,
        head.target,
        head.content_length,
        head.chunked,
    )


@settings(max_examples=800, deadline=None)
@given(
    st.one_of(
        st.ip_addresses(v=4).map(str),
        # As the kernel spells a peer (inet_ntop: v4-mapped in dotted form).
        st.ip_addresses(v=6).map(lambda a: socket.inet_ntop(socket.AF_INET6, a.packed)),
        st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    ),
    st.integers(0, 65535),
)
def test_cache_key_agrees_with_ipaddress(ip: str, port: int) -> None:
    addr = ipaddress.ip_address(ip)
    plain = (
        addr.ipv4_mapped
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None
        else addr
    )
    key = cache_key(ip, port)
    if plain.is_loopback:
        host, _, p = key.rpartition(":")
        assert int(p) == port and ipaddress.ip_address(host.strip("[]")) == plain
    else:
        assert ipaddress.ip_address(key) == plain
