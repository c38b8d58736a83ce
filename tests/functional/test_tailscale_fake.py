"""The fake tailscaled on the wire, and the identity cache + monitor driven through it.

Part one holds the fake to the LocalAPI protocol byte for byte (raw HTTP over the unix
socket), including its /fake/ control surface and a standalone, killable process. Part two
runs the real client, cache and monitor against it: flushes, reconnects, big lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest

from proxy.errors import LocalAPIUnavailable, PeerNotFound
from proxy.tailscale import (
    IdentityCache,
    LocalAPIClient,
    Status,
    TailscaleMonitor,
)
from tests.fakes.fake_tailscaled import (
    DEFAULT_ALICE_IP,
    DEFAULT_CI_IP,
    FELL_BEHIND,
    SAMPLES,
    SELF_IPV4,
    SELF_IPV6,
    FakeTailscaled,
    notify_line,
    tagged_peer,
    user_peer,
)

REPO = Path(__file__).resolve().parents[2]
SHARED_SAMPLES = REPO.parent / "shared" / "reference" / "tailscale"


@pytest.fixture
def sock(tmp_path: Path) -> str:
    path = str(tmp_path / "ts.sock")
    assert len(path) < 100, "unix socket paths are limited to 108 bytes"
    return path


@pytest.fixture
async def fake(sock: str) -> AsyncIterator[FakeTailscaled]:
    async with FakeTailscaled(sock) as server:
        yield server


@pytest.fixture
async def api(fake: FakeTailscaled) -> AsyncIterator[LocalAPIClient]:
    async with LocalAPIClient(fake.socket_path, timeout=1.0) as client:
        yield client


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) until ``predicate()`` holds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


# ---- the samples are the shared ones ----------------------------------------------------------


@pytest.mark.skipif(not SHARED_SAMPLES.is_dir(), reason="no ../shared/reference checkout")
def test_samples_equal_the_shared_reference() -> None:
    ours = sorted(p.name for p in SAMPLES.iterdir())
    theirs = sorted(p.name for p in SHARED_SAMPLES.iterdir())
    assert ours == theirs
    for name in ours:
        assert (SAMPLES / name).read_bytes() == (SHARED_SAMPLES / name).read_bytes(), name


# ---- raw HTTP on the socket -------------------------------------------------------------------


class RawResponse:
    def __init__(self, raw: bytes) -> None:
        head, _, self.raw_body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    @property
    def chunked(self) -> bool:
        return self.headers.get("transfer-encoding") == "chunked"

    @property
    def body(self) -> bytes:
        if not self.chunked:
            return self.raw_body
        out, rest = b"", self.raw_body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        return out


async def raw_get(sock: str, target: str, headers: dict[str, str] | None = None) -> RawResponse:
    """One HTTP/1.1 GET written by hand, so tests control every header byte."""
    hdrs = {"Host": "local-tailscaled.sock"} if headers is None else headers
    head = f"GET {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    reader, writer = await asyncio.open_unix_connection(sock)
    try:
        writer.write((head + "Connection: close\r\n\r\n").encode("latin-1"))
        async with asyncio.timeout(5):
            return RawResponse(await reader.read())
    finally:
        writer.close()
        await writer.wait_closed()


SECURITY_HEADERS = ("tailscale-version", "tailscale-cap", "content-security-policy")


async def test_whois_on_the_wire(fake: FakeTailscaled) -> None:
    resp = await raw_get(fake.socket_path, f"/localapi/v0/whois?addr={DEFAULT_CI_IP}:443")
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    assert not resp.chunked and int(resp.headers["content-length"]) == len(resp.body) <= 2048
    assert resp.body.startswith(b'{\n\t"Node": {\n\t\t"ID": ')
    assert not resp.body.endswith(b"\n")  # MarshalIndent: no trailing newline
    assert json.loads(resp.body)["Node"]["Tags"] == ["tag:ci"]
    for name in SECURITY_HEADERS:
        assert resp.headers[name]
    assert resp.headers["x-frame-options"] == "DENY"
    assert resp.headers["x-content-type-options"] == "nosniff"


async def test_big_bodies_come_chunked(fake: FakeTailscaled) -> None:
    caps = {"example.com/cap/openclaw": [{"role": "operator", "pad": "x" * 3000}]}
    fake.add_peer("100.90.9.9", user_peer("100.90.9.9", "big@example.com", "big", caps=caps))
    resp = await raw_get(fake.socket_path, "/localapi/v0/whois?addr=100.90.9.9:1")
    assert resp.status == 200 and resp.chunked and "content-length" not in resp.headers
    assert json.loads(resp.body)["UserProfile"]["LoginName"] == "big@example.com"
    assert not resp.body.endswith(b"\n")


async def test_status_on_the_wire(fake: FakeTailscaled) -> None:
    resp = await raw_get(fake.socket_path, "/localapi/v0/status")
    assert resp.status == 200 and resp.chunked  # > 2048 bytes
    assert resp.body.endswith(b"}\n") and resp.body.startswith(b'{\n\t"Version": ')
    body = json.loads(resp.body)
    assert body["TailscaleIPs"] == [SELF_IPV4, SELF_IPV6]
    assert body["Self"]["TailscaleIPs"] == [SELF_IPV4, SELF_IPV6]
    assert len(body["Peer"]) == 2
    users = {u["LoginName"] for u in body["User"].values()}
    assert users == {"alice@example.com", "tagged-devices"}
    cheap = json.loads((await raw_get(fake.socket_path, "/localapi/v0/status?peers=false")).body)
    assert cheap["Peer"] is None and cheap["BackendState"] == "Running"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Host": "local-tailscaled.sock"}, 200),
        ({"Host": ""}, 200),
        ({}, 400),  # HTTP/1.1 without Host: rejected by the HTTP server itself, as in Go
        ({"Host": "localhost"}, 403),
        ({"Host": "local-tailscaled.sock:80"}, 403),
        ({"Host": "LOCAL-TAILSCALED.SOCK"}, 403),
        ({"Host": "evil.example"}, 403),
        ({"Host": "local-tailscaled.sock", "Origin": "http://local-tailscaled.sock"}, 403),
        ({"Host": "local-tailscaled.sock", "Origin": "null"}, 403),
        ({"Host": "local-tailscaled.sock", "Referer": "http://x/"}, 403),
    ],
)
async def test_host_origin_referer_rules(
    fake: FakeTailscaled, headers: dict[str, str], status: int
) -> None:
    for target in ("/localapi/v0/status?peers=false", "/localapi/v0/whois?addr=100.88.12.34"):
        resp = await raw_get(fake.socket_path, target, headers)
        assert resp.status == status
        if status == 403:
            assert resp.body == b"invalid localapi request\n"
            assert resp.headers["content-type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize(
    ("query", "status", "body"),
    [
        ("", 400, b"missing 'addr' parameter\n"),
        ("?addr=", 400, b"missing 'addr' parameter\n"),
        ("?addr=bogus", 400, b"invalid 'addr' parameter\n"),
        ("?addr=100.1.2.3:99999", 400, b"invalid 'addr' parameter\n"),
        ("?addr=[fd7a::1", 400, b"invalid 'addr' parameter\n"),
        ("?addr=100.1.2.3:80", 404, b"no match for IP:port\n"),
        ("?addr=127.0.0.1:4444", 404, b"no match for IP:port\n"),
        ("?addr=100.101.102.103", 200, None),
        ("?addr=%5Bfd7a%3A115c%3Aa1e0%3A%3Ad401%3A6667%5D%3A443", 200, None),
        ("?addr=nodekey:nope", 404, b"no match for IP:port\n"),
    ],
)
async def test_whois_answers(fake: FakeTailscaled, query: str, status: int, body: bytes) -> None:
    resp = await raw_get(fake.socket_path, "/localapi/v0/whois" + query)
    assert resp.status == status
    if body is not None:
        assert resp.body == body


async def test_whois_by_nodekey_and_v4_mapped_unmapping(fake: FakeTailscaled) -> None:
    key = json.loads(
        (await raw_get(fake.socket_path, f"/localapi/v0/whois?addr={DEFAULT_CI_IP}")).body
    )
    by_key = await raw_get(fake.socket_path, "/localapi/v0/whois?addr=" + key["Node"]["Key"])
    assert by_key.status == 200
    mapped = f"/localapi/v0/whois?addr=[::ffff:{DEFAULT_ALICE_IP}]:1"
    assert (await raw_get(fake.socket_path, mapped)).status == 404  # like daemons < 1.102
    fake.unmaps_v4_mapped = True
    assert (await raw_get(fake.socket_path, mapped)).status == 200


async def test_cert_on_the_wire(fake: FakeTailscaled) -> None:
    base = "/localapi/v0/cert/web01.tail3f2a1.ts.net"
    pair = await raw_get(fake.socket_path, base + "?type=pair")
    key = await raw_get(fake.socket_path, base + "?type=key")
    cert = await raw_get(fake.socket_path, base + "?type=cert")
    assert pair.status == key.status == cert.status == 200
    assert pair.body == key.body + cert.body
    assert (await raw_get(fake.socket_path, base + "?type=nope")).status == 400
    assert (await raw_get(fake.socket_path, base + "?type=pair&min_validity=soon")).status == 400
    assert (await raw_get(fake.socket_path, base + "?type=pair&min_validity=720h")).status == 200
    fake.cert_mode = "403"
    denied = await raw_get(fake.socket_path, base + "?type=pair")
    assert (denied.status, denied.body) == (403, b"cert access denied\n")


async def test_watch_ipn_bus_on_the_wire(fake: FakeTailscaled) -> None:
    reader, writer = await asyncio.open_unix_connection(fake.socket_path)
    try:
        writer.write(
            b"GET /localapi/v0/watch-ipn-bus?mask=258 HTTP/1.1\r\n"
            b"Host: local-tailscaled.sock\r\n\r\n"
        )
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"Transfer-Encoding: chunked" in head
            size = int((await reader.readline()).strip(), 16)
            chunk = await reader.readexactly(size)
    finally:
        writer.close()
        await writer.wait_closed()
    assert chunk.endswith(b"\n") and chunk.count(b"\n") == 1
    first = json.loads(chunk)
    assert first["State"] == 6 and first["SessionID"] and first["NetMap"] is None
    assert b": " not in chunk  # compact, one object per line


async def test_unknown_localapi_path_is_404(fake: FakeTailscaled) -> None:
    resp = await raw_get(fake.socket_path, "/localapi/v0/prefs")
    assert resp.status == 404 and resp.headers["x-content-type-options"] == "nosniff"


# ---- the control surface and the standalone process ----------------------------------------------


async def _ctl(sock: str, method: str, path: str, payload: Any = None) -> Any:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as session:
        async with asyncio.timeout(5):
            async with session.request(method, "http://fake" + path, json=payload) as resp:
                return resp.status, await resp.json()


async def test_control_surface(fake: FakeTailscaled, api: LocalAPIClient) -> None:
    sock = fake.socket_path
    status, added = await _ctl(
        sock,
        "POST",
        "/fake/peers",
        [
            {"kind": "user", "ip": "100.90.0.5", "login": "eve@example.com", "node_name": "eve-pc"},
            {"kind": "tagged", "ip": "100.90.0.6", "tags": ["tag:bench"], "path": "idle"},
            {"ip": "100.90.0.7", "body": tagged_peer("100.90.0.7", ["tag:raw"])},
        ],
    )
    assert status == 200 and added == {"added": ["100.90.0.5", "100.90.0.6", "100.90.0.7"]}
    assert (await api.whois("100.90.0.5", 1)).login == "eve@example.com"
    assert (await api.whois("100.90.0.6", 1)).principal == "tag:bench"
    assert (await api.status()).peer_paths["100.90.0.6"] == "idle"
    status, stats = await _ctl(sock, "GET", "/fake/stats")
    assert stats["whois_calls"] == {"100.90.0.5": 1, "100.90.0.6": 1}
    assert "100.90.0.7" in stats["peers"]

    assert (await _ctl(sock, "DELETE", "/fake/peers/100.90.0.5"))[0] == 200
    assert (await _ctl(sock, "DELETE", "/fake/peers/100.90.0.5"))[0] == 404
    with pytest.raises(PeerNotFound):
        await api.whois("100.90.0.5", 1)

    assert (await _ctl(sock, "POST", "/fake/mode", {"mode": "503"}))[0] == 200
    with pytest.raises(LocalAPIUnavailable, match="503"):
        await api.status()
    assert (await _ctl(sock, "POST", "/fake/mode", {"mode": "bogus"}))[0] == 400
    await _ctl(sock, "POST", "/fake/mode", {"mode": "ok"})
    await _ctl(sock, "POST", "/fake/state", {"state": "NeedsLogin"})
    assert (await api.status()).backend_state == "NeedsLogin"
    assert (await _ctl(sock, "POST", "/fake/state", {"state": "Nope"}))[0] == 400

    await _ctl(sock, "POST", "/fake/reset-stats")
    assert (await _ctl(sock, "GET", "/fake/stats"))[1]["whois_calls"] == {}
    await _ctl(
        sock,
        "POST",
        "/fake/cert",
        {
            "domain": "x.tail3f2a1.ts.net",
            "key_pem": "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n",
            "cert_pem": "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        },
    )
    key, _ = await api.cert_pair("x.tail3f2a1.ts.net", None)
    assert key.startswith(b"-----BEGIN PRIVATE KEY-----")
    # Control requests are not LocalAPI requests: not recorded, no Host rules.
    assert all(not r.path.startswith("/fake/") for r in fake.requests)


async def test_control_notify_and_drop(fake: FakeTailscaled, api: LocalAPIClient) -> None:
    async with aclosing(api.watch_ipn_bus(2)) as bus:
        await anext(bus)
        status, body = await _ctl(fake.socket_path, "POST", "/fake/notify", {"PeersRemoved": [7]})
        assert body == {"watchers": 1}
        assert (await anext(bus))["PeersRemoved"] == [7]
        await _ctl(fake.socket_path, "POST", "/fake/drop-watchers")
        with pytest.raises(StopAsyncIteration):
            await anext(bus)


async def _start_process(sock: str, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.fake_tailscaled", "--socket", sock, *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
    assert line.startswith("fake tailscaled listening on "), line
    return proc


def _end(proc: subprocess.Popen[str], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


async def test_standalone_process_is_killable_and_restartable(tmp_path: Path) -> None:
    sock = str(tmp_path / "ts.sock")
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps([{"kind": "tagged", "ip": "100.77.0.1", "tags": ["tag:e2e"]}]))
    proc = await _start_process(sock, "--peers", str(peers))
    try:
        async with LocalAPIClient(sock) as client:
            assert (await client.whois("100.77.0.1", 1)).principal == "tag:e2e"
            assert (await client.whois(DEFAULT_ALICE_IP, 1)).login == "alice@example.com"
            _end(proc, signal.SIGKILL)
            assert os.path.exists(sock)  # a killed daemon leaves its socket file behind
            with pytest.raises(LocalAPIUnavailable, match="refused"):
                await client.status()
            proc = await _start_process(
                sock, "--no-default-peers", "--state", "NeedsLogin", "--self-ip", "100.64.9.9"
            )
            status = await client.status()
            assert status.backend_state == "NeedsLogin"
            await _ctl(sock, "POST", "/fake/state", {"state": "Running"})
            assert (await client.status()).tailscale_ips == ("100.64.9.9",)
            _, stats = await _ctl(sock, "GET", "/fake/stats")
            assert stats["peers"] == [] and stats["backend_state"] == "Running"
        _end(proc, signal.SIGTERM)
        assert proc.returncode == 0
        assert not os.path.exists(sock)  # a clean stop removes the socket
    finally:
        _end(proc, signal.SIGKILL)


async def test_in_process_restart_on_the_same_path(
    fake: FakeTailscaled, api: LocalAPIClient
) -> None:
    assert (await api.status()).running
    await fake.stop()
    assert not os.path.exists(fake.socket_path)
    with pytest.raises(LocalAPIUnavailable, match="missing"):
        await api.status()
    await fake.start()
    assert (await api.status()).running


# ---- cache + monitor against the fake ------------------------------------------------------------


async def test_single_flight_against_the_daemon(fake: FakeTailscaled, api: LocalAPIClient) -> None:
    cache = IdentityCache(api, ttl=60.0)
    results = await asyncio.gather(*(cache.lookup(DEFAULT_ALICE_IP, 40000 + i) for i in range(20)))
    assert {r.login for r in results} == {"alice@example.com"}
    assert fake.whois_calls == {DEFAULT_ALICE_IP: 1}
    # The IPv6 address is a different key (one more round trip), the port never is.
    await cache.lookup("fd7a:115c:a1e0::d401:6667", 1)
    await cache.lookup(f"::ffff:{DEFAULT_ALICE_IP}", 2)
    assert sum(fake.whois_calls.values()) == 2


async def test_failures_are_not_cached_against_the_daemon(
    fake: FakeTailscaled, api: LocalAPIClient
) -> None:
    cache = IdentityCache(api)
    fake.mode = "503"
    results = await asyncio.gather(
        *(cache.lookup(DEFAULT_ALICE_IP, 1) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, LocalAPIUnavailable) for r in results)
    assert fake.whois_calls[DEFAULT_ALICE_IP] == 1
    fake.mode = "ok"
    assert (await cache.lookup(DEFAULT_ALICE_IP, 1)).login == "alice@example.com"
    assert fake.whois_calls[DEFAULT_ALICE_IP] == 2


async def test_userspace_networking_loopback_peers(
    fake: FakeTailscaled, api: LocalAPIClient
) -> None:
    fake.add_loopback(40100, user_peer("100.90.3.3", "bob@example.com", "bob-phone"))
    cache = IdentityCache(api)
    assert (await cache.lookup("127.0.0.1", 40100)).login == "bob@example.com"
    assert cache.get("127.0.0.1", 40100) is not None
    with pytest.raises(PeerNotFound):  # a local process: no identity, never cached
        await cache.lookup("127.0.0.1", 40101)
    assert fake.requests[-1].query_string == "addr=127.0.0.1:40101"


class CountingBus:
    """Wraps the real client to count bus (re)connects; a StatusSource for the monitor."""

    def __init__(self, api: LocalAPIClient) -> None:
        self.api = api
        self.watches = 0

    async def status(self, peers: bool = True) -> Status:
        return await self.api.status(peers=peers)

    async def watch_ipn_bus(self, mask: int) -> AsyncGenerator[dict[str, Any], None]:
        self.watches += 1
        async with aclosing(self.api.watch_ipn_bus(mask)) as lines:
            async for line in lines:
                yield line


class Monitored(NamedTuple):
    monitor: TailscaleMonitor
    cache: IdentityCache
    bus: CountingBus
    states: list[str]


@pytest.fixture
async def monitored(fake: FakeTailscaled, api: LocalAPIClient) -> AsyncIterator[Monitored]:
    cache = IdentityCache(api, ttl=300.0)
    bus = CountingBus(api)
    states: list[str] = []
    monitor = TailscaleMonitor(
        bus,
        cache,
        on_state=states.append,
        poll_interval=60.0,
        backoff_initial=0.02,
        backoff_max=0.2,
    )
    monitor.start()
    try:
        await eventually(lambda: monitor.bus_connected and monitor.reachable)
        yield Monitored(monitor, cache, bus, states)
    finally:
        await monitor.stop()
        await cache.aclose()


async def _warm(cache: IdentityCache) -> None:
    await cache.lookup(DEFAULT_ALICE_IP, 1)
    await cache.lookup(DEFAULT_CI_IP, 1)
    assert cache.get(DEFAULT_ALICE_IP) is not None and len(cache) == 2


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(lambda f: f.remove_peer(DEFAULT_CI_IP), id="PeersRemoved"),
        pytest.param(lambda f: f.push_notify({}), id="bare-line"),
        pytest.param(lambda f: f.set_backend_state("Starting"), id="State"),
        pytest.param(lambda f: f.push_notify({"NetMap": {"Peers": []}}), id="NetMap"),
        pytest.param(lambda f: f.push_notify({"PeerChangedPatch": [{"NodeID": 1}]}), id="patch"),
        pytest.param(
            lambda f: f.add_peer("100.90.0.1", user_peer("100.90.0.1", "z@x", "z")),
            id="PeersChanged",
        ),
    ],
)
async def test_monitor_flushes_on_netmap_changes(
    fake: FakeTailscaled,
    monitored: Monitored,
    event: Callable[[FakeTailscaled], None],
) -> None:
    cache = monitored.cache
    await _warm(cache)
    event(fake)
    await eventually(lambda: len(cache) == 0)


async def test_monitor_ignores_engine_and_health_lines(
    fake: FakeTailscaled, monitored: Monitored
) -> None:
    cache, states = monitored.cache, monitored.states
    await _warm(cache)
    flushes = cache.flushes
    fake.push_notify({"Engine": {"RBytes": 1, "WBytes": 2}})
    fake.push_notify({"Health": {"Warnings": None}})
    fake.push_notify({"State": 5})  # processed after the two above: a sync point
    await eventually(lambda: "Starting" in states)
    assert cache.flushes == flushes + 1  # only the State line flushed


async def test_monitor_reconnects_after_restart_and_flushes(
    fake: FakeTailscaled, monitored: Monitored
) -> None:
    monitor, cache, bus, _ = monitored
    assert monitor.connects == 1
    await _warm(cache)
    await fake.stop()  # killed: streams cut, socket gone
    await eventually(lambda: not monitor.bus_connected)
    assert len(cache) == 0  # the gap is unobserved: nothing cached survives it
    assert monitor.last_error is not None
    await eventually(lambda: bus.watches >= 3)  # retrying, with backoff
    flushes = cache.flushes
    await fake.start()
    await eventually(lambda: monitor.connects == 2 and monitor.bus_connected)
    assert cache.flushes > flushes  # flushed again on reconnect
    await eventually(lambda: monitor.reachable)
    await _warm(cache)


async def test_monitor_backs_off_exponentially(fake: FakeTailscaled, monitored: Monitored) -> None:
    bus = monitored.bus
    await fake.stop()
    start = bus.watches
    await asyncio.sleep(1.0)
    # 0.02, 0.04, 0.08, 0.16, then 0.2 s each: about 8 attempts in a second, not hundreds.
    assert 3 <= bus.watches - start <= 12
    await fake.start()


async def test_monitor_reconnects_after_fell_behind(
    fake: FakeTailscaled, monitored: Monitored
) -> None:
    monitor, cache = monitored.monitor, monitored.cache
    await _warm(cache)
    fake.fall_behind()
    await eventually(lambda: monitor.connects == 2 and monitor.bus_connected)
    assert len(cache) == 0


async def test_monitor_error_message_is_last_error(
    fake: FakeTailscaled, api: LocalAPIClient
) -> None:
    bus = CountingBus(api)
    monitor = TailscaleMonitor(bus, None, poll_interval=60.0, backoff_initial=5.0)
    monitor.start()
    try:
        await eventually(lambda: monitor.bus_connected)
        fake.fall_behind()
        await eventually(lambda: not monitor.bus_connected)
        assert monitor.last_error == f"IPN bus: {FELL_BEHIND}"
    finally:
        await monitor.stop()


async def test_monitor_survives_a_3mb_line_and_split_chunks(
    fake: FakeTailscaled, monitored: Monitored
) -> None:
    monitor, cache = monitored.monitor, monitored.cache
    await _warm(cache)
    big = json.dumps(
        notify_line(NetMap={"Peers": [{"Pad": "x" * 1024, "i": i} for i in range(3100)]}),
        separators=(",", ":"),
    ).encode()
    assert len(big) > 3 * 1024 * 1024
    for start in range(0, len(big), 200_000):
        fake.push_raw(big[start : start + 200_000])
    fake.push_raw(b"\n")
    await eventually(lambda: len(cache) == 0)
    assert monitor.bus_connected and monitor.connects == 1  # no reconnect needed
    await _warm(cache)
    line = json.dumps(notify_line(PeersRemoved=[1])).encode() + b"\n"
    fake.push_raw(line[:10])
    await asyncio.sleep(0.05)
    assert len(cache) == 2  # half a line is not a line
    fake.push_raw(line[10:])
    await eventually(lambda: len(cache) == 0)


async def test_on_addresses_fires_when_login_completes(
    fake: FakeTailscaled, api: LocalAPIClient
) -> None:
    fake.backend_state = "NeedsLogin"
    addresses: list[list[str]] = []
    states: list[str] = []
    monitor = TailscaleMonitor(
        api,
        IdentityCache(api),
        on_addresses=addresses.append,
        on_state=states.append,
        poll_interval=60.0,
    )
    monitor.start()
    try:
        await eventually(lambda: monitor.reachable and monitor.bus_connected)
        assert monitor.backend_state == "NeedsLogin" and addresses == []
        assert not monitor.health()["running"]
        fake.set_backend_state("Running")
        await eventually(lambda: addresses == [[SELF_IPV4, SELF_IPV6]])
        assert states == ["NeedsLogin", "Running"]
        assert monitor.tailscale_ips == (SELF_IPV4, SELF_IPV6)
        health = monitor.health()
        assert health["running"] and health["state"] == "Running"
        assert health["cert_domains"] == ["web01.tail3f2a1.ts.net"]
        assert monitor.peer_paths[DEFAULT_ALICE_IP] == "direct"
        assert monitor.tun is True
        fake.set_backend_state("NeedsLogin")
        await eventually(lambda: addresses[-1] == [])
    finally:
        await monitor.stop()


async def test_self_change_repolls_addresses(fake: FakeTailscaled, api: LocalAPIClient) -> None:
    addresses: list[list[str]] = []
    monitor = TailscaleMonitor(api, None, on_addresses=addresses.append, poll_interval=60.0)
    monitor.start()
    try:
        await eventually(lambda: addresses == [[SELF_IPV4, SELF_IPV6]])
        status, body = await _ctl(fake.socket_path, "POST", "/fake/self", {"ips": ["100.64.0.2"]})
        assert body == {"self_ips": ["100.64.0.2"]}
        await eventually(lambda: addresses[-1] == ["100.64.0.2"])
    finally:
        await monitor.stop()


async def test_monitor_polls_periodically(fake: FakeTailscaled, api: LocalAPIClient) -> None:
    monitor = TailscaleMonitor(api, None, poll_interval=0.05)
    monitor.start()
    try:
        await eventually(lambda: monitor.polls >= 4)
        fake.self_key_expiry = None
        await eventually(lambda: monitor.key_expiry is None)
    finally:
        await monitor.stop()


async def test_large_status_is_parsed_off_the_event_loop(
    fake: FakeTailscaled, api: LocalAPIClient
) -> None:
    """A big tailnet's status (~1,000 peers, about 1 MB: above the inline-parse limit, so it
    goes through the worker-thread path) parses completely, and the loop keeps running."""
    for i in range(1000):
        fake.add_peer(
            f"100.70.{i // 250}.{i % 250 + 1}",
            user_peer(f"100.70.{i // 250}.{i % 250 + 1}", f"u{i}@example.com", f"host{i}"),
        )
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.create_task(ticker())
    status = await api.status(peers=True)
    stop.set()
    await t
    assert len(status.peer_paths) >= 1000
    assert ticks > 1
