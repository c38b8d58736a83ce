"""Configuration: frozen dataclasses, loaded once from JSON and validated in one pass.

Every error names its key path (``gateway.allowedNetworks[1]: '10.0.0.0/33' is not a
network``); unknown keys are errors. Defaults are embedded, so no file is needed. The
playbook's ``gateway`` block (``host``, ``port``, ``requireToken``, ``allowedNetworks``)
loads as written and means what the playbook says: where clawgate listens and what it
enforces. Secrets never appear here: only paths of files, or names of environment
variables, that hold them.
"""

from __future__ import annotations

import json
import os
import re
import socket
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .access.hosts import normalise_name
from .core.networks import NetworkSet, parse_network
from .errors import ConfigError

__all__ = [
    "Config",
    "GatewayConfig",
    "UpstreamConfig",
    "TokensConfig",
    "GatewayTokenConfig",
    "JwtConfig",
    "TailscaleConfig",
    "AdminConfig",
    "LogConfig",
    "LimitsConfig",
    "TlsConfig",
    "load_config",
    "parse_config",
    "default_token_file",
    "TAILNET_NETWORKS",
]

T = TypeVar("T")

# The tailnet's own ranges (net/tsaddr): CGNAT v4 and the ULA v6 prefix.
TAILNET_NETWORKS = ("100.64.0.0/10", "fd7a:115c:a1e0::/48")
DEFAULT_ALLOWED = (*TAILNET_NETWORKS, "127.0.0.1/32", "::1/128")
HOST_TAILSCALE = "tailscale"
_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CAP_RE = re.compile(r"^[A-Za-z0-9.-]+\.[A-Za-z]{2,}/[^\s]+$")


def default_token_file() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "clawgate", "tokens.json")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    hosts: tuple[str, ...] = (HOST_TAILSCALE,)
    port: int = 18789
    require_token: bool = True
    allowed_networks: NetworkSet = field(
        default_factory=lambda: NetworkSet.from_strings(DEFAULT_ALLOWED)
    )
    allowed_networks_set: bool = False  # whether the user wrote allowedNetworks
    exempt_paths: frozenset[str] = frozenset({"/health", "/healthz"})
    # Host values served besides clawgate's own names and addresses (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "http://127.0.0.1:18789"
    host: str | None = "127.0.0.1"
    port: int | None = 18789
    unix_path: str | None = None
    connect_timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class TokensConfig:
    file: str = field(default_factory=default_token_file)
    env: tuple[str, ...] = ()
    session_ttl: float = 12 * 3600.0
    cookie_name: str = "clawgate_session"


@dataclass(frozen=True, slots=True)
class GatewayTokenConfig:
    """The gateway's own token, checked at the edge in the first WebSocket frame."""

    file: str | None = None
    env: str | None = None
    first_frame_timeout: float = 15.0
    max_first_frame: int = 65536
    # The gateway's state dir (its pairing store, read-only): device and setup-code tokens
    # are verified against it at the edge. None: they are refused at the edge.
    state_dir: str | None = None

    @property
    def enabled(self) -> bool:
        return self.file is not None or self.env is not None


@dataclass(frozen=True, slots=True)
class JwtConfig:
    enabled: bool = False
    algorithms: tuple[str, ...] = ("EdDSA", "ES256", "RS256")
    issuer: str | None = None
    audience: str | None = None
    key_file: str | None = None  # PEM public key or JWKS JSON
    jwks_url: str | None = None
    jwks_cache_seconds: float = 300.0
    jwks_cooldown_seconds: float = 30.0
    hs256_secret_file: str | None = None
    leeway: float = 30.0
    subject_claim: str = "sub"
    scopes_claim: str = "scope"
    require_tailscale_user: bool = False
    revoked_file: str | None = None


