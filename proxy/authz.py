"""Who is asking, and may they: credentials, Tailscale identity, policy, and the headers
the gateway is told.

This module gathers the inputs of the pure decision (``core.policy.decide``): the
credential (static token, JWT, login session, or the gateway's own token), and the peer's
Tailscale identity through the cache. It never lets an unexpected path through: every
failure becomes a deny with a reason. It also builds what the gateway receives (the
rewritten head with forwarding and identity headers) and serves clawgate's login page.
"""

from __future__ import annotations

import hmac
import html
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, quote

from .core.connect_auth import shared_generations
from .core.http1 import RequestHead, rewrite_request_head
from .core.policy import (
    ALLOW_EXEMPT,
    Decision,
    IdentityLike,
    IdentityOutcome,
    PolicySettings,
    decide,
)
from .core.sessions import SessionStoreLike, StoreUnavailable, session_key
from .core.tokens import (
    Credential,
    Presented,
    TokenSet,
    cookie_value,
    digest,
    looks_like_jwt,
    read_authorization,
    session_cookie,
)
from .errors import (
    LocalAPIUnavailable,
    PeerNotFound,
    TailscaleError,
    Unauthenticated,
)

if TYPE_CHECKING:
    import asyncio

    from .accesslog import AccessLog
    from .config import Config
    from .metrics import Metrics
    from .tailscale import TailscaleMonitor

__all__ = [
    "Grant",
    "Authorizer",
    "Peer",
    "AuthzRuntime",
    "policy_settings",
    "JwtVerifierLike",
    "IdentityCacheLike",
    "q_encode",
]

_NONE = IdentityOutcome("none")
# The name logs and sessions use for the gateway's own token (never the token itself).
GATEWAY_TOKEN_NAME = "gateway-token"  # noqa: S105
# The credential of an upgrade whose gateway token is in its first frame (gate.py checks it).
_FIRST_FRAME = Credential("gateway-token", f"{GATEWAY_TOKEN_NAME} (first frame)")


class JwtVerifierLike(Protocol):
    def verify(self, token: str) -> Credential: ...
    # True when verify() should wait for a key fetch first (JWKS: unknown kid, no keys yet);
    # prepare() awaits that fetch. The decision itself stays synchronous.
    def needs_keys(self, token: str) -> bool: ...
    async def prepare(self, token: str) -> None: ...


class IdentityCacheLike(Protocol):
    def get(self, ip: str, port: int = 0) -> Any: ...
    async def lookup(self, ip: str, port: int) -> Any: ...


class AuthzRuntime(Protocol):
    """What authorization reaches through a connection's ``rt`` (proxy.runtime.Runtime is
    one): the Host check, the lockout table, counters, the log, tailscaled's state."""

    @property
    def metrics(self) -> Metrics: ...
    @property
    def log(self) -> AccessLog: ...
    @property
    def monitor(self) -> TailscaleMonitor | None: ...
    def check_host(self, conn: Peer, head: RequestHead) -> None: ...
    def check_lockout(self, conn: Peer, identity: IdentityLike | None) -> None: ...
    def lockout_left(self, conn: Peer, identity: IdentityLike | None) -> float: ...
    def note_denied(
        self, conn: Peer, status: int, identity: IdentityLike | None = None
    ) -> None: ...
    def end_logged_out(self, key: bytes | None = None) -> int: ...


class Peer(Protocol):
    """A client connection as authorization sees it (front.ClientConnection is one).

    A Protocol, not the class: front imports this module (and proxy.runtime, which
    imports this module too), so naming front here would close an import cycle.
    """

    @property
    def rt(self) -> AuthzRuntime: ...
    @property
    def conn_id(self) -> int: ...
    @property
    def peer_ip(self) -> str: ...
    @property
    def peer_port(self) -> int: ...
    @property
    def is_loopback_peer(self) -> bool: ...
    @property
    def tls(self) -> bool: ...
    @property
    def proto(self) -> bytes: ...
    @property
    def transport(self) -> asyncio.BaseTransport | None: ...
    @property
    def grant(self) -> Grant | None: ...


