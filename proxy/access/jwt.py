"""JWT verification: pinned algorithms, keys bound to their algorithm family, exact claims.

``JwtVerifier`` owns the I/O and the state around a signed token: the keys (a local PEM or
JWKS file, an HS256 secret file, or a JWKS URL fetched in the background with caching,
rotation by ``kid`` and a cooldown for unknown ``kid``s), a cache of verified tokens keyed
by SHA-256 digest until ``exp``, and the revocation list (by ``jti`` or ``sub``) read from
``jwt.revokedFile``. The verification itself (parsing, header rules, claims) is
proxy/core/jwt.py over a ``KeySet`` snapshot; the signature checks it calls are built here,
on cryptography (``signature_checks``). Every refusal is an ``Unauthenticated`` whose
reason never names an expected value.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt as pyjwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm

from ..config import JwtConfig
from ..core import jwt as core_jwt
from ..core.jwt import HMAC_ALGS, MAX_TOKEN_BYTES, KeySet, KeyUnusable, SignatureCheck
from ..core.tokens import Credential
from ..errors import ConfigError, Unauthenticated
from ..tasks import spawn

__all__ = [
    "JwtVerifier",
    "JwksSource",
    "KeyEntry",
    "RevocationList",
    "algorithms_for_key",
    "jwk_thumbprint",
    "keys_from_jwks",
    "public_jwk",
    "signature_checks",
    "MAX_LEEWAY",
    "MAX_TOKEN_BYTES",
]

log = logging.getLogger("clawgate")


def _log_fetch_error(task: asyncio.Task[None], exc: BaseException) -> None:
    log.error("jwks fetch failed unexpectedly: %r", exc, exc_info=exc)


MAX_LEEWAY = 60.0
MAX_JWKS_BYTES = 1 << 20
MAX_JWKS_KEYS = 64
MIN_RSA_BITS = 2048
MIN_HMAC_BYTES = 32
FETCH_TIMEOUT = 3.0
REVOCATION_CHECK_SECONDS = 1.0

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256"})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def algorithms_for_key(key: Any) -> frozenset[str]:
    """The JWS algorithms a key may verify: an RSA key never verifies HS256 or ES256."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGS
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return frozenset({"ES256"})
        if isinstance(key.curve, ec.SECP384R1):
            return frozenset({"ES384"})
        return frozenset()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    if isinstance(key, bytes):
        return HMAC_ALGS
    return frozenset()


def public_jwk(key: Any) -> dict[str, Any]:
    """The public JWK of an asymmetric key (private keys are reduced to their public half)."""
    if hasattr(key, "public_key"):
        key = key.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return dict(RSAAlgorithm.to_jwk(key, as_dict=True))
    if isinstance(key, ec.EllipticCurvePublicKey):
        return dict(ECAlgorithm.to_jwk(key, as_dict=True))
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return dict(OKPAlgorithm.to_jwk(key, as_dict=True))
    raise ValueError("not an RSA, EC or EdDSA key")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url): the kid clawgate gives its own keys."""
    members = {
        "RSA": ("e", "kty", "n"),
        "EC": ("crv", "kty", "x", "y"),
        "OKP": ("crv", "kty", "x"),
    }.get(str(jwk.get("kty")))
    if members is None:
        raise ValueError("unsupported key type")
    canon = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canon.encode("utf-8")).digest())


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One verification key, bound to the algorithms its type allows."""

    kid: str | None
    key: Any  # a cryptography public key, or bytes for HS256
    algorithms: frozenset[str]
    source: str  # "file" | "jwks" | "secret"


# --------------------------------------------------------------------------- signatures

_SHA: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}


def _unusable(signing_input: bytes, signature: bytes) -> bool:
    raise KeyUnusable


def _rsa_check(key: rsa.RSAPublicKey, alg: str) -> SignatureCheck:
    digest = _SHA[alg[2:]]
    pss = alg.startswith("PS")
    salt = digest().digest_size  # RFC 7518 3.5: the salt is as long as the hash

    def check(signing_input: bytes, signature: bytes) -> bool:
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(digest()), salt_length=salt) if pss else padding.PKCS1v15()
        )
        try:
            key.verify(signature, signing_input, pad, digest())
        except InvalidSignature:
            return False
        return True

    return check


