"""The clawgate core end to end, on a real tailnet of network namespaces.

The proxy runs as a real process in the gw namespace on 100.64.0.1:18789 (and
fd7a:115c:a1e0::1:18789), with the fake gateway on gw's loopback. Requests come from the
phone (100.101.102.103) and from a public host (198.18.0.7): tokens, exempt paths and
their normalisation, refusal by network, WebSocket relaying (text, binary, 25 MiB, ping/pong,
close codes), upstream responses relayed as they are, keep-alive with a decision per
request, the login cookie flow, and a fast 502 when the gateway is down.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.fakes.fake_gateway import CHUNKS, HEALTH_BODY, FakeGateway, big_body
from tests.harness import ClawgateProcess
from tests.netns import (
    GW_PUBLIC_V4,
    GW_V4,
    GW_V6,
    PHONE_V4,
    PHONE_V6,
    PUBLIC_V4,
    PUBLIC_V6,
    Tailnet,
    connect_in,
    listen_in,
)
from tests.util import (
    build_request,
    exchange,
    open_in,
    poll_until,
    read_response,
    read_to_close,
    send_and_read_all,
)

PORT = 18789
MiB = 1024 * 1024


def core_config(upstream_port: int) -> dict[str, Any]:
    return {
        "gateway": {
            "host": [GW_V4, GW_V6],
            "port": PORT,
            "requireToken": True,
            "allowedNetworks": ["100.64.0.0/10", "fd7a:115c:a1e0::/48"],
        },
        "upstream": f"http://127.0.0.1:{upstream_port}",
        "tailscale": {"requireIdentity": False},
        # Several tests send more than the default 10 unauthenticated requests a minute on
        # purpose; the lockout (429) is a feature of its own, not under test here.
        "limits": {"failedAuthCount": 1000},
    }


@pytest.fixture
async def proxy(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> AsyncIterator[ClawgateProcess]:
    p = ClawgateProcess(
        tmp_path / "clawgate", core_config(fake_gateway.port), netns=tailnet.ns("gw")
    )
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


def host_of(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def bearer(p: ClawgateProcess) -> tuple[str, str]:
    return ("Authorization", f"Bearer {p.tokens['phone']}")


async def ws_open(
    tailnet: Tailnet, path: str, headers: dict[str, str] | None, dst: str = GW_V4, **kw: Any
) -> ClientConnection:
    sock = await connect_in(tailnet.ns("phone"), dst, PORT)
    return await connect(
        f"ws://{host_of(dst)}:{PORT}{path}",
        sock=sock,
        proxy=None,
        additional_headers=headers,
        compression=None,
        **kw,
    )


# ----------------------------------------------------------------------------- the checks


@pytest.mark.parametrize(("src", "dst"), [(PHONE_V4, GW_V4), (PHONE_V6, GW_V6)])
async def test_token_reaches_gateway_with_the_peer_as_xff(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway, src: str, dst: str
) -> None:
    req = build_request(
        "GET",
        "/headers",
        [bearer(proxy), ("X-Forwarded-For", "127.0.0.1")],
        host=f"{host_of(dst)}:{PORT}",
    )
    resp = await exchange(tailnet.ns("phone"), dst, PORT, req)
    assert resp.status == 200
    [rec] = fake_gateway.requests
    assert rec.header_all("X-Forwarded-For") == [src]
    assert rec.header("X-Forwarded-Proto") == "http"
    assert rec.header("Host") == f"{host_of(dst)}:{PORT}"
    assert rec.header("Authorization") is None  # the proxy's credential stays with it
    assert proxy.tokens["phone"].encode() not in rec.raw_head


async def test_without_or_with_a_wrong_token_401(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway
) -> None:
    for headers in (
        [],
        [("Authorization", "Bearer wrong")],
        [("Authorization", "Basic !!!")],
        [("Authorization", "Token x")],
    ):
        resp = await exchange(
            tailnet.ns("phone"), GW_V4, PORT, build_request("GET", "/headers", headers)
        )
        assert resp.status == 401, headers
        assert (resp.header("WWW-Authenticate") or b"").startswith(b"Bearer"), headers
    assert fake_gateway.requests == []


async def test_a_refused_head_request_gets_no_body(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway
) -> None:
    """A 401 to HEAD says its length but sends no body: the client reads nothing more."""
    raw = await send_and_read_all(
        tailnet.ns("phone"), GW_V4, PORT, build_request("HEAD", "/headers", [])
    )
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 401 ")
    assert b"Content-Length: 0" not in head
    assert rest == b""
    assert fake_gateway.requests == []


async def test_basic_credentials_from_a_ws_url_are_accepted(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway
) -> None:
    # ws://clawgate:TOKEN@host:18789 becomes exactly this header in clients.
    basic = base64.b64encode(f"clawgate:{proxy.tokens['phone']}".encode()).decode()
    resp = await exchange(
        tailnet.ns("phone"),
        GW_V4,
        PORT,
        build_request("GET", "/headers", [("Authorization", f"Basic {basic}")]),
    )
    assert resp.status == 200
    assert fake_gateway.requests[0].header("Authorization") is None
    ws = await ws_open(tailnet, "/ws", {"Authorization": f"Basic {basic}"})
    await ws.send("hello")
    assert await ws.recv() == "hello"
    await ws.close()


@pytest.mark.parametrize("path", ["/health", "/healthz", "/health?probe=1"])
async def test_health_without_a_token(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway, path: str
) -> None:
    resp = await exchange(tailnet.ns("phone"), GW_V4, PORT, build_request("GET", path))
    assert resp.status == 200
    assert resp.body == HEALTH_BODY
    assert fake_gateway.requests[0].header("X-Forwarded-For") == PHONE_V4


@pytest.mark.parametrize(("src", "dst"), [(PUBLIC_V4, GW_V4), (PUBLIC_V6, GW_V6)])
async def test_public_host_is_refused_before_a_byte(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway, src: str, dst: str
) -> None:
    for req in (build_request("GET", "/health"), build_request("GET", "/headers", [bearer(proxy)])):
        reader, writer = await open_in(tailnet.ns("public"), dst, PORT)
        try:
            try:
                writer.write(req)
                await writer.drain()
            except ConnectionResetError:
                pass
            assert await read_to_close(reader, timeout=5) == b""
        finally:
            writer.close()
    assert fake_gateway.requests == []
    assert fake_gateway.connections_opened == 0
    rec = await proxy.wait_log(lambda r: r.get("event") == "refused")
    assert rec["peer"] == src and rec["reason"] == "network not allowed"


async def test_all_interfaces_with_allowed_networks(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    """The playbook's '0.0.0.0' block: every interface, but only the listed networks."""
    cfg = core_config(fake_gateway.port)
    cfg["gateway"].update(host="0.0.0.0", allowedNetworks=["127.0.0.1/32", "100.64.0.0/10"])
    p = ClawgateProcess(tmp_path / "cg", cfg, netns=tailnet.ns("gw"))
    await p.start()
    try:
        ok = await exchange(
            tailnet.ns("phone"), GW_V4, PORT, build_request("GET", "/headers", [bearer(p)])
        )
        assert ok.status == 200
        local = await exchange(
            tailnet.ns("gw"),
            "127.0.0.1",
            PORT,
            build_request("GET", "/headers", [bearer(p)], host=f"127.0.0.1:{PORT}"),
        )
        assert local.status == 200
        assert [r.header("X-Forwarded-For") for r in fake_gateway.requests] == [
            PHONE_V4,
            "127.0.0.1",
        ]
        for dst in (GW_V4, GW_PUBLIC_V4):
            reader, writer = await open_in(tailnet.ns("public"), dst, PORT)
            writer.write(build_request("GET", "/health"))
            assert await read_to_close(reader, timeout=5) == b""
            writer.close()
        assert len(fake_gateway.requests) == 2
    finally:
        await p.stop()


