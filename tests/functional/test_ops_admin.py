"""The admin listener of a real clawgate process after real traffic over the netns tailnet:
/metrics (validated by promtool), /health (200, then 503 when tailscaled or the gateway
goes), /connections and `clawgate status` (live sessions with identity and path)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.fakes.fake_gateway import FakeGateway
from tests.fakes.fake_tailscaled import FakeTailscaled
from tests.harness import ROOT, ClawgateProcess
from tests.netns import GW_V4, PHONE_V4, Tailnet, connect_in
from tests.support import (
    ALICE,
    PORT,
    clawgate_config,
    fake_tailscaled,
    request,
    running,
)

pytestmark = pytest.mark.netns

Running = tuple[ClawgateProcess, FakeTailscaled]


def _metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )


async def poll(fn: Any, timeout: float = 5.0) -> Any:
    """Call ``fn`` (async) until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = await fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {got!r})")
        await asyncio.sleep(0.05)


def cli_in_ns(cg: ClawgateProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cg.argv(*args)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(ROOT),
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture
async def serving(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> AsyncIterator[Running]:
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(fake_gateway, ts.socket_path)
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            # The monitor's first status poll: /health is meaningful from here on.
            async def polled() -> bool:
                _, body = await cg.admin_json("/health")
                return bool(body["tailscale"] and body["tailscale"]["state"] == "Running")

            await poll(polled)
            yield cg, ts


async def test_metrics_after_traffic_pass_promtool(tailnet: Tailnet, serving: Running) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (apt package prometheus)")
    cg, ts = serving
    token = cg.tokens["phone"]
    ts.mode = "503"  # whois of a peer never seen fails: a LocalAPI error, and a 503
    r = await request(tailnet, "ci", path="/headers", token=token)
    assert r.status == 503
    ts.mode = "ok"
    r = await request(tailnet, "ci", path="/headers")  # no token: 401
    assert r.status == 401
    sock = await connect_in(tailnet.ns("phone"), GW_V4, PORT)
    async with connect(
        f"ws://{GW_V4}:{PORT}/ws",
        sock=sock,
        proxy=None,
        additional_headers={"Authorization": f"Bearer {token}"},
    ) as ws:
        for _ in range(5):
            await ws.send("x" * 1000)
            assert await ws.recv() == "x" * 1000
        # Bytes of a session still open are counted (a WebSocket lives for hours).
        status, body = await cg.admin("GET", "/metrics")
        live = _metrics(body.decode())
        assert live['clawgate_bytes_total{direction="client_to_gateway"}'] >= 5000
        assert live['clawgate_bytes_total{direction="gateway_to_client"}'] >= 5000
        assert live["clawgate_tunnels_active"] == 1
    status, body = await cg.admin("GET", "/metrics")
    assert status == 200
    text = body.decode()
    check = promtool(text)
    assert check.returncode == 0, check.stdout + check.stderr
    m = _metrics(text)
    assert m["clawgate_connections_accepted_total"] == 3
    assert m["clawgate_connections_active"] >= 0
    assert m["clawgate_localapi_errors_total"] >= 1
    assert m["clawgate_identity_cache_misses_total"] >= 1
    assert "clawgate_identity_cache_hits_total" in m
    assert "clawgate_upstream_errors_total" in m
    assert m['clawgate_decisions_total{result="deny",status="401"}'] >= 1
    assert m["clawgate_handshake_seconds_count"] >= 1
    assert (
        m['clawgate_handshake_seconds_bucket{le="+Inf"}'] == m["clawgate_handshake_seconds_count"]
    )
    assert m['clawgate_bytes_total{direction="client_to_gateway"}'] >= 5000
    # promtool is a real linter: a broken exposition fails it.
    assert (
        promtool(
            text.replace(
                "# TYPE clawgate_connections_active gauge",
                "# TYPE clawgate_connections_active bogus",
            )
        ).returncode
        != 0
    )


async def test_refused_by_reason_and_upstream_errors(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = clawgate_config(fake_gateway, None, gateway={"allowedNetworks": ["100.64.0.0/10"]})
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        sock = await connect_in(tailnet.ns("public"), GW_V4, PORT)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            try:  # closed (or reset) at accept: not one byte of answer
                assert await reader.read() == b""
            except ConnectionResetError:
                pass
        writer.close()
        r = await request(tailnet, "phone", path="/headers", token=cg.tokens["phone"])
        assert r.status == 200
        await fake_gateway.stop()
        r = await request(tailnet, "phone", path="/headers", token=cg.tokens["phone"])
        assert r.status == 502
        _, body = await cg.admin("GET", "/metrics")
        m = _metrics(body.decode())
        assert m['clawgate_connections_refused_total{reason="network"}'] == 1
        assert m["clawgate_upstream_errors_total"] == 1
        status, health = await cg.admin_json("/health")
        assert status == 503 and health["status"] == "degraded"
        assert health["upstream"]["reachable"] is False
        assert any("gateway unreachable" in p for p in health["problems"])


async def test_health_ok_then_degraded_by_tailscale(serving: Running) -> None:
    cg, ts = serving
    status, body = await cg.admin_json("/health")
    assert status == 200, body
    assert body["status"] == "ok" and body["problems"] == []
    assert body["upstream"]["reachable"] is True
    assert f"{GW_V4}:{PORT}" in body["clawgate"]["listening"]
    t = body["tailscale"]
    assert t["state"] == "Running" and t["running"] is True
    assert t["key_expiry"] and 58 <= t["key_expiry_days_left"] <= 60
    ts.set_backend_state("NeedsLogin")

    async def degraded() -> Any:
        code, b = await cg.admin_json("/health")
        return (code, b) if code == 503 else None

    code, b = await poll(degraded)
    assert b["tailscale"]["state"] == "NeedsLogin"
    assert any("NeedsLogin" in p for p in b["problems"]), b["problems"]
    ts.set_backend_state("Running")

    async def back() -> bool:
        return (await cg.admin_json("/health"))[0] == 200

    await poll(back)


async def test_connections_and_status_show_live_sessions(
    tailnet: Tailnet, serving: Running
) -> None:
    cg, ts = serving
    token = cg.tokens["phone"]
    sock = await connect_in(tailnet.ns("phone"), GW_V4, PORT)
    async with connect(
        f"ws://{GW_V4}:{PORT}/ws",
        sock=sock,
        proxy=None,
        additional_headers={"Authorization": f"Bearer {token}"},
    ) as ws:
        await ws.send("hello" * 100)
        assert await ws.recv() == "hello" * 100
        status, body = await cg.admin_json("/connections")
        assert status == 200
        conns = [c for c in body["connections"] if c["websocket"]]
        assert len(conns) == 1
        c = conns[0]
        assert c["peer"] == PHONE_V4 and c["token"] == "phone"
        assert c["login"] == ALICE and c["node"].startswith("alice-laptop.")
        assert c["peer_path"] == "direct"
        assert c["bytes_in"] >= 500 and c["bytes_out"] >= 500 and c["age_seconds"] >= 0

        table = cli_in_ns(cg, "status", "--config", str(cg.config_path))
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:4] == ["ID", "PEER", "NODE", "LOGIN"]
        row = next(ln for ln in lines if PHONE_V4 in ln).split()
        assert row[1:4] == [PHONE_V4, "alice-laptop", ALICE]
        assert "phone" in row and "direct" in row and "ws" in row
        as_json = cli_in_ns(cg, "status", "--json", "--config", str(cg.config_path))
        assert json.loads(as_json.stdout)[0]["login"] == ALICE
    # Closed sessions leave the table.

    async def gone() -> bool:
        _, b = await cg.admin_json("/connections")
        return not any(c["websocket"] for c in b["connections"])

    await poll(gone)


async def test_status_without_a_running_clawgate(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"admin": {"port": 1}}))
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "status", "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=30,
    )
    assert proc.returncode == 1
    assert "cannot reach the running clawgate" in proc.stderr
    assert "Traceback" not in proc.stderr
