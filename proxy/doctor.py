"""``clawgate doctor``: the playbook's checks and the failure modes users meet, as findings.

The checks are pure functions over a ``Facts`` value (plain data); ``gather`` is the only
code here that does I/O (config and token files, tailscaled's LocalAPI, /proc/net/tcp,
the gateway's own config, the admin listener). Each ``Finding`` has a severity, says what
is wrong and how to fix it; ``doctor`` exits non-zero when any finding is an error.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import os
import re
import sqlite3
import stat
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from .config import HOST_TAILSCALE, TAILNET_NETWORKS, Config, load_config
from .core.networks import hostport
from .errors import ConfigError, TailscaleError, TokenStoreError
from .keystore import TokenFile

__all__ = [
    "Facts",
    "FileInfo",
    "Finding",
    "Listener",
    "TailscaleFacts",
    "CHECKS",
    "default_gateway_config_path",
    "exit_status",
    "gather",
    "loads_json5",
    "parse_proc_net_tcp",
    "render_json",
    "render_text",
    "run_checks",
    "secret_kind",
]

Severity = Literal["error", "warning", "info", "ok"]
SEVERITIES: Final[tuple[Severity, ...]] = ("error", "warning", "info", "ok")
_TAILNET_NETS: Final = tuple(ipaddress.ip_network(n) for n in TAILNET_NETWORKS)
_TAILNET_V4: Final = ipaddress.IPv4Network(TAILNET_NETWORKS[0])
_QUAD_100: Final = ipaddress.ip_address("100.100.100.100")
_WILDCARDS: Final = ("0.0.0.0", "::")
_PLAYBOOK_GATEWAY_KEYS: Final = ("host", "requireToken", "allowedNetworks")
_SECRET_KEYS: Final = frozenset(
    {
        "token",
        "tokens",
        "secret",
        "password",
        "passwd",
        "authkey",
        "apikey",
        "privatekey",
        "clientsecret",
        "value",
    }
)


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    check: str
    what: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class Listener:
    """One listening TCP socket of this network namespace (from /proc/net/tcp{,6})."""

    host: str
    port: int
    inode: int = 0
    owner: str | None = None  # "pid 123 (node)" when /proc tells us


@dataclass(frozen=True, slots=True)
class FileInfo:
    path: str
    exists: bool
    mode: int | None = None  # permission bits only
    uid: int | None = None
    error: str | None = None  # unreadable, not JSON, ...


@dataclass(frozen=True, slots=True)
class TailscaleFacts:
    socket: str | None  # None: no socket configured and none at the platform defaults
    reachable: bool = False
    error: str | None = None
    backend_state: str | None = None
    tun: bool | None = None
    key_expiry: datetime | None = None
    expired: bool = False
    ips: tuple[str, ...] = ()
    cert_domains: tuple[str, ...] = ()
    # tls "tailscale" only: "ok", "denied" (403), or what else went wrong; None: not tried.
    cert_access: str | None = None


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything the checks look at, gathered once."""

    config_path: str | None = None
    raw: Any = field(default_factory=dict)  # the decoded config document ({} = defaults)
    config_error: str | None = None
    cfg: Config | None = field(default_factory=Config)
    euid: int = 0
    token_file: FileInfo | None = None
    token_count: int | None = None
    tailscale: TailscaleFacts | None = None
    listeners: tuple[Listener, ...] = ()
    upstream_reachable: bool | None = None
    upstream_error: str | None = None
    gateway_config: FileInfo | None = None
    gateway_doc: Any = None  # the gateway's decoded openclaw.json, when readable
    clawgate_health: dict[str, Any] | None = None  # /health of a running clawgate
    # The gateway's pairing store (gatewayToken.stateDir): paired devices, or why unreadable.
    pairing_devices: int | None = None
    pairing_error: str | None = None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


# ------------------------------------------------------------------------------ helpers


