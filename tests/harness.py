"""clawgate as a real process for tests: started from a config dict, inside a namespace.

``ClawgateProcess`` writes the config and a token file, runs ``python -m proxy serve``
(under ``ip netns exec`` when a namespace is given, so it binds the tailnet addresses of
that namespace), waits until it listens, and exposes its access log (JSON lines in a
file), stderr, open file descriptors, and the admin endpoints. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from proxy.keystore import TokenFile
from tests.netns import open_connection_in

ROOT = Path(__file__).resolve().parent.parent


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class ClawgateProcess:
    """One clawgate process. ``tokens`` maps token name -> the token (clear, for clients)."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        *,
        netns: str | None = None,
        token_names: tuple[str, ...] = ("phone",),
        env: dict[str, str] | None = None,
        admin_port: int = 18790,
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.netns = netns
        self.access_path = self.dir / "access.log"
        self.stderr_path = self.dir / "stderr.log"
        self.config_path = self.dir / "clawgate.json"
        self.token_path = self.dir / "tokens.json"
        self.tokens: dict[str, str] = {}
        tf = TokenFile(self.token_path)
        for name in token_names:
            self.tokens[name] = tf.add(name)
        base: dict[str, Any] = {
            "tokens": {"file": str(self.token_path)},
            "log": {"access": str(self.access_path), "level": "debug"},
            "admin": {"port": admin_port},
        }
        self.config = deep_merge(base, config)
        self.admin_port = self.config.get("admin", {}).get("port", admin_port)
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config(self.config)

    def write_config(self, config: dict[str, Any]) -> None:
        self.config = config
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2))
        os.replace(tmp, self.config_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self, *args: str) -> list[str]:
        cmd = [sys.executable, "-m", "proxy", *args]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return cmd

    async def start(self, *, wait_for: str = "listening on", timeout: float = 15.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv("serve", "--config", str(self.config_path)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            cwd=str(ROOT),
            env=env,
        )
        await self.wait_stderr(wait_for, timeout)

    async def wait_stderr(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            err = self.stderr()
            if text in err:
                return err
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"clawgate exited with {self.proc.returncode} before {text!r}:\n{err}"
                )
            await asyncio.sleep(0.05)
        raise AssertionError(f"clawgate did not say {text!r} within {timeout}s:\n{self.stderr()}")

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def access_log(self) -> list[dict[str, Any]]:
        try:
            text = self.access_path.read_text()
        except FileNotFoundError:
            return []
        # JSON lines end at "\n" only: str.splitlines() would also split inside a value
        # holding U+2028 or U+0085 (a Tailscale display name, say), written unescaped.
        return [json.loads(line) for line in text.split("\n") if line.strip()]

    async def wait_log(self, pred: Any, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in self.access_log():
                if pred(rec):
                    return rec
            await asyncio.sleep(0.05)
        raise AssertionError(f"no matching access-log line in {timeout}s: {self.access_log()}")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    async def admin(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """A raw HTTP request to the admin listener (on the namespace's loopback)."""
        if self.netns:
            reader, writer = await open_connection_in(self.netns, "127.0.0.1", self.admin_port)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.admin_port)
        if method == "POST" and not body:
            body = b"{}"  # the admin takes POSTs with a JSON body only
        ctype = "Content-Type: application/json\r\n" if method == "POST" else ""
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"{ctype}Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head, _, payload = data.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), payload

    async def admin_json(self, path: str) -> tuple[int, Any]:
        status, body = await self.admin("GET", path)
        return status, json.loads(body)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def reload(self) -> None:
        self.signal(signal.SIGHUP)

    async def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()
        return self.proc.returncode


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run the clawgate CLI (python -m proxy) and capture its output."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=str(ROOT),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
