"""JWTs through a real clawgate process on the namespace tailnet.

clawgate runs in the gw namespace (100.64.0.1) in front of the fake gateway, with the fake
tailscaled for identity. Keys and tokens come from the real CLI (`clawgate token keygen`,
`token issue`, `token revoke`); clients are websockets from the phone (alice's device) and
the tagged CI node. Live sessions end with 1008 at exp and on revocation; a JWKS URL is
served by a real HTTP server in the gw namespace and counted.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from proxy.access.jwt import jwk_thumbprint, public_jwk
from proxy.cli.jwt import issue_token
from tests.fakes.fake_gateway import FakeGateway
from tests.fakes.fake_tailscaled import FakeTailscaled
from tests.harness import ROOT, ClawgateProcess, run_cli
from tests.netns import GW_V4, Tailnet, connect_in, listen_in

ISS = "https://clawgate.tail3f2a1.ts.net"
AUD = "openclaw"
ALICE = "alice@example.com"
PORT = 18789


@pytest.fixture
async def tsd(tmp_path: Path) -> AsyncIterator[FakeTailscaled]:
    fake = FakeTailscaled(tmp_path / "tailscaled.sock")
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A signing key made by the real CLI; returns the private key path."""
    out = tmp_path / "keys" / "sign.pem"
    res = run_cli("token", "keygen", "--out", str(out), "--alg", "EdDSA")
    assert res.returncode == 0, res.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert json.loads(out.with_name("sign.jwks.json").read_text())["keys"][0]["kid"]
    assert "BEGIN PUBLIC KEY" in res.stdout and "PRIVATE" not in res.stdout
    return out


def base_config(
    tmp_path: Path, gw: FakeGateway, tsd: FakeTailscaled, jwt: dict[str, Any]
) -> dict[str, Any]:
    return {
        "gateway": {"host": GW_V4, "port": PORT},
        "upstream": f"http://127.0.0.1:{gw.port}",
        "tailscale": {"socket": tsd.socket_path},
        "jwt": {
            "enabled": True,
            "issuer": ISS,
            "audience": AUD,
            "algorithms": ["EdDSA"],
            "revokedFile": str(tmp_path / "revoked.json"),
            **jwt,
        },
        "limits": {"failedAuthCount": 1000},
    }


@pytest.fixture
async def proxy(
    tmp_path: Path, tailnet: Tailnet, fake_gateway: FakeGateway, tsd: FakeTailscaled, keys: Path
) -> AsyncIterator[ClawgateProcess]:
    cfg = base_config(
        tmp_path,
        fake_gateway,
        tsd,
        {"keyFile": str(keys.with_name("sign.jwks.json")), "requireTailscaleUser": True},
    )
    proc = ClawgateProcess(tmp_path / "cg", cfg, netns=tailnet.ns("gw"))
    try:
        await proc.start()
        yield proc
    finally:
        await proc.stop()


def issue(proc: ClawgateProcess, keys: Path, sub: str, ttl: str) -> tuple[str, str]:
    """(token, jti) from the real `clawgate token issue`."""
    res = run_cli(
        "token",
        "issue",
        "-c",
        str(proc.config_path),
        "--sub",
        sub,
        "--ttl",
        ttl,
        "--key",
        str(keys),
        "--scope",
        "operator.read",
    )
    assert res.returncode == 0, res.stderr
    jti = res.stderr.split("(jti ", 1)[1].split(")", 1)[0]
    return res.stdout.strip(), jti


async def ws(tailnet: Tailnet, role: str, token: str) -> ClientConnection:
    sock = await connect_in(tailnet.ns(role), GW_V4, PORT)
    return await connect(
        f"ws://{GW_V4}:{PORT}/ws",
        sock=sock,
        proxy=None,
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=5,
    )


async def status_of(tailnet: Tailnet, role: str, token: str) -> tuple[int, bytes]:
    try:
        conn = await ws(tailnet, role, token)
    except InvalidStatus as exc:
        return exc.response.status_code, bytes(exc.response.body or b"")
    await conn.close()
    return 101, b""


