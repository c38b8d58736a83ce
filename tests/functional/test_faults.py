"""Faults a real clawgate survives without a restart.

tailscaled (the fake, as its own process) SIGKILLed and restarted under load: requests
get 503 meanwhile and are never allowed, then 200 again. The gateway (the fake, as its
own process in the gw namespace) SIGKILLed and restarted: 502, then service resumes. The
access log failing (a full disk: /dev/full and a full tmpfs; stdout a pipe nobody reads):
serving goes on and the lost lines are counted in /metrics. File descriptors exhausted
(RLIMIT_NOFILE set low with prlimit): 503 while connections fit, accept-and-close past
that, no busy loop, and service resumes once they are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection

from tests.fakes.fake_gateway import FakeGateway
from tests.harness import ROOT, ClawgateProcess
from tests.netns import GW_V4, Tailnet, open_connection_in, run_in
from tests.support import (
    PORT,
    base_config,
    clawgate_config,
    closed_by_server,
    cpu_seconds,
    echo_ok,
    eventually,
    get,
    metric,
    running,
    tailnet_peers,
    ws_open,
)
from tests.util import Response, build_request, open_in, read_response

# ------------------------------------------------------------------ tailscaled


class StandaloneTailscaled:
    """The fake tailscaled as its own process, so it can be SIGKILLed like a crash."""

    def __init__(self, socket_path: str, peers_file: Path) -> None:
        self.socket_path = socket_path
        self.peers_file = peers_file
        peers_file.write_text(
            json.dumps(
                [{"ip": ip, "body": body, "path": path} for ip, body, path in tailnet_peers()]
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
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
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 10)
        assert b"listening" in line, line

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


async def test_tailscaled_killed_and_restarted_under_load(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="cgts-", dir="/tmp"))  # sun_path is short
    tsd = StandaloneTailscaled(str(sock_dir / "ts.sock"), tmp_path / "peers.json")
    await tsd.start()
    try:
        cfg = clawgate_config(
            fake_gateway,
            tsd.socket_path,
            tailscale={"timeout": 0.5, "cacheTtl": 3600},
            gateway={"requireToken": True},
        )
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            token = cg.tokens["phone"]
            pid = cg.pid
            results: list[tuple[float, int]] = []  # (start time, status)
            stop = asyncio.Event()

            async def load(role: str) -> None:
                while not stop.is_set():
                    t0 = time.monotonic()
                    resp = await get(tailnet, role, "/echo", token, timeout=5)
                    results.append((t0, resp.status))

            workers = [asyncio.create_task(load(role)) for role in ("phone", "ci") * 4]
            await eventually(lambda: asyncio.sleep(0, len(results)), lambda n: n > 40)
            t_kill = time.monotonic()
            tsd.kill()
            await eventually(
                lambda: asyncio.sleep(0, results[-1][1]), lambda s: s == 503, timeout=5
            )
            t_first_503 = min(t for t, s in results if s == 503)
            await asyncio.sleep(1.0)  # down for a while, under load
            t_restart = time.monotonic()
            await tsd.start()
            await eventually(
                lambda: asyncio.sleep(0, results[-1][1]), lambda s: s == 200, timeout=10
            )
            t_back = min(t for t, s in results if s == 200 and t > t_restart)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*workers)

            assert {s for _, s in results} <= {200, 503}
            assert t_first_503 - t_kill < 1.0  # noticed at once (the IPN bus dropped)
            down = [s for t, s in results if t_first_503 <= t < t_restart]
            assert len(down) > 20 and set(down) == {503}  # never allowed while down
            assert {s for t, s in results if t > t_back + 0.2} == {200}
            assert t_back - t_restart < 6.0
            assert cg.pid == pid and cg.proc is not None and cg.proc.poll() is None
            denied = [r for r in cg.access_log() if r.get("status") == 503]
            assert denied and all(r["decision"] == "deny" for r in denied)
            assert "Traceback" not in cg.stderr()
    finally:
        tsd.kill()
        shutil.rmtree(sock_dir, ignore_errors=True)


# ------------------------------------------------------------------ the gateway


class GatewayProcess:
    """The fake gateway as its own process on gw's loopback (a fixed port, to restart)."""

    def __init__(self, tailnet: Tailnet, port: int) -> None:
        self.ns = tailnet.ns("gw")
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = run_in(
            self.ns,
            [
                sys.executable,
                "-m",
                "tests.fakes.fake_gateway",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 10)
        assert line.startswith(b"READY"), line

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


async def test_gateway_killed_and_restarted(tailnet: Tailnet, tmp_path: Path) -> None:
    gw = GatewayProcess(tailnet, 18795)
    await gw.start()
    try:
        async with running(tailnet, tmp_path / "cg", base_config(gw.port)) as cg:
            token = cg.tokens["phone"]
            ws = await ws_open(tailnet, "phone", token)
            await echo_ok(ws)
            assert (await get(tailnet, "phone", "/echo", token)).status == 200
            gw.kill()
            code, _, _ = await closed_by_server(ws, timeout=5)
            assert code is None  # the gateway vanished: no close frame to relay
            for role in ("phone", "ci"):
                t0 = time.monotonic()
                resp = await get(tailnet, role, "/echo", token)
                assert resp.status == 502, resp.raw
                assert b"gateway refused the connection" in resp.body
                assert time.monotonic() - t0 < 1.0
            await gw.start()
            assert (await get(tailnet, "phone", "/echo", token)).status == 200
            ws = await ws_open(tailnet, "ci", token)
            await echo_ok(ws)
            await ws.close()
            assert await metric(cg, "clawgate_upstream_errors") >= 2
            assert "Traceback" not in cg.stderr()
    finally:
        gw.kill()


# ------------------------------------------------------------------ the access log


async def _serve_some(tailnet: Tailnet, token: str, n: int) -> None:
    for i in range(n):
        resp = await get(tailnet, "phone" if i % 2 else "ci", "/echo", token)
        assert resp.status == 200


async def test_access_log_on_a_full_device(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port, log={"access": "/dev/full"})
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        token = cg.tokens["phone"]
        fds = cg.fd_count()
        await _serve_some(tailnet, token, 20)
        # A decision and a close line per request (the last close may trail the response).
        lost = await eventually(lambda: metric(cg, "clawgate_log_errors"), lambda n: n >= 40)
        await _serve_some(tailnet, token, 10)
        await eventually(lambda: metric(cg, "clawgate_log_errors"), lambda n: n >= lost + 20)
        assert cg.fd_count() <= fds + 1  # reopening the log leaks nothing
        assert cg.stderr().count("access log /dev/full") == 1  # one warning, not a flood


@contextlib.contextmanager
def tiny_tmpfs(size: str = "64k") -> Any:
    mnt = Path(tempfile.mkdtemp(prefix="cg-tmpfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


async def test_access_log_disk_full_then_freed(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    with tiny_tmpfs() as mnt:
        log = mnt / "access.log"
        cfg = base_config(fake_gateway.port, log={"access": str(log)})
        cg = ClawgateProcess(tmp_path / "cg", cfg, netns=tailnet.ns("gw"))
        await cg.start()
        try:
            token = cg.tokens["phone"]
            await _serve_some(tailnet, token, 2)
            filler = mnt / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                for _ in range(1000):  # 64 KiB fills in 16; bounded all the same
                    os.write(fd, b"x" * 4096)
            except OSError as exc:
                assert exc.errno == 28  # ENOSPC: the disk is full now
            finally:
                os.close(fd)
            await _serve_some(tailnet, token, 20)
            assert await metric(cg, "clawgate_log_errors") >= 20

            def decisions() -> int:
                n = 0
                for line in log.read_text(errors="replace").splitlines():
                    with contextlib.suppress(ValueError):
                        n += json.loads(line).get("event") == "decision"
                return n

            before = decisions()
            filler.unlink()  # space again: the log recovers by itself
            await _serve_some(tailnet, token, 4)
            # Every one of the 4 is there, none glued to a line torn by the full disk.
            await eventually(
                lambda: asyncio.sleep(0, decisions()), lambda n: n >= before + 4, timeout=3
            )
            assert cg.proc is not None and cg.proc.poll() is None
        finally:
            await cg.stop()


class PipedClawgate(ClawgateProcess):
    """clawgate with its stdout a pipe (the access log on stdout) for the test to close."""

    async def start(self, *, wait_for: str = "listening on", timeout: float = 15.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv("serve", "--config", str(self.config_path)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=str(ROOT),
            env=env,
        )
        await self.wait_stderr(wait_for, timeout)


async def test_access_log_on_stdout_with_the_reader_gone(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port, log={"access": "stdout"})
    cg = PipedClawgate(tmp_path / "cg", cfg, netns=tailnet.ns("gw"))
    await cg.start()
    try:
        token = cg.tokens["phone"]
        await _serve_some(tailnet, token, 2)
        assert cg.proc is not None and cg.proc.stdout is not None
        assert b'"event":"decision"' in cg.proc.stdout.readline()
        cg.proc.stdout.close()  # the reader is gone: EPIPE from now on
        await _serve_some(tailnet, token, 30)
        assert await metric(cg, "clawgate_log_errors") >= 30
        assert cg.proc.poll() is None
        rc = await cg.stop()
        assert rc == 0, cg.stderr()
        assert "Broken pipe" in cg.stderr()
        assert "Traceback" not in cg.stderr()
    finally:
        await cg.stop()


# ------------------------------------------------------------------ file descriptors

NOFILE = 160


class LimitedClawgate(ClawgateProcess):
    """clawgate under a low RLIMIT_NOFILE (soft = hard, so it cannot raise it)."""

    def argv(self, *args: str) -> list[str]:
        return ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--", *super().argv(*args)]


async def _status_of_new_connection(tailnet: Tailnet, role: str, token: str) -> int | None:
    """The status a new request gets; None when the connection is closed unanswered."""
    try:
        reader, writer = await open_in(tailnet.ns(role), GW_V4, PORT)
    except OSError:
        return None
    try:
        writer.write(build_request("GET", "/echo", [("Authorization", f"Bearer {token}")]))
        resp: Response = await read_response(reader, timeout=5)
        return resp.status
    except (OSError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.close()


async def _idle_cpu(pid: int, seconds: float = 1.0) -> float:
    before = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return cpu_seconds(pid) - before


async def test_file_descriptors_exhausted(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port, {"perSourceIp": 10000, "perIdentity": 10000})
    async with running(tailnet, tmp_path / "cg", cfg, cls=LimitedClawgate) as cg:
        token = cg.tokens["phone"]
        held: list[ClientConnection] = []
        status: int | None = 200
        for _ in range(NOFILE):  # bounded: each session holds two descriptors
            try:
                held.append(await ws_open(tailnet, "phone" if len(held) % 2 else "ci", token))
            except Exception as exc:  # noqa: BLE001 - InvalidStatus expected, checked
                status = exc.response.status_code  # type: ignore[attr-defined]
                body = exc.response.body  # type: ignore[attr-defined]
                break
        assert status == 503 and b"file descriptor limit" in body
        assert 20 < len(held) < NOFILE // 2
        assert await _status_of_new_connection(tailnet, "ci", token) == 503
        assert await _idle_cpu(cg.pid) < 0.3  # no busy loop
        rec = await cg.wait_log(lambda r: r.get("reason", "").endswith("(file descriptor limit)"))
        assert rec["status"] == 503

        # Past the 503 reserve: eat the remaining descriptors with admin connections,
        # until accept() itself fails (EMFILE). Nothing crashes and nothing spins.
        admin: list[asyncio.StreamWriter] = []
        for _ in range(NOFILE):
            if cg.fd_count() >= NOFILE:
                break
            _, w = await open_connection_in(tailnet.ns("gw"), "127.0.0.1", cg.admin_port)
            w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            admin.append(w)
            await asyncio.sleep(0.02)
        await eventually(lambda: asyncio.sleep(0, cg.fd_count()), lambda n: n >= NOFILE - 1)
        assert await _status_of_new_connection(tailnet, "phone", token) in (None, 503)
        assert await _idle_cpu(cg.pid) < 0.3
        assert cg.proc is not None and cg.proc.poll() is None

        # Freed: service resumes.
        for w in admin:
            w.close()
        for ws in held[: len(held) // 2]:
            await ws.close()
        await eventually(
            lambda: _status_of_new_connection(tailnet, "phone", token),
            lambda s: s == 200,
            timeout=10,
        )
        for ws in held[len(held) // 2 :]:
            await echo_ok(ws)
            await ws.close()
        assert "Traceback" not in cg.stderr()
