"""Where clawgate listens with ``"host": "tailscale"``, its Tailscale health, and userspace
networking.

clawgate binds exactly this node's TailscaleIPs from status (never 0.0.0.0), binds later
when tailscaled comes up or reports new addresses (IP_FREEBIND: before the address is on
an interface), and without any tailscaled serves on 127.0.0.1 only with one warning.
/health reports the backend state and the node key expiry. With userspace networking,
peers arrive from 127.0.0.1:PORT and only whois of that exact address identifies them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

from proxy.tailscale import DEFAULT_SOCKET_PATHS
from tests.fakes.fake_gateway import FakeGateway
from tests.netns import GW_PUBLIC_V4, GW_V4, GW_V6, PHONE_V4, PHONE_V6, Tailnet, connect_in
from tests.support import (
    ADMIN_PORT,
    ALICE,
    PORT,
    alice_body,
    clawgate_config,
    connect_bound,
    eventually,
    fake_tailscaled,
    iso_in,
    listeners_of,
    loopback_socket,
    request,
    running,
)

TAILNET_LISTENERS = {f"{GW_V4}:{PORT}", f"[{GW_V6}]:{PORT}"}
ADMIN_LISTENER = f"127.0.0.1:{ADMIN_PORT}"
WILDCARDS = ("0.0.0.0:", "*:", "[::]:")


async def refused(tailnet: Tailnet, host: str, role: str = "phone") -> bool:
    try:
        sock = await connect_in(tailnet.ns(role), host, PORT, timeout=2)
    except ConnectionRefusedError:
        return True
    sock.close()
    return False


async def test_binds_exactly_the_tailscale_addresses(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with fake_tailscaled() as ts:
        assert ts.self_ips == [GW_V4, GW_V6]
        cfg = clawgate_config(fake_gateway, ts.socket_path, host="tailscale")
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            assert listeners_of(tailnet, cg.pid) == TAILNET_LISTENERS | {ADMIN_LISTENER}
            status, body = await cg.admin_json("/health")
            assert sorted(body["clawgate"]["listening"]) == sorted(TAILNET_LISTENERS)
            for dst, src in ((GW_V4, PHONE_V4), (GW_V6, PHONE_V6)):
                fake_gateway.clear()
                resp = await request(tailnet, "phone", dst, token=cg.tokens["phone"])
                assert resp.status == 200
                (rec,) = fake_gateway.requests
                assert rec.header_all("X-Forwarded-User") == [ALICE]
                assert rec.header_all("X-Forwarded-For") == [src]
            # gw's public address is on the same host but not a tailnet address: not served.
            assert await refused(tailnet, GW_PUBLIC_V4, "public")


@pytest.mark.parametrize("start_state", ["NeedsLogin", "absent"])
async def test_binds_once_tailscaled_is_up(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path, start_state: str
) -> None:
    """Started before tailscaled is Running (or exists at all): no listener, never a
    wildcard; once it is up, exactly the tailnet addresses, with no restart."""
    async with fake_tailscaled(start=start_state != "absent") as ts:
        if start_state == "NeedsLogin":
            ts.set_backend_state("NeedsLogin")
        cfg = clawgate_config(fake_gateway, ts.socket_path, host="tailscale")
        async with running(tailnet, tmp_path / "cg", cfg, wait_for="waiting for tailscaled") as cg:
            assert listeners_of(tailnet, cg.pid) == {ADMIN_LISTENER}
            assert await refused(tailnet, GW_V4)
            status, body = await cg.admin_json("/health")
            assert status == 503 and body["status"] == "degraded"
            if start_state == "NeedsLogin":
                assert any("NeedsLogin" in p for p in body["problems"]), body
            else:
                assert any("unreachable" in p for p in body["problems"]), body
            if start_state == "absent":
                await ts.start()
            else:
                ts.set_backend_state("Running")
            await cg.wait_stderr("tailnet address appeared", timeout=10)
            await eventually(
                lambda: _listeners(tailnet, cg.pid),
                lambda got: got == TAILNET_LISTENERS | {ADMIN_LISTENER},
            )
            resp = await request(tailnet, "phone", token=cg.tokens["phone"])
            assert resp.status == 200
            await eventually(lambda: cg.admin_json("/health"), lambda r: r[0] == 200)
            assert not any(w in line for line in listeners_of(tailnet, cg.pid) for w in WILDCARDS)


async def _listeners(tailnet: Tailnet, pid: int) -> set[str]:
    return listeners_of(tailnet, pid)


async def test_new_address_is_bound_before_it_is_on_an_interface(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    """tailscaled reports a new address: clawgate binds it at once (IP_FREEBIND), and it
    serves as soon as the address is configured."""
    new = "100.64.0.77"
    gw_if = tailnet.ifname("gw")
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(fake_gateway, ts.socket_path, host="tailscale")
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            ts.self_ips = [GW_V4, new, GW_V6]
            ts.push_notify({"SelfChange": {"ID": 1}})  # the daemon's own node changed
            await cg.wait_stderr(f"listening on {new}:{PORT} (tailnet address appeared)")
            assert f"{new}:{PORT}" in listeners_of(tailnet, cg.pid)
            subprocess.run(
                ["ip", "-n", tailnet.ns("gw"), "addr", "add", f"{new}/32", "dev", gw_if],
                check=True,
                timeout=10,
            )
            try:
                resp = await request(tailnet, "phone", new, token=cg.tokens["phone"])
                assert resp.status == 200
            finally:
                subprocess.run(
                    ["ip", "-n", tailnet.ns("gw"), "addr", "del", f"{new}/32", "dev", gw_if],
                    check=False,
                    timeout=10,
                )


async def test_no_tailscaled_serves_loopback_only(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    present = [p for p in DEFAULT_SOCKET_PATHS if os.path.exists(p)]
    if present:
        pytest.skip(f"a tailscaled socket exists on this machine: {present}")
    cfg = clawgate_config(fake_gateway, None, host="tailscale")
    async with running(tailnet, tmp_path / "cg", cfg, wait_for="listening on") as cg:
        assert listeners_of(tailnet, cg.pid) == {f"127.0.0.1:{PORT}", ADMIN_LISTENER}
        warnings = [line for line in cg.stderr().splitlines() if "WARNING" in line]
        assert len(warnings) == 1, warnings
        assert "tailscaled not found" in warnings[0] and f"127.0.0.1:{PORT}" in warnings[0]
        assert await refused(tailnet, GW_V4)
        sock, _ = await loopback_socket(tailnet)
        await connect_bound(sock, "127.0.0.1", PORT)
        resp = await request(tailnet, "gw", "127.0.0.1", token=cg.tokens["phone"], sock=sock)
        assert resp.status == 200
        (rec,) = fake_gateway.requests
        assert rec.header_all("X-Forwarded-User") == []
        status, body = await cg.admin_json("/health")
        assert status == 200 and body["tailscale"] is None


@pytest.mark.parametrize(
    ("warn_days", "expiry_days", "expired", "expect"),
    [
        (14, 5, False, "warn"),
        (3, 5, False, "ok"),
        (14, 60, False, "ok"),
        (14, -1, True, "degraded"),
    ],
)
async def test_health_key_expiry(
    tailnet: Tailnet,
    fake_gateway: FakeGateway,
    tmp_path: Path,
    warn_days: int,
    expiry_days: int,
    expired: bool,
    expect: str,
) -> None:
    async with fake_tailscaled() as ts:
        expiry = iso_in(days=expiry_days)
        ts.self_key_expiry, ts.self_expired = expiry, expired
        cfg = clawgate_config(
            fake_gateway, ts.socket_path, tailscale={"keyExpiryWarnDays": warn_days}
        )
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            status, body = await cg.admin_json("/health")
            t = body["tailscale"]
            assert t["state"] == "Running" and t["key_expiry"] == expiry, t
            key_warnings = [w for w in body["warnings"] if "node key" in w]
            if expect == "warn":
                assert status == 200 and body["status"] == "ok"
                assert key_warnings == [f"node key expires in {expiry_days - 1} days ({expiry})"]
                await cg.wait_stderr(f"node key expires in {expiry_days - 1} days")
            elif expect == "ok":
                assert status == 200 and key_warnings == [] and t["warning"] is None
                assert "node key" not in cg.stderr()
            else:
                assert status == 503 and "node key expired" in body["problems"]
                await cg.wait_stderr("node key expired at")
            # Logged once, not at every poll.
            for _ in range(3):
                await cg.admin_json("/health")
            assert cg.stderr().count("node key") <= 1


@pytest.mark.parametrize("state", ["Stopped", "NeedsLogin", "Starting"])
async def test_health_degraded_when_not_running(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path, state: str
) -> None:
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(fake_gateway, ts.socket_path)
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            token = cg.tokens["phone"]
            assert (await cg.admin_json("/health"))[0] == 200
            assert (await request(tailnet, "phone", token=token)).status == 200
            ts.set_backend_state(state)
            status, body = await eventually(lambda: cg.admin_json("/health"), lambda r: r[0] == 503)
            assert body["status"] == "degraded" and body["tailscale"]["state"] == state
            assert any(state in p for p in body["problems"]), body
            # Identity is not vouched for while the backend is down: never an allow.
            resp = await request(tailnet, "phone", token=token)
            assert resp.status in (403, 503), resp
            ts.set_backend_state("Running")
            await eventually(lambda: cg.admin_json("/health"), lambda r: r[0] == 200)
            await eventually(
                lambda: request(tailnet, "phone", token=token), lambda r: r.status == 200
            )


async def test_userspace_networking_identity_by_loopback_port(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    """tailscaled --tun=userspace-networking: peers come from 127.0.0.1:<ephemeral>."""
    async with fake_tailscaled() as ts:
        ts.tun = False
        cfg = clawgate_config(
            fake_gateway, ts.socket_path, host="127.0.0.1", tailscale={"cacheTtl": 3600}
        )
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            token = cg.tokens["phone"]
            # A tailnet peer proxied in by tailscaled: whois knows this exact ip:port.
            sock, port = await loopback_socket(tailnet)
            ts.add_loopback(port, alice_body())
            await connect_bound(sock, "127.0.0.1", PORT)
            resp = await request(tailnet, "gw", "127.0.0.1", token=token, sock=sock)
            assert resp.status == 200, resp
            (rec,) = fake_gateway.requests
            assert rec.header_all("X-Forwarded-User") == [ALICE]
            asked = [unquote(r.query_string) for r in ts.requests if r.path.endswith("/whois")]
            assert asked == [f"addr=127.0.0.1:{port}"]
            rec_log = await cg.wait_log(
                lambda r: r.get("event") == "decision" and r.get("login") == ALICE
            )
            assert rec_log["node"] == "alice-laptop.tail3f2a1.ts.net"
            # The path is alice's, found through her tailnet addresses (not 127.0.0.1).
            assert rec_log["peer_path"] == "direct"
            assert rec_log["path"] == "/headers" or rec_log["path"].startswith("/")

            # A local process (no whois match): never a tailnet identity.
            ts.remove_loopback(port)
            fake_gateway.clear()
            other, _ = await loopback_socket(tailnet)
            await connect_bound(other, "127.0.0.1", PORT)
            resp = await request(tailnet, "gw", "127.0.0.1", token=token, sock=other)
            assert resp.status == 403
            assert resp.body == b"local process, not a tailnet peer\n"
            # The same port reused after alice's connection closed: her identity is gone
            # with that connection (the cache is keyed on ip:port for loopback).
            again = await _bind_port(tailnet, port)
            await connect_bound(again, "127.0.0.1", PORT)
            resp = await request(tailnet, "gw", "127.0.0.1", token=token, sock=again)
            assert resp.status == 403 and b"local process" in resp.body
            assert fake_gateway.requests == []


async def test_userspace_local_process_without_require_identity(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(
            fake_gateway, ts.socket_path, host="127.0.0.1", tailscale={"requireIdentity": False}
        )
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            sock, _ = await loopback_socket(tailnet)
            await connect_bound(sock, "127.0.0.1", PORT)
            resp = await request(
                tailnet,
                "gw",
                "127.0.0.1",
                token=cg.tokens["phone"],
                sock=sock,
                headers=[("X-Forwarded-User", ALICE)],
            )
            assert resp.status == 200
            (rec,) = fake_gateway.requests
            assert rec.header_all("X-Forwarded-User") == []  # and the spoofed one is gone


async def _bind_port(tailnet: Tailnet, port: int):  # type: ignore[no-untyped-def]
    import socket as _socket

    from tests.netns import socket_in

    s = socket_in(tailnet.ns("gw"))
    s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.setblocking(False)
    return s