def _ecdsa_check(key: ec.EllipticCurvePublicKey, alg: str) -> SignatureCheck:
    if not isinstance(key.curve, _EC_CURVES[alg]):
        return _unusable  # ES256 is P-256 only, and so on (RFC 7518 3.4)
    digest = _SHA[alg[2:]]
    size = (key.curve.key_size + 7) // 8

    def check(signing_input: bytes, signature: bytes) -> bool:
        # JWS carries r||s, fixed width; cryptography wants DER.
        if len(signature) != 2 * size:
            return False
        der = encode_dss_signature(
            int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
        )
        try:
            key.verify(der, signing_input, ec.ECDSA(digest()))
        except InvalidSignature:
            return False
        return True

    return check


def _eddsa_check(key: ed25519.Ed25519PublicKey | ed448.Ed448PublicKey) -> SignatureCheck:
    def check(signing_input: bytes, signature: bytes) -> bool:
        try:
            key.verify(signature, signing_input)
        except InvalidSignature:
            return False
        return True

    return check


def _hmac_check(secret: bytes, alg: str) -> SignatureCheck:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    try:
        # pyjwt's rule, kept: a "secret" that is a PEM, SSH or DER key is no HMAC key.
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except pyjwt.InvalidKeyError:
        return _unusable

    def check(signing_input: bytes, signature: bytes) -> bool:
        return hmac.compare_digest(signature, hmac.new(secret, signing_input, digest).digest())

    return check


def signature_checks(key: Any, algorithms: Iterable[str]) -> dict[str, SignatureCheck]:
    """One ``SignatureCheck`` per algorithm, for proxy/core/jwt.py; an algorithm the key's
    type cannot verify gets a check that raises ``KeyUnusable``."""
    checks: dict[str, SignatureCheck] = {}
    for alg in sorted(algorithms):
        check: SignatureCheck = _unusable
        if alg[:2] in ("RS", "PS") and alg[2:] in _SHA and isinstance(key, rsa.RSAPublicKey):
            check = _rsa_check(key, alg)
        elif alg in _EC_CURVES and isinstance(key, ec.EllipticCurvePublicKey):
            check = _ecdsa_check(key, alg)
        elif alg == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            check = _eddsa_check(key)
        elif alg in ("HS256", "HS384", "HS512") and isinstance(key, bytes) and key:
            check = _hmac_check(key, alg)
        checks[alg] = check
    return checks


def _core_key(entry: KeyEntry) -> core_jwt.Key:
    return core_jwt.Key(
        entry.kid, signature_checks(entry.key, entry.algorithms), any_kid=entry.source == "secret"
    )


def _jwk_to_entry(jwk: Mapping[str, Any], source: str) -> KeyEntry:
    kty = jwk.get("kty")
    if kty == "oct":
        raise ValueError("symmetric keys are not accepted in a JWKS (use hs256SecretFile)")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"use {use!r} is not 'sig'")
    loader = {
        "RSA": RSAAlgorithm.from_jwk,
        "EC": ECAlgorithm.from_jwk,
        "OKP": OKPAlgorithm.from_jwk,
    }.get(str(kty))
    if loader is None:
        raise ValueError("unsupported kty")
    key: Any = loader(dict(jwk))
    if hasattr(key, "public_key"):
        key = key.public_key()  # a private JWK: only its public half is ever used
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA key of {key.key_size} bits is too short")
    algs = algorithms_for_key(key)
    declared = jwk.get("alg")
    if declared is not None:
        # A JWK that names its algorithm is bound to exactly that one.
        algs = algs & {declared} if isinstance(declared, str) else frozenset()
    if not algs:
        raise ValueError("key type and alg do not fit any supported algorithm")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    return KeyEntry(kid, key, algs, source)


