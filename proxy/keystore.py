"""Secrets on disk: the token file.

The I/O half of proxy/core/tokens.py: reading and atomically writing the token file
(names and digests only). The checks themselves are pure and live in the core.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from .core.tokens import DIGEST_PREFIX, TOKEN_NAME_RE, TokenEntry, digest, new_token
from .errors import TokenStoreError

__all__ = ["TokenFile"]

_FILE_VERSION = 1


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
            raise TokenStoreError(f"token file {self.path}: not JSON (line {exc.lineno})") from None
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
            if not isinstance(dig, str) or not dig.startswith(DIGEST_PREFIX):
                raise TokenStoreError(f"{where}.digest: expected 'sha256:<hex>'")
            try:
                value = bytes.fromhex(dig[len(DIGEST_PREFIX) :])
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
                {"name": e.name, "digest": DIGEST_PREFIX + e.digest.hex(), "created": e.created}
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
