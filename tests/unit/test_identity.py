"""Identity parsing, the identity cache and the monitor's pure parts.

The cache is driven with an in-memory IdentitySource that counts and gates its calls and a
fake clock, so single-flight, TTL and failure handling are exact, not timing-dependent.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from proxy.errors import LocalAPIUnavailable, PeerNotFound
from proxy.tailscale import (
    BACKEND_STATES,
    Identity,
    IdentityCache,
    Status,
    TailscaleMonitor,
    cache_key,
    classify_notify,
    is_loopback,
)
from tests.fakes.fake_tailscaled import load_sample, notify_line, tagged_peer, user_peer

ALICE = Identity.from_whois(load_sample("whois_user.json"))
CI = Identity.from_whois(load_sample("whois_tagged.json"))


# ---- Identity ----------------------------------------------------------------------------


def test_user_identity_from_sample() -> None:
    assert ALICE.login == "alice@example.com"
    assert ALICE.display_name == "Alice Example"
    assert ALICE.profile_pic == "https://lh3.googleusercontent.com/a/ACg8ocJexample=s96-c"
    assert ALICE.node_name == "alice-laptop.tail3f2a1.ts.net"
    assert ALICE.node_host == "alice-laptop"
    assert ALICE.node_id == "nR4xKq7aMP11CNTRL"
    assert ALICE.tags == () and not ALICE.tagged
    assert ALICE.os == "macOS"
    assert ALICE.addresses == ("100.101.102.103", "fd7a:115c:a1e0::d401:6667")
    assert ALICE.tailnet == "tail3f2a1.ts.net"
    assert ALICE.principal == "alice@example.com"
    assert dict(ALICE.caps) == {
        "example.com/cap/openclaw": (
            {"role": "operator", "gateways": ["prod", "staging"]},
            {"role": "viewer"},
        )
    }
    assert ALICE.to_log() == {
        "node": "alice-laptop.tail3f2a1.ts.net",
        "login": "alice@example.com",
        "tags": [],
        "os": "macOS",
    }


def test_tagged_identity_is_never_tagged_devices() -> None:
    assert CI.tagged
    assert CI.login is None
    assert CI.display_name is None and CI.profile_pic is None
    assert CI.tags == ("tag:ci", "tag:server")
    assert CI.principal == "tag:ci,tag:server"
    assert CI.caps == {}
    assert CI.to_log()["login"] is None
    assert "tagged-devices" not in repr(CI)


def test_tagged_devices_login_without_tags_is_still_no_login() -> None:
    body = load_sample("whois_tagged.json")
    del body["Node"]["Tags"]
    who = Identity.from_whois(body)
    assert who.login is None and not who.tagged
    assert who.principal == "node:ci-runner-1.tail3f2a1.ts.net"


@pytest.mark.parametrize(
    ("capmap", "caps"),
    [
        (None, {}),
        ({}, {}),
        ({"example.com/cap/openclaw": None}, {"example.com/cap/openclaw": ()}),
        ({"a.com/cap/x": [1, "two", {"three": 3}]}, {"a.com/cap/x": (1, "two", {"three": 3})}),
        ({"a.com/cap/x": [{"r": 1}, {"r": 1}]}, {"a.com/cap/x": ({"r": 1}, {"r": 1})}),
    ],
)
def test_capmap(capmap: Any, caps: dict[str, tuple[Any, ...]]) -> None:
    body = load_sample("whois_user.json")
    body["CapMap"] = capmap
    assert dict(Identity.from_whois(body).caps) == caps


def test_caps_are_read_only_and_identity_hashable() -> None:
    with pytest.raises(TypeError):
        ALICE.caps["x"] = ()  # type: ignore[index]
    assert hash(ALICE) == hash(Identity.from_whois(load_sample("whois_user.json")))
    assert ALICE == Identity.from_whois(load_sample("whois_user.json"))


def test_unknown_fields_ignored_and_optional_fields_absent() -> None:
    body = load_sample("whois_user.json")
    body["Future"] = {"x": 1}
    body["Node"]["Brand-New"] = [1]
    del body["UserProfile"]["ProfilePicURL"]
    del body["Node"]["Hostinfo"]
    del body["Node"]["KeyExpiry"]
    who = Identity.from_whois(body)
    assert who.profile_pic is None and who.os is None and who.login == "alice@example.com"


def test_tailnet_and_host_derivation() -> None:
    body = load_sample("whois_user.json")
    body["Node"]["Name"] = "alice-laptop-1.other.ts.net."
    body["Node"]["ComputedName"] = "alice-laptop"  # does not prefix Name: no tailnet
    who = Identity.from_whois(body)
    assert who.node_name == "alice-laptop-1.other.ts.net"
    assert who.node_host == "alice-laptop" and who.tailnet is None
    del body["Node"]["ComputedName"]
    assert Identity.from_whois(body).node_host == "alice-laptop-1"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b.pop("Node"),
        lambda b: b["Node"].pop("Name"),
        lambda b: b["Node"].update(Name=7),
        lambda b: b["Node"].update(Addresses=None),
        lambda b: b["Node"].update(Tags="tag:x"),
        lambda b: b.update(UserProfile="alice"),
        lambda b: b.update(CapMap=[]),
        lambda b: b.update(CapMap={"x": {"a": 1}}),
    ],
)
def test_from_whois_rejects_wrong_shapes(mutate: Callable[[dict[str, Any]], Any]) -> None:
    body = load_sample("whois_user.json")
    mutate(body)
    with pytest.raises(ValueError):
        Identity.from_whois(body)


def test_from_whois_rejects_non_object() -> None:
    with pytest.raises(ValueError):
        Identity.from_whois("x")


def test_builders_produce_parseable_bodies() -> None:
    who = Identity.from_whois(user_peer("100.90.1.2", "bob@example.com", "bob-pc"))
    assert who.login == "bob@example.com" and who.node_host == "bob-pc"
    assert who.addresses[0] == "100.90.1.2" and who.addresses[1].startswith("fd7a:115c:a1e0::")
    tagged = Identity.from_whois(tagged_peer("100.90.1.3", ["tag:a", "tag:b"]))
    assert tagged.principal == "tag:a,tag:b" and tagged.login is None


# ---- cache keys --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "port", "key"),
    [
        ("100.101.102.103", 5000, "100.101.102.103"),
        ("100.101.102.103", 6000, "100.101.102.103"),
        ("::ffff:100.101.102.103", 5000, "100.101.102.103"),
        ("fd7a:115c:a1e0::d401:6667", 5000, "fd7a:115c:a1e0::d401:6667"),
        ("127.0.0.1", 5000, "127.0.0.1:5000"),
        ("127.1.2.3", 5000, "127.1.2.3:5000"),
        ("::ffff:127.0.0.1", 5000, "127.0.0.1:5000"),
        ("::1", 5000, "[::1]:5000"),
    ],
)
def test_cache_key(ip: str, port: int, key: str) -> None:
    assert cache_key(ip, port) == key


@pytest.mark.parametrize(
    ("ip", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.5", True), ("100.64.0.1", False)],
)
def test_is_loopback(ip: str, loopback: bool) -> None:
    assert is_loopback(ip) is loopback


# ---- the cache -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemorySource:
    """An IdentitySource answering from a dict; ``gate`` holds every call until set."""

    def __init__(self, answers: dict[str, Identity | Exception]) -> None:
        self.answers = answers
        self.calls: Counter[str] = Counter()
        self.seen: list[tuple[str, int]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def whois(self, ip: str, port: int) -> Identity:
        self.calls[ip] += 1
        self.seen.append((ip, port))
        await self.gate.wait()
        answer = self.answers.get(ip.removeprefix("::ffff:"), PeerNotFound("no match"))
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def source() -> MemorySource:
    return MemorySource(
        {
            "100.101.102.103": ALICE,
            "100.88.12.34": CI,
            "127.0.0.1": ALICE,
            "100.99.0.9": LocalAPIUnavailable("tailscaled answered 503: no backend"),
        }
    )


@pytest.fixture
def cache(source: MemorySource, clock: FakeClock) -> IdentityCache:
    return IdentityCache(source, ttl=60.0, clock=clock)


async def test_miss_then_hit(cache: IdentityCache, source: MemorySource) -> None:
    assert cache.get("100.101.102.103") is None
    assert await cache.lookup("100.101.102.103", 5000) is ALICE
    assert cache.get("100.101.102.103") is ALICE
    assert await cache.lookup("100.101.102.103", 6000) is ALICE  # port never in the key
    assert source.calls == {"100.101.102.103": 1}
    assert (cache.hits, cache.misses, cache.errors) == (2, 1, 0)
    assert len(cache) == 1


async def test_ttl_expiry(cache: IdentityCache, source: MemorySource, clock: FakeClock) -> None:
    await cache.lookup("100.101.102.103", 1)
    clock.now += 59.9
    assert cache.get("100.101.102.103") is ALICE
    clock.now += 0.2
    assert cache.get("100.101.102.103") is None
    await cache.lookup("100.101.102.103", 1)
    assert source.calls["100.101.102.103"] == 2


async def test_single_flight(cache: IdentityCache, source: MemorySource) -> None:
    source.gate.clear()
    waiters = [asyncio.ensure_future(cache.lookup("100.101.102.103", p)) for p in range(20)]
    await asyncio.sleep(0.01)
    assert source.calls == {"100.101.102.103": 1}
    source.gate.set()
    assert all(who is ALICE for who in await asyncio.gather(*waiters))
    assert source.calls == {"100.101.102.103": 1}
    assert cache.misses == 1


async def test_failures_reach_every_waiter_and_are_not_cached(
    cache: IdentityCache, source: MemorySource
) -> None:
    source.gate.clear()
    waiters = [asyncio.ensure_future(cache.lookup("100.99.0.9", 1)) for _ in range(5)]
    waiters += [asyncio.ensure_future(cache.lookup("100.1.1.1", 1)) for _ in range(5)]
    await asyncio.sleep(0.01)
    source.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, LocalAPIUnavailable) for r in results[:5])
    assert all(isinstance(r, PeerNotFound) for r in results[5:])
    assert cache.errors == 2 and len(cache) == 0
    assert cache.get("100.99.0.9") is None
    with pytest.raises(LocalAPIUnavailable):
        await cache.lookup("100.99.0.9", 1)
    assert source.calls == {"100.99.0.9": 2, "100.1.1.1": 1}


async def test_v4_mapped_peer_shares_the_plain_entry(
    cache: IdentityCache, source: MemorySource
) -> None:
    await cache.lookup("::ffff:100.101.102.103", 1)
    assert cache.get("100.101.102.103") is ALICE
    assert cache.get("::ffff:100.101.102.103") is ALICE
    await cache.lookup("100.101.102.103", 2)
    assert sum(source.calls.values()) == 1


async def test_loopback_is_keyed_by_port_and_forgotten(
    cache: IdentityCache, source: MemorySource
) -> None:
    assert await cache.lookup("127.0.0.1", 40001) is ALICE
    assert await cache.lookup("127.0.0.1", 40002) is ALICE
    assert source.seen == [("127.0.0.1", 40001), ("127.0.0.1", 40002)]
    assert cache.get("127.0.0.1", 40001) is ALICE
    assert cache.get("127.0.0.1") is None  # a loopback IP alone identifies nobody
    cache.forget(cache_key("127.0.0.1", 40001))
    assert cache.get("127.0.0.1", 40001) is None
    assert cache.get("127.0.0.1", 40002) is ALICE
    cache.forget("not-there")


async def test_loopback_miss_is_no_identity(cache: IdentityCache, source: MemorySource) -> None:
    # A local process (not a proxied tailnet peer): PeerNotFound, never cached.
    with pytest.raises(PeerNotFound):
        await cache.lookup("::1", 40003)
    with pytest.raises(PeerNotFound):
        await cache.lookup("::1", 40003)
    assert source.calls["::1"] == 2 and len(cache) == 0


async def test_flush(cache: IdentityCache, source: MemorySource) -> None:
    await cache.lookup("100.101.102.103", 1)
    await cache.lookup("100.88.12.34", 1)
    cache.flush()
    assert cache.get("100.101.102.103") is None and len(cache) == 0
    assert cache.flushes == 1
    await cache.lookup("100.101.102.103", 1)
    assert source.calls["100.101.102.103"] == 2


async def test_answer_in_flight_across_a_flush_is_not_stored(
    cache: IdentityCache, source: MemorySource
) -> None:
    source.gate.clear()
    before = asyncio.ensure_future(cache.lookup("100.101.102.103", 1))
    await asyncio.sleep(0.01)
    cache.flush()
    # A lookup after the flush does not join the stale call.
    after = asyncio.ensure_future(cache.lookup("100.101.102.103", 1))
    await asyncio.sleep(0.01)
    assert source.calls["100.101.102.103"] == 2
    source.gate.set()
    assert await before is ALICE and await after is ALICE
    assert len(cache) == 1  # only the post-flush answer


async def test_a_cancelled_waiter_does_not_cancel_the_others(
    cache: IdentityCache, source: MemorySource
) -> None:
    source.gate.clear()
    first = asyncio.ensure_future(cache.lookup("100.101.102.103", 1))
    second = asyncio.ensure_future(cache.lookup("100.101.102.103", 2))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0)
    source.gate.set()
    assert await second is ALICE
    assert first.cancelled()
    assert cache.get("100.101.102.103") is ALICE


async def test_all_waiters_cancelled_still_completes_quietly(
    cache: IdentityCache, source: MemorySource
) -> None:
    source.gate.clear()
    only = asyncio.ensure_future(cache.lookup("100.99.0.9", 1))
    await asyncio.sleep(0.01)
    only.cancel()
    source.gate.set()
    await asyncio.sleep(0.01)
    assert cache.errors == 1  # the failure was consumed, not left unretrieved


async def test_bounded_size(source: MemorySource, clock: FakeClock) -> None:
    for i in range(10):
        source.answers[f"100.90.0.{i}"] = ALICE
    cache = IdentityCache(source, ttl=10.0, clock=clock, max_entries=4)
    for i in range(10):
        await cache.lookup(f"100.90.0.{i}", 1)
        clock.now += 1
    assert len(cache) == 4
    assert cache.get("100.90.0.9") is ALICE and cache.get("100.90.0.0") is None


async def test_aclose_cancels_in_flight(cache: IdentityCache, source: MemorySource) -> None:
    source.gate.clear()
    waiter = asyncio.ensure_future(cache.lookup("100.101.102.103", 1))
    await asyncio.sleep(0.01)
    await cache.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiter


def test_bad_cache_parameters(source: MemorySource) -> None:
    with pytest.raises(ValueError):
        IdentityCache(source, ttl=-1)
    with pytest.raises(ValueError):
        IdentityCache(source, max_entries=0)


async def test_ttl_zero_never_stores(source: MemorySource) -> None:
    """cacheTtl 0 means no cache: every lookup asks the source, nothing is kept."""
    cache = IdentityCache(source, ttl=0)
    ip = "100.101.102.103"
    first = await cache.lookup(ip, 1)
    assert cache.get(ip) is None
    assert len(cache) == 0
    second = await cache.lookup(ip, 2)
    assert first == second == ALICE
    assert source.calls[ip] == 2


# ---- IPN bus classification ---------------------------------------------------------------


def test_classify_the_sample_stream() -> None:
    lines = load_sample("watch_ipn_bus_mask2_linux_v1.102.ndjson")
    assert [classify_notify(line) for line in lines] == [
        (True, 6),  # initial State
        (True, None),  # SelfChange
        (True, None),  # bare line
        (False, None),  # Engine only
        (False, None),  # Health only
        (True, 2),  # State -> NeedsLogin
    ]
    assert BACKEND_STATES[6] == "Running" and BACKEND_STATES[2] == "NeedsLogin"


@pytest.mark.parametrize(
    ("fields", "flush"),
    [
        ({}, True),
        ({"NetMap": {"Peers": []}}, True),
        ({"PeersChanged": [{"ID": 1}]}, True),
        ({"PeersRemoved": [1]}, True),
        ({"PeerChangedPatch": [{"NodeID": 1}]}, True),
        ({"SelfChange": {"ID": 1}}, True),
        ({"State": 0}, True),
        ({"Engine": {"RBytes": 1}}, False),
        ({"Health": {"Warnings": None}}, False),
        ({"Engine": {"RBytes": 1}, "Health": {}}, False),
        ({"Prefs": {"WantRunning": True}}, False),
        ({"BrowseToURL": "https://login.tailscale.com/a/x"}, False),
    ],
)
def test_classify_notify(fields: dict[str, Any], flush: bool) -> None:
    assert classify_notify(notify_line(**fields))[0] is flush
    # A newer daemon may omit the null fields entirely: the same answer.
    assert classify_notify({"Version": "1.102.3", **fields})[0] is flush


# ---- monitor, with an in-memory status source ------------------------------------------------


class StaticStatus:
    """A StatusSource whose bus never yields and whose status is whatever we set."""

    def __init__(self, status: Status | Exception) -> None:
        self.status_value = status

    async def status(self, peers: bool = True) -> Status:
        if isinstance(self.status_value, Exception):
            raise self.status_value
        return self.status_value

    async def watch_ipn_bus(self, mask: int) -> AsyncGenerator[dict[str, Any], None]:
        await asyncio.Event().wait()
        yield {}  # pragma: no cover


NOW = datetime(2026, 8, 1, 12, 0, tzinfo=UTC)


def _monitor(status: Status | Exception, **kwargs: Any) -> TailscaleMonitor:
    return TailscaleMonitor(StaticStatus(status), now=lambda: NOW, **kwargs)


def _running(**kwargs: Any) -> Status:
    return Status(backend_state="Running", tailscale_ips=("100.64.0.1",), **kwargs)


async def test_health_before_first_poll() -> None:
    health = _monitor(_running()).health()
    assert health["running"] is False and health["state"] is None
    assert health["warning"] == "tailscale status not polled yet"


async def test_health_running_key_far_away() -> None:
    monitor = _monitor(_running(key_expiry=NOW + timedelta(days=90)))
    await monitor.poll()
    health = monitor.health()
    assert health["running"] is True and health["warning"] is None
    assert health["key_expiry"] == "2026-10-30T12:00:00Z"
    assert health["key_expiry_days_left"] == 90
    assert health["tailscale_ips"] == ["100.64.0.1"]


@pytest.mark.parametrize(
    ("days", "warn_days", "warning"),
    [
        (13.5, 14, "node key expires in 13 days (2026-08-15T00:00:00Z)"),
        (2.5, 3, "node key expires in 2 days (2026-08-04T00:00:00Z)"),
        (5, 3, None),
        (-1, 14, "node key expired at 2026-07-31T12:00:00Z"),
    ],
)
async def test_health_key_expiry_warning(days: float, warn_days: int, warning: str | None) -> None:
    monitor = _monitor(
        _running(key_expiry=NOW + timedelta(days=days)), key_expiry_warn_days=warn_days
    )
    await monitor.poll()
    assert monitor.health()["warning"] == warning


async def test_health_no_key_expiry_and_expired_flag() -> None:
    monitor = _monitor(_running())
    await monitor.poll()
    assert monitor.health()["key_expiry"] is None and monitor.health()["warning"] is None
    monitor = _monitor(_running(expired=True))
    await monitor.poll()
    assert monitor.health()["warning"] == "node key expired"


async def test_health_not_running_and_unreachable() -> None:
    monitor = _monitor(Status(backend_state="NeedsLogin"))
    await monitor.poll()
    health = monitor.health()
    assert health["running"] is False and health["state"] == "NeedsLogin"
    assert health["warning"] == "tailscale is NeedsLogin, not Running"
    down = _monitor(LocalAPIUnavailable("tailscaled socket /x missing"))
    await down.poll()
    assert down.health()["warning"] == "tailscaled unreachable: tailscaled socket /x missing"
    assert down.last_error == "tailscaled socket /x missing"


async def test_poll_callbacks_fire_on_change_only_and_survive_errors() -> None:
    seen: list[tuple[str, Any]] = []

    async def on_addresses(ips: list[str]) -> None:
        seen.append(("ips", ips))
        raise RuntimeError("a broken callback")

    source = StaticStatus(Status(backend_state="NeedsLogin"))
    monitor = TailscaleMonitor(
        source, on_addresses=on_addresses, on_state=lambda s: seen.append(("state", s))
    )
    await monitor.poll()
    await monitor.poll()
    source.status_value = _running(peer_paths={"100.101.102.103": "direct"})
    await monitor.poll()
    await monitor.poll()
    assert seen == [("state", "NeedsLogin"), ("state", "Running"), ("ips", ["100.64.0.1"])]
    assert monitor.peer_paths == {"100.101.102.103": "direct"}


async def test_monitor_start_stop() -> None:
    monitor = _monitor(_running())
    monitor.start()
    with pytest.raises(RuntimeError):
        monitor.start()
    async with asyncio.timeout(2):
        while not monitor.polls:
            await asyncio.sleep(0.005)
    await monitor.stop()
    assert monitor.running
