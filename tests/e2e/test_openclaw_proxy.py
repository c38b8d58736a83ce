"""The real OpenClaw gateway (token mode) behind clawgate on the netns tailnet.

clawgate runs as a real process in the gw namespace on 100.64.0.1 in front of the real
gateway on that namespace's 127.0.0.1:18789; clients run in the phone namespace
(100.101.102.103): the real `openclaw` CLI and a Python client doing the real handshake.
Covers the CLI through clawgate's token, the gateway's token checked at the edge,
attribution (never loopback, spoofed headers ignored), pairing, and a long-lived session.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect

from tests.e2e.conftest import GW_TOKEN, Clawgate
from tests.e2e.gwclient import CLI_CLIENT, GatewayClient, HandshakeError
from tests.e2e.openclaw import OpenClawGateway
from tests.netns import GW_V4, PHONE_V4, Tailnet, connect_in

PLAIN_PORT = 18789  # clawgate, static tokens only
GATED_PORT = 18791  # clawgate that also knows the gateway's token (first-frame check)
FIRST_FRAME_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def plain(tailnet: Tailnet, token_gateway: OpenClawGateway) -> Iterator[Clawgate]:
    cg = Clawgate(
        tailnet,
        "plain",
        {"upstream": f"http://127.0.0.1:{token_gateway.port}"},
        port=PLAIN_PORT,
        admin_port=18790,
    ).start()
    try:
        yield cg
    finally:
        cg.stop()


@pytest.fixture(scope="module")
def gated(
    tailnet: Tailnet, token_gateway: OpenClawGateway, gateway_token_file: Path
) -> Iterator[Clawgate]:
    cg = Clawgate(
        tailnet,
        "gated",
        {
            "upstream": f"http://127.0.0.1:{token_gateway.port}",
            "gatewayToken": {
                "file": str(gateway_token_file),
                "firstFrameTimeout": FIRST_FRAME_TIMEOUT,
            },
            # Many refusals from one phone in this module: the lockout is tested elsewhere.
            "limits": {"failedAuthCount": 1000},
        },
        port=GATED_PORT,
        admin_port=18792,
    ).start()
    try:
        yield cg
    finally:
        cg.stop()


def cli(
    gw: OpenClawGateway, tailnet: Tailnet, *args: str, home: Path | None = None
) -> tuple[int, str]:
    """The real CLI on the phone; returns (exit status, stdout+stderr)."""
    proc = gw.cli(*args, netns=tailnet.ns("phone"), home=home)
    return proc.returncode, proc.stdout + proc.stderr


def admin_cli(gw: OpenClawGateway, tailnet: Tailnet, *args: str) -> str:
    """The real CLI direct-local on the gateway host (the operator's admin path)."""
    proc = gw.cli(*args, *gw.auth_args(), netns=tailnet.ns("gw"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def gw_log_count(gw: OpenClawGateway, pattern: str) -> int:
    rx = re.compile(pattern)
    return sum(1 for m in gw.log_messages() if rx.search(m))


def wait_gw_log(
    gw: OpenClawGateway, pattern: str, *, at_least: int, timeout: float = 10.0
) -> list[str]:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in gw.log_messages() if rx.search(m)]
        if len(found) >= at_least:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"gateway log: {len(found)} < {at_least} lines match "
                f"{pattern!r}; last lines: {gw.log_messages()[-8:]}"
            )
        time.sleep(0.1)


def bearer(cg: Clawgate) -> dict[str, str]:
    return {"Authorization": f"Bearer {cg.tokens['phone']}"}


# ------------------------------------------------------------------ 1. the real CLI


def test_cli_health_through_clawgate(
    token_gateway: OpenClawGateway, tailnet: Tailnet, plain: Clawgate
) -> None:
    mark = plain.mark()
    url = f"ws://phone:{plain.tokens['phone']}@{GW_V4}:{PLAIN_PORT}"
    rc, out = cli(token_gateway, tailnet, "gateway", "health", "--url", url, "--token", GW_TOKEN)
    assert rc == 0, out
    assert "Gateway Health" in out and "OK" in out
    rec = plain.wait_for(lambda r: r["event"] == "decision", mark)
    assert (rec["decision"], rec["peer"], rec["token"], rec["websocket"]) == (
        "allow",
        PHONE_V4,
        "phone",
        True,
    )


def test_cli_wrong_gateway_token_is_the_gateways_own_answer(
    token_gateway: OpenClawGateway, tailnet: Tailnet, plain: Clawgate
) -> None:
    before = gw_log_count(token_gateway, r"^unauthorized .*reason=token_mismatch")
    url = f"ws://phone:{plain.tokens['phone']}@{GW_V4}:{PLAIN_PORT}"
    rc, out = cli(
        token_gateway, tailnet, "gateway", "health", "--url", url, "--token", "WRONG-GATEWAY-TOKEN"
    )
    assert rc != 0
    assert "gateway token mismatch" in out, out
    # It was the gateway that said so: clawgate let the connection through.
    wait_gw_log(token_gateway, r"^unauthorized .*reason=token_mismatch", at_least=before + 1)


def test_cli_without_clawgate_token_is_refused_with_401(
    token_gateway: OpenClawGateway, tailnet: Tailnet, plain: Clawgate
) -> None:
    mark = plain.mark()
    upgrades = gw_log_count(token_gateway, r"host=100\.64\.0\.1:18789 ")
    rc, out = cli(
        token_gateway,
        tailnet,
        "gateway",
        "health",
        "--url",
        f"ws://{GW_V4}:{PLAIN_PORT}",
        "--token",
        GW_TOKEN,
    )
    assert rc != 0
    assert "HTTP 401" in out, out
    rec = plain.wait_for(lambda r: r["event"] == "decision", mark)
    assert (rec["decision"], rec["status"], rec["peer"]) == ("deny", 401, PHONE_V4)
    # Nothing reached the gateway (every upgrade it sees is logged with its Host on close).
    assert gw_log_count(token_gateway, r"host=100\.64\.0\.1:18789 ") == upgrades


# ------------------------------------------------------------------ 2. the token at the edge

GATED_PHASE_PRE_CONNECT = (
    r"^closed before connect .*host=100\.64\.0\.1:18791 "
    r".*phase=ws_upgrade_started"
)


def test_edge_gate_cli_right_token_passes(
    token_gateway: OpenClawGateway, tailnet: Tailnet, gated: Clawgate
) -> None:
    mark = gated.mark()
    rc, out = cli(
        token_gateway,
        tailnet,
        "gateway",
        "health",
        "--url",
        f"ws://{GW_V4}:{GATED_PORT}",
        "--token",
        GW_TOKEN,
    )
    assert rc == 0, out
    assert "Gateway Health" in out
    rec = gated.wait_for(lambda r: r["event"] == "gateway_token", mark)
    assert (rec["result"], rec["peer"]) == ("ok", PHONE_V4)


def test_edge_gate_cli_wrong_token_never_reaches_the_gateway(
    token_gateway: OpenClawGateway, tailnet: Tailnet, gated: Clawgate
) -> None:
    mark = gated.mark()
    unauthorized = gw_log_count(token_gateway, r"^unauthorized ")
    pre_connect = gw_log_count(token_gateway, GATED_PHASE_PRE_CONNECT)
    rc, out = cli(
        token_gateway,
        tailnet,
        "gateway",
        "health",
        "--url",
        f"ws://{GW_V4}:{GATED_PORT}",
        "--token",
        "WRONG-GATEWAY-TOKEN",
    )
    assert rc != 0
    assert "gateway closed (1008): gateway token mismatch" in out, out
    rec = gated.wait_for(lambda r: r["event"] == "gateway_token", mark)
    assert (rec["result"], rec["reason"], rec["peer"]) == (
        "refused",
        "gateway token mismatch",
        PHONE_V4,
    )
    # The gateway saw the upgrade and then the socket close, never a connect request.
    wait_gw_log(token_gateway, GATED_PHASE_PRE_CONNECT, at_least=pre_connect + 1)
    assert gw_log_count(token_gateway, r"^unauthorized ") == unauthorized


async def _gated_ws(tailnet: Tailnet, port: int = GATED_PORT) -> Any:
    sock = await connect_in(tailnet.ns("phone"), GW_V4, port)
    return await connect(
        f"ws://{GW_V4}:{port}/",
        sock=sock,
        proxy=None,
        compression=None,
        max_size=None,
        open_timeout=10,
    )


def _connect_frame(token: str | None, pad: int = 0) -> str:
    params: dict[str, Any] = {
        "minProtocol": 4,
        "maxProtocol": 4,
        "client": dict(CLI_CLIENT),
        "role": "operator",
        "scopes": ["operator.read"],
        "caps": [],
        "pad": "x" * pad,
    }
    if token is not None:
        params["auth"] = {"token": token}
    return json.dumps({"type": "req", "id": "connect-1", "method": "connect", "params": params})


BAD_FIRST_FRAMES: list[tuple[str, Any, str]] = [
    ("fragmented", ['{"type":"req",', '"method":"connect"}'], "first frame must not be fragmented"),
    ("binary", _connect_frame(GW_TOKEN).encode(), "first frame must be a text frame"),
    ("oversized", _connect_frame(GW_TOKEN, pad=70 * 1024), "first frame too large"),
    ("no token", _connect_frame(None), "connect request carries no gateway token"),
    ("wrong token", _connect_frame("WRONG"), "gateway token mismatch"),
    (
        "not connect",
        json.dumps(
            {"type": "req", "id": "1", "method": "health", "params": {"auth": {"token": GW_TOKEN}}}
        ),
        "first frame must be the connect request",
    ),
    ("late", None, "no connect request within the time limit"),
]


@pytest.mark.parametrize(
    ("kind", "frame", "reason"), BAD_FIRST_FRAMES, ids=[k for k, _, _ in BAD_FIRST_FRAMES]
)
async def test_edge_gate_bad_first_frame_closes_1008_before_the_gateway(
    token_gateway: OpenClawGateway,
    tailnet: Tailnet,
    gated: Clawgate,
    kind: str,
    frame: Any,
    reason: str,
) -> None:
    mark = gated.mark()
    unauthorized = gw_log_count(token_gateway, r"^unauthorized ")
    pre_connect = gw_log_count(token_gateway, GATED_PHASE_PRE_CONNECT)
    ws = await _gated_ws(tailnet)
    started = time.monotonic()
    try:
        challenge = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert challenge["event"] == "connect.challenge"  # the gateway's, through the gate
        if frame is not None:
            await ws.send(frame)
        with pytest.raises(websockets.ConnectionClosedError) as info:
            await asyncio.wait_for(ws.recv(), FIRST_FRAME_TIMEOUT + 5)
    finally:
        await ws.close()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, reason)
    if kind == "late":
        assert time.monotonic() - started >= FIRST_FRAME_TIMEOUT - 0.5
    rec = gated.wait_for(lambda r: r["event"] == "gateway_token", mark)
    assert (rec["result"], rec["reason"]) == ("refused", reason)
    wait_gw_log(token_gateway, GATED_PHASE_PRE_CONNECT, at_least=pre_connect + 1)
    assert gw_log_count(token_gateway, r"^unauthorized ") == unauthorized