def _get(doc: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _walk(doc: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(key path, key name, value) for every leaf of a JSON document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            sub = f"{path}.{k}" if path else str(k)
            if isinstance(v, dict | list):
                yield from _walk(v, sub)
            else:
                yield sub, str(k), v
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            sub = f"{path}[{i}]"
            if isinstance(v, dict | list):
                yield from _walk(v, sub)
            else:
                yield sub, path.rsplit(".", 1)[-1], v


def _hosts(raw: Any) -> list[str]:
    host = _get(raw, "gateway", "host")
    if host is None:
        return [HOST_TAILSCALE]
    items = [host] if isinstance(host, str) else host
    return [h.strip("[]") for h in items if isinstance(h, str)] if isinstance(items, list) else []


def _networks(items: Any) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for item in items if isinstance(items, list) else []:
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except (ValueError, TypeError):
            continue  # the config loader reports it, with its key path
    return out


def _covers(nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network], ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr.version == n.version and addr in n for n in nets)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _in_tailnet(text: str) -> bool:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return False
    return addr != _QUAD_100 and any(addr.version == n.version and addr in n for n in _TAILNET_NETS)


def _clawgate_listening(facts: Facts) -> set[str]:
    listening = _get(facts.clawgate_health, "clawgate", "listening")
    return {a for a in listening if isinstance(a, str)} if isinstance(listening, list) else set()


# ------------------------------------------------------------------------------ checks
# Each takes the Facts and returns findings; none does I/O.


def check_config(f: Facts) -> list[Finding]:
    if f.config_error is not None:
        return [
            Finding(
                "error",
                "config",
                f"the config does not load: {f.config_error}",
                "fix the key named in the message; `clawgate check-config` re-checks",
            )
        ]
    if f.config_path is None:
        return [
            Finding(
                "info",
                "config",
                "no config file: using the embedded defaults",
                "pass --config FILE (or set CLAWGATE_CONFIG) to check your own",
            )
        ]
    return [Finding("ok", "config", f"{f.config_path} loads")]


def check_listen(f: Facts) -> list[Finding]:
    hosts = _hosts(f.raw)
    wild = [h for h in hosts if h in _WILDCARDS]
    allowed = _get(f.raw, "gateway", "allowedNetworks")
    if wild and allowed is None:
        return [
            Finding(
                "error",
                "listen",
                f"gateway.host {wild[0]!r} listens on every interface and "
                "gateway.allowedNetworks is not set",
                'set gateway.host to "tailscale", or set gateway.allowedNetworks to '
                '["127.0.0.1/32", "100.64.0.0/10"]',
            )
        ]
    if wild:
        return [
            Finding(
                "info",
                "listen",
                f"gateway.host {wild[0]!r} listens on every interface; "
                "gateway.allowedNetworks limits who may connect",
                'gateway.host "tailscale" binds only this node\'s tailnet addresses',
            )
        ]
    return [Finding("ok", "listen", f"listens on {', '.join(hosts)}")]


def check_require_token(f: Facts) -> list[Finding]:
    value = _get(f.raw, "gateway", "requireToken")
    if value is not False:
        return [Finding("ok", "requireToken", "a token is required")]
    ts = f.cfg.tailscale if f.cfg is not None else None
    if ts is not None and ts.require_identity and ts.has_allow_lists:
        return [
            Finding(
                "warning",
                "requireToken",
                "gateway.requireToken is false: access rests on tailnet identity alone",
                "keep tailscale.allowUsers/allowTags tight, or set requireToken true",
            )
        ]
    return [
        Finding(
            "error",
            "requireToken",
            "gateway.requireToken is false: anyone on an allowed network reaches the gateway",
            'set "requireToken": true and create tokens with `clawgate token new NAME`',
        )
    ]


def check_allowed_networks(f: Facts) -> list[Finding]:
    items = _get(f.raw, "gateway", "allowedNetworks")
    if items is None:
        return [
            Finding(
                "ok", "allowedNetworks", "default allowedNetworks: the tailnet ranges and loopback"
            )
        ]
    nets = _networks(items)
    out: list[Finding] = []
    everything = [str(n) for n in nets if n.prefixlen == 0]
    if everything:
        out.append(
            Finding(
                "warning",
                "allowedNetworks",
                f"gateway.allowedNetworks allows every address ({everything[0]})",
                'list the tailnet range "100.64.0.0/10" (and loopback) instead',
            )
        )
    touches = [
        n for n in nets if any(n.version == t.version and n.overlaps(t) for t in _TAILNET_NETS)
    ]
    if not touches:
        out.append(
            Finding(
                "error",
                "allowedNetworks",
                "gateway.allowedNetworks has no tailnet range: no tailnet peer may connect",
                'add "100.64.0.0/10" (and "fd7a:115c:a1e0::/48" for IPv6)',
            )
        )
    elif not any(isinstance(n, ipaddress.IPv4Network) and _TAILNET_V4.subnet_of(n) for n in nets):
        out.append(
            Finding(
                "info",
                "allowedNetworks",
                "gateway.allowedNetworks allows only part of 100.64.0.0/10",
                "fine if deliberate; tailnet addresses of new devices may fall outside it",
            )
        )
    if not out:
        out.append(Finding("ok", "allowedNetworks", "the tailnet range 100.64.0.0/10 is allowed"))
    return out


_IPV4_IN_TEXT: Final = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])")
_IPV6_IN_TEXT: Final = re.compile(r"(?i)fd7a:115c:a1e0:[0-9a-f:]*")


def check_literal_addresses(f: Facts) -> list[Finding]:
    found: list[str] = []
    for path, _, value in _walk(f.raw):
        if not isinstance(value, str):
            continue
        candidates = _IPV4_IN_TEXT.findall(value) + _IPV6_IN_TEXT.findall(value)
        for text in candidates:
            addr = text.split("/", 1)[0]
            # A whole range ("100.64.0.0/10") is the right way to say "the tailnet".
            if (
                "/" in value
                and value.split("/", 1)[0] == addr
                and not value.endswith(("/32", "/128"))
            ):
                continue
            if _in_tailnet(addr):
                found.append(f"{path} ({addr})")
    if not found:
        return [Finding("ok", "literalAddress", "no literal Tailscale address in the config")]
    return [
        Finding(
            "warning",
            "literalAddress",
            f"literal Tailscale address in the config: {', '.join(found[:5])}",
            'addresses change when a node re-registers: use gateway.host "tailscale", '
            'the range "100.64.0.0/10", and tailscale.allowNodes/allowTags for peers',
        )
    ]


