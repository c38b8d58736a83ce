"""Issue 12 item 8: the admin API refuses foreign Host, any Origin, and non-JSON POSTs.

The attacks: a page whose name rebinds to 127.0.0.1 reads /connections (peers, logins,
nodes) with ``Host: rebind.attacker.example:18790``; a cross-origin HTML form posts to
/-/reload (CSRF). Sent as raw bytes to a real clawgate's admin listener; the clawgate
CLI (status, reload, token revoke) must still work through the same checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.admin import admin_refusal
from tests.fakes.fake_gateway import FakeGateway
from tests.harness import ClawgateProcess
from tests.netns import Tailnet, open_connection_in
from tests.support import (
    ADMIN_PORT,
    base_config,
    cli_in_gw,
    echo_ok,
    running,
    ws_open,
)
from tests.util import read_response


async def _raw(cg: ClawgateProcess, lines: list[str], body: bytes = b"") -> tuple[int, bytes]:
    assert cg.netns is not None
    reader, writer = await open_connection_in(cg.netns, "127.0.0.1", cg.admin_port)
    try:
        head = "\r\n".join([*lines, f"Content-Length: {len(body)}", "Connection: close"])
        writer.write(head.encode() + b"\r\n\r\n" + body)
        resp = await read_response(reader)
        return resp.status, resp.body
    finally:
        writer.close()


def _reloads(cg: ClawgateProcess) -> int:
    return sum(1 for r in cg.access_log() if r.get("event") == "reload")


HOST_OK = f"Host: 127.0.0.1:{ADMIN_PORT}"


async def test_admin_refuses_rebinding_origin_and_forms(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(tailnet, tmp_path / "cg", base_config(fake_gateway.port)) as cg:
        ws = await ws_open(tailnet, "phone", cg.tokens["phone"])
        await echo_ok(ws)
        # Baseline: the loopback Host reads the live session.
        status, body = await _raw(cg, ["GET /connections HTTP/1.1", HOST_OK])
        assert status == 200 and json.loads(body)["connections"], body

        # DNS rebinding: the same request under the attacker's name leaks nothing.
        for host in (
            f"rebind.attacker.example:{ADMIN_PORT}",
            "rebind.attacker.example",
            f"100.64.0.1:{ADMIN_PORT}",
            f"127.0.0.1:{ADMIN_PORT + 1}",
            f"localhost.attacker.example:{ADMIN_PORT}",
            "127.0.0.1@evil",
        ):
            for path in ("/connections", "/metrics", "/health"):
                status, body = await _raw(cg, [f"GET {path} HTTP/1.1", f"Host: {host}"])
                assert status in (403, 421), (host, path, status, body)
                assert b"100.101.102.103" not in body and b"phone" not in body

        # Any Origin (a page's fetch, even a same-host one) is refused.
        for origin in (
            "http://rebind.attacker.example:18790",
            "null",
            f"http://127.0.0.1:{ADMIN_PORT}",
        ):
            status, body = await _raw(
                cg, ["GET /connections HTTP/1.1", HOST_OK, f"Origin: {origin}"]
            )
            assert status == 403, (origin, status, body)
            assert b"100.101.102.103" not in body

        # CSRF: what a cross-origin form (or a no-cors fetch) can send, refused, and no
        # reload happens.
        before = _reloads(cg)
        form = [
            (
                [
                    "Content-Type: application/x-www-form-urlencoded",
                    "Origin: http://rebind.attacker.example",
                ],
                b"a=b",
            ),
            (["Content-Type: application/x-www-form-urlencoded"], b"a=b"),
            (["Content-Type: text/plain"], b"{}"),
            (["Content-Type: multipart/form-data; boundary=x"], b"--x--\r\n"),
            ([], b""),
            (["Content-Type: application/json"], b"not json"),
            (["Content-Type: application/json"], b"[1]"),
        ]
        for extra, body_in in form:
            status, body = await _raw(cg, ["POST /-/reload HTTP/1.1", HOST_OK, *extra], body_in)
            assert status in (400, 403, 415), (extra, body_in, status, body)
        status, body = await _raw(
            cg,
            [
                "POST /-/reload HTTP/1.1",
                "Host: rebind.attacker.example:18790",
                "Content-Type: application/json",
            ],
            b"{}",
        )
        assert status == 421, body
        assert _reloads(cg) == before

        # The CLI goes through the same listener and still works.
        status_cli = cli_in_gw(cg, "status", "--json", "--config", str(cg.config_path))
        assert status_cli.returncode == 0, status_cli.stderr
        assert any(c.get("token") == "phone" for c in json.loads(status_cli.stdout))
        reload_cli = cli_in_gw(cg, "reload", "--config", str(cg.config_path))
        assert reload_cli.returncode == 0 and "reloaded" in reload_cli.stdout, reload_cli
        assert _reloads(cg) == before + 1
        revoke = cli_in_gw(cg, "token", "revoke", "phone", "--config", str(cg.config_path))
        assert revoke.returncode == 0, revoke.stderr
        assert "worker 0" in revoke.stderr and "reloaded" in revoke.stderr, revoke.stderr
        assert _reloads(cg) == before + 2
        await ws.close()


@pytest.mark.parametrize(
    ("method", "host", "origin", "ctype", "want"),
    [
        ("GET", "127.0.0.1", None, None, None),
        ("GET", "127.0.0.1:18790", None, None, None),
        ("GET", "localhost:18790", None, None, None),
        ("GET", "LOCALHOST", None, None, None),
        ("GET", "[::1]:18790", None, None, None),
        ("GET", "127.0.0.2:18790", None, None, None),
        ("POST", "127.0.0.1:18790", None, "application/json", None),
        ("POST", "127.0.0.1:18790", None, "application/json; charset=utf-8", None),
        ("POST", "127.0.0.1:18790", None, "Application/JSON", None),
        ("GET", None, None, None, 421),
        ("GET", "", None, None, 421),
        ("GET", "127.0.0.1:18791", None, None, 421),
        ("GET", "127.0.0.1:0", None, None, 421),
        ("GET", "::1", None, None, 421),  # IPv6 literals must be bracketed
        ("GET", "[::1", None, None, 421),
        ("GET", "localhost.", None, None, None),  # the FQDN form of localhost
        ("GET", "localhost.evil.example", None, None, 421),
        ("GET", "evil.example:18790", None, None, 421),
        ("GET", "100.64.0.1:18790", None, None, 421),
        ("GET", "0x7f.1:18790", None, None, 421),
        ("GET", "2130706433:18790", None, None, 421),
        ("GET", "127.0.0.1:18790 ", None, None, 421),
        ("GET", "127.0.0.1:+18790", None, None, 421),
        ("GET", "user@127.0.0.1", None, None, 421),
        ("GET", "127.0.0.1", "null", None, 403),
        ("GET", "127.0.0.1", "http://127.0.0.1:18790", None, 403),
        ("POST", "127.0.0.1", None, None, 415),
        ("POST", "127.0.0.1", None, "text/plain", 415),
        ("POST", "127.0.0.1", None, "application/x-www-form-urlencoded", 415),
        ("POST", "127.0.0.1", None, "application/jsonx", 415),
        ("POST", "127.0.0.1", "http://evil", "application/json", 403),
    ],
)
def test_admin_refusal_table(
    method: str, host: str | None, origin: str | None, ctype: str | None, want: int | None
) -> None:
    got = admin_refusal(method, host, origin, ctype, 18790)
    assert (got[0] if got else None) == want, got
