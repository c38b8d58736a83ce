"""Login sessions and lockouts as pure logic: validity, binding, expiry, bounds, keys.

The in-process store (``workers: 1``) and the shared one (``workers > 1``, two handles on
one directory standing for two workers) are held to the same table; the shared store's
cost on the request path is measured against the in-process one.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.authz import GATEWAY_TOKEN_NAME, Authorizer, Grant
from proxy.config import parse_config
from proxy.core.sessions import (
    LOCAL_LOCKOUT_KEY,
    LockoutTable,
    SessionStore,
    lockout_key,
    session_key,
)
from proxy.core.tokens import Credential, TokenEntry, TokenSet, digest
from proxy.shared_state import SharedState, create_state
from proxy.tailscale import Identity


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ident(node_id: str = "nAL1CE1CNTRL", login: str | None = "alice@example.com") -> Identity:
    return Identity(
        login=login,
        display_name=None,
        profile_pic=None,
        node_name="n",
        node_host="n",
        node_id=node_id,
    )


# ---------------------------------------------------------------------- lockout keys


@pytest.mark.parametrize(
    ("ip", "identity", "loopback", "key"),
    [
        ("100.101.102.103", None, False, "ip:100.101.102.103"),
        ("fd7a:115c:a1e0::1", None, False, "ip:fd7a:115c:a1e0::1"),
        # Known identity: the node, whatever address it came from.
        ("100.101.102.103", ident(), False, "node:nAL1CE1CNTRL"),
        ("127.0.0.1", ident(), True, "node:nAL1CE1CNTRL"),
        ("127.0.0.1", ident("nB0B"), True, "node:nB0B"),
        ("::1", ident("nCI", login=None), True, "node:nCI"),
        # Loopback without an identity: the local key, never the tailnet peers' keys.
        ("127.0.0.1", None, True, LOCAL_LOCKOUT_KEY),
        ("::1", None, True, LOCAL_LOCKOUT_KEY),
    ],
)
def test_lockout_key(ip: str, identity: Any, loopback: bool, key: str) -> None:
    assert lockout_key(ip, identity, loopback) == key


def test_userspace_peers_have_distinct_lockout_keys() -> None:
    keys = {lockout_key("127.0.0.1", i, True) for i in (ident("a"), ident("b"), None)}
    assert len(keys) == 3


# ---------------------------------------------------------------------- stores


@pytest.fixture
def state_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="cg-state-")
    os.chmod(d, 0o700)
    create_state(d)
    try:
        yield d
    finally:
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)


def _stores(
    kind: str, d: str, wall: Clock, mono: Clock, ttl: float = 60.0
) -> tuple[Any, Any, Any, Any, list[SharedState]]:
    """(sessions A, sessions B, lockouts A, lockouts B): B is another worker's view."""
    if kind == "memory":
        s, lk = SessionStore(ttl, clock=wall), LockoutTable(clock=mono)
        return s, s, lk, lk, []
    a = SharedState(d, ttl, wall=wall, mono=mono)
    b = SharedState(d, ttl, wall=wall, mono=mono)
    return a.sessions, b.sessions, a.lockouts, b.lockouts, [a, b]


KINDS = ["memory", "shared"]


@pytest.mark.parametrize("kind", KINDS)
def test_sessions_create_get_expire_delete(kind: str, state_dir: str) -> None:
    wall, mono = Clock(), Clock()
    sa, sb, _, _, handles = _stores(kind, state_dir, wall, mono)
    sid, key, sess = sa.create("phone", digest("secret-1"))
    assert key == session_key(sid) and len(sid) >= 43
    assert sess.binding == digest("secret-1") and sess.expires == wall.t + 60
    for s in (sa, sb):  # the other worker sees it at once
        got = s.get(key)
        assert got is not None and got.token_name == "phone"
    assert sa.get(session_key(sid + "x")) is None
    # Only the digest is stored, never the id.
    if handles:
        raw = b"".join(Path(state_dir, n).read_bytes() for n in os.listdir(state_dir))
        assert sid.encode() not in raw and key in raw
    wall.t += 60
    assert sa.get(key) is None and sb.get(key) is None
    sid2, key2, _ = sa.create("phone", digest("secret-1"))
    assert sb.get(key2) is not None  # cached in B now
    assert sa.delete(key2) is True
    assert sb.get(key2) is None  # B's memory is dropped by the epoch
    assert sa.delete(key2) is False
    for h in handles:
        h.close()