_JWT_RE: Final = re.compile(r"^eyJ[\w-]+\.eyJ[\w-]+\.[\w-]*$")
_ENV_NAME_RE: Final = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_TOKENISH_RE: Final = re.compile(r"^[A-Za-z0-9_\-+=.~]{24,}$")


def _entropy(text: str) -> float:
    counts: dict[str, int] = {}
    for ch in text:
        counts[ch] = counts.get(ch, 0) + 1
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def secret_kind(key: str, value: str) -> str | None:
    """Why ``value`` (under ``key``) looks like a secret, or None. Never returns the value."""
    if value.startswith("tskey-"):
        return "a Tailscale auth key"
    if "PRIVATE KEY-----" in value:
        return "a private key"
    if _JWT_RE.match(value):
        return "a JWT"
    norm = key.lower().replace("_", "").replace("-", "")
    if norm in _SECRET_KEYS and value and not _ENV_NAME_RE.match(value) and "/" not in value:
        return f"a value under {key!r}"
    if _TOKENISH_RE.match(value) and not _ENV_NAME_RE.match(value):
        classes = sum(bool(re.search(p, value)) for p in ("[a-z]", "[A-Z]", "[0-9]", "[-_+=]"))
        if classes >= 3 and _entropy(value) >= 3.5:
            return "a random-looking string"
    return None


def check_secrets(f: Facts) -> list[Finding]:
    hits = []
    for path, key, value in _walk(f.raw):
        if isinstance(value, str):
            kind = secret_kind(key, value)
            if kind is not None:
                hits.append(f"{path} holds {kind}")
    if not hits:
        return [Finding("ok", "secrets", "no secrets in the config")]
    return [
        Finding(
            "error",
            "secrets",
            "; ".join(hits[:5]),
            "move it to a file (mode 0600) or an environment variable and reference "
            'it with "file" or "env"; rotate it, since it was stored in clear',
        )
    ]


def check_token_file(f: Facts) -> list[Finding]:
    tf = f.token_file
    if tf is None or f.cfg is None:
        return []
    if not tf.exists:
        if f.cfg.tokens.env or not f.cfg.gateway.require_token:
            return [Finding("info", "tokenFile", f"no token file at {tf.path}")]
        return [
            Finding(
                "warning",
                "tokenFile",
                f"no token file at {tf.path}: no client can present a token",
                "create one with `clawgate token new NAME`",
            )
        ]
    out: list[Finding] = []
    if tf.error is not None:
        out.append(
            Finding(
                "error",
                "tokenFile",
                f"token file {tf.path}: {tf.error}",
                "fix the file, or recreate it with `clawgate token new NAME`",
            )
        )
    if tf.mode is not None and tf.mode & 0o077:
        out.append(
            Finding(
                "error",
                "tokenFile",
                f"token file {tf.path} is readable by group/others (mode {tf.mode:04o})",
                f"chmod 600 {tf.path}",
            )
        )
    if tf.uid is not None and f.euid != 0 and tf.uid != f.euid:
        out.append(
            Finding(
                "warning",
                "tokenFile",
                f"token file {tf.path} is owned by uid {tf.uid}, not by you (uid {f.euid})",
                f"chown it to the user clawgate runs as: chown USER {tf.path}",
            )
        )
    elif tf.uid == 0 and f.euid == 0:
        out.append(
            Finding(
                "info",
                "tokenFile",
                f"token file {tf.path} is owned by root",
                f"if the service runs as its own user (User=clawgate), chown clawgate: {tf.path}",
            )
        )
    if not any(x.severity == "error" for x in out):
        n = f.token_count
        out.append(
            Finding(
                "ok",
                "tokenFile",
                f"token file {tf.path}: mode {(tf.mode or 0):04o}"
                + (f", {n} token{'s' if n != 1 else ''}" if n is not None else ""),
            )
        )
    return out


