"""proxy/core/jwt.py in-process: token + key set + now -> Credential or the exact reason.

The table drives every branch with HMAC-SHA256 signature checks from the standard library
(the core does not care what a ``SignatureCheck`` computes, only what it answers). The
differential test then takes pyjwt as the oracle, with the real signature checks
proxy/access/jwt.py builds on cryptography: a random, mutated token is accepted by
``core.jwt.verify`` if and only if ``pyjwt.decode`` with the same algorithms, issuer,
audience and leeway accepts it, except where clawgate is deliberately stricter (each such
rule is named in ``_stricter``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.access.jwt import algorithms_for_key, signature_checks
from proxy.core.jwt import (
    MAX_HEADER_CHARS,
    MAX_KIDLESS_TRIES,
    MAX_TOKEN_BYTES,
    Key,
    KeySet,
    KeyUnusable,
    Rules,
    b64url_decode,
    parse_header,
    verify,
)
from proxy.errors import Unauthenticated

ISS = "https://issuer.example"
AUD = "clawgate"
NOW = 1_800_000_000.0
LEEWAY = 30.0
RULES = Rules(ISS, AUD, frozenset({"HS256", "EdDSA", "ES256"}), LEEWAY)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def enc(obj: Any) -> str:
    return b64(json.dumps(obj).encode())


def mac(secret: bytes, data: bytes) -> bytes:
    return hmac.new(secret, data, hashlib.sha256).digest()


def check_for(secret: bytes) -> Callable[[bytes, bytes], bool]:
    return lambda si, sig: hmac.compare_digest(sig, mac(secret, si))


A, B, C = b"a" * 32, b"b" * 32, b"c" * 32


def key(kid: str | None, secret: bytes, *algs: str, any_kid: bool = False) -> Key:
    return Key(kid, {alg: check_for(secret) for alg in algs or ("HS256",)}, any_kid=any_kid)


def claims(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "alice",
        "exp": int(NOW) + 300,
        "iat": int(NOW) - 10,
        "jti": "j-1",
        "scope": "read write",
    }
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def token(
    secret: bytes = A,
    *,
    header: dict[str, Any] | None = None,
    raw_payload: str | None = None,
    **kw: Any,
) -> str:
    head = enc(header if header is not None else {"alg": "HS256", "kid": "a"})
    body = raw_payload if raw_payload is not None else enc(claims(**kw))
    return f"{head}.{body}.{b64(mac(secret, f'{head}.{body}'.encode()))}"


def forged(header: Any, payload: str = "e30", sig: str = "") -> str:
    head = header if isinstance(header, str) else enc(header)
    return f"{head}.{payload}.{sig}"


B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def respell(tok: str) -> str:
    """The same signature bytes, spelled with an unused low bit set (43 characters carry
    258 bits for 256): base64 decoders that ignore those bits accept it."""
    assert len(tok.rsplit(".", 1)[1]) % 4 == 3
    return tok[:-1] + B64URL[B64URL.index(tok[-1]) ^ 1]


KEYS = KeySet([key("a", A), key("e", B, "EdDSA"), key(None, C, any_kid=True)])


def reason(tok: str, keys: KeySet = KEYS, rules: Rules = RULES, now: float = NOW) -> str:
    try:
        cred = verify(tok, keys, rules, now)
    except Unauthenticated as exc:
        return str(exc)
    return f"ok:{cred.subject}"


def _raises(exc: Exception) -> Callable[[bytes, bytes], bool]:
    def check(si: bytes, sig: bytes) -> bool:
        raise exc

    return check


FAMILY = KeySet([key(None, bytes([i]) * 32, "ES256") for i in range(MAX_KIDLESS_TRIES + 1)])
HEADER_ES = {"alg": "ES256"}

# (what, token, keys, rules, now, expected): "ok:<subject>" or the exact refusal reason.
EVENTS: list[tuple[str, Callable[[], str], KeySet, Rules, float, str]] = [
    ("valid, kid", lambda: token(), KEYS, RULES, NOW, "ok:alice"),
    (
        "valid, kid-less HS256 meets the secret",
        lambda: token(C, header={"alg": "HS256"}),
        KEYS,
        RULES,
        NOW,
        "ok:alice",
    ),
    (
        "valid, unknown kid meets the secret",
        lambda: token(C, header={"alg": "HS256", "kid": "zz"}),
        KEYS,
        RULES,
        NOW,
        "ok:alice",
    ),
    (
        "unknown kid, secret is HS256 only",
        lambda: token(B, header={"alg": "EdDSA", "kid": "zz"}),
        KEYS,
        RULES,
        NOW,
        "unknown key id",
    ),
    (
        "unknown kid, no secret",
        lambda: token(header={"alg": "HS256", "kid": "zz"}),
        KeySet([key("a", A)]),
        RULES,
        NOW,
        "unknown key id",
    ),
    (
        "kid of another family",
        lambda: token(B, header={"alg": "HS256", "kid": "e"}),
        KEYS,
        RULES,
        NOW,
        "algorithm does not match the key",
    ),
    (
        "kid-less, no key of the family",
        lambda: token(header={"alg": "ES256"}),
        KEYS,
        RULES,
        NOW,
        "algorithm does not match the key",
    ),
    (
        "kid-less, empty key set",
        lambda: token(header={"alg": "HS256"}),
        KeySet(),
        RULES,
        NOW,
        "no verification key available",
    ),
    (
        "kid-less, the key is the last one tried",
        lambda: token(bytes([MAX_KIDLESS_TRIES - 1]) * 32, header=HEADER_ES),
        FAMILY,
        RULES,
        NOW,
        "ok:alice",
    ),
    (
        "kid-less, the key is past the try limit",
        lambda: token(bytes([MAX_KIDLESS_TRIES]) * 32, header=HEADER_ES),
        FAMILY,
        RULES,
        NOW,
        "invalid signature",
    ),
    ("kid of another key", lambda: token(B), KEYS, RULES, NOW, "invalid signature"),
    (
        "tampered payload",
        lambda: token().replace(enc(claims()), enc(claims(sub="mallory"))),
        KEYS,
        RULES,
        NOW,
        "invalid signature",
    ),
    (
        "check: key unusable",
        lambda: token(),
        KeySet([Key("a", {"HS256": _raises(KeyUnusable())})]),
        RULES,
        NOW,
        "algorithm does not match the key",
    ),
    (
        "check: raises ValueError",
        lambda: token(),
        KeySet([Key("a", {"HS256": _raises(ValueError("x"))})]),
        RULES,
        NOW,
        "invalid token",
    ),
    (
        "check: raises TypeError",
        lambda: token(),
        KeySet([Key("a", {"HS256": _raises(TypeError("x"))})]),
        RULES,
        NOW,
        "invalid token",
    ),
    # size and structure
    (
        "too large",
        lambda: "eyJ" + "a" * MAX_TOKEN_BYTES + ".b.c",
        KEYS,
        RULES,
        NOW,
        "token too large",
    ),
    ("no dot", lambda: "eyJhbGciOiJIUzI1NiJ9", KEYS, RULES, NOW, "malformed token"),
    (
        "header too long",
        lambda: "a" * (MAX_HEADER_CHARS + 4) + ".e30.",
        KEYS,
        RULES,
        NOW,
        "malformed token",
    ),
    ("header not base64url", lambda: "eyJ!.e30.", KEYS, RULES, NOW, "malformed token"),
    ("header impossible length", lambda: "abcde.e30.", KEYS, RULES, NOW, "malformed token"),
    (
        "header padded",
        lambda: b64(b'{"alg":"HS256","kid":"a"}') + "=." + "e30.",
        KEYS,
        RULES,
        NOW,
        "malformed token",
    ),
    ("header not JSON", lambda: forged(b64(b"{nope")), KEYS, RULES, NOW, "malformed token"),
    (
        "header nested past the recursion limit",
        lambda: forged(b64(b"[" * 3000)),
        KEYS,
        RULES,
        NOW,
        "malformed token",
    ),
    ("header a list", lambda: forged(["alg"]), KEYS, RULES, NOW, "malformed token"),
    ("alg missing", lambda: forged({"kid": "a"}), KEYS, RULES, NOW, "malformed token"),
    ("alg empty", lambda: forged({"alg": ""}), KEYS, RULES, NOW, "malformed token"),
    ("alg a number", lambda: forged({"alg": 256}), KEYS, RULES, NOW, "malformed token"),
    ("alg none", lambda: forged({"alg": "none"}), KEYS, RULES, NOW, "unsigned token refused"),
    (
        "alg NoNe",
        lambda: forged({"alg": "NoNe"}, sig="eA"),
        KEYS,
        RULES,
        NOW,
        "unsigned token refused",
    ),
    (
        "alg not configured",
        lambda: forged({"alg": "RS256"}),
        KEYS,
        RULES,
        NOW,
        "algorithm not allowed",
    ),
    (
        "crit",
        lambda: token(header={"alg": "HS256", "kid": "a", "crit": ["exp"]}),
        KEYS,
        RULES,
        NOW,
        "unsupported critical header",
    ),
    (
        "b64 without crit",
        lambda: token(header={"alg": "HS256", "kid": "a", "b64": True}),
        KEYS,
        RULES,
        NOW,
        "unsupported critical header",
    ),
    (
        "kid a number",
        lambda: forged({"alg": "HS256", "kid": 1}),
        KEYS,
        RULES,
        NOW,
        "malformed token",
    ),
    (
        "two segments",
        lambda: enc({"alg": "HS256", "kid": "a"}) + ".e30",
        KEYS,
        RULES,
        NOW,
        "malformed token",
    ),
    ("four segments", lambda: token() + ".x", KEYS, RULES, NOW, "malformed token"),
    (
        "payload not base64url",
        lambda: forged({"alg": "HS256", "kid": "a"}, "e3*"),
        KEYS,
        RULES,
        NOW,
        "malformed token",
    ),
    (
        "signature re-spelled (non-canonical bits)",
        lambda: respell(token()),
        KEYS,
        RULES,
        NOW,
        "malformed token",
    ),
    ("signature padded", lambda: token() + "=", KEYS, RULES, NOW, "malformed token"),
    (
        "empty signature",
        lambda: forged({"alg": "HS256", "kid": "a"}),
        KEYS,
        RULES,
        NOW,
        "invalid signature",
    ),
    (
        "payload not JSON",
        lambda: token(raw_payload=b64(b"{nope")),
        KEYS,
        RULES,
        NOW,
        "malformed token",
    ),
    ("payload a list", lambda: token(raw_payload=enc([1])), KEYS, RULES, NOW, "malformed token"),
    ("payload empty", lambda: token(raw_payload=""), KEYS, RULES, NOW, "malformed token"),
    # times
    ("no exp", lambda: token(exp=None), KEYS, RULES, NOW, "token has no expiry"),
    (
        "exp null",
        lambda: token(raw_payload=b64(b'{"exp": null}')),
        KEYS,
        RULES,
        NOW,
        "token has no expiry",
    ),
    ("iat a list", lambda: token(iat=[1]), KEYS, RULES, NOW, "invalid token"),
    (
        "iat NaN",
        lambda: token(raw_payload=b64(b'{"exp": 9999999999, "iat": NaN}')),
        KEYS,
        RULES,
        NOW,
        "invalid token",
    ),
    (
        "iat in the future past the leeway",
        lambda: token(iat=int(NOW + LEEWAY) + 1),
        KEYS,
        RULES,
        NOW,
        "token not yet valid",
    ),
    (
        "iat in the future inside the leeway",
        lambda: token(iat=int(NOW + LEEWAY)),
        KEYS,
        RULES,
        NOW,
        "ok:alice",
    ),
    ("iat as a digit string", lambda: token(iat=str(int(NOW))), KEYS, RULES, NOW, "ok:alice"),
    ("nbf garbage", lambda: token(nbf="soon"), KEYS, RULES, NOW, "malformed token"),
    (
        "nbf Infinity",
        lambda: token(raw_payload=b64(b'{"exp": 9999999999, "nbf": Infinity}')),
        KEYS,
        RULES,
        NOW,
        "malformed token",
    ),
    (
        "nbf past the leeway",
        lambda: token(nbf=int(NOW + LEEWAY) + 1),
        KEYS,
        RULES,
        NOW,
        "token not yet valid",
    ),
    ("nbf inside the leeway", lambda: token(nbf=int(NOW + LEEWAY)), KEYS, RULES, NOW, "ok:alice"),
    ("exp garbage", lambda: token(exp="later"), KEYS, RULES, NOW, "malformed token"),
    (
        "exp past the leeway",
        lambda: token(exp=int(NOW - LEEWAY)),
        KEYS,
        RULES,
        NOW,
        "token expired",
    ),
    (
        "exp past, inside the leeway",
        lambda: token(exp=int(NOW) - 1),
        KEYS,
        RULES,
        NOW,
        "token expired",
    ),
    ("exp now exactly", lambda: token(exp=int(NOW)), KEYS, RULES, NOW, "token expired"),
    (
        "exp past, inside the leeway, wrong issuer",
        lambda: token(exp=int(NOW) - 1, iss="x"),
        KEYS,
        RULES,
        NOW,
        "wrong issuer",
    ),
    ("exp true", lambda: token(exp=True), KEYS, RULES, NOW, "token expired"),
    (
        "exp a digit string",
        lambda: token(exp=str(int(NOW) + 300)),
        KEYS,
        RULES,
        NOW,
        "token has no expiry",
    ),
    ("exp past the float range", lambda: token(exp=10**400), KEYS, RULES, NOW, "malformed token"),
    ("exp past 2**53", lambda: token(exp=2**53 + 1), KEYS, RULES, NOW, "malformed token"),
    ("iat past the float range", lambda: token(iat=10**400), KEYS, RULES, NOW, "invalid token"),
    ("nbf past the float range", lambda: token(nbf=10**400), KEYS, RULES, NOW, "malformed token"),
    ("exp a float", lambda: token(exp=NOW + 0.5), KEYS, RULES, NOW, "ok:alice"),
    ("sub a number", lambda: token(sub=7), KEYS, RULES, NOW, "invalid token"),
    ("jti a number", lambda: token(jti=7), KEYS, RULES, NOW, "invalid token"),
    (
        "jti null",
        lambda: token(raw_payload=enc({**claims(), "jti": None})),
        KEYS,
        RULES,
        NOW,
        "invalid token",
    ),
    # issuer, audience, subject, scopes
    ("no issuer", lambda: token(iss=None), KEYS, RULES, NOW, "token has no issuer"),
    ("issuer with a suffix", lambda: token(iss=ISS + ".evil"), KEYS, RULES, NOW, "wrong issuer"),
    ("issuer as a list", lambda: token(iss=[ISS]), KEYS, RULES, NOW, "wrong issuer"),
    ("no audience", lambda: token(aud=None), KEYS, RULES, NOW, "token has no audience"),
    ("audience another", lambda: token(aud="other"), KEYS, RULES, NOW, "wrong audience"),
    ("audience list with ours", lambda: token(aud=["x", AUD]), KEYS, RULES, NOW, "ok:alice"),
    ("audience list without ours", lambda: token(aud=["x"]), KEYS, RULES, NOW, "wrong audience"),
    (
        "audience list not of strings",
        lambda: token(aud=[AUD, 1]),
        KEYS,
        RULES,
        NOW,
        "wrong audience",
    ),
    ("audience an object", lambda: token(aud={AUD: 1}), KEYS, RULES, NOW, "wrong audience"),
    ("no subject", lambda: token(sub=None), KEYS, RULES, NOW, "token has no usable subject"),
    ("empty subject", lambda: token(sub=""), KEYS, RULES, NOW, "token has no usable subject"),
    (
        "subject too long",
        lambda: token(sub="a" * 257),
        KEYS,
        RULES,
        NOW,
        "token has no usable subject",
    ),
    ("subject of 256", lambda: token(sub="a" * 256), KEYS, RULES, NOW, "ok:" + "a" * 256),
    (
        "subject with a newline",
        lambda: token(sub="a\nb"),
        KEYS,
        RULES,
        NOW,
        "token has no usable subject",
    ),
    (
        "custom subject claim not a string",
        lambda: token(email=["x"]),
        KEYS,
        Rules(ISS, AUD, frozenset({"HS256"}), subject_claim="email"),
        NOW,
        "token has no usable subject",
    ),
    (
        "custom subject claim",
        lambda: token(email="b@x"),
        KEYS,
        Rules(ISS, AUD, frozenset({"HS256"}), subject_claim="email"),
        NOW,
        "ok:b@x",
    ),
    ("scopes an object", lambda: token(scope={"a": 1}), KEYS, RULES, NOW, "malformed scopes claim"),
    (
        "scopes a list with a number",
        lambda: token(scope=["a", 1]),
        KEYS,
        RULES,
        NOW,
        "malformed scopes claim",
    ),
]


@pytest.mark.parametrize(
    ("what", "make", "keys", "rules", "now", "expected"), EVENTS, ids=[e[0] for e in EVENTS]
)
def test_event(
    what: str, make: Callable[[], str], keys: KeySet, rules: Rules, now: float, expected: str
) -> None:
    assert reason(make(), keys, rules, now) == expected


def test_credential_fields() -> None:
    exp = int(NOW) + 300
    cred = verify(token(exp=exp), KEYS, RULES, NOW)
    assert (cred.kind, cred.name, cred.subject) == ("jwt", "jwt:alice", "alice")
    assert cred.scopes == ("read", "write") and cred.jti == "j-1"
    assert cred.expires_at == float(exp) and cred.claims["iss"] == ISS
    with pytest.raises(TypeError):
        cred.claims["iss"] = "x"  # type: ignore[index]  # read-only view
    assert verify(token(scope=None, jti=None), KEYS, RULES, NOW).scopes == ()
    assert verify(token(scope=["a", "b"]), KEYS, RULES, NOW).scopes == ("a", "b")
    assert verify(token(jti=None), KEYS, RULES, NOW).jti is None


def test_key_set_and_key() -> None:
    assert "a" in KEYS and None in KEYS and "zz" not in KEYS
    assert key("e", B, "EdDSA", "ES256").algorithms == frozenset({"EdDSA", "ES256"})


@pytest.mark.parametrize(
    ("segment", "decoded"),
    [
        ("", b""),
        ("YQ", b"a"),
        ("YWI", b"ab"),
        ("YWJj", b"abc"),
        ("-_8", b"\xfb\xff"),
        ("YR", None),  # non-canonical: the same byte as "YQ"
        ("YQ==", None),
        ("Y", None),
        ("Y+", None),
        ("Y/", None),
        ("YQ ", None),
        ("\u0661\u0662", None),  # non-ASCII digits
    ],
)
def test_b64url_decode(segment: str, decoded: bytes | None) -> None:
    assert b64url_decode(segment) == decoded


def test_parse_header() -> None:
    assert parse_header(token()) == {"alg": "HS256", "kid": "a"}
    assert parse_header("e30") is None
    assert parse_header("e30.") == {}


# ------------------------------------------------------------------ differential: pyjwt


def _ed() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


ED, ED_OTHER = _ed(), _ed()
EC = ec.generate_private_key(ec.SECP256R1())
RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
HS = b"h" * 32
RSA_PEM = RSA.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
PUBLIC: dict[str, Any] = {"ed": ED.public_key(), "ec": EC.public_key(), "rsa": RSA.public_key()}
DIFF_KEYS = KeySet(
    [
        *(Key(kid, signature_checks(pub, algorithms_for_key(pub))) for kid, pub in PUBLIC.items()),
        Key(None, signature_checks(HS, {"HS256"}), any_kid=True),
    ]
)
ALGS = ["EdDSA", "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "HS256", "none"]


def _pss(h: hashes.HashAlgorithm) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)


SIGNERS: dict[str, Callable[[bytes], bytes]] = {
    "ed/EdDSA": ED.sign,
    "ed_other/EdDSA": ED_OTHER.sign,
    "ec/ES256": lambda m: pyjwt.get_algorithm_by_name("ES256").sign(m, EC),
    "rsa/RS256": lambda m: RSA.sign(m, padding.PKCS1v15(), hashes.SHA256()),
    "rsa/RS384": lambda m: RSA.sign(m, padding.PKCS1v15(), hashes.SHA384()),
    "rsa/PS256": lambda m: RSA.sign(m, _pss(hashes.SHA256()), hashes.SHA256()),
    "hs/HS256": lambda m: mac(HS, m),
    "pem/HS256": lambda m: mac(RSA_PEM, m),  # the RSA public key used as an HMAC secret
    "nothing": lambda m: b"",
}
ORACLE_KEYS: dict[str | None, Any] = {None: HS}
ORACLE_KEYS.update(PUBLIC)


# The dimensions a generated token can get wrong; most tokens get none or one of them wrong,
# so that acceptance is common enough for the comparison to mean something.
FAULTS = (
    "algorithms",
    "alg",
    "kid",
    "crit",
    "exp",
    "nbf",
    "iat",
    "iss",
    "aud",
    "sub",
    "jti",
    "signer",
    "mutation",
)


@st.composite
def tokens(draw: st.DrawFn, now: int) -> tuple[str, frozenset[str]]:
    n = draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3]))
    faults = set(draw(st.lists(st.sampled_from(FAULTS), min_size=n, max_size=n)))

    def pick(dimension: str, good: Any, bad: list[Any]) -> Any:
        return draw(st.sampled_from([good, *bad])) if dimension in faults else good

    good_signers = [k for k in sorted(SIGNERS) if k.split("/")[0] in ("ed", "ec", "rsa", "hs")]
    signer = draw(st.sampled_from(good_signers))
    signer = pick("signer", signer, ["ed_other/EdDSA", "pem/HS256", "nothing", *good_signers])
    own = signer.split("/")[-1]
    algorithms = frozenset(draw(st.sets(st.sampled_from(ALGS[:-1]), max_size=3)) | {own})
    algorithms = pick("algorithms", algorithms, [algorithms - {own} or frozenset({"ES384"})])
    alg = pick("alg", own, ALGS)
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    owner = signer.split("/")[0]
    kid = owner if owner in PUBLIC else None
    kid = draw(st.sampled_from([kid, None])) if kid is not None else kid
    kid = pick("kid", kid, ["ed", "ec", "rsa", "zz", None])
    if kid is not None:
        header["kid"] = kid
    header.update(pick("crit", {}, [{"crit": ["b64"], "b64": True}, {"b64": True}]))
    # Offsets keep 5 s from every boundary (pyjwt reads the real clock).
    times = {
        "exp": pick("exp", 100, [-LEEWAY - 100, -LEEWAY - 5, -5, 5, 10**6, "x", True, None]),
        "nbf": pick("nbf", draw(st.sampled_from([None, -100])), [LEEWAY - 5, LEEWAY + 5, "x"]),
        "iat": pick("iat", draw(st.sampled_from([None, -100])), [LEEWAY - 5, LEEWAY + 5, [1]]),
    }
    body: dict[str, Any] = {
        "iss": pick("iss", ISS, [ISS + "x", [ISS], None, 5]),
        "aud": pick("aud", draw(st.sampled_from([AUD, [AUD, "x"]])), [["x"], "x", "", [], None]),
        "sub": pick("sub", "alice", ["", "a\nb", "a" * 257, 5, None]),
        "jti": pick("jti", draw(st.sampled_from(["j", None])), [5, None]),
    }
    for name, offset in times.items():
        if isinstance(offset, int | float) and not isinstance(offset, bool):
            body[name] = now + offset + draw(st.sampled_from([0, 0.5]))
        else:
            body[name] = offset
    body = {k: v for k, v in body.items() if v is not None}
    head, payload = enc(header), enc(body)
    signature = b64(SIGNERS[signer](f"{head}.{payload}".encode()))
    mutation = pick("mutation", "none", ["payload", "sig", "cut", "pad", "bits"])
    if mutation == "payload":
        payload = enc({**body, "sub": "mallory"})
    elif mutation == "sig" and signature:
        raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
        raw[draw(st.integers(0, len(raw) - 1))] ^= 1 << draw(st.integers(0, 7))
        signature = b64(bytes(raw))
    elif mutation == "cut":
        signature = signature[: len(signature) // 2]
    elif mutation == "pad":
        payload += "=" * (-len(payload) % 4)
    elif mutation == "bits" and len(signature) % 4 in (2, 3):
        signature = signature[:-1] + "-"  # "-" (62) has low bits set: non-canonical here
    return f"{head}.{payload}.{signature}", algorithms


def _stricter(tok: str) -> str | None:
    """A token pyjwt may accept that clawgate refuses on purpose: the rule's name."""
    if "=" in tok:
        return "no base64 padding (RFC 7515 section 2)"
    header = json.loads(b64url_decode(tok.split(".")[0]) or b"{}")
    if "crit" in header or "b64" in header:
        return "any crit or b64 header refuses (we implement no extension)"
    return None


