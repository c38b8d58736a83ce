"""The admin listener, loopback only: /health, /metrics (Prometheus) and /connections.

An aiohttp application; nothing here is on the connection hot path. /health answers 503
when clawgate is degraded (tailscaled not Running or unreachable while identity is in
use, node key expired, the gateway unreachable) and says why. Every request must name a
loopback literal (or localhost) in Host and carry no Origin, and POST /-/reload takes a
JSON body: a browser page (DNS rebinding, a cross-origin form) can neither read nor
trigger anything here.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from .access.hosts import admin_host_allowed
from .config import UpstreamConfig
from .errors import ClawgateError
from .metrics import MetricsCollector
from .runtime import Runtime

__all__ = ["start_admin", "build_admin_app", "health_report", "connections_report", "admin_refusal"]

RT_KEY: web.AppKey[Runtime] = web.AppKey("rt")
REG_KEY: web.AppKey[CollectorRegistry] = web.AppKey("registry")


async def upstream_reachable(u: UpstreamConfig) -> tuple[bool, str | None]:
    """Can a TCP (or unix) connection to the gateway be opened now? (reason when not)"""
    try:
        async with asyncio.timeout(min(u.connect_timeout, 2.0)):
            if u.unix_path is not None:
                _, w = await asyncio.open_unix_connection(u.unix_path)
            else:
                _, w = await asyncio.open_connection(u.host, u.port)
        w.close()
        return True, None
    except (OSError, TimeoutError) as exc:
        return False, f"{u.url}: {getattr(exc, 'strerror', None) or type(exc).__name__}"


def _is_local(ip: str) -> bool:
    """Is ip assigned to an interface of this network namespace? (bind without FREEBIND:
    no netlink, which RestrictAddressFamilies= in the systemd unit does not allow)"""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((ip, 0))
    except OSError:
        return False
    return True


async def health_report(rt: Runtime) -> tuple[bool, dict[str, Any]]:
    problems: list[str] = []
    problems_warn: list[str] = []
    up_ok, up_err = await upstream_reachable(rt.cfg.upstream)
    if not up_ok:
        problems.append(f"gateway unreachable: {up_err}")
    ts: dict[str, Any] | None = None
    if rt.monitor is not None:
        # Ask tailscaled now (bounded by tailscale.timeout): between the monitor's polls a
        # dead, slow or broken daemon would otherwise still look healthy here.
        await rt.monitor.poll()
        ts = rt.monitor.health()
        if not ts.get("running"):
            problems.append(ts.get("warning") or "tailscale not running")
        elif ts.get("expired"):
            problems.append("node key expired")
        elif ts.get("tun") and rt.cfg.listens_on_tailscale:
            missing = [ip for ip in ts.get("tailscale_ips") or () if not _is_local(ip)]
            if missing and len(missing) == len(ts["tailscale_ips"]):
                # Running with a TUN, yet no address of it here: a stale network namespace
                # (Docker: the sidecar restarted, clawgate still in its old namespace).
                problems.append(
                    f"tailnet addresses {', '.join(missing)} are on no interface "
                    "of this network namespace (tailscaled's namespace was "
                    "replaced? restart clawgate)"
                )
            elif missing:
                problems_warn.append(
                    f"tailnet address {', '.join(missing)} is on no interface "
                    "here: not reachable on it"
                )
    if not rt.listen_addresses:
        problems.append("not listening yet (waiting for tailnet addresses)")
    warnings = []
    if ts is not None and ts.get("warning") and ts.get("running"):
        warnings.append(ts["warning"])
    warnings.extend(problems_warn)
    if rt.last_reload_error:
        warnings.append(f"last reload refused: {rt.last_reload_error}")
    tls_info = getattr(rt, "tls_status", None)
    if callable(tls_info):
        tls_health = tls_info()
        if tls_health.get("warning"):
            warnings.append(tls_health["warning"])
    else:
        tls_health = None
    ok = not problems
    body: dict[str, Any] = {
        "status": "ok" if ok else "degraded",
        "problems": problems,
        "warnings": warnings,
        "clawgate": {
            "uptime_seconds": round(time.time() - rt.started, 1),
            "listening": rt.listen_addresses,
            "connections": rt.metrics.active,
            "tunnels": rt.metrics.tunnels,
            "draining": rt.draining,
            "reloads": rt.reloads,
        },
        "upstream": {"url": rt.cfg.upstream.url, "reachable": up_ok, "error": up_err},
        "tailscale": ts,
    }
    if tls_health is not None:
        body["tls"] = tls_health
    return ok, body


def connections_report(rt: Runtime) -> list[dict[str, Any]]:
    out = []
    for conn in sorted(rt.conns, key=lambda c: c.conn_id):
        grant = conn.grant
        item: dict[str, Any] = {
            "id": conn.conn_id,
            "peer": conn.peer_ip,
            "port": conn.peer_port,
            "websocket": conn.is_tunnel,
            "requests": conn.requests,
            "bytes_in": conn.bytes_up,
            "bytes_out": conn.bytes_down,
            "age_seconds": round(conn.age(), 1),
        }
        if grant is not None:
            if grant.credential is not None:
                item["token"] = grant.credential.name
            if grant.identity is not None:
                item.update(rt.identity_fields(grant.identity, conn.peer_ip))
        out.append(item)
    return out


async def _health(request: web.Request) -> web.Response:
    ok, body = await health_report(request.app[RT_KEY])
    return web.json_response(body, status=200 if ok else 503)


async def _metrics(request: web.Request) -> web.Response:
    rt = request.app[RT_KEY]
    rt.metrics.log_errors = rt.log.errors  # the access log counts its own dropped lines
    data = generate_latest(request.app[REG_KEY])
    resp = web.Response(body=data)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def _connections(request: web.Request) -> web.Response:
    return web.json_response({"connections": connections_report(request.app[RT_KEY])})


async def _reload(request: web.Request) -> web.Response:
    rt = request.app[RT_KEY]
    if rt.worker_control is not None:
        # workers > 1: the parent reloads every worker (two phases) and answers when all
        # have; this worker's own result is in the list.
        try:
            result = await rt.worker_control.reload_all()
        except ClawgateError as exc:
            return web.json_response({"ok": False, "error": str(exc), "workers": []}, status=503)
        body = {k: result.get(k) for k in ("ok", "error", "sessions_ended", "workers")}
        return web.json_response(body, status=200 if body["ok"] else 409)
    ok = rt.reload()
    ended = rt.last_sessions_ended if ok else 0
    return web.json_response(
        {
            "ok": ok,
            "error": rt.last_reload_error,
            "sessions_ended": ended,
            "workers": [
                {
                    "worker": 0,
                    "pid": os.getpid(),
                    "ok": ok,
                    "error": rt.last_reload_error,
                    "sessions_ended": ended,
                }
            ],
        },
        status=200 if ok else 409,
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_refusal(
    method: str, host: str | None, origin: str | None, content_type: str | None, port: int
) -> tuple[int, str] | None:
    """The admin's request rule (pure): (status, reason) to refuse, or None."""
    if not admin_host_allowed(host, port):
        return 421, "the admin API answers only a loopback Host (127.0.0.1, [::1], localhost)"
    if origin is not None:
        return 403, "cross-origin requests are refused"
    if method == "POST":
        mime = (content_type or "").split(";", 1)[0].strip().lower()
        if mime != "application/json":
            return 415, "POST needs a JSON body (Content-Type: application/json)"
    return None


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    port = sockname[1] if sockname else -1
    refusal = admin_refusal(
        request.method,
        request.headers.get("Host"),
        request.headers.get("Origin"),
        request.headers.get("Content-Type"),
        port,
    )
    if refusal is None and request.method == "POST":
        try:
            body = json.loads(await request.read() or b"null")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            refusal = 400, "POST needs a JSON object as its body"
    if refusal is not None:
        status, reason = refusal
        return web.json_response({"ok": False, "error": reason}, status=status)
    return await handler(request)


