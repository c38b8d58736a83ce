"""config/clawgate.service for real: installed into a Debian bookworm rootfs with clawgate
(a venv from the wheel of this tree) and the real tailscaled 1.96.4 under its own unit,
booted with systemd as PID 1 (systemd-nspawn -b), driven with systemctl.

Shown: start -> active only after READY=1 (Type=notify); reload -> reloaded with a
WebSocket kept open, and the new token file in force; stop -> the open WebSocket closed
1001 (drained); the sandbox in force for the service's own processes (writes outside the
allowed paths fail, no capabilities, W^X, address families), with the same probe run
outside the sandbox as the control; IPAddressDeny= dropping a non-tailnet client; and
Requires=tailscaled.service: stopping tailscaled stops clawgate, starting clawgate starts it.
The tailscaled here stays logged out (NeedsLogin), so clawgate listens on loopback and a
198.18.x veth address rather than the tailnet.

The commands are the ones README.md gives for a systemd install.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.deploy.support import (
    Machine,
    build_wheelhouse,
    chroot,
    extract_rootfs,
    require_tools,
    rootfs_tarball,
    run,
    tailscale_binaries,
)
from tests.fakes.fake_gateway import FakeGateway
from tests.harness import ROOT
from tests.netns import connect_in, listen_in

pytestmark = [pytest.mark.slow]

PORT = 18800  # clawgate's listener (the gateway's own 18789 is on the same loopback)
UPSTREAM = 18789
_N = 200 + os.getpid() % 50
HOST_V4, MACHINE_V4 = f"198.18.{_N}.1", f"198.18.{_N}.2"

TAILSCALED_UNIT = """\
# tailscaled as Tailscale's own packages install it (their tailscaled.service), on the
# userspace network stack (no /dev/net/tun in the machine).
[Unit]
Description=Tailscale node agent
Wants=network-pre.target
After=network-pre.target

[Service]
ExecStart=/usr/sbin/tailscaled --state=/var/lib/tailscale/tailscaled.state \
  --socket=/run/tailscale/tailscaled.sock --port=0 --tun=userspace-networking
ExecStopPost=/usr/sbin/tailscaled --cleanup
Restart=on-failure
RuntimeDirectory=tailscale
RuntimeDirectoryMode=0755
StateDirectory=tailscale
StateDirectoryMode=0700
CacheDirectory=tailscale
CacheDirectoryMode=0750
Type=notify

[Install]
WantedBy=multi-user.target
"""

# Writes where the clawgate user may write by file permissions (the directories are its
# own), so only the sandbox can refuse them; then the process's credentials and limits.
PROBE = """\
import errno, json, mmap, os, socket, sys
out = {"uid": os.getuid()}
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
def write(path):
    def fn():
        with open(path, "w") as f:
            f.write("probe")
        os.unlink(path)
    return attempt(fn)
for d in ("/etc/clawgate-owned", "/usr/local/clawgate-owned", "/opt/clawgate-owned",
          "/var/lib/clawgate-owned", "/home/clawgate-owned", "/root", "/tmp",
          "/var/log/clawgate"):
    out["write " + d] = write(d + "/probe")
with open("/tmp/clawgate-probe-marker", "w") as f:
    f.write("x")
status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines()
              if ":\\t" in l)
out["CapEff"] = status["CapEff"].strip()
out["NoNewPrivs"] = status["NoNewPrivs"].strip()
out["Seccomp"] = status["Seccomp"].strip()
out["AF_NETLINK"] = attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close())
out["AF_PACKET"] = attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close())
out["W+X mmap"] = attempt(lambda: mmap.mmap(-1, 4096, prot=7).close())
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""

OWNED_DIRS = (
    "/etc/clawgate-owned",
    "/usr/local/clawgate-owned",
    "/opt/clawgate-owned",
    "/var/lib/clawgate-owned",
    "/home/clawgate-owned",
)


def machine_config() -> dict[str, Any]:
    return {
        "gateway": {
            "host": ["127.0.0.1", MACHINE_V4],
            "port": PORT,
            "requireToken": True,
            "allowedNetworks": ["127.0.0.0/8", f"{MACHINE_V4.rsplit('.', 1)[0]}.0/30"],
        },
        "upstream": {"url": f"http://127.0.0.1:{UPSTREAM}", "connectTimeout": 1.0},
        "tokens": {"file": "/etc/clawgate/tokens.json"},
        # tailscaled stays logged out here: token-only clients, identity not required.
        "tailscale": {"socket": "/run/tailscale/tailscaled.sock", "requireIdentity": False},
        "admin": {"host": "127.0.0.1", "port": 18790},
        "limits": {"drainSeconds": 2},
        "log": {"access": "stdout", "level": "info"},
    }


