"""Which credentials in an OpenClaw ``connect`` request the edge gate admits (pure).

The gateway accepts four kinds of client credential in ``params.auth`` (openclaw 2026.9.6,
``resolveConnectAuthState``/``resolveConnectAuthDecisionCore``): the shared secret
(``token`` or ``password``), a paired device's ``deviceToken`` (also tried from ``token``
when it is not the shared secret), and a setup code's ``bootstrapToken``; the two device
kinds only count together with ``params.device``. This module decides, from the parsed
frame and a digest-only snapshot of the gateway's own pairing store, whether the gateway
would accept the credential, so that one it would refuse never reaches it. No I/O here:
the snapshot is read by ``proxy.gateway_store``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .tokens import digest

__all__ = [
    "BOOTSTRAP_TTL_MS",
    "BootstrapRecord",
    "ConnectAuth",
    "DeviceRecord",
    "DeviceTokenRecord",
    "StoreSnapshot",
    "StoreUnavailable",
    "Verdict",
    "decide",
    "device_id_from_public_key",
    "normalize_public_key",
    "parse_connect",
    "shared_generations",
]

# DEVICE_BOOTSTRAP_TOKEN_TTL_MS in the gateway: a setup code's token lives 10 minutes.
BOOTSTRAP_TTL_MS = 600_000
# The DER prefix of an Ed25519 SubjectPublicKeyInfo; the raw key is the 32 bytes after it.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
# Device tokens of these clients are browser tokens (isBrowserRelatedPairedDevice).
_BROWSER_CLIENT_IDS = frozenset({"openclaw-control-ui", "webchat-ui"})
_SHARED_ISSUER = "shared-gateway-auth"
# Auth fields the gateway knows; the two runtime tokens never authenticate a remote client
# on their own (approvals need a non-remote locality, the agent identity rides on another
# credential), so they pass only next to a verified one.
_SECONDARY_FIELDS = ("approvalRuntimeToken", "agentRuntimeIdentityToken")


@dataclass(frozen=True, slots=True)
class ConnectAuth:
    """The credential-bearing parts of a ``connect`` request, normalized like the gateway
    (strings trimmed, empty = absent, role defaults to ``operator``)."""

    token: str | None = None
    password: str | None = None
    device_token: str | None = None
    bootstrap_token: str | None = None
    secondary: tuple[str, ...] = ()  # names of runtime tokens present
    device_id: str | None = None
    public_key: str | None = None
    role: str = "operator"

    @property
    def has_device(self) -> bool:
        return self.device_id is not None and self.public_key is not None


@dataclass(frozen=True, slots=True)
class DeviceTokenRecord:
    digest: bytes
    revoked: bool = False
    issuer_kind: str | None = None
    issuer_generation: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    public_key: str  # normalized raw base64url
    tokens: Mapping[str, DeviceTokenRecord] = field(default_factory=dict)
    browser: bool = False


@dataclass(frozen=True, slots=True)
class BootstrapRecord:
    digest: bytes
    issued_at_ms: int
    device_id: str | None = None
    public_key: str | None = None


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """Digests only: the gateway stores its pairing tokens in plaintext, we never keep them."""

    devices: Mapping[str, DeviceRecord] = field(default_factory=dict)
    bootstrap: tuple[BootstrapRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class StoreUnavailable:
    reason: str


@dataclass(frozen=True, slots=True)
class Verdict:
    admit: bool
    reason: str  # refusal reason (sent in the close frame), or the admitted method
    method: str | None = None  # "gateway-token", "device-token", "bootstrap-token"
    device_id: str | None = None
    binding: bytes | None = None  # gateway-token: the digest of the secret that matched


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return None


def parse_connect(payload: bytes) -> ConnectAuth | str:
    """The credentials of a first frame, or the reason it is not a usable connect request."""
    try:
        msg: Any = json.loads(payload)
    except (UnicodeError, ValueError):
        return "first frame is not JSON"
    if not isinstance(msg, dict) or msg.get("type") != "req" or msg.get("method") != "connect":
        return "first frame must be the connect request"
    params = msg.get("params")
    if not isinstance(params, dict):
        params = {}
    auth = params.get("auth")
    if not isinstance(auth, dict):
        auth = {}
    device = params.get("device")
    device_id = public_key = None
    if isinstance(device, dict):
        device_id = _text(device.get("id"))
        public_key = _text(device.get("publicKey"))
    role = _text(params.get("role")) or "operator"
    return ConnectAuth(
        token=_text(auth.get("token")),
        password=_text(auth.get("password")),
        device_token=_text(auth.get("deviceToken")),
        bootstrap_token=_text(auth.get("bootstrapToken")),
        secondary=tuple(k for k in _SECONDARY_FIELDS if _text(auth.get(k))),
        device_id=device_id,
        public_key=public_key,
        role=role,
    )


def _b64url_decode(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def normalize_public_key(key: str) -> str | None:
    """PEM, base64 or base64url Ed25519 public key -> canonical raw base64url (no padding),
    as the gateway's normalizeEd25519PublicKeyBase64Url; None if it is not one."""
    key = key.strip()
    if "BEGIN" in key:
        body = "".join(line for line in key.splitlines() if line and "-----" not in line)
        try:
            der = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(der) != 44 or not der.startswith(_ED25519_SPKI_PREFIX):
            return None
        raw: bytes | None = der[12:]
    else:
        raw = _b64url_decode(key.replace("+", "-").replace("/", "_").rstrip("="))
        if raw is not None and len(raw) == 44 and raw.startswith(_ED25519_SPKI_PREFIX):
            raw = raw[12:]
    if raw is None or len(raw) != 32:
        return None
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def device_id_from_public_key(key: str) -> str | None:
    """The gateway's device id: SHA-256 (hex) of the raw public key."""
    norm = normalize_public_key(key)
    if norm is None:
        return None
    raw = _b64url_decode(norm)
    return hashlib.sha256(raw).hexdigest() if raw is not None else None


