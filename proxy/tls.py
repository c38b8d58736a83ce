"""HTTPS for clawgate: the server SSLContext, its certificate, renewal, and the redirect port.

``setup_tls`` builds one context (TLS 1.2+, Mozilla "intermediate" ciphers, ALPN
``http/1.1``) and loads either the configured files or this node's certificate from
tailscaled's LocalAPI. A background task re-checks the certificate and swaps a new one into
the SAME context, so new handshakes get it while live sessions are untouched; a failed
renewal keeps the old certificate and warns (log and /health) with the days left. The
optional redirect listener answers every plain-HTTP request with a 308 to the HTTPS name.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import os
import pwd
import re
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from .core.networks import hostport
from .errors import ClawgateError, LocalAPIDenied, TailscaleError
from .runtime import Runtime

__all__ = [
    "INTERMEDIATE_CIPHERS",
    "CertInfo",
    "RedirectConnection",
    "TlsManager",
    "cert_denied_message",
    "load_pair",
    "make_server_context",
    "parse_chain",
    "parse_go_duration",
    "redirect_location",
    "setup_tls",
    "TlsAcceptor",
]

log = logging.getLogger("clawgate")

# Mozilla Server Side TLS "intermediate" (v5.7), TLS 1.2 part; the DHE suites are left out
# because no DH parameters are loaded (OpenSSL would never pick them). TLS 1.3 suites are
# OpenSSL's defaults, which are the same three Mozilla lists.
INTERMEDIATE_CIPHERS: Final = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
ALPN: Final = ["http/1.1"]
ADMIN_DNS_URL: Final = "https://login.tailscale.com/admin/dns"
_REDIRECT_HEAD_LIMIT: Final = 8192
_GO_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
# RFC 3986 characters allowed in a path+query we echo into Location: no CTLs, spaces,
# quotes or backslashes, so nothing can split the header or smuggle a scheme.
_SAFE_TARGET = re.compile(rb"^/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*$")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration of hours/minutes/seconds (``720h``, ``1h30m``)."""
    m = _GO_DURATION.match(text)
    if not m or not text:
        raise ValueError(f"{text!r} is not a duration like '720h'")
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    return h * 3600.0 + mi * 60.0 + s


def make_server_context() -> ssl.SSLContext:
    """The server context, without a certificate yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    # Only HTTP/1.1: the splice cannot speak h2, so a client offering only h2 gets no ALPN.
    ctx.set_alpn_protocols(ALPN)
    # Client-initiated renegotiation is a cheap CPU DoS; compression is CRIME.
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    return ctx


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What clawgate tells about the certificate it serves."""

    serial: int
    not_after: dt.datetime
    names: tuple[str, ...]
    fingerprint: str  # sha256 of the leaf DER, hex

    def seconds_left(self, now: float | None = None) -> float:
        return self.not_after.timestamp() - (time.time() if now is None else now)

    def days_left(self, now: float | None = None) -> float:
        return self.seconds_left(now) / 86400.0

    def covers(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        for n in self.names:
            n = n.lower()
            if n == name:
                return True
            if n.startswith("*.") and "." in name and name.split(".", 1)[1] == n[2:]:
                return True
        return False

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": f"{self.serial:x}",
            "not_after": self.not_after.isoformat(),
            "names": list(self.names),
            "sha256": self.fingerprint,
        }


def parse_chain(chain_pem: bytes) -> CertInfo:
    """The leaf (first certificate) of a PEM chain; ClawgateError when it is not one."""
    try:
        leaf = x509.load_pem_x509_certificate(chain_pem)
    except ValueError as exc:
        raise ClawgateError(f"not a PEM certificate: {exc}") from None
    names: list[str] = []
    with contextlib.suppress(x509.ExtensionNotFound):
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [str(n) for n in san.value.get_values_for_type(x509.DNSName)]
    if not names:
        names = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    from cryptography.hazmat.primitives.serialization import Encoding

    der = leaf.public_bytes(Encoding.DER)
    return CertInfo(
        leaf.serial_number, leaf.not_valid_after_utc, tuple(names), hashlib.sha256(der).hexdigest()
    )