def keys_from_jwks(data: Any, source: str) -> tuple[list[KeyEntry], list[str]]:
    """Keys from a JWKS document (or one JWK); unusable keys are skipped with a note."""
    if isinstance(data, dict) and "keys" not in data and "kty" in data:
        data = {"keys": [data]}
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("expected a JWKS object with a 'keys' list")
    entries: list[KeyEntry] = []
    skipped: list[str] = []
    for i, jwk in enumerate(data["keys"][:MAX_JWKS_KEYS]):
        if not isinstance(jwk, dict):
            skipped.append(f"keys[{i}]: not an object")
            continue
        try:
            entries.append(_jwk_to_entry(jwk, source))
        except (ValueError, TypeError, KeyError, pyjwt.PyJWTError) as exc:
            skipped.append(f"keys[{i}]: {exc}")
    return entries, skipped


def _load_key_file(path: str) -> list[KeyEntry]:
    where = "jwt.keyFile"
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_JWKS_BYTES:
        raise ConfigError(where, f"{path} is larger than {MAX_JWKS_BYTES} bytes")
    text = raw.lstrip()
    if text.startswith(b"{"):
        try:
            entries, skipped = keys_from_jwks(json.loads(text), "file")
        except ValueError as exc:
            raise ConfigError(where, f"{path}: {exc}") from None
        for note in skipped:
            log.warning("jwt.keyFile %s: skipped %s", path, note)
        if not entries:
            raise ConfigError(where, f"{path} holds no usable verification key")
        return entries
    if b"PRIVATE KEY" in text:
        raise ConfigError(
            where,
            f"{path} is a private key: give the public key "
            "(clawgate token keygen writes one next to it)",
        )
    try:
        key = load_pem_public_key(text)
    except (ValueError, TypeError) as exc:
        raise ConfigError(where, f"{path}: not a PEM public key or JWKS ({exc})") from None
    try:
        entry = _jwk_to_entry(public_jwk(key), "file")
        # The same kid `clawgate token issue` puts in its tokens: the key's thumbprint.
        return [KeyEntry(jwk_thumbprint(public_jwk(key)), entry.key, entry.algorithms, "file")]
    except ValueError as exc:
        raise ConfigError(where, f"{path}: {exc}") from None


def _load_hmac_secret(path: str) -> KeyEntry:
    where = "jwt.hs256SecretFile"
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            secret = fh.read(4096).strip()
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        log.warning("jwt.hs256SecretFile %s is readable by group/others: chmod 600 it", path)
    if len(secret) < MIN_HMAC_BYTES:
        raise ConfigError(where, f"{path}: the secret must be at least {MIN_HMAC_BYTES} bytes")
    return KeyEntry(None, secret, HMAC_ALGS, "secret")


def _check_jwks_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and host:
        # Plain HTTP only where the path is already private: loopback, or a tailnet
        # address (WireGuard encrypts it).
        if host == "localhost":
            return url
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None and (
            ip.is_loopback
            or ip in ipaddress.ip_network("100.64.0.0/10")
            or ip in ipaddress.ip_network("fd7a:115c:a1e0::/48")
        ):
            return url
    raise ConfigError(
        "jwt.jwksUrl", "must be an https URL (http only to loopback or a tailnet address)"
    )


# --------------------------------------------------------------------------- JWKS URL


