"""The edge gate's decision over a connect request and a pairing-store snapshot, as a table.

Every row is (first frame, store) -> admitted method or refusal reason; the store rows
mirror the gateway's own verifyDeviceToken / verifyDeviceBootstrapToken outcomes.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from proxy.core.connect_auth import (
    BOOTSTRAP_TTL_MS,
    BootstrapRecord,
    ConnectAuth,
    DeviceRecord,
    DeviceTokenRecord,
    StoreSnapshot,
    StoreUnavailable,
    Verdict,
    decide,
    device_id_from_public_key,
    needs_store,
    normalize_public_key,
    parse_connect,
    shared_generations,
)
from proxy.core.tokens import digest

GW = "gateway-shared-token-0123456789"
GW_D = digest(GW)
GENS = shared_generations(GW.encode())
NOW = 1_800_000_000_000
DEV_TOKEN = "dev-token-Nd5qp7YIoQvaVNOADS1SPW3DyVA9FP7Kc8QFdRyaAko"
BOOT = "boot-S7kK3r0RI9lBCV2agCrfjjwknzbIsLKnSukTgKw78OM"


def _key() -> tuple[str, str, str]:
    """(raw base64url public key, its PEM, device id) of a fresh Ed25519 key."""
    pub = Ed25519PrivateKey.generate().public_key()
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return (
        base64.urlsafe_b64encode(raw).rstrip(b"=").decode(),
        pem,
        hashlib.sha256(raw).hexdigest(),
    )


KEY, KEY_PEM, DEV = _key()
OTHER_KEY, _, OTHER_DEV = _key()


def _store(**over: Any) -> StoreSnapshot:
    tok = over.pop("token", DeviceTokenRecord(digest(DEV_TOKEN)))
    devices = {DEV: DeviceRecord(KEY, {"operator": tok}, browser=over.pop("browser", False))}
    boot = over.pop("bootstrap", (BootstrapRecord(digest(BOOT), NOW - 1000),))
    return StoreSnapshot(devices=devices, bootstrap=boot)


def frame(
    auth: dict[str, Any] | None = None, *, device: Any = "mine", role: str | None = None
) -> bytes:
    params: dict[str, Any] = {"minProtocol": 4, "maxProtocol": 4}
    if auth is not None:
        params["auth"] = auth
    if device == "mine":
        params["device"] = {"id": DEV, "publicKey": KEY, "signature": "x", "nonce": "n"}
    elif device is not None:
        params["device"] = device
    if role is not None:
        params["role"] = role
    return json.dumps({"type": "req", "id": "1", "method": "connect", "params": params}).encode()


STORE = _store()
# (id, frame, store, expected): expected is "admit:<method>" or the refusal reason.
ROWS: list[tuple[str, bytes, Any, str]] = [
    # -- the shared secret (as before)
    ("token", frame({"token": GW}, device=None), None, "admit:gateway-token"),
    (
        "token, spaces trimmed",
        frame({"token": f"  {GW} "}, device=None),
        None,
        "admit:gateway-token",
    ),
    ("password", frame({"password": GW}, device=None), None, "admit:gateway-token"),
    ("token + device, no store", frame({"token": GW}), None, "admit:gateway-token"),
    (
        "token + garbage deviceToken",
        frame({"token": GW, "deviceToken": "junk"}),
        STORE,
        "admit:gateway-token",
    ),
    ("wrong token", frame({"token": "WRONG"}, device=None), None, "gateway token mismatch"),
    ("no auth", frame(None, device=None), None, "connect request carries no gateway token"),
    (
        "empty token",
        frame({"token": "  "}, device=None),
        None,
        "connect request carries no gateway token",
    ),
    (
        "non-string token",
        frame({"token": 123}, device=None),
        None,
        "connect request carries no gateway token",
    ),
    (
        "runtime token alone",
        frame({"approvalRuntimeToken": "x", "agentRuntimeIdentityToken": "y"}),
        STORE,
        "connect request carries no gateway token",
    ),
    (
        "runtime token + gateway token",
        frame({"token": GW, "approvalRuntimeToken": "x"}),
        STORE,
        "admit:gateway-token",
    ),
    # -- a paired device's token
    ("deviceToken", frame({"deviceToken": DEV_TOKEN}), STORE, "admit:device-token"),
    (
        "deviceToken, PEM key",
        frame({"deviceToken": DEV_TOKEN}, device={"id": DEV, "publicKey": KEY_PEM}),
        STORE,
        "admit:device-token",
    ),
    ("device token in the token field", frame({"token": DEV_TOKEN}), STORE, "admit:device-token"),
    (
        "wrong token + right deviceToken",
        frame({"token": "WRONG", "deviceToken": DEV_TOKEN}),
        STORE,
        "admit:device-token",
    ),
    ("deviceToken, wrong", frame({"deviceToken": "forged"}), STORE, "device token mismatch"),
    (
        "deviceToken, no device",
        frame({"deviceToken": DEV_TOKEN}, device=None),
        STORE,
        "device credential without a device identity",
    ),
    (
        "deviceToken, unpaired device",
        frame({"deviceToken": DEV_TOKEN}, device={"id": OTHER_DEV, "publicKey": OTHER_KEY}),
        STORE,
        "device not paired",
    ),
    (
        "deviceToken, id not of its key",
        frame({"deviceToken": DEV_TOKEN}, device={"id": DEV, "publicKey": OTHER_KEY}),
        STORE,
        "device id does not match its public key",
    ),
    (
        "deviceToken, unparsable key",
        frame({"deviceToken": DEV_TOKEN}, device={"id": DEV, "publicKey": "not-a-key"}),
        STORE,
        "device id does not match its public key",
    ),
    (
        "deviceToken, other role",
        frame({"deviceToken": DEV_TOKEN}, role="node"),
        STORE,
        "no device token for this role",
    ),
    (
        "deviceToken, revoked",
        frame({"deviceToken": DEV_TOKEN}),
        _store(token=DeviceTokenRecord(digest(DEV_TOKEN), revoked=True)),
        "device token revoked",
    ),
    (
        "revoked, wrong token too",
        frame({"deviceToken": "forged"}),
        _store(token=DeviceTokenRecord(digest(DEV_TOKEN), revoked=True)),
        "device token mismatch",
    ),
    (
        "browser token of this gateway token",
        frame({"deviceToken": DEV_TOKEN}),
        _store(
            token=DeviceTokenRecord(
                digest(DEV_TOKEN),
                issuer_kind="shared-gateway-auth",
                issuer_generation=sorted(GENS)[0],
            ),
            browser=True,
        ),
        "admit:device-token",
    ),
    (
        "browser token of a rotated gateway token",
        frame({"deviceToken": DEV_TOKEN}),
        _store(
            token=DeviceTokenRecord(
                digest(DEV_TOKEN), issuer_kind="shared-gateway-auth", issuer_generation="stale"
            ),
            browser=True,
        ),
        "device token issued under another gateway token",
    ),
    (
        "legacy browser token (no issuer)",
        frame({"deviceToken": DEV_TOKEN}),
        _store(browser=True),
        "legacy browser device token",
    ),
    (
        "deviceToken, store unreadable",
        frame({"deviceToken": DEV_TOKEN}),
        StoreUnavailable("cannot read"),
        "gateway device store unavailable",
    ),
    (
        "deviceToken, no store configured",
        frame({"deviceToken": DEV_TOKEN}),
        None,
        "device tokens are not accepted at this gate",
    ),
    (
        "wrong token + device, store unreadable",
        frame({"token": "WRONG"}),
        StoreUnavailable("cannot read"),
        "gateway token mismatch",
    ),
    ("wrong token + device", frame({"token": "WRONG"}), STORE, "gateway token mismatch"),
    ("device, no credential", frame(None), STORE, "connect request carries no gateway token"),
    # -- a setup code's bootstrap token
    ("bootstrapToken", frame({"bootstrapToken": BOOT}), STORE, "admit:bootstrap-token"),
    (
        "bootstrapToken, forged",
        frame({"bootstrapToken": "forged"}),
        STORE,
        "bootstrap token invalid",
    ),
    (
        "bootstrapToken, no device",
        frame({"bootstrapToken": BOOT}, device=None),
        STORE,
        "device credential without a device identity",
    ),
    (
        "bootstrapToken, expired",
        frame({"bootstrapToken": BOOT}),
        _store(bootstrap=(BootstrapRecord(digest(BOOT), NOW - BOOTSTRAP_TTL_MS - 1),)),
        "bootstrap token expired",
    ),
    (
        "bootstrapToken, at the TTL",
        frame({"bootstrapToken": BOOT}),
        _store(bootstrap=(BootstrapRecord(digest(BOOT), NOW - BOOTSTRAP_TTL_MS),)),
        "admit:bootstrap-token",
    ),
    (
        "bootstrapToken, bound to this device",
        frame({"bootstrapToken": BOOT}),
        _store(bootstrap=(BootstrapRecord(digest(BOOT), NOW, DEV, KEY),)),
        "admit:bootstrap-token",
    ),
    (
        "bootstrapToken, bound to another device",
        frame({"bootstrapToken": BOOT}),
        _store(bootstrap=(BootstrapRecord(digest(BOOT), NOW, OTHER_DEV, OTHER_KEY),)),
        "bootstrap token bound to another device",
    ),
    (
        "bootstrapToken, one of several",
        frame({"bootstrapToken": BOOT}),
        _store(
            bootstrap=(
                BootstrapRecord(digest("a"), NOW),
                BootstrapRecord(digest(BOOT), NOW),
                BootstrapRecord(digest("b"), NOW),
            )
        ),
        "admit:bootstrap-token",
    ),
    (
        "bad bootstrap + good deviceToken",
        frame({"bootstrapToken": "forged", "deviceToken": DEV_TOKEN}),
        STORE,
        "admit:device-token",
    ),
    (
        "good bootstrap + bad deviceToken",
        frame({"bootstrapToken": BOOT, "deviceToken": "forged"}),
        STORE,
        "admit:bootstrap-token",
    ),
    (
        "bootstrapToken, store unreadable",
        frame({"bootstrapToken": BOOT}),
        StoreUnavailable("x"),
        "gateway device store unavailable",
    ),
    (
        "wrong password + device, nothing else to try",
        frame({"password": "WRONG"}),
        STORE,
        "gateway token mismatch",
    ),
    (
        "good deviceToken, the store pairs this id with another key",
        frame({"deviceToken": DEV_TOKEN}),
        StoreSnapshot(
            devices={
                DEV: DeviceRecord(OTHER_KEY, {"operator": DeviceTokenRecord(digest(DEV_TOKEN))})
            },
            bootstrap=(),
        ),
        "device key mismatch",
    ),
]


@pytest.mark.parametrize(
    ("first", "store", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_decision_table(first: bytes, store: Any, expected: str) -> None:
    auth = parse_connect(first)
    assert isinstance(auth, ConnectAuth)
    v = decide(auth, GW_D, store, now_ms=NOW, generations=GENS)
    got = f"admit:{v.method}" if v.admit else v.reason
    assert got == expected
    if v.admit and v.method != "gateway-token":
        assert v.device_id == DEV and v.binding is None
    if v.admit and v.method == "gateway-token":
        assert v.binding == GW_D  # the tunnel is bound to the secret that matched


@pytest.mark.parametrize(
    "first",
    [
        frame({"token": GW}, device=None),
        frame({"deviceToken": DEV_TOKEN}),
        frame({"bootstrapToken": BOOT}),
    ],
)
def test_gateway_token_removed_meanwhile_admits_nothing(first: bytes) -> None:
    # A reload removed gatewayToken while this first frame was in flight: the gate is off.
    auth = parse_connect(first)
    assert isinstance(auth, ConnectAuth)
    assert decide(auth, None, STORE, now_ms=NOW, generations=GENS) == Verdict(
        False, "gateway token mismatch"
    )


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "first frame is not JSON"),
        (b"\xff\xfe", "first frame is not JSON"),
        (b"[]", "first frame must be the connect request"),
        (
            json.dumps({"type": "req", "method": "health"}).encode(),
            "first frame must be the connect request",
        ),
        (
            json.dumps({"type": "event", "method": "connect"}).encode(),
            "first frame must be the connect request",
        ),
    ],
)
def test_parse_refusals(payload: bytes, reason: str) -> None:
    assert parse_connect(payload) == reason


def test_parse_normalizes_like_the_gateway() -> None:
    auth = parse_connect(
        json.dumps(
            {
                "type": "req",
                "method": "connect",
                "params": {
                    "role": " node ",
                    "auth": {
                        "token": " t ",
                        "deviceToken": "",
                        "bootstrapToken": None,
                        "approvalRuntimeToken": "r",
                    },
                    "device": {"id": f" {DEV} ", "publicKey": KEY},
                },
            }
        ).encode()
    )
    assert auth == ConnectAuth(
        token="t", device_id=DEV, public_key=KEY, role="node", secondary=("approvalRuntimeToken",)
    )
    half = parse_connect(frame({}, device={"id": DEV}))  # no key: not a device identity
    assert isinstance(half, ConnectAuth) and not half.has_device
    bad = parse_connect(json.dumps({"type": "req", "method": "connect", "params": "x"}).encode())
    assert bad == ConnectAuth()


@pytest.mark.parametrize(
    ("first", "needed"),
    [
        (frame({"token": GW}), False),
        (frame({"token": "WRONG"}, device=None), False),
        (frame({"token": "WRONG"}), True),
        (frame({"deviceToken": "x"}), True),
        (frame({"deviceToken": "x"}, device=None), False),
        (frame({"bootstrapToken": "x"}), True),
        (frame({"password": "WRONG"}), False),
        (frame(None), False),
    ],
)
def test_needs_store(first: bytes, needed: bool) -> None:
    auth = parse_connect(first)
    assert isinstance(auth, ConnectAuth)
    assert needs_store(auth, GW_D) is needed


@pytest.mark.parametrize(
    ("first", "needed"),
    [
        # No gateway token in force: the shared secret matches nothing, so a device
        # credential (or the token as a device-token candidate) is what is left to look up.
        (frame({"token": GW}), True),
        (frame({"token": GW}, device=None), False),
        (frame({"deviceToken": "x"}), True),
        (frame({"password": GW}), False),
    ],
)
def test_needs_store_without_a_gateway_token(first: bytes, needed: bool) -> None:
    auth = parse_connect(first)
    assert isinstance(auth, ConnectAuth)
    assert needs_store(auth, None) is needed


def test_public_key_forms_and_device_id() -> None:
    raw = base64.urlsafe_b64decode(KEY + "=")
    std = base64.b64encode(raw).decode()
    spki = base64.urlsafe_b64encode(bytes.fromhex("302a300506032b6570032100") + raw).decode()
    for form in (KEY, KEY + "=", std, KEY_PEM, spki):
        assert normalize_public_key(form) == KEY, form
        assert device_id_from_public_key(form) == DEV
    for bad in ("", "abc", base64.b64encode(b"x" * 31).decode(), "-----BEGIN X-----\n!!\n"):
        assert normalize_public_key(bad) is None


def _pem(der: bytes) -> str:
    body = base64.b64encode(der).decode()
    return f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n"


X25519_PEM = (
    X25519PrivateKey.generate()
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
_RAW = base64.urlsafe_b64decode(KEY + "=")
_SPKI = bytes.fromhex("302a300506032b6570032100")


@pytest.mark.parametrize(
    ("pem", "normalized"),
    [
        (_pem(_SPKI + _RAW), KEY),
        # Well-formed PEM, but not an Ed25519 key: another curve's SPKI, a bare raw key,
        # an SPKI one byte short or long.
        (X25519_PEM, None),
        (_pem(_RAW), None),
        (_pem(_SPKI + _RAW[:-1]), None),
        (_pem(_SPKI + _RAW + b"\x00"), None),
        (_pem(bytes.fromhex("302a300506032b6571032100") + _RAW), None),  # Ed448's OID
    ],
)
def test_pem_must_be_an_ed25519_spki(pem: str, normalized: str | None) -> None:
    assert normalize_public_key(pem) == normalized
    assert device_id_from_public_key(pem) == (DEV if normalized else None)


def test_shared_generations_match_the_gateway() -> None:
    # resolveSharedGatewaySessionGeneration: sha256Base64Url(`${mode}\0${secret}`).
    h = hashlib.sha256(b"token\x00" + GW.encode()).digest()
    assert base64.urlsafe_b64encode(h).rstrip(b"=").decode() in GENS
    assert len(GENS) == 2
