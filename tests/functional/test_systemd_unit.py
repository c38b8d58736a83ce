"""config/clawgate.service: its directives, `systemd-analyze verify` and `security --offline`,
the sd_notify protocol of a real clawgate process (READY, RELOADING + MONOTONIC_USEC,
STOPPING) on a real AF_UNIX datagram socket, and clawgate running under W^X
(PR_SET_MDWE, the kernel's MemoryDenyWriteExecute) with uvloop, httptools and cffi."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tests.fakes.fake_gateway import FakeGateway
from tests.harness import ROOT, ClawgateProcess
from tests.netns import GW_V4, Tailnet, connect_in, socket_in

UNIT = ROOT / "config" / "clawgate.service"
PORT = 18789


def unit_directives(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value (systemd keys may repeat), comments dropped."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def test_unit_directives() -> None:
    d = unit_directives(UNIT.read_text())

    def one(key: str) -> str:
        assert key in d, f"{key} missing"
        return d[key][-1]

    assert "tailscaled.service" in one("Unit.Requires").split()
    assert "tailscaled.service" in one("Unit.After").split()
    assert one("Service.Type") == "notify"
    assert one("Service.NotifyAccess") == "main"
    # SIGHUP to the main process, with /bin/sh's kill (no procps needed): see
    # tests/deploy/test_systemd.py, where /bin/kill was missing on a minimal Debian.
    assert one("Service.ExecReload") == "/bin/sh -c 'kill -HUP \"$MAINPID\"'"
    assert one("Service.ExecStart").split()[1:] == [
        "serve",
        "--config",
        "/etc/clawgate/clawgate.json",
    ]
    assert one("Service.Restart") == "on-failure"
    assert one("Service.User") not in ("root", "0", "")
    for key in (
        "NoNewPrivileges",
        "PrivateTmp",
        "ProtectHome",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictRealtime",
    ):
        assert one(f"Service.{key}") == "yes", key
    assert one("Service.ProtectSystem") == "strict"
    assert one("Service.CapabilityBoundingSet") == ""
    assert one("Service.AmbientCapabilities") == ""
    assert set(one("Service.RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in d["Service.SystemCallFilter"]
    assert one("Service.LogsDirectory") == "clawgate"
    # Long enough for the drain (limits.drainSeconds defaults to 30).
    assert int(one("Service.TimeoutStopSec")) > 30


def _verifiable_unit(tmp_path: Path, text: str) -> Path:
    """The unit with ExecStart on this machine's clawgate and a stub tailscaled.service."""
    exe = shutil.which("clawgate", path=str(Path(sys.executable).parent)) or sys.executable
    unit = tmp_path / "clawgate.service"
    unit.write_text(text.replace("/usr/local/bin/clawgate", exe))
    (tmp_path / "tailscaled.service").write_text(
        "[Unit]\nDescription=stub tailscaled\n[Service]\nExecStart=/bin/true\n"
    )
    return unit


def _analyze(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, env=env, timeout=60
    )


needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (apt package systemd)",
)


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _verifiable_unit(tmp_path, UNIT.read_text())
    proc = _analyze(tmp_path, "verify", str(unit))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "" and proc.stdout.strip() == "", proc.stderr + proc.stdout
    # The check can fail: a misspelt directive is reported.
    bad = _verifiable_unit(tmp_path, UNIT.read_text().replace("Type=notify", "Tpye=notify"))
    assert "Unknown key" in _analyze(tmp_path, "verify", str(bad)).stderr


@needs_analyze
def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    unit = _verifiable_unit(tmp_path, UNIT.read_text())
    proc = _analyze(tmp_path, "security", "--offline=true", str(unit))
    if "--offline" in proc.stderr and proc.returncode != 0:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr
    score = float(m.group(1))
    print(f"systemd-analyze security exposure: {score}")
    assert score <= 2.0, proc.stdout


# ------------------------------------------------------------------------------ sd_notify


