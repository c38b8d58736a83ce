"""The gateway's token checked at the edge, seen from a gateway that records every frame.

The real gateway cannot tell us which frames it received; the fake one can
(``FakeGateway.ws_messages``). clawgate runs as a real process; a refused first frame must
leave that list empty, a verified one arrives byte for byte. Also measures what the gate
costs against a plain splice (connect + first frame + echo), for the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect

from tests.e2e.conftest import GW_TOKEN
from tests.fakes.fake_gateway import FakeGateway
from tests.fakes.pairing_store import FakeDevice, PairingStore
from tests.harness import ClawgateProcess
from tests.netns import GW_V4, Tailnet, connect_in

PORT = 18793


def _connect_frame(token: str) -> str:
    return json.dumps(
        {
            "type": "req",
            "id": "c1",
            "method": "connect",
            "params": {
                "minProtocol": 4,
                "maxProtocol": 4,
                "client": {"id": "cli", "version": "1", "platform": "linux", "mode": "cli"},
                "auth": {"token": token},
            },
        }
    )


@pytest.fixture
async def gated_fake(
    tailnet: Tailnet, fake_gateway: FakeGateway, gateway_token_file: Path
) -> AsyncIterator[ClawgateProcess]:
    fake_gateway.token = GW_TOKEN
    d = Path(tempfile.mkdtemp(prefix="clawgate-e2e-gatefake-"))
    cg = ClawgateProcess(
        d / "cg",
        {
            "gateway": {"host": GW_V4, "port": PORT},
            "upstream": f"http://127.0.0.1:{fake_gateway.port}",
            "gatewayToken": {"file": str(gateway_token_file), "firstFrameTimeout": 1},
        },
        netns=tailnet.ns("gw"),
        admin_port=18794,
    )
    await cg.start()
    try:
        yield cg
    finally:
        await cg.stop()
        shutil.rmtree(d, ignore_errors=True)


async def _open(tailnet: Tailnet) -> Any:
    sock = await connect_in(tailnet.ns("phone"), GW_V4, PORT)
    return await connect(
        f"ws://{GW_V4}:{PORT}/ws/openclaw", sock=sock, proxy=None, compression=None, open_timeout=10
    )


async def test_verified_first_frame_reaches_the_gateway_unchanged(
    tailnet: Tailnet, fake_gateway: FakeGateway, gated_fake: ClawgateProcess
) -> None:
    frame = _connect_frame(GW_TOKEN)
    async with await _open(tailnet) as ws:
        assert json.loads(await ws.recv())["event"] == "connect.challenge"
        await ws.send(frame)
        assert json.loads(await ws.recv())["payload"]["type"] == "hello-ok"
        await ws.send("after the gate")
        assert await ws.recv() == "after the gate"
    assert fake_gateway.ws_messages == [frame, "after the gate"]


@pytest.mark.parametrize(
    "first",
    [
        _connect_frame("WRONG"),
        _connect_frame(GW_TOKEN).encode(),
        [_connect_frame(GW_TOKEN)[:20], _connect_frame(GW_TOKEN)[20:]],
        _connect_frame(GW_TOKEN) + " " * 70_000,
        None,  # nothing within firstFrameTimeout (1 s)
    ],
    ids=["wrong-token", "binary", "fragmented", "oversized", "late"],
)
async def test_refused_first_frame_never_reaches_the_gateway(
    tailnet: Tailnet, fake_gateway: FakeGateway, gated_fake: ClawgateProcess, first: Any
) -> None:
    ws = await _open(tailnet)
    try:
        assert json.loads(await ws.recv())["event"] == "connect.challenge"
        if first is not None:
            await ws.send(first)
            await ws.send("and a second frame")
        with pytest.raises(websockets.ConnectionClosedError) as info:
            await asyncio.wait_for(ws.recv(), 10)
    finally:
        await ws.close()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    await fake_gateway.wait_until(lambda: fake_gateway.active_connections == 0)
    assert fake_gateway.ws_messages == []
    assert fake_gateway.ws_closes == []  # not even a close frame from the client


# ------------------------------------------------------------------ the cost of the gate

BENCH_N = 500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _timed(port: int, headers: dict[str, str], n: int) -> float:
    frame = _connect_frame(GW_TOKEN)
    started = time.perf_counter()
    for _ in range(n):
        async with connect(
            f"ws://127.0.0.1:{port}/ws/openclaw",
            proxy=None,
            compression=None,
            additional_headers=headers,
        ) as ws:
            await ws.recv()  # connect.challenge
            await ws.send(frame)
            await ws.recv()  # hello-ok: the frame went through and was answered
    return time.perf_counter() - started


@pytest.mark.slow
async def test_cost_of_the_gate_against_a_plain_splice(
    fake_gateway_local: FakeGateway, gateway_token_file: Path
) -> None:
    """N connects + first frame + answer, on loopback, with and without gatewayToken.

    Both clawgates run at once and the rounds alternate, so load from elsewhere on the
    machine falls on both alike."""
    fake_gateway_local.token = GW_TOKEN
    procs: dict[str, tuple[ClawgateProcess, int, dict[str, str]]] = {}
    dirs: list[Path] = []
    try:
        for name, extra in (
            ("splice", {}),
            ("gate", {"gatewayToken": {"file": str(gateway_token_file)}}),
        ):
            d = Path(tempfile.mkdtemp(prefix=f"clawgate-e2e-bench-{name}-"))
            dirs.append(d)
            port = _free_port()
            cg = ClawgateProcess(
                d,
                {
                    "gateway": {"host": "127.0.0.1", "port": port},
                    "upstream": f"http://127.0.0.1:{fake_gateway_local.port}",
                    "log": {"access": "off"},
                    "admin": {"enabled": False},
                    "limits": {"perSourceIp": 100000},
                    **extra,
                },
            )
            await cg.start()
            # splice: clawgate's own token in a header; gate: the gateway token in frame one.
            headers = {"Authorization": f"Bearer {cg.tokens['phone']}"} if name == "splice" else {}
            procs[name] = (cg, port, headers)
        spent = dict.fromkeys(procs, 0.0)
        for name, (_, port, headers) in procs.items():
            await _timed(port, headers, 20)  # warm up
        rounds = 5
        for _ in range(rounds):
            for name, (_, port, headers) in procs.items():
                spent[name] += await _timed(port, headers, BENCH_N // rounds)
    finally:
        for cg, _, _ in procs.values():
            await cg.stop()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    rates = {name: BENCH_N / t for name, t in spent.items()}
    print(
        f"\nconnect+first frame+answer, N={BENCH_N} each: splice {rates['splice']:.0f}/s, "
        f"gate {rates['gate']:.0f}/s ({rates['gate'] / rates['splice']:.2f}x)"
    )
    assert len(fake_gateway_local.ws_messages) == 2 * (BENCH_N + 20)
    # The check is one small parse and a digest compare per connection: it must not halve
    # the connection rate.
    assert rates["gate"] > 0.5 * rates["splice"]


async def test_refusal_close_frame_survives_a_client_still_sending(
    tailnet: Tailnet, fake_gateway: FakeGateway, gated_fake: ClawgateProcess
) -> None:
    """A 1 MiB first frame is refused on its header while most of it is still in flight:
    the close frame must still arrive (a plain close() with unread input sends a RST, which
    throws away the close frame before the client sees it)."""
    sock = await connect_in(tailnet.ns("phone"), GW_V4, PORT)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(
            f"GET /ws/openclaw HTTP/1.1\r\nHost: {GW_V4}:{PORT}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 ")
        b0, b1 = await reader.readexactly(2)  # the challenge: an unmasked server frame
        length = b1 & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        assert b0 == 0x81
        await reader.readexactly(length)
        size = 1 << 20
        frame = bytes((0x81, 0xFF)) + size.to_bytes(8, "big") + b"\0\0\0\0" + b"x" * size
        writer.write(frame)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(writer.drain(), 10)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(10):
                while chunk := await reader.read(65536):
                    data += chunk
    finally:
        writer.close()
    reason = b"first frame too large"
    assert data == bytes((0x88, 2 + len(reason))) + (1008).to_bytes(2, "big") + reason
    assert fake_gateway.ws_messages == []


# ------------------------------------------------------------------ device and setup-code tokens

STORE_PORT = 18801
DEVICE = FakeDevice.new()
STRANGER = FakeDevice.new()
DEVICE_TOKEN = "fake-device-token-Nd5qp7YIoQvaVNOADS1SPW3DyVA9FP7Kc8QFdRyaAko"
SETUP_TOKEN = "fake-setup-token-S7kK3r0RI9lBCV2agCrfjjwknzbIsLKnSukTgKw78OM"


def _device_frame(auth: dict[str, str], dev: FakeDevice = DEVICE, role: str = "operator") -> str:
    return json.dumps(
        {
            "type": "req",
            "id": "c1",
            "method": "connect",
            "params": {
                "minProtocol": 4,
                "maxProtocol": 4,
                "role": role,
                "client": {"id": "cli", "version": "1", "platform": "linux", "mode": "cli"},
                "auth": auth,
                "device": {
                    "id": dev.device_id,
                    "publicKey": dev.public_key,
                    "signature": "sig",
                    "signedAt": 1,
                    "nonce": "n",
                },
            },
        }
    )


@pytest.fixture
async def store_gated(
    tailnet: Tailnet, fake_gateway: FakeGateway, gateway_token_file: Path
) -> AsyncIterator[tuple[ClawgateProcess, PairingStore]]:
    fake_gateway.token = None  # the fake answers hello-ok to whatever the gate lets through
    d = Path(tempfile.mkdtemp(prefix="clawgate-e2e-gatestore-"))
    store = PairingStore(d / "openclaw-state")
    store.pair(DEVICE, DEVICE_TOKEN)
    store.bootstrap(SETUP_TOKEN, int(time.time() * 1000))
    cg = ClawgateProcess(
        d / "cg",
        {
            "gateway": {"host": GW_V4, "port": STORE_PORT},
            "upstream": f"http://127.0.0.1:{fake_gateway.port}",
            "gatewayToken": {
                "file": str(gateway_token_file),
                "firstFrameTimeout": 2,
                "stateDir": str(store.state_dir),
            },
            "limits": {"failedAuthCount": 1000},
        },
        netns=tailnet.ns("gw"),
        admin_port=18802,
    )
    await cg.start()
    try:
        yield cg, store
    finally:
        await cg.stop()
        store.close()
        shutil.rmtree(d, ignore_errors=True)


async def _first_frame(tailnet: Tailnet, frame: str, port: int = STORE_PORT) -> Any:
    """Send ``frame`` first; return the hello payload, or the (code, reason) of the close."""
    sock = await connect_in(tailnet.ns("phone"), GW_V4, port)
    async with connect(
        f"ws://{GW_V4}:{port}/ws/openclaw", sock=sock, proxy=None, compression=None, open_timeout=10
    ) as ws:
        assert json.loads(await ws.recv())["event"] == "connect.challenge"
        await ws.send(frame)
        try:
            return json.loads(await asyncio.wait_for(ws.recv(), 10))["payload"]
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None
            return exc.rcvd.code, exc.rcvd.reason


REFUSED_DEVICE_FRAMES = [
    ("forged device token", _device_frame({"deviceToken": "forged"}), "device token mismatch"),
    (
        "device token of another role",
        _device_frame({"deviceToken": DEVICE_TOKEN}, role="node"),
        "no device token for this role",
    ),
    (
        "unpaired device",
        _device_frame({"deviceToken": DEVICE_TOKEN}, STRANGER),
        "device not paired",
    ),
    (
        "device token without a device",
        json.dumps(
            {"type": "req", "method": "connect", "params": {"auth": {"deviceToken": DEVICE_TOKEN}}}
        ),
        "device credential without a device identity",
    ),
    ("forged setup token", _device_frame({"bootstrapToken": "forged"}), "bootstrap token invalid"),
]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [r[1:] for r in REFUSED_DEVICE_FRAMES],
    ids=[r[0] for r in REFUSED_DEVICE_FRAMES],
)
async def test_refused_device_frame_never_reaches_the_gateway(
    tailnet: Tailnet,
    fake_gateway: FakeGateway,
    store_gated: tuple[ClawgateProcess, PairingStore],
    frame: str,
    reason: str,
) -> None:
    got = await _first_frame(tailnet, frame)
    assert got == (1008, reason), store_gated[0].stderr()[-3000:]
    await fake_gateway.wait_until(lambda: fake_gateway.active_connections == 0)
    assert fake_gateway.ws_messages == []


async def test_store_changes_apply_to_the_next_connect(
    tailnet: Tailnet, fake_gateway: FakeGateway, store_gated: tuple[ClawgateProcess, PairingStore]
) -> None:
    _, store = store_gated
    ok = _device_frame({"deviceToken": DEVICE_TOKEN})
    setup = _device_frame({"bootstrapToken": SETUP_TOKEN})
    assert (await _first_frame(tailnet, ok))["type"] == "hello-ok"
    assert (await _first_frame(tailnet, setup))["type"] == "hello-ok"
    assert fake_gateway.ws_messages == [ok, setup]  # byte for byte
    # Revoked on the gateway, then at once presented again: refused, no stale cache.
    store.pair(DEVICE, DEVICE_TOKEN, revoked=True)
    assert await _first_frame(tailnet, ok) == (1008, "device token revoked")
    # Approved a moment ago (a new device): admitted on its very first connect.
    new_token = "fake-device-token-rotated-5f1c"
    store.pair(STRANGER, new_token)
    fresh = _device_frame({"deviceToken": new_token}, STRANGER)
    assert (await _first_frame(tailnet, fresh))["type"] == "hello-ok"
    store.unpair(STRANGER)
    assert await _first_frame(tailnet, fresh) == (1008, "device not paired")
    await fake_gateway.wait_until(lambda: fake_gateway.active_connections == 0)
    assert fake_gateway.ws_messages == [ok, setup, fresh]


async def test_unreadable_store_fails_closed_and_says_why(
    tailnet: Tailnet,
    fake_gateway: FakeGateway,
    store_gated: tuple[ClawgateProcess, PairingStore],
    gateway_token_file: Path,
) -> None:
    cg, store = store_gated
    store.db.rename(store.db.with_suffix(".moved"))
    frame = _device_frame({"deviceToken": DEVICE_TOKEN})
    assert await _first_frame(tailnet, frame) == (1008, "gateway device store unavailable")
    # The gateway's own token still works.
    assert (await _first_frame(tailnet, _connect_frame(GW_TOKEN)))["type"] == "hello-ok"
    assert fake_gateway.ws_messages == [_connect_frame(GW_TOKEN)]
    line = await cg.wait_stderr("gateway device store unavailable", 5)
    assert str(store.db) in line