async def test_edge_gate_python_client_right_token_then_plain_splice(
    tailnet: Tailnet, gated: Clawgate
) -> None:
    sock = await connect_in(tailnet.ns("phone"), GW_V4, GATED_PORT)
    async with GatewayClient.connect(
        f"ws://{GW_V4}:{GATED_PORT}",
        sock=sock,
        client=CLI_CLIENT,
        scopes=["operator.read"],
        token=GW_TOKEN,
    ) as gw:
        assert gw.hello["type"] == "hello-ok"
        assert gw.hello["auth"]["method"] == "token"
        # After the gate the connection is a plain splice: later frames flow both ways.
        for _ in range(3):
            assert isinstance(await gw.call("health"), dict)


# ------------------------------------------------------------------ 3. attribution


SPOOFED = {
    "X-Forwarded-For": "127.0.0.1",
    "X-Real-IP": "127.0.0.1",
    "Forwarded": "for=127.0.0.1;proto=https",
    "X-Forwarded-User": "admin",
    "X-Forwarded-Host": "localhost",
}


async def test_spoofed_forwarding_headers_do_not_make_a_phone_local(
    token_gateway: OpenClawGateway, tailnet: Tailnet, plain: Clawgate
) -> None:
    # Control: a truly local token client gets the scopes it asks for.
    local = await connect_in(tailnet.ns("gw"), "127.0.0.1", token_gateway.port)
    async with GatewayClient.connect(
        token_gateway.url, sock=local, client=CLI_CLIENT, scopes=["operator.read"], token=GW_TOKEN
    ) as gw:
        assert gw.scopes == ["operator.read"]
    # Through clawgate, claiming to be 127.0.0.1 and "admin": still the phone, a remote
    # token-only client, which the gateway gives no scopes.
    sock = await connect_in(tailnet.ns("phone"), GW_V4, PLAIN_PORT)
    async with GatewayClient.connect(
        f"ws://{GW_V4}:{PLAIN_PORT}",
        sock=sock,
        headers={**bearer(plain), **SPOOFED},
        client=CLI_CLIENT,
        scopes=["operator.read"],
        token=GW_TOKEN,
    ) as gw:
        assert gw.hello["auth"]["method"] == "token"
        assert gw.scopes == []
        with pytest.raises(RuntimeError, match="missing scope: operator.read"):
            await gw.call("status")


