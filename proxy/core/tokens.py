"""Static bearer tokens: generation, constant-time checks, extraction from a request.

The token file (proxy/keystore.py) holds only names and SHA-256 digests, never a token;
tokens are 256-bit random strings, so a fast hash is enough (no password stretching). A presented
token is hashed once and compared against every stored digest with
``hmac.compare_digest``, so timing does not depend on which entry matched or where a
mismatch starts. Credentials are extracted from ``Authorization: Bearer``, from
``Authorization: Basic`` (token as the password, which is what ``ws://name:TOKEN@host``
URLs become) and, by the front end, from the login session cookie.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .http1 import RequestHead

__all__ = [
    "Credential",
    "TokenEntry",
    "TokenSet",
    "digest",
    "new_token",
    "extract_token",
    "TOKEN_NAME_RE",
    "DIGEST_PREFIX",
    "session_cookie",
    "cookie_value",
    "Presented",
    "read_authorization",
    "looks_like_jwt",
]

TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
DIGEST_PREFIX = "sha256:"


def new_token() -> str:
    """A fresh token: 32 random bytes (256 bits), URL-safe base64 without padding."""
    return secrets.token_urlsafe(32)


def digest(token: str | bytes) -> bytes:
    raw = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


@dataclass(frozen=True, slots=True)
class Credential:
    """A verified credential. ``name`` is what logs show; the secret is never kept."""

    kind: str  # "token" | "jwt" | "session" | "gateway-token"
    name: str
    subject: str | None = None
    scopes: tuple[str, ...] = ()
    expires_at: float | None = None  # wall clock (time.time()) seconds
    jti: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    # Static tokens, the gateway's token and login sessions: the digest of the secret
    # that was verified, so a reload can tell whether that very secret is still in force.
    binding: bytes | None = None
    session: bytes | None = None  # a login session: the digest of its id


@dataclass(frozen=True, slots=True)
class TokenEntry:
    name: str
    digest: bytes
    created: str = ""


class TokenSet:
    """An immutable set of accepted static tokens, checked in constant time."""

    __slots__ = ("_entries", "_names", "_creds")

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries: tuple[TokenEntry, ...] = tuple(entries)
        self._names = frozenset(e.name for e in self._entries)
        # The Credential each entry grants, built once (frozen, so shared by connections):
        # a Credential per request was ~3% of a connection's instructions.
        self._creds: tuple[Credential, ...] = tuple(
            Credential("token", e.name, binding=e.digest) for e in self._entries
        )

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> frozenset[str]:
        return self._names

    def verify(self, token: str) -> str | None:
        """The token's name when it is one of ours, else None."""
        return self.verify_digest(digest(token))

    def verify_digest(self, presented: bytes) -> str | None:
        found = self.credential(presented)
        return None if found is None else found.name

    def credential(self, presented: bytes) -> Credential | None:
        """The credential of the entry whose digest is ``presented`` (kind "token", bound
        to that digest), or None."""
        found: Credential | None = None
        entries, creds = self._entries, self._creds
        # Visit every entry: the time taken must not say which one (or whether one) matched.
        for i in range(len(entries)):
            if hmac.compare_digest(entries[i].digest, presented):
                found = creds[i]
        return found


def extract_token(authorization: str | None) -> tuple[str | None, str | None]:
    """Return ``(token, error)`` from an Authorization header value.

    ``Bearer <token>``; or ``Basic base64(user:token)`` where the password is the token
    (the user part is a free label). A malformed header is an error, not "no token".
    """
    if authorization is None:
        return None, None
    scheme, _, rest = authorization.strip().partition(" ")
    scheme = scheme.lower()
    rest = rest.strip()
    if scheme == "bearer":
        if not rest or " " in rest:
            return None, "malformed bearer credential"
        return rest, None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(rest.encode("ascii"), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeError, ValueError):
            return None, "malformed basic credential"
        _user, sep, password = decoded.partition(":")
        if not sep or not password:
            return None, "malformed basic credential"
        return password, None
    return None, "unsupported authorization scheme"


def session_cookie(head: RequestHead, name: bytes) -> str | None:
    """The first ``name`` cookie in any Cookie line (HTTP/2 front ends split them)."""
    for n, v in zip(head.names, head.values, strict=True):
        if n == b"cookie" and name in v:
            sid = cookie_value(v, name)
            if sid is not None:
                return sid
    return None


def cookie_value(cookie: bytes, name: bytes) -> str | None:
    """The value of the first ``name`` cookie in one Cookie header value (ASCII only)."""
    for part in cookie.split(b";"):
        k, sep, v = part.strip().partition(b"=")
        if sep and k == name:
            try:
                return v.decode("ascii")
            except UnicodeError:
                return None
    return None


# (raw Authorization value or None, the token in it or None, why it is malformed or None)
Presented = tuple[bytes | None, str | None, str | None]


def read_authorization(head: RequestHead) -> Presented:
    """The request's Authorization header, read once: its raw value and extract_token's
    answer. A malformed header gives (raw, None, reason)."""
    auth = head.header(b"authorization")
    if auth is None:
        return None, None, None
    token, err = extract_token(auth.decode("latin-1"))  # latin-1 decodes every byte
    return auth, token, err


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated parts starting with a base64url JSON object: verify as a JWT."""
    return token.count(".") == 2 and token.startswith("eyJ")
