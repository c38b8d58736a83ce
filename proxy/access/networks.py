"""allowedNetworks, compiled once at load time into sorted integer ranges.

netaddr parses and merges the configured CIDRs; at accept time a peer address is one
``inet_pton`` + ``int.from_bytes`` and a bisect over plain integers (measured ~0.5 us,
against ~12 us for a netaddr IPSet membership). IPv4-mapped IPv6 peers
(``::ffff:a.b.c.d``, seen on dual-stack sockets) are checked as the IPv4 address they carry.
"""

from __future__ import annotations

import bisect
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import netaddr

__all__ = ["NetworkSet", "parse_network", "unmap_ip", "is_loopback"]

_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


def parse_network(text: str) -> netaddr.IPNetwork:
    """Parse one CIDR (or bare address) strictly; raises ValueError with a short reason."""
    if not isinstance(text, str) or not text or text.strip() != text:
        raise ValueError("is not a network")
    try:
        addr_part, _, prefix_part = text.partition("/")
        # netaddr accepts legacy shorthands such as '10/8' or '127.1'; a security
        # boundary should only accept the canonical dotted-quad / RFC 4291 forms.
        family = socket.AF_INET6 if ":" in addr_part else socket.AF_INET
        socket.inet_pton(family, addr_part)
        if prefix_part:
            # isascii: str.isdigit() also accepts non-ASCII digits such as '٨'.
            if not (prefix_part.isascii() and prefix_part.isdigit()) or (
                    len(prefix_part) > 1 and prefix_part[0] == "0"):
                raise ValueError
            bits = int(prefix_part)
            if bits > (32 if family == socket.AF_INET else 128):
                raise ValueError
        net = netaddr.IPNetwork(text)
    except (ValueError, OSError, netaddr.AddrFormatError):
        raise ValueError("is not a network") from None
    if net.ip != net.network:
        # '100.101.102.103/10' is almost always a typo for a host or for the network.
        raise ValueError(f"has host bits set (did you mean '{net.cidr}'?)")
    return net


def unmap_ip(ip: str) -> str:
    """'::ffff:100.1.2.3' -> '100.1.2.3'; strips an IPv6 zone; other addresses unchanged."""
    if "%" in ip:
        ip = ip.split("%", 1)[0]
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


def is_loopback(ip: str) -> bool:
    ip = unmap_ip(ip)
    return ip.startswith("127.") or ip == "::1"


@dataclass(frozen=True, slots=True)
class NetworkSet:
    """Merged, sorted, non-overlapping integer ranges per family."""

    cidrs: tuple[str, ...]
    _v4_starts: tuple[int, ...]
    _v4_ends: tuple[int, ...]
    _v6_starts: tuple[int, ...]
    _v6_ends: tuple[int, ...]

    @classmethod
    def compile(cls, networks: Iterable[netaddr.IPNetwork]) -> NetworkSet:
        nets = list(networks)
        # '::ffff:10.0.0.0/104' style entries also allow the IPv4 peers they map. They are
        # added before merging: the bisect in contains() needs non-overlapping ranges, and
        # merging first could also widen a mapped block past /96 and lose it.
        mapped = [
            netaddr.IPNetwork((int(net.first) & 0xFFFFFFFF, net.prefixlen - 96), version=4)
            for net in nets
            if net.version == 6 and int(net.first) >> 32 == 0xFFFF and net.prefixlen >= 96
        ]
        merged = netaddr.cidr_merge(nets + mapped)
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for net in merged:
            bucket = v4 if net.version == 4 else v6
            bucket.append((int(net.first), int(net.last)))
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
        return cls.compile(parse_network(c) for c in cidrs)

    def __bool__(self) -> bool:
        return bool(self._v4_starts or self._v6_starts)

    def contains(self, ip: str) -> bool:
        """True when ``ip`` (a textual address from getpeername) is inside the set.

        Anything that does not parse is outside: the check fails closed.
        """
        try:
            if ":" in ip:
                packed = socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
                if packed[:12] == _V4_MAPPED_PREFIX:
                    value = int.from_bytes(packed[12:], "big")
                    starts, ends = self._v4_starts, self._v4_ends
                else:
                    value = int.from_bytes(packed, "big")
                    starts, ends = self._v6_starts, self._v6_ends
            else:
                value = int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
                starts, ends = self._v4_starts, self._v4_ends
        except (OSError, ValueError, TypeError):
            return False
        i = bisect.bisect_right(starts, value) - 1
        return i >= 0 and value <= ends[i]

    __contains__ = contains