@dataclass(frozen=True, slots=True)
class TailscaleConfig:
    socket: str | None = None
    require_identity: bool | None = None  # None: true when tailscaled is present
    allow_users: frozenset[str] = frozenset()
    allow_tags: frozenset[str] = frozenset()
    allow_nodes: frozenset[str] = frozenset()
    require_capability: str | None = None
    auth_mode: str = "both"  # both | either | identity
    identity_header: str = "X-Forwarded-User"
    tagged_identity: str = "{node}"  # value sent for tagged nodes; "" sends none
    send_tailscale_headers: bool = False
    cache_ttl: float = 60.0
    timeout: float = 2.0
    key_expiry_warn_days: float = 14.0

    @property
    def has_allow_lists(self) -> bool:
        return bool(self.allow_users or self.allow_tags or self.allow_nodes)

    @property
    def identity_needed(self) -> bool:
        """The written policy cannot be decided without a tailnet identity: clawgate sets
        up the identity source even with no tailscaled found (then 503 until it is)."""
        return (
            self.require_identity is True
            or self.auth_mode != "both"
            or self.has_allow_lists
            or self.require_capability is not None
        )


@dataclass(frozen=True, slots=True)
class AdminConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 18790


@dataclass(frozen=True, slots=True)
class LogConfig:
    access: str = "stdout"  # stdout | stderr | off | a file path
    level: str = "info"
    refused_per_second: float = 10.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int = 10000
    per_source_ip: int = 512
    per_identity: int = 512
    unauthenticated_per_ip: int = 32
    head_bytes: int = 16384
    head_lines: int = 100  # header lines in a head; more gets 431 (see core/http1)
    head_timeout: float = 10.0
    idle_timeout: float = 3600.0
    failed_auth_count: int = 10
    failed_auth_window: float = 60.0
    failed_auth_lockout: float = 300.0
    drain_seconds: float = 30.0
    high_water: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TlsConfig:
    mode: str = "off"  # off | tailscale | files
    cert_file: str | None = None
    key_file: str | None = None
    domain: str | None = None
    min_validity: str = "720h"
    renew_check_seconds: float = 3600.0
    redirect_port: int | None = None


