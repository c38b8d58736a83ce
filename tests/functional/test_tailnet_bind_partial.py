"""A tailnet address clawgate cannot bind does not keep it off the others; /health says
when none of the tailnet addresses is on an interface where clawgate runs.

Seen for real in Docker (tests/deploy/test_docker.py): with IPv6 off in the sidecar's
namespace, tailscaled reported the node's fd7a:115c:a1e0:: address, the bind failed, and
the addresses after it in the same update were never bound (and the ones before it never
logged). Here the IPv6 port is taken by another listener and tailscaled lists IPv6 first.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.fakes.fake_gateway import FakeGateway
from tests.netns import GW_V4, GW_V6, Tailnet, listen_in
from tests.support import (
    PORT,
    clawgate_config,
    fake_tailscaled,
    request,
    running,
)


async def test_unbindable_address_does_not_block_the_others(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    blocker = listen_in(tailnet.ns("gw"), GW_V6, PORT)
    try:
        async with fake_tailscaled() as ts:
            ts.set_backend_state("NeedsLogin")
            ts.self_ips = [GW_V6, GW_V4]
            cfg = clawgate_config(fake_gateway, ts.socket_path, host="tailscale")
            async with running(
                tailnet, tmp_path / "cg", cfg, wait_for="waiting for tailscaled"
            ) as cg:
                ts.set_backend_state("Running")
                await cg.wait_stderr(f"cannot listen on [{GW_V6}]:{PORT}", timeout=10)
                await cg.wait_stderr(
                    f"listening on {GW_V4}:{PORT} (tailnet address appeared)", timeout=10
                )
                resp = await request(tailnet, "phone", GW_V4, token=cg.tokens["phone"])
                assert resp.status == 200
    finally:
        blocker.close()


async def test_health_degraded_when_no_tailnet_address_is_local(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    """tailscaled Running with a TUN, but none of its addresses on an interface where
    clawgate runs: clawgate is unreachable, and /health must say so. Seen for real in
    Docker: after the sidecar container restarts, clawgate stays in the old network
    namespace; the socket volume shows tailscaled Running again, /health said ok (the
    HEALTHCHECK healthy) while every tailnet connection was refused."""
    new = "100.64.0.77"
    gw_if = tailnet.ifname("gw")
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(fake_gateway, ts.socket_path, host="tailscale")
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            status, body = await cg.admin_json("/health")
            assert status == 200, body
            ts.self_ips = [new]  # an address that is on no interface of gw
            ts.push_notify({"SelfChange": {"ID": 1}})
            await cg.wait_stderr(f"listening on {new}:{PORT} (tailnet address appeared)")
            status, body = await cg.admin_json("/health")
            assert status == 503, body
            assert any("no interface" in p and new in p for p in body["problems"]), body
            subprocess.run(
                ["ip", "-n", tailnet.ns("gw"), "addr", "add", f"{new}/32", "dev", gw_if],
                check=True,
                timeout=10,
            )
            try:
                status, body = await cg.admin_json("/health")
                assert status == 200, body
            finally:
                subprocess.run(
                    ["ip", "-n", tailnet.ns("gw"), "addr", "del", f"{new}/32", "dev", gw_if],
                    check=False,
                    timeout=10,
                )