async def test_gateway_sees_only_the_real_address_in_x_forwarded_for(
    token_gateway: OpenClawGateway, tailnet: Tailnet, plain: Clawgate
) -> None:
    pattern = (
        r"^closed before connect .*fwd=(\S+) .*host=100\.64\.0\.1:18789 "
        r".*phase=auth_credentials_received"
    )
    before = gw_log_count(token_gateway, pattern)
    sock = await connect_in(tailnet.ns("phone"), GW_V4, PLAIN_PORT)
    with pytest.raises(HandshakeError) as info:
        await GatewayClient.connect(
            f"ws://{GW_V4}:{PLAIN_PORT}",
            sock=sock,
            headers={**bearer(plain), **SPOOFED},
            client=CLI_CLIENT,
            token="WRONG-GATEWAY-TOKEN",
        )
    assert "gateway token mismatch" in str(info.value)
    lines = wait_gw_log(token_gateway, pattern, at_least=before + 1)
    # The gateway logs the raw X-Forwarded-For it received: ours alone, never appended to.
    fwd = re.search(r"fwd=(\S+) ", lines[-1])
    assert fwd is not None and fwd.group(1) == PHONE_V4, lines[-1]
    assert "remote=127.0.0.1 " in lines[-1]  # the TCP peer is clawgate


