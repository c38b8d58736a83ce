"""A flood of connections from a refused source, against the live proxy.

A separate process on the public host (198.18.0.7, outside allowedNetworks) opens
thousands of connections as fast as it can. Each is reset before a byte is read; the
allowed client's latency stays normal meanwhile; and the refusal log is rate-limited: a
handful of lines, the rest counted as ``suppressed``, so lines + suppressed account for
every single refused connection.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from pathlib import Path

from tests.fakes.fake_gateway import FakeGateway
from tests.netns import GW_V4, PHONE_V4, PUBLIC_V4, Tailnet
from tests.support import (
    PORT,
    latencies,
    plain_config,
    raw_send,
    running,
    timed_get,
)

FLOOD = 4000
FLOOD_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys, time
    host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    stats = {"attempts": 0, "reset": 0, "bytes": 0, "failed": 0}
    async def one():
        try:
            r, w = await asyncio.open_connection(host, port)
        except OSError:
            stats["failed"] += 1
            return
        try:
            w.write(b"GET /health HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
            data = await asyncio.wait_for(r.read(), 5)
            stats["bytes"] += len(data)
        except (OSError, asyncio.TimeoutError):
            stats["reset"] += 1
        finally:
            w.transport.abort()
    async def worker(deadline):
        while stats["attempts"] < count and time.monotonic() < deadline:
            stats["attempts"] += 1
            await one()
    async def main():
        print("started", flush=True)
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(worker(deadline) for _ in range(48)))
        print(json.dumps(stats), flush=True)
    asyncio.run(main())
""")


async def test_refused_flood_does_not_hurt_the_allowed_client(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(tailnet, tmp_path / "cg", plain_config(fake_gateway)) as cg:
        token = cg.tokens["phone"]
        baseline = await timed_get(tailnet, "phone", token, 30)
        proc = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            tailnet.ns("public"),
            sys.executable,
            "-c",
            FLOOD_SCRIPT,
            GW_V4,
            str(PORT),
            str(FLOOD),
            "20",
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            assert (await proc.stdout.readline()).strip() == b"started"
            during = await timed_get(tailnet, "phone", token, 30)
            stats = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
        finally:
            if proc.returncode is None:
                await asyncio.wait_for(proc.wait(), 30)
        assert stats["attempts"] == FLOOD and stats["bytes"] == 0, stats
        (m0, _), (m1, worst) = latencies(baseline), latencies(during)
        assert m1 < 3 * m0 + 0.03 and worst < 1.0, (baseline, during)

        # One more refusal after the burst flushes the suppressed count into a line.
        await asyncio.sleep(0.3)
        assert await raw_send(tailnet, "public", b"GET / HTTP/1.1\r\n\r\n") == b""
        total = stats["attempts"] - stats["failed"] + 1

        def refused() -> list[dict[str, object]]:
            return [
                r
                for r in cg.access_log()
                if r.get("event") == "refused" and r.get("peer") == PUBLIC_V4
            ]

        await cg.wait_log(
            lambda r: (
                r.get("event") == "refused"
                and "suppressed" in r
                and r is not None
                and _sum(refused()) == total
            ),
            timeout=10,
        )
        lines = refused()
        assert len(lines) < 60, len(lines)  # 10 per second (+ the burst), not 4000
        assert _sum(lines) == total
        assert all(r.get("reason") == "network not allowed" for r in lines)
        assert {r.header("X-Forwarded-For") for r in fake_gateway.requests} == {PHONE_V4}


def _sum(lines: list[dict[str, object]]) -> int:
    return len(lines) + sum(int(r.get("suppressed", 0)) for r in lines)  # type: ignore[call-overload]