def check_tailscaled(f: Facts) -> list[Finding]:
    ts, cfg = f.tailscale, f.cfg
    needs = cfg is not None and (cfg.listens_on_tailscale or bool(cfg.tailscale.require_identity))
    if ts is None or ts.socket is None:
        if needs:
            return [
                Finding(
                    "error",
                    "tailscaled",
                    "no tailscaled socket found",
                    "start tailscaled (systemctl enable --now tailscaled), or set "
                    "tailscale.socket; in Docker share the socket directory through "
                    "a volume and set TS_SOCKET",
                )
            ]
        return [
            Finding(
                "warning",
                "tailscaled",
                "no tailscaled socket found: no tailnet identity, only networks and tokens decide",
                "start tailscaled, or set tailscale.socket",
            )
        ]
    if not ts.reachable:
        return [
            Finding(
                "error",
                "tailscaled",
                f"tailscaled at {ts.socket} does not answer: {ts.error}",
                "systemctl status tailscaled; check the socket path and that this user may open it",
            )
        ]
    if ts.backend_state != "Running":
        return [
            Finding(
                "error",
                "tailscaled",
                f"tailscale is {ts.backend_state}, not Running",
                "run `sudo tailscale up` (NeedsLogin: log in again; Stopped: it was turned off)",
            )
        ]
    ips = ", ".join(ts.ips) or "no addresses"
    return [Finding("ok", "tailscaled", f"tailscaled Running at {ts.socket} ({ips})")]


def check_key_expiry(f: Facts) -> list[Finding]:
    ts = f.tailscale
    if ts is None or not ts.reachable or ts.backend_state is None:
        return []
    warn_days = f.cfg.tailscale.key_expiry_warn_days if f.cfg is not None else 14.0
    fix = (
        "disable key expiry for this server node in the admin console, or re-authenticate "
        "with `tailscale up --force-reauth`"
    )
    if ts.key_expiry is None:
        if ts.expired:
            return [Finding("error", "keyExpiry", "the node key has expired", fix)]
        return [Finding("ok", "keyExpiry", "node key expiry is disabled")]
    when = ts.key_expiry.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    seconds = (ts.key_expiry - f.now).total_seconds()
    if ts.expired or seconds <= 0:
        return [Finding("error", "keyExpiry", f"the node key expired at {when}", fix)]
    days = math.floor(seconds / 86400)
    if seconds <= warn_days * 86400:
        return [
            Finding("warning", "keyExpiry", f"the node key expires in {days} days ({when})", fix)
        ]
    return [Finding("ok", "keyExpiry", f"the node key expires in {days} days ({when})")]


def check_userspace(f: Facts) -> list[Finding]:
    ts = f.tailscale
    if ts is None or not ts.reachable or ts.tun is None:
        return []
    if ts.tun:
        return [Finding("ok", "userspace", "tailscaled uses a TUN interface")]
    hosts = _hosts(f.raw)
    local = any(h in _WILDCARDS or _is_loopback(h) for h in hosts)
    msg = (
        "tailscaled runs with --tun=userspace-networking: tailnet peers arrive from "
        "127.0.0.1, and identity comes from whois of 127.0.0.1:PORT (a miss costs ~180 ms)"
    )
    if not local:
        return [
            Finding(
                "error",
                "userspace",
                msg + f"; clawgate listens on {', '.join(hosts)} where nothing arrives",
                'set gateway.host "127.0.0.1" on a port other than the gateway\'s and '
                'keep "127.0.0.1/32" in allowedNetworks, or give the container '
                "/dev/net/tun and NET_ADMIN",
            )
        ]
    return [
        Finding(
            "warning",
            "userspace",
            msg,
            "prefer a TUN interface (/dev/net/tun and NET_ADMIN in Docker)",
        )
    ]


def check_upstream(f: Facts) -> list[Finding]:
    cfg = f.cfg
    if cfg is None:
        return []
    u = cfg.upstream
    out: list[Finding] = []
    if f.upstream_reachable is False:
        out.append(
            Finding(
                "error",
                "upstream",
                f"the gateway is unreachable: {f.upstream_error}",
                "start it: `openclaw gateway run --bind loopback` (or check upstream.url)",
            )
        )
    elif f.upstream_reachable:
        out.append(Finding("ok", "upstream", f"the gateway answers at {u.url}"))
    if u.unix_path is not None or u.port is None or u.host is None:
        return out
    if not _is_loopback(u.host):
        out.append(
            Finding(
                "warning",
                "upstreamBind",
                f"upstream.url {u.url} is not on loopback: the gateway listens "
                "beyond this host, where clients can go around clawgate",
                'bind the gateway to loopback and use "http://127.0.0.1:18789"',
            )
        )
        return out
    ours = _clawgate_listening(f)
    exposed = [
        lst
        for lst in f.listeners
        if lst.port == u.port
        and not _is_loopback(lst.host)
        and hostport(lst.host, lst.port) not in ours
    ]
    if exposed:
        where = ", ".join(
            hostport(x.host, x.port) + (f" ({x.owner})" if x.owner else "") for x in exposed
        )
        out.append(
            Finding(
                "error",
                "upstreamBind",
                f"the gateway's port {u.port} is open beyond loopback: {where}; "
                "clients can reach the gateway without clawgate",
                'set "bind": "loopback" in the gateway config (openclaw gateway '
                "run --bind loopback) and `clawgate firewall` for defence in depth",
            )
        )
    elif any(lst.port == u.port for lst in f.listeners):
        out.append(
            Finding("ok", "upstreamBind", f"the gateway's port {u.port} is on loopback only")
        )
    return out