@pytest.mark.parametrize("kind", KINDS)
def test_sessions_revoke_unbound(kind: str, state_dir: str) -> None:
    wall, mono = Clock(), Clock()
    sa, sb, _, _, handles = _stores(kind, state_dir, wall, mono)
    _, k1, _ = sa.create("phone", digest("old"))
    _, k2, _ = sa.create("phone", digest("new"))
    _, k3, _ = sa.create(GATEWAY_TOKEN_NAME, digest("gw"))
    assert sb.get(k1) is not None  # cached by the other worker
    assert sa.revoke_unbound(lambda s: s.binding != digest("old")) == 1
    assert sb.get(k1) is None and sb.get(k2) is not None and sb.get(k3) is not None
    for h in handles:
        h.close()


@pytest.mark.parametrize("kind", KINDS)
def test_sessions_bounded(kind: str, state_dir: str) -> None:
    wall, mono = Clock(), Clock()
    if kind == "memory":
        s: Any = SessionStore(60, clock=wall, max_sessions=5)
        handles: list[SharedState] = []
    else:
        h = SharedState(state_dir, 60, wall=wall, mono=mono)
        h.sessions._max = 5  # noqa: SLF001 - a small bound for the test
        s, handles = h.sessions, [h]
    keys = []
    for i in range(8):
        wall.t += 1
        keys.append(s.create("phone", digest(f"t{i}"))[1])
    assert len(s) == 5
    assert [s.get(k) is not None for k in keys] == [False] * 3 + [True] * 5
    for h in handles:
        h.close()


# ---------------------------------------------------------------------- lockouts


@pytest.mark.parametrize("kind", KINDS)
def test_lockout_after_exactly_count_failures_across_workers(kind: str, state_dir: str) -> None:
    wall, mono = Clock(), Clock()
    _, _, la, lb, handles = _stores(kind, state_dir, wall, mono)
    started = []
    for i in range(5):  # alternating workers: one counter
        table = la if i % 2 else lb
        assert table.locked("node:a") == 0.0
        started.append(table.fail("node:a", count=5, window=60, lockout=300))
        mono.t += 1
    assert started == [False] * 4 + [True]
    assert la.locked("node:a") == pytest.approx(299) and lb.locked("node:a") > 298
    assert la.locked("node:b") == 0.0 and la.locked("ip:100.101.102.103") == 0.0
    mono.t += 299
    assert la.locked("node:a") == 0.0 and lb.locked("node:a") == 0.0
    la.expire()
    # The count starts over after a lockout.
    assert not any(la.fail("node:a", count=5, window=60, lockout=300) for _ in range(4))
    for h in handles:
        h.close()


@pytest.mark.parametrize("kind", KINDS)
def test_lockout_window_slides_and_zero_never_locks(kind: str, state_dir: str) -> None:
    wall, mono = Clock(), Clock()
    _, _, la, lb, handles = _stores(kind, state_dir, wall, mono)
    for _ in range(4):
        assert not la.fail("k", count=3, window=10, lockout=30)
        mono.t += 6  # each failure outside the window of the one two before it
    assert lb.locked("k") == 0.0
    assert not any(lb.fail("z", count=1, window=10, lockout=0) for _ in range(5))
    assert la.locked("z") == 0.0
    for h in handles:
        h.close()


def test_shared_failures_bounded(state_dir: str) -> None:
    h = SharedState(state_dir, 60, wall=Clock(), mono=Clock())
    h.lockouts._max = 10  # noqa: SLF001
    for i in range(12):
        h.lockouts.fail(f"ip:10.0.0.{i}", count=5, window=60, lockout=300)
    h.lockouts.expire()
    assert h.db.execute("SELECT count(*) FROM failures").fetchone()[0] == 0
    h.close()


# In-process only: the shared store's counts skip what has expired, the in-process ones
# hold an entry until a lookup or expire() drops it.


