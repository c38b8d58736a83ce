"""Issue 12 item 4: DNS rebinding. clawgate serves only Host values that name it.

The attack: a page on ``rebind.attacker.example`` re-points its name at this node's
tailnet address; alice's browser then sends credential-less requests from alice's own
device with ``Host: rebind.attacker.example``, and in ``authMode`` either/identity
clawgate forwarded them as alice. Now every request (plain, WebSocket upgrade, exempt
path, clawgate's own login page) whose Host is not one of clawgate's names or addresses
gets 421 and never reaches the gateway. Names clawgate answers to: its tailnet IPs,
MagicDNS and certificate names (from tailscaled's status), the short name, loopback and
``gateway.allowedHosts``. The pure matcher is table-tested at the end.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.access.hosts import HostNames, split_host
from tests.fakes.fake_gateway import FakeGateway
from tests.fakes.fake_tailscaled import SELF_HOST, TAILNET
from tests.netns import GW_V4, GW_V6, Tailnet
from tests.support import (
    clawgate_config,
    fake_tailscaled,
    running,
)
from tests.util import build_request, exchange, open_in, read_response

PORT = 18789
EVIL = "rebind.attacker.example"
MAGIC = f"{SELF_HOST}.{TAILNET}"


async def _get(
    tailnet: Tailnet,
    host: str,
    path: str = "/headers",
    extra: tuple[tuple[str, str], ...] = (),
    dest: str = GW_V4,
) -> tuple[int, bytes]:
    resp = await exchange(
        tailnet.ns("phone"),
        dest,
        PORT,
        build_request("GET", path, [("Connection", "close"), *extra], host=host),
    )
    return resp.status, resp.body


WS = (
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
)


@pytest.mark.parametrize("mode", ["either", "identity", "both"])
async def test_foreign_host_is_refused_in_every_mode(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path, mode: str
) -> None:
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(
            fake_gateway,
            str(ts.socket_path),
            host=[GW_V4, GW_V6],
            gateway={"requireToken": mode == "both", "allowedHosts": ["openclaw.example.com"]},
            tailscale={"authMode": mode, "allowUsers": ["alice@example.com"]},
        )
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            token = cg.tokens["phone"]
            auth = (("Authorization", f"Bearer {token}"),)
            for host in (
                EVIL,
                f"{EVIL}:{PORT}",
                f"{MAGIC}.{EVIL}",
                f"{EVIL}.",
                "evil",
                f"{GW_V4}.nip.io",
                "100.64.0.2",
                "[fd7a:115c:a1e0::2]",
                "openclaw.example.com.evil",
            ):
                for path, extra in (
                    ("/headers", ()),
                    ("/headers", auth),
                    ("/health", ()),
                    ("/ws", WS),
                    ("/ws", (*WS, *auth)),
                    ("/__clawgate/login", ()),
                ):
                    status, body = await _get(tailnet, host, path, extra)
                    assert status == 421, (mode, host, path, status, body)
                    assert b"Host" in body
            assert fake_gateway.requests == [], [r.path for r in fake_gateway.requests]

            # Names that are clawgate's: served as before.
            ok_hosts = [
                f"{GW_V4}:{PORT}",
                GW_V4,
                MAGIC,
                f"{MAGIC}.",
                MAGIC.upper(),
                f"{MAGIC}:{PORT}",
                SELF_HOST,
                f"[{GW_V6}]:{PORT}",
                f"[{GW_V6.upper()}]",
                "localhost",
                f"127.0.0.1:{PORT}",
                "[::1]",
                "openclaw.example.com",
                f"OpenClaw.Example.com:{PORT}",
            ]
            for host in ok_hosts:
                extra = () if mode != "both" else auth
                status, body = await _get(tailnet, host, extra=extra)
                assert status == 200, (mode, host, status, body)
            assert len(fake_gateway.requests) == len(ok_hosts)
            # The v6 listener under its own literal.
            status, _ = await _get(
                tailnet, f"[{GW_V6}]:{PORT}", dest=GW_V6, extra=() if mode != "both" else auth
            )
            assert status == 200
            assert "Traceback" not in cg.stderr()


async def test_login_post_with_a_foreign_host_is_refused(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    """A login POST asks whois first (failures count against the node): that path
    checks the Host too, before anything else, and a rebound page cannot log in."""
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(fake_gateway, str(ts.socket_path), tailscale={"authMode": "both"})
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            form = f"token={cg.tokens['phone']}&next=/".encode()
            headers = [
                ("Connection", "close"),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ]
            for host, want in ((EVIL, 421), (f"{EVIL}:{PORT}", 421), (MAGIC, 303)):
                resp = await exchange(
                    tailnet.ns("phone"),
                    GW_V4,
                    PORT,
                    build_request("POST", "/__clawgate/login", headers, form, host=host),
                )
                assert resp.status == want, (host, resp.status, resp.body)
                if want == 421:
                    assert b"Host" in resp.body
                    assert resp.header("set-cookie") is None, resp.headers
            assert fake_gateway.requests == []


async def test_host_is_checked_on_every_request_of_a_keep_alive_connection(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(fake_gateway, str(ts.socket_path), tailscale={"authMode": "either"})
        async with running(tailnet, tmp_path / "cg", cfg):
            reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
            try:
                writer.write(build_request("GET", "/headers", host=MAGIC))
                first = await asyncio.wait_for(read_response(reader), 10)
                assert first.status == 200
                writer.write(build_request("GET", "/headers", host=EVIL))
                second = await asyncio.wait_for(read_response(reader), 10)
                assert second.status == 421
            finally:
                writer.close()
            assert len(fake_gateway.requests) == 1


async def test_magicdns_name_learned_after_start(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    """A certificate name tailscaled reports later (a new CertDomain) is served."""
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(fake_gateway, str(ts.socket_path), tailscale={"authMode": "either"})
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            assert (await _get(tailnet, "gw.custom.example"))[0] == 421
            ts.cert_domains.append("gw.custom.example")
            status = 0
            for _ in range(100):
                await cg.admin("GET", "/health")  # /health polls tailscaled now
                status, _ = await _get(tailnet, "gw.custom.example")
                if status == 200:
                    break
                await asyncio.sleep(0.05)
            assert status == 200


NAMES = HostNames.build(
    exact=[GW_V4, GW_V6, "openclaw.example.com"],
    with_short=[MAGIC + ".", "web01.custom.example", "*.wild.example", "*.com", "*.1.2.3"],
)


@pytest.mark.parametrize(
    ("value", "local", "ok"),
    [
        (b"100.64.0.1", "", True),
        (b"100.64.0.1:18789", "", True),
        (b"100.64.0.1:1", "", True),  # the port is not part of the name
        (b"[fd7a:115c:a1e0::1]", "", True),
        (b"[FD7A:115C:A1E0:0:0:0:0:1]:443", "", True),
        (b"web01.tail3f2a1.ts.net", "", True),
        (b"WEB01.tail3f2a1.ts.net.", "", True),
        (b"web01", "", True),
        (b"web01:18789", "", True),
        (b"web01.custom.example", "", True),
        (b"openclaw.example.com", "", True),
        (b"openclaw", "", False),  # allowedHosts are exact: no short form
        (b"localhost", "", True),
        (b"localhost:18789", "", True),
        (b"127.0.0.1", "", True),
        (b"127.0.0.1:18789", "", True),
        (b"127.1.2.3", "", True),
        (b"[::1]:18789", "", True),
        (None, "", True),  # HTTP/1.0 without Host: not a browser
        (b"198.18.0.1", "198.18.0.1", True),  # the address the connection arrived on
        (b"[2001:db8::1]", "2001:db8::1", True),
        (b"198.18.0.1", "::ffff:198.18.0.1", True),
        (b"198.18.0.1", "", False),
        (b"198.18.0.1", "198.18.0.2", False),
        (b"rebind.attacker.example", "", False),
        (b"rebind.attacker.example:18789", "", False),
        (b"web01.tail3f2a1.ts.net.attacker.example", "", False),
        (b"attacker-web01.tail3f2a1.ts.net", "", False),
        (b"100.64.0.1.nip.io", "", False),
        (b"100.64.0.2", "", False),
        (b"fd7a:115c:a1e0::1", "", False),  # IPv6 literals must be bracketed
        (b"[fd7a:115c:a1e0::1", "", False),
        (b"[fd7a:115c:a1e0::1]x", "", False),
        (b"[web01]", "", False),
        (b"web01:", "", False),
        (b"web01:0", "", False),
        (b"web01:65536", "", False),
        (b"web01:1:2", "", False),
        (b"web01:+80", "", False),
        (b"user@web01", "", False),
        (b"web01/x", "", False),
        (b"web01 ", "", True),  # surrounding whitespace is not part of the value (RFC 9110)
        (b"web 01", "", False),
        (b"", "", False),
        (b"\xc3\xa9.example", "", False),
        (b"0x64.0.0.1", "", False),
        (b"1681915905", "", False),  # 100.64.0.1 as one integer: not a canonical IP
        (b"100.64.1", "", False),
        (b"-web01", "", False),
        (b"a.wild.example", "", True),  # a wildcard certificate name covers one label
        (b"a.b.wild.example", "", False),
        (b"wild.example", "", False),
        (b"attacker.com", "", False),  # '*.com' names no host: ignored
        (b"4.1.2.3", "", False),
        (b"web01..tail3f2a1.ts.net", "", False),
    ],
)
def test_host_matching_table(value: bytes | None, local: str, ok: bool) -> None:
    assert (NAMES.refusal(value, local) is None) is ok


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("a.example", ("a.example", None)),
        ("A.Example.:8080", ("a.example", 8080)),
        ("[::1]", ("::1", None)),
        ("[0:0::1]:1", ("::1", 1)),
        ("1.2.3.4:65535", ("1.2.3.4", 65535)),
        ("::1", None),
        ("[::1]:", None),
        ("a:b", None),
        ("", None),
    ],
)
def test_split_host(value: str, want: tuple[str, int | None] | None) -> None:
    assert split_host(value) == want
