"""The client of tailscaled's LocalAPI: whois, status, the IPN bus stream and cert pairs.

Speaks HTTP/1.1 over tailscaled's unix socket with aiohttp, with the exact ``Host`` the
daemon's CSRF check wants and a timeout on every call (a starting daemon blocks). Every
aiohttp, OS and JSON error is translated here into the ``TailscaleError`` tree.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import quote

import aiohttp
from yarl import URL

from ..core.networks import canonical_ip, hostport
from ..errors import LocalAPIDenied, LocalAPIUnavailable, PeerNotFound, TailscaleError
from .identity import Identity

__all__ = [
    "DEFAULT_SOCKET_PATHS",
    "LOCALAPI_HOST",
    "NOTIFY_INITIAL_STATE",
    "NOTIFY_RATE_LIMIT",
    "LocalAPIClient",
    "Status",
    "find_socket",
    "format_addr",
    "parse_time",
    "peer_path",
    "split_lines",
]

# tailscaled's validHost() accepts exactly this Host (or none); anything else is a 403.
LOCALAPI_HOST: Final = "local-tailscaled.sock"

# Platform defaults, in the order tailscale's own clients try them.
DEFAULT_SOCKET_PATHS: Final[tuple[str, ...]] = (
    "/var/run/tailscale/tailscaled.sock",
    "/run/tailscale/tailscaled.sock",
    "/tmp/tailscaled.sock",  # noqa: S108 - the tailscale/tailscale image's TS_SOCKET default
    "/var/packages/Tailscale/var/tailscaled.sock",
    "/tmp/tailscale/tailscaled.sock",  # noqa: S108 - QNAP package default
    "/var/run/tailscaled.socket",
)

# ipn.NotifyWatchOpt bits used by the monitor.
NOTIFY_INITIAL_STATE: Final = 2
NOTIFY_RATE_LIMIT: Final = 256

DEFAULT_TIMEOUT: Final = 2.0
# The first certificate issuance runs ACME inside the daemon: tens of seconds.
DEFAULT_CERT_TIMEOUT: Final = 120.0

_ZERO_TIME: Final = "0001-01-01T00:00:00Z"
_ERROR_BODY_LIMIT: Final = 4096
_REASON_LIMIT: Final = 160


def find_socket(
    explicit: str | None, candidates: Sequence[str] = DEFAULT_SOCKET_PATHS
) -> str | None:
    """The explicit path as given, else the first platform default that exists, else None."""
    if explicit:
        return explicit
    for path in candidates:
        if os.path.exists(path):
            return path
    return None


def format_addr(ip: str, port: int) -> str:
    """whois ``addr``: ``IP:port``, ``[v6]:port``, or the bare IP when port is 0."""
    plain = canonical_ip(ip)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    if port == 0:
        return plain
    return hostport(plain, port)


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 time from the LocalAPI; None when absent, null or Go's zero time."""
    if value is None or value == "" or value == _ZERO_TIME:
        return None
    if not isinstance(value, str):
        raise ValueError(f"time {value!r} is not a string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"time {value!r} is not RFC 3339") from None
    if parsed.tzinfo is None:
        raise ValueError(f"time {value!r} has no zone")
    if parsed.year <= 1:
        return None
    return parsed


def peer_path(peer: Mapping[str, Any]) -> str:
    """How traffic reaches a peer, from its PeerStatus.

    Only meaningful while ``Active`` (traffic in the last 45 s): ``Relay`` alone is the
    peer's home DERP region, not proof that traffic is relayed.
    """
    if not peer.get("Active"):
        return "idle"
    if peer.get("CurAddr"):
        return "direct"
    if peer.get("PeerRelay"):
        return "peer-relay"
    relay = peer.get("Relay")
    if relay:
        return f"derp:{relay}"
    return "unknown"


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} is not a list of strings")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class Status:
    """The parts of ``/localapi/v0/status`` the proxy uses. Unknown fields are ignored."""

    backend_state: str
    tailscale_ips: tuple[str, ...] = ()
    version: str = ""
    self_dns_name: str | None = None
    key_expiry: datetime | None = None
    expired: bool = False
    cert_domains: tuple[str, ...] = ()
    tun: bool | None = None
    magic_dns_suffix: str = ""
    # Every Tailscale IP of every peer -> "direct" | "peer-relay" | "derp:<region>" |
    # "idle" | "unknown". Empty for ``status(peers=False)``.
    peer_paths: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def running(self) -> bool:
        return self.backend_state == "Running"

    @classmethod
    def from_json(cls, body: Any) -> Status:
        """Build from the decoded JSON; raises ValueError when the shape is wrong."""
        if not isinstance(body, dict):
            raise ValueError("status is not a JSON object")
        state = body.get("BackendState")
        if not isinstance(state, str) or not state:
            raise ValueError("status has no BackendState")
        self_node = body.get("Self")
        if self_node is not None and not isinstance(self_node, dict):
            raise ValueError("status Self is not an object")
        self_node = self_node or {}
        dns_name = self_node.get("DNSName")
        tun = body.get("TUN")
        paths: dict[str, str] = {}
        peers = body.get("Peer")
        if peers is not None:
            if not isinstance(peers, dict):
                raise ValueError("status Peer is not an object")
            for peer in peers.values():
                if not isinstance(peer, dict):
                    raise ValueError("status Peer entry is not an object")
                path = peer_path(peer)
                for ip in _str_list(peer.get("TailscaleIPs"), "peer TailscaleIPs"):
                    paths[ip] = path
        suffix = body.get("MagicDNSSuffix")
        version = body.get("Version")
        return cls(
            backend_state=state,
            tailscale_ips=_str_list(body.get("TailscaleIPs"), "TailscaleIPs"),
            version=version if isinstance(version, str) else "",
            self_dns_name=dns_name.rstrip(".") if isinstance(dns_name, str) and dns_name else None,
            key_expiry=parse_time(self_node.get("KeyExpiry")),
            expired=self_node.get("Expired") is True,
            cert_domains=_str_list(body.get("CertDomains"), "CertDomains"),
            tun=tun if isinstance(tun, bool) else None,
            magic_dns_suffix=suffix if isinstance(suffix, str) else "",
            peer_paths=MappingProxyType(paths),
        )