@pytest.mark.parametrize(
    ("ages", "advance", "left"),
    [
        ((), 100, 0),
        ((0, 0, 0), 59, 3),
        ((0, 0, 0), 60, 0),  # a session ends at exactly its ttl
        ((0, 10, 20), 65, 2),
        ((0, 10, 20), 75, 1),
        ((0, 10, 20), 80, 0),
    ],
)
def test_memory_sessions_expire_drops_ended_sessions(
    ages: tuple[int, ...], advance: int, left: int
) -> None:
    wall = Clock()
    s = SessionStore(60, clock=wall)
    start = wall.t
    keys = []
    for age in ages:
        wall.t = start + age
        keys.append(s.create("phone", digest("secret"))[1])
    wall.t = start + advance
    s.expire()
    assert len(s) == left
    assert [s.get(k) is not None for k in keys] == [a + 60 > advance for a in ages]


@pytest.mark.parametrize(
    ("advance", "locked_after"),
    [(299, 1), (300, 0), (1000, 0)],
)
def test_memory_lockouts_expire_drops_ended_lockouts(advance: int, locked_after: int) -> None:
    mono = Clock()
    lk = LockoutTable(clock=mono)
    assert lk.fail("node:a", count=1, window=60, lockout=300)
    mono.t += advance
    lk.expire()
    assert len(lk) == locked_after


@pytest.mark.parametrize(
    ("gap", "locks"),
    [
        (3600, True),  # inside a (long) window: the second failure counts
        (86400, True),
        (86401, False),  # older than a day: expire() forgot the first failure
    ],
)
def test_memory_lockouts_expire_forgets_failures_older_than_a_day(gap: int, locks: bool) -> None:
    mono = Clock()
    lk = LockoutTable(clock=mono)
    window = 2 * 86400
    assert not lk.fail("ip:100.101.102.103", count=2, window=window, lockout=30)
    mono.t += gap
    lk.expire()
    assert lk.fail("ip:100.101.102.103", count=2, window=window, lockout=30) is locks


@pytest.mark.parametrize(
    ("keys", "locks"),
    [
        (["a", "b"], True),  # under the bound: a's first failure is remembered
        (["a", "b", "c"], True),  # exactly at the bound, a's counter is still there
        (["a", "b", "c", "d"], False),  # d finds the table full: every count starts over
    ],
)
def test_memory_failure_keys_are_bounded(keys: list[str], locks: bool) -> None:
    lk = LockoutTable(clock=Clock(), max_keys=3)
    for k in keys:
        assert not lk.fail(k, count=2, window=60, lockout=30)
    assert lk.fail("a", count=2, window=60, lockout=30) is locks


def test_state_dir_must_be_private(tmp_path: Path) -> None:
    from proxy.core.sessions import StoreUnavailable

    d = tmp_path / "open"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    with pytest.raises(StoreUnavailable):
        create_state(str(d))


