"""Who may open one more connection: the accept-time limits and the connection counts.

One home for the refusals that depend on counts: draining, limits.maxConnections, the
descriptor budget, the source address's lockout, limits.perSourceIp,
limits.unauthenticatedPerIp (at accept) and limits.perIdentity (once a request is allowed).
Pure: the lockout table (in-process, or shared by every worker) is passed in, and its
clock is its own (proxy.core.sessions, clock injected). The caller counts refusals in its
metrics by the key each refusal names.
"""

from __future__ import annotations

import collections
from typing import Protocol

from .sessions import LockoutTableLike, lockout_key

__all__ = ["Admission", "Limits", "Refusal"]

# (metrics key or "" for none, HTTP status, short reason, Retry-After seconds or None)
Refusal = tuple[str, int, str, int | None]

_DRAINING: Refusal = ("", 503, "server shutting down", None)
_MAX: Refusal = ("max_connections", 503, "too many connections", None)
_FD: Refusal = ("fd_limit", 503, "too many connections (file descriptor limit)", None)
_PER_IP: Refusal = ("per_ip", 429, "too many connections from this address", 1)
_UNAUTH: Refusal = (
    "unauthenticated_per_ip",
    429,
    "too many unauthenticated connections from this address",
    1,
)
LOCKED_OUT = "too many failed authentications"
OVER_IDENTITY = "too many connections for this identity"


class Limits(Protocol):
    """The fields of config.LimitsConfig this module reads."""

    @property
    def max_connections(self) -> int: ...
    @property
    def per_source_ip(self) -> int: ...
    @property
    def unauthenticated_per_ip(self) -> int: ...
    @property
    def per_identity(self) -> int: ...


class Admission:
    """Live connections per source address (all, and not yet decided) and per principal."""

    __slots__ = ("per_ip", "unauth_per_ip", "per_identity")

    def __init__(self) -> None:
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.unauth_per_ip: collections.Counter[str] = collections.Counter()
        self.per_identity: collections.Counter[str] = collections.Counter()

    def admit(
        self,
        ip: str,
        lim: Limits,
        *,
        active: int,
        fd_cap: int,
        draining: bool,
        lockouts: LockoutTableLike,
        loopback: bool,
    ) -> Refusal | None:
        """A refusal, or None: then ``ip`` is counted (all, and undecided) until release."""
        if draining:
            return _DRAINING
        if active >= lim.max_connections:
            return _MAX
        if active >= fd_cap:
            return _FD
        if lockouts and not loopback:
            # At accept only the address is known: its own lockout (peers without an
            # identity). A node's lockout is checked once whois has named it.
            left = lockouts.locked(lockout_key(ip, None, False))
            if left > 0:
                return "locked_out", 429, LOCKED_OUT, int(left) + 1
        if self.per_ip[ip] >= lim.per_source_ip:
            return _PER_IP
        if self.unauth_per_ip[ip] >= lim.unauthenticated_per_ip:
            # Connections not decided yet (slowloris, scans, floods of bad tokens).
            return _UNAUTH
        self.per_ip[ip] += 1
        self.unauth_per_ip[ip] += 1
        return None

    def decided(self, ip: str) -> None:
        """A counted connection got its first allow: no longer unauthenticated."""
        _decrement(self.unauth_per_ip, ip)

    def admit_identity(self, key: str, counted: str | None, limit: int) -> bool:
        """Count a connection against principal ``key`` (moving it off ``counted``, the key
        it was counted against before); False, and nothing counted, when over ``limit``."""
        if key == counted:
            return True
        if self.per_identity[key] >= limit:
            return False
        if counted is not None:
            _decrement(self.per_identity, counted)
        self.per_identity[key] += 1
        return True

    def release(self, ip: str | None, identity: str | None) -> None:
        """A connection closed: ``ip`` when it was counted, its principal when counted."""
        if ip is not None:
            _decrement(self.per_ip, ip)
        if identity is not None:
            _decrement(self.per_identity, identity)


def _decrement(counter: collections.Counter[str], key: str) -> None:
    n = counter[key] - 1
    if n <= 0:
        counter.pop(key, None)  # dict.pop: Counter.__delitem__ is a Python-level call
    else:
        counter[key] = n
