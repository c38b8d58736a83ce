"""JwtVerifier: every refusal of the issue, the verified-token cache, revocation, and the
JWKS URL (rotation by kid, the unknown-kid cooldown) against a real aiohttp server on
127.0.0.1:0. Tokens are signed with real keys; forged ones are built by hand.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.warnings import InsecureKeyLengthWarning

from proxy.access.jwt import (
    JwksSource,
    JwtVerifier,
    KeyEntry,
    RevocationList,
    algorithms_for_key,
    jwk_thumbprint,
    public_jwk,
)
from proxy.cli.jwt import issue_token, parse_ttl
from proxy.config import JwtConfig
from proxy.core.policy import IdentityOutcome, PolicySettings, decide
from proxy.core.tokens import Credential
from proxy.errors import ClawgateError, ConfigError, Unauthenticated

ISS = "https://idp.example.com"
AUD = "openclaw-gateway"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
ED_KEY2 = ed25519.Ed25519PrivateKey.generate()
HMAC_SECRET = b"s" * 40


def kid_of(key: Any) -> str:
    return jwk_thumbprint(public_jwk(key))


def entry(key: Any, kid: str | None = "default", source: str = "file") -> KeyEntry:
    pub = key.public_key()
    return KeyEntry(kid_of(key) if kid == "default" else kid, pub, algorithms_for_key(pub), source)


def config(**kw: Any) -> JwtConfig:
    base: dict[str, Any] = dict(
        enabled=True, algorithms=("EdDSA", "ES256", "RS256"), issuer=ISS, audience=AUD, leeway=30.0
    )
    base.update(kw)
    return JwtConfig(**base)


def claims(**kw: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "alice",
        "iat": now,
        "exp": now + 600,
        "jti": "j-1",
    }
    for k, v in kw.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def sign(
    key: Any,
    alg: str,
    kid: str | None = "default",
    headers: dict[str, Any] | None = None,
    **kw: Any,
) -> str:
    hdr = dict(headers or {})
    if kid == "default":
        kid = kid_of(key)
    if kid is not None:
        hdr["kid"] = kid
    return pyjwt.encode(claims(**kw), key, algorithm=alg, headers=hdr)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A token built by hand: pyjwt refuses to make these (alg none, HMAC with a PEM)."""
    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if secret is None:
        return signing + "."
    return signing + "." + b64(hmac.new(secret, signing.encode(), hashlib.sha256).digest())


def rsa_public_pem() -> bytes:
    return RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def verifier() -> JwtVerifier:
    return JwtVerifier(config(), keys=[entry(RSA_KEY), entry(EC_KEY), entry(ED_KEY)])