@dataclass(slots=True)
class Grant:
    """The outcome of authorization for one request."""

    decision: Decision
    credential: Credential | None = None
    identity: Any = None  # proxy.tailscale.Identity when known
    identity_kind: str = "none"
    drop_authorization: bool = False
    retry_after: int | None = None
    gated: bool = False  # the gateway token must still be checked in the first frame
    extra: dict[str, Any] = field(default_factory=dict)


# Go's mime.QEncoding keeps printable ASCII except '=', '?' and '_' (its writeQString).
_Q_KEEP = frozenset(chr(b) for b in range(0x21, 0x7F)) - {"=", "?", "_"}
# RFC 2047: an encoded-word is at most 75 characters; Go's maxContentLen = 75 - 12.
_Q_MAX_CONTENT = 63


def q_encode(value: str) -> str:
    """RFC 2047 Q-encoding exactly as `tailscale serve` sends Tailscale-User-* values
    (Go's ``mime.QEncoding.Encode("utf-8", v)``): printable ASCII unchanged, otherwise
    encoded-words of at most 75 characters, split between characters, joined by a space.
    CR, LF and NUL are refused (ValueError), never encoded into something that passes.
    """
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError("control character in identity value")
    if all(" " <= c <= "~" or c == "\t" for c in value):
        return value
    words: list[str] = []
    cur: list[str] = []
    size = 0
    for ch in value:
        if ch in _Q_KEEP or ch == " ":
            piece, n = ("_" if ch == " " else ch), 1
        else:
            data = ch.encode("utf-8")  # a lone surrogate raises: refused, like CR/LF
            piece, n = "".join(f"={b:02X}" for b in data), 3 * len(data)
        if size + n > _Q_MAX_CONTENT:
            words.append("".join(cur))
            cur, size = [], 0
        cur.append(piece)
        size += n
    words.append("".join(cur))
    return " ".join(f"=?utf-8?q?{w}?=" for w in words)


def policy_settings(cfg: Config, identity_present: bool) -> PolicySettings:
    """The decision's settings for a config; ``identity_present``: an identity source
    (tailscaled's LocalAPI) is set up. Pure: the combination audit tests it."""
    ts = cfg.tailscale
    require_identity = ts.require_identity
    if require_identity is None:
        # Tailscaled present, or a policy that names identities: required (fail closed).
        require_identity = identity_present or ts.identity_needed
    return PolicySettings(
        require_token=cfg.gateway.require_token,
        require_identity=require_identity,
        auth_mode=ts.auth_mode,
        allow_users=ts.allow_users,
        allow_tags=ts.allow_tags,
        allow_nodes=ts.allow_nodes,
        require_capability=ts.require_capability,
        require_token_user_match=cfg.jwt.require_tailscale_user,
    )