def _oracle(tok: str, algorithms: frozenset[str], now: float) -> dict[str, Any] | None:
    """pyjwt's answer for the key(s) clawgate's kid rules select: kid names its key, an
    unknown kid reaches only the HS256 secret, a kid-less token may meet any key."""
    try:
        header = pyjwt.get_unverified_header(tok)
    except pyjwt.PyJWTError:
        return None
    kid = header.get("kid")
    if kid is None:
        candidates = list(ORACLE_KEYS.values())
    elif kid in ORACLE_KEYS:
        candidates = [ORACLE_KEYS[kid]]
    else:
        candidates = [HS] if header.get("alg") == "HS256" else []
    for k in candidates:
        try:
            body: dict[str, Any] = pyjwt.decode(
                tok,
                k,
                algorithms=sorted(algorithms),
                audience=AUD,
                issuer=ISS,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud"]},
            )
        except (pyjwt.PyJWTError, TypeError, ValueError):
            continue
        # clawgate's own claim rules on top: a printable subject of 1..256 characters, a
        # numeric exp, and no admission past exp (the leeway is for iat/nbf skew only).
        sub, exp = body.get("sub"), body["exp"]
        if not (isinstance(sub, str) and 0 < len(sub) <= 256 and sub.isprintable()):
            return None
        if isinstance(exp, bool) or not isinstance(exp, int | float) or exp <= now:
            return None
        return body
    return None


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_differential_against_pyjwt(data: st.DataObject) -> None:
    now = time.time()
    tok, algorithms = data.draw(tokens(int(now)))
    rules = Rules(ISS, AUD, algorithms, LEEWAY)
    try:
        got: dict[str, Any] | None = dict(verify(tok, DIFF_KEYS, rules, now).claims)
    except Unauthenticated:
        got = None
    rule = _stricter(tok)
    if rule is not None:
        assert got is None, rule
        return
    assert got == _oracle(tok, algorithms, now), tok


