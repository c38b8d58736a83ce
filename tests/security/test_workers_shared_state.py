"""With ``workers: 2`` a login and a lockout are one for the whole clawgate.

The attacks: a fresh cookie is only known to the worker that created it (401 on the
connections the kernel gives to the other worker), a logout only ends the WebSockets of
one worker, and N workers let through N times the configured count of failed logins.
A real 2-worker clawgate (SO_REUSEPORT spreads the connections; ``ss`` says which worker
holds each one) must behave exactly as one process does.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.fakes.fake_gateway import FakeGateway
from tests.functional.hardening_support import (
    base_config,
    closed_by_server,
    echo_ok,
    get,
    running,
    ws_open,
)
from tests.functional.test_workers import _children
from tests.netns import Tailnet
from tests.security.session_support import (
    login,
    login_cookie,
    logout,
    pids_holding,
    with_cookie,
    ws_with_cookie,
)
from tests.util import poll_until

COUNT = 8


def _config(port: int) -> dict[str, object]:
    return base_config(port, {"failedAuthCount": COUNT, "failedAuthWindow": 60,
                              "failedAuthLockout": 300}, workers=2)


async def test_cookie_logout_and_lockout_are_shared_by_the_workers(
        tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path) -> None:
    async with running(tailnet, tmp_path / "cg", _config(fake_gateway.port)) as cg:
        await poll_until(lambda: cg.stderr().count("listening on") >= 2, timeout=15)
        workers = set(_children(cg.pid))
        assert len(workers) == 2, workers
        token = cg.tokens["phone"]

        # A fresh cookie works on every connection, whichever worker takes it.
        cookie = await login_cookie(tailnet, "phone", token)
        statuses = [(await with_cookie(tailnet, "phone", cookie)).status for _ in range(40)]
        assert statuses == [200] * 40
        ids = [r["conn"] for r in cg.access_log() if r.get("event") == "decision"]
        assert len(ids) == 40 and len(set(ids)) < len(ids), "one worker served everything"

        # Logout in one worker ends the session's WebSockets in both, within 1 s.
        held = [await ws_with_cookie(tailnet, "phone", cookie) for _ in range(10)]
        kept = await ws_open(tailnet, "phone", token)
        for ws in (*held, kept):
            await echo_ok(ws)
        holders = set(pids_holding(tailnet.ns("gw")))
        assert holders == workers, (holders, workers)  # the WebSockets are in both
        t0 = time.monotonic()
        assert (await logout(tailnet, "phone", cookie)).status == 303
        for ws in held:
            code, reason, t = await closed_by_server(ws, timeout=3)
            assert (code, reason) == (1008, "logged out")
            assert t - t0 < 1.0, t - t0
        await echo_ok(kept)
        # (Fewer than COUNT: each 401 is a failed authentication of the phone.)
        statuses = [(await with_cookie(tailnet, "phone", cookie)).status for _ in range(6)]
        assert statuses == [401] * 6

        # Exactly COUNT failed logins across both workers, then the address is locked
        # out (429), whichever worker answers, even with the right token.
        for i in range(COUNT):
            resp = await login(tailnet, "ci", "wrong-token")
            assert resp.status == 401, (i, resp.raw)
        for _ in range(8):
            resp = await get(tailnet, "ci", "/echo", token)
            assert resp.status == 429, resp.raw
            assert 290 <= int(resp.header("Retry-After") or b"0") <= 301
        assert (await login(tailnet, "ci", token)).status == 429
        locks = [r for r in cg.access_log() if r.get("event") == "lockout"]
        assert len(locks) == 1 and locks[0]["peer"] == "100.88.12.34"
        assert (await get(tailnet, "phone", "/echo", token)).status == 200
        await kept.close()
