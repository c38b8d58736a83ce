"""A login session, a Bearer tunnel and a first-frame tunnel die with their secret.

The attack: keep a browser session opened with a token after that token is revoked and
re-created under the same name, or opened with the gateway's token after the gateway
token rotates (the name "gateway-token" always exists, so a name check keeps them all).
Each credential is bound to the digest of the secret that was verified: on the reload
that removes the secret, live WebSockets end with 1008 within a second, the cookie gets
401, and a tunnel the first-frame gate admitted with the old gateway token ends too.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

from proxy.keystore import TokenFile
from tests.fakes.fake_gateway import FakeGateway
from tests.harness import ClawgateProcess
from tests.netns import Tailnet
from tests.support import (
    base_config,
    closed_by_server,
    connect_frame,
    echo_ok,
    login,
    login_cookie,
    running,
    with_cookie,
    ws_open,
    ws_with_cookie,
)


async def reloaded(cg: ClawgateProcess, n: int) -> None:
    """SIGHUP, then until the n-th successful reload line is in the access log."""
    cg.reload()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if (
            len(
                [
                    r
                    for r in cg.access_log()
                    if r.get("event") == "reload" and r.get("result") == "ok"
                ]
            )
            >= n
        ):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no reload #{n}: {cg.access_log()}")


async def test_token_recreated_under_the_same_name_ends_its_sessions(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(
        tailnet, tmp_path / "cg", base_config(fake_gateway.port), token_names=("phone", "laptop")
    ) as cg:
        cookie = await login_cookie(tailnet, "phone", cg.tokens["phone"])
        kept_cookie = await login_cookie(tailnet, "phone", cg.tokens["laptop"])
        doomed = [
            await ws_with_cookie(tailnet, "phone", cookie),
            await ws_open(tailnet, "ci", cg.tokens["phone"]),
        ]
        kept = await ws_with_cookie(tailnet, "phone", kept_cookie)
        for ws in (*doomed, kept):
            await echo_ok(ws)
        # Revoke "phone" and create a new "phone": same name, another secret.
        tf = TokenFile(cg.token_path)
        assert tf.revoke("phone")
        new_phone = tf.add("phone")
        t0 = time.monotonic()
        await reloaded(cg, 1)
        for ws in doomed:
            code, reason, t = await closed_by_server(ws, timeout=3)
            assert (code, reason) == (1008, "token phone revoked")
            assert t - t0 < 1.0
        await echo_ok(kept)
        assert (await with_cookie(tailnet, "phone", cookie)).status == 401
        assert (await with_cookie(tailnet, "phone", kept_cookie)).status == 200
        # The new secret works, for a new session.
        fresh = await login_cookie(tailnet, "phone", new_phone)
        assert (await with_cookie(tailnet, "phone", fresh)).status == 200
        await kept.close()


async def test_gateway_token_rotation_ends_sessions_and_gated_tunnels(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    gw_file = tmp_path / "gateway.token"
    old = secrets.token_urlsafe(32)
    gw_file.write_text(old + "\n")
    gw_file.chmod(0o600)
    cfg = base_config(fake_gateway.port, gatewayToken={"file": str(gw_file)})
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        cookie = await login_cookie(tailnet, "phone", old)
        by_cookie = await ws_with_cookie(tailnet, "phone", cookie)
        by_bearer = await ws_open(tailnet, "ci", old)
        # No credential on the upgrade: the first-frame gate checks the connect request.
        gated = await ws_open(tailnet, "phone")
        frame = connect_frame(old)
        await gated.send(frame)
        async with asyncio.timeout(5):
            assert await gated.recv() == frame  # verified, released, echoed
        static = await ws_open(tailnet, "ci", cg.tokens["phone"])
        for ws in (by_cookie, by_bearer, gated, static):
            await echo_ok(ws)

        new = secrets.token_urlsafe(32)
        gw_file.write_text(new + "\n")
        t0 = time.monotonic()
        await reloaded(cg, 1)
        for ws in (by_cookie, by_bearer, gated):
            code, reason, t = await closed_by_server(ws, timeout=3)
            assert (code, reason) == (1008, "token gateway-token revoked")
            assert t - t0 < 1.0
        await echo_ok(static)  # another secret, untouched
        assert (await with_cookie(tailnet, "phone", cookie)).status == 401
        assert (await login(tailnet, "phone", old)).status == 401
        cookie2 = await login_cookie(tailnet, "phone", new)
        assert (await with_cookie(tailnet, "phone", cookie2)).status == 200
        ended = [r for r in cg.access_log() if r.get("event") == "session_ended"]
        assert len(ended) == 3, ended

        # The gateway token removed from the config: its session is gone as well.
        live = await ws_with_cookie(tailnet, "phone", cookie2)
        await echo_ok(live)
        cfg2 = dict(cg.config)
        del cfg2["gatewayToken"]
        cg.write_config(cfg2)
        await reloaded(cg, 2)
        code, reason, _ = await closed_by_server(live, timeout=3)
        assert (code, reason) == (1008, "token gateway-token revoked")
        assert (await with_cookie(tailnet, "phone", cookie2)).status == 401
        await echo_ok(static)
        await static.close()


async def test_gate_checks_the_token_in_force_when_the_frame_arrives(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    """Upgraded under the old token, first frame sent after the rotation: refused."""
    gw_file = tmp_path / "gateway.token"
    old = secrets.token_urlsafe(32)
    gw_file.write_text(old + "\n")
    gw_file.chmod(0o600)
    cfg = base_config(
        fake_gateway.port, gatewayToken={"file": str(gw_file), "firstFrameTimeout": 5}
    )
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        gated = await ws_open(tailnet, "phone")
        gw_file.write_text(secrets.token_urlsafe(32) + "\n")
        await reloaded(cg, 1)
        await gated.send(connect_frame(old))
        code, reason, _ = await closed_by_server(gated, timeout=3)
        assert (code, reason) == (1008, "gateway token mismatch")
        assert fake_gateway.ws_messages == []
