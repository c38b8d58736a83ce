"""Login sessions and failed-login lockouts: the state a browser's cookie and a lockout
depend on, in one process (this module) or shared by every worker (``shared_state``).

A session id is 256 random bits held only by the browser in an HttpOnly cookie; the
store keeps its SHA-256 digest (never the id), the name and the digest of the secret that
opened it (its *binding*), and an expiry. A session is valid only while that very secret
is still configured: revoking a token, or re-creating it under the same name, or rotating
the gateway token, ends every session it opened. Lockouts count failed authentications
per key: the Tailscale node when whois named one, else the source address; loopback peers
without an identity share one key of their own, so under userspace networking (every
tailnet peer is 127.0.0.1) one peer never locks out the others.

Everything here is pure (clock injected, no I/O) and table-tested in tests/unit.
"""

from __future__ import annotations

import collections
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "MAX_FAILURE_KEYS",
    "MAX_SESSIONS",
    "LOCAL_LOCKOUT_KEY",
    "LockoutTable",
    "LockoutTableLike",
    "Session",
    "SessionStore",
    "SessionStoreLike",
    "StoreUnavailable",
    "lockout_key",
    "new_session_id",
    "session_key",
]

MAX_SESSIONS = 10000
MAX_FAILURE_KEYS = 100000
# Loopback peers whois could not name (local processes): one key, never the tailnet's.
LOCAL_LOCKOUT_KEY = "local"


class StoreUnavailable(Exception):
    """The shared store cannot be read or written (a login is answered 503)."""


@dataclass(frozen=True, slots=True)
class Session:
    token_name: str
    binding: bytes  # SHA-256 digest of the secret that opened the session
    expires: float  # wall clock


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


def session_key(sid: str) -> bytes:
    """What the store is keyed by: the SHA-256 digest of the id, never the id."""
    return hashlib.sha256(sid.encode("utf-8", "surrogateescape")).digest()


def lockout_key(peer_ip: str, identity: Any, loopback: bool) -> str:
    """Whom failed authentications count against.

    The Tailscale node (its StableID) when whois named one, whatever address it came
    from; else the source address; a loopback peer without an identity is a local
    process (or an unidentified userspace-networking peer): one shared "local" key, so
    it can never lock out the tailnet peers that also arrive from 127.0.0.1.
    """
    if identity is not None:
        return f"node:{identity.node_id}"
    if loopback:
        return LOCAL_LOCKOUT_KEY
    return f"ip:{peer_ip}"


class SessionStoreLike(Protocol):
    ttl: float

    def __len__(self) -> int: ...
    def create(self, token_name: str, binding: bytes) -> tuple[str, bytes, Session]: ...
    def get(self, key: bytes) -> Session | None: ...
    def delete(self, key: bytes) -> bool: ...
    def revoke_unbound(self, still_bound: Callable[[Session], bool]) -> int: ...
    def expire(self) -> None: ...


class LockoutTableLike(Protocol):
    def __len__(self) -> int: ...  # lockouts in force (maybe some just expired)
    def locked(self, key: str) -> float: ...
    def fail(self, key: str, *, count: int, window: float, lockout: float) -> bool: ...
    def expire(self) -> None: ...


class SessionStore:
    """The in-process store (``workers: 1``): a dict keyed by the id's digest."""

    def __init__(
        self, ttl: float, clock: Callable[[], float] = time.time, max_sessions: int = MAX_SESSIONS
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        self._max = max_sessions
        self._by_key: dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def create(self, token_name: str, binding: bytes) -> tuple[str, bytes, Session]:
        sid = new_session_id()
        key = session_key(sid)
        session = Session(token_name, binding, self._clock() + self.ttl)
        if len(self._by_key) >= self._max:
            self.expire()
            while len(self._by_key) >= self._max:
                # Bounded: the session closest to its end makes room.
                del self._by_key[min(self._by_key, key=lambda k: self._by_key[k].expires)]
        self._by_key[key] = session
        return sid, key, session

    def get(self, key: bytes) -> Session | None:
        # Keyed by a digest of the secret: lookup timing says nothing useful about it.
        session = self._by_key.get(key)
        if session is None:
            return None
        if session.expires <= self._clock():
            del self._by_key[key]
            return None
        return session

    def delete(self, key: bytes) -> bool:
        return self._by_key.pop(key, None) is not None

    def revoke_unbound(self, still_bound: Callable[[Session], bool]) -> int:
        """Drop sessions whose secret is no longer configured; return how many."""
        dead = [k for k, s in self._by_key.items() if not still_bound(s)]
        for k in dead:
            del self._by_key[k]
        return len(dead)

    def expire(self) -> None:
        now = self._clock()
        for k in [k for k, s in self._by_key.items() if s.expires <= now]:
            del self._by_key[k]


class LockoutTable:
    """In-process failed-authentication counters (``workers: 1``).

    A sliding window: ``count`` failures within ``window`` seconds lock the key out for
    ``lockout`` seconds (0: never). The clock is monotonic.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_keys: int = MAX_FAILURE_KEYS
    ) -> None:
        self._clock = clock
        self._max = max_keys
        self._failures: dict[str, collections.deque[float]] = {}
        self._until: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._until)

    def locked(self, key: str) -> float:
        """Seconds left of the key's lockout, 0.0 when it is not locked out."""
        until = self._until.get(key)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left > 0:
            return left
        del self._until[key]
        return 0.0

    def fail(self, key: str, *, count: int, window: float, lockout: float) -> bool:
        """Count one failure; True when it starts a lockout."""
        now = self._clock()
        q = self._failures.get(key)
        if q is None:
            if len(self._failures) >= self._max:
                self._failures.clear()  # bounded; an attacker spraying keys resets counts
            q = self._failures[key] = collections.deque()
        q.append(now)
        while q and q[0] < now - window:
            q.popleft()
        if len(q) >= count and lockout > 0:
            self._until[key] = now + lockout
            del self._failures[key]
            return True
        return False

    def expire(self) -> None:
        now = self._clock()
        for k in [k for k, t in self._until.items() if t <= now]:
            del self._until[k]
        for k in [k for k, q in self._failures.items() if not q or q[-1] < now - 86400]:
            del self._failures[k]
