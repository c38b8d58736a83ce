"""clawgate against a misbehaving tailscaled, and the identity cache kept honest by the IPN bus.

tailscaled killed (stale socket), its socket removed, slow beyond ``tailscale.timeout``,
answering bad JSON or 503: every request fails closed with 503 and a one-line reason,
and service resumes when the daemon is back, with no restart of clawgate. The IPN bus
flushes the cache (a removed peer is refused on its next connection); the TTL expires
entries; concurrent first connections of a peer share one whois.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.fake_gateway import FakeGateway
from tests.harness import ROOT, ClawgateProcess
from tests.netns import CI_V4, PHONE_V4, Tailnet
from tests.support import (
    ALICE,
    CI_NODE,
    alice_body,
    clawgate_config,
    eventually,
    fake_tailscaled,
    request,
    running,
    tailnet_peers,
)

TIMEOUT = 0.5  # tailscale.timeout in these tests


class StandaloneTailscaled:
    """The fake daemon as its own process, so it can be SIGKILLed like a crashed tailscaled."""

    def __init__(self, socket_path: str, workdir: Path) -> None:
        self.socket_path = socket_path
        self.peers_file = workdir / "peers.json"
        self.peers_file.write_text(
            json.dumps(
                [{"ip": ip, "body": body, "path": path} for ip, body, path in tailnet_peers()]
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fakes.fake_tailscaled",
                "--socket",
                self.socket_path,
                "--peers",
                str(self.peers_file),
                "--no-default-peers",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=str(ROOT),
            env=env,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 10)
        assert b"listening" in line, line

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        elif self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


async def health(cg: ClawgateProcess) -> tuple[int, Any]:
    return await cg.admin_json("/health")


async def wait_bus(cg: ClawgateProcess) -> None:
    """Until clawgate's IPN bus watcher is connected (its connect-flush has happened)."""
    await eventually(
        lambda: health(cg), lambda r: bool((r[1].get("tailscale") or {}).get("bus_connected"))
    )


def assert_one_line_503(resp: Any, where: str) -> None:
    assert resp.status == 503, (where, resp)
    assert resp.body.endswith(b"\n") and resp.body.count(b"\n") == 1, (where, resp.body)
    assert resp.body.startswith(b"tailscale identity unavailable: "), (where, resp.body)


@asynccontextmanager
async def daemon(kind: str, tmp: Path) -> AsyncIterator[tuple[Any, str]]:
    if kind == "killed":
        sock_dir = Path(tempfile.mkdtemp(prefix="cgts-", dir="/tmp"))
        st = StandaloneTailscaled(str(sock_dir / "tailscaled.sock"), tmp)
        await st.start()
        try:
            yield st, st.socket_path
        finally:
            st.stop()
            for p in sock_dir.iterdir():
                p.unlink()
            sock_dir.rmdir()
        return
    async with fake_tailscaled() as fake:
        yield fake, fake.socket_path


@pytest.mark.parametrize("failure", ["killed", "socket-removed", "slow", "badjson", "503"])
async def test_tailscaled_failure_fails_closed_then_recovers(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path, failure: str
) -> None:
    async with daemon(failure, tmp_path) as (ts, sock):
        # A long TTL: only the IPN bus (or its loss) can make clawgate ask again.
        cfg = clawgate_config(fake_gateway, sock, tailscale={"timeout": TIMEOUT, "cacheTtl": 3600})
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            token = cg.tokens["phone"]
            pid = cg.pid
            await wait_bus(cg)
            assert (await request(tailnet, "phone", token=token)).status == 200
            assert (await request(tailnet, "ci", token=token)).status == 200

            # Break it.
            if failure == "killed":
                ts.kill()  # a stale socket file is left behind: connection refused
                assert os.path.exists(sock)
            elif failure == "socket-removed":
                await ts.stop()
                assert not os.path.exists(sock)
            else:
                ts.mode = failure
                ts.slow_seconds = 30 * TIMEOUT
                # The network map changes while the daemon is sick: the cache is flushed,
                # so the next connection must ask.
                ts.push_notify({"PeersChanged": [alice_body()["Node"]]})

            first = await eventually(
                lambda: request(tailnet, "phone", token=token), lambda r: r.status != 200
            )
            assert_one_line_503(first, "first")
            before = len(fake_gateway.requests)
            for role in ("phone", "ci", "public"):
                for tok in (token, None):
                    t0 = time.monotonic()
                    resp = await request(tailnet, role, token=tok)
                    took = time.monotonic() - t0
                    assert_one_line_503(resp, f"{failure}/{role}/{tok is not None}")
                    # tailscale.timeout bounds the wait, not the daemon's 15 s stall.
                    assert took < TIMEOUT + 4, (role, took)
            assert len(fake_gateway.requests) == before  # nothing reached the gateway
            recs = [
                r
                for r in cg.access_log()
                if r.get("event") == "decision" and r.get("status") == 503
            ]
            assert recs and all(r["decision"] == "deny" for r in recs)
            assert all("\n" not in r["reason"] for r in recs)
            if failure == "slow":
                assert b"timed out" in first.body
            elif failure == "badjson":
                assert b"invalid JSON" in first.body
            elif failure == "503":
                assert b"503" in first.body
            # Health says so too, without waiting for the 30 s status poll.
            st, body = await eventually(lambda: health(cg), lambda r: r[0] == 503)
            assert body["status"] == "degraded"

            # Back again: same clawgate process, service resumes.
            if failure == "killed":
                await ts.start()
            elif failure == "socket-removed":
                await ts.start()
            else:
                ts.mode = "ok"
                ts._release.set()  # noqa: SLF001 - let stalled slow handlers finish now
            await eventually(
                lambda: request(tailnet, "phone", token=token),
                lambda r: r.status == 200,
                timeout=10,
            )
            for role in ("phone", "ci"):
                assert (await request(tailnet, role, token=token)).status == 200
            assert (await request(tailnet, "public", token=token)).status == 403
            await eventually(lambda: health(cg), lambda r: r[0] == 200, timeout=10)
            assert cg.pid == pid and cg.proc is not None and cg.proc.poll() is None
            assert "Traceback" not in cg.stderr()