def shared_generations(secret: bytes) -> frozenset[str]:
    """resolveSharedGatewaySessionGeneration for the shared secret, in token and in
    password mode (the edge does not know which one the gateway runs)."""
    out = set()
    for mode in (b"token", b"password"):
        h = hashlib.sha256(mode + b"\x00" + secret).digest()
        out.add(base64.urlsafe_b64encode(h).rstrip(b"=").decode("ascii"))
    return frozenset(out)


def _shared(auth: ConnectAuth, gateway_digest: bytes | None) -> tuple[bool | None, bytes]:
    """(True/False for the shared secret, i.e. the first of token and password, or None if
    there is none; its digest). No gateway token configured: nothing matches."""
    secret = auth.token or auth.password
    if secret is None:
        return None, b""
    presented = digest(secret)
    if gateway_digest is None:
        return False, presented
    return hmac.compare_digest(presented, gateway_digest), presented


def _check_device_token(
    auth: ConnectAuth, candidate: str, snap: StoreSnapshot, generations: frozenset[str]
) -> str | None:
    """None if the gateway's verifyDeviceToken would accept ``candidate``; else why not."""
    assert auth.device_id is not None
    presented = digest(candidate)
    dev = snap.devices.get(auth.device_id)
    if dev is None:
        # Same work as a hit, so timing does not tell which device ids are paired.
        hmac.compare_digest(presented, bytes(32))
        return "device not paired"
    entry = dev.tokens.get(auth.role)
    if entry is None:
        hmac.compare_digest(presented, bytes(32))
        return "no device token for this role"
    if not hmac.compare_digest(presented, entry.digest):
        return "device token mismatch"
    if entry.revoked:
        return "device token revoked"
    if normalize_public_key(auth.public_key or "") != dev.public_key:
        return "device key mismatch"
    if entry.issuer_kind == _SHARED_ISSUER:
        if entry.issuer_generation not in generations:
            return "device token issued under another gateway token"
    elif entry.issuer_kind is None and dev.browser:
        return "legacy browser device token"
    return None


