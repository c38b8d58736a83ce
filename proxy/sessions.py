"""Login sessions for browsers, which cannot put a header on a WebSocket.

A session id is 256 random bits held only by the browser in an HttpOnly cookie; the
server keeps its SHA-256 digest, the name of the token that opened it, and an expiry.
Sessions are revocable: removing or revoking the token ends every session it opened.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Container
from dataclasses import dataclass

__all__ = ["Session", "SessionStore"]


@dataclass(frozen=True, slots=True)
class Session:
    token_name: str
    expires: float  # wall clock


class SessionStore:
    def __init__(self, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self._clock = clock
        self._by_digest: dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self._by_digest)

    def create(self, token_name: str) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(token_name, self._clock() + self.ttl)
        if len(self._by_digest) > 10000:
            self.expire()
        self._by_digest[hashlib.sha256(sid.encode()).digest()] = session
        return sid, session

    def get(self, sid: str) -> Session | None:
        # The dict is keyed by a digest of the secret, so lookup timing says nothing
        # useful about the secret itself.
        key = hashlib.sha256(sid.encode("utf-8", "surrogateescape")).digest()
        session = self._by_digest.get(key)
        if session is None:
            return None
        if session.expires <= self._clock():
            del self._by_digest[key]
            return None
        return session

    def delete(self, sid: str) -> None:
        self._by_digest.pop(hashlib.sha256(sid.encode("utf-8", "surrogateescape")).digest(), None)

    def revoke_missing(self, valid_names: Container[str]) -> int:
        """Drop sessions whose token no longer exists; return how many."""
        dead = [k for k, s in self._by_digest.items() if s.token_name not in valid_names]
        for k in dead:
            del self._by_digest[k]
        return len(dead)

    def expire(self) -> None:
        now = self._clock()
        for k in [k for k, s in self._by_digest.items() if s.expires <= now]:
            del self._by_digest[k]
