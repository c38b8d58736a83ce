"""Tests of proxy/core/networks.py against the stdlib ``ipaddress`` module as an oracle.

``NetworkSet`` compiles allowedNetworks to merged integer ranges; whatever the networks and
the peer (IPv4, IPv6, IPv4-mapped ``::ffff:a.b.c.d``, with a zone id), its answer must match
the plain ``ipaddress`` reading, and anything that is not an address is outside.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.networks import NetworkSet, is_loopback, parse_network, unmap_ip

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def oracle(nets: list[Net], ip: str) -> bool:
    """The documented meaning, written with ipaddress.

    A v4-mapped peer is the IPv4 address it carries; a v6 network inside ::ffff:0:0/96 also
    admits the IPv4 peers it maps.
    """
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
            ip.split("%", 1)[0]
        )
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for n in nets:
        if n.version == addr.version and addr in n:
            return True
        if (
            addr.version == 4
            and isinstance(n, ipaddress.IPv6Network)
            and n.prefixlen >= 96
            and n.subnet_of(_MAPPED)
        ):
            as_v4 = ipaddress.IPv4Network((int(n.network_address) & 0xFFFFFFFF, n.prefixlen - 96))
            if addr in as_v4:
                return True
    return False


# ----------------------------------------------------------------------------- strategies

_v4_int = st.integers(0, 2**32 - 1)
_v6_int = st.integers(0, 2**128 - 1)
# Addresses near the interesting places, so random networks and peers actually meet.
_v4_near = st.one_of(
    _v4_int,
    st.sampled_from([0x64400000, 0x0A000000, 0x7F000001, 0xCB007107]).flatmap(
        lambda base: st.integers(max(0, base - 300), min(2**32 - 1, base + 300))
    ),
)
_v6_near = st.one_of(
    _v6_int,
    st.builds(lambda v4: (0xFFFF << 32) | v4, _v4_near),  # ::ffff:a.b.c.d
    st.builds(lambda lo: (0xFD7A115CA1E0 << 80) | lo, st.integers(0, 2**80 - 1)),
    st.integers(0, 2**16),  # ::, ::1 and friends
)


@st.composite
def v4_networks(draw: st.DrawFn) -> Net:
    prefix = draw(st.integers(0, 32))
    return ipaddress.IPv4Network((draw(_v4_near), prefix), strict=False)


@st.composite
def v6_networks(draw: st.DrawFn) -> Net:
    base = draw(_v6_near)
    if draw(st.booleans()):
        # Around the v4-mapped block: prefixes from /80 to /128.
        prefix = draw(st.integers(80, 128))
    else:
        prefix = draw(st.integers(0, 128))
    return ipaddress.IPv6Network((base, prefix), strict=False)


networks = st.lists(st.one_of(v4_networks(), v6_networks()), min_size=1, max_size=6)


@st.composite
def peers(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["v4", "v6", "mapped", "mapped-hex", "zone"]))
    if kind == "v4":
        return str(ipaddress.IPv4Address(draw(_v4_near)))
    if kind == "mapped":
        return "::ffff:" + str(ipaddress.IPv4Address(draw(_v4_near)))
    if kind == "mapped-hex":
        v4 = draw(_v4_near)
        return f"::ffff:{v4 >> 16:x}:{v4 & 0xFFFF:x}"
    addr = str(ipaddress.IPv6Address(draw(_v6_near)))
    return addr + "%eth0" if kind == "zone" else addr


def _compile(nets: list[Net]) -> NetworkSet:
    return NetworkSet.from_strings(str(n) for n in nets)


# ----------------------------------------------------------------------------- properties


@settings(max_examples=800, deadline=None)
@given(networks, st.lists(peers(), min_size=1, max_size=8))
def test_agrees_with_ipaddress(nets: list[Net], ips: list[str]) -> None:
    ns = _compile(nets)
    for ip in ips:
        assert ns.contains(ip) is oracle(nets, ip), (nets, ip)


@settings(max_examples=300, deadline=None)
@given(networks)
def test_boundaries_of_each_network(nets: list[Net]) -> None:
    ns = _compile(nets)
    for n in nets:
        first, last = int(n.network_address), int(n.broadcast_address)
        top = 2**32 - 1 if n.version == 4 else 2**128 - 1
        for value in {first, last, max(first - 1, 0), min(last + 1, top)}:
            ip = str(
                ipaddress.IPv4Address(value) if n.version == 4 else ipaddress.IPv6Address(value)
            )
            assert ns.contains(ip) is oracle(nets, ip), (nets, ip)


@settings(max_examples=200, deadline=None)
@given(networks)
def test_cidrs_round_trip(nets: list[Net]) -> None:
    ns = _compile(nets)
    # netaddr and ipaddress spell some v6 networks differently ('::0.128.0.0' vs '::80:0').
    assert tuple(ipaddress.ip_network(c) for c in ns.cidrs) == tuple(nets)
    assert bool(ns)


@given(st.text(max_size=40))
def test_random_text_is_outside_unless_it_is_an_address(text: str) -> None:
    everything = NetworkSet.from_strings(["0.0.0.0/0", "::/0"])
    assert everything.contains(text) is oracle(
        [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")], text
    )


# ----------------------------------------------------------------------------- the table

TAILNET = ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]
EDGES: list[tuple[list[str], object, bool]] = [
    (TAILNET, "100.64.0.0", True),
    (TAILNET, "100.127.255.255", True),
    (TAILNET, "100.63.255.255", False),
    (TAILNET, "100.128.0.0", False),
    (TAILNET, "100.101.102.103", True),
    (TAILNET, "203.0.113.7", False),
    (TAILNET, "::ffff:100.101.102.103", True),
    (TAILNET, "::ffff:6465:6667", True),  # the same, in hex
    (TAILNET, "::ffff:203.0.113.7", False),
    (TAILNET, "fd7a:115c:a1e0::", True),
    (TAILNET, "fd7a:115c:a1e0:ffff:ffff:ffff:ffff:ffff", True),
    (TAILNET, "fd7a:115c:a1df:ffff:ffff:ffff:ffff:ffff", False),
    (TAILNET, "fd7a:115c:a1e1::", False),
    (TAILNET, "fd7a:115c:a1e0::6667%veth0", True),
    (TAILNET, "FD7A:115C:A1E0::1", True),
    (TAILNET, "2001:db8::7", False),
    (TAILNET, "::1", False),
    (TAILNET, "127.0.0.1", False),
    # /0, /32, /128
    (["0.0.0.0/0"], "255.255.255.255", True),
    (["0.0.0.0/0"], "0.0.0.0", True),
    (["0.0.0.0/0"], "::1", False),
    (["0.0.0.0/0"], "::ffff:1.2.3.4", True),
    (["::/0"], "::", True),
    (["::/0"], "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", True),
    (["::/0"], "1.2.3.4", False),
    (["::/0"], "::ffff:1.2.3.4", False),  # a mapped peer is its IPv4 address
    (["127.0.0.1/32"], "127.0.0.1", True),
    (["127.0.0.1/32"], "127.0.0.2", False),
    (["127.0.0.1/32"], "127.0.0.0", False),
    (["127.0.0.1"], "127.0.0.1", True),
    (["::1/128"], "::1", True),
    (["::1/128"], "::2", False),
    (["::1/128"], "::", False),
    (["::1/128"], "0:0:0:0:0:0:0:1", True),
    # v4-mapped networks admit the IPv4 peers they map
    (["::ffff:10.0.0.0/104"], "10.1.2.3", True),
    (["::ffff:10.0.0.0/104"], "::ffff:10.1.2.3", True),
    (["::ffff:10.0.0.0/104"], "11.0.0.0", False),
    # overlapping and adjacent networks
    (["10.0.0.0/8", "10.1.0.0/16"], "10.200.0.1", True),
    (["10.0.0.0/8", "::ffff:10.1.0.0/112"], "10.200.0.1", True),
    (["10.0.0.0/9", "10.128.0.0/9"], "10.127.255.255", True),
    (["10.0.0.0/9", "10.128.0.0/9"], "10.128.0.0", True),
    (["10.0.0.0/9", "10.128.0.0/9"], "11.0.0.0", False),
    # garbage is outside
    (TAILNET, "", False),
    (TAILNET, "100.64.0.1 ", False),
    (TAILNET, " 100.64.0.1", False),
    (TAILNET, "100.64.0.1\x00", False),
    (TAILNET, "100.64.1", False),
    (TAILNET, "100.64.0.1.1", False),
    (TAILNET, "0100.064.000.001", False),
    (TAILNET, "100.64.0.256", False),
    (TAILNET, "fd7a:115c:a1e0::1::2", False),
    (TAILNET, "fd7a:115c:a1e0::g", False),
    (TAILNET, "[fd7a:115c:a1e0::1]", False),
    (TAILNET, "100.64.0.0/10", False),
    (TAILNET, "localhost", False),
    (TAILNET, "%eth0", False),
    (TAILNET, None, False),
    (TAILNET, 1684275200, False),
    (TAILNET, b"100.64.0.1", False),
]


@pytest.mark.parametrize(
    ("nets", "ip", "inside"), EDGES, ids=[f"{i}-{ip!r}" for i, (_, ip, _) in enumerate(EDGES)]
)
def test_edges(nets: list[str], ip: object, inside: bool) -> None:
    ns = NetworkSet.from_strings(nets)
    assert ns.contains(ip) is inside
    assert (ip in ns) is inside


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.0/33",
        "10/8",
        "127.1",
        "10.0.0.0/08",
        "10.0.0.0/-1",
        "10.0.0.0/",
        "::/129",
        "fd7a::1%eth0/128",
        " 10.0.0.0/8",
        "10.0.0.0/8 ",
        "example.com",
        "",
        "10.0.0.0/8/8",
        "10.0.0.0/+8",
        "10.0.0.0/0x8",
        "10.0.0.0/٨",
    ],
)
def test_parse_network_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a network"):
        parse_network(text)


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [
        ("100.101.102.103/10", "100.64.0.0/10"),
        ("fd7a:115c:a1e0::1/48", "fd7a:115c:a1e0::/48"),
        ("10.0.0.1/0", "0.0.0.0/0"),
    ],
)
def test_parse_network_host_bits(text: str, suggestion: str) -> None:
    with pytest.raises(ValueError, match=f"has host bits set .did you mean '{suggestion}'"):
        parse_network(text)


def test_empty_set_is_false_and_contains_nothing() -> None:
    ns = NetworkSet.compile([])
    assert not ns
    assert not ns.contains("127.0.0.1")


@pytest.mark.parametrize(
    ("ip", "unmapped", "loopback"),
    [
        ("::ffff:100.1.2.3", "100.1.2.3", False),
        ("::ffff:127.0.0.1", "127.0.0.1", True),
        ("fe80::1%eth0", "fe80::1", False),
        ("127.0.0.53", "127.0.0.53", True),
        ("::1", "::1", True),
        ("100.64.0.1", "100.64.0.1", False),
    ],
)
def test_unmap_and_loopback(ip: str, unmapped: str, loopback: bool) -> None:
    assert unmap_ip(ip) == unmapped
    assert is_loopback(ip) is loopback