async def closed_code(conn: ClientConnection, timeout: float) -> tuple[int | None, float]:
    """Wait for the server to close; (close code, monotonic time it was seen)."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await conn.recv()
        except ConnectionClosed as exc:
            return (exc.rcvd.code if exc.rcvd else None), time.monotonic()


async def test_session_ends_with_1008_at_exp(
    tailnet: Tailnet, proxy: ClawgateProcess, keys: Path
) -> None:
    token, _ = issue(proxy, keys, ALICE, "3s")
    exp = json.loads(_payload(token))["exp"]
    conn = await ws(tailnet, "phone", token)
    await conn.send("hello")
    assert await conn.recv() == "hello"
    code, seen = await closed_code(conn, 8)
    lag = time.time() - (time.monotonic() - seen) - exp
    assert code == 1008
    # The sweep runs once a second: closed at exp, never before, at most ~1 s after
    # (plus scheduling slack on a loaded 2-core runner).
    assert -0.05 <= lag <= 1.8, f"closed {lag:.2f}s after exp"
    rec = await proxy.wait_log(lambda r: r.get("event") == "session_ended")
    assert rec["reason"] == f"credential jwt:{ALICE} expired"
    # The same token is refused from now on.
    assert (await status_of(tailnet, "phone", token))[0] == 401


async def test_revoke_jti_ends_live_session_and_refuses_new(
    tailnet: Tailnet, proxy: ClawgateProcess, keys: Path
) -> None:
    token, jti = issue(proxy, keys, ALICE, "1h")
    other, _ = issue(proxy, keys, ALICE, "1h")
    conn = await ws(tailnet, "phone", token)
    keep = await ws(tailnet, "phone", other)
    await conn.send("x")
    assert await conn.recv() == "x"
    # `clawgate token revoke` runs where clawgate's admin listener is: the gw namespace.
    res = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            tailnet.ns("gw"),
            sys.executable,
            "-m",
            "proxy",
            "token",
            "revoke",
            "-c",
            str(proxy.config_path),
            "--jti",
            jti,
        ],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=30,
        check=False,
    )
    done = time.monotonic()
    assert res.returncode == 0, res.stderr
    assert "reloaded" in res.stderr
    code, seen = await closed_code(conn, 5)
    assert code == 1008 and seen - done < 1.0
    rec = await proxy.wait_log(lambda r: r.get("event") == "session_ended")
    assert rec["reason"] == "token revoked"
    status, body = await status_of(tailnet, "phone", token)
    assert status == 401 and b"token revoked" in body
    # The other token of the same subject is untouched.
    await keep.send("still")
    assert await keep.recv() == "still"
    await keep.close()


async def test_revoked_file_edit_is_picked_up_without_reload(
    tailnet: Tailnet, proxy: ClawgateProcess, keys: Path, tmp_path: Path
) -> None:
    token, jti = issue(proxy, keys, ALICE, "1h")
    conn = await ws(tailnet, "phone", token)
    start = time.monotonic()
    tmp = tmp_path / "revoked.tmp"
    tmp.write_text(json.dumps({"version": 1, "jti": {jti: {}}}))
    tmp.replace(tmp_path / "revoked.json")
    code, seen = await closed_code(conn, 5)
    # The mtime is checked at most once a second, by the once-a-second sweep: <= ~2 s.
    assert code == 1008 and seen - start < 3.0
    assert (await status_of(tailnet, "phone", token))[0] == 401


async def test_token_must_come_from_the_subjects_device(
    tailnet: Tailnet, proxy: ClawgateProcess, keys: Path, fake_gateway: FakeGateway
) -> None:
    alice, _ = issue(proxy, keys, ALICE, "1h")
    bob, _ = issue(proxy, keys, "bob@example.com", "1h")
    assert (await status_of(tailnet, "phone", alice))[0] == 101
    assert (await status_of(tailnet, "ci", alice))[0] == 403  # tagged node: not alice's
    assert (await status_of(tailnet, "phone", bob))[0] == 403
    rec = await proxy.wait_log(
        lambda r: r.get("event") == "decision" and r.get("decision") == "allow"
    )
    assert rec["token"] == f"jwt:{ALICE}"
    # The gateway saw exactly the allowed upgrade, without the JWT, with alice's identity.
    assert [r.path for r in fake_gateway.requests] == ["/ws"]
    head = fake_gateway.requests[0]
    assert head.header("authorization") is None
    assert head.header("x-forwarded-user") == ALICE


async def test_refusals_through_the_proxy(
    tailnet: Tailnet, proxy: ClawgateProcess, keys: Path
) -> None:
    key = serialization.load_pem_private_key(keys.read_bytes(), password=None)
    wrong_aud, _ = issue_token(key, sub=ALICE, ttl=600, iss=ISS, aud="someone-else", scopes=[])
    wrong_iss, _ = issue_token(key, sub=ALICE, ttl=600, iss=ISS + ".evil", aud=AUD, scopes=[])
    other_key = ed25519.Ed25519PrivateKey.generate()
    unknown, _ = issue_token(other_key, sub=ALICE, ttl=600, iss=ISS, aud=AUD, scopes=[])
    for token, reason in (
        (wrong_aud, b"wrong audience"),
        (wrong_iss, b"wrong issuer"),
        (unknown, b"unknown key id"),
    ):
        status, body = await status_of(tailnet, "phone", token)
        assert status == 401 and reason in body, body
        assert AUD.encode() not in body and b"clawgate.tail3f2a1" not in body


def _payload(token: str) -> bytes:
    import base64

    p = token.split(".")[1]
    return base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))


# ------------------------------------------------------------------------------ JWKS URL


class Jwks:
    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0

    async def handler(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response({"keys": self.keys})


async def test_jwks_url_rotation_and_unknown_kid_cooldown(
    tmp_path: Path, tailnet: Tailnet, fake_gateway: FakeGateway, tsd: FakeTailscaled
) -> None:
    k1, k2 = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    jwks = Jwks()
    jwks.keys = [{**public_jwk(k1), "kid": jwk_thumbprint(public_jwk(k1))}]
    app = web.Application()
    app.router.add_get("/jwks", jwks.handler)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = listen_in(tailnet.ns("gw"), "127.0.0.1")  # the IdP on the proxy host's loopback
    site = web.SockSite(runner, sock)
    await site.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/jwks"
    cfg = base_config(
        tmp_path,
        fake_gateway,
        tsd,
        {"jwksUrl": url, "jwksCooldownSeconds": 1, "jwksCacheSeconds": 300},
    )
    proc = ClawgateProcess(tmp_path / "cg", cfg, netns=tailnet.ns("gw"))
    try:
        await proc.start()
        t1, _ = issue_token(k1, sub=ALICE, ttl=600, iss=ISS, aud=AUD, scopes=[])
        assert (await status_of(tailnet, "phone", t1))[0] == 101
        assert jwks.fetches == 1  # the startup fetch
        # Rotation: k2 is published. Its first token waits for one fetch and passes.
        jwks.keys.append({**public_jwk(k2), "kid": jwk_thumbprint(public_jwk(k2))})
        # The cooldown (1 s, the minimum) since the startup fetch is what is under test
        # here, so this waits it out rather than polling for an event.
        await asyncio.sleep(1.1)
        t2, _ = issue_token(k2, sub=ALICE, ttl=600, iss=ISS, aud=AUD, scopes=[])
        assert (await status_of(tailnet, "phone", t2))[0] == 101
        assert jwks.fetches == 2
        # A flood of made-up kids within the cooldown: all 401, no fetch at all.
        forged = [_with_kid(t2, f"made-up-{i}", k2) for i in range(30)]
        results = await asyncio.gather(*(status_of(tailnet, "phone", t) for t in forged))
        assert all(s == 401 and b"unknown key id" in b for s, b in results)
        assert jwks.fetches == 2
    finally:
        await proc.stop()
        await runner.cleanup()


def _with_kid(token: str, kid: str, key: Any) -> str:
    import base64

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    payload = token.split(".")[1]
    header = b64(json.dumps({"alg": "EdDSA", "kid": kid, "typ": "JWT"}).encode())
    signing = f"{header}.{payload}"
    return signing + "." + b64(key.sign(signing.encode()))
