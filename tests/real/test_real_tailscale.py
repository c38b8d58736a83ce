"""clawgate against the REAL tailscaled 1.96.4 on a real tailnet (tests/real/conftest.py).

Everything a peer is comes from the real daemon: tailnet addresses and identities assigned by
our control server (tests/fakes/testcontrol.py), WireGuard between namespaces, whois over the
server node's LocalAPI at its default socket path. clawgate runs on the server node with
"host": "tailscale" and no tailscale.socket.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.fake_gateway import FakeGateway
from tests.netns import connect_in
from tests.real.conftest import (
    ALICE,
    BOB,
    CAP,
    CAP_VALUE,
    PORT,
    ServerClawgate,
    server_config,
    start_server_clawgate,
)
from tests.real.tailnet import RealTailnet
from tests.support import eventually, reconfigure, request

pytestmark = pytest.mark.netns


def _listeners(tn: RealTailnet, pid: int) -> set[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", tn.ns("server"), "ss", "-Hltnp"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return {line.split()[3] for line in out.splitlines() if f"pid={pid}," in line}


def _whois(tn: RealTailnet, name: str) -> dict[str, Any]:
    """The real daemon's whois of node `name`, asked on the server node."""
    out = tn.nodes["server"].cli("whois", "--json", tn.v4(name)).stdout
    return json.loads(out)  # type: ignore[no-any-return]


async def _get(tn: RealTailnet, src: str, path: str = "/headers", *, v6: bool = False) -> Any:
    host = tn.v6("server") if v6 else tn.v4("server")
    return await request(tn, src, host=host, port=PORT, path=path)  # type: ignore[arg-type]


def _forwarded_user(gw: FakeGateway) -> str | None:
    return gw.requests[-1].header("x-forwarded-user")


# --- binding ---------------------------------------------------------------------------------


async def test_binds_the_real_tailnet_addresses(
    real_tailnet: RealTailnet, clawgate_on_server: ServerClawgate
) -> None:
    tn, cg = real_tailnet, clawgate_on_server
    want = {f"{tn.v4('server')}:{PORT}", f"[{tn.v6('server')}]:{PORT}"}
    got = await eventually(
        lambda: _async(lambda: _listeners(tn, cg.pid)), lambda s: want <= s, timeout=10
    )
    # Only the tailnet addresses: not the underlay, not a wildcard.
    assert not [a for a in got if a.split(":")[0] in ("0.0.0.0", "*", "198.18.1.10")], got
    assert tn.nodes["server"].ips() == [tn.v4("server"), tn.v6("server")]
    # And it serves there, over WireGuard from the phone, v4 and v6.
    assert (await _get(tn, "phone")).status == 200
    assert (await _get(tn, "phone", v6=True)).status == 200


async def _async(fn: Any) -> Any:
    return fn()