class Authorizer:
    """Per-config authorization state. Rebuilt on reload; holds no connection state."""

    def __init__(
        self,
        cfg: Config,
        tokens: TokenSet,
        sessions: SessionStoreLike,
        *,
        identity: IdentityCacheLike | None,
        identity_present: bool,
        jwt: JwtVerifierLike | None = None,
        gateway_token: bytes | None = None,
        revoked: Callable[[Credential], str | None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.tokens = tokens
        self.sessions = sessions
        self.identity = identity
        self.jwt = jwt
        self.gateway_token_digest = digest(gateway_token) if gateway_token else None
        # The credential the gateway's own token grants, built once (frozen).
        self._gateway_cred = (
            None
            if self.gateway_token_digest is None
            else Credential("gateway-token", GATEWAY_TOKEN_NAME, binding=self.gateway_token_digest)
        )
        # The gateway's session generations for its shared secret (device tokens it issued
        # to browsers under this secret carry one).
        self.gateway_generations = (
            shared_generations(gateway_token) if gateway_token else frozenset[str]()
        )
        self.revoked = revoked
        ts = cfg.tailscale
        self.settings = policy_settings(cfg, identity_present)
        self.exempt = frozenset(p.encode() for p in cfg.gateway.exempt_paths)
        self.cookie_name = cfg.tokens.cookie_name.encode()
        norm = ts.identity_header.lower().replace("_", "-").encode()
        self.identity_norm = frozenset({norm})
        self.identity_header = ts.identity_header.encode()
        # _identity_lines' cache: id(identity) -> (identity, its header lines).
        self._ident_lines: dict[int, tuple[object, tuple[tuple[bytes, bytes], ...]]] = {}
        self.want_identity = identity is not None
        self._static_ok = self.settings.require_token or len(tokens) > 0

    # ------------------------------------------------------------------ credentials

    def credential(
        self,
        head: RequestHead,
        presented: Presented | None = None,
    ) -> tuple[Credential | None, str | None, bool]:
        """(credential, error, drop_authorization).

        clawgate's session cookie is stripped from every forwarded request anyway (the
        rewrite), valid or not, so there is nothing to say about it here.

        ``presented``: the Authorization header as read_authorization parsed it (the caller
        parsed it already to see whether it carries a JWT): parsed once per request.
        """
        auth, token, err = read_authorization(head) if presented is None else presented
        # The cookie may sit in any Cookie line (raw check first: C speed, usually absent).
        has_cookie = self.cookie_name in head.raw
        if has_cookie:
            sid = session_cookie(head, self.cookie_name)
            if sid is not None:
                key = session_key(sid)
                s = self.sessions.get(key)
                # Valid only while the very secret that opened it is configured.
                if s is not None and self.bound_name(s.binding) == s.token_name:
                    # A clawgate token beside the cookie is clawgate's too: dropped.
                    return (
                        Credential(
                            "session",
                            s.token_name,
                            expires_at=s.expires,
                            binding=s.binding,
                            session=key,
                        ),
                        None,
                        auth is not None and not self._kept_beside_session(token),
                    )
        if auth is None:
            return None, None, False
        if token is None:
            if not self.settings.require_token and self.jwt is None:
                return None, None, False  # not ours: leave it for the gateway
            return None, err or "malformed credential", True
        if self.jwt is not None and looks_like_jwt(token):
            try:
                cred = self.jwt.verify(token)
            except Unauthenticated as exc:
                return None, exc.reason, True
            if self.revoked is not None:
                why = self.revoked(cred)
                if why is not None:
                    return None, why, True
            return cred, None, True
        d = digest(token)
        static = self.tokens.credential(d)
        if static is not None:
            return static, None, True
        gw = self._gateway_cred
        if gw is not None and hmac.compare_digest(gw.binding or b"", d):
            # The gateway's own token: the gateway needs it, so it is forwarded.
            return gw, None, False
        if not self.settings.require_token and self.jwt is None:
            return None, None, False
        return None, "invalid token", True

    def _kept_beside_session(self, token: str | None) -> bool:
        """Whether an Authorization next to a valid session cookie goes to the gateway:
        only the gateway's own token, or one clawgate does not know while it requires none."""
        foreign = not self.settings.require_token and self.jwt is None
        if token is None:
            return foreign
        d = digest(token)
        if self.gateway_token_digest is not None and hmac.compare_digest(
            self.gateway_token_digest, d
        ):
            return True
        if self.tokens.verify_digest(d) is not None:
            return False
        return foreign

    def bound_name(self, binding: bytes) -> str | None:
        """The name of the configured secret whose digest is ``binding``, else None.

        Constant time over every configured secret (static tokens, the gateway's token).
        """
        name = self.tokens.verify_digest(binding)
        gw = self.gateway_token_digest
        if gw is not None and hmac.compare_digest(gw, binding) and name is None:
            name = GATEWAY_TOKEN_NAME
        return name

    # ------------------------------------------------------------------ identity

    def identity_sync(self, conn: Peer) -> IdentityOutcome | None:
        """A cached outcome, or None when tailscaled must be asked."""
        cache = self.identity
        if cache is None:
            return _NONE
        ident = cache.get(conn.peer_ip, conn.peer_port)
        if ident is None:
            return None
        return IdentityOutcome("identity", ident)

    async def identity_async(self, conn: Peer) -> IdentityOutcome:
        cache = self.identity
        if cache is None:
            return _NONE
        try:
            ident = await cache.lookup(conn.peer_ip, conn.peer_port)
        except PeerNotFound:
            if conn.is_loopback_peer:
                return IdentityOutcome("none", reason="local process, not a tailnet peer")
            monitor = conn.rt.monitor
            if monitor is not None and monitor.backend_state not in (None, "Running"):
                # A logged-out or stopped node knows no peers: that is an outage of the
                # identity source, not a verdict on this peer.
                return IdentityOutcome(
                    "unavailable",
                    reason=f"tailscale identity unavailable: tailscale is "
                    f"{monitor.backend_state}, not Running",
                )
            return IdentityOutcome("unknown", reason="not a known tailnet peer")
        except LocalAPIUnavailable as exc:
            conn.rt.metrics.localapi_errors += 1
            return IdentityOutcome("unavailable", reason=f"tailscale identity unavailable: {exc}")
        except TailscaleError as exc:
            conn.rt.metrics.localapi_errors += 1
            return IdentityOutcome("unavailable", reason=f"tailscale identity unavailable: {exc}")
        if ident is None:
            return IdentityOutcome("none", reason="local process, not a tailnet peer")
        return IdentityOutcome("identity", ident)

    # ------------------------------------------------------------------ decision

    def authorize_sync(self, conn: Peer, head: RequestHead) -> Grant | None:
        conn.rt.check_host(conn, head)  # before anything else, exempt paths included
        if head.path in self.exempt and not head.websocket:
            # Exempt means a health probe, never a gateway session: the gateway accepts
            # a WebSocket upgrade on any path, /health included.
            if head.has_body():
                # Nor a way to make clawgate scan a body for anyone (tiny chunks).
                return Grant(Decision(False, 413, "an exempt path takes no request body"))
            return Grant(ALLOW_EXEMPT)
        presented = read_authorization(head)
        if self.jwt is not None:
            token = presented[1]
            if token is not None and looks_like_jwt(token) and self.jwt.needs_keys(token):
                return None  # the async path awaits the JWKS fetch, then decides
        outcome = self.identity_sync(conn)
        if outcome is None:
            return None
        # After whois: a lockout is the node's when the peer has a known identity.
        conn.rt.check_lockout(conn, outcome.identity)
        return self._finish(conn, head, outcome, presented)

    async def authorize(self, conn: Peer, head: RequestHead) -> Grant:
        presented = read_authorization(head)
        if self.jwt is not None:
            token = presented[1]
            if token is not None and looks_like_jwt(token):
                await self.jwt.prepare(token)
        outcome = await self.identity_async(conn)
        conn.rt.check_lockout(conn, outcome.identity)
        return self._finish(conn, head, outcome, presented)

    def _finish(
        self,
        conn: Peer,
        head: RequestHead,
        outcome: IdentityOutcome,
        presented: Presented,
    ) -> Grant:
        cred, err, drop_auth = self.credential(head, presented)
        gated = False
        s = self.settings
        if (
            cred is None
            and err is None
            and head.websocket
            and self.gateway_token_digest is not None
            and s.require_token
        ):
            # The client carries only the gateway's token, inside its first frame:
            # let the upgrade through and hold that frame until it is checked.
            cred = _FIRST_FRAME
            gated = True
        decision = decide(
            s,
            token_name=cred.name if cred else None,
            token_error=err,
            token_subject=cred.subject if cred else None,
            identity=outcome,
        )
        return Grant(
            decision=decision,
            credential=cred,
            identity=outcome.identity,
            identity_kind=outcome.kind,
            drop_authorization=drop_auth,
            gated=gated and decision.allow,
        )

    # ------------------------------------------------------------------ rewrite

    def rewrite(self, conn: Peer, head: RequestHead, grant: Grant) -> bytes:
        ident = grant.identity
        return rewrite_request_head(
            head,
            client_ip=conn.peer_ip,
            proto=conn.proto,
            identity_headers=self.identity_norm,
            add=() if ident is None else self._identity_lines(ident),
            drop_authorization=grant.drop_authorization,
            # clawgate's cookie is never the gateway's business, valid or not, in any line.
            session_cookie=self.cookie_name,
        )

    def _identity_lines(self, ident: Any) -> tuple[tuple[bytes, bytes], ...]:
        """The header lines that tell the gateway who ``ident`` (the Grant's
        tailscale.Identity) is, made once per identity object: identities are immutable and
        cached, and this Authorizer's settings never change. Raises ValueError for a value
        that cannot be a header (never cached)."""
        hit = self._ident_lines.get(id(ident))
        if hit is not None and hit[0] is ident:  # id() alone could be a reused address
            return hit[1]
        add: list[tuple[bytes, bytes]] = []
        ts = self.cfg.tailscale
        value: str | None
        if ident.tagged:
            value = (
                ts.tagged_identity.format(
                    node=ident.node_name,
                    host=ident.node_host,
                    tags=",".join(ident.tags),
                    id=ident.node_id,
                )
                if ts.tagged_identity
                else None
            )
        else:
            value = ident.login
        if value:
            add.append((self.identity_header, _header_value(value)))
        if ts.send_tailscale_headers and not ident.tagged and ident.login:
            add.append((b"Tailscale-User-Login", _header_value(q_encode(ident.login))))
            if ident.display_name:
                add.append((b"Tailscale-User-Name", _header_value(q_encode(ident.display_name))))
            if ident.profile_pic:
                add.append((b"Tailscale-User-Profile-Pic", _header_value(ident.profile_pic)))
        lines = tuple(add)
        if len(self._ident_lines) >= 1024:
            self._ident_lines.clear()
        self._ident_lines[id(ident)] = (ident, lines)
        return lines

    # ------------------------------------------------------------------ login

    async def login_endpoint_async(
        self, conn: Peer, head: RequestHead, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """A login POST: the peer's identity first (whois), then the page."""
        outcome = await self.identity_async(conn)
        return self.login_endpoint(conn, head, body, outcome.identity)

    def login_endpoint(
        self, conn: Peer, head: RequestHead, body: bytes, identity: IdentityLike | None = None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """clawgate's own pages; ``identity``: the peer's, looked up before a login POST
        (failed logins count against the node, not against 127.0.0.1)."""
        path = head.path
        html_type = ("Content-Type", "text/html; charset=utf-8")
        if path == b"/__clawgate/login" and head.method in (b"GET", b"HEAD"):
            nxt = _query_param(head.target, "next") or "/"
            return 200, [html_type], self.login_page(nxt, "")
        if path == b"/__clawgate/login" and head.method == b"POST":
            origin = head.header(b"origin")
            host = head.header(b"host")
            if origin is not None and host is not None and origin.split(b"://", 1)[-1] != host:
                return 403, [("Content-Type", "text/plain")], b"cross-origin login refused\n"
            try:
                form = parse_qs(body.decode("utf-8"), max_num_fields=4)
            except (UnicodeError, ValueError):
                return 400, [("Content-Type", "text/plain")], b"malformed form\n"
            token = (form.get("token") or [""])[0].strip()
            nxt = _safe_next((form.get("next") or ["/"])[0])
            left = conn.rt.lockout_left(conn, identity)
            if left > 0:
                return (
                    429,
                    [("Retry-After", str(int(left) + 1)), ("Content-Type", "text/plain")],
                    b"too many failed authentications\n",
                )
            name: str | None = None
            d = digest(token)
            if token:
                name = self.bound_name(d)
            if name is None:
                conn.rt.note_denied(conn, 401, identity)
                conn.rt.log.write(
                    {
                        "event": "login",
                        "conn": conn.conn_id,
                        "peer": conn.peer_ip,
                        "result": "invalid token",
                    }
                )
                return 401, [html_type], self.login_page(nxt, "That token is not valid.")
            try:
                sid, _key, sess = self.sessions.create(name, d)
            except StoreUnavailable:
                return 503, [("Content-Type", "text/plain")], b"session store unavailable\n"
            secure = "; Secure" if conn.tls else ""
            set_cookie = (
                f"{self.cfg.tokens.cookie_name}={sid}; Path=/; HttpOnly; "
                f"SameSite=Strict; Max-Age={int(self.cfg.tokens.session_ttl)}{secure}"
            )
            conn.rt.log.write(
                {
                    "event": "login",
                    "conn": conn.conn_id,
                    "peer": conn.peer_ip,
                    "result": "ok",
                    "token": name,
                }
            )
            return 303, [("Set-Cookie", set_cookie), ("Location", nxt)], b""
        if path == b"/__clawgate/logout":
            raw_cookie = head.header(b"cookie")
            if raw_cookie is not None:
                old_sid = cookie_value(raw_cookie, self.cookie_name)
                if old_sid is not None:
                    key = session_key(old_sid)
                    try:
                        self.sessions.delete(key)
                    except StoreUnavailable:
                        return 503, [("Content-Type", "text/plain")], b"session store unavailable\n"
                    # Its live WebSockets end too (other workers: within 0.25 s).
                    conn.rt.end_logged_out(key)
            expire = f"{self.cfg.tokens.cookie_name}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
            return 303, [("Set-Cookie", expire), ("Location", "/__clawgate/login")], b""
        return 404, [("Content-Type", "text/plain")], b"not found\n"

    def login_needs_identity(self, head: RequestHead) -> bool:
        """A login POST counts failures against the peer's node: whois it first."""
        return head.method == b"POST" and self.identity is not None

    def login_page(self, nxt: str, message: str) -> bytes:
        msg = f'<p class="err">{html.escape(message)}</p>' if message else ""
        return (
            _LOGIN_HTML.replace("{msg}", msg)
            .replace("{next}", html.escape(_safe_next(nxt), quote=True))
            .encode("utf-8")
        )


def _header_value(value: str) -> bytes:
    # RFC 9110 field values: no control characters but HTAB (CR/LF/NUL would split the
    # head; the others make the gateway's parser refuse it).
    if any((c < " " and c != "\t") or c == "\x7f" for c in value):
        raise ValueError("control character in identity value")
    return value.encode("utf-8")


def _query_param(target: bytes, name: str) -> str | None:
    q = target.find(b"?")
    if q < 0:
        return None
    try:
        values = parse_qs(target[q + 1 :].decode("latin-1"), max_num_fields=8)
    except ValueError:
        return None
    v = values.get(name)
    return v[0] if v else None


def _safe_next(nxt: str) -> str:
    # Only a local path: no scheme, no '//' host, no backslash tricks, no CR/LF.
    if (
        not nxt.startswith("/")
        or nxt.startswith("//")
        or "\\" in nxt
        or any(c in nxt for c in "\r\n\x00")
        or nxt.startswith("/__clawgate/")
    ):
        return "/"
    return quote(nxt, safe="/?=&%:@!$'()*+,;~.-_")


_LOGIN_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>clawgate sign-in</title>
<style>body{font:16px system-ui,sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem}
input{width:100%;padding:.5rem;font:inherit;box-sizing:border-box}
button{margin-top:1rem;padding:.5rem 1rem;font:inherit}.err{color:#b00}</style></head>
<body><h1>clawgate</h1>
<p>This OpenClaw gateway is protected. Paste an access token to continue.</p>{msg}
<form method="post" action="/__clawgate/login">
<input type="hidden" name="next" value="{next}">
<label>Token <input type="password" name="token" autocomplete="current-password" autofocus></label>
<button type="submit">Sign in</button></form>
<p><small>Create one on the gateway host with <code>clawgate token new NAME</code>.</small></p>
</body></html>
"""