def provision(root: Path, wheelhouse: Path) -> str:
    """Install clawgate, the unit and tailscaled into the rootfs; return the phone token."""
    ts, tsd = tailscale_binaries()
    shutil.copy2(tsd, root / "usr/sbin/tailscaled")
    shutil.copy2(ts, root / "usr/bin/tailscale")
    wh = root / "tmp/wheelhouse"
    shutil.copytree(wheelhouse, wh)
    chroot(
        root,
        "python3 -m venv /opt/clawgate\n"
        "/opt/clawgate/bin/pip install -q --no-index --find-links /tmp/wheelhouse "
        "clawgate\n"
        "ln -s /opt/clawgate/bin/clawgate /usr/local/bin/clawgate\n"
        "rm -rf /tmp/wheelhouse",
    )
    (root / "etc/systemd/system/tailscaled.service").write_text(TAILSCALED_UNIT)
    (root / "usr/local/lib/clawgate-sandbox-probe.py").write_text(PROBE)
    (root / "etc/clawgate.json").write_text(json.dumps(machine_config(), indent=2))
    owned = " ".join(OWNED_DIRS)
    # README.md's install steps, verbatim but for the config's source path.
    out = chroot(
        root,
        f"""
useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin clawgate
install -d -m 0755 /etc/clawgate
install -m 0644 /etc/clawgate.json /etc/clawgate/clawgate.json
clawgate token new phone --file /etc/clawgate/tokens.json
chown clawgate:clawgate /etc/clawgate/tokens.json
install -d -o clawgate -g clawgate {owned}
""",
    )
    shutil.copy2(ROOT / "config" / "clawgate.service", root / "etc/systemd/system/")
    token = out.split()[-1]
    assert len(token) >= 40, out
    return token


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    require_tools("systemd-nspawn", "debootstrap", "nsenter", "ip")
    base = tmp_path_factory.mktemp("nspawn")
    tar = rootfs_tarball()
    wheelhouse = build_wheelhouse(base / "wheelhouse")
    root = base / "root"
    extract_rootfs(tar, root)
    token = provision(root, wheelhouse)
    m = Machine(root, f"cgds{os.getpid() % 100000}")
    m.token = token  # type: ignore[attr-defined]
    host_if, machine_if = f"{m.name}h", f"{m.name}m"
    try:
        m.boot()
        m.systemctl("daemon-reload")
        # A veth from the root namespace into the machine, for the IPAddressDeny check.
        run(
            [
                "ip",
                "link",
                "add",
                host_if,
                "type",
                "veth",
                "peer",
                "name",
                machine_if,
                "netns",
                f"/proc/{m.leader}/ns/net",
            ]
        )
        run(["ip", "addr", "add", f"{HOST_V4}/30", "dev", host_if])
        run(["ip", "link", "set", host_if, "up"])
        run(["ip", "-n", m.netns, "addr", "add", f"{MACHINE_V4}/30", "dev", machine_if])
        run(["ip", "-n", m.netns, "link", "set", machine_if, "up"])
        yield m
    finally:
        m.close()
        run(["ip", "link", "delete", host_if], check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def gateway(machine: Machine) -> AsyncIterator[FakeGateway]:
    """The fake gateway on the machine's 127.0.0.1:18789 (clawgate's upstream)."""
    gw = FakeGateway()
    await gw.start(sock=listen_in(machine.netns, "127.0.0.1", UPSTREAM))
    try:
        yield gw
    finally:
        await gw.stop()


async def open_ws(machine: Machine, token: str, host: str = "127.0.0.1") -> ClientConnection:
    sock = await connect_in(machine.netns, host, PORT)
    return await connect(
        f"ws://{host}:{PORT}/ws",
        sock=sock,
        proxy=None,
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=10,
    )


def token_of(machine: Machine) -> str:
    t = getattr(machine, "token")  # noqa: B009
    assert isinstance(t, str)
    return t


def start_clawgate(machine: Machine) -> None:
    if machine.show("clawgate", "ActiveState")["ActiveState"] != "active":
        machine.systemctl("start", "clawgate")


# ------------------------------------------------------------------------------------ tests


def test_start_is_active_after_ready(machine: Machine) -> None:
    machine.systemctl("stop", "clawgate", "tailscaled", check=False)
    t0 = time.monotonic()
    # Type=notify: `systemctl start` returns once clawgate sent READY=1, not at fork.
    machine.systemctl("start", "clawgate")
    took = time.monotonic() - t0
    props = machine.show(
        "clawgate",
        "ActiveState",
        "SubState",
        "StatusText",
        "Type",
        "NotifyAccess",
        "MainPID",
        "User",
    )
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["Type"] == "notify" and props["NotifyAccess"] == "main"
    # STATUS=serving arrives in the same datagram as READY=1.
    assert props["StatusText"] == "serving", props
    assert props["User"] == "clawgate"
    journal = machine.journal("clawgate")
    assert f"listening on 127.0.0.1:{PORT}" in journal, journal
    # Started only after its listener was up: the "listening" line precedes "Started".
    assert journal.index("listening on") < journal.index("Started clawgate.service"), journal
    assert took < 30
    # Requires= + After=: tailscaled was started with it, and first.
    assert machine.show("tailscaled", "ActiveState")["ActiveState"] == "active"


async def test_reload_keeps_websocket_and_applies_tokens(
    machine: Machine, gateway: FakeGateway
) -> None:
    start_clawgate(machine)
    pid = machine.show("clawgate", "MainPID")["MainPID"]
    ws = await open_ws(machine, token_of(machine))
    try:
        await ws.send("before reload")
        assert await ws.recv() == "before reload"
        # A second token, added the way an operator does it, then `systemctl reload`.
        out = machine.run(
            ["clawgate", "token", "new", "laptop", "--file", "/etc/clawgate/tokens.json"]
        ).stdout
        laptop = out.split()[-1]
        machine.run(["chown", "clawgate:clawgate", "/etc/clawgate/tokens.json"])
        machine.systemctl("reload", "clawgate")
        props = machine.show("clawgate", "ActiveState", "MainPID", "StatusText")
        assert props["ActiveState"] == "active" and props["MainPID"] == pid, props
        await ws.send("after reload")
        assert await ws.recv() == "after reload", "the WebSocket survived the reload"
        # The reload took effect: the new token is accepted by the same process.
        ws2 = await open_ws(machine, laptop)
        await ws2.send("laptop")
        assert await ws2.recv() == "laptop"
        await ws2.close()
        assert "reload" in machine.journal("clawgate").lower()
    finally:
        await ws.close()


async def test_stop_drains_with_1001(machine: Machine, gateway: FakeGateway) -> None:
    start_clawgate(machine)
    ws = await open_ws(machine, token_of(machine))
    await ws.send("held")
    assert await ws.recv() == "held"
    t0 = time.monotonic()
    await asyncio.to_thread(machine.systemctl, "stop", "clawgate")
    took = time.monotonic() - t0
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(10):
            while True:
                await ws.recv()
    assert ws.close_code == 1001, (ws.close_code, ws.close_reason)
    props = machine.show("clawgate", "ActiveState", "Result", "ExecMainStatus")
    assert props["ActiveState"] == "inactive" and props["Result"] == "success", props
    assert props["ExecMainStatus"] == "0", props
    # limits.drainSeconds is 2 here: the stop waited for the drain, well inside TimeoutStopSec.
    assert 1.5 < took < 20, took
    assert "draining 1 connection" in machine.journal("clawgate"), machine.journal("clawgate")


def test_sandbox_in_force(machine: Machine) -> None:
    def marker_seen() -> bool:  # in the machine's own /tmp (a tmpfs of its systemd)
        return (
            machine.run(["test", "-e", "/tmp/clawgate-probe-marker"], check=False).returncode == 0
        )

    # Control: the probe as the clawgate user, outside the unit's sandbox, writes everywhere
    # the clawgate user owns. (/root and /var/log/clawgate are not its own.)
    machine.run(["install", "-d", "-o", "clawgate", "-g", "clawgate", "/var/tmp/probe"])
    machine.run(
        [
            "systemd-run",
            "--wait",
            "--quiet",
            "-p",
            "User=clawgate",
            "/opt/clawgate/bin/python3",
            "/usr/local/lib/clawgate-sandbox-probe.py",
            "/var/tmp/probe/control.json",
        ]
    )
    control = json.loads((machine.root / "var/tmp/probe/control.json").read_text())
    for d in OWNED_DIRS:
        assert control[f"write {d}"] == "ok", control
    assert control["W+X mmap"] == "ok" and control["AF_NETLINK"] == "ok", control
    assert marker_seen()
    machine.run(["rm", "/tmp/clawgate-probe-marker"])

    # The same probe as an ExecStartPre= of clawgate.service: the unit's own sandbox.
    dropin = machine.root / "etc/systemd/system/clawgate.service.d"
    dropin.mkdir(exist_ok=True)
    (dropin / "50-probe.conf").write_text(
        "[Service]\nExecStartPre=/opt/clawgate/bin/python3 "
        "/usr/local/lib/clawgate-sandbox-probe.py /var/log/clawgate/probe.json\n"
    )
    try:
        machine.systemctl("daemon-reload")
        machine.systemctl("restart", "clawgate")
        got = json.loads((machine.root / "var/log/clawgate/probe.json").read_text())
    finally:
        shutil.rmtree(dropin)
        machine.systemctl("daemon-reload")
    uid = machine.run(["id", "-u", "clawgate"]).stdout.strip()
    assert str(got["uid"]) == uid, got
    # ProtectSystem=strict: /etc, /usr, /opt, /var/lib read-only even where the user owns it.
    for d in (
        "/etc/clawgate-owned",
        "/usr/local/clawgate-owned",
        "/opt/clawgate-owned",
        "/var/lib/clawgate-owned",
    ):
        assert got[f"write {d}"] == errno.errorcode[errno.EROFS], (d, got)
    # ProtectHome=yes: /home and /root are empty and inaccessible.
    assert got["write /home/clawgate-owned"] in ("ENOENT", "EACCES"), got
    assert got["write /root"] in ("ENOENT", "EACCES", "EROFS"), got
    # The writable paths: LogsDirectory= and a PrivateTmp= /tmp the host never sees.
    assert got["write /var/log/clawgate"] == "ok" and got["write /tmp"] == "ok", got
    assert not marker_seen(), "PrivateTmp=yes: the service's /tmp is its own"
    # CapabilityBoundingSet= empty, NoNewPrivileges=yes, SystemCallFilter= (seccomp mode 2).
    assert int(got["CapEff"], 16) == 0 and got["NoNewPrivs"] == "1" and got["Seccomp"] == "2"
    # RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX; MemoryDenyWriteExecute=yes.
    assert got["AF_NETLINK"] == "EAFNOSUPPORT" and got["AF_PACKET"] == "EAFNOSUPPORT", got
    assert got["W+X mmap"] in ("EPERM", "EACCES"), got
    assert machine.show("clawgate", "ActiveState")["ActiveState"] == "active"


async def test_ip_address_deny_drops_non_tailnet_clients(
    machine: Machine, gateway: FakeGateway
) -> None:
    start_clawgate(machine)
    assert f"listening on {MACHINE_V4}:{PORT}" in machine.journal("clawgate", 200)
    # Control: a listener outside clawgate's cgroup on the same address answers the host.
    ctl = machine.run(
        [
            "systemd-run",
            "--unit=cgds-control",
            "--quiet",
            "/opt/clawgate/bin/python3",
            "-m",
            "http.server",
            "--bind",
            MACHINE_V4,
            "18801",
        ]
    )
    assert ctl.returncode == 0
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = await connect_in_root(MACHINE_V4, 18801, timeout=2)
                conn.close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the control listener never answered"
                await asyncio.sleep(0.2)
        # clawgate listens there (and allowedNetworks admits 198.18.x), but IPAddressDeny=any
        # with IPAddressAllow=localhost + the tailnet drops the packets: no handshake at all.
        with pytest.raises((TimeoutError, OSError)):
            conn = await connect_in_root(MACHINE_V4, PORT, timeout=3)
            conn.close()
    finally:
        machine.systemctl("stop", "cgds-control", check=False)
    # Loopback is allowed: the same process still serves the machine's own clients.
    ws = await open_ws(machine, token_of(machine))
    await ws.send("loopback")
    assert await ws.recv() == "loopback"
    await ws.close()


async def connect_in_root(host: str, port: int, *, timeout: float) -> Any:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def test_requires_tailscaled(machine: Machine) -> None:
    start_clawgate(machine)
    assert machine.show("tailscaled", "ActiveState")["ActiveState"] == "active"
    # Stopping tailscaled stops clawgate (Requires=), not the other way round.
    machine.systemctl("stop", "tailscaled")
    props = machine.show("clawgate", "ActiveState", "Result")
    assert props["ActiveState"] == "inactive", props
    assert "Stopping clawgate.service" in machine.journal("clawgate")
    # And starting clawgate brings tailscaled back first.
    machine.systemctl("start", "clawgate")
    assert machine.show("tailscaled", "ActiveState")["ActiveState"] == "active"
    assert machine.show("clawgate", "ActiveState")["ActiveState"] == "active"
    # Stopping clawgate leaves tailscaled alone.
    machine.systemctl("stop", "clawgate")
    assert machine.show("tailscaled", "ActiveState")["ActiveState"] == "active"
