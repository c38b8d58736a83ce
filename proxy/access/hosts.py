"""Which ``Host`` values name clawgate: the DNS-rebinding check, pure and table-tested.

A page on ``rebind.attacker.example`` whose name is re-pointed at this node's tailnet
address reaches clawgate from the victim's own device, so identity alone would let it in
as the victim: the browser sends the attacker's name in ``Host``. Like ``tailscale
serve``, clawgate serves only Host values that are one of its own names or addresses
(tailnet IPs, MagicDNS and certificate names, the short host name, loopback and
``gateway.allowedHosts``); the admin listener accepts loopback literals only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

__all__ = [
    "split_host",
    "normalise_name",
    "HostNames",
    "LOOPBACK_NAMES",
    "admin_host_allowed",
    "is_loopback_name",
]

_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_UNSEEN = object()
_SEEN_MAX = 1024


def normalise_name(text: str) -> str | None:
    """A host name or IP literal in canonical form (lower case, one trailing dot and
    IPv6 brackets removed, IPv6 compressed); None when it is neither."""
    if not text or len(text) > 255:
        return None
    if text.startswith("[") and text.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            return None
    if ":" in text:
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            return None
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if _looks_v4(name):
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            return None
    labels = name.split(".")
    if not all(_LABEL_RE.match(label) for label in labels):
        return None
    if labels[-1].isdigit():
        return None  # '1.2.3' or '0x7f.1' shapes: not a name, and not a canonical IP
    return name


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header value -> (canonical name or IP, port or None); None when malformed.

    ``name``, ``name:port``, ``a.b.c.d:port``, ``[v6]`` and ``[v6]:port``; an IPv6
    literal must be bracketed (RFC 9110 ``uri-host``).
    """
    port: int | None = None
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            return None
        host, rest = value[: close + 1], value[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                return None
            port_text = rest[1:]
        else:
            port_text = None
    else:
        host, sep, port_text_s = value.partition(":")
        port_text = port_text_s if sep else None
        if ":" in port_text_s:
            return None  # an unbracketed IPv6 literal, or two ports
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
            return None
        port = int(port_text)
        if not 0 < port <= 65535:
            return None
    name = normalise_name(host)
    if name is None or (":" in name and not host.startswith("[")):
        return None
    return name, port


def is_loopback_name(name: str) -> bool:
    """``localhost``, ``127.0.0.0/8`` or ``::1`` (a canonical name from split_host)."""
    if name == "localhost":
        return True
    if not _is_ip(name):
        return False
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def admin_host_allowed(value: str | None, port: int) -> bool:
    """The admin listener's rule: a loopback literal (or localhost), the admin port."""
    if value is None:
        return False
    parsed = split_host(value)
    if parsed is None:
        return False
    name, got_port = parsed
    return is_loopback_name(name) and got_port in (None, port)


class HostNames:
    """The names and addresses clawgate answers to (canonical forms).

    ``refusal`` remembers its answer per raw Host value (bounded): the Host of every
    request is checked, and a client sends the same few values again and again.
    """

    __slots__ = ("names", "wildcards", "_seen")

    def __init__(self, names: frozenset[str], wildcards: frozenset[str] = frozenset()) -> None:
        self.names = names
        self.wildcards = wildcards  # "*.example.com" (a certificate's name) as "example.com"
        self._seen: dict[bytes, str | None] = {}

    @classmethod
    def build(cls, exact: Iterable[str] = (), with_short: Iterable[str] = ()) -> HostNames:
        """``exact``: names and IPs as given; ``with_short``: MagicDNS and certificate
        names, also served by their first label (MagicDNS search domains resolve it)."""
        out: set[str] = set()
        wild: set[str] = set()
        for item in with_short:
            if (
                item.startswith("*.")
                and (parent := normalise_name(item[2:])) is not None
                and "." in parent
                and not _is_ip(parent)
            ):
                wild.add(parent)
        for item in exact:
            name = normalise_name(item)
            if name is not None:
                out.add(name)
        for item in with_short:
            name = normalise_name(item)
            if name is not None:
                out.add(name)
                if not _is_ip(name) and "." in name:
                    out.add(name.split(".", 1)[0])
        return cls(frozenset(out) | LOOPBACK_NAMES, frozenset(wild))

    def refusal(self, value: bytes | None, local_ip: str = "") -> str | None:
        """None when ``value`` (the Host header) names clawgate, else a short reason.

        ``local_ip`` is the address the connection arrived on: a Host that is that IP
        literal is clawgate by definition (it covers wildcard and loopback listeners).
        No Host at all (HTTP/1.0 only; HTTP/1.1 needs one) cannot come from a browser.
        """
        if value is None:
            return None
        if not local_ip:
            seen = self._seen.get(value, _UNSEEN)
            if seen is not _UNSEEN:
                return seen  # type: ignore[return-value]
            why = self._refusal(value, "")
            if len(self._seen) >= _SEEN_MAX:
                self._seen.clear()
            self._seen[value] = why
            return why
        return self._refusal(value, local_ip)

    def _refusal(self, value: bytes, local_ip: str) -> str | None:
        try:
            text = value.decode("ascii").strip()
        except UnicodeError:
            return "malformed Host"
        parsed = split_host(text)
        if parsed is None:
            return "malformed Host"
        name = parsed[0]
        if name in self.names or is_loopback_name(name):
            return None
        if (
            self.wildcards
            and "." in name
            and name.split(".", 1)[1] in self.wildcards
            and not _is_ip(name)
        ):
            return None
        if local_ip and _is_ip(name) and name == _canonical_ip(local_ip):
            return None
        return "Host does not name this clawgate (DNS rebinding?): add it to gateway.allowedHosts"


def _looks_v4(name: str) -> bool:
    return name.replace(".", "").isdigit() and name.isascii()


def _is_ip(name: str) -> bool:
    # A canonical name from normalise_name: cheap shape tests first (exceptions are slow,
    # and a client can send a new Host on every request).
    if ":" not in name and not _looks_v4(name):
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _canonical_ip(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)