def _private_dir() -> str:
    # RAM-backed when possible: the key never reaches a disk, even for a millisecond.
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else None  # noqa: S108
    return tempfile.mkdtemp(prefix="clawgate-tls-", dir=base)  # mode 0700


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def load_pair(ctx: ssl.SSLContext, key_pem: bytes, chain_pem: bytes) -> CertInfo:
    """Load a key and chain into ``ctx``; on any error ``ctx`` is left as it was.

    ``load_cert_chain`` only reads files, so the PEMs go to a private temporary directory
    (0700, files 0600) that is removed at once. They are first loaded into a scratch
    context: OpenSSL drops the old key when a new certificate does not match it, so a bad
    pair loaded straight into the live context would leave it unable to handshake.
    """
    info = parse_chain(chain_pem)
    tmp = _private_dir()
    try:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        _write_private(cert_path, chain_pem)
        _write_private(key_path, key_pem)
        try:
            make_server_context().load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise ClawgateError(
                f"certificate and key do not load together: {exc.reason or exc}"
            ) from None
        ctx.load_cert_chain(cert_path, key_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def _current_user() -> tuple[str, int]:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name, uid
    except KeyError:
        return str(uid), uid


def cert_denied_message() -> str:
    """The one line clawgate prints when tailscaled refuses the certificate (403)."""
    user, uid = _current_user()
    return (
        f"tailscaled refused this node's TLS certificate (403 cert access denied): clawgate "
        f"runs as {user} (uid {uid}), which may not fetch certificates; fix it with one of: "
        f"run clawgate as root, or `sudo tailscale set --operator={user}`, or set "
        f"TS_PERMIT_CERT_UID={user} in tailscaled's environment (e.g. /etc/default/tailscaled) "
        f"and restart tailscaled"
    )


def _https_port_suffix(port: int) -> str:
    return "" if port == 443 else f":{port}"


def redirect_location(request_line: bytes, name: str, port: int) -> bytes | None:
    """``Location`` for one request line, or None when the line is not HTTP.

    The host is always clawgate's own HTTPS name, never the client's ``Host`` (that would
    be an open redirect); an absolute-form or odd target goes to ``/``.
    """
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith(b"HTTP/1."):
        return None
    target = parts[1]
    if not _SAFE_TARGET.match(target) or target.startswith(b"//"):
        target = b"/"
    return f"https://{name}{_https_port_suffix(port)}".encode("ascii") + target


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's own SSL protocol (what ``create_server(ssl=)`` wraps each client in)."""
    uv = sys.modules.get("uvloop.loop")  # loaded by the CLI when it installs uvloop
    if uv is not None and isinstance(loop, uv.Loop):
        return uv.SSLProtocol
    import asyncio.sslproto

    return asyncio.sslproto.SSLProtocol


class TlsAcceptor(asyncio.Protocol):
    """The first protocol of a connection on an HTTPS listener.

    The listener is plain TCP, so the allowedNetworks check runs in ``connection_made``
    on the raw connection: a refused source is reset before any TLS work (no
    ServerHello, no handshake CPU). An allowed one gets the loop's SSL protocol wrapped
    around a ``ClientConnection``, exactly what ``create_server(ssl=)`` would have built,
    with the handshake bounded by the head deadline. (``loop.start_tls`` cannot be used
    here: it runs in a task, and uvloop starts reading right after ``connection_made``,
    so the ClientHello could arrive before the handshake exists.)
    """

    __slots__ = ("rt", "ctx")

    def __init__(self, rt: Runtime, ctx: ssl.SSLContext) -> None:
        self.rt = rt
        self.ctx = ctx

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from .front import ClientConnection

        rt = self.rt
        peer = transport.get_extra_info("peername")
        ip = peer[0] if peer else ""
        if not rt.networks.contains(ip):
            # ClientConnection's refusal, only before the handshake: RST, nothing said.
            rt.metrics.accepted += 1
            rt.metrics.refused["network"] += 1
            transport.abort()  # type: ignore[attr-defined]
            rt.log.refused({"event": "refused", "peer": ip, "reason": "network not allowed"})
            return
        waiter = rt.loop.create_future()
        ssl_protocol = _ssl_protocol_class(rt.loop)(
            rt.loop,
            ClientConnection(rt, tls=True),
            self.ctx,
            waiter,
            server_side=True,
            server_hostname=None,
            ssl_handshake_timeout=rt.cfg.limits.head_timeout,
        )
        # Swapped in before the transport starts reading: every byte goes to TLS.
        transport.set_protocol(ssl_protocol)
        ssl_protocol.connection_made(transport)
        waiter.add_done_callback(lambda fut: self._handshake_done(transport, fut))

    def _handshake_done(self, transport: asyncio.BaseTransport, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            # Failed, timed out (ConnectionAbortedError) or the peer left mid-handshake.
            self.rt.metrics.refused["tls_handshake"] += 1
            transport.abort()  # type: ignore[attr-defined]


class RedirectConnection(asyncio.Protocol):
    """One plain-HTTP connection on the redirect port: read the head, answer 308, close.

    Nothing is proxied; the network check still runs first, like on the main port.
    """

    def __init__(self, rt: Runtime, target: Callable[[], tuple[str, int]]) -> None:
        self.rt = rt
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        ip = peer[0] if peer else ""
        if not self.rt.networks.contains(ip):
            transport.abort()  # type: ignore[attr-defined]
            return
        self.transport = transport  # type: ignore[assignment]
        self.timer = self.rt.loop.call_later(self.rt.cfg.limits.head_timeout, self._timeout)

    def data_received(self, data: bytes) -> None:
        if self.done or self.transport is None:
            return
        self.buf += data
        buf = self.buf
        name, port = self.target()
        # Not HTTP at all (a TLS ClientHello, binary): say so at once.
        line, crlf, _ = buf.partition(b"\r\n")
        location = redirect_location(line, name, port) if crlf and len(line) <= 4096 else None
        bad = not buf[:1].isupper() or (crlf and location is None) or (not crlf and len(buf) > 4096)
        # Else wait for the whole head so the close does not RST an unread request.
        if not bad and b"\r\n\r\n" not in buf and len(buf) <= _REDIRECT_HEAD_LIMIT:
            return
        if bad or location is None:
            self._answer(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 12\r\nConnection: close\r\n\r\nbad request\n"
            )
            return
        body = b"use HTTPS: " + location + b"\n"
        self._answer(
            b"HTTP/1.1 308 Permanent Redirect\r\nLocation: "
            + location
            + b"\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )

    def _answer(self, data: bytes) -> None:
        self.done = True
        if self.transport is not None:
            self.transport.write(data)
            self.transport.close()
        self._cancel()

    def _timeout(self) -> None:
        self.timer = None
        if self.transport is not None and not self.done:
            self.done = True
            self.transport.abort()

    def _cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()


class TlsManager:
    """Owns the live SSLContext's certificate: first load, periodic checks, swaps, status."""

    def __init__(self, rt: Runtime, ctx: ssl.SSLContext) -> None:
        self.rt = rt
        self.ctx = ctx
        tls = rt.cfg.tls
        self.mode = tls.mode
        self.domain: str | None = tls.domain
        self.min_validity = tls.min_validity
        self.min_validity_s = parse_go_duration(tls.min_validity)
        self.current: CertInfo | None = None
        self.last_check: float | None = None
        self.last_error: str | None = None
        self.renewals = 0
        self._lock = asyncio.Lock()
        self.redirect_servers: list[asyncio.base_events.Server] = []

    # ------------------------------------------------------------------ fetching

    async def _fetch(self) -> tuple[bytes, bytes]:
        if self.mode == "files":
            cfg = self.rt.cfg.tls
            assert cfg.cert_file is not None and cfg.key_file is not None
            try:
                with open(cfg.cert_file, "rb") as fh:
                    chain = fh.read(1 << 20)
                with open(cfg.key_file, "rb") as fh:
                    key = fh.read(1 << 20)
            except OSError as exc:
                path = exc.filename or cfg.cert_file
                raise ClawgateError(f"cannot read {path}: {exc.strerror}") from None
            return key, chain
        client = self.rt.localapi
        if client is None:
            raise ClawgateError(
                "tls is 'tailscale' but no tailscaled socket was found: start tailscaled, "
                "or set tailscale.socket"
            )
        assert self.domain is not None
        try:
            pair: tuple[bytes, bytes] = await client.cert_pair(self.domain, self.min_validity)
        except LocalAPIDenied:
            raise ClawgateError(cert_denied_message()) from None
        except TailscaleError as exc:
            raise ClawgateError(
                f"cannot fetch the TLS certificate for {self.domain} from tailscaled: {exc}"
            ) from None
        return pair

    async def resolve_domain(self) -> str:
        """The certificate name: tls.domain, else the first of status CertDomains."""
        client = self.rt.localapi
        if client is None:
            raise ClawgateError(
                "tls is 'tailscale' but no tailscaled socket was found: start tailscaled, "
                "or set tailscale.socket"
            )
        try:
            status = await client.status(peers=False)
        except TailscaleError as exc:
            raise ClawgateError(f"cannot fetch the TLS certificate: tailscaled: {exc}") from None
        if not status.running:
            raise ClawgateError(
                f"cannot fetch the TLS certificate: tailscale is {status.backend_state}, "
                "not Running (log in with `tailscale up`)"
            )
        domains = list(status.cert_domains)
        if not domains:
            raise ClawgateError(
                "this tailnet does not issue HTTPS certificates: enable HTTPS Certificates "
                f"(with MagicDNS) in the tailnet's admin console, {ADMIN_DNS_URL}"
            )
        if self.domain is not None:
            if self.domain.rstrip(".").lower() not in (d.lower() for d in domains):
                raise ClawgateError(
                    f"tls.domain: {self.domain!r} is not one of this node's certificate "
                    f"domains ({', '.join(domains)})"
                )
            return str(self.domain).rstrip(".")
        return str(domains[0])

    def _validate(self, info: CertInfo) -> None:
        if self.mode == "tailscale" and self.domain and not info.covers(self.domain):
            raise ClawgateError(f"the certificate names {', '.join(info.names)}, not {self.domain}")

    async def initial(self) -> CertInfo:
        if self.mode == "tailscale":
            self.domain = await self.resolve_domain()
        key, chain = await self._fetch()
        try:
            info = parse_chain(chain)
            self._validate(info)
            info = load_pair(self.ctx, key, chain)
        except ClawgateError as exc:
            where = self.domain if self.mode == "tailscale" else self.rt.cfg.tls.cert_file
            raise ClawgateError(f"TLS certificate for {where}: {exc}") from None
        self.current = info
        self.last_check = time.time()
        if self.domain is None and info.names:
            self.domain = info.names[0].removeprefix("*.")
        days = info.days_left()
        log.info(
            "TLS certificate for %s: serial %x, valid until %s (%.1f days)",
            ", ".join(info.names),
            info.serial,
            info.not_after.isoformat(),
            days,
        )
        if days < self.min_validity_s / 86400 / 2:
            log.warning("%s", self._expiry_warning(info))
        return info

    # ------------------------------------------------------------------ renewal

    async def check(self, why: str = "timer") -> bool:
        """Fetch again; swap when the certificate changed. Returns True when swapped."""
        async with self._lock:
            self.last_check = time.time()
            try:
                key, chain = await self._fetch()
                info = parse_chain(chain)
                if self.current is not None and info.fingerprint == self.current.fingerprint:
                    self.last_error = None
                    self._warn_if_expiring()
                    return False
                self._validate(info)
                if info.seconds_left() <= 0:
                    raise ClawgateError(
                        f"the new certificate expired on {info.not_after.isoformat()}"
                    )
                info = load_pair(self.ctx, key, chain)
            except ClawgateError as exc:
                self._failed(str(exc), why)
                return False
            old, self.current = self.current, info
            self.last_error = None
            self.renewals += 1
            log.info(
                "TLS certificate renewed (%s): serial %x -> %x, valid until %s",
                why,
                old.serial if old else 0,
                info.serial,
                info.not_after.isoformat(),
            )
            self.rt.log.write(
                {
                    "event": "tls",
                    "result": "renewed",
                    "why": why,
                    "serial": f"{info.serial:x}",
                    "not_after": info.not_after.isoformat(),
                }
            )
            return True

    def _failed(self, error: str, why: str) -> None:
        self.last_error = error
        cur = self.current
        days = round(cur.days_left(), 1) if cur is not None else None
        log.warning(
            "TLS certificate renewal failed (%s): %s; keeping the current certificate, "
            "which expires in %s days",
            why,
            error,
            days,
        )
        self.rt.log.write(
            {
                "event": "tls",
                "result": "renewal_failed",
                "why": why,
                "error": error,
                "days_left": days,
            }
        )

    def _expiry_warning(self, info: CertInfo) -> str:
        days = info.days_left()
        if days <= 0:
            return f"TLS certificate for {', '.join(info.names)} EXPIRED {-days:.1f} days ago"
        return (
            f"TLS certificate for {', '.join(info.names)} expires in {days:.1f} days "
            f"and was not renewed"
        )

    def _warn_if_expiring(self) -> None:
        cur = self.current
        if cur is not None and cur.days_left() < self.min_validity_s / 86400 / 2:
            log.warning("%s", self._expiry_warning(cur))

    async def run(self) -> None:
        """The renewal loop; the interval is re-read each round so a reload can change it."""
        while True:
            await asyncio.sleep(self.rt.cfg.tls.renew_check_seconds)
            await self.check("timer")

    def on_reload(self) -> None:
        self.rt.spawn(self.check("reload"), "tls-reload")

    # ------------------------------------------------------------------ health

    def status(self) -> dict[str, Any]:
        cur = self.current
        out: dict[str, Any] = {
            "mode": self.mode,
            "domain": self.domain,
            "renewals": self.renewals,
            "last_error": self.last_error,
            "last_check": self.last_check,
        }
        if cur is not None:
            out["certificate"] = cur.to_json()
            out["days_left"] = round(cur.days_left(), 2)
        warning = None
        if cur is not None and self.last_error is not None:
            warning = (
                f"TLS certificate renewal failed ({self.last_error}); keeping the "
                f"current certificate, which expires in {cur.days_left():.1f} days"
            )
        elif cur is not None and cur.days_left() < self.min_validity_s / 86400 / 2:
            warning = self._expiry_warning(cur)
        if warning is not None:
            out["warning"] = warning
        return out

    # ------------------------------------------------------------------ redirect

    def redirect_target(self) -> tuple[str, int]:
        return self.domain or "localhost", self.rt.cfg.gateway.port

    async def listen_redirect(self, host: str) -> None:
        """Bind the redirect port on ``host`` (one of the HTTPS listener's addresses)."""
        port = self.rt.cfg.tls.redirect_port
        if port is None:
            return
        from .system import listen_socket

        addr = hostport(host, port)
        try:
            sock = listen_socket(host, port, reuse_port=self.rt.cfg.workers > 1, freebind=True)
        except OSError as exc:
            raise ClawgateError(
                f"tls.redirectPort: cannot listen on {addr}: {exc.strerror}"
            ) from None
        srv = await self.rt.loop.create_server(
            lambda: RedirectConnection(self.rt, self.redirect_target), sock=sock, backlog=512
        )
        self.redirect_servers.append(srv)
        self.rt.servers.append(srv)  # closed with the others on drain
        log.info(
            "redirecting http://%s to https://%s%s",
            addr,
            self.domain or "localhost",
            _https_port_suffix(self.rt.cfg.gateway.port),
        )


async def setup_tls(rt: Runtime) -> ssl.SSLContext:
    """Build the server context with its first certificate and start renewal.

    Every startup problem is one ClawgateError line (the CLI exits 1), never a traceback.
    """
    ctx = make_server_context()
    mgr = TlsManager(rt, ctx)
    await mgr.initial()
    rt.tls_status = mgr.status
    # The certificate's names are clawgate's names (Host check): they follow renewals.
    rt.tls_names = lambda: mgr.current.names if mgr.current is not None else ()
    rt.reload_callbacks.append(mgr.on_reload)
    if rt.cfg.tls.redirect_port is not None:
        rt.listen_hooks.append(mgr.listen_redirect)
    rt.spawn(mgr.run(), "tls-renew")
    return ctx
