"""Tests of the fake OpenClaw gateway itself, over real loopback sockets in the root namespace.

Proxy tests trust what the fake records and how it answers; these tests pin both down: heads
recorded byte for byte, HTTP behaviours, and the WebSocket echo, ping, close and refusal paths.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.fakes.fake_gateway import CHUNKS, HEALTH_BODY, FakeGateway, big_body

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (Content-Length or chunked) off reader."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def _request(gw: FakeGateway, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(raw)
        await writer.drain()
        return await _read_response(reader)
    finally:
        writer.close()
        await writer.wait_closed()


def _ws(gw: FakeGateway, path: str, **kw: Any) -> connect:
    # proxy=None: never let an http(s)_proxy in the environment route test traffic elsewhere.
    return connect(f"ws://127.0.0.1:{gw.port}{path}", proxy=None, compression=None, **kw)


# --- recording ---------------------------------------------------------------------------------


async def test_records_raw_head_byte_for_byte(fake_gateway_local: FakeGateway) -> None:
    head = (
        b"GET /health?x=1 HTTP/1.1\r\n"
        b"hOsT: gateway.example:18789\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\n"
        b"x-forwarded-for:   5.6.7.8  \r\n"
        b"Cookie: a=1\r\n"
        b"COOKIE: b=2\r\n"
        b"X-Empty:\r\n"
        b"Tailscale-User-Login: alice@example.com\r\n"
        b"\r\n"
    )
    status, _, body = await _request(fake_gateway_local, head)
    assert (status, body) == (200, HEALTH_BODY)
    [rec] = fake_gateway_local.requests
    assert rec.raw_head == head
    assert (rec.method, rec.target, rec.path, rec.version) == (
        "GET",
        "/health?x=1",
        "/health",
        "HTTP/1.1",
    )
    assert rec.query == {"x": ["1"]}
    assert rec.headers == [
        ("hOsT", "gateway.example:18789"),
        ("X-Forwarded-For", "1.2.3.4"),
        ("x-forwarded-for", "5.6.7.8"),
        ("Cookie", "a=1"),
        ("COOKIE", "b=2"),
        ("X-Empty", ""),
        ("Tailscale-User-Login", "alice@example.com"),
    ]
    assert rec.header_all("x-forwarded-for") == ["1.2.3.4", "5.6.7.8"]
    assert rec.header("HOST") == "gateway.example:18789"
    assert rec.peer[0] == "127.0.0.1" and rec.peer[1] > 0
    assert not rec.websocket


async def test_clear_forgets_records(fake_gateway_local: FakeGateway) -> None:
    await _request(fake_gateway_local, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(fake_gateway_local.requests) == 1
    fake_gateway_local.clear()
    assert fake_gateway_local.requests == []


async def test_malformed_head_is_recorded_and_refused(fake_gateway_local: FakeGateway) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: x\r\n folded: value\r\n\r\n"
    status, headers, _ = await _request(fake_gateway_local, raw)
    assert status == 400 and headers["connection"] == "close"
    assert fake_gateway_local.requests[0].raw_head == raw
    assert fake_gateway_local.requests[0].method == ""


# --- HTTP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "status", "ctype", "check"),
    [
        (
            "/health",
            200,
            "application/json",
            lambda b: json.loads(b) == {"ok": True, "status": "live"},
        ),
        ("/healthz", 200, "application/json", lambda b: b == HEALTH_BODY),
        ("/", 200, "text/html", lambda b: b.startswith(b"<!doctype html>")),
        ("/status/403", 403, "application/json", lambda b: b"403" in b),
        ("/status/503", 503, "application/json", lambda b: b"503" in b),
        ("/nope", 404, "text/plain", lambda b: b == b"not found\n"),
    ],
)
async def test_http_paths(
    fake_gateway_local: FakeGateway, target: str, status: int, ctype: str, check: object
) -> None:
    got_status, headers, body = await _request(
        fake_gateway_local, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert got_status == status
    assert headers["content-type"].startswith(ctype)
    assert callable(check) and check(body)


async def test_keep_alive_serves_several_requests_on_one_connection(
    fake_gateway_local: FakeGateway,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", fake_gateway_local.port)
    try:
        # Pipelined on purpose: the second head arrives in the same segment as the first.
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await _read_response(reader))[0] == 200
        assert (await _read_response(reader))[2].startswith(b"<!doctype html>")
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        assert (await _read_response(reader))[2] == b"abc"
    finally:
        writer.close()
        await writer.wait_closed()
    reqs = fake_gateway_local.requests
    assert [r.path for r in reqs] == ["/health", "/", "/echo"]
    assert len({r.peer for r in reqs}) == 1
    assert fake_gateway_local.connections_opened == 1


async def test_connection_close_and_http10_close(fake_gateway_local: FakeGateway) -> None:
    for raw in (
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /health HTTP/1.0\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", fake_gateway_local.port)
        writer.write(raw)
        status, headers, _ = await _read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await reader.read() == b""  # the gateway closed its side
        writer.close()
        await writer.wait_closed()


async def test_post_echo_content_length(fake_gateway_local: FakeGateway) -> None:
    body = bytes(range(256)) * 40
    raw = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    status, _, echoed = await _request(fake_gateway_local, raw)
    assert (status, echoed) == (200, body)
    assert fake_gateway_local.requests[0].body == body


async def test_post_echo_chunked(fake_gateway_local: FakeGateway) -> None:
    raw = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n"
        b"1;ext=1\r\n \r\n"
        b"A\r\n0123456789\r\n"
        b"0\r\nX-Trailer: t\r\n\r\n"
    )
    status, _, echoed = await _request(fake_gateway_local, raw)
    assert (status, echoed) == (200, b"hello 0123456789")
    assert fake_gateway_local.requests[0].body == b"hello 0123456789"


async def test_expect_100_continue(fake_gateway_local: FakeGateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", fake_gateway_local.port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ok")
    assert (await _read_response(reader))[2] == b"ok"
    writer.close()
    await writer.wait_closed()


async def test_content_length_with_transfer_encoding_is_refused(
    fake_gateway_local: FakeGateway,
) -> None:
    raw = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    status, headers, _ = await _request(fake_gateway_local, raw)
    assert status == 400 and headers["connection"] == "close"


async def test_chunked_response(fake_gateway_local: FakeGateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", fake_gateway_local.port)
    writer.write(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    wire = b""
    while not wire.endswith(b"0\r\n\r\n"):
        wire += await reader.read(4096)
    assert wire == b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in CHUNKS) + b"0\r\n\r\n"
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize("n", [0, 1, 255, 256, 1000, 3 * MiB + 7])
async def test_big_body(fake_gateway_local: FakeGateway, n: int) -> None:
    status, headers, body = await _request(
        fake_gateway_local, f"GET /big?n={n} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert status == 200 and int(headers["content-length"]) == n
    assert body == big_body(n)


async def test_head_and_204_carry_no_body(fake_gateway_local: FakeGateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", fake_gateway_local.port)
    try:
        writer.write(
            b"HEAD /big?n=100 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 100\r\n" in head
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 204 ") and b"Content-Length" not in head
        # Had either sent a body, this would read it instead of the next response.
        assert (await _read_response(reader))[2] == HEALTH_BODY
    finally:
        writer.close()
        await writer.wait_closed()


async def test_big_with_bad_n_is_400(fake_gateway_local: FakeGateway) -> None:
    raw = b"GET /big?n=lots HTTP/1.1\r\nHost: x\r\n\r\n"
    status, _, _ = await _request(fake_gateway_local, raw)
    assert status == 400


# --- WebSocket ----------------------------------------------------------------------------------


async def test_ws_upgrade_is_recorded(fake_gateway_local: FakeGateway) -> None:
    async with _ws(fake_gateway_local, "/ws", additional_headers={"X-Odd-Case": "v"}) as ws:
        await ws.send("hi")
        assert await ws.recv() == "hi"
    [rec] = fake_gateway_local.requests
    assert rec.websocket and rec.method == "GET" and rec.path == "/ws"
    assert rec.header("upgrade") == "websocket"
    assert ("X-Odd-Case", "v") in rec.headers
    assert b"\r\nX-Odd-Case: v\r\n" in rec.raw_head and rec.raw_head.endswith(b"\r\n\r\n")


async def test_ws_echo_text_and_binary_any_path(fake_gateway_local: FakeGateway) -> None:
    async with _ws(fake_gateway_local, "/anything/at/all") as ws:
        await ws.send("héllo")
        assert await ws.recv() == "héllo"
        await ws.send(b"\x00\xff\x10")
        assert await ws.recv() == b"\x00\xff\x10"
        await ws.send("")
        assert await ws.recv() == ""
    assert fake_gateway_local.ws_messages == ["héllo", b"\x00\xff\x10", ""]


async def test_ws_fragmented_message_is_echoed_fragment_by_fragment(
    fake_gateway_local: FakeGateway,
) -> None:
    async with _ws(fake_gateway_local, "/ws") as ws:
        await ws.send(["ab", "cd", "ef"])
        fragments = [f async for f in ws.recv_streaming()]
    # websockets ends an iterable with an empty final frame; the echo keeps even that one.
    assert fragments == ["ab", "cd", "ef", ""]
    assert fake_gateway_local.ws_messages == ["abcdef"]


@pytest.mark.parametrize("kind", [bytes, str])
async def test_ws_echo_25_mib_frame(fake_gateway_local: FakeGateway, kind: type) -> None:
    payload: bytes | str = os.urandom(25 * MiB) if kind is bytes else "x" * (25 * MiB)
    async with _ws(fake_gateway_local, "/ws", max_size=None) as ws:
        await ws.send(payload)
        assert await ws.recv() == payload


async def test_ws_too_big_closes_1009(fake_gateway_local: FakeGateway) -> None:
    fake_gateway_local.max_message = 1024
    async with _ws(fake_gateway_local, "/ws") as ws:
        await ws.send(b"x" * 1025)
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_ws_client_ping_is_answered(fake_gateway_local: FakeGateway) -> None:
    async with _ws(fake_gateway_local, "/ws") as ws:
        latency = await asyncio.wait_for(await ws.ping(b"abc"), 5)
        assert latency >= 0


async def test_ws_server_ping_records_pong(fake_gateway_local: FakeGateway) -> None:
    async with _ws(fake_gateway_local, "/ws/ping") as ws:
        # The client library answers the ping by itself; the fake reports the pong back.
        assert await ws.recv() == "pong:fake-gateway-ping"
    assert fake_gateway_local.pongs == [b"fake-gateway-ping"]


@pytest.mark.parametrize("code", [1000, 1001, 1008, 1009, 1011, 1012, 1013, 4000])
async def test_ws_close_command(fake_gateway_local: FakeGateway, code: int) -> None:
    async with _ws(fake_gateway_local, "/ws") as ws:
        await ws.send(f"close:{code}:reason {code}")
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (code, f"reason {code}")
    # The client echoed the close; the fake recorded it and then closed TCP first (server side).
    assert fake_gateway_local.ws_closes == [(code, f"reason {code}")]
    await fake_gateway_local.wait_until(lambda: fake_gateway_local.active_connections == 0)


async def test_ws_client_close_code_is_recorded(fake_gateway_local: FakeGateway) -> None:
    async with _ws(fake_gateway_local, "/ws") as ws:
        await ws.close(1001, "going away")
    assert fake_gateway_local.ws_closes == [(1001, "going away")]


@pytest.mark.parametrize("status", [403, 503])
async def test_ws_upgrade_refused(fake_gateway_local: FakeGateway, status: int) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with _ws(fake_gateway_local, f"/ws/reject{status}"):
            pass
    response = info.value.response
    assert response.status_code == status
    assert json.loads(response.body) == {"error": {"type": "rejected", "status": status}}
    assert fake_gateway_local.requests[0].websocket


async def test_ws_openclaw_handshake(fake_gateway_local: FakeGateway) -> None:
    fake_gateway_local.token = "TEST-TOKEN"
    async with _ws(fake_gateway_local, "/ws/openclaw") as ws:
        challenge = json.loads(await ws.recv())
        assert challenge["type"] == "event" and challenge["event"] == "connect.challenge"
        assert {"nonce", "ts"} <= challenge["payload"].keys()
        await ws.send(
            json.dumps(
                {
                    "type": "req",
                    "id": "1",
                    "method": "connect",
                    "params": {"auth": {"token": "TEST-TOKEN"}},
                }
            )
        )
        hello = json.loads(await ws.recv())
        assert hello["id"] == "1" and hello["ok"] and hello["payload"]["type"] == "hello-ok"


async def test_ws_openclaw_wrong_token_closes_1008(fake_gateway_local: FakeGateway) -> None:
    fake_gateway_local.token = "TEST-TOKEN"
    async with _ws(fake_gateway_local, "/ws/openclaw") as ws:
        await ws.recv()
        await ws.send(
            json.dumps(
                {
                    "type": "req",
                    "id": "1",
                    "method": "connect",
                    "params": {"auth": {"token": "nope"}},
                }
            )
        )
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, "gateway token mismatch")


async def test_stop_drops_live_connections() -> None:
    gw = FakeGateway()
    await gw.start()
    ws: ClientConnection = await _ws(gw, "/ws")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    async with asyncio.timeout(5):
        await gw.wait_until(lambda: gw.active_connections == 2)
        await gw.stop()
    assert gw.active_connections == 0
    assert await reader.read() == b""
    with pytest.raises(ConnectionClosed):
        await ws.recv()
    writer.close()
    await ws.close()


# --- standalone ---------------------------------------------------------------------------------


def test_standalone_starts_fast_and_stops_on_sigterm(tmp_path: Path) -> None:
    record = tmp_path / "requests.jsonl"
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakes.fake_gateway",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--record",
            str(record),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        elapsed = time.monotonic() - started
        assert line.startswith("READY "), line
        assert elapsed < 2.0, f"took {elapsed:.2f}s to listen"
        port = int(line.split()[1])

        async def probe() -> tuple[int, dict[str, str], bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                return await _read_response(reader)
            finally:
                writer.close()
                await writer.wait_closed()

        assert asyncio.run(probe())[2] == HEALTH_BODY
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        [logged] = [json.loads(x) for x in record.read_text().splitlines()]
        assert logged["raw_head"] == "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