class JwksSource:
    """Keys from a JWKS URL: fetched in the background, cached, refetched on unknown kid.

    At most one fetch runs at a time; a fetch triggered by an unknown ``kid`` starts only
    when none started within the cooldown, so a flood of made-up kids costs one request.
    A failed fetch keeps the keys we had.
    """

    def __init__(
        self,
        url: str,
        *,
        loop: asyncio.AbstractEventLoop,
        cache_seconds: float,
        cooldown_seconds: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.loop = loop
        self.cache_seconds = cache_seconds
        self.cooldown_seconds = cooldown_seconds
        self.monotonic = monotonic
        self.keys: tuple[KeyEntry, ...] = ()
        self.loaded = False
        self.fetches = 0
        self.last_error: str | None = None
        self.on_change: list[Callable[[tuple[KeyEntry, ...], tuple[KeyEntry, ...]], None]] = []
        self._fetched_at = -1e18
        self._started_at = -1e18
        self._inflight: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def same_settings(self, url: str, cache_seconds: float, cooldown_seconds: float) -> bool:
        return (url, cache_seconds, cooldown_seconds) == (
            self.url,
            self.cache_seconds,
            self.cooldown_seconds,
        )

    @property
    def fetching(self) -> bool:
        return self._inflight is not None

    def may_fetch_now(self) -> bool:
        return self.monotonic() - self._started_at >= self.cooldown_seconds

    def stale(self) -> bool:
        return self.monotonic() - self._fetched_at >= self.cache_seconds

    def start(self) -> asyncio.Task[None]:
        """Start a fetch (or return the one running). Callers check the cooldown."""
        if self._inflight is None:
            self._started_at = self.monotonic()
            task = spawn(
                self._fetch(), "jwks-fetch", self._tasks, loop=self.loop, on_error=_log_fetch_error
            )
            self._inflight = task
            task.add_done_callback(self._done)
        return self._inflight

    def _done(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None

    def refresh_if_stale(self) -> None:
        if self._inflight is None and self.stale() and self.may_fetch_now():
            self.start()

    async def fetch_for_unknown_kid(self) -> None:
        """Wait for the running fetch, or start one if the cooldown allows; else return."""
        if self._inflight is None:
            if not self.may_fetch_now():
                return
            self.start()
        task = self._inflight
        if task is not None:
            # shield: a client that goes away must not cancel the fetch others wait on.
            await asyncio.shield(task)

    async def _fetch(self) -> None:
        import aiohttp  # the verifier of local keys does not need aiohttp loaded

        self.fetches += 1
        try:
            timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(
                    self.url, allow_redirects=False, headers={"Accept": "application/json"}
                ) as resp,
            ):
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = await resp.content.read(MAX_JWKS_BYTES + 1)
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS larger than 1 MiB")
            entries, skipped = keys_from_jwks(json.loads(body), "jwks")
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self.last_error = str(exc) or type(exc).__name__
            log.warning(
                "jwks fetch from %s failed (%s): keeping %d cached keys",
                self.url,
                self.last_error,
                len(self.keys),
            )
            return
        for note in skipped:
            log.warning("jwks %s: skipped %s", self.url, note)
        old, self.keys = self.keys, tuple(entries)
        self.loaded = True
        self.last_error = None
        self._fetched_at = self.monotonic()
        for cb in list(self.on_change):
            cb(old, self.keys)


# --------------------------------------------------------------------------- revocation


class RevocationList:
    """``jwt.revokedFile``: ``{"version": 1, "jti": {JTI: {...}}, "sub": {SUB: {...}}}``.

    A ``jti`` entry revokes that token. A ``sub`` entry revokes that subject's tokens;
    with ``"before": EPOCH`` only those issued (``iat``) at or before it, so fresh tokens
    can be issued afterwards. Re-read when its mtime changes (checked at most once a
    second). An unreadable or malformed file refuses every JWT: fail closed, visibly.
    """

    def __init__(
        self, path: str | None, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self.monotonic = monotonic
        self.jti: frozenset[str] = frozenset()
        self.sub: dict[str, float | None] = {}
        self.error: str | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        if path is not None:
            self._reload(strict=True)

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _reload(self, *, strict: bool) -> None:
        assert self.path is not None
        try:
            stamp = self._stat()
            jti: frozenset[str] = frozenset()
            sub: dict[str, float | None] = {}
            if stamp is not None:
                with open(self.path, encoding="utf-8") as fh:
                    jti, sub = parse_revocations(json.load(fh))
        except (OSError, ValueError) as exc:
            msg = f"{self.path}: {exc}"
            if strict:
                raise ConfigError("jwt.revokedFile", msg) from None
            if self.error != msg:
                log.error("jwt.revokedFile unreadable, refusing every JWT until fixed: %s", msg)
            self.error = msg
            self._stamp = None
            return
        self.jti, self.sub, self.error, self._stamp = jti, sub, None, stamp

    def maybe_reload(self) -> None:
        if self.path is None:
            return
        now = self.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + REVOCATION_CHECK_SECONDS
        try:
            stamp = self._stat()
        except OSError as exc:
            self.error = f"{self.path}: {exc.strerror}"
            return
        if stamp != self._stamp or self.error is not None:
            self._reload(strict=False)

    def reason(self, cred: Credential) -> str | None:
        """Pure lookup: the file is re-read by ``maybe_reload``, which the once-a-second
        sweep calls (serve._sweep), never on a request's path."""
        if self.path is None:
            return None
        if self.error is not None:
            return "revocation list unreadable"
        if cred.jti is not None and cred.jti in self.jti:
            return "token revoked"
        if cred.subject is not None and cred.subject in self.sub:
            before = self.sub[cred.subject]
            iat = cred.claims.get("iat")
            if before is None or not isinstance(iat, int | float) or iat <= before:
                return "subject revoked"
        return None


def parse_revocations(data: Any) -> tuple[frozenset[str], dict[str, float | None]]:
    if not isinstance(data, dict):
        raise ValueError("expected an object")
    unknown = set(data) - {"version", "jti", "sub"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r}")
    if data.get("version", 1) != 1:
        raise ValueError("unsupported version")
    jti_map = data.get("jti", {})
    sub_map = data.get("sub", {})
    if not isinstance(jti_map, dict) or not isinstance(sub_map, dict):
        raise ValueError("'jti' and 'sub' must be objects")
    subs: dict[str, float | None] = {}
    for name, entry in sub_map.items():
        before = entry.get("before") if isinstance(entry, dict) else None
        if before is not None and (isinstance(before, bool) or not isinstance(before, int | float)):
            raise ValueError(f"sub.{name}.before: expected a number")
        subs[name] = None if before is None else float(before)
    return frozenset(jti_map), subs


# --------------------------------------------------------------------------- verifier


@dataclass(frozen=True, slots=True)
class _Cached:
    cred: Credential
    exp: float


class JwtVerifier:
    """Verifies bearer JWTs for one config snapshot; see the module docstring."""

    def __init__(
        self,
        cfg: JwtConfig,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        keys: Iterable[KeyEntry] = (),
        jwks: JwksSource | None = None,
        revocations: RevocationList | None = None,
        max_cache: int = 10000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not cfg.issuer or not cfg.audience:
            raise ConfigError("jwt", "issuer and audience are required")
        self.cfg = cfg
        self.loop = loop
        self.rules = core_jwt.Rules(
            issuer=cfg.issuer,
            audience=cfg.audience,
            algorithms=frozenset(cfg.algorithms) - {"none"},
            leeway=max(0.0, min(float(cfg.leeway), MAX_LEEWAY)),
            subject_claim=cfg.subject_claim,
            scopes_claim=cfg.scopes_claim,
        )
        self.clock = clock
        self.local_keys = tuple(keys)
        self.jwks = jwks
        self.revocations = revocations or RevocationList(None)
        self.max_cache = max_cache
        self.verifications = 0  # full signature checks (cache misses), for tests and metrics
        self.cache_hits = 0
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self.keyset = KeySet()
        self._rebuild_index()
        if jwks is not None:
            jwks.on_change.append(self._keys_changed)

    @classmethod
    def from_config(
        cls, cfg: JwtConfig, *, loop: asyncio.AbstractEventLoop, previous: JwtVerifier | None = None
    ) -> JwtVerifier:
        """Build from config; raises ConfigError. ``previous`` (on reload) lends its JWKS
        source when the URL and timings are unchanged, so a reload does not refetch."""
        keys: list[KeyEntry] = []
        if cfg.key_file:
            keys.extend(_load_key_file(cfg.key_file))
        if cfg.hs256_secret_file:
            if "HS256" not in cfg.algorithms:
                raise ConfigError("jwt.hs256SecretFile", "set only with HS256 in jwt.algorithms")
            keys.append(_load_hmac_secret(cfg.hs256_secret_file))
        keys = [k for k in keys if k.algorithms & set(cfg.algorithms)]
        jwks: JwksSource | None = None
        if cfg.jwks_url:
            url = _check_jwks_url(cfg.jwks_url)
            old = previous.jwks if previous is not None else None
            if old is not None and old.same_settings(
                url, cfg.jwks_cache_seconds, cfg.jwks_cooldown_seconds
            ):
                jwks = old
            else:
                jwks = JwksSource(
                    url,
                    loop=loop,
                    cache_seconds=cfg.jwks_cache_seconds,
                    cooldown_seconds=cfg.jwks_cooldown_seconds,
                )
        if not keys and jwks is None:
            raise ConfigError(
                "jwt.algorithms", "no configured key can verify any of the listed algorithms"
            )
        verifier = cls(
            cfg, loop=loop, keys=keys, jwks=jwks, revocations=RevocationList(cfg.revoked_file)
        )
        if previous is not None:
            previous.detach()  # only now: a refused config leaves the old one whole
        if jwks is not None and not jwks.loaded and not jwks.fetching and loop.is_running():
            jwks.start()
        return verifier

    def detach(self) -> None:
        """Stop listening to the shared JWKS source (this snapshot was replaced)."""
        if self.jwks is not None and self._keys_changed in self.jwks.on_change:
            self.jwks.on_change.remove(self._keys_changed)

    # ------------------------------------------------------------------ keys

    def _rebuild_index(self) -> None:
        remote = self.jwks.keys if self.jwks is not None else ()
        self.keyset = KeySet(_core_key(e) for e in (*self.local_keys, *remote))

    def _keys_changed(self, old: tuple[KeyEntry, ...], new: tuple[KeyEntry, ...]) -> None:
        self._rebuild_index()
        # A key that left the set takes its tokens with it, cached or not.
        fingerprint = {(e.kid, _key_id(e)) for e in new}
        if any((e.kid, _key_id(e)) not in fingerprint for e in old):
            self._cache.clear()

    def needs_keys(self, token: str) -> bool:
        """True when verifying ``token`` should first wait for a JWKS fetch (which the
        cooldown allows now, or which is already running): an unknown kid, or no keys yet."""
        jwks = self.jwks
        if jwks is None or len(token) > MAX_TOKEN_BYTES:
            return False
        if hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest() in self._cache:
            return False
        if not (jwks.fetching or jwks.may_fetch_now()):
            return False
        header = core_jwt.parse_header(token)
        if header is None:
            return False
        kid = header.get("kid")
        if kid is None:
            return not jwks.loaded
        return isinstance(kid, str) and kid not in self.keyset

    async def prepare(self, token: str) -> None:
        """Await the JWKS fetch ``token`` needs, if any (bounded by the fetch timeout)."""
        if self.jwks is not None and self.needs_keys(token):
            await self.jwks.fetch_for_unknown_kid()

    async def verify_async(self, token: str) -> Credential:
        await self.prepare(token)
        return self.verify(token)

    # ------------------------------------------------------------------ verify

    def verify(self, token: str) -> Credential:
        """The credential a valid token carries; ``Unauthenticated`` for every refusal."""
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated("token too large")
        d = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        hit = self._cache.get(d)
        if hit is not None:
            if hit.exp > self.clock():
                self.cache_hits += 1
                return hit.cred
            del self._cache[d]
            raise Unauthenticated("token expired")
        if self.jwks is not None:
            self.jwks.refresh_if_stale()
        cred = self._verify_uncached(token)
        exp = cred.expires_at
        assert exp is not None
        if self.max_cache > 0:
            if len(self._cache) >= self.max_cache:
                self._cache.popitem(last=False)  # oldest first: bounded, O(1)
            self._cache[d] = _Cached(cred, exp)
        return cred

    def _verify_uncached(self, token: str) -> Credential:
        self.verifications += 1
        return core_jwt.verify(token, self.keyset, self.rules, self.clock())

    # ------------------------------------------------------------------ revocation

    def revoked_reason(self, cred: Credential) -> str | None:
        if cred.kind != "jwt":
            return None
        return self.revocations.reason(cred)

    @property
    def cache_size(self) -> int:
        return len(self._cache)


def _key_id(entry: KeyEntry) -> str:
    if isinstance(entry.key, bytes):
        return hashlib.sha256(entry.key).hexdigest()
    return jwk_thumbprint(public_jwk(entry.key))
