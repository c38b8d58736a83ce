"""The admin app (proxy/admin.py) in-process, through pytest-aiohttp's ``aiohttp_client``.

A real Runtime built from a real config file, the real aiohttp application on a loopback
port, a real TCP gateway to check reachability against: /health (200, then 503 when the
gateway goes), /metrics, /connections, and the request rule that keeps browsers out
(loopback Host only, no Origin, POST only with a JSON object). The same app behind a real
clawgate process is tested in tests/functional/test_ops_admin.py and
tests/security/test_admin_csrf.py; this is the in-process half.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from proxy.admin import admin_refusal, build_admin_app
from proxy.config import Config, load_config
from proxy.keystore import TokenFile
from proxy.runtime import Runtime
from tests.fakes.fake_gateway import FakeGateway

Client = TestClient[Any, Any]


def write_config(path: Path, upstream_port: int, **extra: Any) -> None:
    cfg: dict[str, Any] = {
        "gateway": {
            "host": "127.0.0.1",
            "port": 18789,
            "requireToken": True,
            "allowedNetworks": ["127.0.0.1/32"],
        },
        "upstream": f"http://127.0.0.1:{upstream_port}",
        "tailscale": {"requireIdentity": False},
        "tokens": {"file": str(path.parent / "tokens.json")},
        "log": {"access": str(path.parent / "access.log")},
        **extra,
    }
    path.write_text(json.dumps(cfg))


def config_at(tmp_path: Path, upstream_port: int) -> Config:
    """A token file and a config file in tmp_path (set-up before the loop runs)."""
    TokenFile(tmp_path / "tokens.json").add("phone")
    write_config(tmp_path / "clawgate.json", upstream_port)
    return load_config(tmp_path / "clawgate.json")


@pytest.fixture
def config(tmp_path: Path, fake_gateway_local: FakeGateway) -> Config:
    return config_at(tmp_path, fake_gateway_local.port)


@pytest.fixture
async def runtime(config: Config) -> AsyncIterator[Runtime]:
    cfg = config
    rt = Runtime(cfg, asyncio.get_running_loop())
    rt.apply_config(cfg)
    rt.listen_addresses = ["127.0.0.1:18789"]  # what serve() records once it listens
    try:
        yield rt
    finally:
        rt.log.close()


@pytest.fixture
async def client(runtime: Runtime, aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(build_admin_app(runtime))


async def test_health_ok_while_the_gateway_answers(client: Client) -> None:
    resp = await client.get("/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ok" and body["problems"] == [], body
    assert body["upstream"]["reachable"] is True
    assert body["clawgate"]["listening"] == ["127.0.0.1:18789"]
    assert body["tailscale"] is None  # no tailscaled configured: nothing to report
    assert (await client.get("/healthz")).status == 200


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port nobody listens on (bound, never listening, for the test's length)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def dead_config(tmp_path: Path, dead_port: int) -> Config:
    return config_at(tmp_path, dead_port)


async def test_health_503_names_the_unreachable_gateway(
    dead_config: Config, dead_port: int, aiohttp_client: AiohttpClient
) -> None:
    rt = Runtime(dead_config, asyncio.get_running_loop())
    rt.apply_config(dead_config)
    try:
        client = await aiohttp_client(build_admin_app(rt))
        resp = await client.get("/health")
        body = await resp.json()
    finally:
        rt.log.close()
    assert resp.status == 503
    assert body["status"] == "degraded"
    assert body["upstream"]["reachable"] is False
    problems = " ".join(body["problems"])
    assert f"gateway unreachable: http://127.0.0.1:{dead_port}" in problems, problems
    assert "not listening yet" in problems, problems


async def test_metrics_are_prometheus_text(client: Client) -> None:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    text = await resp.text()
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert "clawgate_sessions" in names, sorted(names)
    assert any(n.startswith("clawgate_connections") for n in names), sorted(names)


async def test_connections_empty_without_traffic(client: Client) -> None:
    resp = await client.get("/connections")
    assert resp.status == 200
    assert await resp.json() == {"connections": []}


@pytest.mark.parametrize(
    ("headers", "status", "reason"),
    [
        ({"Host": "evil.example"}, 421, "loopback Host"),
        ({"Host": "100.64.0.1"}, 421, "loopback Host"),
        ({"Host": "127.0.0.1:1"}, 421, "loopback Host"),  # another port: not this listener
        ({"Origin": "http://127.0.0.1"}, 403, "cross-origin"),
        ({"Origin": "null"}, 403, "cross-origin"),
    ],
)
async def test_browser_shaped_gets_are_refused(
    client: Client, headers: dict[str, str], status: int, reason: str
) -> None:
    for path in ("/health", "/metrics", "/connections"):
        resp = await client.get(path, headers=headers)
        assert resp.status == status, (path, headers)
        body = await resp.json()
        assert body["ok"] is False and reason in body["error"], body


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
async def test_loopback_names_are_answered(client: Client, host: str) -> None:
    assert client.port is not None
    for value in (host, f"{host}:{client.port}"):
        resp = await client.get("/connections", headers={"Host": value})
        assert resp.status == 200, value


@pytest.mark.parametrize(
    ("ctype", "body", "status"),
    [
        (None, b"{}", 415),
        ("application/x-www-form-urlencoded", b"a=b", 415),  # a cross-origin form
        ("text/plain", b"{}", 415),  # the other "simple" CORS type
        ("application/json", b"", 400),
        ("application/json", b"[]", 400),
        ("application/json", b"not json", 400),
    ],
)
async def test_reload_needs_a_json_object(
    client: Client, runtime: Runtime, ctype: str | None, body: bytes, status: int
) -> None:
    headers = {"Content-Type": ctype} if ctype else {}
    resp = await client.post("/-/reload", data=body, headers=headers)
    assert resp.status == status
    assert (await resp.json())["ok"] is False
    assert runtime.reloads == 0


async def test_reload_applies_a_good_config_and_keeps_the_old_on_a_bad_one(
    client: Client, runtime: Runtime, fake_gateway_local: FakeGateway
) -> None:
    resp = await client.post("/-/reload", json={})
    assert resp.status == 200
    body = await resp.json()
    assert body["ok"] is True and body["error"] is None and body["sessions_ended"] == 0
    assert runtime.reloads == 1
    before = runtime.cfg
    assert runtime.cfg.source is not None
    write_config(Path(runtime.cfg.source), fake_gateway_local.port, limits={"perSourceIp": "many"})
    resp = await client.post("/-/reload", json={})
    assert resp.status == 409
    body = await resp.json()
    assert body["ok"] is False and "limits.perSourceIp" in body["error"], body
    assert runtime.cfg is before and runtime.reloads == 1
    health = await (await client.get("/health")).json()
    assert any("last reload refused" in w for w in health["warnings"]), health


@pytest.mark.parametrize(
    ("method", "host", "origin", "ctype", "want"),
    [
        ("GET", "127.0.0.1", None, None, None),
        ("GET", "127.0.0.1:18790", None, None, None),
        ("GET", None, None, None, 421),
        ("GET", "", None, None, 421),
        ("GET", "127.0.0.1:18791", None, None, 421),
        ("GET", "clawgate.example:18790", None, None, 421),
        ("GET", "127.0.0.1", "http://localhost", None, 403),
        ("POST", "127.0.0.1", None, "application/json", None),
        ("POST", "127.0.0.1", None, "Application/JSON; charset=utf-8", None),
        ("POST", "127.0.0.1", None, "application/jsonx", 415),
        ("POST", "127.0.0.1", None, None, 415),
    ],
)
def test_admin_refusal_table(
    method: str, host: str | None, origin: str | None, ctype: str | None, want: int | None
) -> None:
    got = admin_refusal(method, host, origin, ctype, 18790)
    assert (got[0] if got else None) == want, got
