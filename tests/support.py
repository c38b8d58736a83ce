"""What the functional and security tests share: clawgate as a real process on the tailnet.

clawgate runs as a real process in the gw namespace (100.64.0.1:18789, admin on the
namespace's 127.0.0.1:18790) in front of a fake gateway on gw's loopback; clients originate
from the phone (100.101.102.103), the CI host (100.88.12.34) or the public host, so
per-address rules see real, distinct source addresses. A fake tailscaled (a real LocalAPI on
a short unix-socket path that crosses namespaces through the filesystem) says who each
address is. Requests are raw bytes, so every case sends exactly what it means. Nothing here
mocks clawgate.

Sections: configs, the clawgate process, requests from the tailnet, identities (fake
tailscaled), browser sessions, polling and measuring.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.fakes.fake_gateway import FakeGateway, RecordedRequest
from tests.fakes.fake_tailscaled import FakeTailscaled, tagged_peer, user_peer
from tests.harness import ROOT, ClawgateProcess
from tests.netns import (
    CI_V4,
    CI_V6,
    GW_V4,
    PHONE_V4,
    PHONE_V6,
    Tailnet,
    connect_in,
    socket_in,
)
from tests.util import Response, build_request, exchange, open_in, read_response, read_to_close

__all__ = [
    "ADMIN_PORT",
    "ALICE",
    "ALICE_CAPS",
    "ALICE_NODE",
    "ALICE_PIC",
    "CAP",
    "CI_NODE",
    "FORM",
    "HOST",
    "IDENTITY_HEADER",
    "PORT",
    "PUBLIC_NET",
    "TextResponse",
    "alice_body",
    "base_config",
    "bearer",
    "ci_body",
    "cli_in_gw",
    "clawgate_config",
    "closed_by_server",
    "connect_bound",
    "connect_frame",
    "cpu_seconds",
    "echo_ok",
    "eventually",
    "fake_tailscaled",
    "forwarding_view",
    "gather_limited",
    "gateway_heads",
    "get",
    "health_json",
    "identity_config",
    "iso_in",
    "latencies",
    "listeners_of",
    "login",
    "login_cookie",
    "logout",
    "loopback_socket",
    "median",
    "metric",
    "norm",
    "pids_holding",
    "plain_config",
    "raw_send",
    "reconfigure",
    "request",
    "running",
    "stable_id",
    "status_of",
    "tailnet_peers",
    "timed_get",
    "with_cookie",
    "ws_open",
    "ws_with_cookie",
]

T = TypeVar("T")

PORT = 18789  # clawgate in the gw namespace (the gateway itself is on 127.0.0.1:<random>)
ADMIN_PORT = 18790
HOST = f"{GW_V4}:{PORT}"
ALICE = "alice@example.com"
ALICE_NODE = "alice-laptop.tail3f2a1.ts.net"
ALICE_PIC = "https://lh3.googleusercontent.com/a/ACg8ocJexample=s96-c"
CI_NODE = "ci-runner-1.tail3f2a1.ts.net"
CAP = "example.com/cap/openclaw"
ALICE_CAPS = {CAP: [{"role": "operator", "gateways": ["prod", "staging"]}, {"role": "viewer"}]}
PUBLIC_NET = "198.18.0.0/24"
# A configured identity header outside the X-Forwarded-* / Tailscale-* families, so its
# removal is tested on its own, not through a prefix rule.
IDENTITY_HEADER = "X-Auth-Request-User"
FORM = ("Content-Type", "application/x-www-form-urlencoded")
TAILNET_NETS = ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]


class Upstream(Protocol):
    """Whatever clawgate forwards to: a fake gateway, the Node echo server."""

    @property
    def port(self) -> int: ...


# ---------------------------------------------------------------------------------- configs


def base_config(
    upstream_port: int, limits: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """Tokens only, the tailnet allowed; lockout after 1000 failures (so, in effect, none)."""
    cfg: dict[str, Any] = {
        "gateway": {
            "host": GW_V4,
            "port": PORT,
            "requireToken": True,
            "allowedNetworks": list(TAILNET_NETS),
        },
        "upstream": f"http://127.0.0.1:{upstream_port}",
        "tailscale": {"requireIdentity": False},
        "limits": {"failedAuthCount": 1000, **(limits or {})},
    }
    cfg.update(extra)
    return cfg


def plain_config(upstream: Upstream, **limits: Any) -> dict[str, Any]:
    """Tokens only (no tailscaled): requireToken, the tailnet allowed, lockouts off."""
    return {
        "gateway": {
            "host": GW_V4,
            "port": PORT,
            "requireToken": True,
            "allowedNetworks": list(TAILNET_NETS),
        },
        "upstream": f"http://127.0.0.1:{upstream.port}",
        "tailscale": {"requireIdentity": False},
        "limits": {"failedAuthLockout": 0, **limits},
    }


def clawgate_config(
    gw: Upstream,
    socket_path: str | None,
    *,
    host: Any = GW_V4,
    tailscale: dict[str, Any] | None = None,
    gateway: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Identity from the fake tailscaled at ``socket_path``; tailnet, public and loopback
    clients allowed; no lockout (the policy tables send many 401s from one address)."""
    g: dict[str, Any] = {
        "host": host,
        "port": PORT,
        "allowedNetworks": [*TAILNET_NETS, PUBLIC_NET, "127.0.0.1/32", "::1/128"],
    }
    g.update(gateway or {})
    ts: dict[str, Any] = {"timeout": 0.5}
    if socket_path is not None:
        ts["socket"] = socket_path
    ts.update(tailscale or {})
    cfg: dict[str, Any] = {
        "gateway": g,
        "upstream": f"http://127.0.0.1:{gw.port}",
        "tailscale": ts,
        "limits": {"failedAuthLockout": 0},
    }
    for k, v in (extra or {}).items():
        cfg[k] = v
    return cfg