async def split_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Re-cut a chunked stream into ``\\n``-terminated lines, with NO length limit.

    A chunk is not a line: one line may span many chunks, and daemons up to 1.98 put the
    full netmap (megabytes) in one line, which asyncio's 64 KiB readline limit rejects.
    Each new chunk is scanned once, so a long line costs O(n), not O(n^2). A partial line
    left when the stream ends is dropped: it was cut off, not sent.
    """
    buf = bytearray()
    async for chunk in chunks:
        scan_from = len(buf)
        buf += chunk
        newline = buf.find(b"\n", scan_from)
        if newline < 0:
            continue
        start = 0
        while newline >= 0:
            if newline > start:
                yield bytes(buf[start:newline])
            start = newline + 1
            newline = buf.find(b"\n", start)
        del buf[:start]


def _reason(body: bytes) -> str:
    """The first line of an error body, printable and short: safe to log and to show."""
    text = body[:_ERROR_BODY_LIMIT].decode("utf-8", "replace").strip().split("\n", 1)[0]
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    if len(text) > _REASON_LIMIT:
        text = text[: _REASON_LIMIT - 3] + "..."
    return text


def _status_error(status: int, body: bytes, *, denied: str | None = None) -> TailscaleError:
    reason = _reason(body)
    if status == 403:
        return LocalAPIDenied(denied or reason or "tailscaled answered 403")
    if status == 404:
        return PeerNotFound(reason or "tailscaled answered 404")
    tail = f": {reason}" if reason else ""
    return LocalAPIUnavailable(f"tailscaled answered {status}{tail}")


def _decode_json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise LocalAPIUnavailable(f"tailscaled answered invalid JSON for {what}") from None


_PARSE_INLINE_LIMIT = 64 * 1024


def _parse_status(body: bytes) -> Status:
    try:
        return Status.from_json(_decode_json(body, "status"))
    except ValueError as exc:
        raise LocalAPIUnavailable(f"tailscaled answered malformed status: {exc}") from None


class LocalAPIClient:
    """Async LocalAPI client over one unix socket; one aiohttp session, reused.

    ``socket_path`` None means: the first existing platform default, looked up again on
    each call until one is found (tailscaled may start after us).
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        cert_timeout: float = DEFAULT_CERT_TIMEOUT,
        candidates: Sequence[str] = DEFAULT_SOCKET_PATHS,
    ) -> None:
        if timeout <= 0 or cert_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self._explicit = socket_path
        self._candidates = tuple(candidates)
        self._path: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self.timeout = timeout
        self.cert_timeout = cert_timeout

    @property
    def socket_path(self) -> str | None:
        """The socket in use (or that would be used next)."""
        return self._path or find_socket(self._explicit, self._candidates)

    async def __aenter__(self) -> LocalAPIClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session and its pooled connections (idempotent)."""
        session, self._session, self._path = self._session, None, None
        if session is not None:
            await session.close()

    def _get_session(self) -> tuple[aiohttp.ClientSession, str]:
        if self._session is not None and self._path is not None and not self._session.closed:
            return self._session, self._path
        path = find_socket(self._explicit, self._candidates)
        if path is None:
            raise LocalAPIUnavailable(
                "no tailscaled socket found (tried " + ", ".join(self._candidates) + ")"
            )
        connector = aiohttp.UnixConnector(path=path)
        # Timeouts are per call (asyncio.timeout), so the session itself has none: the IPN
        # bus is a stream that may be silent for hours.
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            headers={"User-Agent": "clawgate"},
        )
        self._path = path
        return self._session, path

    async def _drop_session(self) -> None:
        # Re-resolve the socket next time: tailscaled may come back on another default path.
        if self._explicit is None:
            await self.close()

    def _url(self, path_qs: str) -> URL:
        return URL(f"http://{LOCALAPI_HOST}{path_qs}", encoded=True)

    async def _connect_error(self, exc: BaseException, path: str, timeout: float) -> TailscaleError:
        if isinstance(exc, TimeoutError):
            return LocalAPIUnavailable(f"tailscaled timed out after {timeout}s")
        os_error = getattr(exc, "os_error", exc)
        code = getattr(os_error, "errno", None)
        if code == errno.ENOENT:
            await self._drop_session()
            return LocalAPIUnavailable(f"tailscaled socket {path} missing")
        if code == errno.ECONNREFUSED:
            await self._drop_session()
            return LocalAPIUnavailable(f"tailscaled socket {path} refused the connection")
        if code in (errno.EACCES, errno.EPERM):
            return LocalAPIUnavailable(f"tailscaled socket {path}: permission denied")
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return LocalAPIUnavailable("tailscaled closed the connection")
        detail = getattr(os_error, "strerror", None) or type(exc).__name__
        return LocalAPIUnavailable(f"tailscaled socket {path}: {detail}")

    async def _get(self, path_qs: str, *, timeout: float, denied: str | None = None) -> bytes:
        """GET and return the 200 body; every other outcome becomes a TailscaleError."""
        session, path = self._get_session()
        try:
            async with asyncio.timeout(timeout):
                async with session.get(self._url(path_qs), allow_redirects=False) as resp:
                    if resp.status != 200:
                        body = await resp.content.read(_ERROR_BODY_LIMIT)
                        raise _status_error(resp.status, body, denied=denied)
                    return await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise await self._connect_error(exc, path, timeout) from None

    async def whois(self, ip: str, port: int) -> Identity:
        """Who is behind ``ip:port``. 404 -> PeerNotFound; for tailnet IPs the port is ignored."""
        try:
            addr = format_addr(ip, port)
        except ValueError as exc:
            raise LocalAPIUnavailable(f"cannot ask whois for {ip!r}: {exc}") from None
        try:
            body = await self._get(
                "/localapi/v0/whois?addr=" + quote(addr, safe=""), timeout=self.timeout
            )
        except PeerNotFound:
            # The daemon's text is the literal "no match for IP:port": name the address.
            raise PeerNotFound(f"no match for {addr}") from None
        try:
            return Identity.from_whois(_decode_json(body, "whois"))
        except ValueError as exc:
            raise LocalAPIUnavailable(f"tailscaled answered malformed whois: {exc}") from None

    async def status(self, peers: bool = True) -> Status:
        """Backend state, our addresses, key expiry, cert domains and (optionally) peers."""
        path_qs = "/localapi/v0/status" if peers else "/localapi/v0/status?peers=false"
        body = await self._get(path_qs, timeout=self.timeout)
        if len(body) > _PARSE_INLINE_LIMIT:
            # A large tailnet's full status is megabytes: parsing it on the event loop
            # stalled every connection for 0.3-1 s per poll (measured with 6,000 peers).
            return await asyncio.to_thread(_parse_status, body)
        return _parse_status(body)

    async def cert_pair(self, domain: str, min_validity: str | None = None) -> tuple[bytes, bytes]:
        """(key PEM, certificate chain PEM) for one of ``Status.cert_domains``.

        Needs root, the operator user or TS_PERMIT_CERT_UID: else LocalAPIDenied.
        ``min_validity`` is a Go duration (``"720h"``) that makes the daemon renew early.
        """
        if not domain or "/" in domain or domain.strip() != domain:
            raise ValueError(f"invalid cert domain {domain!r}")
        path_qs = f"/localapi/v0/cert/{quote(domain, safe='')}?type=pair"
        if min_validity:
            path_qs += "&min_validity=" + quote(min_validity, safe="")
        body = await self._get(path_qs, timeout=self.cert_timeout, denied="cert access denied")
        return _split_pair(body)

    async def watch_ipn_bus(self, mask: int) -> AsyncGenerator[dict[str, Any], None]:
        """Yield each ``ipn.Notify`` line of the IPN bus as a dict until the daemon closes it.

        Only the response head is under the timeout: the stream itself may be silent for
        hours. Close the iterator (``contextlib.aclosing``) to release the connection.
        """
        session, path = self._get_session()
        url = self._url(f"/localapi/v0/watch-ipn-bus?mask={int(mask)}")
        try:
            async with asyncio.timeout(self.timeout):
                resp = await session.get(url, allow_redirects=False)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise await self._connect_error(exc, path, self.timeout) from None
        try:
            if resp.status != 200:
                try:
                    async with asyncio.timeout(self.timeout):
                        body = await resp.content.read(_ERROR_BODY_LIMIT)
                except (TimeoutError, aiohttp.ClientError, OSError):
                    body = b""
                raise _status_error(resp.status, body)
            async for line in split_lines(resp.content.iter_any()):
                note = _decode_json(line, "the IPN bus")
                if not isinstance(note, dict):
                    raise LocalAPIUnavailable("tailscaled sent a non-object IPN bus line")
                yield note
        except (aiohttp.ClientError, OSError) as exc:
            raise LocalAPIUnavailable(f"IPN bus connection lost: {type(exc).__name__}") from None
        finally:
            # close(), not release(): the stream never ends by itself.
            resp.close()


def _split_pair(body: bytes) -> tuple[bytes, bytes]:
    # type=pair is the key PEM immediately followed by the certificate chain PEM.
    at = body.find(b"-----BEGIN CERTIFICATE-----")
    key, chain = body[:at], body[at:]
    if at <= 0 or b"PRIVATE KEY-----" not in key or b"-----END CERTIFICATE-----" not in chain:
        raise LocalAPIUnavailable("tailscaled answered a malformed cert pair")
    return key, chain
