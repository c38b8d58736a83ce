"""LocalAPI client: pure helpers as tables and properties, and the client against the fake.

The fake is a real aiohttp server on a unix socket under tmp_path, speaking the protocol of
reference/tailscale-localapi.md; every error path of the client is driven through it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import LocalAPIDenied, LocalAPIUnavailable, PeerNotFound, TailscaleError
from proxy.tailscale import (
    DEFAULT_SOCKET_PATHS,
    LOCALAPI_HOST,
    LocalAPIClient,
    Status,
    cache_key,
    find_socket,
    format_addr,
    parse_time,
    peer_path,
    split_lines,
    unmap_ip,
)
from tests.fakes.fake_tailscaled import (
    DEFAULT_ALICE_IP,
    DEFAULT_CI_IP,
    SELF_IPV4,
    SELF_IPV6,
    FakeTailscaled,
    load_sample,
    user_peer,
)

# ---- fixtures --------------------------------------------------------------------------


def _short_socket(tmp_path: Path) -> str:
    path = str(tmp_path / "ts.sock")
    assert len(path) < 100, "unix socket paths are limited to 108 bytes"
    return path


@pytest.fixture
def sock(tmp_path: Path) -> str:
    return _short_socket(tmp_path)


@pytest.fixture
async def fake(sock: str) -> AsyncIterator[FakeTailscaled]:
    async with FakeTailscaled(sock) as server:
        yield server


@pytest.fixture
async def client(fake: FakeTailscaled) -> AsyncIterator[LocalAPIClient]:
    async with LocalAPIClient(fake.socket_path, timeout=0.5) as api:
        yield api


# ---- pure helpers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "port", "addr"),
    [
        ("100.101.102.103", 443, "100.101.102.103:443"),
        ("::ffff:100.101.102.103", 443, "100.101.102.103:443"),
        ("::FFFF:100.101.102.103", 1, "100.101.102.103:1"),
        ("0:0:0:0:0:ffff:6465:6667", 80, "100.101.102.103:80"),
        ("fd7a:115c:a1e0::d401:6667", 443, "[fd7a:115c:a1e0::d401:6667]:443"),
        ("FD7A:115C:A1E0:0::D401:6667", 443, "[fd7a:115c:a1e0::d401:6667]:443"),
        ("fe80::1%eth0", 22, "[fe80::1]:22"),
        ("127.0.0.1", 50123, "127.0.0.1:50123"),
        ("::1", 50123, "[::1]:50123"),
        ("100.64.0.1", 0, "100.64.0.1"),
        ("::ffff:100.64.0.1", 0, "100.64.0.1"),
        ("fd7a:115c:a1e0::1", 0, "fd7a:115c:a1e0::1"),
        ("100.64.0.1", 65535, "100.64.0.1:65535"),
    ],
)
def test_format_addr(ip: str, port: int, addr: str) -> None:
    assert format_addr(ip, port) == addr


@pytest.mark.parametrize(
    ("ip", "port"),
    [("100.64.0.1", -1), ("100.64.0.1", 65536), ("not-an-ip", 1), ("", 1), ("1.2.3", 1)],
)
def test_format_addr_rejects(ip: str, port: int) -> None:
    with pytest.raises(ValueError):
        format_addr(ip, port)


@given(st.ip_addresses(v=4), st.integers(1, 65535))
def test_v4_mapped_formats_like_plain_v4(addr: ipaddress.IPv4Address, port: int) -> None:
    mapped = f"::ffff:{addr}"
    assert unmap_ip(mapped) == str(addr)
    assert format_addr(mapped, port) == format_addr(str(addr), port) == f"{addr}:{port}"
    # The cache's cheap string unmapping agrees with the exact one.
    if not str(addr).startswith("127."):
        assert cache_key(mapped, port) == cache_key(str(addr), port) == str(addr)


@given(st.ip_addresses(v=6), st.integers(1, 65535))
def test_v6_addr_round_trips(addr: ipaddress.IPv6Address, port: int) -> None:
    text = format_addr(str(addr), port)
    if addr.ipv4_mapped is not None:
        assert text == f"{addr.ipv4_mapped}:{port}"
        return
    assert text.startswith("[") and text.endswith(f"]:{port}")
    assert ipaddress.IPv6Address(text[1 : text.rindex("]")]) == addr


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("0001-01-01T00:00:00Z", None),
        ("2026-08-29T09:14:27Z", datetime(2026, 8, 29, 9, 14, 27, tzinfo=UTC)),
        (
            "2026-03-02T09:14:27.532771893Z",
            datetime(2026, 3, 2, 9, 14, 27, 532771, tzinfo=UTC),
        ),
        ("2026-08-29T11:14:27+02:00", datetime(2026, 8, 29, 9, 14, 27, tzinfo=UTC)),
    ],
)
def test_parse_time(value: object, expected: datetime | None) -> None:
    assert parse_time(value) == expected


@pytest.mark.parametrize("value", [12, "yesterday", "2026-08-29T09:14:27"])
def test_parse_time_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_time(value)


@pytest.mark.parametrize(
    ("peer", "path"),
    [
        ({"Active": True, "CurAddr": "198.51.100.23:41641", "Relay": "fra"}, "direct"),
        (
            {"Active": True, "CurAddr": "", "PeerRelay": "100.64.7.7:40000", "Relay": "fra"},
            "peer-relay",
        ),
        ({"Active": True, "CurAddr": "", "PeerRelay": "", "Relay": "nyc"}, "derp:nyc"),
        ({"Active": True, "CurAddr": "", "PeerRelay": "", "Relay": ""}, "unknown"),
        # Relay alone is the home region, not a relayed path: meaningless while idle.
        ({"Active": False, "CurAddr": "", "Relay": "nyc"}, "idle"),
        ({"Active": False, "CurAddr": "198.51.100.23:41641", "Relay": "fra"}, "idle"),
        ({}, "idle"),
    ],
)
def test_peer_path(peer: dict[str, object], path: str) -> None:
    assert peer_path(peer) == path


def test_status_from_running_sample() -> None:
    status = Status.from_json(load_sample("status_running_2peers.json"))
    assert status.running
    assert status.backend_state == "Running"
    assert status.tailscale_ips == ("100.101.102.103", "fd7a:115c:a1e0::7c01:6667")
    assert status.key_expiry == datetime(2026, 8, 29, 9, 14, 27, tzinfo=UTC)
    assert status.expired is False
    assert status.cert_domains == ("web01.tail4c3a9.ts.net",)
    assert status.tun is True
    assert status.magic_dns_suffix == "tail4c3a9.ts.net"
    assert status.self_dns_name == "web01.tail4c3a9.ts.net"
    assert dict(status.peer_paths) == {
        "100.88.12.34": "direct",
        "fd7a:115c:a1e0::1a01:c22": "direct",
        "100.71.5.9": "derp:nyc",
        "fd7a:115c:a1e0::c001:509": "derp:nyc",
    }


def test_status_from_peers_false_and_needslogin_samples() -> None:
    cheap = Status.from_json(load_sample("status_peers_false.json"))
    assert cheap.running and cheap.peer_paths == {}
    login = Status.from_json(load_sample("status_needslogin.json"))
    assert not login.running
    assert login.backend_state == "NeedsLogin"
    assert login.tailscale_ips == () and login.cert_domains == ()
    assert login.key_expiry is None and login.magic_dns_suffix == ""


def test_status_ignores_unknown_fields_and_reads_expired() -> None:
    body = load_sample("status_peers_false.json")
    body["SomethingNew"] = {"x": [1, 2]}
    body["Self"]["Expired"] = True
    body["Self"]["KeyExpiry"] = "2020-01-01T00:00:00Z"
    status = Status.from_json(body)
    assert status.expired
    assert status.key_expiry == datetime(2020, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.pop("BackendState"),
        lambda b: b.update(TailscaleIPs="100.64.0.1"),
        lambda b: b.update(Self=[1]),
        lambda b: b.update(Peer=[1]),
        lambda b: b["Self"].update(KeyExpiry="soon"),
    ],
)
def test_status_rejects_wrong_shapes(mutate: object) -> None:
    body = load_sample("status_running_2peers.json")
    mutate(body)  # type: ignore[operator]
    with pytest.raises(ValueError):
        Status.from_json(body)


def test_status_rejects_non_object() -> None:
    with pytest.raises(ValueError):
        Status.from_json([1, 2])


async def _collect(chunks: list[bytes]) -> list[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return [line async for line in split_lines(gen())]


@given(
    st.lists(st.binary(min_size=0, max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=8),
    st.lists(st.integers(0, 400), max_size=12),
)
def test_split_lines_is_independent_of_chunking(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:], strict=False)]
    got = asyncio.run(_collect(chunks))
    assert got == [line for line in lines if line]


def test_split_lines_drops_a_trailing_partial_line() -> None:
    assert asyncio.run(_collect([b"a\nb", b"c\n", b"partial"])) == [b"a", b"bc"]


def test_split_lines_has_no_length_limit() -> None:
    big = b"x" * (3 * 1024 * 1024)
    chunks = [big[i : i + 8192] for i in range(0, len(big), 8192)] + [b"\nnext\n"]
    got = asyncio.run(_collect(chunks))
    assert [len(x) for x in got] == [len(big), 4]


def test_find_socket(tmp_path: Path) -> None:
    assert find_socket("/explicit/even/if/missing.sock") == "/explicit/even/if/missing.sock"
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    assert find_socket(None, [str(a), str(b)]) is None
    b.touch()
    assert find_socket(None, [str(a), str(b)]) == str(b)
    a.touch()
    assert find_socket("", [str(a), str(b)]) == str(a)
    assert DEFAULT_SOCKET_PATHS[0] == "/var/run/tailscale/tailscaled.sock"
    assert "/tmp/tailscaled.sock" in DEFAULT_SOCKET_PATHS


# ---- the client against the fake -------------------------------------------------------


async def test_whois_user(client: LocalAPIClient, fake: FakeTailscaled) -> None:
    who = await client.whois(DEFAULT_ALICE_IP, 51234)
    assert who.login == "alice@example.com"
    assert who.node_name == "alice-laptop.tail3f2a1.ts.net"
    assert who.caps["example.com/cap/openclaw"][0]["role"] == "operator"
    assert fake.requests[-1].query_string == f"addr={DEFAULT_ALICE_IP}:51234"


async def test_whois_tagged_has_no_login(client: LocalAPIClient) -> None:
    who = await client.whois(DEFAULT_CI_IP, 443)
    assert who.tagged and who.login is None and who.display_name is None
    assert who.principal == "tag:ci"


async def test_whois_by_ipv6(client: LocalAPIClient, fake: FakeTailscaled) -> None:
    who = await client.whois("fd7a:115c:a1e0::d401:6667", 443)
    assert who.login == "alice@example.com"
    assert fake.requests[-1].query_string == "addr=[fd7a:115c:a1e0::d401:6667]:443"


async def test_whois_unmaps_v4_mapped_before_asking(
    client: LocalAPIClient, fake: FakeTailscaled
) -> None:
    # The fake behaves like a pre-1.102 daemon: it would 404 on the mapped form.
    assert fake.unmaps_v4_mapped is False
    who = await client.whois(f"::ffff:{DEFAULT_ALICE_IP}", 443)
    assert who.login == "alice@example.com"
    assert fake.requests[-1].query_string == f"addr={DEFAULT_ALICE_IP}:443"
    assert fake.whois_calls == {DEFAULT_ALICE_IP: 1}


async def test_client_sends_exact_host_and_no_origin(
    client: LocalAPIClient, fake: FakeTailscaled
) -> None:
    await client.whois(DEFAULT_ALICE_IP, 1)
    await client.status()
    await client.status(peers=False)
    await client.cert_pair("web01.tail3f2a1.ts.net")
    async with aclosing(client.watch_ipn_bus(2)) as bus:
        await anext(bus)
    assert len(fake.requests) == 5
    for request in fake.requests:
        hosts = [v for k, v in request.headers if k.lower() == "host"]
        assert hosts == [LOCALAPI_HOST]
        assert "origin" not in request.header_names()
        assert "referer" not in request.header_names()
        assert "authorization" not in request.header_names()


@pytest.mark.parametrize(
    ("mode", "error", "message"),
    [
        ("400", LocalAPIUnavailable, "tailscaled answered 400: invalid 'addr' parameter"),
        ("403", LocalAPIDenied, "whois access denied"),
        ("500", LocalAPIUnavailable, "tailscaled answered 500: internal error: backend crashed"),
        ("503", LocalAPIUnavailable, "tailscaled answered 503: no backend"),
        ("badjson", LocalAPIUnavailable, "tailscaled answered invalid JSON for whois"),
    ],
)
async def test_whois_status_mapping(
    client: LocalAPIClient,
    fake: FakeTailscaled,
    mode: str,
    error: type[TailscaleError],
    message: str,
) -> None:
    fake.mode = mode
    with pytest.raises(error) as caught:
        await client.whois(DEFAULT_ALICE_IP, 1)
    assert type(caught.value) is error
    assert str(caught.value) == message


async def test_whois_404_is_peer_not_found(client: LocalAPIClient) -> None:
    with pytest.raises(PeerNotFound, match=r"^no match for 100\.99\.1\.1:80$"):
        await client.whois("100.99.1.1", 80)


async def test_whois_not_running_is_peer_not_found(
    client: LocalAPIClient, fake: FakeTailscaled
) -> None:
    fake.backend_state = "NeedsLogin"
    with pytest.raises(PeerNotFound):
        await client.whois(DEFAULT_ALICE_IP, 1)


@pytest.mark.parametrize("mode", ["400", "403", "500", "503", "badjson"])
async def test_status_errors_are_typed(
    client: LocalAPIClient, fake: FakeTailscaled, mode: str
) -> None:
    fake.mode = mode
    with pytest.raises(TailscaleError) as caught:
        await client.status()
    assert isinstance(caught.value, LocalAPIDenied if mode == "403" else LocalAPIUnavailable)
    assert "\n" not in str(caught.value)


async def test_whois_malformed_body_is_unavailable(
    client: LocalAPIClient, fake: FakeTailscaled
) -> None:
    body = user_peer("100.90.0.1", "bob@example.com", "bob-pc")
    body["Node"]["Addresses"] = "100.90.0.1/32"
    fake.add_peer("100.90.0.1", body)
    with pytest.raises(LocalAPIUnavailable, match="malformed whois: Node.Addresses"):
        await client.whois("100.90.0.1", 1)


async def test_slow_daemon_times_out_within_the_timeout(sock: str, fake: FakeTailscaled) -> None:
    fake.mode = "slow"
    async with LocalAPIClient(sock, timeout=0.3) as api:
        for call in (lambda: api.whois(DEFAULT_ALICE_IP, 1), api.status):
            started = time.monotonic()
            with pytest.raises(LocalAPIUnavailable, match=r"^tailscaled timed out after 0\.3s$"):
                await call()
            assert 0.25 <= time.monotonic() - started < 2.5
        started = time.monotonic()
        with pytest.raises(LocalAPIUnavailable, match="timed out"):
            async with aclosing(api.watch_ipn_bus(2)) as bus:
                await anext(bus)
        assert time.monotonic() - started < 2.5


async def test_default_timeout_is_two_seconds() -> None:
    api = LocalAPIClient("/nonexistent.sock")
    assert api.timeout == 2.0
    assert api.cert_timeout >= 60
    await api.close()
    with pytest.raises(ValueError):
        LocalAPIClient("/x.sock", timeout=0)


async def test_missing_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.sock")
    async with LocalAPIClient(path) as api:
        with pytest.raises(LocalAPIUnavailable) as caught:
            await api.whois(DEFAULT_ALICE_IP, 1)
        assert str(caught.value) == f"tailscaled socket {path} missing"
        with pytest.raises(LocalAPIUnavailable, match="missing"):
            async with aclosing(api.watch_ipn_bus(2)) as bus:
                await anext(bus)


async def test_stale_socket_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves
    async with LocalAPIClient(path) as api:
        with pytest.raises(LocalAPIUnavailable, match=f"^tailscaled socket {path} refused"):
            await api.status()


async def test_no_socket_found_then_daemon_appears(tmp_path: Path) -> None:
    candidates = [str(tmp_path / "a.sock"), str(tmp_path / "b.sock")]
    async with LocalAPIClient(None, candidates=candidates) as api:
        with pytest.raises(LocalAPIUnavailable, match="^no tailscaled socket found"):
            await api.status()
        assert api.socket_path is None
        async with FakeTailscaled(candidates[1]):
            status = await api.status()
            assert status.running
            assert api.socket_path == candidates[1]


async def test_status_running(client: LocalAPIClient) -> None:
    status = await client.status()
    assert status.running
    assert status.tailscale_ips == (SELF_IPV4, SELF_IPV6)
    assert status.peer_paths[DEFAULT_ALICE_IP] == "direct"
    assert status.peer_paths[DEFAULT_CI_IP] == "derp:nyc"
    assert status.cert_domains == ("web01.tail3f2a1.ts.net",)
    assert status.key_expiry == datetime(2026, 8, 29, 9, 14, 27, tzinfo=UTC)


async def test_status_without_peers(client: LocalAPIClient, fake: FakeTailscaled) -> None:
    status = await client.status(peers=False)
    assert status.running and status.peer_paths == {}
    assert fake.requests[-1].query_string == "peers=false"


@pytest.mark.parametrize("path", ["direct", "derp", "peer-relay", "idle"])
async def test_status_peer_paths(client: LocalAPIClient, fake: FakeTailscaled, path: str) -> None:
    fake.set_peer_path(DEFAULT_ALICE_IP, path)
    status = await client.status()
    expected = {"derp": "derp:nyc"}.get(path, path)
    assert status.peer_paths[DEFAULT_ALICE_IP] == expected
    assert status.peer_paths["fd7a:115c:a1e0::d401:6667"] == expected


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (None, None),  # >= 1.92: omitted when expiry is disabled
        ("0001-01-01T00:00:00Z", None),  # older daemons: Go's zero time
        ("2027-01-02T03:04:05Z", datetime(2027, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ],
)
async def test_status_key_expiry_encodings(
    client: LocalAPIClient, fake: FakeTailscaled, encoded: str | None, expected: datetime | None
) -> None:
    fake.self_key_expiry = encoded
    assert (await client.status(peers=False)).key_expiry == expected


@pytest.mark.parametrize("key_expiry", [None, "0001-01-01T00:00:00Z", "2027-05-10T14:03:22Z"])
async def test_whois_accepts_both_key_expiry_encodings(
    client: LocalAPIClient, fake: FakeTailscaled, key_expiry: str | None
) -> None:
    fake.add_peer(
        "100.90.0.2", user_peer("100.90.0.2", "c@example.com", "c", key_expiry=key_expiry)
    )
    assert (await client.whois("100.90.0.2", 1)).login == "c@example.com"


async def test_status_needs_login(client: LocalAPIClient, fake: FakeTailscaled) -> None:
    fake.backend_state = "NeedsLogin"
    status = await client.status()
    assert status.backend_state == "NeedsLogin" and not status.running
    assert status.tailscale_ips == ()


async def test_status_tun_flag(client: LocalAPIClient, fake: FakeTailscaled) -> None:
    fake.tun = False
    assert (await client.status(peers=False)).tun is False


async def test_cert_pair(client: LocalAPIClient, fake: FakeTailscaled) -> None:
    key_pem = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    cert_pem = b"-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n"
    fake.set_cert("gw.tail3f2a1.ts.net", key_pem, cert_pem)
    assert await client.cert_pair("gw.tail3f2a1.ts.net", "720h") == (key_pem, cert_pem)
    await client.cert_pair("gw.tail3f2a1.ts.net", None)
    assert fake.cert_calls == [
        ("gw.tail3f2a1.ts.net", "pair", "720h"),
        ("gw.tail3f2a1.ts.net", "pair", None),
    ]


async def test_cert_denied(client: LocalAPIClient, fake: FakeTailscaled) -> None:
    fake.cert_mode = "403"
    with pytest.raises(LocalAPIDenied) as caught:
        await client.cert_pair("web01.tail3f2a1.ts.net", None)
    assert str(caught.value) == "cert access denied"


async def test_cert_unknown_domain_and_bad_input(client: LocalAPIClient) -> None:
    with pytest.raises(LocalAPIUnavailable, match="^tailscaled answered 500: invalid domain"):
        await client.cert_pair("other.example.com", None)
    with pytest.raises(ValueError):
        await client.cert_pair("a/b", None)
    with pytest.raises(ValueError):
        await client.cert_pair("", None)


async def test_cert_uses_the_long_timeout(sock: str, fake: FakeTailscaled) -> None:
    fake.mode = "slow"
    fake.slow_seconds = 0.4
    async with LocalAPIClient(sock, timeout=0.1, cert_timeout=5.0) as api:
        key, chain = await api.cert_pair("web01.tail3f2a1.ts.net", None)
    assert b"PRIVATE KEY" in key and chain.startswith(b"-----BEGIN CERTIFICATE-----")


async def _connected(
    bus: AsyncGenerator[dict[str, Any], None], fake: FakeTailscaled
) -> asyncio.Future[dict[str, Any]]:
    """Start reading ``bus`` (the request goes out on the first read) and wait until the
    fake has the watcher; returns the pending first line."""
    since = fake.watches_total
    first = asyncio.ensure_future(anext(bus))
    await fake.wait_watch_opened(since)
    return first


async def test_watch_ipn_bus_initial_state(client: LocalAPIClient, fake: FakeTailscaled) -> None:
    async with aclosing(client.watch_ipn_bus(2 | 256)) as bus:
        first = await anext(bus)
        assert first["State"] == 6
        fake.push_notify({"PeersRemoved": [1]})
        second = await anext(bus)
        assert second["PeersRemoved"] == [1] and second["State"] is None
    assert fake.requests[-1].query_string == "mask=258"


async def test_watch_ipn_bus_lines_split_across_chunks(
    client: LocalAPIClient, fake: FakeTailscaled
) -> None:
    line = json.dumps({"State": 2, "NetMap": None}).encode()
    async with aclosing(client.watch_ipn_bus(0)) as bus:
        first = await _connected(bus, fake)
        fake.push_raw(line[:5])
        await asyncio.sleep(0.02)
        fake.push_raw(line[5:] + b"\n" + line[:3])
        await asyncio.sleep(0.02)
        fake.push_raw(line[3:] + b"\n")
        assert await first == {"State": 2, "NetMap": None}
        assert await anext(bus) == {"State": 2, "NetMap": None}


async def test_watch_ipn_bus_3mb_line(client: LocalAPIClient, fake: FakeTailscaled) -> None:
    netmap = {"Peers": [{"Name": f"n{i}.ts.net.", "Pad": "x" * 1000} for i in range(3000)]}
    async with aclosing(client.watch_ipn_bus(0)) as bus:
        first = await _connected(bus, fake)
        fake.push_notify({"NetMap": netmap})
        fake.push_notify({"State": 6})
        note = await first
        assert len(json.dumps(note)) > 3_000_000
        assert note["NetMap"] == netmap
        assert (await anext(bus))["State"] == 6


async def test_watch_ipn_bus_bad_line_and_clean_end(
    client: LocalAPIClient, fake: FakeTailscaled
) -> None:
    async with aclosing(client.watch_ipn_bus(0)) as bus:
        first = await _connected(bus, fake)
        fake.push_raw(b"[1,2]\n")
        with pytest.raises(LocalAPIUnavailable, match="non-object"):
            await first
    async with aclosing(client.watch_ipn_bus(0)) as bus:
        first = await _connected(bus, fake)
        fake.push_raw(b"{nope\n")
        with pytest.raises(LocalAPIUnavailable, match="invalid JSON"):
            await first
    async with aclosing(client.watch_ipn_bus(2)) as bus:
        await anext(bus)
        fake.drop_watchers()
        with pytest.raises(StopAsyncIteration):
            await anext(bus)


async def test_watch_ipn_bus_cut_mid_stream(client: LocalAPIClient, fake: FakeTailscaled) -> None:
    async with aclosing(client.watch_ipn_bus(2)) as bus:
        await anext(bus)
        fake.drop_watchers(abort=True)
        with pytest.raises(LocalAPIUnavailable, match="IPN bus connection lost"):
            await anext(bus)


@pytest.mark.parametrize(
    ("mode", "error"),
    [("503", LocalAPIUnavailable), ("403", LocalAPIDenied), ("500", LocalAPIUnavailable)],
)
async def test_watch_ipn_bus_status_mapping(
    client: LocalAPIClient, fake: FakeTailscaled, mode: str, error: type[TailscaleError]
) -> None:
    fake.mode = mode
    with pytest.raises(error):
        async with aclosing(client.watch_ipn_bus(2)) as bus:
            await anext(bus)


async def test_watch_ipn_bus_closing_releases_the_stream(
    client: LocalAPIClient, fake: FakeTailscaled
) -> None:
    async with aclosing(client.watch_ipn_bus(2)) as bus:
        await anext(bus)
        assert fake.watcher_count == 1
    fake.push_notify({})  # the server notices the closed stream on its next write
    async with asyncio.timeout(5):
        while fake.watcher_count:
            await asyncio.sleep(0.01)
            fake.push_notify({})


async def test_close_is_idempotent(sock: str, fake: FakeTailscaled) -> None:
    api = LocalAPIClient(sock)
    await api.status()
    await api.close()
    await api.close()
    # A closed client opens a new session on the next call.
    assert (await api.status()).running
    await api.close()
