"""The running process's state: the config snapshot in force and the registry around it.

``Snapshot`` is what a reload swaps at once: the config and everything derived from it
(compiled networks, token set, JWT verifier, authorizer), frozen; a reload builds a whole
new one and swaps it in one assignment, a bad config leaves the old one in place.
``Runtime`` is the registry every connection sees: the snapshot in force, the live
connections and tasks, counters, the access log, admission and the lockout table, and the
per-connection bookkeeping over them (admit, lockouts, Host check, log lines, close).
Starting and stopping all this (listeners, signals, drain, the sweep) is ``proxy.serve``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from .access.hosts import HostNames
from .accesslog import AccessLog, close_fields, decision_fields
from .authz import GATEWAY_TOKEN_NAME, Authorizer, Grant, Peer
from .config import HOST_TAILSCALE, Config, load_config
from .core.admission import LOCKED_OUT, OVER_IDENTITY, Admission
from .core.http1 import RequestHead
from .core.networks import NetworkSet
from .core.policy import IdentityLike, check_identity
from .core.sessions import (
    LockoutTable,
    LockoutTableLike,
    SessionStore,
    SessionStoreLike,
    lockout_key,
)
from .core.tokens import Credential, TokenEntry, TokenSet, digest
from .errors import (
    ClawgateError,
    ConfigError,
    MisdirectedRequest,
    TokenStoreError,
    TooManyRequests,
)
from .keystore import TokenFile
from .metrics import Metrics
from .system import fd_connection_cap, sd_notify
from .tasks import spawn

if TYPE_CHECKING:
    from .access.jwt import JwtVerifier
    from .shared_state import SharedState
    from .tailscale import IdentityCache, LocalAPIClient, TailscaleMonitor

__all__ = [
    "Runtime",
    "Snapshot",
    "Connection",
    "Gate",
    "WorkerLink",
    "build_authorizer_inputs",
    "read_secret",
]

log = logging.getLogger("clawgate")
# The gateway's token is a shared secret the tailnet can guess at (first-frame gate, login
# form): shorter than this is refused at load and on reload.
MIN_GATEWAY_TOKEN_BYTES = 32


# What the registry needs of the objects it holds, as Protocols: the modules that make
# them (front, gate, workers) import this one, so it cannot import them, not even for
# annotations (tests/unit/test_core_imports.py counts those edges too).


class Connection(Peer, Protocol):
    """A live client connection as the registry sees it (front.ClientConnection is one):
    what the recheck, the sweep, drain, /connections and the close bookkeeping use."""

    counted_ip: bool
    unauth_counted: bool
    counted_identity: str | None

    @property
    def closed(self) -> bool: ...
    @property
    def close_reason(self) -> str: ...
    @property
    def is_tunnel(self) -> bool: ...
    @property
    def was_tunnel(self) -> bool: ...
    @property
    def requests(self) -> int: ...
    @property
    def bytes_up(self) -> int: ...
    @property
    def bytes_down(self) -> int: ...
    def age(self) -> float: ...
    def end_session(self, code: int, reason: str) -> None: ...
    def close_if_idle(self, reason: str) -> None: ...
    def _abort(self, reason: str) -> None: ...


class Gate(Protocol):
    """What front does with a first-frame gate (gate.FirstFrameGate is one)."""

    def feed(self, data: bytes) -> None: ...
    def cancel(self) -> None: ...


class WorkerLink(Protocol):
    """workers > 1: this worker's channel to the parent (workers.WorkerControl is one)."""

    async def reload_all(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def read_secret(path: str | None, env: str | None, what: str) -> bytes | None:
    """A secret from a file (first line, stripped) or an environment variable."""
    if path:
        try:
            st = os.stat(path)
            with open(path, "rb") as fh:
                value = fh.read(65536).strip()
        except OSError as exc:
            raise ConfigError(f"{what}.file", f"cannot read {path}: {exc.strerror}") from None
        if st.st_mode & 0o077:
            log.warning(
                "%s file %s is readable by group/others (mode %o): chmod 600 it",
                what,
                path,
                st.st_mode & 0o777,
            )
        if not value:
            raise ConfigError(f"{what}.file", f"{path} is empty")
        return value.splitlines()[0]
    if env:
        value_s = os.environ.get(env)
        if not value_s:
            raise ConfigError(f"{what}.env", f"environment variable {env} is not set")
        return value_s.strip().encode()
    return None


def build_authorizer_inputs(cfg: Config) -> tuple[TokenSet, bytes | None]:
    """Load the static tokens (file + env) and the gateway token for a config."""
    try:
        entries = TokenFile(cfg.tokens.file).load(missing_ok=True)
    except TokenStoreError as exc:
        raise ConfigError("tokens.file", str(exc)) from None
    for var in cfg.tokens.env:
        value = os.environ.get(var)
        if not value:
            raise ConfigError("tokens.env", f"environment variable {var} is not set")
        entries.append(TokenEntry(f"env:{var}", digest(value.strip())))
    gw = read_secret(cfg.gateway_token.file, cfg.gateway_token.env, "gatewayToken")
    if gw is not None and len(gw) < MIN_GATEWAY_TOKEN_BYTES:
        key = "gatewayToken.file" if cfg.gateway_token.file else "gatewayToken.env"
        raise ConfigError(
            key,
            f"the gateway token is {len(gw)} bytes; at least "
            f"{MIN_GATEWAY_TOKEN_BYTES} bytes are needed (e.g. "
            "`openssl rand -hex 32`)",
        )
    return TokenSet(entries), gw


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """A validated config and what is derived from it: swapped in, or out, as one."""

    cfg: Config
    networks: NetworkSet
    tokens: TokenSet
    jwt: JwtVerifier | None
    authz: Authorizer


class Runtime:
    """The registry of one proxy process, around the snapshot in force (``snap``)."""

    def __init__(
        self, cfg: Config, loop: asyncio.AbstractEventLoop, shared: SharedState | None = None
    ) -> None:
        self.loop = loop
        self.metrics = Metrics()
        self.conns: set[Connection] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.log = AccessLog(cfg.log.access, cfg.log.refused_per_second)
        # Login sessions and lockouts: in this process, or (workers > 1) the parent's
        # store shared by every worker (proxy.shared_state.SharedState).
        self.shared = shared
        self.sessions: SessionStoreLike = (
            shared.sessions if shared is not None else SessionStore(cfg.tokens.session_ttl)
        )
        self.lockouts: LockoutTableLike = shared.lockouts if shared is not None else LockoutTable()
        # tailscaled, when there is one (proxy.tailscale_runtime.attach_tailscale).
        self.identity_cache: IdentityCache | None = None
        self.monitor: TailscaleMonitor | None = None
        self.localapi: LocalAPIClient | None = None
        self.identity_present = False
        self.admission = Admission()
        # Each proxied connection holds two descriptors (client + gateway): refuse with a
        # 503 before accept() itself fails with EMFILE, where nothing can be answered.
        self.fd_connection_cap = fd_connection_cap()
        self.last_sessions_ended = 0
        self.draining = False
        self.started = time.time()
        self.reloads = 0
        self.last_reload_error: str | None = None
        self.listen_addresses: list[str] = []
        self.servers: list[asyncio.base_events.Server] = []
        self.gate_factory: Callable[[Connection], Gate] | None = None
        self.on_tailnet_addresses: Callable[[list[str]], object] | None = None
        # Hooks of optional modules (tls.py): run on SIGHUP/reload, and per bound listen
        # host (e.g. the HTTP->HTTPS redirect port on the same addresses); /health detail.
        self.reload_callbacks: list[Callable[[], object]] = []
        self.listen_hooks: list[Callable[[str], Awaitable[None]]] = []
        self.tls_status: Callable[[], dict[str, Any]] | None = None
        self.tls_names: Callable[[], tuple[str, ...]] | None = None
        # With workers > 1: the channel to the parent, through which the admin's
        # /-/reload reaches every worker.
        self.worker_control: WorkerLink | None = None
        self._host_names = HostNames(frozenset())
        self._host_key: tuple[object, ...] = ()
        # The token and identity fields of log lines, JSON-encoded once per (token name,
        # identity, peer path): encoding them was ~40% of the log's cost, 2 lines a connection.
        self._log_tails: dict[tuple[object, ...], tuple[object, str]] = {}
        # Until apply_config (before any listener exists): the config without its secrets,
        # so nothing needing a credential could be granted even if something asked.
        empty = TokenSet([])
        self.snap = Snapshot(
            cfg,
            cfg.gateway.allowed_networks,
            empty,
            None,
            Authorizer(cfg, empty, self.sessions, identity=None, identity_present=False),
        )

    # The snapshot in force, read afresh on every access (a reload swaps ``snap``).

    @property
    def cfg(self) -> Config:
        return self.snap.cfg

    @property
    def networks(self) -> NetworkSet:
        return self.snap.networks

    @property
    def authz(self) -> Authorizer:
        return self.snap.authz

    # ------------------------------------------------------------------ config

    def apply_config(self, cfg: Config) -> None:
        """Build everything derived from ``cfg`` and swap it in; raises on a bad config."""
        self._swap(self._build(cfg))

    def _build(self, cfg: Config) -> Snapshot:
        """Everything derived from ``cfg``, not yet in force; raises on a bad config."""
        tokens, gw_token = build_authorizer_inputs(cfg)
        jwt = None
        if cfg.jwt.enabled:
            from .access.jwt import JwtVerifier  # optional module (issue: JWT)

            # previous: an unchanged JWKS URL keeps its fetched keys and cooldown.
            jwt = JwtVerifier.from_config(cfg.jwt, loop=self.loop, previous=self.snap.jwt)
        authz = Authorizer(
            cfg,
            tokens,
            self.sessions,
            identity=self.identity_cache,
            identity_present=self.identity_present,
            jwt=jwt,
            gateway_token=gw_token,
            revoked=jwt.revoked_reason if jwt is not None else None,
        )
        return Snapshot(cfg, cfg.gateway.allowed_networks, tokens, jwt, authz)

    def _swap(self, new: Snapshot) -> None:
        # One assignment, nothing awaited around it: connections see old or new.
        self.snap = new
        self.sessions.ttl = new.cfg.tokens.session_ttl
        # A session lives only while the secret that opened it is configured (not just
        # a token of that name: revoked and re-created, or a rotated gateway token).
        authz = new.authz
        self.sessions.revoke_unbound(lambda s: authz.bound_name(s.binding) == s.token_name)

    def reload(self) -> bool:
        """Re-read the config file and tokens; keep the old config on any error."""
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={int(time.monotonic() * 1e6)}")
        prepared = self.prepare_reload()
        if prepared is None:
            sd_notify("READY=1\nSTATUS=reload refused: " + str(self.last_reload_error)[:200])
            return False
        self.commit_reload(prepared)
        sd_notify("READY=1\nSTATUS=serving")
        return True

    def prepare_reload(self) -> Snapshot | None:
        """Phase one of a reload: read and validate everything, change nothing.

        None when refused (``last_reload_error`` says why). With ``workers > 1`` the
        parent asks every worker to prepare, and only when all could does it tell them
        to commit: a config one worker refuses is applied by none.
        """
        for callback in self.reload_callbacks:
            callback()  # e.g. re-fetch the TLS certificate, even if the config is refused
        try:
            cfg = load_config(self.cfg.source) if self.cfg.source else self.cfg
            if (cfg.gateway.hosts, cfg.gateway.port) != (
                self.cfg.gateway.hosts,
                self.cfg.gateway.port,
            ):
                log.warning("gateway.host/port changed: restart clawgate to move listeners")
            return self._build(cfg)
        except ClawgateError as exc:
            self.reload_refused(str(exc))
            return None

    def reload_refused(self, error: str) -> None:
        self.last_reload_error = error
        log.error("reload refused, keeping the running config: %s", error)
        self.log.write({"event": "reload", "result": "refused", "error": error})

    def commit_reload(self, prepared: Snapshot) -> int:
        """Phase two: put a prepared config in force; returns the live sessions ended."""
        self._swap(prepared)
        self.reloads += 1
        self.last_reload_error = None
        ended = self.recheck_sessions()
        self.last_sessions_ended = ended
        self.log.write({"event": "reload", "result": "ok", "sessions_ended": ended})
        log.info("config reloaded (%d live sessions ended)", ended)
        return ended

    def recheck_sessions(self) -> int:
        """End live sessions the current config would refuse. Returns how many."""
        ended = 0
        now = time.time()
        for conn in list(self.conns):
            grant = conn.grant
            if grant is None or conn.closed or conn.close_reason:
                continue  # close_reason set: already being ended
            why = self.session_invalid_reason(conn, grant, now)
            if why is not None:
                ended += 1
                self.log.write(
                    {
                        "event": "session_ended",
                        "conn": conn.conn_id,
                        "peer": conn.peer_ip,
                        "reason": why,
                    }
                )
                conn.end_session(1008, why)
        return ended

    def session_invalid_reason(self, conn: Connection, grant: Grant, now: float) -> str | None:
        if not self.networks.contains(conn.peer_ip):
            return "network no longer allowed"
        cred = grant.credential
        authz = self.authz
        if cred is not None:
            if cred.binding is not None:
                # Static token, gateway token (Bearer or verified first frame), login
                # session: the very secret that was verified must still be configured.
                if authz.bound_name(cred.binding) != _bound_as(cred):
                    return f"token {_bound_as(cred)} revoked"
            elif cred.kind in ("token", "session"):
                return f"token {cred.name} revoked"  # never granted without a binding
            if (
                cred.kind == "session"
                and cred.session is not None
                and self.sessions.get(cred.session) is None
            ):
                return "logged out"
            if cred.expires_at is not None and cred.expires_at <= now:
                return f"credential {cred.name} expired"
            if authz.revoked is not None and cred.kind == "jwt":
                why = authz.revoked(cred)
                if why is not None:
                    return why
        elif (
            authz.settings.require_token
            and grant.decision.reason != "exempt path"
            and authz.settings.auth_mode == "both"
        ):
            return "a token is now required"
        if grant.identity is not None and authz.settings.require_identity:
            why = check_identity(grant.identity, authz.settings)
            if why is not None:
                return why
        return None

    # ------------------------------------------------------------------ tasks

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A background task of this process: held in rt.tasks, a failure logged."""
        return spawn(coro, name, self.tasks, loop=self.loop, on_error=_log_task_error)

    # ------------------------------------------------------------------ admission

    def admit(self, conn: Connection) -> tuple[int, str, int | None] | None:
        refusal = self.admission.admit(
            conn.peer_ip,
            self.cfg.limits,
            active=self.metrics.active,
            fd_cap=self.fd_connection_cap,
            draining=self.draining,
            lockouts=self.lockouts,
            loopback=conn.is_loopback_peer,
        )
        if refusal is not None:
            key, status, reason, retry = refusal
            if key:
                self.metrics.refused[key] += 1
            return status, reason, retry
        conn.counted_ip = True
        conn.unauth_counted = True
        return None

    def decided(self, conn: Connection) -> None:
        """The connection got its first allow: it no longer counts as unauthenticated."""
        if conn.unauth_counted:
            conn.unauth_counted = False
            self.admission.decided(conn.peer_ip)

    def admit_identity(self, conn: Connection, grant: Grant) -> str | None:
        """Count an allowed connection against its principal; a reason when over."""
        key = _principal(grant)
        if key is None:
            return None
        if not self.admission.admit_identity(
            key, conn.counted_identity, self.cfg.limits.per_identity
        ):
            self.metrics.refused["per_identity"] += 1
            return OVER_IDENTITY
        conn.counted_identity = key
        return None

    def lockout_left(self, conn: Peer, identity: IdentityLike | None) -> float:
        """Seconds left of the lockout of this peer (its node when known), else 0."""
        lockouts = self.lockouts
        if not lockouts:  # nobody locked out: every request pays just this
            return 0.0
        return lockouts.locked(lockout_key(conn.peer_ip, identity, conn.is_loopback_peer))

    def check_lockout(self, conn: Peer, identity: IdentityLike | None) -> None:
        left = self.lockout_left(conn, identity)
        if left > 0:
            self.metrics.refused["locked_out"] += 1
            raise TooManyRequests(LOCKED_OUT, int(left) + 1)

    def note_denied(self, conn: Peer, status: int, identity: IdentityLike | None = None) -> None:
        if status != 401:
            return
        if identity is None and conn.grant is not None:
            identity = conn.grant.identity  # the denied (or gated) request's peer
        lim = self.cfg.limits
        key = lockout_key(conn.peer_ip, identity, conn.is_loopback_peer)
        if self.lockouts.fail(
            key,
            count=lim.failed_auth_count,
            window=lim.failed_auth_window,
            lockout=lim.failed_auth_lockout,
        ):
            rec: dict[str, Any] = {
                "event": "lockout",
                "peer": conn.peer_ip,
                "key": key,
                "seconds": lim.failed_auth_lockout,
            }
            if identity is not None:
                rec.update(self.identity_fields(identity, conn.peer_ip))
            self.log.write(rec)

    def end_logged_out(self, key: bytes | None = None) -> int:
        """End this worker's live connections of login session ``key``, and of any
        other session no longer in the store (another worker logged it out)."""
        ended = 0
        now = time.time()
        for conn in list(self.conns):
            grant = conn.grant
            cred = grant.credential if grant is not None else None
            if cred is None or cred.session is None or conn.closed or conn.close_reason:
                continue
            if cred.expires_at is not None and cred.expires_at <= now:
                continue  # expired, not logged out: the sweep ends it and says so
            if cred.session == key or self.sessions.get(cred.session) is None:
                ended += 1
                self.log.write(
                    {
                        "event": "session_ended",
                        "conn": conn.conn_id,
                        "peer": conn.peer_ip,
                        "reason": "logged out",
                    }
                )
                conn.end_session(1008, "logged out")
        return ended

    # ------------------------------------------------------------------ per request

    def host_names(self) -> HostNames:
        """clawgate's own names, rebuilt when the config, the listeners or tailscaled's
        view of this node (addresses, MagicDNS name, certificate names) change."""
        m = self.monitor
        tls = self.tls_names() if self.tls_names is not None else ()
        key = (
            self.cfg,
            len(self.listen_addresses),
            tls,
            *((m.tailscale_ips, m.self_dns_name, m.cert_domains) if m is not None else ()),
        )
        if key != self._host_key:
            cfg = self.cfg
            exact = [h for h in cfg.gateway.hosts if h not in (HOST_TAILSCALE, "0.0.0.0", "::")]  # noqa: S104
            exact += [a.rsplit(":", 1)[0].strip("[]") for a in self.listen_addresses]
            exact += cfg.gateway.allowed_hosts
            magic: list[str] = [socket.gethostname(), *tls]
            if cfg.tls.domain:
                magic.append(cfg.tls.domain)
            if m is not None:
                exact += m.tailscale_ips
                magic += [*m.cert_domains, *([m.self_dns_name] if m.self_dns_name else [])]
            self._host_names = HostNames.build(exact=exact, with_short=magic)
            self._host_key = key
        return self._host_names

    def check_host(self, conn: Peer, head: RequestHead) -> None:
        """DNS rebinding: refuse (421) a Host that does not name clawgate. Every request,
        exempt paths and clawgate's own pages included: one rule, nothing to reason about."""
        names = self.host_names()
        value = head.header(b"host")
        why = names.refusal(value)
        if why is None:
            return
        t = conn.transport
        local = t.get_extra_info("sockname") if t is not None else None
        if local and names.refusal(value, str(local[0])) is None:
            return
        self.metrics.refused["host"] += 1
        raise MisdirectedRequest(why)

    def make_gate(self, conn: Connection) -> Gate | None:
        grant = conn.grant
        if grant is None or not grant.gated or self.gate_factory is None:
            return None
        return self.gate_factory(conn)

    def local_misdirected(
        self, conn: Peer, head: RequestHead
    ) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """The 421 for a clawgate page (login, logout) asked under a foreign Host, else
        None. Checked before either way of answering (the login POST awaits whois)."""
        try:
            self.check_host(conn, head)
        except MisdirectedRequest as exc:
            return 421, [("Content-Type", "text/plain; charset=utf-8")], f"{exc.reason}\n".encode()
        return None

    # ------------------------------------------------------------------ logging

    def identity_fields(self, ident: Any, ip: str) -> dict[str, Any]:
        if ident is None:
            return {}
        fields: dict[str, Any] = ident.to_log()
        path = self._peer_path(ident, ip)
        if path is not None:
            # "peer_path", not "path": decision lines already carry the request path.
            fields["peer_path"] = path
        return fields

    def _peer_path(self, ident: Any, ip: str) -> str | None:
        if self.monitor is None:
            return None
        paths: dict[str, str] = self.monitor.peer_paths
        path = paths.get(ip)
        if path is None:
            # Userspace networking: the peer arrived from 127.0.0.1, so look its path
            # up by the node's own tailnet addresses.
            path = next((paths[a] for a in ident.addresses if a in paths), "unknown")
        return path

    def _log_tail(self, grant: Grant, ip: str) -> str:
        """``"token":..,"node":..,...,"peer_path":..``: the last fields of a decision or
        close line, as AccessLog encodes them, cached (the same bytes, encoded once)."""
        cred, ident = grant.credential, grant.identity
        if cred is None and ident is None:
            return ""
        path = self._peer_path(ident, ip) if ident is not None else None
        key = (cred.name if cred is not None else None, id(ident), path)
        hit = self._log_tails.get(key)
        if hit is not None and hit[0] is ident:  # id() alone could be a reused address
            return hit[1]
        fields: dict[str, Any] = {}
        if cred is not None:
            fields["token"] = cred.name
        if ident is not None:
            fields.update(ident.to_log())
            if path is not None:
                fields["peer_path"] = path
        tail = self.log.fragment(fields)
        if len(self._log_tails) >= 1024:
            self._log_tails.clear()
        self._log_tails[key] = (ident, tail)
        return tail

    def log_decision(self, conn: Peer, head: RequestHead, grant: Grant) -> None:
        if not self.log.enabled:
            return
        d = grant.decision
        fields = decision_fields(
            conn.conn_id,
            conn.peer_ip,
            d.allow,
            d.status,
            d.reason,
            head.method.decode("latin-1"),
            head.path.decode("latin-1")[:256],
            head.websocket,
        )
        self.log.write_fields(fields, self._log_tail(grant, conn.peer_ip))

    def connection_closed(self, conn: Connection, reason: str) -> None:
        self.conns.discard(conn)
        m = self.metrics
        m.active -= 1
        m.bytes_up += conn.bytes_up
        m.bytes_down += conn.bytes_down
        if conn.was_tunnel:
            m.tunnels -= 1
        self.admission.release(conn.peer_ip if conn.counted_ip else None, conn.counted_identity)
        self.decided(conn)
        conn.counted_identity = None
        if self.identity_cache is not None and conn.is_loopback_peer:
            from .tailscale import cache_key

            self.identity_cache.forget(cache_key(conn.peer_ip, conn.peer_port))
        if not self.log.enabled:
            return
        fields = close_fields(
            conn.conn_id,
            conn.peer_ip,
            conn.requests,
            conn.bytes_up,
            conn.bytes_down,
            round(conn.age(), 4),
            reason,
        )
        grant = conn.grant
        tail = self._log_tail(grant, conn.peer_ip) if grant is not None else ""
        self.log.write_fields(fields, tail)


def _log_task_error(task: asyncio.Task[Any], exc: BaseException) -> None:
    log.error("task %s failed: %r", task.get_name(), exc, exc_info=exc)


def _bound_as(cred: Credential) -> str:
    """The configured name the credential's secret must still carry."""
    return GATEWAY_TOKEN_NAME if cred.kind == "gateway-token" else str(cred.name)


def _principal(grant: Grant) -> str | None:
    """Whom a connection counts against for limits.perIdentity (None: nobody)."""
    if grant.identity is not None:
        return f"ts:{grant.identity.principal}"
    if grant.credential is not None:
        return f"token:{grant.credential.name}"
    return None