EXEMPT_LOOKALIKES = [
    "//health",
    "/health/../x",
    "/health/..",
    "/%2e/health",
    "/./health",
    "/health%2F",
    "/health%2f",
    "/%68ealth",
    "/HEALTH",
    "/Health",
    "/health;x",
    "/health/",
    "/healthz/",
    "/health%00",
    "/healthzz",
]


async def test_exempt_paths_are_matched_exactly(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway
) -> None:
    got = {}
    for path in EXEMPT_LOOKALIKES:
        resp = await exchange(tailnet.ns("phone"), GW_V4, PORT, build_request("GET", path))
        got[path] = resp.status
    assert got == dict.fromkeys(EXEMPT_LOOKALIKES, 401)
    assert fake_gateway.requests == []


# ----------------------------------------------------------------------------- WebSocket


async def test_websocket_messages_pass_unchanged(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway
) -> None:
    ws = await ws_open(
        tailnet, "/ws", {"Authorization": f"Bearer {proxy.tokens['phone']}"}, max_size=26 * MiB
    )
    try:
        await ws.send("hello, gateway ✓")
        assert await ws.recv() == "hello, gateway ✓"
        binary = bytes(range(256)) * 4
        await ws.send(binary)
        assert await ws.recv() == binary
        big = os.urandom(25 * MiB)
        t0 = time.monotonic()
        await ws.send(big)
        echoed = await asyncio.wait_for(ws.recv(), 30)
        elapsed = time.monotonic() - t0
        assert isinstance(echoed, bytes) and len(echoed) == len(big)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(big).digest()
        assert fake_gateway.ws_messages[-1] == big
        print(f"25 MiB frame round trip through clawgate: {elapsed * 1000:.0f} ms")
        # client ping -> gateway pong
        pong = await ws.ping(b"client-ping")
        await asyncio.wait_for(pong, 5)
    finally:
        await ws.close()
    [rec] = fake_gateway.requests
    assert rec.websocket and rec.header("X-Forwarded-For") == PHONE_V4
    assert rec.header("Authorization") is None


