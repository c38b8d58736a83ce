"""Logging out ends the WebSockets that session opened, with 1008 within a second.

The attack: a stolen or shared browser session keeps its live WebSocket after the owner
signs out. Other sessions (another login, a Bearer token) are untouched.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.fakes.fake_gateway import FakeGateway
from tests.netns import Tailnet
from tests.support import (
    base_config,
    closed_by_server,
    echo_ok,
    login_cookie,
    logout,
    running,
    with_cookie,
    ws_open,
    ws_with_cookie,
)


async def test_logout_ends_live_websockets_of_that_session(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(tailnet, tmp_path / "cg", base_config(fake_gateway.port)) as cg:
        token = cg.tokens["phone"]
        cookie = await login_cookie(tailnet, "phone", token)
        other = await login_cookie(tailnet, "phone", token)
        doomed = [
            await ws_with_cookie(tailnet, "phone", cookie),
            await ws_with_cookie(tailnet, "ci", cookie),
        ]
        kept = [
            await ws_with_cookie(tailnet, "phone", other),
            await ws_open(tailnet, "phone", token),
        ]
        for ws in (*doomed, *kept):
            await echo_ok(ws)
        t0 = time.monotonic()
        resp = await logout(tailnet, "phone", cookie)
        assert resp.status == 303
        for ws in doomed:
            code, reason, t = await closed_by_server(ws, timeout=3)
            assert (code, reason) == (1008, "logged out")
            assert t - t0 < 1.0, t - t0
        for ws in kept:
            await echo_ok(ws)
        assert (await with_cookie(tailnet, "phone", cookie)).status == 401
        assert (await with_cookie(tailnet, "phone", other)).status == 200
        ended = [r for r in cg.access_log() if r.get("event") == "session_ended"]
        assert [r["reason"] for r in ended] == ["logged out"] * 2
        for ws in kept:
            await ws.close()