@dataclass(frozen=True, slots=True)
class Config:
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    gateway_token: GatewayTokenConfig = field(default_factory=GatewayTokenConfig)
    jwt: JwtConfig = field(default_factory=JwtConfig)
    tailscale: TailscaleConfig = field(default_factory=TailscaleConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    log: LogConfig = field(default_factory=LogConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    workers: int = 1
    source: str | None = None  # the file it came from, for messages

    @property
    def listens_on_tailscale(self) -> bool:
        return HOST_TAILSCALE in self.gateway.hosts


# --------------------------------------------------------------------------- parsing


class _Section:
    """Reads one JSON object, tracking which keys were used so the rest are errors."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path or "(top level)", f"expected an object, got {_kind(data)}")
        self.data: dict[str, Any] = data
        self.path = path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, check: Callable[[Any, str], T], default: T) -> T:
        self.used.add(name)
        if name not in self.data:
            return default
        return check(self.data[name], self.key(name))

    def finish(self) -> None:
        for name in self.data:
            if name not in self.used:
                raise ConfigError(self.key(_shown_key(name)), "unknown key")


def _shown_key(name: str) -> str:
    """A key as it appears in an error path: repr() when it holds a newline or other
    unprintable character, so the error stays one line and cannot forge a second one."""
    return name if name.isprintable() else repr(name)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected true or false, got {_kind(value)}")
    return value


def _opt_bool(value: Any, path: str) -> bool | None:
    return None if value is None else _bool(value, path)


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {_kind(value)}")
    if not value:
        raise ConfigError(path, "must not be empty")
    if any(c in value for c in "\r\n\x00"):
        raise ConfigError(path, "must not contain CR, LF or NUL")
    return value


def _opt_str(value: Any, path: str) -> str | None:
    return None if value is None else _str(value, path)


def _int(lo: int, hi: int) -> Callable[[Any, str], int]:
    def check(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected a whole number, got {_kind(value)}")
        if not lo <= value <= hi:
            raise ConfigError(path, f"{value} is out of range ({lo} to {hi})")
        return value

    return check


def _num(lo: float, hi: float) -> Callable[[Any, str], float]:
    def check(value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {_kind(value)}")
        if not lo <= value <= hi or value != value:
            raise ConfigError(path, f"{value} is out of range ({lo:g} to {hi:g})")
        return float(value)

    return check


def _choice(*options: str) -> Callable[[Any, str], str]:
    def check(value: Any, path: str) -> str:
        if value not in options:
            shown = repr(value) if isinstance(value, str) else _kind(value)
            raise ConfigError(path, f"{shown} is not one of {', '.join(options)}")
        return str(value)

    return check


def _str_list(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a list, got {_kind(value)}")
    return tuple(_str(v, f"{path}[{i}]") for i, v in enumerate(value))


def _path(value: Any, path: str) -> str:
    text = _str(value, path)
    return os.path.expanduser(text)


def _opt_path(value: Any, path: str) -> str | None:
    return None if value is None else _path(value, path)


def _opt_abs_dir(value: Any, path: str) -> str | None:
    if value is None:
        return None
    text = _path(value, path)
    if not os.path.isabs(text):
        raise ConfigError(path, f"{text!r} is not an absolute path")
    return os.path.normpath(text)


def _default_gateway_state_dir() -> str | None:
    from .gateway_store import default_state_dir  # the gateway's own resolution

    return default_state_dir()


def _env_name(value: Any, path: str) -> str:
    text = _str(value, path)
    if not _ENV_NAME_RE.match(text):
        raise ConfigError(
            path, "is not an environment variable name (secrets never go in the config)"
        )
    return text


def _ip_literal(text: str, path: str) -> str:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return text
        except (OSError, ValueError):  # ValueError: a lone surrogate cannot be encoded
            continue
    raise ConfigError(path, f"{text!r} is not an IP address or 'tailscale'")


def _hosts(value: Any, path: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(path, "expected an address, 'tailscale', or a non-empty list of them")
    out: list[str] = []
    for i, item in enumerate(items):
        where = path if isinstance(value, str) else f"{path}[{i}]"
        text = _str(item, where)
        if text == HOST_TAILSCALE:
            out.append(text)
        else:
            out.append(_ip_literal(text.strip("[]"), where))
    if len(set(out)) != len(out):
        raise ConfigError(path, "lists the same address twice")
    return tuple(out)


def _networks(value: Any, path: str) -> NetworkSet:
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a list of networks, got {_kind(value)}")
    nets = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(item, str):
            raise ConfigError(where, f"expected a network string, got {_kind(item)}")
        try:
            nets.append(parse_network(item))
        except ValueError as exc:
            raise ConfigError(where, f"{item!r} {exc}") from None
    return NetworkSet.compile(nets)


def _exempt_paths(value: Any, path: str) -> frozenset[str]:
    items = _str_list(value, path)
    for i, item in enumerate(items):
        if not item.startswith("/") or any(c in item for c in "?#%\\") or "//" in item:
            raise ConfigError(f"{path}[{i}]", f"{item!r} is not a plain absolute path")
        if any(seg in (".", "..") for seg in item.split("/")):
            raise ConfigError(f"{path}[{i}]", f"{item!r} is not a normalised path")
    return frozenset(items)


def _allowed_hosts(value: Any, path: str) -> tuple[str, ...]:
    out = []
    for i, item in enumerate(_str_list(value, path)):
        name = normalise_name(item)
        if name is None:
            raise ConfigError(
                f"{path}[{i}]",
                f"{item!r} is not a host name or IP address (no scheme, no port; IPv6 in brackets)",
            )
        out.append(name)
    return tuple(out)


def _header_name(value: Any, path: str) -> str:
    text = _str(value, path)
    if not _HEADER_NAME_RE.match(text):
        raise ConfigError(path, f"{text!r} is not a valid header name")
    return text


def _upstream(value: Any, path: str) -> UpstreamConfig:
    if isinstance(value, str):
        value = {"url": value}
    sec = _Section(value, path)
    url = sec.get("url", _str, UpstreamConfig().url)
    timeout = sec.get("connectTimeout", _num(0.05, 60), 1.0)
    sec.finish()
    where = sec.key("url") if isinstance(value, dict) and "url" in value else path
    if url.startswith("unix:"):
        unix_path = url[5:]
        if not unix_path.startswith("/"):
            raise ConfigError(where, "a unix upstream needs an absolute path (unix:/path)")
        return UpstreamConfig(url, None, None, unix_path, timeout)
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. 'http://[::1' (an unclosed IPv6 bracket)
        raise ConfigError(where, f"{url!r}: expected http://HOST:PORT or unix:/path") from None
    if parts.scheme not in ("http", "ws"):
        raise ConfigError(where, f"{url!r}: expected http://HOST:PORT or unix:/path")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(where, f"{url!r}: only scheme, host and port are allowed")
    try:
        port = parts.port or 80
    except ValueError:
        raise ConfigError(where, f"{url!r}: bad port") from None
    host = parts.hostname
    if not host:
        raise ConfigError(where, f"{url!r}: no host")
    return UpstreamConfig(url, host, port, None, timeout)


def parse_config(data: object, source: str | None = None) -> Config:
    """Validate a decoded JSON document; raise ConfigError naming the key path."""
    top = _Section(data, "")
    d = Config()

    g = _Section(top.get("gateway", lambda v, p: v, {}), "gateway")
    hosts = g.get("host", _hosts, d.gateway.hosts)
    port = g.get("port", _int(1, 65535), d.gateway.port)
    require_token = g.get("requireToken", _bool, d.gateway.require_token)
    allowed_set = "allowedNetworks" in g.data
    allowed = g.get("allowedNetworks", _networks, d.gateway.allowed_networks)
    exempt = g.get("exemptPaths", _exempt_paths, d.gateway.exempt_paths)
    allowed_hosts = g.get("allowedHosts", _allowed_hosts, d.gateway.allowed_hosts)
    g.finish()
    if allowed_set and not allowed:
        raise ConfigError("gateway.allowedNetworks", "is empty: nobody could connect")
    wildcard = [h for h in hosts if h in ("0.0.0.0", "::")]
    if wildcard and not allowed_set:
        raise ConfigError(
            "gateway.host",
            f"{wildcard[0]!r} listens on every interface: set gateway.allowedNetworks "
            'to say who may connect (e.g. ["100.64.0.0/10"])',
        )
    gateway = GatewayConfig(hosts, port, require_token, allowed, allowed_set, exempt, allowed_hosts)

    upstream = top.get("upstream", _upstream, d.upstream)
    for h in hosts:
        if (
            h != HOST_TAILSCALE
            and upstream.port == port
            and upstream.host in (h, "localhost" if h in ("127.0.0.1", "::1") else None)
        ):
            raise ConfigError(
                "gateway.host",
                f"clawgate would listen on {h}:{port}, which is the upstream gateway's own "
                "address: move the gateway (or clawgate) to another address or port",
            )
        if h in ("0.0.0.0", "::") and upstream.port == port and upstream.host is not None:
            raise ConfigError(
                "gateway.port",
                f"clawgate on {h}:{port} would take the upstream's port {port} on every "
                "interface: use a specific host or another port",
            )

    t = _Section(top.get("tokens", lambda v, p: v, {}), "tokens")
    tokens = TokensConfig(
        file=t.get("file", _path, d.tokens.file),
        env=t.get("env", _env_list, d.tokens.env),
        session_ttl=t.get("sessionTtl", _num(2, 30 * 86400), d.tokens.session_ttl),
        cookie_name=t.get("cookieName", _header_name, d.tokens.cookie_name),
    )
    _reject_inline_secret(t, "tokens")
    t.finish()

    gt = _Section(top.get("gatewayToken", lambda v, p: v, {}), "gatewayToken")
    gateway_token = GatewayTokenConfig(
        file=gt.get("file", _opt_path, None),
        env=gt.get("env", lambda v, p: None if v is None else _env_name(v, p), None),
        first_frame_timeout=gt.get("firstFrameTimeout", _num(1, 120), 15.0),
        max_first_frame=gt.get("maxFirstFrame", _int(1024, 1 << 20), 65536),
        state_dir=gt.get("stateDir", _opt_abs_dir, _default_gateway_state_dir()),
    )
    _reject_inline_secret(gt, "gatewayToken")
    gt.finish()

    j = _Section(top.get("jwt", lambda v, p: v, {}), "jwt")
    jwt = JwtConfig(
        enabled=j.get("enabled", _bool, False),
        algorithms=j.get("algorithms", _algorithms, d.jwt.algorithms),
        issuer=j.get("issuer", _opt_str, None),
        audience=j.get("audience", _opt_str, None),
        key_file=j.get("keyFile", _opt_path, None),
        jwks_url=j.get("jwksUrl", _opt_str, None),
        jwks_cache_seconds=j.get("jwksCacheSeconds", _num(10, 86400), 300.0),
        jwks_cooldown_seconds=j.get("jwksCooldownSeconds", _num(1, 3600), 30.0),
        hs256_secret_file=j.get("hs256SecretFile", _opt_path, None),
        leeway=j.get("leeway", _num(0, 60), 30.0),
        subject_claim=j.get("subjectClaim", _str, "sub"),
        scopes_claim=j.get("scopesClaim", _str, "scope"),
        require_tailscale_user=j.get("requireTailscaleUser", _bool, False),
        revoked_file=j.get("revokedFile", _opt_path, None),
    )
    _reject_inline_secret(j, "jwt")
    j.finish()
    if jwt.enabled:
        if not jwt.issuer:
            raise ConfigError("jwt.issuer", "is required when jwt.enabled is true")
        if not jwt.audience:
            raise ConfigError("jwt.audience", "is required when jwt.enabled is true")
        if not (jwt.key_file or jwt.jwks_url or jwt.hs256_secret_file):
            raise ConfigError("jwt.keyFile", "set keyFile, jwksUrl or hs256SecretFile")
        if "HS256" in jwt.algorithms and not jwt.hs256_secret_file:
            raise ConfigError("jwt.algorithms", "HS256 needs jwt.hs256SecretFile")
        if jwt.hs256_secret_file and "HS256" not in jwt.algorithms:
            raise ConfigError("jwt.hs256SecretFile", "set only with HS256 in jwt.algorithms")

    ts = _Section(top.get("tailscale", lambda v, p: v, {}), "tailscale")
    tailscale = TailscaleConfig(
        socket=ts.get("socket", _opt_path, None),
        require_identity=ts.get("requireIdentity", _opt_bool, None),
        allow_users=frozenset(ts.get("allowUsers", _str_list, _NO_STRS)),
        allow_tags=frozenset(ts.get("allowTags", _tags, _NO_STRS)),
        allow_nodes=frozenset(n.rstrip(".") for n in ts.get("allowNodes", _str_list, _NO_STRS)),
        require_capability=ts.get("requireCapability", _capability, None),
        auth_mode=ts.get("authMode", _choice("both", "either", "identity"), "both"),
        identity_header=ts.get("identityHeader", _header_name, "X-Forwarded-User"),
        tagged_identity=ts.get("taggedIdentity", _tagged_template, "{node}"),
        send_tailscale_headers=ts.get("sendTailscaleHeaders", _bool, False),
        cache_ttl=ts.get("cacheTtl", _num(0, 3600), 60.0),
        timeout=ts.get("timeout", _num(0.05, 30), 2.0),
        key_expiry_warn_days=ts.get("keyExpiryWarnDays", _num(0, 365), 14.0),
    )
    ts.finish()
    if tailscale.identity_header.lower() in _RESERVED_IDENTITY_HEADERS:
        raise ConfigError("tailscale.identityHeader", "names a header clawgate sets itself")
    if tailscale.auth_mode in ("either", "identity") and tailscale.require_identity is False:
        raise ConfigError(
            "tailscale.requireIdentity",
            f"false contradicts authMode {tailscale.auth_mode!r}, which relies on identity",
        )
    if tailscale.require_identity is False:
        # An allow list nobody checks would admit everyone it was written to keep out.
        for key, value in (
            ("allowUsers", tailscale.allow_users),
            ("allowTags", tailscale.allow_tags),
            ("allowNodes", tailscale.allow_nodes),
            ("requireCapability", tailscale.require_capability),
        ):
            if value:
                raise ConfigError(
                    "tailscale.requireIdentity",
                    f"false contradicts tailscale.{key}, which can only be checked "
                    "against a tailnet identity (remove one of them)",
                )

    a = _Section(top.get("admin", lambda v, p: v, {}), "admin")
    admin = AdminConfig(
        enabled=a.get("enabled", _bool, True),
        host=a.get("host", _loopback_host, "127.0.0.1"),
        port=a.get("port", _int(0, 65535), 18790),
    )
    a.finish()

    lg = _Section(top.get("log", lambda v, p: v, {}), "log")
    log = LogConfig(
        access=lg.get("access", _str, "stdout"),
        level=lg.get("level", _choice("debug", "info", "warning", "error"), "info"),
        refused_per_second=lg.get("refusedPerSecond", _num(0, 100000), 10.0),
    )
    lg.finish()

    lm = _Section(top.get("limits", lambda v, p: v, {}), "limits")
    dl = d.limits
    limits = LimitsConfig(
        max_connections=lm.get("maxConnections", _int(1, 1_000_000), dl.max_connections),
        per_source_ip=lm.get("perSourceIp", _int(1, 1_000_000), dl.per_source_ip),
        per_identity=lm.get("perIdentity", _int(1, 1_000_000), dl.per_identity),
        unauthenticated_per_ip=lm.get(
            "unauthenticatedPerIp", _int(1, 1_000_000), dl.unauthenticated_per_ip
        ),
        head_bytes=lm.get("headBytes", _int(1024, 1 << 20), dl.head_bytes),
        head_lines=lm.get("headLines", _int(8, 100_000), dl.head_lines),
        head_timeout=lm.get("headTimeout", _num(0.1, 300), dl.head_timeout),
        idle_timeout=lm.get("idleTimeout", _num(1, 7 * 86400), dl.idle_timeout),
        failed_auth_count=lm.get("failedAuthCount", _int(1, 100000), dl.failed_auth_count),
        failed_auth_window=lm.get("failedAuthWindow", _num(1, 86400), dl.failed_auth_window),
        failed_auth_lockout=lm.get("failedAuthLockout", _num(0, 86400), dl.failed_auth_lockout),
        drain_seconds=lm.get("drainSeconds", _num(0, 3600), dl.drain_seconds),
        high_water=lm.get("highWater", _int(16384, 1 << 28), dl.high_water),
    )
    lm.finish()

    tls = top.get("tls", _tls, d.tls)
    workers = top.get("workers", _int(1, 64), 1)
    top.finish()

    if admin.enabled and admin.port and admin.port == port and admin.host in hosts:
        raise ConfigError("admin.port", f"{admin.port} is the port clawgate listens on")
    return Config(
        gateway=gateway,
        upstream=upstream,
        tokens=tokens,
        gateway_token=gateway_token,
        jwt=jwt,
        tailscale=tailscale,
        admin=admin,
        log=log,
        limits=limits,
        tls=tls,
        workers=workers,
        source=source,
    )


_NO_STRS: tuple[str, ...] = ()
_RESERVED_IDENTITY_HEADERS = frozenset(
    {
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "authorization",
        "cookie",
        "connection",
        "upgrade",
        "content-length",
        "transfer-encoding",
    }
)
_INLINE_SECRET_KEYS = ("token", "tokens", "secret", "password", "value", "key")


def _reject_inline_secret(sec: _Section, path: str) -> None:
    for name in _INLINE_SECRET_KEYS:
        if name in sec.data and name not in sec.used:
            raise ConfigError(
                sec.key(name),
                'secrets never go in the config: use a file ("file") or an environment '
                'variable ("env")',
            )


def _env_list(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (_env_name(value, path),)
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a variable name or a list, got {_kind(value)}")
    return tuple(_env_name(v, f"{path}[{i}]") for i, v in enumerate(value))


def _algorithms(value: Any, path: str) -> tuple[str, ...]:
    items = _str_list(value, path)
    if not items:
        raise ConfigError(path, "must list at least one algorithm")
    allowed = ("EdDSA", "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "HS256")
    for i, item in enumerate(items):
        if item not in allowed:
            raise ConfigError(f"{path}[{i}]", f"{item!r} is not one of {', '.join(allowed)}")
    return items


def _tags(value: Any, path: str) -> tuple[str, ...]:
    items = _str_list(value, path)
    for i, item in enumerate(items):
        if not item.startswith("tag:") or len(item) < 5:
            raise ConfigError(f"{path}[{i}]", f"{item!r} is not a tag (tag:NAME)")
    return items


def _capability(value: Any, path: str) -> str | None:
    if value is None:
        return None
    text = _str(value, path)
    if not _CAP_RE.match(text):
        raise ConfigError(path, f"{text!r} is not a capability name (domain/path)")
    return text


def _tagged_template(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {_kind(value)}")
    if any(c in value for c in "\r\n\x00"):
        raise ConfigError(path, "must not contain CR, LF or NUL")
    bad = ConfigError(path, "may use only {node}, {host}, {tags} and {id}")
    try:
        # Field names must be exactly one of ours: '{node.x}' or '{node[0]}' would reach
        # attributes or items of the value (AttributeError/TypeError at format time).
        fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        if any(f not in ("node", "host", "tags", "id") for f in fields):
            raise bad
        value.format(node="n", host="h", tags="t", id="i")
    except (KeyError, IndexError, ValueError):
        raise bad from None
    return value


def _loopback_host(value: Any, path: str) -> str:
    text = _str(value, path)
    if text not in ("127.0.0.1", "::1", "localhost") and not text.startswith("127."):
        raise ConfigError(path, f"{text!r}: the admin listener is loopback only")
    _ip_literal(text if text != "localhost" else "127.0.0.1", path)
    return text


def _tls(value: Any, path: str) -> TlsConfig:
    if value in ("off", "tailscale", None, False):
        return TlsConfig(mode="off" if value in ("off", None, False) else "tailscale")
    sec = _Section(value, path)
    cert = sec.get("certFile", _opt_path, None)
    key = sec.get("keyFile", _opt_path, None)
    mode = sec.get("mode", _choice("off", "tailscale", "files"), "files" if cert else "off")
    cfg = TlsConfig(
        mode=mode,
        cert_file=cert,
        key_file=key,
        domain=sec.get("domain", _opt_str, None),
        min_validity=sec.get("minValidity", _duration, "720h"),
        renew_check_seconds=sec.get("renewCheckSeconds", _num(5, 86400), 3600.0),
        redirect_port=sec.get(
            "redirectPort", lambda v, p: None if v is None else _int(1, 65535)(v, p), None
        ),
    )
    sec.finish()
    if mode == "files" and not (cert and key):
        raise ConfigError(path + ".certFile", "mode 'files' needs certFile and keyFile")
    return cfg


_DURATION_RE = re.compile(r"^(\d+h)?(\d+m)?(\d+s)?$")


def _duration(value: Any, path: str) -> str:
    text = _str(value, path)
    if not _DURATION_RE.match(text) or not text:
        raise ConfigError(path, f"{text!r} is not a duration like '720h'")
    return text


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load and validate a config file; ``None`` gives the embedded defaults."""
    if path is None:
        return parse_config({})
    p = Path(path)
    try:
        raw = p.read_text("utf-8")
    except FileNotFoundError:
        raise ConfigError("", f"config file {p} does not exist") from None
    except (OSError, UnicodeError) as exc:
        raise ConfigError("", f"config file {p}: {getattr(exc, 'strerror', exc)}") from None
    try:
        data = json.loads(raw, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError("", f"{p}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:
        # An integer literal over 4300 digits (ValueError) or absurd nesting.
        raise ConfigError("", f"{p}: not a usable JSON document ({type(exc).__name__})") from None
    dup = _find_duplicate(data)
    if dup is not None:
        raise ConfigError(dup, "appears twice")
    return parse_config(data, str(p))


class _DuplicateKeys(dict[str, Any]):
    """A JSON object that repeated ``dup``; the hook cannot know its path, so mark it."""

    dup = ""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> Mapping[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            marked = _DuplicateKeys(out)
            marked.dup = k
            return marked
        out[k] = v
    return out


def _find_duplicate(data: object) -> str | None:
    """The key path of the first repeated key (``gateway.port``), or None."""
    stack: list[tuple[object, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _DuplicateKeys):
            return f"{path}.{_shown_key(value.dup)}" if path else _shown_key(value.dup)
        if isinstance(value, dict):
            stack.extend(
                (v, f"{path}.{_shown_key(k)}" if path else _shown_key(k)) for k, v in value.items()
            )
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
    return None
