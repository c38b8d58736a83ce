"""`clawgate doctor` as a real process in the gw namespace, against the fake tailscaled, a
real gateway config file (JSON5) and real listening sockets (read back from /proc/net/tcp
of that namespace, with their owning process)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.keystore import TokenFile
from tests.fakes.fake_gateway import FakeGateway
from tests.fakes.pairing_store import FakeDevice, PairingStore
from tests.harness import ROOT
from tests.netns import GW_V4, Tailnet, listen_in
from tests.support import (
    fake_tailscaled,
    iso_in,
)

pytestmark = pytest.mark.netns

GATEWAY_JSON5 = """// the gateway's own config, as OpenClaw writes it (JSON5)
{
  gateway: {
    mode: 'local',
    port: 18789,
    bind: 'loopback', // only clawgate reaches it
    trustedProxies: ['127.0.0.1/32', '::1/128',],
  },
  /* no mdns */
  discovery: {mdns: {mode: 'off'}},
}
"""


def write_setup(tmp: Path, upstream_port: int, socket_path: str) -> tuple[Path, Path]:
    tokens = tmp / "tokens.json"
    TokenFile(tokens).add("phone")
    cfg = tmp / "clawgate.json"
    cfg.write_text(
        json.dumps(
            {
                "gateway": {"host": "tailscale", "port": 18789, "requireToken": True},
                "upstream": f"http://127.0.0.1:{upstream_port}",
                "tokens": {"file": str(tokens)},
                "tailscale": {"socket": socket_path},
                "admin": {"port": 18790},
            }
        )
    )
    return cfg, tokens


async def doctor(
    tailnet: Tailnet, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run in a thread: the fake tailscaled answers from this test's event loop."""
    full = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent", **(env or {})}
    argv = ["ip", "netns", "exec", tailnet.ns("gw"), sys.executable, "-m", "proxy", "doctor", *args]
    return await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, env=full, cwd=str(ROOT), timeout=60
    )


