"""Shared pieces of the Tailscale identity functional tests (tests/functional/test_identity_*).

A fake tailscaled on a short unix-socket path in this test process (its socket crosses
namespaces through the filesystem), clawgate as a real process in the gw namespace pointed
at it, and a raw HTTP/1.1 client that originates from any tailnet host (or from a chosen
127.0.0.1 port, for userspace networking). Nothing here mocks clawgate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fakes.fake_gateway import FakeGateway
from tests.fakes.fake_tailscaled import FakeTailscaled, tagged_peer, user_peer
from tests.harness import ClawgateProcess
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

PORT = 18789  # clawgate in the gw namespace (the gateway itself is on 127.0.0.1:<random>)
ADMIN_PORT = 18790
ALICE = "alice@example.com"
ALICE_NODE = "alice-laptop.tail3f2a1.ts.net"
CI_NODE = "ci-runner-1.tail3f2a1.ts.net"
CAP = "example.com/cap/openclaw"
ALICE_CAPS = {CAP: [{"role": "operator", "gateways": ["prod", "staging"]}, {"role": "viewer"}]}
PUBLIC_NET = "198.18.0.0/24"


def alice_body(**kw: Any) -> dict[str, Any]:
    """alice's laptop, with the phone namespace's real v4 and v6 addresses."""
    args: dict[str, Any] = {
        "ipv6": PHONE_V6,
        "display_name": "Alice Example",
        "profile_pic": "https://lh3.googleusercontent.com/a/ACg8ocJexample=s96-c",
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


@contextlib.asynccontextmanager
async def fake_tailscaled(
    peers: Iterable[tuple[str, dict[str, Any], str]] | None = None, *, start: bool = True
) -> AsyncIterator[FakeTailscaled]:
    """A fake tailscaled on a short socket path (sun_path is 108 bytes; tmp_path is long)."""
    d = tempfile.mkdtemp(prefix="cgts-", dir="/tmp")
    fake = FakeTailscaled(Path(d) / "tailscaled.sock",
                          peers=tailnet_peers() if peers is None else peers)
    # Valid for 60 more days: no key warning unless a test asks for one.
    fake.self_key_expiry = iso_in(days=60)
    try:
        if start:
            await fake.start()
        yield fake
    finally:
        await fake.stop()
        shutil.rmtree(d, ignore_errors=True)


def iso_in(*, days: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + days * 86400))


def clawgate_config(gw: FakeGateway, socket_path: str | None, *, host: Any = GW_V4,
                    tailscale: dict[str, Any] | None = None,
                    gateway: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    g: dict[str, Any] = {"host": host, "port": PORT,
                         "allowedNetworks": ["100.64.0.0/10", "fd7a:115c:a1e0::/48",
                                             PUBLIC_NET, "127.0.0.1/32", "::1/128"]}
    g.update(gateway or {})
    ts: dict[str, Any] = {"timeout": 0.5}
    if socket_path is not None:
        ts["socket"] = socket_path
    ts.update(tailscale or {})
    cfg: dict[str, Any] = {
        "gateway": g,
        "upstream": f"http://127.0.0.1:{gw.port}",
        "tailscale": ts,
        # The policy tables send many 401s from one address: no lockout in these tests.
        "limits": {"failedAuthLockout": 0},
    }
    for k, v in (extra or {}).items():
        cfg[k] = v
    return cfg


@contextlib.asynccontextmanager
async def clawgate(tailnet: Tailnet, workdir: Path, config: dict[str, Any], *,
                   wait_for: str = "listening on") -> AsyncIterator[ClawgateProcess]:
    cg = ClawgateProcess(workdir, config, netns=tailnet.ns("gw"), admin_port=ADMIN_PORT)
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


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


async def request(tailnet: Tailnet, role: str, host: str = GW_V4, port: int = PORT,
                  path: str = "/headers", *, token: str | None = None,
                  headers: Iterable[tuple[str, str]] = (),
                  sock: socket.socket | None = None) -> Response:
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
    return Response(int(first.split(" ", 2)[1]), hdrs, body)


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


async def eventually(probe: Callable[[], Awaitable[Any]], pred: Callable[[Any], bool],
                     timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Call ``probe`` until ``pred(result)``; return that result or fail with the last one."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await probe()
        if pred(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last: {last!r}")
        await asyncio.sleep(interval)


def listeners_of(tailnet: Tailnet, pid: int) -> set[str]:
    """The TCP listening addresses of process ``pid`` in the gw namespace (ss -ltnp)."""
    out = subprocess.run(["ip", "netns", "exec", tailnet.ns("gw"), "ss", "-Hltnp"],
                         capture_output=True, text=True, check=True, timeout=10).stdout
    found = set()
    for line in out.splitlines():
        if f"pid={pid}," in line:
            found.add(line.split()[3])
    return found


def gateway_heads(gw: FakeGateway, path: str = "/headers") -> list[Any]:
    return [r for r in gw.requests if r.path == path]


def health_json(body: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(body)
    return data


__all__ = [
    "ADMIN_PORT", "ALICE", "ALICE_CAPS", "ALICE_NODE", "CAP", "CI_NODE", "PORT", "PUBLIC_NET",
    "Response", "alice_body", "ci_body", "clawgate", "clawgate_config", "connect_bound",
    "eventually", "fake_tailscaled", "gateway_heads", "health_json", "iso_in", "listeners_of",
    "loopback_socket", "reconfigure", "request", "stable_id", "tailnet_peers",
]