def _recv_all(sock: socket.socket, want: str, timeout: float = 10.0) -> list[str]:
    """Datagrams until one contains ``want`` (each datagram is one notification)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            break
        got.append(msg)
        if want in msg.split("\n"):
            return got
    raise AssertionError(f"no {want!r} notification within {timeout}s: {got}")


def _config(gw: FakeGateway) -> dict[str, object]:
    return {
        "gateway": {"host": GW_V4, "port": PORT, "allowedNetworks": ["100.64.0.0/10"]},
        "upstream": f"http://127.0.0.1:{gw.port}",
    }


@pytest.mark.parametrize("kind", ["path", "abstract"])
async def test_sd_notify_ready_reloading_stopping(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path, kind: str
) -> None:
    ns = tailnet.ns("gw")
    # An abstract socket lives in a network namespace: create it where clawgate runs.
    sock = socket_in(ns, socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        addr = str(tmp_path / "notify.sock")
        sock.bind(addr)
    else:
        name = f"clawgate-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        addr = "@" + name
    cg = ClawgateProcess(
        tmp_path / "cg", _config(fake_gateway), netns=ns, env={"NOTIFY_SOCKET": addr}
    )
    try:
        await cg.start()
        ready = await asyncio.to_thread(_recv_all, sock, "READY=1")
        assert any("STATUS=serving" in m for m in ready)
        # Ready means ready: the listener accepts now.
        conn = await connect_in(ns, GW_V4, PORT)
        conn.close()

        before = time.monotonic()
        cg.reload()
        msgs = await asyncio.to_thread(_recv_all, sock, "READY=1")
        after = time.monotonic()
        reloading = [m for m in msgs if "RELOADING=1" in m.split("\n")]
        assert reloading, msgs
        fields = dict(line.split("=", 1) for line in reloading[0].split("\n") if "=" in line)
        # CLOCK_MONOTONIC is system-wide: the process's stamp falls inside our window.
        usec = int(fields["MONOTONIC_USEC"])
        assert before * 1e6 <= usec <= after * 1e6
        assert msgs.index(reloading[0]) < len(msgs) - 1, "READY=1 comes after RELOADING=1"

        cg.signal(signal.SIGTERM)
        await asyncio.to_thread(_recv_all, sock, "STOPPING=1")
        assert cg.proc is not None
        # One SIGTERM is a clean stop: exit status 0 once the drain is done.
        assert await asyncio.to_thread(cg.proc.wait, 15) == 0
    finally:
        await cg.stop()
        sock.close()


# ------------------------------------------------------------------------------ W^X

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
MDWE_EXEC = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    f"if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:\n"
    "    sys.exit('prctl(PR_SET_MDWE): errno %d' % ctypes.get_errno())\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)


def _mdwe_supported() -> bool:
    proc = subprocess.run(
        [sys.executable, "-c", MDWE_EXEC, "-c", "pass"], capture_output=True, timeout=30
    )
    return proc.returncode == 0


class MdweClawgate(ClawgateProcess):
    """clawgate started the way MemoryDenyWriteExecute=yes starts it: W^X from exec on."""

    def argv(self, *args: str) -> list[str]:
        cmd = [sys.executable, "-c", MDWE_EXEC, "-m", "proxy", *args]
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd


async def test_memory_deny_write_execute(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    if not _mdwe_supported():
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    # The wrapper really enforces W^X: a writable+executable mapping is refused.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            MDWE_EXEC,
            "-c",
            "import mmap\n"
            "try:\n"
            "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            "except PermissionError:\n"
            "    print('refused')\n",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.stdout.strip() == "refused", probe.stdout + probe.stderr
    # The libraries that could want W+X memory: cffi callbacks, cryptography (JWT), uvloop.
    libs = subprocess.run(
        [
            sys.executable,
            "-c",
            MDWE_EXEC,
            "-c",
            "import uvloop, httptools, cffi, ctypes\n"
            "from cryptography.hazmat.primitives.asymmetric import ed25519\n"
            "import jwt\n"
            "k = ed25519.Ed25519PrivateKey.generate()\n"
            "t = jwt.encode({'sub': 'a'}, k, algorithm='EdDSA')\n"
            "assert jwt.decode(t, k.public_key(), algorithms=['EdDSA'])['sub'] == 'a'\n"
            "ffi = cffi.FFI(); ffi.cdef('int abs(int);'); C = ffi.dlopen(None)\n"
            "assert C.abs(-3) == 3\n"
            "print('ok')\n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert libs.stdout.strip() == "ok", libs.stderr[-2000:]
    cg = MdweClawgate(tmp_path / "cg", _config(fake_gateway), netns=tailnet.ns("gw"))
    try:
        await cg.start()
        token = cg.tokens["phone"]
        sock = await connect_in(tailnet.ns("phone"), GW_V4, PORT)
        async with connect(
            f"ws://{GW_V4}:{PORT}/ws",
            sock=sock,
            proxy=None,
            additional_headers={"Authorization": f"Bearer {token}"},
        ) as ws:
            await ws.send("under W^X")
            assert await ws.recv() == "under W^X"
        status, _ = await cg.admin("GET", "/metrics")
        assert status == 200
        assert "uvloop not installed" not in cg.stderr()
    finally:
        assert await cg.stop() == 0, cg.stderr()