def findings(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    doc = json.loads(proc.stdout)
    assert doc["ok"] is (proc.returncode == 0)
    out: list[dict[str, Any]] = doc["findings"]
    return out


async def test_doctor_healthy_setup(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with fake_tailscaled() as ts:
        cfg, _ = write_setup(tmp_path, fake_gateway.port, ts.socket_path)
        home = tmp_path / "oc"
        (home / ".openclaw").mkdir(parents=True)
        gw_cfg = home / ".openclaw" / "openclaw.json"
        gw_cfg.write_text(GATEWAY_JSON5.replace("18789", str(fake_gateway.port)))
        # The default gateway config path follows $OPENCLAW_HOME.
        proc = await doctor(
            tailnet, "--json", "--config", str(cfg), env={"OPENCLAW_HOME": str(home)}
        )
        got = findings(proc)
        bad = [f for f in got if f["severity"] in ("error", "warning")]
        assert proc.returncode == 0 and bad == [], proc.stdout + proc.stderr
        ok = {f["check"] for f in got if f["severity"] == "ok"}
        assert ok >= {
            "config",
            "tailscaled",
            "keyExpiry",
            "userspace",
            "upstream",
            "upstreamBind",
            "trustedProxies",
            "gatewayBind",
            "ports",
            "tokenFile",
        }
        text = await doctor(tailnet, "--config", str(cfg), env={"OPENCLAW_HOME": str(home)})
        assert text.returncode == 0
        assert "✓ OK      tailscaled: tailscaled Running" in text.stdout
        assert "0 errors, 0 warnings" in text.stdout


async def test_doctor_finds_what_is_broken(tailnet: Tailnet, tmp_path: Path) -> None:
    ns = tailnet.ns("gw")
    # A "gateway" on every interface, and another program on clawgate's tailnet port.
    exposed = listen_in(ns, "0.0.0.0")
    squatter = listen_in(ns, GW_V4, 18789)
    try:
        async with fake_tailscaled() as ts:
            ts.self_key_expiry = iso_in(days=-1)  # expired yesterday
            ts.tun = False  # userspace networking
            cfg, tokens = write_setup(tmp_path, exposed.getsockname()[1], ts.socket_path)
            tokens.chmod(0o644)
            gw_cfg = tmp_path / "openclaw.json"
            gw_cfg.write_text('{gateway: {bind: "lan", host: "0.0.0.0", requireToken: true}}')
            proc = await doctor(
                tailnet, "--json", "--config", str(cfg), "--gateway-config", str(gw_cfg)
            )
            assert proc.returncode == 1, proc.stdout + proc.stderr
            got = findings(proc)
            errors = {f["check"]: f for f in got if f["severity"] == "error"}
            me = f"pid {os.getpid()}"
            assert "0644" in errors["tokenFile"]["what"]
            assert "expired" in errors["keyExpiry"]["what"]
            assert "userspace-networking" in errors["userspace"]["what"]
            assert (
                "0.0.0.0" in errors["upstreamBind"]["what"] and me in errors["upstreamBind"]["what"]
            )
            assert f"{GW_V4}:18789" in errors["ports"]["what"] and me in errors["ports"]["what"]
            assert "does not trust" in errors["trustedProxies"]["what"]
            assert "'lan'" in errors["gatewayBind"]["what"]
            assert "Unrecognized" in errors["gatewayConfig"]["what"]
            assert all(f["fix"] for f in errors.values())
            text = await doctor(tailnet, "--config", str(cfg), "--gateway-config", str(gw_cfg))
            assert text.returncode == 1
            assert "✗ ERROR" in text.stdout and "fix: chmod 600" in text.stdout
    finally:
        exposed.close()
        squatter.close()


async def test_doctor_without_tailscaled_or_gateway(tailnet: Tailnet, tmp_path: Path) -> None:
    cfg, _ = write_setup(tmp_path, 9, str(tmp_path / "missing.sock"))
    proc = await doctor(
        tailnet, "--json", "--config", str(cfg), "--gateway-config", str(tmp_path / "nope.json")
    )
    assert proc.returncode == 1
    got = {(f["check"], f["severity"]) for f in findings(proc)}
    assert ("tailscaled", "error") in got
    assert ("upstream", "error") in got
    assert ("gatewayConfig", "info") in got


def test_doctor_bad_config_is_an_error_not_a_crash(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text('{"gateway": {"host": "0.0.0.0"}, "tokens": {"token": "hunter2"}}')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "doctor",
            "--json",
            "--config",
            str(cfg),
            "--gateway-config",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    got = {(f["check"], f["severity"]) for f in findings(proc)}
    assert {("config", "error"), ("listen", "error"), ("secrets", "error")} <= got
    assert "hunter2" not in proc.stdout


@pytest.mark.parametrize("kind", ["--nftables", "--ufw"])
def test_firewall_command(tmp_path: Path, kind: str) -> None:
    cfg = ROOT / "config" / "clawgate.docker.json"
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "firewall", kind, "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    if kind == "--ufw":
        assert "sudo ufw allow in on tailscale0 from 100.64.0.0/10 to any port 18789" in proc.stdout
        return
    if shutil.which("nft") is None:
        assert "tcp dport 18789 drop" in proc.stdout
        return
    rules = tmp_path / "rules.nft"
    rules.write_text(proc.stdout)
    check = subprocess.run(["nft", "-c", "-f", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_doctor_reads_the_gateways_pairing_store(tmp_path: Path) -> None:
    store = PairingStore(tmp_path / "openclaw-state")
    store.pair(FakeDevice.new(), "t1")
    store.pair(FakeDevice.new(), "t2")
    gw_token = tmp_path / "gw.token"
    gw_token.write_text("x" * 40)
    gw_token.chmod(0o600)

    def pairing(state_dir: Path) -> list[tuple[str, str]]:
        cfg = tmp_path / "c.json"
        cfg.write_text(
            json.dumps({"gatewayToken": {"file": str(gw_token), "stateDir": str(state_dir)}})
        )
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy",
                "doctor",
                "--json",
                "--config",
                str(cfg),
                "--gateway-config",
                str(tmp_path / "x"),
            ],
            capture_output=True,
            text=True,
            cwd=str(ROOT),
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert "Traceback" not in proc.stderr
        return [(f["severity"], f["what"]) for f in findings(proc) if f["check"] == "pairingStore"]

    try:
        assert pairing(store.state_dir) == [
            ("ok", "the gateway's pairing store is readable (2 paired devices)")
        ]
        ((severity, what),) = pairing(tmp_path / "elsewhere")
        assert severity == "error" and "cannot be read" in what and "elsewhere" in what
    finally:
        store.close()
