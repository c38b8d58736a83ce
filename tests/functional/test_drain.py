"""Drain of a real clawgate on SIGTERM.

The listeners close at once (new connections are refused), idle keep-alive connections
are closed promptly, live WebSocket sessions keep working for limits.drainSeconds and are
then ended with a 1001 close frame, and the process exits with status 0, as soon as the
last connection is gone.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from tests.fakes.fake_gateway import FakeGateway
from tests.harness import ClawgateProcess
from tests.netns import GW_V4, Tailnet, connect_in
from tests.support import (
    PORT,
    base_config,
    bearer,
    closed_by_server,
    echo_ok,
    ws_open,
)
from tests.util import build_request, open_in, read_response, read_to_close


async def exit_status(cg: ClawgateProcess, timeout: float) -> tuple[int, float]:
    assert cg.proc is not None
    t0 = time.monotonic()
    while cg.proc.poll() is None:
        if time.monotonic() - t0 > timeout:
            raise AssertionError("clawgate did not exit")
        await asyncio.sleep(0.02)
    return cg.proc.returncode, time.monotonic()


async def test_sigterm_drains_then_closes_sessions_with_1001(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port, {"drainSeconds": 2})
    cg = ClawgateProcess(tmp_path / "cg", cfg, netns=tailnet.ns("gw"))
    await cg.start()
    try:
        token = cg.tokens["phone"]
        ws = await ws_open(tailnet, "phone", token)
        await echo_ok(ws)
        # A keep-alive connection, idle after one request.
        reader, writer = await open_in(tailnet.ns("ci"), GW_V4, PORT)
        writer.write(build_request("GET", "/echo", [bearer(token)]))
        assert (await read_response(reader)).status == 200

        cg.signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert await read_to_close(reader, timeout=1.0) == b""  # closed promptly
        assert time.monotonic() - t0 < 0.5
        writer.close()
        with pytest.raises(OSError):  # no longer accepting
            sock = await connect_in(tailnet.ns("phone"), GW_V4, PORT, timeout=2)
            sock.close()
        # The session lives on through the drain period...
        for i in range(5):
            await echo_ok(ws, f"draining {i}")
            await asyncio.sleep(0.1)
        # ... then gets a clean 1001.
        code, reason, t_closed = await closed_by_server(ws, timeout=5)
        assert (code, reason) == (1001, "server shutting down")
        assert 1.8 < t_closed - t0 < 3.5, t_closed - t0
        rc, _ = await exit_status(cg, 5)
        assert rc == 0
        recs = [r for r in cg.access_log() if r.get("event") == "close"]
        assert "server shutting down" in {r["reason"] for r in recs}
        assert "Traceback" not in cg.stderr()
    finally:
        await cg.stop()


async def test_drain_ends_as_soon_as_the_last_session_does(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port, {"drainSeconds": 30})
    cg = ClawgateProcess(tmp_path / "cg", cfg, netns=tailnet.ns("gw"))
    await cg.start()
    try:
        ws = await ws_open(tailnet, "phone", cg.tokens["phone"])
        await echo_ok(ws)
        cg.signal(signal.SIGTERM)
        await cg.wait_stderr("draining 1 connections")
        await echo_ok(ws)
        t0 = time.monotonic()
        await ws.close()  # the client finishes on its own
        rc, t_exit = await exit_status(cg, 5)
        assert rc == 0 and t_exit - t0 < 1.5
    finally:
        await cg.stop()


async def test_sigterm_with_nothing_open_exits_at_once(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port, {"drainSeconds": 30})
    cg = ClawgateProcess(tmp_path / "cg", cfg, netns=tailnet.ns("gw"))
    await cg.start()
    try:
        t0 = time.monotonic()
        cg.signal(signal.SIGTERM)
        rc, t_exit = await exit_status(cg, 5)
        assert rc == 0 and t_exit - t0 < 2.0
    finally:
        await cg.stop()
