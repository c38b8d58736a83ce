"""Slow and oversized heads (slowloris) against the live proxy.

Many connections each send their head one byte at a time, forever: each is answered 408
and closed at the head deadline (which counts from the first byte and is not reset by
dribbling), while another host keeps being served at its normal latency. A head that
dribbles past the size limit gets 431 at that moment, without waiting for the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from tests.fakes.fake_gateway import FakeGateway
from tests.netns import GW_V4, GW_V6, Tailnet
from tests.support import (
    PORT,
    latencies,
    plain_config,
    running,
    status_of,
    timed_get,
)
from tests.util import open_in, read_to_close

HEAD_TIMEOUT = 2.0
SLOW = 60  # connections (from two addresses of the phone)


async def dribble(
    tailnet: Tailnet, host: str, data: bytes, interval: float
) -> tuple[int | None, float]:
    """Send ``data`` one byte per ``interval`` until the proxy answers; (status, seconds)."""
    # The clock starts before the connect: the proxy's head deadline runs from accept,
    # and under load the connect can return a few hundred ms after the proxy accepted.
    t0 = time.monotonic()
    reader, writer = await open_in(tailnet.ns("phone"), host, PORT)
    got = asyncio.ensure_future(read_to_close(reader, timeout=HEAD_TIMEOUT * 4))
    try:
        for i in range(len(data)):
            if got.done():
                break
            with contextlib.suppress(ConnectionError):
                writer.write(data[i : i + 1])
            await asyncio.wait([got], timeout=interval)
        resp = await got
        return status_of(resp), time.monotonic() - t0
    finally:
        got.cancel()
        writer.close()


async def test_slowloris_is_cut_at_the_deadline_while_others_are_served(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = plain_config(fake_gateway, headTimeout=HEAD_TIMEOUT, unauthenticatedPerIp=100)
    cfg["gateway"]["host"] = [GW_V4, GW_V6]
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        token = cg.tokens["phone"]
        baseline = await timed_get(tailnet, "ci", token, 20)
        fd0 = cg.fd_count()
        endless = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 10000
        slow = [
            asyncio.ensure_future(dribble(tailnet, host, endless, 0.25))
            for host in (GW_V4, GW_V6)
            for _ in range(SLOW // 2)
        ]
        await asyncio.sleep(0.5)  # all of them are dribbling now
        during = await timed_get(tailnet, "ci", token, 20)
        results = await asyncio.gather(*slow)
        assert [s for s, _ in results] == [408] * SLOW
        took = [t for _, t in results]
        assert HEAD_TIMEOUT - 0.1 < min(took) and max(took) < HEAD_TIMEOUT + 1.5, took
        (m0, _), (m1, worst) = latencies(baseline), latencies(during)
        assert m1 < 3 * m0 + 0.02 and worst < 0.5, (baseline, during)
        assert [r for r in fake_gateway.requests if r.header("X-Pad")] == []
        recs = [r for r in cg.access_log() if r.get("status") == 408]
        assert len(recs) == SLOW
        deadline = time.monotonic() + 5
        while cg.fd_count() > fd0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert cg.fd_count() <= fd0


async def test_oversized_dribble_is_431_before_the_deadline(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = plain_config(fake_gateway, headTimeout=30.0, headBytes=4096)
    async with running(tailnet, tmp_path / "cg", cfg):
        reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        got = asyncio.ensure_future(read_to_close(reader, timeout=20))
        for _ in range(10):  # 10 x 512 bytes, 50 ms apart: over 4 KiB after ~0.4 s
            if got.done():
                break
            writer.write(b"X-Pad: " + b"b" * 503 + b"\r\n")
            await asyncio.wait([got], timeout=0.05)
        assert status_of(await got) == 431
        assert time.monotonic() - t0 < 2.0
        writer.close()
        assert fake_gateway.requests == []