async def test_gateway_ping_reaches_the_client_and_its_pong_returns(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway
) -> None:
    ws = await ws_open(tailnet, "/ws/ping", {"Authorization": f"Bearer {proxy.tokens['phone']}"})
    try:
        assert await asyncio.wait_for(ws.recv(), 5) == "pong:fake-gateway-ping"
    finally:
        await ws.close()
    assert fake_gateway.pongs == [b"fake-gateway-ping"]


CLOSE_CODES = [1000, 1008, 1009, 1012, 1013]


async def test_close_codes_pass_unchanged_both_ways(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway
) -> None:
    auth = {"Authorization": f"Bearer {proxy.tokens['phone']}"}
    for code in CLOSE_CODES:
        # gateway -> client
        ws = await ws_open(tailnet, "/ws", auth)
        await ws.send(f"close:{code}:from gateway {code}")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == code
        assert ws.close_reason == f"from gateway {code}"
        # client -> gateway
        ws = await ws_open(tailnet, "/ws", auth)
        await ws.close(code, f"from client {code}")
        await fake_gateway.wait_until(
            lambda: (code, f"from client {code}") in fake_gateway.ws_closes
        )
    # The gateway saw each client close once, and the echo of each of its own closes.
    assert sorted(fake_gateway.ws_closes) == sorted(
        [(c, f"from client {c}") for c in CLOSE_CODES]
        + [(c, f"from gateway {c}") for c in CLOSE_CODES]
    )


async def test_websocket_without_a_token_is_refused(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway
) -> None:
    with pytest.raises(InvalidStatus) as ei:
        await ws_open(tailnet, "/ws", None)
    assert ei.value.response.status_code == 401
    assert fake_gateway.requests == []


def upgrade_request(path: str, token: str | None) -> bytes:
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    return build_request("GET", path, headers)


