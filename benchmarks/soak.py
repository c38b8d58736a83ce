"""Soak: churn many connections through a real clawgate while holding thousands open.

Runs clawgate (``python -m proxy serve``) on loopback in front of the C echo backend
(benchmarks/echo.c), then: warm up, measure the baseline (open descriptors, RSS), open
``--hold`` WebSocket sessions that each exchange a message every few seconds, churn
``--churn`` short connections (half plain HTTP, half WebSocket handshake + message +
close) alongside, keep the held sessions for ``--hold-seconds``, close everything and
check that descriptors and RSS return to the baseline. Bounded in time; not run in CI.

    python -m benchmarks.soak                          # the full run (200k + 5k for 10 min)
    python -m benchmarks.soak --churn 20000 --hold 1000 --hold-seconds 60   # shortened
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MASK = b"\x01\x02\x03\x04"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _masked(opcode: int, payload: bytes) -> bytes:
    body = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + MASK + body


def _proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="clawgate-soak-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = _free_port()
        self.admin_port = _free_port()
        self.token = ""
        self.errors: dict[str, int] = {}
        self.churned = 0
        self.samples: list[dict[str, Any]] = []
        self.cg: subprocess.Popen[bytes] | None = None
        self._src = 0

    # ---------------------------------------------------------------- processes

    def start(self) -> None:
        echo_bin = HERE / "out" / "echo"
        if not echo_bin.exists():
            echo_bin.parent.mkdir(exist_ok=True)
            subprocess.run(["gcc", "-O2", "-o", str(echo_bin), str(HERE / "echo.c")], check=True)
        echo = subprocess.Popen(
            [str(echo_bin), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(echo)
        assert echo.stdout is not None
        line = echo.stdout.readline().decode()
        if not line.startswith("READY "):
            raise SystemExit(f"echo backend did not start: {line!r}")
        echo_port = int(line.split()[1])

        sys.path.insert(0, str(ROOT))
        from proxy.keystore import TokenFile

        self.token = TokenFile(self.tmp / "tokens.json").add("soak")
        n = self.args.hold + 4 * self.args.concurrency + 1000
        cfg = {
            "gateway": {
                "host": "127.0.0.1",
                "port": self.port,
                "requireToken": True,
                "allowedNetworks": ["127.0.0.0/8"],
            },
            "upstream": f"http://127.0.0.1:{echo_port}",
            "tokens": {"file": str(self.tmp / "tokens.json")},
            "tailscale": {"requireIdentity": False},
            "admin": {"port": self.admin_port},
            "log": {
                "access": str(self.tmp / "access.log") if self.args.log else "off",
                "level": "info",
            },
            "limits": {
                "maxConnections": n,
                "perSourceIp": n,
                "perIdentity": n,
                "unauthenticatedPerIp": n,
                "idleTimeout": 3600,
            },
        }
        (self.tmp / "clawgate.json").write_text(json.dumps(cfg))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.cg = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(self.tmp / "clawgate.json")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "stderr.log", "wb"),  # noqa: SIM115
            cwd=str(ROOT),
            env=env,
            start_new_session=True,
        )
        self.procs.append(self.cg)
        deadline = time.monotonic() + 20
        while b"listening on" not in (self.tmp / "stderr.log").read_bytes():
            if self.cg.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    "clawgate did not start:\n" + (self.tmp / "stderr.log").read_text()
                )
            time.sleep(0.05)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------------- clients

    def _source(self) -> str:
        # Many source addresses: 200k short connections from one would exhaust the
        # ephemeral ports (TIME_WAIT) long before clawgate shows anything.
        self._src = (self._src + 1) % 250
        return f"127.0.{1 + self._src // 250}.{1 + self._src % 250}"

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, local_addr=(self._source(), 0))

    def _error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {self.token}"
                f"\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ValueError(head.split(b"\r\n", 1)[0].decode(errors="replace"))

    async def _echo(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: bytes
    ) -> None:
        writer.write(_masked(0x1, text))
        frame = await reader.readexactly(2 + len(text))
        if frame[2:] != text:
            raise ValueError("echo mismatch")

    async def _one_churn(self, i: int) -> None:
        reader, writer = await self._open()
        try:
            if i % 2:
                writer.write(
                    f"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                    f"Authorization: Bearer {self.token}\r\n\r\n".encode()
                )
                data = await reader.read()
                if not data.startswith(b"HTTP/1.1 200"):
                    raise ValueError(data[:40].decode(errors="replace"))
            else:
                await self._handshake(reader, writer)
                await self._echo(reader, writer, b"churn")
                writer.write(_masked(0x8, b"\x03\xe8"))
                await reader.read()  # the echoed close, then EOF
        finally:
            writer.close()

    async def churn(self, count: int) -> None:
        next_i = 0

        async def worker() -> None:
            nonlocal next_i
            while next_i < count:
                i = next_i
                next_i += 1
                try:
                    async with asyncio.timeout(10):
                        await self._one_churn(i)
                    self.churned += 1
                except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    self._error(f"churn: {type(exc).__name__}: {exc}"[:120])

        await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))

    async def hold(self, n: int, seconds: float, ready: asyncio.Event) -> None:
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for _ in range(n):
            try:
                reader, writer = await self._open()
                await self._handshake(reader, writer)
                conns.append((reader, writer))
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                self._error(f"hold open: {type(exc).__name__}: {exc}"[:120])
        ready.set()
        end = time.monotonic() + seconds
        rounds = 0
        while time.monotonic() < end:
            # Every held session exchanges a message each round: they are alive, not idle.
            sem = asyncio.Semaphore(256)

            async def ping(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                async with sem:
                    try:
                        async with asyncio.timeout(10):
                            await self._echo(r, w, b"held")
                    except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
                        self._error(f"held: {type(exc).__name__}"[:120])

            await asyncio.gather(*(ping(r, w) for r, w in conns))
            rounds += 1
            await asyncio.sleep(min(5.0, max(0.0, end - time.monotonic())))
        for _, w in conns:
            w.close()
        self.held_rounds = rounds
        self.held_open = len(conns)

    # ---------------------------------------------------------------- measuring

    def sample(self, label: str) -> dict[str, Any]:
        assert self.cg is not None
        s = {
            "label": label,
            "t": round(time.monotonic() - self.t0, 1),
            "fds": _proc_fds(self.cg.pid),
            "rss_kib": _proc_rss_kib(self.cg.pid),
            "churned": self.churned,
        }
        self.samples.append(s)
        print(json.dumps(s), flush=True)
        return s

    async def settle(self, baseline_fds: int, timeout: float) -> None:
        """Until clawgate has closed everything (descriptors back at the baseline)."""
        assert self.cg is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _proc_fds(self.cg.pid) > baseline_fds:
            await asyncio.sleep(0.5)

    async def run(self) -> dict[str, Any]:
        a = self.args
        self.t0 = time.monotonic()
        # Warm-up: one short cycle of the same shape, so the allocator's high-water mark
        # (CPython keeps freed arenas) is in the baseline; a leak then still shows, as
        # growth proportional to the 200k churned connections.
        warm = asyncio.Event()
        await asyncio.gather(self.hold(a.hold, 5.0, warm), self.churn(a.warmup))
        await self.settle(_proc_fds(self.cg.pid) if self.cg else 0, 0)
        await asyncio.sleep(2.0)
        base = self.sample("baseline")
        ready = asyncio.Event()
        holder = asyncio.create_task(self.hold(a.hold, a.hold_seconds, ready))
        await ready.wait()
        self.sample("held open")
        t_churn = time.monotonic()
        churner = asyncio.create_task(self.churn(a.churn))
        churner.add_done_callback(lambda _: setattr(self, "churn_end", time.monotonic()))
        while not (churner.done() and holder.done()):
            await asyncio.sleep(min(10.0, a.hold_seconds / 6))
            self.sample("running")
        churn_seconds = getattr(self, "churn_end", time.monotonic()) - t_churn
        await churner
        await holder
        await self.settle(base["fds"], 30)
        await asyncio.sleep(2.0)
        end = self.sample("after")
        rss_growth = end["rss_kib"] - base["rss_kib"]
        result = {
            "churn": a.churn,
            "churned_ok": self.churned - a.warmup,
            "churn_per_second": round((self.churned - a.warmup) / churn_seconds),
            "churn_seconds": round(churn_seconds, 1),
            "held": a.hold,
            "held_open": getattr(self, "held_open", 0),
            "held_seconds": a.hold_seconds,
            "held_rounds": getattr(self, "held_rounds", 0),
            "errors": self.errors,
            "fds_baseline": base["fds"],
            "fds_peak": max(s["fds"] for s in self.samples),
            "fds_after": end["fds"],
            "rss_kib_baseline": base["rss_kib"],
            "rss_kib_peak": max(s["rss_kib"] for s in self.samples),
            "rss_kib_after": end["rss_kib"],
            "rss_growth_kib": rss_growth,
            "fds_back_to_baseline": end["fds"] <= base["fds"],
            # CPython's allocator keeps some arenas: allow a little, not a leak.
            "rss_back_to_baseline": rss_growth <= max(8192, base["rss_kib"] // 10),
        }
        result["ok"] = (
            result["fds_back_to_baseline"]
            and result["rss_back_to_baseline"]
            and not self.errors
            and self.cg is not None
            and self.cg.poll() is None
        )
        return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    p.add_argument("--churn", type=int, default=200_000, help="short connections in total")
    p.add_argument("--hold", type=int, default=5000, help="WebSocket sessions held open")
    p.add_argument("--hold-seconds", type=float, default=600.0)
    p.add_argument("--concurrency", type=int, default=64, help="churning clients at a time")
    p.add_argument("--warmup", type=int, default=5000)
    p.add_argument("--log", action="store_true", help="write the access log (to a tmp file)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.hold + args.concurrency + 256
    if hard != resource.RLIM_INFINITY and hard < need:
        raise SystemExit(f"open-files hard limit {hard} < {need}: raise it (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # clawgate inherits it
    soak = Soak(args)
    # Bounded: the whole run may take the hold time plus a generous margin, no more.
    budget = args.hold_seconds + 120 + args.churn / 500

    def overrun(*_: object) -> None:
        soak.stop()
        raise SystemExit(f"soak: over its time budget ({budget:.0f}s)")

    signal.signal(signal.SIGALRM, overrun)
    signal.alarm(int(budget))
    try:
        soak.start()
        result = asyncio.run(soak.run())
    finally:
        signal.alarm(0)
        soak.stop()
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"result": result, "samples": soak.samples}, indent=2)
        )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