def test_differential_generator_reaches_both_answers() -> None:
    """The oracle comparison is not vacuous: hand-made tokens of each family pass."""
    now = time.time()
    for signer, kid in (
        ("ed/EdDSA", "ed"),
        ("ec/ES256", "ec"),
        ("rsa/PS256", "rsa"),
        ("hs/HS256", None),
    ):
        alg = signer.split("/")[1]
        header = {"alg": alg, **({"kid": kid} if kid else {})}
        body = {"iss": ISS, "aud": AUD, "sub": "alice", "exp": int(now) + 100}
        si = f"{enc(header)}.{enc(body)}"
        tok = f"{si}.{b64(SIGNERS[signer](si.encode()))}"
        rules = Rules(ISS, AUD, frozenset({alg}), LEEWAY)
        assert dict(verify(tok, DIFF_KEYS, rules, now).claims) == _oracle(
            tok, rules.algorithms, now
        )


# ------------------------------------------------------------------ the checks access builds

EC384 = ec.generate_private_key(ec.SECP384R1())
EC521 = ec.generate_private_key(ec.SECP521R1())
SIGNING: list[tuple[Any, Any, str]] = [
    (RSA, RSA.public_key(), "RS256"),
    (RSA, RSA.public_key(), "RS384"),
    (RSA, RSA.public_key(), "RS512"),
    (RSA, RSA.public_key(), "PS256"),
    (RSA, RSA.public_key(), "PS384"),
    (EC, EC.public_key(), "ES256"),
    (EC384, EC384.public_key(), "ES384"),
    (EC521, EC521.public_key(), "ES512"),
    (ED, ED.public_key(), "EdDSA"),
    (HS, HS, "HS256"),
    (HS * 2, HS * 2, "HS384"),
    (HS * 2, HS * 2, "HS512"),
]