@pytest.mark.parametrize("code", [403, 503])
async def test_upstream_refusals_are_relayed_as_they_are(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway, code: int
) -> None:
    gw_ns = tailnet.ns("gw")
    for req_path, request in [
        (f"/ws/reject{code}", upgrade_request(f"/ws/reject{code}", proxy.tokens["phone"])),
        (f"/status/{code}", build_request("GET", f"/status/{code}", [bearer(proxy)])),
    ]:
        via_proxy = await exchange(tailnet.ns("phone"), GW_V4, PORT, request)
        direct = await exchange(
            gw_ns,
            "127.0.0.1",
            fake_gateway.port,
            request.replace(f"Authorization: Bearer {proxy.tokens['phone']}\r\n".encode(), b""),
        )
        assert via_proxy.status == code, req_path
        assert via_proxy.raw == direct.raw, req_path  # head and body, byte for byte
    assert [r.path for r in fake_gateway.requests] == [
        f"/ws/reject{code}",
        f"/ws/reject{code}",
        f"/status/{code}",
        f"/status/{code}",
    ]


# ----------------------------------------------------------------------------- plain HTTP


async def test_keep_alive_decides_every_request(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway
) -> None:
    reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
    auth = bearer(proxy)
    try:
        writer.write(build_request("GET", "/headers", [auth]))
        r1 = await read_response(reader)
        assert r1.status == 200 and json.loads(r1.body)["headers"]

        body = os.urandom(70000)
        writer.write(build_request("POST", "/echo", [auth], body))
        r2 = await read_response(reader)
        assert (r2.status, r2.body) == (200, body)

        chunks = [b"first part ", os.urandom(5000), b"last"]
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        writer.write(
            build_request("POST", "/echo", [auth, ("Transfer-Encoding", "chunked")]) + chunked
        )
        r3 = await read_response(reader)
        assert (r3.status, r3.body) == (200, b"".join(chunks))

        writer.write(build_request("GET", "/chunked", [auth]))
        r4 = await read_response(reader)
        assert r4.header("Transfer-Encoding") == b"chunked"
        assert r4.body == b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in CHUNKS) + b"0\r\n\r\n"

        writer.write(build_request("GET", "/big?n=300000", [auth]))
        r5 = await read_response(reader)
        assert r5.body == big_body(300000)

        writer.write(build_request("HEAD", "/", [auth]))
        r6 = await read_response(reader, head_request=True)
        assert r6.status == 200 and r6.header("Content-Length")

        # Same connection, no token: decided again, refused, closed.
        writer.write(build_request("GET", "/headers"))
        r7 = await read_response(reader)
        assert r7.status == 401
        assert await read_to_close(reader, timeout=5) == b""
    finally:
        writer.close()
    assert [r.path for r in fake_gateway.requests] == [
        "/headers",
        "/echo",
        "/echo",
        "/chunked",
        "/big",
        "/",
    ]
    assert fake_gateway.requests[2].header("Transfer-Encoding") == "chunked"
    assert fake_gateway.requests[1].body == body