def check_gateway_config(f: Facts) -> list[Finding]:
    gc = f.gateway_config
    if gc is None:
        return []
    if not gc.exists:
        return [
            Finding(
                "info",
                "gatewayConfig",
                f"gateway config {gc.path} not found: its checks are skipped",
                "pass --gateway-config PATH (it is $OPENCLAW_HOME/.openclaw/"
                "openclaw.json of the user the gateway runs as)",
            )
        ]
    if gc.error is not None:
        return [
            Finding(
                "warning",
                "gatewayConfig",
                f"gateway config {gc.path}: {gc.error}",
                "run doctor as the gateway's user, or pass --gateway-config",
            )
        ]
    gw = _get(f.gateway_doc, "gateway")
    if not isinstance(gw, dict):
        return [
            Finding(
                "warning",
                "gatewayConfig",
                f'gateway config {gc.path} has no "gateway" section',
                'add "gateway": {"bind": "loopback", "trustedProxies": '
                '["127.0.0.1/32", "::1/128"]}',
            )
        ]
    out: list[Finding] = []
    stale = [k for k in _PLAYBOOK_GATEWAY_KEYS if k in gw]
    if stale:
        out.append(
            Finding(
                "error",
                "gatewayConfig",
                f"gateway.{', gateway.'.join(stale)} in {gc.path} are not OpenClaw "
                "keys: current releases refuse to start (Unrecognized keys)",
                "remove them there; they belong in clawgate's config",
            )
        )
    out.extend(_check_trusted_proxies(f, gw))
    bind = gw.get("bind")
    if bind == "loopback":
        out.append(Finding("ok", "gatewayBind", "the gateway binds loopback only"))
    elif bind is None:
        out.append(
            Finding(
                "warning",
                "gatewayBind",
                "the gateway config does not set bind",
                'set "bind": "loopback" so only clawgate can reach it',
            )
        )
    else:
        out.append(
            Finding(
                "error",
                "gatewayBind",
                f"the gateway binds {bind!r}, beyond loopback: clients can go around clawgate",
                'set "bind": "loopback" in gateway config',
            )
        )
    port = gw.get("port")
    cfg = f.cfg
    if cfg is not None and isinstance(port, int) and cfg.upstream.port not in (None, port):
        out.append(
            Finding(
                "warning",
                "gatewayConfig",
                f"the gateway config says port {port}, clawgate's upstream is {cfg.upstream.url}",
                "make upstream.url point at the gateway",
            )
        )
    auth = gw.get("auth")
    if cfg is not None and isinstance(auth, dict) and auth.get("mode") == "trusted-proxy":
        header = _get(auth, "trustedProxy", "userHeader")
        want = cfg.tailscale.identity_header
        if not isinstance(header, str) or header.lower() != want.lower():
            out.append(
                Finding(
                    "error",
                    "gatewayConfig",
                    f"gateway auth trusted-proxy reads userHeader {header!r}, "
                    f"clawgate sends identity as {want!r}",
                    f'set auth.trustedProxy.userHeader to "{want.lower()}" (or '
                    "tailscale.identityHeader in clawgate's config)",
                )
            )
    return out


def _check_trusted_proxies(f: Facts, gw: dict[str, Any]) -> list[Finding]:
    nets = _networks(gw.get("trustedProxies"))
    upstream_host = f.cfg.upstream.host if f.cfg is not None else "127.0.0.1"
    # clawgate dials the gateway from the loopback address of the upstream's family.
    v6_source = upstream_host is not None and ":" in upstream_host
    need = ["::1"] if v6_source else ["127.0.0.1"]
    nice = ["127.0.0.1"] if v6_source else ["::1"]
    missing = [ip for ip in need if not _covers(nets, ip)]
    fix = 'set "trustedProxies": ["127.0.0.1/32", "::1/128"] in the gateway section'
    if missing:
        return [
            Finding(
                "error",
                "trustedProxies",
                f"the gateway does not trust clawgate ({missing[0]}) as a proxy: it "
                "refuses proxied clients (proxy_attribution_required), or without "
                "forwarding headers would treat every client as local",
                fix,
            )
        ]
    out = [Finding("ok", "trustedProxies", "the gateway trusts clawgate on loopback")]
    if any(not _covers(nets, ip) for ip in nice):
        out.append(
            Finding("info", "trustedProxies", f"trustedProxies does not list {nice[0]}", fix)
        )
    wide = [str(n) for n in nets if not n.is_loopback]
    if wide:
        out.append(
            Finding(
                "warning",
                "trustedProxies",
                f"trustedProxies also trusts {', '.join(wide)}: anyone there can "
                "claim any client address",
                "trust loopback only",
            )
        )
    return out