def refused(v: JwtVerifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as info:
        v.verify(token)
    assert info.value.status == 401
    reason = info.value.reason
    # The reason never names what was expected (issuer, audience, key ids, algorithms).
    for secret_ish in (
        ISS,
        AUD,
        "idp.example",
        kid_of(RSA_KEY),
        kid_of(ED_KEY),
        "RS256",
        "EdDSA",
        "ES256",
    ):
        assert secret_ish not in reason
    return reason


# ------------------------------------------------------------------------------ accepts


@pytest.mark.parametrize(("key", "alg"), [(RSA_KEY, "RS256"), (EC_KEY, "ES256"), (ED_KEY, "EdDSA")])
def test_valid_token_becomes_credential(verifier: JwtVerifier, key: Any, alg: str) -> None:
    exp = int(time.time()) + 120
    token = sign(key, alg, scope="read  write", exp=exp)
    cred = verifier.verify(token)
    assert cred.kind == "jwt" and cred.name == "jwt:alice" and cred.subject == "alice"
    assert cred.scopes == ("read", "write") and cred.jti == "j-1"
    assert cred.expires_at == float(exp)
    assert cred.claims["iss"] == ISS


def test_scopes_from_list_and_custom_claims() -> None:
    v = JwtVerifier(config(subject_claim="email", scopes_claim="groups"), keys=[entry(ED_KEY)])
    cred = v.verify(sign(ED_KEY, "EdDSA", email="bob@example.com", groups=["ops", "dev"]))
    assert cred.name == "jwt:bob@example.com" and cred.scopes == ("ops", "dev")
    assert (
        refused(v, sign(ED_KEY, "EdDSA", email="b@x", groups={"a": 1})) == "malformed scopes claim"
    )


def test_audience_list_containing_ours_is_accepted(verifier: JwtVerifier) -> None:
    assert verifier.verify(sign(ED_KEY, "EdDSA", aud=["other", AUD])).subject == "alice"


def test_kidless_token_uses_key_of_its_family(verifier: JwtVerifier) -> None:
    assert verifier.verify(sign(EC_KEY, "ES256", kid=None)).subject == "alice"


def test_nbf_within_leeway_is_accepted(verifier: JwtVerifier) -> None:
    assert verifier.verify(sign(ED_KEY, "EdDSA", nbf=int(time.time()) + 10)).subject


# ------------------------------------------------------------------------------ refusals


def _none_token(alg: str) -> str:
    return forge({"alg": alg, "typ": "JWT"}, claims(), None)


REFUSALS: list[tuple[str, Callable[[], str], str]] = [
    ("alg none", lambda: _none_token("none"), "unsigned token refused"),
    ("alg None", lambda: _none_token("None"), "unsigned token refused"),
    (
        "alg NONE with a signature",
        lambda: forge({"alg": "NONE"}, claims(), b"x"),
        "unsigned token refused",
    ),
    (
        "HS256 signed with the RSA public key (HS256 not enabled)",
        lambda: forge({"alg": "HS256", "kid": kid_of(RSA_KEY)}, claims(), rsa_public_pem()),
        "algorithm not allowed",
    ),
    (
        "HS384 not allowed",
        lambda: pyjwt.encode(claims(), HMAC_SECRET * 2, algorithm="HS384"),
        "algorithm not allowed",
    ),
    ("wrong audience", lambda: sign(ED_KEY, "EdDSA", aud="someone-else"), "wrong audience"),
    (
        "audience that contains ours",
        lambda: sign(ED_KEY, "EdDSA", aud=AUD + "-evil"),
        "wrong audience",
    ),
    ("audience list without ours", lambda: sign(ED_KEY, "EdDSA", aud=["a", "b"]), "wrong audience"),
    ("no audience", lambda: sign(ED_KEY, "EdDSA", aud=None), "token has no audience"),
    ("wrong issuer", lambda: sign(ED_KEY, "EdDSA", iss="https://evil.example"), "wrong issuer"),
    (
        "issuer that contains ours (suffix)",
        lambda: sign(ED_KEY, "EdDSA", iss=ISS + ".evil.io"),
        "wrong issuer",
    ),
    (
        "issuer that contains ours (both sides)",
        lambda: sign(ED_KEY, "EdDSA", iss="x" + ISS + "/x"),
        "wrong issuer",
    ),
    ("issuer as a list holding ours", lambda: forge_iss_list(), "wrong issuer"),
    ("no issuer", lambda: sign(ED_KEY, "EdDSA", iss=None), "token has no issuer"),
    ("expired", lambda: sign(ED_KEY, "EdDSA", exp=int(time.time()) - 3600), "token expired"),
    (
        "expired, inside the leeway",
        lambda: sign(ED_KEY, "EdDSA", exp=int(time.time()) - 5),
        "token expired",
    ),
    ("no exp", lambda: sign(ED_KEY, "EdDSA", exp=None), "token has no expiry"),
    (
        "not yet valid",
        lambda: sign(ED_KEY, "EdDSA", nbf=int(time.time()) + 3600),
        "token not yet valid",
    ),
    (
        "unknown crit",
        lambda: sign(ED_KEY, "EdDSA", headers={"crit": ["x-bind"], "x-bind": 1}),
        "unsupported critical header",
    ),
    (
        "b64 crit",
        lambda: sign(ED_KEY, "EdDSA", headers={"crit": ["b64"], "b64": True}),
        "unsupported critical header",
    ),
    ("kid of another key", lambda: sign(ED_KEY2, "EdDSA", kid=kid_of(ED_KEY)), "invalid signature"),
    ("unknown kid", lambda: sign(ED_KEY2, "EdDSA"), "unknown key id"),
    (
        "key type differs from alg (ES256 header, Ed25519 kid)",
        lambda: sign(EC_KEY, "ES256", kid=kid_of(ED_KEY)),
        "algorithm does not match the key",
    ),
    (
        "RS256 header, EC kid",
        lambda: sign(RSA_KEY, "RS256", kid=kid_of(EC_KEY)),
        "algorithm does not match the key",
    ),
    (
        "kidless, signed by an unknown key",
        lambda: sign(ED_KEY2, "EdDSA", kid=None),
        "invalid signature",
    ),
    ("tampered payload", lambda: tamper(sign(ED_KEY, "EdDSA")), "invalid signature"),
    ("no subject", lambda: sign(ED_KEY, "EdDSA", sub=None), "token has no usable subject"),
    (
        "subject with a newline",
        lambda: sign(ED_KEY, "EdDSA", sub="alice\nx"),
        "token has no usable subject",
    ),
    ("garbage", lambda: "eyJhbGciOi.nope.nope", "malformed token"),
    ("too large", lambda: "eyJ" + "a" * 9000 + ".b.c", "token too large"),
]


def forge_iss_list() -> str:
    # pyjwt refuses a list iss on encode; sign it ourselves with the Ed25519 key.
    header = {"alg": "EdDSA", "kid": kid_of(ED_KEY)}
    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims(iss=[ISS])).encode())}"
    return signing + "." + b64(ED_KEY.sign(signing.encode()))


