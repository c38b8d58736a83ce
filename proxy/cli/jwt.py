"""``clawgate token keygen|issue`` and JWT revocation (``token revoke --jti/--sub``).

This module owns the signing side of clawgate's own JWTs: a local key pair (private key
mode 0600, public PEM and JWKS beside it), tokens signed with it (printed once), and the
revocation file the verifier reads. Nothing here runs inside the proxy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ..access.jwt import jwk_thumbprint, parse_revocations, public_jwk
from ..errors import ClawgateError
from .common import load, try_reload

__all__ = ["register", "revoke_jwt", "parse_ttl", "default_key_path", "issue_token"]

_TTL_RE = re.compile(r"^(\d+)([smhdw]?)$")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_TTL = 366 * 86400


def parse_ttl(text: str) -> int:
    """``90``, ``15m``, ``12h``, ``7d``, ``2w`` -> seconds (1 s to 366 days)."""
    m = _TTL_RE.match(text.strip())
    if m is None:
        raise ClawgateError(f"--ttl {text!r}: use a number with s, m, h, d or w (e.g. 7d)")
    seconds = int(m.group(1)) * _TTL_UNITS[m.group(2)]
    if not 1 <= seconds <= MAX_TTL:
        raise ClawgateError(f"--ttl {text!r}: must be between 1s and 366d")
    return seconds


def default_key_path() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "clawgate", "jwt-signing-key.pem")


def _sibling(path: Path, suffix: str) -> Path:
    stem = path.name[:-4] if path.name.endswith(".pem") else path.name
    return path.with_name(stem + suffix)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + "-", dir=str(path.parent))
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _alg_for(key: Any) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    raise ClawgateError("the signing key is not an Ed25519, P-256 or RSA private key")


def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out or default_key_path())
    if out.exists() and not args.force:
        raise ClawgateError(
            f"{out} exists; pass --force to replace it (tokens signed with "
            "the old key stop verifying once its public key is removed)"
        )
    key: Any
    if args.alg == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
    elif args.alg == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwk = public_jwk(key)
    jwk.update({"kid": jwk_thumbprint(jwk), "alg": args.alg, "use": "sig"})
    jwks = json.dumps({"keys": [jwk]}, indent=2).encode() + b"\n"
    _write_atomic(out, private_pem, 0o600)
    pub_path, jwks_path = _sibling(out, ".pub.pem"), _sibling(out, ".jwks.json")
    _write_atomic(pub_path, public_pem, 0o644)
    _write_atomic(jwks_path, jwks, 0o644)
    print(public_pem.decode(), end="")
    print(jwks.decode(), end="")
    print(
        f"clawgate: private key {out} (mode 0600; keep it secret)\n"
        f"clawgate: public key {pub_path}, JWKS {jwks_path} (kid {jwk['kid']})\n"
        f'clawgate: verify with "jwt": {{"enabled": true, "keyFile": "{jwks_path}", '
        '"algorithms": ["' + args.alg + '"], "issuer": ..., "audience": ...}',
        file=sys.stderr,
    )
    return 0


def _load_private_key(path: str) -> Any:
    try:
        st = os.stat(path)
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ClawgateError(
            f"cannot read signing key {path}: {exc.strerror} (make one with: clawgate token keygen)"
        ) from None
    if st.st_mode & 0o077:
        print(
            f"clawgate: warning: {path} is readable by group/others: chmod 600 it", file=sys.stderr
        )
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ClawgateError(f"{path}: not an unencrypted PEM private key ({exc})") from None


def issue_token(
    key: Any,
    *,
    sub: str,
    ttl: int,
    iss: str,
    aud: str,
    scopes: list[str],
    scopes_claim: str = "scope",
    now: float | None = None,
) -> tuple[str, dict[str, Any]]:
    """Sign a token with ``key``; return it and its claims (for the message, never logs)."""
    alg = _alg_for(key)
    jwk = public_jwk(key)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": iss,
        "aud": aud,
        "sub": sub,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl,
        "jti": secrets.token_urlsafe(16),
    }
    if scopes:
        claims[scopes_claim] = " ".join(scopes)
    token = pyjwt.encode(
        claims, key, algorithm=alg, headers={"kid": jwk_thumbprint(jwk), "typ": "JWT"}
    )
    return token, claims


def cmd_issue(args: argparse.Namespace) -> int:
    cfg = load(args).jwt
    iss = args.iss or cfg.issuer
    aud = args.aud or cfg.audience
    if not iss or not aud:
        raise ClawgateError("say --iss and --aud (or set jwt.issuer and jwt.audience)")
    if not args.sub or not args.sub.isprintable() or len(args.sub) > 256:
        raise ClawgateError("--sub must be a printable name of at most 256 characters")
    scopes = [s for item in args.scope or [] for s in item.split()]
    key = _load_private_key(args.key or default_key_path())
    token, claims = issue_token(
        key,
        sub=args.sub,
        ttl=parse_ttl(args.ttl),
        iss=iss,
        aud=aud,
        scopes=scopes,
        scopes_claim=cfg.scopes_claim,
    )
    print(token)
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims["exp"]))
    print(
        f"clawgate: token for {args.sub!r} (jti {claims['jti']}) expires {expires}; "
        "it is shown once, keep it now; revoke with: clawgate token revoke --jti "
        f"{claims['jti']}",
        file=sys.stderr,
    )
    return 0


def revoke_jwt(args: argparse.Namespace) -> int:
    """``clawgate token revoke --jti X | --sub Y``: write jwt.revokedFile, then reload."""
    jti, sub = getattr(args, "jti", None), getattr(args, "sub", None)
    if bool(jti) == bool(sub):
        raise ClawgateError("say exactly one of --jti or --sub")
    cfg = load(args)
    path_s = cfg.jwt.revoked_file
    if not path_s:
        raise ClawgateError("set jwt.revokedFile in the config to revoke JWTs")
    path = Path(path_s)
    try:
        data: dict[str, Any] = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        data = {"version": 1, "jti": {}, "sub": {}}
    except (OSError, ValueError) as exc:
        raise ClawgateError(f"{path}: cannot read the revocation list ({exc})") from None
    try:
        parse_revocations(data)
    except ValueError as exc:
        raise ClawgateError(f"{path}: {exc}") from None
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    data.setdefault("version", 1)
    if jti:
        data.setdefault("jti", {})[jti] = {"revoked": stamp}
        what = f"jti {jti}"
    else:
        # Tokens issued up to now: a token issued later for the same subject still works.
        data.setdefault("sub", {})[sub] = {"revoked": stamp, "before": int(now)}
        what = f"subject {sub!r} (tokens issued up to {stamp})"
    _write_atomic(path, json.dumps(data, indent=2).encode() + b"\n", 0o600)
    if try_reload(args, quiet=True):
        print(
            f"revoked {what}; the running clawgate reloaded and ended its sessions", file=sys.stderr
        )
    else:
        print(
            f"revoked {what} in {path}; a running clawgate picks it up within a second",
            file=sys.stderr,
        )
    return 0


def register(
    tsub: argparse._SubParsersAction,  # type: ignore[type-arg]
    with_config: Any,
) -> None:
    """Add ``token keygen`` and ``token issue`` (``revoke --jti/--sub`` is in tokens.py)."""
    kg = with_config(tsub.add_parser("keygen", help="make a JWT signing key pair"))
    kg.add_argument(
        "--out", metavar="PATH", help=f"private key file (default: {default_key_path()})"
    )
    kg.add_argument("--alg", choices=("EdDSA", "ES256", "RS256"), default="EdDSA")
    kg.add_argument("--force", action="store_true", help="replace an existing key")
    kg.set_defaults(func=cmd_keygen)
    ti = with_config(tsub.add_parser("issue", help="sign a JWT and print it once"))
    ti.add_argument("--sub", required=True, help="subject: the identity the policy sees")
    ti.add_argument("--ttl", default="7d", help="lifetime: 90s, 15m, 12h, 7d, 2w (default 7d)")
    ti.add_argument("--scope", action="append", help="a scope (repeat, or space-separated)")
    ti.add_argument("--aud", help="audience (default: jwt.audience from the config)")
    ti.add_argument("--iss", help="issuer (default: jwt.issuer from the config)")
    ti.add_argument("--key", metavar="PATH", help="private key (default: the keygen default)")
    ti.set_defaults(func=cmd_issue)
