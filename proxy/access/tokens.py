"""Static bearer tokens: generation, the on-disk token file, and constant-time checks.

The token file holds only names and SHA-256 digests, never a token; tokens are 256-bit
random strings, so a fast hash is enough (no password stretching is needed). A presented
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
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TokenStoreError

__all__ = [
    "Credential",
    "TokenEntry",
    "TokenSet",
    "TokenFile",
    "digest",
    "new_token",
    "extract_token",
    "TOKEN_NAME_RE",
]

TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_DIGEST_PREFIX = "sha256:"
_FILE_VERSION = 1


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

    __slots__ = ("_entries", "_names")

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries: tuple[TokenEntry, ...] = tuple(entries)
        self._names = frozenset(e.name for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> frozenset[str]:
        return self._names

    def verify(self, token: str) -> str | None:
        """The token's name when it is one of ours, else None."""
        return self.verify_digest(digest(token))

    def verify_digest(self, presented: bytes) -> str | None:
        found: str | None = None
        # Visit every entry: the time taken must not say which one (or whether one) matched.
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, presented):
                found = entry.name
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


class TokenFile:
    """The token file: ``{"version": 1, "tokens": [{"name", "digest", "created"}]}``.

    Written atomically with mode 0600. Only this class reads or writes it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self, *, missing_ok: bool = True) -> list[TokenEntry]:
        try:
            raw = self.path.read_text("utf-8")
        except FileNotFoundError:
            if missing_ok:
                return []
            raise TokenStoreError(f"token file {self.path} does not exist") from None
        except OSError as exc:
            raise TokenStoreError(f"token file {self.path}: {exc.strerror}") from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TokenStoreError(
                f"token file {self.path}: not JSON (line {exc.lineno})"
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            raise TokenStoreError(f"token file {self.path}: expected an object with 'tokens'")
        entries: list[TokenEntry] = []
        seen: set[str] = set()
        for i, item in enumerate(data["tokens"]):
            where = f"token file {self.path}: tokens[{i}]"
            if not isinstance(item, dict):
                raise TokenStoreError(f"{where}: expected an object")
            unknown = set(item) - {"name", "digest", "created"}
            if unknown:
                # A 'token' key here would mean a secret stored in clear: refuse loudly.
                raise TokenStoreError(f"{where}: unknown key {sorted(unknown)[0]!r}")
            name, dig = item.get("name"), item.get("digest")
            if not isinstance(name, str) or not TOKEN_NAME_RE.match(name):
                raise TokenStoreError(f"{where}.name: invalid token name")
            if name in seen:
                raise TokenStoreError(f"{where}.name: duplicate name {name!r}")
            seen.add(name)
            if not isinstance(dig, str) or not dig.startswith(_DIGEST_PREFIX):
                raise TokenStoreError(f"{where}.digest: expected 'sha256:<hex>'")
            try:
                value = bytes.fromhex(dig[len(_DIGEST_PREFIX):])
            except ValueError:
                raise TokenStoreError(f"{where}.digest: not hex") from None
            if len(value) != 32:
                raise TokenStoreError(f"{where}.digest: wrong length")
            created = item.get("created", "")
            entries.append(TokenEntry(name, value, created if isinstance(created, str) else ""))
        return entries

    def save(self, entries: Iterable[TokenEntry]) -> None:
        data = {
            "version": _FILE_VERSION,
            "tokens": [
                {"name": e.name, "digest": _DIGEST_PREFIX + e.digest.hex(), "created": e.created}
                for e in entries
            ],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".tokens-", dir=str(self.path.parent))
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def add(self, name: str) -> str:
        """Create a token named ``name``; return it (the only time it exists in clear)."""
        if not TOKEN_NAME_RE.match(name):
            raise TokenStoreError(
                f"invalid token name {name!r}: use letters, digits, '.', '_', '@', '-' (max 64)"
            )
        entries = self.load()
        if any(e.name == name for e in entries):
            raise TokenStoreError(f"a token named {name!r} already exists; revoke it first")
        token = new_token()
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entries.append(TokenEntry(name, digest(token), created))
        self.save(entries)
        return token

    def revoke(self, name: str) -> bool:
        entries = self.load()
        kept = [e for e in entries if e.name != name]
        if len(kept) == len(entries):
            return False
        self.save(kept)
        return True
