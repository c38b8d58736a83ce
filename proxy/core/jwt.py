"""JWT verification over a key-set snapshot: no fetching, no files, no clock of its own.

``verify`` takes a compact JWS, a ``KeySet`` and the time, and returns the ``Credential``
the token carries or raises ``Unauthenticated`` with a reason that never names an expected
value. It owns the parsing (size limit, three strict base64url segments, a JSON-object
header), the header rules (``alg`` pinned to the configured set and to the key's family,
``none`` and ``crit``/``b64`` refused, ``kid`` selection with a bounded kid-less search)
and the claims (``exp``/``nbf``/``iat`` with leeway, exact ``iss`` and ``aud``, the subject,
scopes and ``jti``). The signature itself is checked by the key's ``SignatureCheck``, a
callable built outside the core (proxy/access/jwt.py, on cryptography), so this module
imports no crypto library and does no I/O.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from ..errors import Unauthenticated
from .tokens import Credential

__all__ = [
    "HMAC_ALGS",
    "MAX_HEADER_CHARS",
    "MAX_KIDLESS_TRIES",
    "MAX_TOKEN_BYTES",
    "Key",
    "KeySet",
    "KeyUnusable",
    "Rules",
    "SignatureCheck",
    "b64url_decode",
    "parse_header",
    "verify",
]

MAX_TOKEN_BYTES = 8192
MAX_HEADER_CHARS = 4096
# A kid-less token is tried against at most this many keys of its algorithm family.
MAX_KIDLESS_TRIES = 4
HMAC_ALGS = frozenset({"HS256"})

# ``check(signing_input, signature)``: True when the signature is the key's over the input.
SignatureCheck = Callable[[bytes, bytes], bool]

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class KeyUnusable(Exception):  # noqa: N818 (a signal from a SignatureCheck, not an error)
    """Raised by a ``SignatureCheck`` whose key cannot serve the algorithm at all (an HMAC
    "secret" that is really a PEM key, a curve that is not the algorithm's): the token is
    refused as "algorithm does not match the key", not tried against the next key."""


@dataclass(frozen=True, slots=True)
class Key:
    """One verification key: its ``kid`` and one signature check per algorithm it may
    verify (an RSA key never verifies HS256 or ES256). ``any_kid``: our own HS256 secret,
    which has no kid and answers for any kid the set does not know."""

    kid: str | None
    checks: Mapping[str, SignatureCheck]
    any_kid: bool = False

    @property
    def algorithms(self) -> frozenset[str]:
        return frozenset(self.checks)


class KeySet:
    """An immutable snapshot of the keys a verification may use, indexed by ``kid``."""

    __slots__ = ("_index",)

    def __init__(self, keys: Iterable[Key] = ()) -> None:
        index: dict[str | None, list[Key]] = {}
        for key in keys:
            index.setdefault(key.kid, []).append(key)
        self._index = {kid: tuple(group) for kid, group in index.items()}

    def __contains__(self, kid: object) -> bool:
        return kid in self._index

    def candidates(self, alg: str, kid: str | None) -> list[Key]:
        """The keys a token with this ``alg`` and ``kid`` is tried against, in order."""
        if kid is not None:
            named = self._index.get(kid)
            if named is None:
                # Our HS256 secret has no kid of its own: it answers for any kid it meets.
                secrets = [k for k in self._index.get(None, ()) if k.any_kid]
                if alg in HMAC_ALGS and secrets:
                    return secrets
                raise Unauthenticated("unknown key id")
            fitting = [k for k in named if alg in k.checks]
            if not fitting:
                raise Unauthenticated("algorithm does not match the key")
            return fitting
        every = [k for group in self._index.values() for k in group]
        fitting = [k for k in every if alg in k.checks]
        if not fitting:
            if every:
                raise Unauthenticated("algorithm does not match the key")
            raise Unauthenticated("no verification key available")
        return fitting[:MAX_KIDLESS_TRIES]


@dataclass(frozen=True, slots=True)
class Rules:
    """What a token must say: the configured algorithms, issuer, audience and claims."""

    issuer: str
    audience: str
    algorithms: frozenset[str]
    leeway: float = 0.0
    subject_claim: str = "sub"
    scopes_claim: str = "scope"


def b64url_decode(segment: str) -> bytes | None:
    """Strict base64url (RFC 7515 section 2): the URL-safe alphabet, no '=' padding, no
    impossible length, and canonical trailing bits (one encoding per byte string, so a
    signature cannot be re-spelled). None when the segment is not that."""
    if len(segment) % 4 == 1 or _B64URL.fullmatch(segment) is None:
        return None
    # The alphabet and length are checked: decoding cannot fail.
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != segment:
        return None
    return raw


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def parse_header(token: str) -> dict[str, Any] | None:
    """The JOSE header of ``token``, or None when it is not a JSON object in strict
    base64url. Parsed before anything else so that every header we refuse (alg none,
    crit) gets its own reason, and an unknown kid can be told apart before a fetch."""
    head, sep, _ = token.partition(".")
    if not sep or len(head) > MAX_HEADER_CHARS:
        return None
    raw = b64url_decode(head)
    return None if raw is None else _json_object(raw)


# The largest time claim taken as a time (floats are exact up to here).
MAX_TIME: Final = 2**53


def _as_int(value: Any) -> int | None:
    """A time claim as the integer it is compared as (``int()``: 1.9 is 1, "12" is 12,
    true is 1), or None when it is none (NaN, Infinity, a list, null, "abc", or past
    +-2**53 seconds: no real time, and compiled, comparing it with a float overflows)."""
    try:
        n = int(value)
    except (ValueError, TypeError, OverflowError):
        return None
    return n if -MAX_TIME <= n <= MAX_TIME else None


def verify(token: str, keys: KeySet, rules: Rules, now: float) -> Credential:
    """The credential a valid ``token`` carries at wall-clock time ``now``;
    ``Unauthenticated`` for every refusal."""
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated("token too large")
    header = parse_header(token)
    if header is None:
        raise Unauthenticated("malformed token")
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise Unauthenticated("malformed token")
    if alg.lower() == "none":
        raise Unauthenticated("unsigned token refused")
    if alg not in rules.algorithms:
        raise Unauthenticated("algorithm not allowed")
    if "crit" in header or "b64" in header:
        # RFC 7515 4.1.11: we understand no extension, so any critical one refuses.
        raise Unauthenticated("unsupported critical header")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise Unauthenticated("malformed token")
    candidates = keys.candidates(alg, kid)
    parts = token.split(".")
    if len(parts) != 3:
        raise Unauthenticated("malformed token")
    payload = b64url_decode(parts[1])
    signature = b64url_decode(parts[2])
    if payload is None or signature is None:
        raise Unauthenticated("malformed token")
    signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
    for key in candidates:
        try:
            if key.checks[alg](signing_input, signature):
                break
        except KeyUnusable:
            raise Unauthenticated("algorithm does not match the key") from None
        except (ValueError, TypeError):
            raise Unauthenticated("invalid token") from None
        # else: a kid-less token may match the next key of the family
    else:
        raise Unauthenticated("invalid signature")
    claims = _json_object(payload)
    if claims is None:
        raise Unauthenticated("malformed token")
    return _credential(claims, rules, now)


def _check_times(claims: dict[str, Any], leeway: float, now: float) -> None:
    if claims.get("exp") is None:
        raise Unauthenticated("token has no expiry")
    # Leeway covers issuer clock skew on iat and nbf; on exp it only lets the claims
    # checks run, since the credential itself ends at exp exactly (see _credential).
    if "iat" in claims:
        iat = _as_int(claims["iat"])
        if iat is None:
            raise Unauthenticated("invalid token")
        if iat > now + leeway:
            raise Unauthenticated("token not yet valid")
    if "nbf" in claims:
        nbf = _as_int(claims["nbf"])
        if nbf is None:
            raise Unauthenticated("malformed token")
        if nbf > now + leeway:
            raise Unauthenticated("token not yet valid")
    exp = _as_int(claims["exp"])
    if exp is None:
        raise Unauthenticated("malformed token")
    if exp <= now - leeway:
        raise Unauthenticated("token expired")
    if "sub" in claims and not isinstance(claims["sub"], str):
        raise Unauthenticated("invalid token")
    if "jti" in claims and not isinstance(claims["jti"], str):
        raise Unauthenticated("invalid token")


def _credential(claims: dict[str, Any], rules: Rules, now: float) -> Credential:
    _check_times(claims, rules.leeway, now)
    iss = claims.get("iss")
    if iss is None:
        raise Unauthenticated("token has no issuer")
    # Exact equality: an issuer that merely contains ours is somebody else.
    if not isinstance(iss, str) or iss != rules.issuer:
        raise Unauthenticated("wrong issuer")
    aud = claims.get("aud")
    if aud is None:
        raise Unauthenticated("token has no audience")
    if isinstance(aud, str):
        aud_ok = aud == rules.audience
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        aud_ok = rules.audience in aud
    else:
        aud_ok = False
    if not aud_ok:
        raise Unauthenticated("wrong audience")
    sub = claims.get(rules.subject_claim)
    if not isinstance(sub, str) or not sub or len(sub) > 256 or not sub.isprintable():
        raise Unauthenticated("token has no usable subject")
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise Unauthenticated("token has no expiry")
    # Exact: _check_times refused an exp past +-2**53 (MAX_TIME), so no overflow here.
    expires_at = float(exp)
    raw_scopes = claims.get(rules.scopes_claim)
    scopes: tuple[str, ...]
    if raw_scopes is None:
        scopes = ()
    elif isinstance(raw_scopes, str):
        scopes = tuple(raw_scopes.split())
    elif isinstance(raw_scopes, list) and all(isinstance(s, str) for s in raw_scopes):
        scopes = tuple(raw_scopes)
    else:
        raise Unauthenticated("malformed scopes claim")
    jti = claims.get("jti")  # a string or absent: _check_times refused anything else
    # Live sessions end at exp exactly (the server's sweep), so a token past exp is never
    # admitted, leeway or not.
    if expires_at <= now:
        raise Unauthenticated("token expired")
    return Credential(
        "jwt",
        f"jwt:{sub}",
        subject=sub,
        scopes=scopes,
        expires_at=expires_at,
        jti=jti,
        claims=MappingProxyType(claims),
    )