async def test_removed_peer_is_refused_on_next_connection(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(fake_gateway, ts.socket_path, tailscale={"cacheTtl": 3600})
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            token = cg.tokens["phone"]
            await wait_bus(cg)
            for _ in range(3):
                assert (await request(tailnet, "phone", token=token)).status == 200
            assert ts.whois_calls[PHONE_V4] == 1  # cached by peer IP
            ts.remove_peer(PHONE_V4)  # PeersRemoved on the bus
            resp = await eventually(
                lambda: request(tailnet, "phone", token=token), lambda r: r.status != 200, timeout=3
            )
            assert resp.status == 403 and resp.body == b"not a known tailnet peer\n"
            assert ts.whois_calls[PHONE_V4] == 2
            # Other peers are unaffected.
            assert (await request(tailnet, "ci", token=token)).status == 200
            assert ts.whois_calls[CI_V4] == 1
            ts.add_peer(PHONE_V4, alice_body())  # PeersChanged: back on the tailnet
            await eventually(
                lambda: request(tailnet, "phone", token=token), lambda r: r.status == 200, timeout=3
            )


@pytest.mark.parametrize("how", ["closed", "fell-behind", "aborted"])
async def test_bus_reconnect_flushes_the_cache(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path, how: str
) -> None:
    """Changes made while the bus was down were not seen: reconnect, and ask again."""
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(fake_gateway, ts.socket_path, tailscale={"cacheTtl": 3600})
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            token = cg.tokens["phone"]
            await wait_bus(cg)
            assert (await request(tailnet, "phone", token=token)).status == 200
            assert ts.whois_calls[PHONE_V4] == 1
            bus_requests = sum(1 for r in ts.requests if r.path.endswith("watch-ipn-bus"))
            if how == "closed":
                ts.drop_watchers()
            elif how == "fell-behind":
                ts.fall_behind()
            else:
                ts.drop_watchers(abort=True)
            await eventually(
                lambda: asyncio.sleep(0, ts.requests),
                lambda reqs: (
                    sum(1 for r in reqs if r.path.endswith("watch-ipn-bus")) > bus_requests
                    and ts.watcher_count == 1
                ),
            )
            await wait_bus(cg)
            assert (await request(tailnet, "phone", token=token)).status == 200
            assert ts.whois_calls[PHONE_V4] == 2


async def test_cache_ttl(tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path) -> None:
    ttl = 0.6
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(fake_gateway, ts.socket_path, tailscale={"cacheTtl": ttl})
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            token = cg.tokens["phone"]
            await wait_bus(cg)
            t0 = time.monotonic()
            assert (await request(tailnet, "phone", token=token)).status == 200
            assert (await request(tailnet, "phone", token=token)).status == 200
            assert ts.whois_calls[PHONE_V4] == 1

            async def count() -> int:
                assert (await request(tailnet, "phone", token=token)).status == 200
                return ts.whois_calls[PHONE_V4]

            await eventually(count, lambda n: n == 2, timeout=5, interval=0.1)
            assert time.monotonic() - t0 >= ttl


async def test_one_whois_per_new_peer_under_concurrency(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(fake_gateway, ts.socket_path, tailscale={"timeout": 3})
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            token = cg.tokens["phone"]
            await wait_bus(cg)
            # Each whois takes 0.4 s: every connection below arrives while it is in flight.
            ts.mode, ts.slow_seconds = "slow", 0.4
            ts.whois_calls.clear()
            jobs = [request(tailnet, role, token=token) for role in ["phone"] * 25 + ["ci"] * 15]
            results = await asyncio.gather(*jobs)
            assert [r.status for r in results] == [200] * 40
            assert dict(ts.whois_calls) == {PHONE_V4: 1, CI_V4: 1}
            users = [r.header("X-Forwarded-User") for r in fake_gateway.requests]
            assert users.count(ALICE) == 25 and users.count(CI_NODE) == 15