def tamper(token: str) -> str:
    h, p, s = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    body["sub"] = "mallory"
    return f"{h}.{b64(json.dumps(body).encode())}.{s}"


@pytest.mark.parametrize(("what", "make", "reason"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusal(verifier: JwtVerifier, what: str, make: Callable[[], str], reason: str) -> None:
    assert refused(verifier, make()) == reason
    assert verifier.cache_size == 0  # nothing refused is ever cached


async def test_hs256_with_rsa_public_key_when_hs256_enabled(tmp_path: Path) -> None:
    """The classic confusion: HS256 allowed (own secret), RSA key in keyFile. The RSA key's
    kid with alg HS256 is a key/alg mismatch; kid-less it only meets the HMAC secret."""
    pem = tmp_path / "rsa.pub.pem"
    pem.write_bytes(rsa_public_pem())
    secret = tmp_path / "hs.secret"
    secret.write_bytes(HMAC_SECRET)
    secret.chmod(0o600)
    v = JwtVerifier.from_config(
        config(algorithms=("RS256", "HS256"), key_file=str(pem), hs256_secret_file=str(secret)),
        loop=asyncio.get_running_loop(),
    )
    with_kid = forge({"alg": "HS256", "kid": kid_of(RSA_KEY)}, claims(), rsa_public_pem())
    assert refused(v, with_kid) == "algorithm does not match the key"
    kidless = forge({"alg": "HS256"}, claims(), rsa_public_pem())
    assert refused(v, kidless) == "invalid signature"
    other_kid = forge({"alg": "HS256", "kid": "zzz"}, claims(), rsa_public_pem())
    assert refused(v, other_kid) == "invalid signature"
    # The real secret and the real RSA key both still work.
    assert v.verify(pyjwt.encode(claims(), HMAC_SECRET, algorithm="HS256")).subject == "alice"
    assert v.verify(sign(RSA_KEY, "RS256")).subject == "alice"


# ------------------------------------------------------------------------------ the cache


def test_cache_hit_does_not_verify_again(verifier: JwtVerifier) -> None:
    token = sign(ED_KEY, "EdDSA")
    first = verifier.verify(token)
    for _ in range(100):
        assert verifier.verify(token) is first
    assert verifier.verifications == 1 and verifier.cache_hits == 100


def test_cache_is_bounded() -> None:
    v = JwtVerifier(config(), keys=[entry(ED_KEY)], max_cache=8)
    tokens = [sign(ED_KEY, "EdDSA", jti=f"j{i}") for i in range(20)]
    for t in tokens:
        v.verify(t)
    assert v.cache_size == 8 and v.verifications == 20
    v.verify(tokens[0])  # evicted: verified again
    assert v.verifications == 21
    v.verify(tokens[-1])  # still cached
    assert v.verifications == 21


def test_cached_token_expires_at_exp() -> None:
    now = [time.time()]
    v = JwtVerifier(config(), keys=[entry(ED_KEY)], clock=lambda: now[0])
    token = sign(ED_KEY, "EdDSA", exp=int(now[0]) + 100)
    v.verify(token)
    now[0] += 99
    assert v.verify(token).subject == "alice" and v.verifications == 1
    now[0] += 2
    assert refused(v, token) == "token expired"
    assert v.cache_size == 0


# ------------------------------------------------------------------------------ revocation


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def test_revocation_by_jti_and_sub_picked_up_by_mtime(tmp_path: Path) -> None:
    path = tmp_path / "revoked.json"
    mono = Clock()
    rl = RevocationList(str(path), monotonic=mono)  # a missing file revokes nothing
    v = JwtVerifier(config(), keys=[entry(ED_KEY)], revocations=rl)
    cred = v.verify(sign(ED_KEY, "EdDSA", jti="lost-phone"))
    other = v.verify(sign(ED_KEY, "EdDSA", jti="laptop"))
    v.revocations.maybe_reload()  # the sweep's tick
    assert v.revoked_reason(cred) is None
    write_json(path, {"version": 1, "jti": {"lost-phone": {"revoked": "now"}}})
    mono.t += 0.5
    v.revocations.maybe_reload()  # the sweep's tick
    assert v.revoked_reason(cred) is None  # checked at most once a second
    mono.t += 0.6
    v.revocations.maybe_reload()  # the sweep's tick
    assert v.revoked_reason(cred) == "token revoked"
    assert v.revoked_reason(other) is None
    # By subject: tokens issued up to "before"; a token issued later still passes.
    iat = int(time.time())
    old = v.verify(sign(ED_KEY, "EdDSA", jti="o", iat=iat - 100))
    new = v.verify(sign(ED_KEY, "EdDSA", jti="n", iat=iat + 5))
    write_json(path, {"sub": {"alice": {"before": iat}}})
    mono.t += 1.1
    v.revocations.maybe_reload()  # the sweep's tick
    assert v.revoked_reason(old) == "subject revoked"
    assert v.revoked_reason(new) is None
    write_json(path, {"sub": {"alice": {}}})
    mono.t += 1.1
    v.revocations.maybe_reload()  # the sweep's tick
    assert v.revoked_reason(new) == "subject revoked"
    assert v.revoked_reason(Credential("token", "phone")) is None  # static tokens: not here


def test_malformed_revocation_file_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "revoked.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError) as info:
        RevocationList(str(path))
    assert info.value.path == "jwt.revokedFile"
    write_json(path, {"jti": {}})
    mono = Clock()
    v = JwtVerifier(
        config(), keys=[entry(ED_KEY)], revocations=RevocationList(str(path), monotonic=mono)
    )
    cred = v.verify(sign(ED_KEY, "EdDSA"))
    path.write_text('{"jti": {}, "surprise": 1}')
    mono.t += 2
    v.revocations.maybe_reload()  # the sweep's tick
    assert v.revoked_reason(cred) == "revocation list unreadable"
    write_json(path, {"jti": {}})
    mono.t += 2
    v.revocations.maybe_reload()  # the sweep's tick
    assert v.revoked_reason(cred) is None


# ------------------------------------------------------------------------------ key files


async def test_key_files(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    priv = tmp_path / "priv.pem"
    priv.write_bytes(
        ED_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match="private key"):
        JwtVerifier.from_config(config(key_file=str(priv)), loop=loop)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    jwks = tmp_path / "keys.json"
    jwks.write_text(
        json.dumps(
            {
                "keys": [
                    {**public_jwk(small), "kid": "small"},
                    {"kty": "oct", "k": b64(HMAC_SECRET), "kid": "sym"},
                    {**public_jwk(ED_KEY), "kid": "ed", "use": "enc"},
                    {**public_jwk(EC_KEY), "kid": "ec", "alg": "ES256"},
                    {**public_jwk(RSA_KEY), "kid": "rsa-ps", "alg": "PS256"},
                ]
            }
        )
    )
    v = JwtVerifier.from_config(
        config(key_file=str(jwks), algorithms=("ES256", "RS256", "PS256", "EdDSA")), loop=loop
    )
    assert v.verify(sign(EC_KEY, "ES256", kid="ec")).subject == "alice"
    with pytest.warns(InsecureKeyLengthWarning):
        short = sign(small, "RS256", kid="small")
    assert refused(v, short) == "unknown key id"  # too short to be loaded
    assert refused(v, sign(ED_KEY, "EdDSA", kid="ed")) == "unknown key id"  # use: enc
    # A JWK that declares its alg is bound to it: PS256 key, RS256 header.
    assert refused(v, sign(RSA_KEY, "RS256", kid="rsa-ps")) == "algorithm does not match the key"
    assert v.verify(sign(RSA_KEY, "PS256", kid="rsa-ps")).subject == "alice"
    with pytest.raises(ConfigError, match="jwt.jwksUrl"):
        JwtVerifier.from_config(config(jwks_url="http://idp.example.com/jwks"), loop=loop)
    with pytest.raises(ConfigError, match="jwt.jwksUrl"):
        JwtVerifier.from_config(config(jwks_url="file:///etc/passwd"), loop=loop)


def test_parse_ttl() -> None:
    assert parse_ttl("7d") == 7 * 86400 and parse_ttl("90") == 90 and parse_ttl("2w") == 1209600
    for bad in ("0", "7y", "-1d", "400d", ""):
        with pytest.raises(ClawgateError):
            parse_ttl(bad)


def test_issued_token_verifies_with_public_pem(tmp_path: Path) -> None:
    token, c = issue_token(
        ED_KEY, sub="ci-bot", ttl=60, iss=ISS, aud=AUD, scopes=["deploy", "read"]
    )
    v = JwtVerifier(config(), keys=[entry(ED_KEY)])
    cred = v.verify(token)
    assert cred.subject == "ci-bot" and cred.scopes == ("deploy", "read")
    assert cred.jti == c["jti"] and cred.expires_at == c["exp"]


# ------------------------------------------------------------------------------ JWKS URL


class JwksServer:
    """A real HTTP server on 127.0.0.1:0 serving a JWKS that tests swap; counts fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.status = 200
        self.fetches = 0
        self.gate: asyncio.Event | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""

    def serve(self, *keys: Any, kids: list[str] | None = None) -> None:
        self.keys = [
            {**public_jwk(k), "kid": (kids[i] if kids else kid_of(k))} for i, k in enumerate(keys)
        ]

    async def handler(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.status != 200:
            return web.Response(status=self.status)
        return web.json_response({"keys": self.keys})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks", self.handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/jwks"


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    srv = JwksServer()
    await srv.start()
    try:
        yield srv
    finally:
        assert srv.runner is not None
        await srv.runner.cleanup()


def remote(
    srv: JwksServer, mono: Clock, *, cooldown: float = 30.0, cache: float = 300.0
) -> tuple[JwtVerifier, JwksSource]:
    source = JwksSource(
        srv.url,
        loop=asyncio.get_running_loop(),
        cache_seconds=cache,
        cooldown_seconds=cooldown,
        monotonic=mono,
    )
    return JwtVerifier(config(jwks_url=srv.url), jwks=source), source


async def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_first_request_awaits_the_initial_fetch(jwks_server: JwksServer) -> None:
    jwks_server.serve(ED_KEY)
    v = JwtVerifier.from_config(config(jwks_url=jwks_server.url), loop=asyncio.get_running_loop())
    token = sign(ED_KEY, "EdDSA")
    assert v.needs_keys(token)  # the fetch started by from_config is still running
    cred = await v.verify_async(token)
    assert cred.subject == "alice" and jwks_server.fetches == 1
    assert not v.needs_keys(token)
    # A reload that keeps the URL keeps the keys: no new fetch.
    v2 = JwtVerifier.from_config(
        config(jwks_url=jwks_server.url), loop=asyncio.get_running_loop(), previous=v
    )
    assert v2.jwks is v.jwks and v2.verify(token).subject == "alice"
    assert jwks_server.fetches == 1


async def test_rotation_by_kid_and_unknown_kid_cooldown(jwks_server: JwksServer) -> None:
    mono = Clock()
    jwks_server.serve(ED_KEY)
    v, source = remote(jwks_server, mono, cooldown=30.0)
    old_token = sign(ED_KEY, "EdDSA")
    assert (await v.verify_async(old_token)).subject == "alice"
    assert jwks_server.fetches == 1

    # The IdP rotates: ED_KEY2 replaces ED_KEY. Within the cooldown the new kid is unknown
    # and no fetch happens, however many requests ask.
    jwks_server.serve(ED_KEY2)
    new_token = sign(ED_KEY2, "EdDSA")
    mono.t += 10
    assert not v.needs_keys(new_token)
    with pytest.raises(Unauthenticated, match="unknown key id"):
        await v.verify_async(new_token)
    assert jwks_server.fetches == 1

    # After the cooldown: one fetch, and the new key verifies.
    mono.t += 25
    assert v.needs_keys(new_token)
    assert (await v.verify_async(new_token)).subject == "alice"
    assert jwks_server.fetches == 2
    # The removed key takes its tokens with it, cached or not.
    with pytest.raises(Unauthenticated, match="unknown key id"):
        v.verify(old_token)


async def test_flood_of_unknown_kids_costs_one_fetch(jwks_server: JwksServer) -> None:
    mono = Clock()
    jwks_server.serve(ED_KEY)
    v, source = remote(jwks_server, mono, cooldown=30.0)
    await v.verify_async(sign(ED_KEY, "EdDSA"))
    assert jwks_server.fetches == 1
    mono.t += 31
    jwks_server.gate = asyncio.Event()  # hold the fetch so every request overlaps it
    flood = [
        asyncio.ensure_future(v.verify_async(sign(ED_KEY2, "EdDSA", kid=f"made-up-{i}")))
        for i in range(50)
    ]
    await wait_for(lambda: jwks_server.fetches == 2)
    await asyncio.sleep(0.05)  # let every request reach the shared fetch
    jwks_server.gate.set()
    results = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(r, Unauthenticated) and r.reason == "unknown key id" for r in results)
    assert jwks_server.fetches == 2
    # Still in the cooldown: more made-up kids fetch nothing.
    for i in range(20):
        with pytest.raises(Unauthenticated, match="unknown key id"):
            await v.verify_async(sign(ED_KEY2, "EdDSA", kid=f"again-{i}"))
    assert jwks_server.fetches == 2
    mono.t += 30
    with pytest.raises(Unauthenticated, match="unknown key id"):
        await v.verify_async(sign(ED_KEY2, "EdDSA", kid="later"))
    assert jwks_server.fetches == 3


async def test_stale_keys_refresh_in_background_and_survive_errors(jwks_server: JwksServer) -> None:
    mono = Clock()
    jwks_server.serve(ED_KEY)
    v, source = remote(jwks_server, mono, cooldown=5.0, cache=60.0)
    await v.verify_async(sign(ED_KEY, "EdDSA", jti="a"))
    jwks_server.status = 500
    mono.t += 61
    # A cache miss on stale keys starts a background refresh; this request is not held up.
    assert v.verify(sign(ED_KEY, "EdDSA", jti="b")).subject == "alice"
    await wait_for(lambda: jwks_server.fetches == 2 and not source.fetching)
    assert source.last_error == "HTTP 500"
    # The failed fetch kept the keys we had.
    assert v.verify(sign(ED_KEY, "EdDSA", jti="c")).subject == "alice"


async def test_symmetric_key_in_remote_jwks_is_ignored(jwks_server: JwksServer) -> None:
    jwks_server.keys = [{"kty": "oct", "k": b64(HMAC_SECRET), "kid": "sym"}]
    mono = Clock()
    source = JwksSource(
        jwks_server.url,
        loop=asyncio.get_running_loop(),
        cache_seconds=300,
        cooldown_seconds=30,
        monotonic=mono,
    )
    v = JwtVerifier(config(jwks_url=jwks_server.url, algorithms=("HS256", "EdDSA")), jwks=source)
    token = pyjwt.encode(claims(), HMAC_SECRET, algorithm="HS256", headers={"kid": "sym"})
    with pytest.raises(Unauthenticated, match="unknown key id"):
        await v.verify_async(token)
    assert jwks_server.fetches == 1 and source.keys == ()


# ------------------------------------------------------------------------------ policy


@dataclasses.dataclass(frozen=True)
class Ident:
    login: str | None
    tagged: bool = False
    node_name: str = "alice-laptop"
    node_id: str = "n1"
    tags: tuple[str, ...] = ()
    caps: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)


@pytest.mark.parametrize(
    ("mode", "require_identity", "outcome", "status"),
    [
        ("both", True, IdentityOutcome("identity", Ident("alice")), 200),
        ("both", True, IdentityOutcome("identity", Ident("bob")), 403),
        # A tagged node is nobody's device: it cannot carry alice's token.
        ("both", True, IdentityOutcome("identity", Ident(None, True, tags=("tag:ci",))), 403),
        # "either" used to accept the token alone, without the device check.
        ("either", True, IdentityOutcome("identity", Ident("bob")), 403),
        ("either", True, IdentityOutcome("identity", Ident("alice")), 200),
        # No identity required otherwise: the match still is, and nothing proves it.
        ("both", False, IdentityOutcome("none"), 403),
        ("both", True, IdentityOutcome("unknown", reason="not a known tailnet peer"), 403),
        ("both", True, IdentityOutcome("unavailable", reason="down"), 503),
    ],
)
def test_token_subject_must_match_tailscale_user(
    mode: str, require_identity: bool, outcome: IdentityOutcome, status: int
) -> None:
    s = PolicySettings(
        require_token=True,
        require_identity=require_identity,
        auth_mode=mode,
        require_token_user_match=True,
    )
    d = decide(s, token_name="jwt:alice", token_error=None, token_subject="alice", identity=outcome)
    assert d.status == status, d
    assert d.allow == (status == 200)


def test_revocation_lookup_does_no_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The request path only looks up: a stat or a read there would stall the event loop
    # (issue 14). The sweep's tick (maybe_reload) is the only reader of the file.
    path = tmp_path / "revoked.json"
    write_json(path, {"version": 1, "jti": {"lost-phone": {}}})
    mono = Clock()
    rl = RevocationList(str(path), monotonic=mono)
    mono.t += 5

    def no_io(*args: object, **kw: object) -> None:
        raise AssertionError("file I/O on the request path")

    monkeypatch.setattr(os, "stat", no_io)
    monkeypatch.setattr("builtins.open", no_io)
    assert rl.reason(Credential("jwt", "jwt:alice", jti="lost-phone")) == "token revoked"
    assert rl.reason(Credential("jwt", "jwt:alice", jti="laptop")) is None
