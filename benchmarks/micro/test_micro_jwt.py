"""Micro-benchmark of JwtVerifier.verify(): a cache hit (the hot path) against a full
verification per algorithm. Not part of the test run (testpaths is tests/ and the plugin
is disabled by addopts); run with:

    .venv/bin/pytest benchmarks/micro/test_micro_jwt.py --benchmark-enable -p no:randomly
"""

from __future__ import annotations

import time
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from proxy.access.jwt import JwtVerifier, KeyEntry, algorithms_for_key, jwk_thumbprint, public_jwk
from proxy.config import JwtConfig

ISS, AUD = "https://idp.example.com", "openclaw"
SECRET = b"k" * 48
KEYS: dict[str, Any] = {
    "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
}


def _setup(alg: str, max_cache: int) -> tuple[JwtVerifier, str]:
    cfg = JwtConfig(
        enabled=True, algorithms=("EdDSA", "ES256", "RS256", "HS256"), issuer=ISS, audience=AUD
    )
    claims = {
        "iss": ISS,
        "aud": AUD,
        "sub": "alice",
        "exp": int(time.time()) + 3600,
        "jti": "j",
        "scope": "a b",
    }
    if alg == "HS256":
        entry = KeyEntry(None, SECRET, frozenset({"HS256"}), "secret")
        return JwtVerifier(cfg, keys=[entry], max_cache=max_cache), pyjwt.encode(
            claims, SECRET, algorithm="HS256"
        )
    key = KEYS[alg]
    kid = jwk_thumbprint(public_jwk(key))
    pub = key.public_key()
    v = JwtVerifier(
        cfg, keys=[KeyEntry(kid, pub, algorithms_for_key(pub), "file")], max_cache=max_cache
    )
    return v, pyjwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


@pytest.fixture(autouse=True)
def _only_when_enabled(request: pytest.FixtureRequest) -> None:
    # Not the benchmark fixture itself: an unused one warns, and warnings are errors.
    opt = request.config.getoption
    if opt("benchmark_disable") and not opt("benchmark_enable"):
        pytest.skip("benchmarks run only with --benchmark-enable")


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256", "HS256"])
def test_verify_cache_hit(benchmark: Any, alg: str) -> None:
    v, token = _setup(alg, 10000)
    v.verify(token)
    cred = benchmark(v.verify, token)
    assert cred.subject == "alice" and v.verifications == 1


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256", "HS256"])
def test_verify_cache_miss(benchmark: Any, alg: str) -> None:
    v, token = _setup(alg, 0)  # max_cache=0: every call verifies in full
    cred = benchmark(v.verify, token)
    assert cred.subject == "alice" and v.verifications > 1 and v.cache_hits == 0
