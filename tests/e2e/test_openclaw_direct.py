"""The real OpenClaw gateway, reached DIRECTLY (no proxy): proves the e2e harness works."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pytest
import websockets

from tests.e2e.gwclient import CLI_CLIENT, GatewayClient
from tests.e2e.openclaw import OpenClawGateway, OpenClawUnavailable, install_openclaw

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def gateway() -> Iterator[OpenClawGateway]:
    try:
        install = install_openclaw()
    except OpenClawUnavailable as exc:
        pytest.skip(f"real OpenClaw gateway unavailable: {exc}")
    with OpenClawGateway(auth="token", install=install) as gw:
        yield gw


def test_cli_health_with_right_token(gateway: OpenClawGateway) -> None:
    proc = gateway.cli("gateway", "health", *gateway.auth_args())
    assert proc.returncode == 0, proc.stderr
    assert "Gateway Health" in proc.stdout
    assert "OK" in proc.stdout


def test_cli_wrong_token_is_a_token_mismatch(gateway: OpenClawGateway) -> None:
    proc = gateway.cli("gateway", "health", "--url", gateway.url, "--token", "WRONG-TOKEN")
    assert proc.returncode != 0
    assert "gateway token mismatch" in proc.stdout + proc.stderr


def test_http_health_json(gateway: OpenClawGateway) -> None:
    with urllib.request.urlopen(f"{gateway.http_url}/health", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers.get_content_type() == "application/json"
        body = json.loads(resp.read())
    assert body == {"ok": True, "status": "live"}


async def test_websocket_gets_connect_challenge_first(gateway: OpenClawGateway) -> None:
    async with websockets.connect(gateway.url, open_timeout=10) as ws:
        first = json.loads(await ws.recv())
    assert first["type"] == "event"
    assert first["event"] == "connect.challenge"
    assert isinstance(first["payload"]["nonce"], str) and first["payload"]["nonce"]
    assert isinstance(first["payload"]["ts"], int)


async def test_gwclient_handshake_with_token(gateway: OpenClawGateway) -> None:
    assert gateway.token is not None
    async with GatewayClient.connect(
        gateway.url, client=CLI_CLIENT, scopes=["operator.read"], token=gateway.token
    ) as gw:
        assert gw.hello["type"] == "hello-ok"
        assert gw.hello["protocol"] == 4
        assert gw.hello["auth"]["method"] == "token"
        assert gw.scopes == ["operator.read"]
        health = await gw.call("health")
    assert isinstance(health, dict)