def identity_config(gw: Upstream, socket_path: str, **tailscale: Any) -> dict[str, Any]:
    """Token and identity, all identity headers on (clawgate sets every one of them)."""
    ts = {
        "identityHeader": IDENTITY_HEADER,
        "sendTailscaleHeaders": True,
        "timeout": 5,
        **tailscale,
    }
    cfg = clawgate_config(gw, socket_path, tailscale=ts)
    cfg["gateway"]["requireToken"] = True
    return cfg


# ------------------------------------------------------------------- the clawgate process


@contextlib.asynccontextmanager
async def running(
    tailnet: Tailnet,
    workdir: Path,
    config: dict[str, Any],
    *,
    token_names: tuple[str, ...] = ("phone",),
    cls: type[ClawgateProcess] = ClawgateProcess,
    wait_for: str = "listening on",
    **kw: Any,
) -> AsyncIterator[ClawgateProcess]:
    """clawgate in the gw namespace with ``config``, until it says ``wait_for``."""
    cg = cls(
        workdir,
        config,
        netns=tailnet.ns("gw"),
        token_names=token_names,
        admin_port=ADMIN_PORT,
        **kw,
    )
    try:
        await cg.start(wait_for=wait_for)
        yield cg
    finally:
        await cg.stop()


async def reconfigure(cg: ClawgateProcess, config: dict[str, Any]) -> None:
    """Write a new config and reload it through the admin endpoint (synchronous there)."""
    cg.write_config({**cg.config, **config})
    status, body = await cg.admin("POST", "/-/reload")
    assert status == 200, body


