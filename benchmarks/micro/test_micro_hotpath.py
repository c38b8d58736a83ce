"""Micro-benchmarks of the per-connection checks: network, token, policy decision, identity
cache hit, head parsing and header rewriting. Not part of the test run (testpaths is tests/
and the plugin is disabled by addopts); run with:

    .venv/bin/pytest benchmarks/micro --benchmark-enable -p no:randomly

Each function is timed on the data a real connection carries (a browser-sized WebSocket
upgrade head with ~12 headers), so the numbers add up to the per-connection budget in
DESIGN.md.
"""

from __future__ import annotations

import asyncio
import ipaddress

import netaddr

from proxy.core.exchange import scan_head
from proxy.core.http1 import parse_request_head, rewrite_request_head
from proxy.core.networks import NetworkSet
from proxy.core.policy import IdentityOutcome, PolicySettings, decide
from proxy.core.tokens import TokenEntry, TokenSet, digest, new_token, read_authorization
from proxy.tailscale.identity import Identity, IdentityCache

NETS = [
    "100.64.0.0/10",
    "fd7a:115c:a1e0::/48",
    "127.0.0.1/32",
    "::1/128",
    "10.0.0.0/8",
    "192.168.0.0/16",
    "172.16.0.0/12",
    "203.0.113.0/24",
    "198.51.100.0/24",
    "2001:db8::/32",
]
HEAD = (
    b"GET /ws HTTP/1.1\r\nHost: 100.64.0.1:18789\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n"
    b"Accept: */*\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Sec-WebSocket-Version: 13\r\nOrigin: http://100.64.0.1:18789\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: keep-alive, Upgrade\r\n"
    b"Cookie: theme=dark; lang=en\r\nPragma: no-cache\r\nCache-Control: no-cache\r\n"
    b"Authorization: Bearer " + b"x" * 43 + b"\r\nUpgrade: websocket\r\n\r\n"
)


def test_network_check_integer_ranges(benchmark):  # type: ignore[no-untyped-def]
    ns = NetworkSet.from_strings(NETS)
    assert benchmark(ns.contains, "100.101.102.103")


def test_network_check_netaddr_ipset_for_comparison(benchmark):  # type: ignore[no-untyped-def]
    s = netaddr.IPSet(NETS)
    assert benchmark(s.__contains__, netaddr.IPAddress("100.101.102.103"))


def test_network_check_ipaddress_for_comparison(benchmark):  # type: ignore[no-untyped-def]
    nets = [ipaddress.ip_network(n) for n in NETS]

    def check() -> bool:
        a = ipaddress.ip_address("100.101.102.103")
        return any(a in n for n in nets)

    assert benchmark(check)


def test_token_check_10_entries(benchmark):  # type: ignore[no-untyped-def]
    tokens = [new_token() for _ in range(10)]
    ts = TokenSet(TokenEntry(f"t{i}", digest(t)) for i, t in enumerate(tokens))
    assert benchmark(ts.verify, tokens[7]) == "t7"


def test_policy_decision(benchmark):  # type: ignore[no-untyped-def]
    ident = Identity.from_whois(
        {
            "Node": {
                "ID": 1,
                "StableID": "n1",
                "Name": "alice-laptop.tail4c3a9.ts.net.",
                "ComputedName": "alice-laptop",
                "Addresses": ["100.101.102.103/32"],
                "Hostinfo": {"OS": "linux"},
            },
            "UserProfile": {"ID": 2, "LoginName": "alice@example.com", "DisplayName": "Alice"},
            "CapMap": None,
        }
    )
    s = PolicySettings(
        require_token=True,
        require_identity=True,
        auth_mode="both",
        allow_users=frozenset({"alice@example.com"}),
    )
    out = IdentityOutcome("identity", ident)
    d = benchmark(decide, s, token_name="phone", token_error=None, token_subject=None, identity=out)
    assert d.allow


def test_identity_cache_hit(benchmark):  # type: ignore[no-untyped-def]
    class Source:
        async def whois(self, ip: str, port: int) -> Identity:
            return Identity.from_whois(
                {
                    "Node": {
                        "ID": 1,
                        "StableID": "n1",
                        "Name": "a.t.ts.net.",
                        "ComputedName": "a",
                        "Addresses": [ip + "/32"],
                    },
                    "UserProfile": {"ID": 2, "LoginName": "alice@example.com"},
                    "CapMap": None,
                }
            )

    cache = IdentityCache(Source())
    asyncio.run(cache.lookup("100.101.102.103", 40000))
    assert benchmark(cache.get, "100.101.102.103", 40001) is not None


def test_head_parse(benchmark):  # type: ignore[no-untyped-def]
    head = benchmark(parse_request_head, HEAD)
    assert head.websocket


def test_head_scan(benchmark):  # type: ignore[no-untyped-def]
    """Where the head ends in what has arrived (front's first read: one whole head)."""
    assert benchmark(scan_head, HEAD, 0, 16384) == len(HEAD)


def test_token_extraction(benchmark):  # type: ignore[no-untyped-def]
    """The Authorization header read and its bearer token extracted, once a request."""
    head = parse_request_head(HEAD)
    assert benchmark(read_authorization, head)[1] == "x" * 43


def test_head_parse_and_rewrite(benchmark):  # type: ignore[no-untyped-def]
    """What every request costs in proxy.core.http1: parse, then the forwarding rewrite."""
    ids = frozenset({b"x-forwarded-user"})
    add = [(b"X-Forwarded-User", b"alice@example.com")]

    def both() -> bytes:
        return rewrite_request_head(
            parse_request_head(HEAD),
            client_ip="100.101.102.103",
            proto=b"http",
            identity_headers=ids,
            add=add,
            drop_authorization=True,
            session_cookie=b"clawgate_session",
        )

    assert b"Authorization" not in benchmark(both)


def test_header_rewrite(benchmark):  # type: ignore[no-untyped-def]
    head = parse_request_head(HEAD)
    out = benchmark(
        rewrite_request_head,
        head,
        client_ip="100.101.102.103",
        proto=b"http",
        identity_headers=frozenset({b"x-forwarded-user"}),
        add=[(b"X-Forwarded-User", b"alice@example.com")],
        drop_authorization=True,
        session_cookie=b"clawgate_session",
    )
    assert b"Authorization" not in out


def test_host_check_cached(benchmark):  # type: ignore[no-untyped-def]
    """The DNS-rebinding Host check of every request (the answer is cached per value)."""
    from proxy.access.hosts import HostNames

    names = HostNames.build(
        exact=["100.64.0.1", "fd7a:115c:a1e0::1"], with_short=["web01.tail3f2a1.ts.net."]
    )
    host = parse_request_head(HEAD).header(b"host")
    assert benchmark(names.refusal, host) is None


def test_host_check_uncached(benchmark):  # type: ignore[no-untyped-def]
    """A client that sends a new Host on every request pays the full parse."""
    from proxy.access.hosts import HostNames

    names = HostNames.build(exact=["100.64.0.1"], with_short=["web01.tail3f2a1.ts.net."])
    assert benchmark(names._refusal, b"web01.tail3f2a1.ts.net:18789", "") is None  # noqa: SLF001
