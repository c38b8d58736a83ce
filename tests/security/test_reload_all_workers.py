"""Issue 12 item 2: with ``workers: 2``, revoke and reload must reach every worker.

The attack: the admin's ``POST /-/reload`` ran in worker 0 only, so after ``clawgate
token revoke phone`` the other worker kept accepting the token and kept its live sessions.
Here a real 2-worker clawgate (SO_REUSEPORT, one parent) holds WebSocket sessions of the
token in both workers; once the CLI returns, 0 of 40 new connections with the token are
accepted and every live session of it is closed with 1008. A config one worker refuses is
applied by none, and the CLI says so per worker and exits non-zero.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from pathlib import Path

from websockets.asyncio.client import ClientConnection

from tests.fakes.fake_gateway import FakeGateway
from tests.harness import ClawgateProcess
from tests.netns import Tailnet
from tests.support import (
    base_config,
    cli_in_gw,
    closed_by_server,
    echo_ok,
    get,
    running,
    ws_open,
)

N_NEW = 40


async def _both_workers_listening(cg: ClawgateProcess) -> None:
    for _ in range(200):
        if cg.stderr().count("listening on") >= 2:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(cg.stderr())


async def _worker0_tunnels(cg: ClawgateProcess) -> int:
    status, body = await cg.admin_json("/connections")
    assert status == 200, body
    return sum(1 for c in body["connections"] if c.get("websocket"))


async def _sessions_in_both_workers(
    tailnet: Tailnet, cg: ClawgateProcess, token: str
) -> list[ClientConnection]:
    """Open sessions of ``token`` until both workers hold some (worker 0's admin sees
    only its own connections; the rest are in worker 1)."""
    sessions: list[ClientConnection] = []
    for _ in range(24):
        sessions.append(await ws_open(tailnet, "phone", token))
        await echo_ok(sessions[-1])
        n0 = await _worker0_tunnels(cg)
        if len(sessions) >= 4 and 0 < n0 < len(sessions):
            return sessions
    raise AssertionError("the kernel put every session in one worker")


async def test_token_revoke_reaches_every_worker(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port, workers=2)
    async with running(tailnet, tmp_path / "cg", cfg, token_names=("phone", "laptop")) as cg:
        await _both_workers_listening(cg)
        phone, laptop = cg.tokens["phone"], cg.tokens["laptop"]
        doomed = await _sessions_in_both_workers(tailnet, cg, phone)
        kept = await ws_open(tailnet, "phone", laptop)
        await echo_ok(kept)

        res = cli_in_gw(cg, "token", "revoke", "phone", "--config", str(cg.config_path))
        assert res.returncode == 0, res.stderr

        # No sleep: when the CLI has returned, every worker has applied the revocation.
        statuses = [(await get(tailnet, "phone", "/echo", phone)).status for _ in range(N_NEW)]
        assert statuses.count(200) == 0, statuses
        assert set(statuses) == {401}, statuses
        for ws in doomed:
            code, reason, _ = await closed_by_server(ws, timeout=3)
            assert (code, reason) == (1008, "token phone revoked")
        ended = [r for r in cg.access_log() if r.get("event") == "session_ended"]
        assert len(ended) == len(doomed), ended
        # The CLI names each worker and its result.
        assert len(re.findall(r"worker \d \(pid \d+\): reloaded", res.stderr)) == 2, res.stderr
        # Another token's session, in whichever worker, is untouched; the token works.
        await echo_ok(kept)
        assert (await get(tailnet, "ci", "/echo", laptop)).status == 200
        await kept.close()


async def test_bad_config_is_refused_by_every_worker_and_the_cli_says_so(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port, workers=2)
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        await _both_workers_listening(cg)
        token = cg.tokens["phone"]
        sessions = await _sessions_in_both_workers(tailnet, cg, token)
        bad = json.loads(json.dumps(cg.config))
        bad["limits"]["maxConnections"] = 0
        # The CLI reads a good copy (it finds the admin port there); clawgate the bad file.
        (tmp_path / "cg" / "cli.json").write_text(cg.config_path.read_text())
        cg.write_config(bad)
        res = cli_in_gw(cg, "reload", "--config", str(tmp_path / "cg" / "cli.json"))
        assert res.returncode != 0, res
        assert "reload refused" in res.stderr and "limits.maxConnections" in res.stderr
        assert (
            len(re.findall(r"worker \d \(pid \d+\): refused: limits.maxConnections", res.stderr))
            == 2
        ), res.stderr
        # Every worker keeps the old config: the token works on every connection and the
        # sessions live on.
        statuses = [(await get(tailnet, "ci", "/echo", token)).status for _ in range(N_NEW)]
        assert set(statuses) == {200}, statuses
        for ws in sessions:
            await echo_ok(ws)
        refused = [
            r
            for r in cg.access_log()
            if r.get("event") == "reload" and r.get("result") == "refused"
        ]
        assert len(refused) == 2, refused  # one line per worker
        assert not [
            r for r in cg.access_log() if r.get("event") == "reload" and r.get("result") == "ok"
        ]

        # SIGHUP to the parent (systemctl reload) takes the same path: a token added to
        # the file is accepted by every worker once the parent has fanned it out.
        cg.write_config(cfg | {"tokens": bad["tokens"], "log": bad["log"], "admin": bad["admin"]})
        from proxy.keystore import TokenFile

        laptop = TokenFile(cg.token_path).add("laptop")
        cg.signal(signal.SIGHUP)
        await cg.wait_stderr("reload applied by all 2 workers")
        statuses = [(await get(tailnet, "ci", "/echo", laptop)).status for _ in range(N_NEW)]
        assert set(statuses) == {200}, statuses
        for ws in sessions:
            await ws.close()
