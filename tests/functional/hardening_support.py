"""Shared pieces of the hardening tests (test_limits, test_reload, test_drain, test_faults).

clawgate runs as a real process in the gw namespace (100.64.0.1:18789) in front of a fake
gateway on gw's loopback; clients originate from the phone (100.101.102.103) and the CI
host (100.88.12.34), so per-address limits see real, distinct source addresses. Nothing
here mocks clawgate: limits, reloads and signals are exercised through the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.harness import ROOT, ClawgateProcess
from tests.netns import GW_V4, Tailnet, connect_in
from tests.util import Response, build_request, exchange

PORT = 18789
ADMIN_PORT = 18790
T = TypeVar("T")


def base_config(upstream_port: int, limits: dict[str, Any] | None = None,
                **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "gateway": {"host": GW_V4, "port": PORT, "requireToken": True,
                    "allowedNetworks": ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]},
        "upstream": f"http://127.0.0.1:{upstream_port}",
        "tailscale": {"requireIdentity": False},
        "limits": {"failedAuthCount": 1000, **(limits or {})},
    }
    cfg.update(extra)
    return cfg


@contextlib.asynccontextmanager
async def running(tailnet: Tailnet, workdir: Path, config: dict[str, Any], *,
                  token_names: tuple[str, ...] = ("phone",),
                  cls: type[ClawgateProcess] = ClawgateProcess,
                  **kw: Any) -> AsyncIterator[ClawgateProcess]:
    cg = cls(workdir, config, netns=tailnet.ns("gw"), token_names=token_names,
             admin_port=ADMIN_PORT, **kw)
    try:
        await cg.start()
        yield cg
    finally:
        await cg.stop()


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


async def get(tailnet: Tailnet, role: str, path: str = "/echo", token: str | None = None,
              timeout: float = 10.0) -> Response:
    headers = [bearer(token)] if token else []
    return await exchange(tailnet.ns(role), GW_V4, PORT, build_request("GET", path, headers),
                          timeout=timeout)


async def ws_open(tailnet: Tailnet, role: str, token: str | None = None, path: str = "/ws",
                  headers: dict[str, str] | None = None, **kw: Any) -> ClientConnection:
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    sock = await connect_in(tailnet.ns(role), GW_V4, PORT)
    return await connect(f"ws://{GW_V4}:{PORT}{path}", sock=sock, proxy=None,
                         additional_headers=hdrs, compression=None, open_timeout=5, **kw)


async def echo_ok(ws: ClientConnection, text: str = "ping") -> None:
    await ws.send(text)
    async with asyncio.timeout(5):
        assert await ws.recv() == text


async def closed_by_server(ws: ClientConnection, timeout: float
                           ) -> tuple[int | None, str, float]:
    """Read until the server closes: (close code received, reason, monotonic time)."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            return (rcvd.code if rcvd else None), (rcvd.reason if rcvd else ""), \
                time.monotonic()


async def eventually(fn: Callable[[], Awaitable[T]], pred: Callable[[T], bool],
                     timeout: float = 10.0, interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await fn()
        if pred(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last: {value!r}")
        await asyncio.sleep(interval)


def cli_in_gw(cg: ClawgateProcess, *args: str, timeout: float = 30.0
              ) -> subprocess.CompletedProcess[str]:
    """The real clawgate CLI inside the gw namespace (where the admin listener is)."""
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cg.argv(*args), capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=timeout, stdin=subprocess.DEVNULL,
                          check=False)


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


async def timed_get(tailnet: Tailnet, role: str, token: str, n: int) -> list[float]:
    """Latencies of n sequential authorised requests from role (each on a new connection)."""
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        resp = await get(tailnet, role, "/echo", token, timeout=5)
        out.append(time.monotonic() - t0)
        assert resp.status == 200, resp.raw
    return out


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (to detect a busy loop)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