# ------------------------------------------------------------------ 4. pairing


def test_pairing_through_clawgate_is_attributed_to_the_phone(
    token_gateway: OpenClawGateway, tailnet: Tailnet, plain: Clawgate
) -> None:
    home = token_gateway.client_home("pairing-phone")
    url = f"ws://phone:{plain.tokens['phone']}@{GW_V4}:{PLAIN_PORT}"
    # `cron list` makes a device identity; a new device must be paired first.
    rc, out = cli(
        token_gateway, tailnet, "cron", "list", "--url", url, "--token", GW_TOKEN, home=home
    )
    assert rc != 0
    m = re.search(r"device pairing required \(requestId: ([0-9a-f-]{36})\)", out)
    assert m is not None, out
    request_id = m.group(1)

    pending = json.loads(admin_cli(token_gateway, tailnet, "devices", "list", "--json"))
    (entry,) = [p for p in pending["pending"] if p["requestId"] == request_id]
    assert entry["remoteIp"] == PHONE_V4  # the gateway's own attribution: never loopback
    assert entry["clientId"] == "cli" and entry["isRepair"] is False

    out = admin_cli(token_gateway, tailnet, "devices", "approve", request_id)
    assert request_id in out
    rc, out = cli(
        token_gateway, tailnet, "cron", "list", "--url", url, "--token", GW_TOKEN, home=home
    )
    assert rc == 0, out
    paired = json.loads(admin_cli(token_gateway, tailnet, "devices", "list", "--json"))
    (device,) = [d for d in paired["paired"] if d["deviceId"] == entry["deviceId"]]
    assert device.get("remoteIp", PHONE_V4) == PHONE_V4

    # Asking for more (devices list needs operator.pairing) is a scope upgrade, which the
    # gateway logs with the address it attributed: the phone's.
    rc, out = cli(
        token_gateway,
        tailnet,
        "devices",
        "list",
        "--json",
        "--url",
        url,
        "--token",
        GW_TOKEN,
        home=home,
    )
    assert rc != 0 and "scope upgrade pending approval" in out, out
    (line,) = wait_gw_log(
        token_gateway,
        rf"device access upgrade requested reason=scope-upgrade device={entry['deviceId'][:8]}",
        at_least=1,
    )
    assert f"ip={PHONE_V4} " in line, line
    assert "ip=127.0.0.1" not in line


# ------------------------------------------------------------------ 7. long-lived


@pytest.mark.slow
async def test_session_survives_70s_of_gateway_pings_and_ticks(
    tailnet: Tailnet, plain: Clawgate
) -> None:
    mark = plain.mark()
    sock = await connect_in(tailnet.ns("phone"), GW_V4, PLAIN_PORT)
    async with GatewayClient.connect(
        f"ws://{GW_V4}:{PLAIN_PORT}",
        sock=sock,
        headers=bearer(plain),
        client=CLI_CLIENT,
        scopes=["operator.read"],
        token=GW_TOKEN,
    ) as gw:
        ws = gw.ws
        ticks = 0
        deadline = time.monotonic() + 70
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = json.loads(await asyncio.wait_for(ws.recv(), left))
            except TimeoutError:
                break
            if frame.get("type") == "event" and frame.get("event") == "tick":
                ticks += 1
        assert ticks >= 2  # the gateway ticks every 30 s
        assert ws.close_code is None
        # websockets answers the gateway's 25 s pings itself; the session still works.
        assert isinstance(await gw.call("health"), dict)
    # One connection, one close line: it lasted the whole 70 s, nothing reconnected.
    rec = plain.wait_for(lambda r: r["event"] == "close" and r["peer"] == PHONE_V4, mark)
    assert rec["duration"] >= 70
    assert [r["event"] for r in plain.since(mark)] == ["decision", "close"]
