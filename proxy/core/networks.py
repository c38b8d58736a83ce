"""allowedNetworks, compiled once at load time into sorted integer ranges.

The configured CIDRs are parsed and merged once; at accept time a peer address is one
``inet_pton`` + ``int.from_bytes`` and a bisect over plain integers (measured ~0.5 us,
against ~12 us for a netaddr IPSet membership). IPv4-mapped IPv6 peers
(``::ffff:a.b.c.d``, seen on dual-stack sockets) are checked as the IPv4 address they carry.

This is also THE home of the address helpers every other module uses: :func:`unmap_ip`,
:func:`is_loopback` and :func:`hostport` (``host:port`` / ``[v6]:port``).

Parsing and merging at load time use the stdlib ``ipaddress``. The accept-time check takes
``inet_pton`` from ``_socket`` (the C module ``socket`` wraps): a pure conversion, ten times
faster than ``ipaddress``; the import test allows exactly that name and nothing else of it.
"""

from __future__ import annotations

import bisect
import ipaddress
from _socket import AF_INET, AF_INET6, inet_pton
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "NetworkSet",
    "Network",
    "parse_network",
    "unmap_ip",
    "is_loopback",
    "hostport",
    "canonical_ip",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_V4_MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"


def parse_network(text: str) -> Network:
    """Parse one CIDR (or bare address) strictly; raises ValueError with a short reason."""
    if not isinstance(text, str) or not text or text.strip() != text:
        raise ValueError("is not a network")
    try:
        addr_part, _, prefix_part = text.partition("/")
        # Only the canonical dotted-quad / RFC 4291 forms: no '10/8' or '127.1'
        # shorthands, no zone ids (inet_pton refuses all of them).
        family = AF_INET6 if ":" in addr_part else AF_INET
        inet_pton(family, addr_part)
        if prefix_part:
            # isascii: str.isdigit() also accepts non-ASCII digits such as '٨'.
            if not (prefix_part.isascii() and prefix_part.isdigit()) or (
                len(prefix_part) > 1 and prefix_part[0] == "0"
            ):
                raise ValueError
            bits = int(prefix_part)
            if bits > (32 if family == AF_INET else 128):
                raise ValueError
        net = ipaddress.ip_network(text, strict=False)
    except (ValueError, OSError):
        raise ValueError("is not a network") from None
    if net.network_address != ipaddress.ip_address(addr_part):
        # '100.101.102.103/10' is almost always a typo for a host or for the network.
        raise ValueError(f"has host bits set (did you mean '{net}'?)")
    return net


def unmap_ip(ip: str) -> str:
    """'::ffff:100.1.2.3' -> '100.1.2.3'; strips an IPv6 zone; other text unchanged.

    Cheap and total (never raises): it runs on every accepted connection, on the address
    text getpeername gave. :func:`canonical_ip` is the strict form for text from elsewhere.
    """
    if "%" in ip:
        ip = ip.split("%", 1)[0]
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


def canonical_ip(ip: str) -> str:
    """The canonical text of an address, unmapped and without zone; ValueError otherwise.

    ``::FFFF:0a00:1`` -> ``10.0.0.1``: for addresses that did not come from getpeername
    (tailscaled only unmaps by itself from 1.102, so we always ask it with the plain IPv4).
    """
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def is_loopback(ip: str) -> bool:
    ip = unmap_ip(ip)
    return ip.startswith("127.") or ip == "::1"


def hostport(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets: ``[::1]:18789``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class NetworkSet:
    """Merged, sorted, non-overlapping integer ranges per family."""

    cidrs: tuple[str, ...]
    _v4_starts: tuple[int, ...]
    _v4_ends: tuple[int, ...]
    _v6_starts: tuple[int, ...]
    _v6_ends: tuple[int, ...]

    @classmethod
    def compile(cls, networks: Iterable[Network]) -> NetworkSet:
        nets = list(networks)
        # '::ffff:10.0.0.0/104' style entries also allow the IPv4 peers they map. They are
        # added before merging: the bisect in contains() needs non-overlapping ranges, and
        # merging first could also widen a mapped block past /96 and lose it.
        mapped = [
            ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
            for net in nets
            if net.version == 6 and int(net.network_address) >> 32 == 0xFFFF and net.prefixlen >= 96
        ]
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        v4_nets = [n for n in nets + mapped if isinstance(n, ipaddress.IPv4Network)]
        v6_nets = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
        for net4 in ipaddress.collapse_addresses(v4_nets):
            v4.append((int(net4.network_address), int(net4.broadcast_address)))
        for net6 in ipaddress.collapse_addresses(v6_nets):
            v6.append((int(net6.network_address), int(net6.broadcast_address)))
        v4.sort()
        v6.sort()
        return cls(
            cidrs=tuple(str(n) for n in nets),
            _v4_starts=tuple(a for a, _ in v4),
            _v4_ends=tuple(b for _, b in v4),
            _v6_starts=tuple(a for a, _ in v6),
            _v6_ends=tuple(b for _, b in v6),
        )

    @classmethod
    def from_strings(cls, cidrs: Iterable[str]) -> NetworkSet:
        return cls.compile([parse_network(c) for c in cidrs])

    def __bool__(self) -> bool:
        return bool(self._v4_starts or self._v6_starts)

    def contains(self, ip: object) -> bool:
        """True when ``ip`` (a textual address from getpeername) is inside the set.

        Anything that does not parse is outside, a non-str too: the check fails closed.
        (Typed ``object``: compiled by mypyc, a ``str`` parameter would raise TypeError at
        the call instead.)
        """
        if not isinstance(ip, str):
            return False
        try:
            if ":" in ip:
                packed = inet_pton(AF_INET6, ip.split("%", 1)[0])
                if packed[:12] == _V4_MAPPED_PREFIX:
                    value = int.from_bytes(packed[12:], "big")
                    starts, ends = self._v4_starts, self._v4_ends
                else:
                    value = int.from_bytes(packed, "big")
                    starts, ends = self._v6_starts, self._v6_ends
            else:
                value = int.from_bytes(inet_pton(AF_INET, ip), "big")
                starts, ends = self._v4_starts, self._v4_ends
        except (OSError, ValueError, TypeError):
            return False
        i = bisect.bisect_right(starts, value) - 1
        return i >= 0 and value <= ends[i]

    def __contains__(self, ip: object) -> bool:
        return self.contains(ip)