def test_shared_lookup_cost_is_off_the_query_path(state_dir: str) -> None:
    """A known session and a lockout check: one mmap read and a dict lookup, measured."""
    mem = SessionStore(60)
    sh = SharedState(state_dir, 60)
    _, mk, _ = mem.create("phone", digest("x"))
    _, sk, _ = sh.sessions.create("phone", digest("x"))
    memlk = LockoutTable()
    n = 20000

    def per_call(fn: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    costs = {
        "memory get": per_call(lambda: mem.get(mk)),
        "shared get": per_call(lambda: sh.sessions.get(sk)),
        "memory locked": per_call(lambda: memlk.locked("ip:100.101.102.103")),
        "shared locked": per_call(lambda: sh.lockouts.locked("ip:100.101.102.103")),
    }

    def uncached() -> None:
        sh.sessions.cache.clear()
        sh.sessions.get(sk)

    costs["shared get (query)"] = per_call(uncached)
    print({k: f"{v * 1e6:.2f} us" for k, v in costs.items()})
    assert costs["shared get"] < 5e-6 and costs["shared locked"] < 5e-6
    sh.close()


# ---------------------------------------------------------------------- binding


def _authz(tokens: dict[str, str], gateway: str | None) -> Authorizer:
    cfg = parse_config({"log": {"access": "off"}, "gateway": {"host": "127.0.0.1", "port": 8443}})
    ts = TokenSet(TokenEntry(n, digest(t)) for n, t in tokens.items())
    return Authorizer(
        cfg,
        ts,
        SessionStore(60),
        identity=None,
        identity_present=False,
        gateway_token=gateway.encode() if gateway else None,
    )


BEFORE = {"phone": "p-secret-1", "laptop": "l-secret-1"}


@pytest.mark.parametrize(
    ("opened_by", "name", "after_tokens", "after_gw", "valid"),
    [
        ("p-secret-1", "phone", BEFORE, "gw-1", True),
        ("p-secret-1", "phone", {"laptop": "l-secret-1"}, "gw-1", False),  # revoked
        # Revoked and re-created under the same name: a different secret, so not valid.
        ("p-secret-1", "phone", {"phone": "p-secret-2", "laptop": "l-secret-1"}, "gw-1", False),
        # Renamed: the secret is there, the name is not the one the session was opened as.
        ("p-secret-1", "phone", {"tablet": "p-secret-1"}, "gw-1", False),
        ("gw-1", GATEWAY_TOKEN_NAME, BEFORE, "gw-1", True),
        ("gw-1", GATEWAY_TOKEN_NAME, BEFORE, "gw-2", False),  # rotated
        ("gw-1", GATEWAY_TOKEN_NAME, BEFORE, None, False),  # removed
        # A static token holding the gateway's old value does not keep a gateway session.
        ("gw-1", GATEWAY_TOKEN_NAME, {"gw-1-copy": "gw-1"}, None, False),
    ],
)
def test_session_valid_only_while_its_secret_is_configured(
    opened_by: str, name: str, after_tokens: dict[str, str], after_gw: str | None, valid: bool
) -> None:
    authz = _authz(after_tokens, after_gw)
    assert (authz.bound_name(digest(opened_by)) == name) is valid


def _grant(cred: Credential) -> Grant:
    from proxy.core.policy import Decision

    return Grant(Decision(True, 200, "ok"), credential=cred)


@pytest.mark.parametrize(
    ("cred", "gw_after", "tokens_after", "why"),
    [
        (Credential("token", "phone", binding=digest("p-secret-1")), "gw-1", BEFORE, None),
        (
            Credential("token", "phone", binding=digest("p-secret-1")),
            "gw-1",
            {"phone": "p-secret-2"},
            "token phone revoked",
        ),
        (
            Credential("gateway-token", GATEWAY_TOKEN_NAME, binding=digest("gw-1")),
            "gw-1",
            BEFORE,
            None,
        ),
        (
            Credential("gateway-token", GATEWAY_TOKEN_NAME, binding=digest("gw-1")),
            "gw-2",
            BEFORE,
            "token gateway-token revoked",
        ),
        # A tunnel admitted by the first-frame gate carries the verified secret's digest.
        (
            Credential(
                "gateway-token", f"{GATEWAY_TOKEN_NAME} (first frame)", binding=digest("gw-1")
            ),
            None,
            BEFORE,
            "token gateway-token revoked",
        ),
        # Still waiting for its first frame: the gate checks the token in force then.
        (Credential("gateway-token", f"{GATEWAY_TOKEN_NAME} (first frame)"), "gw-2", BEFORE, None),
        # A token credential without a binding is never honoured.
        (Credential("token", "phone"), "gw-1", BEFORE, "token phone revoked"),
    ],
)
async def test_live_credential_recheck(
    cred: Credential, gw_after: str | None, tokens_after: dict[str, str], why: str | None
) -> None:
    import asyncio
    import dataclasses

    from proxy.runtime import Runtime

    cfg = parse_config(
        {
            "log": {"access": "off"},
            "gateway": {"host": "127.0.0.1", "port": 8443, "allowedNetworks": ["0.0.0.0/0"]},
        }
    )
    rt = Runtime(cfg, asyncio.get_running_loop())
    rt.snap = dataclasses.replace(rt.snap, authz=_authz(tokens_after, gw_after))

    class Conn:
        peer_ip = "100.101.102.103"

    assert rt.session_invalid_reason(Conn(), _grant(cred), time.time()) == why  # type: ignore[arg-type]
