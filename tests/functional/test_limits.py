"""Connection limits of a real clawgate on the namespace tailnet.

Total connections (503), per source address (429), unauthenticated connections per
source address (429 at accept), per identity (a token or a Tailscale principal: 429),
failed-authentication lockout (429 with Retry-After), head size (431) and head time
(408). Each limit answers with a clear status and one log line, and while one address
sits at its limit another address is served at its normal latency.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from tests.fakes.fake_gateway import FakeGateway
from tests.harness import ClawgateProcess, run_cli
from tests.netns import GW_V4, Tailnet, connect_in
from tests.support import (
    PORT,
    base_config,
    bearer,
    clawgate_config,
    echo_ok,
    fake_tailscaled,
    get,
    median,
    running,
    timed_get,
    ws_open,
)
from tests.util import build_request, open_in, read_response, read_to_close


def refusals(cg: ClawgateProcess, reason: str) -> list[dict[str, object]]:
    return [r for r in cg.access_log() if r.get("reason") == reason]


async def assert_other_address_unaffected(
    tailnet: Tailnet, token: str, baseline: list[float]
) -> None:
    during = await timed_get(tailnet, "ci", token, 15)
    assert max(during) < 0.5, during
    assert median(during) < 3 * median(baseline) + 0.02, (baseline, during)


async def idle_connections(
    tailnet: Tailnet, role: str, n: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return [await open_in(tailnet.ns(role), GW_V4, PORT) for _ in range(n)]


async def refused_with(tailnet: Tailnet, role: str, status: int) -> bytes:
    """A new connection from role is answered at once (before any request) and closed."""
    reader, writer = await open_in(tailnet.ns(role), GW_V4, PORT)
    try:
        resp = await read_response(reader, timeout=5)
        assert resp.status == status, resp.raw
        assert await read_to_close(reader, timeout=5) == b""
        return resp.raw
    finally:
        writer.close()


async def test_total_connections_503_then_served_again(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port, {"maxConnections": 4})
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        token = cg.tokens["phone"]
        held = [await ws_open(tailnet, "phone", token) for _ in range(2)]
        held += [await ws_open(tailnet, "ci", token) for _ in range(2)]
        raw = await refused_with(tailnet, "phone", 503)
        assert raw.endswith(b"too many connections\n")
        await refused_with(tailnet, "ci", 503)
        assert len(refusals(cg, "too many connections")) >= 1
        for ws in held:  # still alive
            await echo_ok(ws)
        await held.pop().close()
        resp = await get(tailnet, "phone", "/echo", token)
        assert resp.status == 200
        for ws in held:
            await ws.close()
        assert cg.proc is not None and cg.proc.poll() is None


async def test_per_source_ip_429_while_another_address_is_served(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port, {"perSourceIp": 5})
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        token = cg.tokens["phone"]
        baseline = await timed_get(tailnet, "ci", token, 15)
        held = [await ws_open(tailnet, "phone", token) for _ in range(5)]
        raw = await refused_with(tailnet, "phone", 429)
        assert b"Retry-After: 1" in raw and b"too many connections from this address" in raw
        await assert_other_address_unaffected(tailnet, token, baseline)
        [rec] = [r for r in refusals(cg, "too many connections from this address")]
        assert rec["status"] == 429 and rec["peer"] == "100.101.102.103"
        await held.pop().close()
        assert (await get(tailnet, "phone", "/echo", token)).status == 200
        for ws in held:
            await ws.close()


async def test_unauthenticated_connections_per_ip(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port, {"unauthenticatedPerIp": 4, "perSourceIp": 100})
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        token = cg.tokens["phone"]
        baseline = await timed_get(tailnet, "ci", token, 15)
        # Decided (allowed) sessions do not count against the unauthenticated limit.
        sessions = [await ws_open(tailnet, "phone", token) for _ in range(6)]
        # Four connections that never send a head (a slowloris) fill it.
        idle = await idle_connections(tailnet, "phone", 4)
        raw = await refused_with(tailnet, "phone", 429)
        assert b"too many unauthenticated connections from this address" in raw
        await assert_other_address_unaffected(tailnet, token, baseline)
        for ws in sessions:
            await echo_ok(ws)
        recs = refusals(cg, "too many unauthenticated connections from this address")
        assert len(recs) == 1 and recs[0]["status"] == 429
        # One of the idle ones decides (an allowed request): room for one more.
        reader, writer = idle.pop()
        writer.write(build_request("GET", "/echo", [bearer(token)]))
        assert (await read_response(reader)).status == 200
        reader2, writer2 = await open_in(tailnet.ns("phone"), GW_V4, PORT)
        writer2.write(build_request("GET", "/echo", [bearer(token)]))
        assert (await read_response(reader2)).status == 200
        for _, w in [*idle, (reader, writer), (reader2, writer2)]:
            w.close()
        for ws in sessions:
            await ws.close()


async def test_per_identity_by_token_name(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port, {"perIdentity": 2})
    async with running(tailnet, tmp_path / "cg", cfg, token_names=("phone", "laptop")) as cg:
        phone, laptop = cg.tokens["phone"], cg.tokens["laptop"]
        # The same token from two addresses counts together.
        a = await ws_open(tailnet, "phone", phone)
        b = await ws_open(tailnet, "ci", phone)
        with pytest.raises(InvalidStatus) as exc:
            await ws_open(tailnet, "phone", phone)
        assert exc.value.response.status_code == 429
        assert exc.value.response.headers.get("Retry-After") == "1"
        assert (await get(tailnet, "ci", "/echo", phone)).status == 429
        # Another token from the same address is its own identity.
        c = await ws_open(tailnet, "phone", laptop)
        await echo_ok(c)
        rec = await cg.wait_log(lambda r: r.get("status") == 429)
        assert rec["reason"] == "too many connections for this identity"
        assert rec["token"] == "phone"
        await a.close()
        d = await ws_open(tailnet, "phone", phone)  # the count went down with the close
        await echo_ok(d)
        for ws in (b, c, d):
            await ws.close()


async def test_per_identity_by_tailscale_principal(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with fake_tailscaled() as tsd:
        cfg = clawgate_config(
            fake_gateway,
            tsd.socket_path,
            gateway={"requireToken": False},
            tailscale={"allowUsers": ["alice@example.com"], "allowTags": ["tag:ci"]},
            extra={"limits": {"perIdentity": 2, "failedAuthLockout": 0}},
        )
        cg = ClawgateProcess(tmp_path / "cg", cfg, netns=tailnet.ns("gw"))
        await cg.start()
        try:
            held = [await ws_open(tailnet, "phone") for _ in range(2)]
            with pytest.raises(InvalidStatus) as exc:
                await ws_open(tailnet, "phone")
            assert exc.value.response.status_code == 429
            # The tagged CI node is another principal.
            ci = await ws_open(tailnet, "ci")
            await echo_ok(ci)
            rec = await cg.wait_log(lambda r: r.get("status") == 429)
            assert rec["login"] == "alice@example.com"
            await held.pop().close()
            again = await ws_open(tailnet, "phone")
            await echo_ok(again)
            for ws in (*held, ci, again):
                await ws.close()
        finally:
            await cg.stop()


async def test_failed_auth_lockout_429_retry_after(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(
        fake_gateway.port, {"failedAuthCount": 10, "failedAuthWindow": 60, "failedAuthLockout": 300}
    )
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        token = cg.tokens["phone"]
        baseline = await timed_get(tailnet, "ci", token, 15)
        for i in range(10):
            resp = await get(tailnet, "phone", "/echo", "wrong-token")
            assert resp.status == 401, i
        # Locked out: even the right token gets 429 (at accept, and decided) for 5 min.
        for tok in (token, "wrong-token", None):
            resp = await get(tailnet, "phone", "/echo", tok)
            assert resp.status == 429, resp.raw
            retry = int(resp.header("Retry-After") or b"0")
            assert 290 <= retry <= 301, retry
        rec = await cg.wait_log(lambda r: r.get("event") == "lockout")
        assert rec["peer"] == "100.101.102.103" and rec["seconds"] == 300
        assert len([r for r in cg.access_log() if r.get("event") == "lockout"]) == 1
        await assert_other_address_unaffected(tailnet, token, baseline)
        assert fake_gateway.requests and all(
            r.header("X-Forwarded-For") == "100.88.12.34" for r in fake_gateway.requests
        )


async def test_head_too_large_431(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port, {"headBytes": 2048})
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        token = cg.tokens["phone"]
        ok = build_request("GET", "/echo", [bearer(token), ("X-Pad", "a" * 1500)])
        reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
        writer.write(ok)
        assert (await read_response(reader)).status == 200
        writer.close()
        # Sent in pieces, with and without the end of the head ever arriving.
        for tail in (b"\r\n\r\n", b""):
            reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
            for _ in range(4):
                writer.write(b"X-Pad: " + b"b" * 1000 + b"\r\n")
                await asyncio.sleep(0.01)
            writer.write(tail)
            data = await read_to_close(reader, timeout=5)
            assert data.startswith(b"HTTP/1.1 431 "), data[:80]
            writer.close()
        recs = refusals(cg, "request head too large")
        assert len(recs) == 2 and all(r["status"] == 431 for r in recs)
        assert fake_gateway.requests[0].header("X-Pad") == "a" * 1500
        assert len(fake_gateway.requests) == 1


async def test_slow_head_408_without_stalling_others(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port, {"headTimeout": 0.5})
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        token = cg.tokens["phone"]
        slow = []
        t0 = time.monotonic()
        for _ in range(3):
            reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n")  # never finished
            slow.append((reader, writer))
        # Meanwhile others are served (and a fast request is not subject to the deadline).
        assert (await get(tailnet, "ci", "/echo", token)).status == 200
        for reader, writer in slow:
            data = await read_to_close(reader, timeout=5)
            assert data.startswith(b"HTTP/1.1 408 "), data[:80]
            writer.close()
        took = time.monotonic() - t0
        assert 0.45 < took < 3.0, took
        recs = refusals(cg, "request head not received in time")
        assert len(recs) == 3 and all(r["status"] == 408 for r in recs)


async def test_every_limit_is_configurable_and_validated(tmp_path: Path) -> None:
    import json

    good = {
        "maxConnections": 7,
        "perSourceIp": 6,
        "perIdentity": 5,
        "unauthenticatedPerIp": 4,
        "headBytes": 4096,
        "headLines": 50,
        "headTimeout": 2.5,
        "idleTimeout": 60,
        "failedAuthCount": 3,
        "failedAuthWindow": 10,
        "failedAuthLockout": 30,
        "drainSeconds": 1.5,
        "highWater": 65536,
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"limits": good}))
    res = run_cli("check-config", "--config", str(path))
    assert res.returncode == 0, res.stderr
    for key in good:
        path.write_text(json.dumps({"limits": {key: -1}}))
        res = run_cli("check-config", "--config", str(path))
        assert res.returncode == 2, (key, res.stderr)
        assert f"limits.{key}" in res.stderr, (key, res.stderr)


async def test_a_connection_refused_at_accept_is_not_read(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    """Over a limit, the answer comes before (and regardless of) any request bytes."""
    cfg = base_config(fake_gateway.port, {"unauthenticatedPerIp": 1})
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        sock = await connect_in(tailnet.ns("phone"), GW_V4, PORT)
        reader, writer = await asyncio.open_connection(sock=sock)
        data = await refused_with(tailnet, "phone", 429)
        assert data.startswith(b"HTTP/1.1 429 ")
        writer.close()
        await cg.wait_log(lambda r: r.get("status") == 429)
        _ = reader