def _conflicts(a: str, b: str) -> bool:
    """Would binding ``a`` fail while ``b`` listens on the same port?"""
    if a == b:
        return True
    fam_a, fam_b = ":" in a, ":" in b
    if fam_a == fam_b and (a in _WILDCARDS or b in _WILDCARDS):
        return True
    # A dual-stack "::" listener also holds the IPv4 port.
    return b == "::" and not fam_a or a == "::" and not fam_b


def check_ports(f: Facts) -> list[Finding]:
    cfg = f.cfg
    if cfg is None:
        return []
    ours = _clawgate_listening(f)
    hosts = [h for h in cfg.gateway.hosts if h != HOST_TAILSCALE]
    if cfg.listens_on_tailscale and f.tailscale is not None:
        hosts += list(f.tailscale.ips)
    wanted = [(h, cfg.gateway.port, "clawgate") for h in hosts]
    if cfg.admin.enabled and cfg.admin.port:
        wanted.append((cfg.admin.host, cfg.admin.port, "the admin listener"))
    out: list[Finding] = []
    for host, port, what in wanted:
        for lst in f.listeners:
            if lst.port != port or not _conflicts(host, lst.host):
                continue
            addr = hostport(lst.host, lst.port)
            if what == "clawgate" and addr in ours:
                continue
            if what == "the admin listener" and f.clawgate_health is not None:
                continue  # a clawgate answers there: it is ours
            owner = f" by {lst.owner}" if lst.owner else ""
            out.append(
                Finding(
                    "error",
                    "ports",
                    f"{hostport(host, port)} ({what}) is taken: {addr} is already listening{owner}",
                    "stop the other program, or change gateway.port / admin.port",
                )
            )
    if not out and wanted:
        out.append(Finding("ok", "ports", "no other program holds clawgate's ports"))
    if cfg.listens_on_tailscale and (f.tailscale is None or not f.tailscale.ips):
        out.append(
            Finding("info", "ports", "tailnet addresses unknown: collisions there not checked")
        )
    return out


def check_running(f: Facts) -> list[Finding]:
    h = f.clawgate_health
    if h is None:
        return [Finding("info", "running", "no clawgate answers on the admin listener")]
    problems = h.get("problems") or []
    if problems:
        return [
            Finding(
                "warning",
                "running",
                f"the running clawgate is degraded: {'; '.join(map(str, problems))}",
                "see the findings above, and `clawgate status`",
            )
        ]
    return [Finding("ok", "running", "a clawgate is running and healthy")]


def check_tls_cert_access(f: Facts) -> list[Finding]:
    """tls "tailscale": may this user fetch the node's certificate (root/operator/permit)?"""
    cfg, ts = f.cfg, f.tailscale
    if (
        cfg is None
        or cfg.tls.mode != "tailscale"
        or ts is None
        or not ts.reachable
        or ts.backend_state != "Running"
    ):
        return []  # check_tailscaled already says why tailscaled cannot be asked
    if not ts.cert_domains:
        return [
            Finding(
                "error",
                "tls_cert_access",
                "this tailnet does not issue HTTPS certificates",
                "enable HTTPS Certificates (and MagicDNS) in the admin console, "
                "https://login.tailscale.com/admin/dns",
            )
        ]
    if ts.cert_access == "denied":
        from .tls import cert_denied_message

        what, _, fix = cert_denied_message().partition("; fix it with one of: ")
        return [Finding("error", "tls_cert_access", what, fix)]
    if ts.cert_access not in (None, "ok"):
        return [
            Finding(
                "error",
                "tls_cert_access",
                f"cannot fetch the TLS certificate: {ts.cert_access}",
                "check tls.domain against `tailscale status --json` CertDomains",
            )
        ]
    name = cfg.tls.domain or ts.cert_domains[0]
    return [Finding("ok", "tls_cert_access", f"this user may fetch the certificate for {name}")]


def check_pairing_store(f: Facts) -> list[Finding]:
    cfg = f.cfg
    if cfg is None or not cfg.gateway_token.enabled:
        return []
    if cfg.gateway_token.state_dir is None:
        return [
            Finding(
                "info",
                "pairingStore",
                "gatewayToken.stateDir is null: paired devices and setup codes are "
                "refused at the edge (only the gateway token is admitted)",
            )
        ]
    if f.pairing_error is not None:
        return [
            Finding(
                "error",
                "pairingStore",
                f"the gateway's pairing store cannot be read: {f.pairing_error}; "
                "paired devices and setup codes are refused at the edge",
                "set gatewayToken.stateDir to the gateway's state dir (the one with "
                "state/openclaw.sqlite) and let clawgate's user read it",
            )
        ]
    return [
        Finding(
            "ok",
            "pairingStore",
            f"the gateway's pairing store is readable ({f.pairing_devices} paired devices)",
        )
    ]


CHECKS: Final[tuple[Callable[[Facts], list[Finding]], ...]] = (
    check_config,
    check_listen,
    check_require_token,
    check_allowed_networks,
    check_literal_addresses,
    check_secrets,
    check_token_file,
    check_tailscaled,
    check_key_expiry,
    check_userspace,
    check_upstream,
    check_gateway_config,
    check_ports,
    check_running,
    check_tls_cert_access,
    check_pairing_store,
)