def _check_bootstrap(auth: ConnectAuth, token: str, snap: StoreSnapshot, now_ms: int) -> str | None:
    """None if the gateway's verifyDeviceBootstrapToken could accept it; else why not."""
    presented = digest(token)
    found: BootstrapRecord | None = None
    for rec in snap.bootstrap:  # every record compared: no early exit on a match
        if hmac.compare_digest(presented, rec.digest) and found is None:
            found = rec
    if found is None:
        return "bootstrap token invalid"
    if now_ms - found.issued_at_ms > BOOTSTRAP_TTL_MS:
        return "bootstrap token expired"
    if found.device_id is not None or found.public_key is not None:
        if found.device_id != auth.device_id or found.public_key != normalize_public_key(
            auth.public_key or ""
        ):
            return "bootstrap token bound to another device"
    return None


def needs_store(auth: ConnectAuth, gateway_digest: bytes | None) -> bool:
    """Whether deciding needs the pairing store (the shared secret alone does not admit)."""
    return (
        not _shared(auth, gateway_digest)[0]
        and auth.has_device
        and bool(auth.device_token or auth.bootstrap_token or auth.token)
    )


def decide(
    auth: ConnectAuth,
    gateway_digest: bytes | None,
    store: StoreSnapshot | StoreUnavailable | None,
    *,
    now_ms: int,
    generations: frozenset[str] = frozenset(),
) -> Verdict:
    """Admit the first frame iff the gateway would accept one of its credentials.

    ``gateway_digest``: the gateway token in force now; None (a reload removed it while the
    frame was in flight): the gate is off, nothing is admitted (fail closed).
    ``store`` None: device and bootstrap tokens are not verified at this edge (refused).
    ``generations``: ``shared_generations(gateway secret)``.
    """
    if gateway_digest is None:
        return Verdict(False, "gateway token mismatch")
    shared, presented = _shared(auth, gateway_digest)
    if shared:
        return Verdict(True, "gateway token", "gateway-token", binding=presented)
    pairing = auth.device_token is not None or auth.bootstrap_token is not None
    if not auth.has_device:
        # The gateway ignores device and bootstrap tokens without params.device.
        if pairing:
            return Verdict(False, "device credential without a device identity")
        if shared is False:
            return Verdict(False, "gateway token mismatch")
        return Verdict(False, "connect request carries no gateway token")
    assert auth.device_id is not None and auth.public_key is not None
    # The gateway derives the id from the key and refuses a mismatch (device-id-mismatch).
    if device_id_from_public_key(auth.public_key) != auth.device_id:
        return Verdict(False, "device id does not match its public key")
    if not pairing and auth.token is None:
        # Only a password (wrong) or nothing at all: no device-token fallback to try.
        if shared is False:
            return Verdict(False, "gateway token mismatch")
        return Verdict(False, "connect request carries no gateway token")
    if store is None or isinstance(store, StoreUnavailable):
        if not pairing:
            return Verdict(False, "gateway token mismatch")
        if store is None:
            return Verdict(False, "device tokens are not accepted at this gate")
        return Verdict(False, "gateway device store unavailable")
    why_bootstrap = None
    if auth.bootstrap_token is not None:
        why_bootstrap = _check_bootstrap(auth, auth.bootstrap_token, store, now_ms)
        if why_bootstrap is None:
            return Verdict(True, "bootstrap token", "bootstrap-token", auth.device_id)
    # resolveDeviceTokenCandidate: the explicit deviceToken, else the token field.
    candidate = auth.device_token or auth.token
    why_device = None
    if candidate is not None:
        why_device = _check_device_token(auth, candidate, store, generations)
        if why_device is None:
            return Verdict(True, "device token", "device-token", auth.device_id)
    if auth.device_token is not None and why_device is not None:
        return Verdict(False, why_device)
    if why_bootstrap is not None:
        return Verdict(False, why_bootstrap)
    return Verdict(False, "gateway token mismatch")