def cli_in_gw(
    cg: ClawgateProcess, *args: str, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """The real clawgate CLI inside the gw namespace (where the admin listener is)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        cg.argv(*args),
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


async def metric(cg: ClawgateProcess, name: str) -> float:
    """One unlabelled sample from /metrics (``_total`` suffix for counters accepted)."""
    status, body = await cg.admin("GET", "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key in (name, name + "_total"):
            return float(value)
    raise AssertionError(f"{name} not in /metrics")


def health_json(body: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(body)
    return data


def listeners_of(tailnet: Tailnet, pid: int) -> set[str]:
    """The TCP listening addresses of process ``pid`` in the gw namespace (ss -ltnp)."""
    out = subprocess.run(
        ["ip", "netns", "exec", tailnet.ns("gw"), "ss", "-Hltnp"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    found = set()
    for line in out.splitlines():
        if f"pid={pid}," in line:
            found.add(line.split()[3])
    return found


def pids_holding(ns: str, port: int = PORT) -> list[int]:
    """The pid of the process behind each established connection to ``port`` in ns."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return [int(m) for m in re.findall(r"pid=(\d+)", out)]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (to detect a busy loop)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------- requests from the tailnet


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


async def get(
    tailnet: Tailnet,
    role: str,
    path: str = "/echo",
    token: str | None = None,
    timeout: float = 10.0,
) -> Response:
    headers = [bearer(token)] if token else []
    return await exchange(
        tailnet.ns(role), GW_V4, PORT, build_request("GET", path, headers), timeout=timeout
    )


async def raw_send(
    tailnet: Tailnet,
    role: str,
    data: bytes,
    *,
    host: str = GW_V4,
    port: int = PORT,
    timeout: float = 10.0,
) -> bytes:
    """Send raw bytes from ``role``, read until the proxy closes (a reset ends it too)."""
    reader, writer = await open_in(tailnet.ns(role), host, port)
    try:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            writer.write(data)
            await writer.drain()
        return await read_to_close(reader, timeout)
    finally:
        writer.close()


def status_of(resp: bytes) -> int | None:
    """The status of a raw response, None if it is not one."""
    if not resp.startswith(b"HTTP/1.1 ") or len(resp) < 12:
        return None
    return int(resp[9:12])


@dataclass
class TextResponse:
    """A response as text headers (tests.util.Response keeps the raw bytes)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


async def request(
    tailnet: Tailnet,
    role: str,
    host: str = GW_V4,
    port: int = PORT,
    path: str = "/headers",
    *,
    token: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    sock: socket.socket | None = None,
) -> TextResponse:
    """One HTTP/1.1 request (Connection: close) from host ``role`` of the tailnet."""
    if sock is None:
        sock = await connect_in(tailnet.ns(role), host, port)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        # An IPv6 literal is bracketed in Host (RFC 9110 uri-host); clawgate refuses a bare one.
        shown = f"[{host}]" if ":" in host else host
        lines = [f"GET {path} HTTP/1.1", f"Host: {shown}:{port}", "Connection: close"]
        if token is not None:
            lines.append(f"Authorization: Bearer {token}")
        lines += [f"{k}: {v}" for k, v in headers]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    first, *rest = head.decode("latin-1").split("\r\n")
    hdrs = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in rest)]
    return TextResponse(int(first.split(" ", 2)[1]), hdrs, body)


async def loopback_socket(tailnet: Tailnet, port: int = PORT) -> tuple[socket.socket, int]:
    """A socket in gw bound to 127.0.0.1:<ephemeral> (returned), then connected to ``port``.

    Userspace networking: tailscaled delivers tailnet peers from 127.0.0.1:<ephemeral>.
    """
    sock = socket_in(tailnet.ns("gw"))
    sock.bind(("127.0.0.1", 0))
    src_port = sock.getsockname()[1]
    sock.setblocking(False)
    return sock, src_port


async def connect_bound(sock: socket.socket, host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        await loop.sock_connect(sock, (host, port))
    return sock


async def ws_open(
    tailnet: Tailnet,
    role: str,
    token: str | None = None,
    path: str = "/ws",
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> ClientConnection:
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    sock = await connect_in(tailnet.ns(role), GW_V4, PORT)
    return await connect(
        f"ws://{GW_V4}:{PORT}{path}",
        sock=sock,
        proxy=None,
        additional_headers=hdrs,
        compression=None,
        open_timeout=5,
        **kw,
    )


async def echo_ok(ws: ClientConnection, text: str = "ping") -> None:
    await ws.send(text)
    async with asyncio.timeout(5):
        assert await ws.recv() == text


async def closed_by_server(ws: ClientConnection, timeout: float) -> tuple[int | None, str, float]:
    """Read until the server closes: (close code received, reason, monotonic time)."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            return (rcvd.code if rcvd else None), (rcvd.reason if rcvd else ""), time.monotonic()


def norm(name: str) -> str:
    return name.lower().replace("_", "-")


def forwarding_view(rec: RecordedRequest) -> dict[str, list[str]]:
    """Every forwarding / identity header the gateway received, by normalised name."""
    out: dict[str, list[str]] = {}
    for name, value in rec.headers:
        n = norm(name)
        if n.startswith(("x-forwarded-", "tailscale-")) or n in (
            "forwarded",
            "x-real-ip",
            "true-client-ip",
            norm(IDENTITY_HEADER),
        ):
            out.setdefault(n, []).append(value)
    return out


def gateway_heads(gw: FakeGateway, path: str = "/headers") -> list[RecordedRequest]:
    return [r for r in gw.requests if r.path == path]


# -------------------------------------------------------------- identities (fake tailscaled)


def alice_body(**kw: Any) -> dict[str, Any]:
    """alice's laptop, with the phone namespace's real v4 and v6 addresses."""
    args: dict[str, Any] = {
        "ipv6": PHONE_V6,
        "display_name": "Alice Example",
        "profile_pic": ALICE_PIC,
        "caps": ALICE_CAPS,
        "os_name": "macOS",
    }
    args.update(kw)
    login = args.pop("login", ALICE)
    return user_peer(PHONE_V4, login, "alice-laptop", **args)


def ci_body(**kw: Any) -> dict[str, Any]:
    """The tagged CI server (owned by the tagged-devices pseudo-user)."""
    args: dict[str, Any] = {"ipv6": CI_V6, "node_name": "ci-runner-1", "os_name": "linux"}
    args.update(kw)
    return tagged_peer(CI_V4, ["tag:ci"], **args)


def tailnet_peers() -> list[tuple[str, dict[str, Any], str]]:
    return [(PHONE_V4, alice_body(), "direct"), (CI_V4, ci_body(), "derp")]


def stable_id(body: dict[str, Any]) -> str:
    return str(body["Node"]["StableID"])


def iso_in(*, days: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + days * 86400))


