"""Shared pieces of the hostile-input catalogue (tests/security/test_*.py).

clawgate runs as a real process in the gw namespace (100.64.0.1:18789, and 127.0.0.1:18789
where a test needs loopback clients) in front of the recording fake gateway; a fake
tailscaled (real LocalAPI on a unix socket) says who each real source address is. Requests
are raw bytes from the tailnet hosts, so every case sends exactly the bytes it means.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from tests.fakes.fake_gateway import FakeGateway, RecordedRequest
from tests.functional.identity_support import (
    ADMIN_PORT,
    ALICE,
    alice_body,
    clawgate_config,
)
from tests.harness import ClawgateProcess
from tests.netns import GW_V4, Tailnet
from tests.util import open_in, read_response, read_to_close

__all__ = [
    "ALICE", "ALICE_PIC", "HOST", "IDENTITY_HEADER", "PORT", "alice_body", "forwarding_view",
    "gather_limited", "identity_config", "latencies", "norm", "plain_config", "raw_send",
    "running", "status_of", "timed_get",
]

PORT = 18789
HOST = f"{GW_V4}:{PORT}"
# A configured identity header outside the X-Forwarded-* / Tailscale-* families, so its
# removal is tested on its own, not through a prefix rule.
IDENTITY_HEADER = "X-Auth-Request-User"
ALICE_PIC = "https://lh3.googleusercontent.com/a/ACg8ocJexample=s96-c"


def norm(name: str) -> str:
    return name.lower().replace("_", "-")


def plain_config(gw: FakeGateway, **limits: Any) -> dict[str, Any]:
    """Tokens only (no tailscaled): requireToken, the tailnet allowed, nothing else."""
    return {
        "gateway": {"host": GW_V4, "port": PORT, "requireToken": True,
                    "allowedNetworks": ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]},
        "upstream": f"http://127.0.0.1:{gw.port}",
        "tailscale": {"requireIdentity": False},
        "limits": {"failedAuthLockout": 0, **limits},
    }


def identity_config(gw: FakeGateway, socket_path: str, **tailscale: Any) -> dict[str, Any]:
    """Token and identity, all identity headers on (clawgate sets every one of them)."""
    ts = {"identityHeader": IDENTITY_HEADER, "sendTailscaleHeaders": True, "timeout": 5,
          **tailscale}
    cfg = clawgate_config(gw, socket_path, tailscale=ts)
    cfg["gateway"]["requireToken"] = True
    return cfg


@contextlib.asynccontextmanager
async def running(tailnet: Tailnet, workdir: Path, config: dict[str, Any], *,
                  token_names: tuple[str, ...] = ("phone",)) -> AsyncIterator[ClawgateProcess]:
    cg = ClawgateProcess(workdir, config, netns=tailnet.ns("gw"), token_names=token_names,
                         admin_port=ADMIN_PORT)
    try:
        await cg.start()
        yield cg
    finally:
        await cg.stop()


async def raw_send(tailnet: Tailnet, role: str, data: bytes, *, host: str = GW_V4,
                   port: int = PORT, timeout: float = 10.0) -> bytes:
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
    if not resp.startswith(b"HTTP/1.1 ") or len(resp) < 12:
        return None
    return int(resp[9:12])


def forwarding_view(rec: RecordedRequest) -> dict[str, list[str]]:
    """Every forwarding / identity header the gateway received, by normalised name."""
    out: dict[str, list[str]] = {}
    for name, value in rec.headers:
        n = norm(name)
        if (n.startswith(("x-forwarded-", "tailscale-")) or n in (
                "forwarded", "x-real-ip", "true-client-ip", norm(IDENTITY_HEADER))):
            out.setdefault(n, []).append(value)
    return out


async def timed_get(tailnet: Tailnet, role: str, token: str, n: int,
                    path: str = "/echo") -> list[float]:
    """Latency of ``n`` sequential requests, each on a fresh connection from ``role``."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        reader, writer = await open_in(tailnet.ns(role), GW_V4, PORT)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}"
                     "\r\nConnection: close\r\n\r\n".encode())
        resp = await read_response(reader, timeout=10)
        writer.close()
        assert resp.status == 200, resp.raw
        out.append(time.perf_counter() - t0)
    return out


def latencies(values: Iterable[float]) -> tuple[float, float]:
    vals = list(values)
    return statistics.median(vals), max(vals)


async def gather_limited(coros: list[Any], limit: int) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


_ = alice_body