async def test_login_flow(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway
) -> None:
    ns = tailnet.ns("phone")
    page = await exchange(ns, GW_V4, PORT, build_request("GET", "/__clawgate/login?next=/chat"))
    assert page.status == 200 and b"<form" in page.body
    assert b'name="next" value="/chat"' in page.body

    wrong = await exchange(
        ns,
        GW_V4,
        PORT,
        build_request(
            "POST",
            "/__clawgate/login",
            [("Content-Type", "application/x-www-form-urlencoded")],
            b"token=nope&next=/",
        ),
    )
    assert wrong.status == 401 and wrong.header("Set-Cookie") is None

    form = f"token={proxy.tokens['phone']}&next=/chat".encode()
    login = await exchange(
        ns,
        GW_V4,
        PORT,
        build_request(
            "POST",
            "/__clawgate/login",
            [
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Origin", f"http://{GW_V4}:{PORT}"),
            ],
            form,
        ),
    )
    assert login.status == 303
    assert login.header("Location") == b"/chat"
    cookie = (login.header("Set-Cookie") or b"").decode()
    attrs = [a.strip() for a in cookie.split(";")]
    name, _, sid = attrs[0].partition("=")
    assert name == "clawgate_session" and len(sid) >= 43
    assert "HttpOnly" in attrs and "SameSite=Strict" in attrs
    assert "Secure" not in attrs  # plain HTTP here; Secure only with TLS
    assert sid != proxy.tokens["phone"]
    assert fake_gateway.requests == []  # the login is clawgate's own, never forwarded

    resp = await exchange(
        ns,
        GW_V4,
        PORT,
        build_request(
            "GET", "/headers", [("Cookie", f"theme=dark; clawgate_session={sid}; lang=en")]
        ),
    )
    assert resp.status == 200
    ws = await ws_open(tailnet, "/ws", {"Cookie": f"clawgate_session={sid}"})
    await ws.send("via cookie")
    assert await ws.recv() == "via cookie"
    await ws.close()
    http_rec, ws_rec = fake_gateway.requests
    assert http_rec.header_all("Cookie") == ["theme=dark; lang=en"]
    assert ws_rec.header("Cookie") is None
    for rec in (http_rec, ws_rec):
        assert b"clawgate_session" not in rec.raw_head and sid.encode() not in rec.raw_head
        assert rec.header("Authorization") is None

    forged = await exchange(
        ns,
        GW_V4,
        PORT,
        build_request("GET", "/headers", [("Cookie", "clawgate_session=" + "A" * 43)]),
    )
    assert forged.status == 401


async def test_access_log_names_the_token_never_the_secret(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway
) -> None:
    resp = await exchange(
        tailnet.ns("phone"), GW_V4, PORT, build_request("GET", "/headers", [bearer(proxy)])
    )
    assert resp.status == 200
    close = await proxy.wait_log(lambda r: r.get("event") == "close" and r.get("token"))
    decision = await proxy.wait_log(lambda r: r.get("event") == "decision")
    assert decision["decision"] == "allow" and decision["token"] == "phone"
    assert decision["peer"] == PHONE_V4
    assert (decision["method"], decision["path"]) == ("GET", "/headers")
    for key in ("time", "conn", "status", "reason"):
        assert key in decision
    for key in ("bytes_in", "bytes_out", "duration", "reason", "conn"):
        assert key in close
    assert close["bytes_out"] >= len(resp.raw)
    text = proxy.access_path.read_text() + proxy.stderr()
    assert proxy.tokens["phone"] not in text


async def test_upstream_down_gives_a_fast_502(tailnet: Tailnet, tmp_path: Path) -> None:
    gw = tailnet.ns("gw")
    probe = listen_in(gw, "127.0.0.1")
    dead_port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    p = ClawgateProcess(tmp_path / "cg", core_config(dead_port), netns=gw)
    await p.start()
    try:
        for path in ("/headers", "/health"):
            req = build_request("GET", path, [bearer(p)])
            t0 = time.monotonic()
            resp = await exchange(tailnet.ns("phone"), GW_V4, PORT, req)
            elapsed = time.monotonic() - t0
            assert resp.status == 502, path
            assert elapsed < 1.0, elapsed
            assert resp.body.count(b"\n") == 1 and resp.body.endswith(b"\n")
            assert b"gateway" in resp.body
        ws_req = upgrade_request("/ws", p.tokens["phone"])
        resp = await exchange(tailnet.ns("phone"), GW_V4, PORT, ws_req)
        assert resp.status == 502
    finally:
        await p.stop()


async def test_upstream_up_again_is_used(
    tailnet: Tailnet, proxy: ClawgateProcess, fake_gateway: FakeGateway
) -> None:
    """A client that disconnects mid-request never leaves the proxy in a bad state."""
    reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
    writer.write(
        build_request(
            "POST", "/echo", [bearer(proxy), ("Content-Length", "100")], content_length=False
        )
        + b"partial"
    )
    await fake_gateway.wait_until(lambda: len(fake_gateway.requests) == 1)
    writer.close()
    await poll_until(lambda: fake_gateway.active_connections == 0)
    resp = await exchange(tailnet.ns("phone"), GW_V4, PORT, build_request("GET", "/health"))
    assert resp.status == 200