def run_checks(facts: Facts) -> list[Finding]:
    return [finding for check in CHECKS for finding in check(facts)]


def exit_status(findings: Sequence[Finding]) -> int:
    return 1 if any(x.severity == "error" for x in findings) else 0


# ------------------------------------------------------------------------------ output


_MARK: Final = {"error": "✗", "warning": "!", "info": "·", "ok": "✓"}


def render_text(findings: Sequence[Finding]) -> str:
    lines = []
    for sev in SEVERITIES:
        for x in findings:
            if x.severity != sev:
                continue
            lines.append(f"{_MARK[sev]} {sev.upper():<7} {x.check}: {x.what}")
            if x.fix and sev in ("error", "warning"):
                lines.append(f"{'':10}fix: {x.fix}")
    counts = {s: sum(x.severity == s for x in findings) for s in SEVERITIES}
    lines.append("")
    lines.append(
        ", ".join(
            f"{n} {s}{'s' if n != 1 and s in ('error', 'warning') else ''}"
            for s, n in counts.items()
        )
    )
    return "\n".join(lines)


def render_json(findings: Sequence[Finding]) -> str:
    return json.dumps(
        {
            "ok": exit_status(findings) == 0,
            "counts": {s: sum(x.severity == s for x in findings) for s in SEVERITIES},
            "findings": [asdict(x) for x in findings],
        },
        indent=2,
    )


# ------------------------------------------------------------------------------ JSON5


