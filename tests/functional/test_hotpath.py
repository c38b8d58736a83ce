"""Behaviour the hot-path optimisations must keep (benchmarks/notes/hotpath.md).

The gateway dial is a bare connect task with a timer instead of a coroutine under
asyncio.timeout: a gateway that never completes the TCP handshake (a listener whose accept
queue is full drops SYNs) still gets a 502 after ``connectTimeout``, and clients that
leave during such a dial leave nothing behind. The access log writes the lines of one
event-loop iteration in one go: a burst of connections still logs every line, whole and
valid, and nothing waits for a timer to show up.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.fake_gateway import FakeGateway
from tests.netns import GW_V4, Tailnet, listen_in, socket_in
from tests.support import (
    PORT,
    base_config,
    get,
    metric,
    running,
)
from tests.util import open_in

CONNECT_TIMEOUT = 0.3


@pytest.fixture
def stalled_gateway(tailnet: Tailnet) -> Iterator[int]:
    """A port on the gw namespace's loopback that never completes a TCP handshake."""
    ns = tailnet.ns("gw")
    lsock = listen_in(ns, "127.0.0.1", 0, backlog=0)
    port = lsock.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        # backlog 0 queues one connection; with the queue full, SYNs are dropped.
        for _ in range(3):
            s = socket_in(ns)
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        yield port
    finally:
        for s in fillers:
            s.close()
        lsock.close()


async def test_dial_timeout_is_a_502_and_serving_goes_on(
    tailnet: Tailnet, stalled_gateway: int, tmp_path: Path
) -> None:
    cfg = base_config(stalled_gateway)
    cfg["upstream"] = {
        "url": f"http://127.0.0.1:{stalled_gateway}",
        "connectTimeout": CONNECT_TIMEOUT,
    }
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        token = cg.tokens["phone"]
        for _ in range(2):  # the second one proves the first left the proxy healthy
            t0 = time.monotonic()
            resp = await get(tailnet, "phone", "/echo", token, timeout=5)
            took = time.monotonic() - t0
            assert resp.status == 502
            assert b"did not accept the connection in time" in resp.body
            assert CONNECT_TIMEOUT * 0.9 <= took < CONNECT_TIMEOUT + 1.5
        rec = await cg.wait_log(lambda r: r.get("event") == "upstream_error")
        assert rec["reason"] == "gateway did not accept the connection in time"
        assert await metric(cg, "clawgate_upstream_errors") == 2
        assert "Traceback" not in cg.stderr()


async def test_clients_leaving_during_a_dial_leave_nothing_behind(
    tailnet: Tailnet, stalled_gateway: int, tmp_path: Path
) -> None:
    cfg = base_config(stalled_gateway)
    cfg["upstream"] = {"url": f"http://127.0.0.1:{stalled_gateway}", "connectTimeout": 1}
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        token = cg.tokens["phone"]
        fds = cg.fd_count()
        writers = []
        for _ in range(5):
            _, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
            writer.write(
                f"GET /echo HTTP/1.1\r\nHost: {GW_V4}\r\n"
                f"Authorization: Bearer {token}\r\n\r\n".encode()
            )
            writers.append(writer)
        # All five are dialing (decided, the gateway socket in SYN_SENT) ...
        deadline = time.monotonic() + 5
        while len([r for r in cg.access_log() if r.get("decision") == "allow"]) < 5:
            assert time.monotonic() < deadline, "requests never reached the dial"
            await asyncio.sleep(0.02)
        for w in writers:
            w.transport.abort()  # ... and their clients go away (RST)
        # Reading is paused while dialing, so the proxy learns of it when the dial ends
        # (here: connectTimeout); then every socket and timer of those connections is gone.
        deadline = time.monotonic() + 5
        while await metric(cg, "clawgate_connections_active") > 0 or cg.fd_count() > fds:
            assert time.monotonic() < deadline, f"left behind: fds {cg.fd_count()} > {fds}"
            await asyncio.sleep(0.05)
        closes = [r for r in cg.access_log() if r.get("event") == "close"]
        assert len(closes) == 5
        assert "Traceback" not in cg.stderr()
        resp = await get(tailnet, "phone", "/echo", token, timeout=5)
        assert resp.status == 502  # and it still answers


async def test_a_burst_logs_every_line_whole(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(tailnet, tmp_path / "cg", base_config(fake_gateway.port)) as cg:
        token = cg.tokens["phone"]
        n = 40
        resps = await asyncio.gather(
            *(get(tailnet, "phone" if i % 2 else "ci", "/echo", token) for i in range(n))
        )
        assert all(r.status == 200 for r in resps)

        def lines() -> list[str]:
            return cg.access_path.read_text().splitlines()

        deadline = time.monotonic() + 3
        while sum('"event":"close"' in ln for ln in lines()) < n:
            assert time.monotonic() < deadline, lines()
            await asyncio.sleep(0.02)
        recs = [json.loads(ln) for ln in lines()]  # every line whole, valid JSON
        assert all(next(iter(r)) == "time" and r["time"].endswith("Z") for r in recs)
        decisions = [r for r in recs if r.get("event") == "decision"]
        closes = [r for r in recs if r.get("event") == "close"]
        assert len(decisions) == n and len(closes) == n
        assert {r["conn"] for r in decisions} == {r["conn"] for r in closes}
        assert await metric(cg, "clawgate_log_errors") == 0
