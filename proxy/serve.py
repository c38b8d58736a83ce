"""Starting and stopping the proxy: listeners, signals, reload, drain, the sweep.

``serve`` builds the ``Runtime`` (proxy.runtime), attaches tailscaled, binds the
listeners (the tailnet addresses from tailscaled when ``host`` is ``"tailscale"``), runs
the admin server, and handles SIGHUP (``Runtime.reload``) and SIGTERM (``drain``). The
background loops of a running process live here too: the once-a-second sweep and, with
workers > 1, the watch on the shared session store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable

from .config import HOST_TAILSCALE, Config
from .core.networks import hostport
from .errors import ClawgateError
from .front import ClientConnection
from .runtime import Runtime
from .system import CONTROL_FD_ENV, listen_socket, raise_nofile_limit, sd_notify

__all__ = ["serve", "start_listeners", "drain"]

log = logging.getLogger("clawgate")


def _protocol_factory(
    rt: Runtime, ssl_context: ssl.SSLContext | None
) -> Callable[[], asyncio.Protocol]:
    """Plain TCP listeners in both cases: with TLS, ``TlsAcceptor`` checks the network on
    the raw connection and only then starts the handshake (a listener with ``ssl=`` would
    complete a full handshake before ``connection_made`` could refuse the source)."""
    if ssl_context is None:
        return lambda: ClientConnection(rt, tls=False)
    from .tls import TlsAcceptor

    return lambda: TlsAcceptor(rt, ssl_context)


async def start_listeners(
    rt: Runtime, hosts: list[str], *, ssl_context: ssl.SSLContext | None = None
) -> list[str]:
    cfg = rt.cfg
    bound: list[str] = []
    for host in hosts:
        addr = hostport(host, cfg.gateway.port)
        if addr in rt.listen_addresses:
            continue
        try:
            sock = listen_socket(host, cfg.gateway.port, reuse_port=cfg.workers > 1, freebind=True)
        except OSError as exc:
            raise ClawgateError(f"cannot listen on {addr}: {exc.strerror}") from None
        srv = await rt.loop.create_server(
            _protocol_factory(rt, ssl_context), sock=sock, backlog=4096
        )
        rt.servers.append(srv)
        rt.listen_addresses.append(addr)
        bound.append(addr)
        for hook in rt.listen_hooks:
            await hook(host)
    return bound


async def serve(
    cfg: Config,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    sockets: list[socket.socket] | None = None,
    worker_index: int = 0,
) -> int:
    """Run the proxy until SIGTERM/SIGINT (or ``stop``); returns the exit status.

    With ``workers: N`` every worker runs this on the same port (SO_REUSEPORT); only
    worker 0 serves the admin listener.
    """
    loop = asyncio.get_running_loop()
    if worker_index > 0:
        cfg = dataclasses.replace(cfg, admin=dataclasses.replace(cfg.admin, enabled=False))
    raise_nofile_limit()
    shared = None
    if cfg.workers > 1:
        from .shared_state import STATE_DIR_ENV, SharedState

        state_dir = os.environ.get(STATE_DIR_ENV)
        if state_dir:  # started by run_workers (a lone `--worker-index` keeps its own)
            import sqlite3

            try:
                shared = SharedState(state_dir, cfg.tokens.session_ttl)
            except (OSError, sqlite3.Error) as exc:
                raise ClawgateError(f"cannot open the shared session store: {exc}") from None
    rt = Runtime(cfg, loop, shared)
    hosts = list(cfg.gateway.hosts)
    ts_hosts: list[str] = []
    from .tailscale_runtime import attach_tailscale

    ts_hosts = await attach_tailscale(rt, want_addresses=HOST_TAILSCALE in hosts)
    rt.apply_config(cfg)
    from .gate import make_gate_factory

    rt.gate_factory = make_gate_factory(rt)
    _warn_if_no_credentials(rt)
    hosts = [h for h in hosts if h != HOST_TAILSCALE] + ts_hosts
    if HOST_TAILSCALE in cfg.gateway.hosts and not ts_hosts and rt.monitor is None:
        port = cfg.gateway.port
        if cfg.upstream.host in ("127.0.0.1", "localhost") and cfg.upstream.port == port:
            port += 1
            cfg = _with_port(cfg, port)
            rt.snap = dataclasses.replace(rt.snap, cfg=cfg)
        admin_note = ""
        if (
            cfg.admin.enabled
            and cfg.admin.port == port
            and cfg.admin.host in ("127.0.0.1", "localhost")
        ):
            # The fallback lands on the default admin port (18790): move the admin aside
            # rather than fail to bind it after the proxy took the port.
            cfg = dataclasses.replace(cfg, admin=dataclasses.replace(cfg.admin, port=port + 1))
            rt.snap = dataclasses.replace(rt.snap, cfg=cfg)
            admin_note = f"; admin on 127.0.0.1:{port + 1}"
        log.warning(
            "tailscaled not found: serving on 127.0.0.1:%d only (loopback)%s; "
            "start tailscaled or set gateway.host",
            port,
            admin_note,
        )
        hosts.append("127.0.0.1")
    ssl_context = None
    if cfg.tls.mode != "off":
        from .tls import setup_tls

        try:
            ssl_context = await setup_tls(rt)
        except ClawgateError:
            # Exit with the one-line error, not with aiohttp's "Unclosed client session".
            if rt.monitor is not None:
                await rt.monitor.stop()
            if rt.localapi is not None:
                await rt.localapi.close()
            raise
    if sockets:
        for sock in sockets:
            srv = await loop.create_server(
                _protocol_factory(rt, ssl_context), sock=sock, backlog=4096
            )
            rt.servers.append(srv)
            name = sock.getsockname()
            rt.listen_addresses.append(f"{name[0]}:{name[1]}")
    bound = await start_listeners(rt, hosts, ssl_context=ssl_context) if hosts else []
    if rt.monitor is not None and HOST_TAILSCALE in cfg.gateway.hosts:
        rt.on_tailnet_addresses = lambda addrs: rt.spawn(
            _bind_new(rt, addrs, ssl_context), "bind-tailscale"
        )
    admin_runner = None
    if cfg.admin.enabled:
        from .admin import start_admin

        try:
            admin_runner = await start_admin(rt)
        except OSError as exc:
            raise ClawgateError(
                f"cannot listen on {cfg.admin.host}:{cfg.admin.port} (admin): {exc.strerror}"
            ) from None
    control_fd = os.environ.pop(CONTROL_FD_ENV, None)
    if control_fd is not None:
        from .workers import WorkerControl

        rt.worker_control = await WorkerControl.attach(rt, worker_index, int(control_fd))
    stop_event = stop or asyncio.Event()
    drain_now = asyncio.Event()
    if stop is None:
        # Before "listening on" is said: a SIGTERM sent as soon as that line appears
        # must drain, not kill the process with the default action.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, drain_now.set)
        loop.add_signal_handler(signal.SIGHUP, rt.reload)
    for addr in bound:
        log.info("listening on %s -> %s", addr, cfg.upstream.url)
    if not rt.listen_addresses:
        log.warning("no tailnet address yet: waiting for tailscaled to come up")
    sweeper = rt.spawn(_sweep(rt), "sweep")
    watcher = rt.spawn(_watch_shared(rt), "watch-shared") if shared is not None else None
    # Startup objects (modules, config, aiohttp apps) live as long as the process: take
    # them out of the cyclic GC's view, so a full collection under load no longer walks
    # them all (measured: a ~40-65 ms stall of the event loop every few seconds).
    gc.collect()
    gc.freeze()
    sd_notify("READY=1\nSTATUS=serving")
    if ready is not None:
        ready.set()
    waiters = [asyncio.ensure_future(stop_event.wait()), asyncio.ensure_future(drain_now.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        log.info(
            "draining %d connections (up to %.0fs)", len(rt.conns), rt.cfg.limits.drain_seconds
        )
        await drain(rt, rt.cfg.limits.drain_seconds)
        sweeper.cancel()
        if watcher is not None:
            watcher.cancel()
        if shared is not None:
            shared.close()
        if rt.worker_control is not None:
            rt.worker_control.close()
        if rt.monitor is not None:
            await rt.monitor.stop()
        if rt.localapi is not None:
            await rt.localapi.close()
        if admin_runner is not None:
            await admin_runner.cleanup()
        for srv in rt.servers:
            srv.close()
        rt.log.close()
        if stop is None:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
    return 0


def _warn_if_no_credentials(rt: Runtime) -> None:
    """One clear line when every request would be refused for want of a token."""
    authz, cfg = rt.authz, rt.cfg
    s = authz.settings
    if (
        s.require_token
        and s.auth_mode == "both"
        and not len(authz.tokens)
        and authz.jwt is None
        and authz.gateway_token_digest is None
    ):
        log.warning(
            "requireToken is on but no token exists yet: every request will get "
            "401 until you create one with `clawgate token new NAME` (token file: %s)",
            cfg.tokens.file,
        )


def _with_port(cfg: Config, port: int) -> Config:

    return dataclasses.replace(cfg, gateway=dataclasses.replace(cfg.gateway, port=port))


async def _bind_new(rt: Runtime, addrs: list[str], ssl_context: ssl.SSLContext | None) -> None:
    # One address at a time: one that cannot be bound (IPv6 off in a container, say) must
    # not keep the others unbound or unlogged.
    for host in addrs:
        try:
            bound = await start_listeners(rt, [host], ssl_context=ssl_context)
        except ClawgateError as exc:
            log.error("%s", exc)
            continue
        for addr in bound:
            log.info("listening on %s (tailnet address appeared)", addr)


async def _sweep(rt: Runtime) -> None:
    """Once a second: expire credentials of live sessions, idle tunnels, lockouts."""
    last_bytes: dict[int, tuple[int, float]] = {}
    while True:
        await asyncio.sleep(1.0)
        now = time.time()
        mono = time.monotonic()
        idle = rt.cfg.limits.idle_timeout
        jwt = rt.snap.jwt
        if jwt is not None:
            # The revocation file is re-read here (mtime, at most once a second), so no
            # request ever waits on a stat or a read: RevocationList.reason is a lookup.
            jwt.revocations.maybe_reload()
        seen = set()
        for conn in list(rt.conns):
            grant = conn.grant
            if grant is not None and grant.credential is not None:
                exp = grant.credential.expires_at
                # close_reason set: already being ended (log and close frame once only).
                if exp is not None and exp <= now and not conn.close_reason:
                    rt.log.write(
                        {
                            "event": "session_ended",
                            "conn": conn.conn_id,
                            "peer": conn.peer_ip,
                            "reason": f"credential {grant.credential.name} expired",
                        }
                    )
                    conn.end_session(1008, "credential expired")
                    continue
                revoked = rt.authz.revoked
                if grant.credential.kind == "jwt" and revoked is not None:
                    # The revocation list is re-read by mtime: edits end live sessions too.
                    why = revoked(grant.credential)
                    # close_reason set: a reload already ended it (one close frame only).
                    if why is not None and not conn.closed and not conn.close_reason:
                        rt.log.write(
                            {
                                "event": "session_ended",
                                "conn": conn.conn_id,
                                "peer": conn.peer_ip,
                                "reason": why,
                            }
                        )
                        conn.end_session(1008, why)
                        continue
            if conn.is_tunnel:
                seen.add(conn.conn_id)
                total = conn.bytes_up + conn.bytes_down
                prev = last_bytes.get(conn.conn_id)
                if prev is None or prev[0] != total:
                    last_bytes[conn.conn_id] = (total, mono)
                elif mono - prev[1] > idle:
                    conn.end_session(1001, "idle timeout")
        for k in [k for k in last_bytes if k not in seen]:
            del last_bytes[k]
        rt.lockouts.expire()
        rt.sessions.expire()


async def _watch_shared(rt: Runtime) -> None:
    """workers > 1: another worker logged a session out (or dropped it): end ours."""
    assert rt.shared is not None
    seen = rt.shared.epoch()
    while True:
        await asyncio.sleep(0.25)
        epoch = rt.shared.epoch()
        if epoch != seen:
            seen = epoch
            rt.end_logged_out()


async def drain(rt: Runtime, seconds: float) -> None:
    """Stop accepting; let sessions finish; then close each with 1001."""
    rt.draining = True
    sd_notify("STOPPING=1")
    for srv in rt.servers:
        srv.close()
    for conn in list(rt.conns):
        # Idle keep-alive connections hold nothing worth waiting for.
        conn.close_if_idle("server shutting down")
    deadline = time.monotonic() + seconds
    while rt.conns and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for conn in list(rt.conns):
        conn.end_session(1001, "server shutting down")
    deadline = time.monotonic() + 2.0
    while rt.conns and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    for conn in list(rt.conns):
        conn._abort("shutdown")  # noqa: SLF001 - last resort after the grace period