def loads_json5(text: str) -> Any:
    """The JSON5 that OpenClaw's config uses, tolerantly: comments, trailing commas,
    single-quoted strings and bare keys are turned into JSON, then ``json.loads``."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            chars = []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    chars.append(text[j : j + 2])
                    j += 2
                    continue
                chars.append('\\"' if text[j] == '"' else text[j])
                j += 1
            body = "".join(chars)
            if c == "'":
                body = body.replace("\\'", "'")
            out.append('"' + body + '"')
            i = j + 1
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c == ",":
            j = i + 1
            while j < n and (text[j].isspace() or text.startswith(("//", "/*"), j)):
                if text.startswith("//", j):
                    j = text.find("\n", j) if "\n" in text[j:] else n
                elif text.startswith("/*", j):
                    end = text.find("*/", j + 2)
                    j = n if end < 0 else end + 2
                else:
                    j += 1
            if j < n and text[j] in "}]":
                i += 1  # trailing comma
            else:
                out.append(c)
                i += 1
        elif c.isalpha() or c in "_$":
            m = re.match(r"[A-Za-z_$][A-Za-z0-9_$]*", text[i:])
            assert m is not None
            word = m.group(0)
            rest = text[i + len(word) :].lstrip()
            if rest.startswith(":") and word not in ("true", "false", "null"):
                out.append(json.dumps(word))
            else:
                out.append(word)
            i += len(word)
        else:
            out.append(c)
            i += 1
    return json.loads("".join(out))


# ------------------------------------------------------------------------------ I/O


def default_gateway_config_path(env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    home = env.get("OPENCLAW_HOME") or env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".openclaw", "openclaw.json")


def parse_proc_net_tcp(text: str, v6: bool) -> list[Listener]:
    """LISTEN sockets from one /proc/net/tcp or tcp6 table (addresses in host byte order)."""
    out = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10 or parts[3] != "0A":
            continue
        addr_hex, port_hex = parts[1].split(":")
        raw = bytes.fromhex(addr_hex)
        # Each 32-bit word is printed in host (little-endian) order.
        fixed = b"".join(raw[k : k + 4][::-1] for k in range(0, len(raw), 4))
        ip = ipaddress.ip_address(fixed)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            host = str(ip.ipv4_mapped)
        else:
            host = str(ip)
        out.append(Listener(host, int(port_hex, 16), int(parts[9])))
    return out


def _socket_owners(inodes: set[int]) -> dict[int, str]:
    """inode -> "pid N (comm)", from /proc/*/fd (needs root for other users' processes)."""
    owners: dict[int, str] = {}
    if not inodes:
        return owners
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return owners
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in inodes and inode not in owners:
                    try:
                        comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    except OSError:
                        comm = "?"
                    owners[inode] = f"pid {pid} ({comm})"
    return owners


def read_listeners(proc: str = "/proc/net") -> tuple[Listener, ...]:
    found: list[Listener] = []
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            found += parse_proc_net_tcp(Path(proc, name).read_text(), v6)
        except OSError:
            continue  # no IPv6 in this kernel or namespace
    owners = _socket_owners({x.inode for x in found if x.inode})
    return tuple(Listener(x.host, x.port, x.inode, owners.get(x.inode)) for x in found)


def _file_info(path: str) -> FileInfo:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return FileInfo(path, False)
    except OSError as exc:
        return FileInfo(path, True, error=exc.strerror)
    return FileInfo(path, True, stat.S_IMODE(st.st_mode), st.st_uid)


async def _tailscale_facts(cfg: Config) -> TailscaleFacts:
    from .tailscale import LocalAPIClient, find_socket

    path = find_socket(cfg.tailscale.socket)
    if path is None:
        return TailscaleFacts(None)
    try:
        async with LocalAPIClient(path, timeout=min(cfg.tailscale.timeout, 3.0)) as api:
            st = await api.status(peers=False)
            cert_access = (
                await _cert_access(api, cfg, st.cert_domains)
                if cfg.tls.mode == "tailscale" and st.running
                else None
            )
    except TailscaleError as exc:
        return TailscaleFacts(path, False, str(exc))
    return TailscaleFacts(
        path,
        True,
        None,
        st.backend_state,
        st.tun,
        st.key_expiry,
        st.expired,
        st.tailscale_ips,
        st.cert_domains,
        cert_access,
    )


async def _cert_access(api: Any, cfg: Config, domains: Sequence[str]) -> str | None:
    """Ask for the certificate exactly as clawgate would (tls.py); None without a domain."""
    from .errors import LocalAPIDenied

    domain = cfg.tls.domain or (domains[0] if domains else None)
    if domain is None:
        return None
    api.cert_timeout = 30.0  # a first issuance runs ACME: slow, but doctor should not hang
    try:
        await api.cert_pair(domain, cfg.tls.min_validity)
    except LocalAPIDenied:
        return "denied"
    except (TailscaleError, ValueError) as exc:
        return str(exc)
    return "ok"


async def _upstream_facts(cfg: Config) -> tuple[bool, str | None]:
    from .admin import upstream_reachable

    return await upstream_reachable(cfg.upstream)


def _admin_health(cfg: Config) -> dict[str, Any] | None:
    if not cfg.admin.enabled or not cfg.admin.port:
        return None
    url = f"http://{hostport(cfg.admin.host, cfg.admin.port)}/health"
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - loopback admin
            body = resp.read(1 << 20)
    except urllib.error.HTTPError as exc:  # 503 = degraded, still a clawgate
        body = exc.read(1 << 20)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and "clawgate" in doc else None


def gather(config_path: str | None, gateway_config: str | None = None) -> Facts:
    """Collect the facts (files, tailscaled, sockets, the gateway's config, admin)."""
    raw: Any = {}
    error: str | None = None
    cfg: Config | None = None
    if config_path is not None:
        try:
            raw = json.loads(Path(config_path).read_text("utf-8"))
        except (OSError, UnicodeError, ValueError):
            raw = {}  # load_config below says precisely what is wrong
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        error = str(exc)
    # With a broken config, look at the machine with the defaults rather than not at all.
    eff = cfg if cfg is not None else Config()
    token_info = _file_info(eff.tokens.file)
    count: int | None = None
    if token_info.exists and token_info.error is None:
        try:
            count = len(TokenFile(eff.tokens.file).load())
        except TokenStoreError as exc:
            token_info = FileInfo(
                token_info.path, True, token_info.mode, token_info.uid, str(exc).split(": ", 1)[-1]
            )

    async def io() -> tuple[TailscaleFacts, tuple[bool, str | None]]:
        return await asyncio.gather(_tailscale_facts(eff), _upstream_facts(eff))

    ts, (up_ok, up_err) = asyncio.run(io())
    gpath = gateway_config or default_gateway_config_path()
    ginfo = _file_info(gpath)
    gdoc: Any = None
    if ginfo.exists and ginfo.error is None:
        try:
            gdoc = loads_json5(Path(gpath).read_text("utf-8"))
        except OSError as exc:
            ginfo = FileInfo(gpath, True, ginfo.mode, ginfo.uid, exc.strerror)
        except (ValueError, UnicodeError) as exc:
            ginfo = FileInfo(gpath, True, ginfo.mode, ginfo.uid, f"not valid JSON5 ({exc})")
    pairing_devices: int | None = None
    pairing_error: str | None = None
    if eff.gateway_token.enabled and eff.gateway_token.state_dir is not None:
        from .gateway_store import DB_RELATIVE, read_snapshot, store_version

        db = os.path.join(eff.gateway_token.state_dir, DB_RELATIVE)
        try:
            store_version(db)
            pairing_devices = len(read_snapshot(db).devices)
        except (OSError, sqlite3.Error, ValueError) as exc:
            pairing_error = f"{db}: {exc}"
    return Facts(
        pairing_devices=pairing_devices,
        pairing_error=pairing_error,
        config_path=config_path,
        raw=raw,
        config_error=error,
        cfg=eff,
        euid=os.geteuid(),
        token_file=token_info,
        token_count=count,
        tailscale=ts,
        listeners=read_listeners(),
        upstream_reachable=up_ok,
        upstream_error=up_err,
        gateway_config=ginfo,
        gateway_doc=gdoc,
        clawgate_health=_admin_health(eff),
    )