def build_admin_app(rt: Runtime) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=65536)
    app[RT_KEY] = rt
    registry = CollectorRegistry(auto_describe=True)

    def extra() -> dict[str, Any]:
        cache = rt.identity_cache
        out: dict[str, Any] = {}
        if cache is not None:
            out["clawgate_identity_cache_hits"] = ("counter", "Identity cache hits", cache.hits)
            out["clawgate_identity_cache_misses"] = (
                "counter",
                "Identity cache misses",
                cache.misses,
            )
        out["clawgate_sessions"] = ("gauge", "Browser login sessions", len(rt.sessions))
        return out

    def live_bytes() -> tuple[int, int]:
        # Closed connections are already in rt.metrics; connection_closed moves a
        # connection's bytes there and drops it from rt.conns in one step: no double count.
        conns = list(rt.conns)
        return sum(c.bytes_up for c in conns), sum(c.bytes_down for c in conns)

    registry.register(MetricsCollector(lambda: rt.metrics, extra, live_bytes))
    app[REG_KEY] = registry
    app.router.add_get("/health", _health)
    app.router.add_get("/healthz", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/connections", _connections)
    app.router.add_post("/-/reload", _reload)
    return app


async def start_admin(rt: Runtime) -> web.AppRunner:
    app = build_admin_app(rt)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, rt.cfg.admin.host, rt.cfg.admin.port, reuse_address=True)
    await site.start()
    return runner