@pytest.mark.parametrize(("private", "public", "alg"), SIGNING, ids=[s[2] for s in SIGNING])
def test_signature_check_agrees_with_pyjwt_signing(private: Any, public: Any, alg: str) -> None:
    si, _, sig = pyjwt.encode({"a": 1}, private, algorithm=alg).rpartition(".")
    raw = b64url_decode(sig)
    assert raw is not None
    check = signature_checks(public, {alg})[alg]
    assert check(si.encode(), raw)
    assert not check(si.encode() + b"x", raw)
    assert not check(si.encode(), raw[:-1])  # a short signature is a bad one, not an error
    assert not check(si.encode(), bytes(len(raw)))


@pytest.mark.parametrize(
    ("public", "alg"),
    [
        (EC.public_key(), "ES384"),  # P-256 key, ES384: the curve is the algorithm's
        (EC384.public_key(), "ES256"),
        (RSA.public_key(), "HS256"),
        (RSA.public_key(), "ES256"),
        (ED.public_key(), "RS256"),
        (HS, "EdDSA"),
        (b"", "HS256"),
        (RSA_PEM, "HS256"),  # pyjwt's rule: a PEM key is no HMAC secret
        (RSA.public_key(), "XS256"),
    ],
)
def test_signature_check_of_a_key_that_cannot_serve_the_alg(public: Any, alg: str) -> None:
    check = signature_checks(public, {alg})[alg]
    with pytest.raises(KeyUnusable):
        check(b"x", b"y")