def _kernel_addrs(tn: RealTailnet) -> set[str]:
    """The tailnet addresses on the server's tailscale0, as the kernel has them."""
    out = subprocess.run(
        ["ip", "-n", tn.ns("server"), "-j", "addr", "show"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return {
        a["local"]
        for link in json.loads(out)
        for a in link.get("addr_info", [])
        if a["local"].startswith(("100.", "fd7a:"))
    }


async def _bring_up(tn: RealTailnet) -> None:
    """`tailscale up` on the server (it returns once Running: make a peer path live)."""
    server = tn.nodes["server"]
    up = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            server.ns,
            server.tailscale_bin,
            f"--socket={server.socket_path}",
            "up",
            f"--login-server={tn.ctl.url}",
            "--hostname=server",
            "--accept-dns=false",
            "--netfilter-mode=off",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(tn.connect_all, "server", 60)
        await asyncio.to_thread(up.wait, 30)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


async def test_binds_the_addresses_when_they_appear(
    real_tailnet: RealTailnet, server_gateway: FakeGateway, tmp_path: Path
) -> None:
    tn = real_tailnet
    server = tn.nodes["server"]
    server.cli("down")  # tailscaled runs, the node is Stopped: no tailnet address
    try:
        assert server.status()["BackendState"] == "Stopped"
        assert _kernel_addrs(tn) == set()  # the daemon took them off tailscale0
        cg = await start_server_clawgate(
            tn,
            tmp_path / "cg",
            server_config(server_gateway.port),
            wait_for="waiting for tailscaled to come up",
        )
        try:
            assert "is Stopped, not Running: will listen once it is up" in cg.stderr()
            await _bring_up(tn)
            err = await cg.wait_stderr("(tailnet address appeared)", timeout=20)
            assert f"listening on {tn.v4('server')}:{PORT} (tailnet address appeared)" in err
            assert f"listening on [{tn.v6('server')}]:{PORT} (tailnet address appeared)" in err
            assert (await _get(tn, "phone")).status == 200
        finally:
            await cg.stop()
    finally:
        if server.status().get("BackendState") != "Running":
            await _bring_up(tn)


# --- whois of real peers -------------------------------------------------------------------


def test_real_whois_user_tagged_node_os_capmap(real_tailnet: RealTailnet) -> None:
    tn = real_tailnet
    phone = _whois(tn, "phone")
    assert phone["UserProfile"]["LoginName"] == ALICE
    assert phone["Node"]["Name"] == "phone.tail-test.ts.net."
    assert phone["Node"]["ComputedName"] == "phone"
    assert phone["Node"]["Hostinfo"]["OS"] == "linux"
    assert phone["Node"].get("Tags") is None
    # The grant in the server's packet filter (a CapGrant), as the real daemon reports it.
    assert phone["CapMap"] == {CAP: [CAP_VALUE]}
    ci = _whois(tn, "ci")
    assert ci["Node"]["Tags"] == ["tag:ci"]
    assert ci["UserProfile"]["LoginName"] == "tagged-devices"
    assert ci["CapMap"] is None
    laptop = _whois(tn, "laptop")
    assert laptop["UserProfile"]["LoginName"] == ALICE
    assert laptop["CapMap"] is None  # the grant is phone's only
    assert _whois(tn, "bob")["UserProfile"]["LoginName"] == BOB


async def test_identity_reaches_the_gateway_and_the_log(
    real_tailnet: RealTailnet, clawgate_on_server: ServerClawgate, server_gateway: FakeGateway
) -> None:
    tn, cg = real_tailnet, clawgate_on_server
    assert (await _get(tn, "phone")).status == 200
    assert _forwarded_user(server_gateway) == ALICE
    assert server_gateway.requests[-1].header("x-forwarded-for") == tn.v4("phone")
    assert (await _get(tn, "ci")).status == 200
    fwd_ci = _forwarded_user(server_gateway)
    assert fwd_ci is not None and "ci" in fwd_ci and fwd_ci != "tagged-devices"
    rec = await cg.wait_log(
        lambda r: r.get("event") == "decision" and r.get("peer") == tn.v4("phone")
    )
    assert (rec["login"], rec["node"], rec["tags"], rec["os"]) == (
        ALICE,
        "phone.tail-test.ts.net",
        [],
        "linux",
    )
    # A direct WireGuard path between the namespaces (no DERP exists in this tailnet).
    assert rec["peer_path"] == "direct"
    rec = await cg.wait_log(lambda r: r.get("event") == "decision" and r.get("peer") == tn.v4("ci"))
    assert (rec["login"], rec["node"], rec["tags"]) == (None, "ci.tail-test.ts.net", ["tag:ci"])


# --- the policy table against real identities ------------------------------------------------

POLICIES: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    "open": ({}, {"phone": 200, "laptop": 200, "ci": 200, "bob": 200}),
    "allowUsers-alice": (
        {"allowUsers": [ALICE]},
        {"phone": 200, "laptop": 200, "ci": 403, "bob": 403},
    ),
    "allowUsers-bob": ({"allowUsers": [BOB]}, {"phone": 403, "laptop": 403, "ci": 403, "bob": 200}),
    "allowUsers-tagged-devices": (
        {"allowUsers": ["tagged-devices"]},
        {"phone": 403, "laptop": 403, "ci": 403, "bob": 403},
    ),
    "allowTags-ci": (
        {"allowTags": ["tag:ci"]},
        {"phone": 403, "laptop": 403, "ci": 200, "bob": 403},
    ),
    "users-or-tags": (
        {"allowUsers": [BOB], "allowTags": ["tag:ci"]},
        {"phone": 403, "laptop": 403, "ci": 200, "bob": 200},
    ),
    "requireCapability": (
        {"requireCapability": CAP},
        {"phone": 200, "laptop": 403, "ci": 403, "bob": 403},
    ),
    "allowUsers-alice+requireCapability": (
        {"allowUsers": [ALICE], "requireCapability": CAP},
        {"phone": 200, "laptop": 403, "ci": 403, "bob": 403},
    ),
}


async def test_policy_table_on_real_identities(
    real_tailnet: RealTailnet, clawgate_on_server: ServerClawgate, server_gateway: FakeGateway
) -> None:
    tn, cg = real_tailnet, clawgate_on_server
    base = cg.config
    failures = []
    for name, (policy, want) in POLICIES.items():
        cfg = json.loads(json.dumps(base))
        cfg["tailscale"] = {"authMode": "identity", **policy}
        await reconfigure(cg, cfg)
        for node, status in want.items():
            got = (await _get(tn, node)).status
            if got != status:
                failures.append(f"{name}: {node} got {got}, want {status}")
    assert not failures, failures


# --- IPN bus: the control server changes who a peer is ------------------------------------------


async def test_bus_flush_on_tag_change_and_removal(
    real_tailnet: RealTailnet, server_gateway: FakeGateway, tmp_path: Path
) -> None:
    tn = real_tailnet
    cfg = server_config(server_gateway.port, allowUsers=[ALICE], cacheTtl=3600)
    cg = await start_server_clawgate(tn, tmp_path / "cg", cfg)
    try:
        # laptop is alice's: admitted, and the verdict is cached for an hour.
        assert (await _get(tn, "laptop")).status == 200
        assert (await _get(tn, "laptop")).status == 200
        tn.ctl.set_tags("laptop", ["tag:kiosk"])
        # The server's tailscaled gets the new netmap; the IPN bus tells clawgate to flush.
        await eventually(
            lambda: _async(lambda: _whois(tn, "laptop")["Node"].get("Tags")),
            lambda t: t == ["tag:kiosk"],
            timeout=15,
        )
        got = await eventually(
            lambda: _get(tn, "laptop"), lambda r: r.status == 403, timeout=10, interval=0.2
        )
        assert got.status == 403
        # bob is removed from the tailnet: the server's tailscaled drops him from its
        # netmap (whois: not found) and from WireGuard, so his packets no longer arrive.
        assert (await _get(tn, "bob")).status == 403  # a known peer, not alice
        bob_ip = tn.v4("bob")
        tn.ctl.remove_node("bob")
        await eventually(
            lambda: _async(lambda: tn.nodes["server"].cli("whois", bob_ip, check=False)),
            lambda p: p.returncode != 0,
            timeout=15,
        )
        with pytest.raises((OSError, TimeoutError)):
            await connect_in(tn.ns("bob"), tn.v4("server"), PORT, timeout=3)
        assert tn.v4("phone") and (await _get(tn, "phone")).status == 200
    finally:
        await cg.stop()


# --- key expiry -----------------------------------------------------------------------------


async def test_key_expiry_warning_from_the_control_server(
    real_tailnet: RealTailnet, server_gateway: FakeGateway, tmp_path: Path
) -> None:
    tn = real_tailnet
    when = datetime.now(UTC) + timedelta(days=3, hours=1)
    tn.ctl.set_key_expiry("server", when)
    try:
        await eventually(
            lambda: _async(lambda: tn.nodes["server"].status()["Self"].get("KeyExpiry")),
            lambda v: bool(v) and v.startswith(when.strftime("%Y-%m-%d")),
            timeout=15,
        )
        cfg = server_config(server_gateway.port, keyExpiryWarnDays=7)
        cg = await start_server_clawgate(tn, tmp_path / "cg", cfg)
        try:
            err = await cg.wait_stderr("tailscale node key expires in 3 days", timeout=15)
            assert when.strftime("%Y-%m-%dT%H:%M") in err
            status, body = await cg.admin("GET", "/health")
            assert b"node key expires in 3 days" in body, (status, body)
        finally:
            await cg.stop()
    finally:
        tn.ctl.set_key_expiry("server", None)


# --- tailscaled killed and restarted under a running clawgate -----------------------------------


async def test_tailscaled_killed_503_then_restarted_served_again(
    real_tailnet: RealTailnet, server_gateway: FakeGateway, tmp_path: Path
) -> None:
    tn = real_tailnet
    server = tn.nodes["server"]
    # With kernel TUN no tailnet packet arrives while tailscaled is dead (the TUN goes with
    # it), so clawgate also listens on the server's underlay address: a peer there needs a
    # whois too, which is what shows the outage (503) and the recovery (403, not a peer).
    cfg = server_config(server_gateway.port)
    cfg["gateway"] = {
        "host": ["tailscale", server.underlay],
        "port": PORT,
        "allowedNetworks": ["100.64.0.0/10", "fd7a:115c:a1e0::/48", "198.18.1.0/24"],
    }
    cg = await start_server_clawgate(tn, tmp_path / "cg", cfg)
    try:
        pid = cg.pid
        assert (await _get(tn, "phone")).status == 200
        underlay = await request(tn, "phone", host=server.underlay, port=PORT)  # type: ignore[arg-type]
        assert underlay.status == 403, underlay  # a real whois: not a tailnet peer

        server.stop(signal.SIGKILL)
        down = await eventually(
            lambda: request(tn, "phone", host=server.underlay, port=PORT),  # type: ignore[arg-type]
            lambda r: r.status == 503,
            timeout=10,
            interval=0.2,
        )
        assert b"tailscale identity unavailable" in down.body, down
        status, body = await cg.admin("GET", "/health")
        assert status == 503, body

        server.start()  # same state dir: same node key, same addresses
        await asyncio.to_thread(tn.connect_all, "server", 60)
        back = await eventually(
            lambda: _get(tn, "phone"), lambda r: r.status == 200, timeout=20, interval=0.5
        )
        assert back.status == 200 and _forwarded_user(server_gateway) == ALICE
        again = await request(tn, "phone", host=server.underlay, port=PORT)  # type: ignore[arg-type]
        assert again.status == 403, again
        assert cg.pid == pid and cg.proc is not None and cg.proc.poll() is None
    finally:
        await cg.stop()
        if server.proc is None:
            server.start()
            await asyncio.to_thread(tn.connect_all, "server", 60)