@contextlib.asynccontextmanager
async def fake_tailscaled(
    peers: Iterable[tuple[str, dict[str, Any], str]] | None = None, *, start: bool = True
) -> AsyncIterator[FakeTailscaled]:
    """A fake tailscaled on a short socket path (sun_path is 108 bytes; tmp_path is long)."""
    d = tempfile.mkdtemp(prefix="cgts-", dir="/tmp")
    fake = FakeTailscaled(
        Path(d) / "tailscaled.sock", peers=tailnet_peers() if peers is None else peers
    )
    # Valid for 60 more days: no key warning unless a test asks for one.
    fake.self_key_expiry = iso_in(days=60)
    try:
        if start:
            await fake.start()
        yield fake
    finally:
        await fake.stop()
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------ browser sessions


async def login(tailnet: Tailnet, role: str, token: str) -> Response:
    return await exchange(
        tailnet.ns(role),
        GW_V4,
        PORT,
        build_request("POST", "/__clawgate/login", [FORM], f"token={token}&next=/".encode()),
    )


async def login_cookie(tailnet: Tailnet, role: str, token: str) -> str:
    """Log in with ``token``; the ``name=value`` of the session cookie."""
    resp = await login(tailnet, role, token)
    assert resp.status == 303, resp.raw
    return (resp.header("Set-Cookie") or b"").split(b";", 1)[0].decode()


async def with_cookie(tailnet: Tailnet, role: str, cookie: str, path: str = "/echo") -> Response:
    return await exchange(
        tailnet.ns(role), GW_V4, PORT, build_request("GET", path, [("Cookie", cookie)])
    )


async def ws_with_cookie(tailnet: Tailnet, role: str, cookie: str) -> ClientConnection:
    return await ws_open(tailnet, role, headers={"Cookie": cookie})


async def logout(tailnet: Tailnet, role: str, cookie: str) -> Response:
    return await exchange(
        tailnet.ns(role),
        GW_V4,
        PORT,
        build_request("POST", "/__clawgate/logout", [("Cookie", cookie)]),
    )


def connect_frame(token: str) -> str:
    """The gateway's first WebSocket frame: a connect request carrying ``token``."""
    return json.dumps(
        {
            "type": "req",
            "id": "c1",
            "method": "connect",
            "params": {
                "minProtocol": 4,
                "maxProtocol": 4,
                "client": {"id": "cli", "version": "1", "platform": "linux", "mode": "cli"},
                "auth": {"token": token},
            },
        }
    )


# ---------------------------------------------------------------------- polling, measuring


async def eventually(
    fn: Callable[[], Awaitable[T]],
    pred: Callable[[T], bool],
    timeout: float = 10.0,
    interval: float = 0.05,
) -> T:
    """Call ``fn`` until ``pred(result)``; return that result or fail with the last one."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fn()
        if pred(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last: {value!r}")
        await asyncio.sleep(interval)


async def timed_get(
    tailnet: Tailnet, role: str, token: str, n: int, path: str = "/echo"
) -> list[float]:
    """Latency of ``n`` sequential authorised requests, each on a fresh connection."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        reader, writer = await open_in(tailnet.ns(role), GW_V4, PORT)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}"
            "\r\nConnection: close\r\n\r\n".encode()
        )
        resp = await read_response(reader, timeout=10)
        writer.close()
        assert resp.status == 200, resp.raw
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def latencies(values: Iterable[float]) -> tuple[float, float]:
    """(median, max)."""
    vals = list(values)
    return statistics.median(vals), max(vals)


async def gather_limited(coros: list[Coroutine[Any, Any, T]], limit: int) -> list[T]:
    """Run ``coros`` with at most ``limit`` at a time; results in order."""
    sem = asyncio.Semaphore(limit)

    async def one(c: Coroutine[Any, Any, T]) -> T:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))
