"""With ``workers: 2`` a login and a lockout are one for the whole clawgate.

The attacks: a fresh cookie is only known to the worker that created it (401 on the
connections the kernel gives to the other worker), a logout only ends the WebSockets of
one worker, and N workers let through N times the configured count of failed logins.
A real 2-worker clawgate (SO_REUSEPORT spreads the connections; ``ss`` says which worker
holds each one) must behave exactly as one process does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from tests.fakes.fake_gateway import FakeGateway
from tests.functional.test_workers import _children
from tests.harness import ClawgateProcess
from tests.netns import Tailnet
from tests.support import (
    base_config,
    closed_by_server,
    echo_ok,
    get,
    login,
    login_cookie,
    logout,
    pids_holding,
    running,
    with_cookie,
    ws_open,
    ws_with_cookie,
)
from tests.util import poll_until

COUNT = 8


def _config(port: int) -> dict[str, object]:
    return base_config(
        port,
        {"failedAuthCount": COUNT, "failedAuthWindow": 60, "failedAuthLockout": 300},
        workers=2,
    )


@contextlib.asynccontextmanager
async def two_workers(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> AsyncIterator[tuple[ClawgateProcess, set[int]]]:
    async with running(tailnet, tmp_path / "cg", _config(fake_gateway.port)) as cg:
        await poll_until(lambda: cg.stderr().count("listening on") >= 2, timeout=15)
        workers = set(_children(cg.pid))
        assert len(workers) == 2, workers
        yield cg, workers


async def test_a_fresh_cookie_works_on_every_worker(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with two_workers(tailnet, fake_gateway, tmp_path) as (cg, _):
        cookie = await login_cookie(tailnet, "phone", cg.tokens["phone"])
        statuses = [(await with_cookie(tailnet, "phone", cookie)).status for _ in range(40)]
        assert statuses == [200] * 40
        ids = [r["conn"] for r in cg.access_log() if r.get("event") == "decision"]
        assert len(ids) == 40 and len(set(ids)) < len(ids), "one worker served everything"
        # The sessions survive a reload of every worker.
        cg.reload()
        await poll_until(
            lambda: (
                len(
                    [
                        r
                        for r in cg.access_log()
                        if r.get("event") == "reload" and r.get("result") == "ok"
                    ]
                )
                >= 2
            ),
            timeout=10,
        )
        statuses = [(await with_cookie(tailnet, "phone", cookie)).status for _ in range(20)]
        assert statuses == [200] * 20


async def test_logout_ends_the_sessions_websockets_in_every_worker(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with two_workers(tailnet, fake_gateway, tmp_path) as (cg, workers):
        token = cg.tokens["phone"]
        cookie = await login_cookie(tailnet, "phone", token)
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
        await kept.close()


async def test_failed_logins_across_workers_lock_out_at_exactly_the_count(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with two_workers(tailnet, fake_gateway, tmp_path) as (cg, _):
        token = cg.tokens["phone"]
        for i in range(COUNT):
            resp = await login(tailnet, "ci", "wrong-token")
            assert resp.status == 401, (i, resp.raw)
        # Locked out (429) whichever worker answers, even with the right token.
        for _ in range(8):
            resp = await get(tailnet, "ci", "/echo", token)
            assert resp.status == 429, resp.raw
            assert 290 <= int(resp.header("Retry-After") or b"0") <= 301
        assert (await login(tailnet, "ci", token)).status == 429
        locks = [r for r in cg.access_log() if r.get("event") == "lockout"]
        assert len(locks) == 1 and locks[0]["peer"] == "100.88.12.34"
        assert (await get(tailnet, "phone", "/echo", token)).status == 200
        ids = [
            r["conn"]
            for r in cg.access_log()
            if r.get("event") == "local" and r.get("status") == 401
        ]
        assert len(ids) == COUNT  # (all of them in one worker: 2 in 2**COUNT runs)
