"""A fake tailscaled: a real aiohttp server on a unix socket speaking the LocalAPI subset we use.

It follows /work/shared/reference/tailscale-localapi.md to the letter (Host/Origin/Referer
CSRF rules, status codes and bodies, tab-indented JSON, chunking over 2048 bytes, the
chunked IPN bus) and builds its answers from the real sample bodies in ``tailscale/``
beside this file. Tests drive it through its Python API; other processes through
``/fake/*`` on the same socket. Run standalone with
``python -m tests.fakes.fake_tailscaled --socket PATH [--peers FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import ipaddress
import json
import os
import re
import secrets
import signal
import stat
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

__all__ = [
    "BACKEND_STATES",
    "DEFAULT_ALICE_IP",
    "DEFAULT_CI_IP",
    "SAMPLES",
    "SELF_IPV4",
    "SELF_IPV6",
    "TAILNET",
    "VERSION",
    "FakeTailscaled",
    "RecordedRequest",
    "default_peers",
    "derive_ipv6",
    "load_sample",
    "main",
    "notify_line",
    "peer_from_spec",
    "tagged_peer",
    "user_peer",
]

SAMPLES = Path(__file__).with_name("tailscale")
VERSION = "1.102.3-t3e1a8c5f2-g7d24b61a0"
# tailcfg.CurrentCapabilityVersion of each release (the Tailscale-Cap header): 1.96.4 sends
# 133 (seen from the real daemon in tests/real), 1.102.x 142 (tailcfg.go at v1.102.3).
CAPVER_BY_RELEASE = {"1.96": "133", "1.102": "142"}
CAPVER = CAPVER_BY_RELEASE["1.102"]
TAILNET = "tail3f2a1.ts.net"
SELF_IPV4 = "100.64.0.1"
SELF_IPV6 = "fd7a:115c:a1e0::1"
SELF_HOST = "web01"
SELF_USER_ID = 8314716520451093  # Self.UserID of the status sample (alice@example.com)
DEFAULT_ALICE_IP = "100.101.102.103"
DEFAULT_CI_IP = "100.88.12.34"
LOCALAPI_HOST = "local-tailscaled.sock"
BACKEND_STATES = (
    "NoState",
    "InUseOtherUser",
    "NeedsLogin",
    "NeedsMachineAuth",
    "Stopped",
    "Starting",
    "Running",
)
MODES = ("ok", "slow", "badjson", "503", "403", "400", "500")
CERT_MODES = ("ok", "403")
PATHS = ("direct", "derp", "peer-relay", "idle")
# Go's net/http buffers this much of a handler's output: smaller bodies get a
# Content-Length, larger ones Transfer-Encoding: chunked.
CHUNKING_THRESHOLD = 2048
CSP = (
    "default-src 'none'; frame-ancestors 'none'; script-src 'none'; "
    "script-src-elem 'none'; script-src-attr 'none'"
)
FELL_BEHIND = "IPN bus consumer fell behind; closing watch"
# The fields every ipn.Notify line carries (null when unset), in the daemon's order.
_NOTIFY_BASE = (
    "Version",
    "ErrMessage",
    "LoginFinished",
    "State",
    "Prefs",
    "NetMap",
    "Engine",
    "BrowseToURL",
    "DriveShares",
)
_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
_CLOSE = object()
_ABORT = object()

DUMMY_KEY_PEM = (
    b"-----BEGIN EC PRIVATE KEY-----\n"
    b"MHcCAQEEIFakeFakeFakeFakeFakeFakeFakeFakeFakeFakeFakeoAoGCCqGSM49\n"
    b"-----END EC PRIVATE KEY-----\n"
)
DUMMY_CERT_PEM = (
    b"-----BEGIN CERTIFICATE-----\n"
    b"MIIBfakeLEAFfakeLEAFfakeLEAFfakeLEAFfakeLEAFfakeLEAFfakeLEAFfake\n"
    b"-----END CERTIFICATE-----\n"
    b"-----BEGIN CERTIFICATE-----\n"
    b"MIIBfakeINTERMEDIATEfakeINTERMEDIATEfakeINTERMEDIATEfakeINTERMED\n"
    b"-----END CERTIFICATE-----\n"
)


def load_sample(name: str) -> Any:
    """A sample body (JSON) or the list of lines of an ``.ndjson`` sample, freshly parsed."""
    text = (SAMPLES / name).read_text(encoding="utf-8")
    if name.endswith(".ndjson"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def derive_ipv6(ipv4: str) -> str:
    """A stable fd7a:115c:a1e0::/48 address for a 100.x node, like the control plane's."""
    a, b, c, d = (int(x) for x in ipv4.split("."))
    return str(ipaddress.IPv6Address(f"fd7a:115c:a1e0::{a * 256 + b:x}:{c * 256 + d:x}"))


def _digest_int(seed: str) -> int:
    # IDs may exceed 2^53 in the real API; keep them big but within int64.
    return int.from_bytes(hashlib.sha256(seed.encode()).digest()[:7], "big")


def _hex(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def _set_node_common(
    node: dict[str, Any],
    ip: str,
    ipv6: str | None,
    node_name: str,
    tailnet: str,
    os_name: str,
) -> None:
    v6 = ipv6 or derive_ipv6(ip)
    prefixes = [f"{ip}/32", f"{v6}/128"]
    node["ID"] = _digest_int("node:" + ip)
    node["StableID"] = "n" + _hex("stable:" + ip)[:12] + "CNTRL"
    node["Name"] = f"{node_name}.{tailnet}."
    node["Key"] = "nodekey:" + _hex("key:" + ip)
    node["Addresses"] = prefixes
    node["AllowedIPs"] = list(prefixes)
    node["Hostinfo"]["OS"] = os_name
    node["Hostinfo"]["Hostname"] = node_name
    node["ComputedName"] = node_name
    node["ComputedNameWithHost"] = node_name


def _set_key_expiry(node: dict[str, Any], key_expiry: str | None) -> None:
    # New daemons omit a zero KeyExpiry; old ones send "0001-01-01T00:00:00Z".
    if key_expiry is None:
        node.pop("KeyExpiry", None)
        return
    # Keep the daemon's field order: KeyExpiry follows Key.
    items = [(k, v) for k, v in node.items() if k != "KeyExpiry"]
    node.clear()
    for k, v in items:
        node[k] = v
        if k == "Key":
            node["KeyExpiry"] = key_expiry
    node.setdefault("KeyExpiry", key_expiry)


def user_peer(
    ip: str,
    login: str,
    node_name: str,
    *,
    ipv6: str | None = None,
    display_name: str | None = None,
    profile_pic: str | None = None,
    os_name: str = "macOS",
    caps: Mapping[str, list[Any] | None] | None = None,
    key_expiry: str | None = "2027-05-10T14:03:22Z",
    tailnet: str = TAILNET,
) -> dict[str, Any]:
    """A whois body for a person's device, derived from ``whois_user.json``."""
    body: dict[str, Any] = load_sample("whois_user.json")
    node = body["Node"]
    _set_node_common(node, ip, ipv6, node_name, tailnet, os_name)
    _set_key_expiry(node, key_expiry)
    user_id = _digest_int("user:" + login)
    node["User"] = user_id
    profile: dict[str, Any] = {
        "ID": user_id,
        "LoginName": login,
        "DisplayName": display_name or login.split("@", 1)[0].title(),
    }
    if profile_pic:
        profile["ProfilePicURL"] = profile_pic
    body["UserProfile"] = profile
    body["CapMap"] = dict(caps) if caps is not None else None
    return body


def tagged_peer(
    ip: str,
    tags: Iterable[str],
    *,
    node_name: str = "ci-runner-1",
    ipv6: str | None = None,
    os_name: str = "linux",
    caps: Mapping[str, list[Any] | None] | None = None,
    key_expiry: str | None = None,
    tailnet: str = TAILNET,
) -> dict[str, Any]:
    """A whois body for a tagged node (owned by the ``tagged-devices`` pseudo-user)."""
    tag_list = list(tags)
    if not tag_list:
        raise ValueError("a tagged peer needs at least one tag")
    body: dict[str, Any] = load_sample("whois_tagged.json")
    node = body["Node"]
    _set_node_common(node, ip, ipv6, node_name, tailnet, os_name)
    _set_key_expiry(node, key_expiry)
    node["Tags"] = tag_list
    body["CapMap"] = dict(caps) if caps is not None else None
    return body


def default_peers() -> list[tuple[str, dict[str, Any], str]]:
    """(ip, whois body, path) of the default tailnet: alice's laptop and a tagged CI server."""
    sample_user = load_sample("whois_user.json")
    alice = user_peer(
        DEFAULT_ALICE_IP,
        "alice@example.com",
        "alice-laptop",
        ipv6="fd7a:115c:a1e0::d401:6667",
        display_name="Alice Example",
        profile_pic=sample_user["UserProfile"]["ProfilePicURL"],
        caps=sample_user["CapMap"],
    )
    ci = tagged_peer(DEFAULT_CI_IP, ["tag:ci"], ipv6="fd7a:115c:a1e0::6a01:c22")
    return [(DEFAULT_ALICE_IP, alice, "direct"), (DEFAULT_CI_IP, ci, "derp")]


def notify_line(**fields: Any) -> dict[str, Any]:
    """An ipn.Notify line: the always-present null fields plus ``fields``."""
    line: dict[str, Any] = dict.fromkeys(_NOTIFY_BASE)
    line["Version"] = VERSION
    line.update(fields)
    return line


def _node_ips(body: Mapping[str, Any]) -> list[str]:
    return [a.split("/", 1)[0] for a in body["Node"]["Addresses"]]


def _parse_addr(addr: str) -> tuple[str, int | None] | None:
    """``IP``, ``IP:port`` or ``[v6]:port`` -> (ip, port); None when invalid."""
    host, port = addr, None
    if addr.startswith("["):
        end = addr.find("]:")
        if end < 0:
            return None
        host, port_text = addr[1:end], addr[end + 2 :]
        port = int(port_text) if port_text.isdigit() else -1
    elif addr.count(":") == 1:
        host, port_text = addr.split(":")
        port = int(port_text) if port_text.isdigit() else -1
    if port is not None and not 0 <= port <= 65535:
        return None
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        return None


@dataclass(frozen=True)
class RecordedRequest:
    """One LocalAPI request as the fake received it (headers as sent, in order)."""

    method: str
    path: str
    query_string: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_names(self) -> list[str]:
        return [key.lower() for key, _ in self.headers]


class FakeTailscaled:
    """The fake daemon. All attributes are plain state that tests may read and set."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        peers: Iterable[tuple[str, dict[str, Any], str]] | None = None,
        version: str = VERSION,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.version = version
        self.backend_state = "Running"
        self.mode = "ok"
        self.cert_mode = "ok"
        self.slow_seconds = 30.0
        self.tun = True
        # This node's own addresses (status TailscaleIPs); tests may change them.
        self.self_ips: list[str] = [SELF_IPV4, SELF_IPV6]
        # Up to 1.100 the daemon does not unmap ::ffff:a.b.c.d itself: the client must.
        self.unmaps_v4_mapped = False
        self.self_key_expiry: str | None = "2026-08-29T09:14:27Z"
        self.self_expired = False
        self.cert_domains: list[str] = [f"{SELF_HOST}.{TAILNET}"]
        self.whois_calls: Counter[str] = Counter()
        self.watches_total = 0  # IPN bus streams ever opened
        self.requests: list[RecordedRequest] = []
        self.cert_calls: list[tuple[str, str, str | None]] = []
        self.session_id = secrets.token_hex(8)
        self._nodes: dict[str, dict[str, Any]] = {}  # StableID -> whois body
        self._by_ip: dict[str, str] = {}  # every address -> StableID
        self._paths: dict[str, str] = {}  # StableID -> path kind
        self._loopback: dict[int, dict[str, Any]] = {}  # proxymap: 127.0.0.1 port -> body
        self._certs: dict[str, tuple[bytes, bytes]] = {
            self.cert_domains[0]: (DUMMY_KEY_PEM, DUMMY_CERT_PEM)
        }
        self._watchers: set[asyncio.Queue[Any]] = set()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        for ip, body, path in default_peers() if peers is None else peers:
            self.add_peer(ip, body, path=path, notify=False)

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> FakeTailscaled:
        """Listen on the socket path, replacing a stale socket file left by a killed run."""
        if self._runner is not None:
            raise RuntimeError("already started")
        try:
            mode = os.lstat(self.socket_path).st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise RuntimeError(f"{self.socket_path} exists and is not a socket")
            os.unlink(self.socket_path)
        self._release = asyncio.Event()
        app = web.Application(middlewares=[self._guard])
        app.on_response_prepare.append(self._add_headers)
        app.router.add_get("/localapi/v0/whois", self._whois)
        app.router.add_get("/localapi/v0/status", self._status)
        app.router.add_get("/localapi/v0/watch-ipn-bus", self._watch)
        app.router.add_get("/localapi/v0/cert/{domain}", self._cert)
        app.router.add_get("/fake/stats", self._ctl_stats)
        app.router.add_post("/fake/peers", self._ctl_add_peers)
        app.router.add_delete("/fake/peers/{ip}", self._ctl_remove_peer)
        app.router.add_post("/fake/mode", self._ctl_mode)
        app.router.add_post("/fake/state", self._ctl_state)
        app.router.add_post("/fake/notify", self._ctl_notify)
        app.router.add_post("/fake/drop-watchers", self._ctl_drop)
        app.router.add_post("/fake/reset-stats", self._ctl_reset)
        app.router.add_post("/fake/cert", self._ctl_cert)
        app.router.add_post("/fake/self", self._ctl_self)
        # handler_cancellation: a watcher that hangs up leaves the bus at once, as in Go.
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True
        )
        await runner.setup()
        site = web.UnixSite(runner, self.socket_path)
        await site.start()
        os.chmod(self.socket_path, 0o666)  # like tailscaled: every local user may read
        self._runner = runner
        return self

    async def stop(self) -> None:
        """Stop serving: release slow handlers, close bus streams, unlink the socket."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._release.set()
        self.drop_watchers(abort=True)
        await runner.cleanup()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def __aenter__(self) -> FakeTailscaled:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---- state API for tests ---------------------------------------------------------

    def add_peer(
        self, ip: str, body: dict[str, Any], *, path: str = "direct", notify: bool = True
    ) -> None:
        """Serve ``body`` for ``ip`` and for every address in its Node.Addresses."""
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}")
        stable = str(body["Node"]["StableID"])
        self._nodes[stable] = body
        self._paths[stable] = path
        for addr in {ip, *_node_ips(body)}:
            self._by_ip[addr] = stable
        if notify:
            self.push_notify({"PeersChanged": [body["Node"]]})

    def remove_peer(self, ip: str) -> None:
        """Forget the node that has ``ip``; pushes a PeersRemoved line on the bus."""
        stable = self._by_ip.get(ip)
        if stable is None:
            raise KeyError(ip)
        body = self._nodes.pop(stable)
        self._paths.pop(stable, None)
        for addr in [a for a, s in self._by_ip.items() if s == stable]:
            del self._by_ip[addr]
        self.push_notify({"PeersRemoved": [body["Node"]["ID"]]})

    def peer_ips(self) -> list[str]:
        return sorted(self._by_ip)

    def set_peer_path(self, ip: str, path: str) -> None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}")
        self._paths[self._by_ip[ip]] = path

    def add_loopback(self, port: int, body: dict[str, Any]) -> None:
        """Userspace networking: a tailnet peer proxied in from 127.0.0.1:``port``."""
        self._loopback[port] = body

    def remove_loopback(self, port: int) -> None:
        self._loopback.pop(port, None)

    def set_backend_state(self, name: str) -> None:
        """Switch the backend state; pushes a ``State`` line like the daemon does."""
        if name not in BACKEND_STATES:
            raise ValueError(f"unknown backend state {name!r}")
        self.backend_state = name
        self.push_notify({"State": BACKEND_STATES.index(name)})

    def set_cert(self, domain: str, key_pem: bytes, cert_pem: bytes) -> None:
        self._certs[domain] = (key_pem, cert_pem)
        if domain not in self.cert_domains:
            self.cert_domains.append(domain)

    def push_notify(self, fields: Mapping[str, Any]) -> None:
        """Send one line (the null base fields overlaid with ``fields``) to every watcher."""
        self.push_raw(json.dumps(notify_line(**fields), separators=(",", ":")).encode() + b"\n")

    def push_raw(self, data: bytes) -> None:
        """Write ``data`` as-is, as one chunk, to every watcher (split lines, big lines)."""
        for queue in self._watchers:
            queue.put_nowait(data)

    def fall_behind(self) -> None:
        """What 1.102+ does to a slow watcher: an ErrMessage line, then close."""
        self.push_notify({"ErrMessage": FELL_BEHIND})
        self.drop_watchers()

    def drop_watchers(self, *, abort: bool = False) -> None:
        """End every IPN bus stream: cleanly (final chunk) or, with abort, cut mid-stream."""
        for queue in self._watchers:
            queue.put_nowait(_ABORT if abort else _CLOSE)

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    async def wait_watchers(self, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until ``count`` IPN bus watchers are connected."""
        async with asyncio.timeout(timeout):
            while len(self._watchers) < count:
                await asyncio.sleep(0.005)

    async def wait_watch_opened(self, since: int, timeout: float = 5.0) -> None:
        """Wait until an IPN bus stream is opened after ``watches_total`` was ``since``."""
        async with asyncio.timeout(timeout):
            while self.watches_total <= since:
                await asyncio.sleep(0.005)

    def stats(self) -> dict[str, Any]:
        return {
            "whois_calls": dict(self.whois_calls),
            "requests": len(self.requests),
            "watchers": len(self._watchers),
            "watches_total": self.watches_total,
            "mode": self.mode,
            "cert_mode": self.cert_mode,
            "backend_state": self.backend_state,
            "peers": self.peer_ips(),
        }

    # ---- HTTP plumbing ---------------------------------------------------------------

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Tailscale-Version"] = self.version
        release = ".".join(self.version.split(".")[:2])
        response.headers["Tailscale-Cap"] = CAPVER_BY_RELEASE.get(release, CAPVER)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/fake/"):
            result: web.StreamResponse = await handler(request)
            return result
        headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers)
        self.requests.append(
            RecordedRequest(request.method, request.path, request.query_string, headers)
        )
        # ipn/localapi validHost + the CSRF check: exact Host, and no Origin or Referer.
        host = request.headers.get("Host", "")
        if host not in ("", LOCALAPI_HOST):
            return _error(403, "invalid localapi request")
        if "Origin" in request.headers or "Referer" in request.headers:
            return _error(403, "invalid localapi request")
        try:
            result = await handler(request)
        except web.HTTPNotFound:
            return _error(404, "404 page not found")
        except web.HTTPMethodNotAllowed:
            return _error(405, "want GET")
        return result

    async def _mode_response(self, what: str) -> web.StreamResponse | None:
        """The failure the current ``mode`` asks for, after an optional stall."""
        if self.mode == "slow":
            # Stall like a starting daemon; released early by stop() so shutdown is quick.
            try:
                async with asyncio.timeout(self.slow_seconds):
                    await self._release.wait()
            except TimeoutError:
                pass
        if self.mode == "503":
            return _error(503, "no backend")
        if self.mode == "500":
            return _error(500, "internal error: backend crashed")
        if self.mode == "400":
            return _error(400, "invalid 'addr' parameter")
        if self.mode == "403":
            return _error(403, f"{what} access denied")
        if self.mode == "badjson":
            return web.Response(
                body=b'{"Node": {"ID": 12, "Name": "trunc', content_type="application/json"
            )
        return None

    async def _whois(self, request: web.Request) -> web.StreamResponse:
        addr = request.query.get("addr", "")
        if not addr:
            return _error(400, "missing 'addr' parameter")
        body: dict[str, Any] | None = None
        parsed = None if addr.startswith("nodekey:") else _parse_addr(addr)
        if parsed is None and not addr.startswith("nodekey:"):
            return _error(400, "invalid 'addr' parameter")
        self.whois_calls[parsed[0] if parsed else addr] += 1
        failure = await self._mode_response("whois")
        if failure is not None:
            return failure
        if parsed is None:
            body = next((b for b in self._nodes.values() if b["Node"]["Key"] == addr), None)
        else:
            ip, port = parsed
            if self.unmaps_v4_mapped:
                mapped = ipaddress.IPv6Address(ip) if ":" in ip else None
                if mapped is not None and mapped.ipv4_mapped is not None:
                    ip = str(mapped.ipv4_mapped)
            if self.backend_state != "Running":
                body = None
            elif ipaddress.ip_address(ip).is_loopback:
                body = self._loopback.get(port or 0)
                if body is None:
                    await asyncio.sleep(0.01)  # the daemon retries its proxymap (~180 ms)
            elif ip in self.self_ips:
                # The real daemon answers for its own addresses too: this node, its owner.
                body = self._self_whois()
            else:
                stable = self._by_ip.get(ip)
                body = self._nodes.get(stable) if stable else None
        if body is None:
            return _error(404, "no match for IP:port")
        # json.MarshalIndent(res, "", "\t"): no trailing newline.
        data = json.dumps(body, indent="\t", ensure_ascii=False).encode()
        return await _send(request, data, "application/json")

    def _self_whois(self) -> dict[str, Any]:
        """whois of one of this node's own addresses (SELF_HOST, owned by alice in the
        status sample), as the real 1.96.4 answers it (tests/real/test_fake_vs_real.py)."""
        v4 = next((ip for ip in self.self_ips if ":" not in ip), self.self_ips[0])
        v6 = next((ip for ip in self.self_ips if ":" in ip), None)
        body = user_peer(
            v4,
            "alice@example.com",
            SELF_HOST,
            ipv6=v6,
            os_name="linux",
            key_expiry=self.self_key_expiry,
        )
        body["Node"]["User"] = body["UserProfile"]["ID"] = SELF_USER_ID
        return body

    def _status_body(self, peers: bool) -> dict[str, Any]:
        if self.backend_state != "Running":
            body: dict[str, Any] = load_sample("status_needslogin.json")
            body["Version"] = self.version
            body["BackendState"] = self.backend_state
            body["TUN"] = self.tun
            if self.backend_state != "NeedsLogin":
                body["AuthURL"] = ""
            return body
        body = load_sample("status_running_2peers.json")
        template = body["Peer"][next(iter(body["Peer"]))]
        body["Version"] = self.version
        body["TUN"] = self.tun
        body["TailscaleIPs"] = list(self.self_ips)
        me = body["Self"]
        me["DNSName"] = f"{SELF_HOST}.{TAILNET}."
        me["TailscaleIPs"] = list(self.self_ips)
        me["AllowedIPs"] = [f"{ip}/{128 if ':' in ip else 32}" for ip in self.self_ips]
        me["PeerAPIURL"] = [
            f"http://[{ip}]:53417" if ":" in ip else f"http://{ip}:53417" for ip in self.self_ips
        ]
        me.pop("KeyExpiry", None)
        me.pop("Expired", None)
        if self.self_key_expiry is not None:
            me["KeyExpiry"] = self.self_key_expiry
        if self.self_expired:
            me["Expired"] = True
        body["MagicDNSSuffix"] = TAILNET
        body["CurrentTailnet"]["MagicDNSSuffix"] = TAILNET
        body["CertDomains"] = list(self.cert_domains) or None
        users = {str(k): v for k, v in body["User"].items() if v["LoginName"] != "tagged-devices"}
        if not peers:
            body["Peer"] = None
            body["User"] = users
            return body
        peer_map: dict[str, Any] = {}
        for stable, whois in self._nodes.items():
            node, profile = whois["Node"], whois["UserProfile"]
            entry = copy.deepcopy(template)
            ips = [a.split("/", 1)[0] for a in node["Addresses"]]
            entry.update(
                {
                    "ID": stable,
                    "NodeID": node["ID"],
                    "PublicKey": node["Key"],
                    "HostName": node["Hostinfo"]["Hostname"],
                    "DNSName": node["Name"],
                    "OS": node["Hostinfo"]["OS"],
                    "UserID": node["User"],
                    "TailscaleIPs": ips,
                    "AllowedIPs": list(node["Addresses"]),
                    "PeerAPIURL": [f"http://{ips[0]}:61422"],
                }
            )
            entry.pop("KeyExpiry", None)
            if node.get("KeyExpiry") and node["KeyExpiry"] != "0001-01-01T00:00:00Z":
                entry["KeyExpiry"] = node["KeyExpiry"]
            if node.get("Tags"):
                entry["Tags"] = list(node["Tags"])
            kind = self._paths.get(stable, "direct")
            entry["Active"] = kind != "idle"
            entry["CurAddr"] = "198.51.100.23:41641" if kind == "direct" else ""
            entry["PeerRelay"] = "100.64.7.7:40000" if kind == "peer-relay" else ""
            entry["Relay"] = "nyc" if kind == "derp" else "fra"
            peer_map[node["Key"]] = entry
            users[str(profile["ID"])] = profile
        body["Peer"] = peer_map or None
        body["User"] = users
        return body

    async def _status(self, request: web.Request) -> web.StreamResponse:
        failure = await self._mode_response("status")
        if failure is not None:
            return failure
        peers = request.query.get("peers") != "false"
        # json.NewEncoder with SetIndent("", "\t"): a trailing newline.
        data = json.dumps(self._status_body(peers), indent="\t", ensure_ascii=False) + "\n"
        return await _send(request, data.encode(), "application/json")

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        mask_text = request.query.get("mask", "0")
        if not mask_text.isdigit():
            return _error(400, "bad mask")
        mask = int(mask_text)
        failure = await self._mode_response("watch")
        if failure is not None and self.mode != "badjson":
            return failure
        queue: asyncio.Queue[Any] = asyncio.Queue()
        response = web.StreamResponse(status=200)
        response.content_type = "application/json"
        response.enable_chunked_encoding()
        self._watchers.add(queue)
        self.watches_total += 1
        try:
            await response.prepare(request)
            if mask & 2:
                first = notify_line(State=BACKEND_STATES.index(self.backend_state))
                first = {"Version": first.pop("Version"), "SessionID": self.session_id, **first}
                await response.write(json.dumps(first, separators=(",", ":")).encode() + b"\n")
            if self.mode == "badjson":
                await response.write(b'{"State":6,"NetMap":nul\n')
            while True:
                item = await queue.get()
                if item is _CLOSE:
                    break
                if item is _ABORT:
                    # Like a crashed daemon: no final chunk, the connection just goes.
                    if request.transport is not None:
                        request.transport.abort()
                    break
                await response.write(item)
        finally:
            self._watchers.discard(queue)
        return response

    async def _cert(self, request: web.Request) -> web.StreamResponse:
        domain = request.match_info["domain"]
        kind = request.query.get("type", "")
        min_validity = request.query.get("min_validity")
        self.cert_calls.append((domain, kind, min_validity))
        failure = await self._mode_response("cert")
        if failure is not None:
            return failure
        if self.cert_mode == "403":
            return _error(403, "cert access denied")
        if min_validity is not None and not _DURATION.match(min_validity):
            return _error(400, "invalid validity")
        pair = self._certs.get(domain)
        if not self.cert_domains:
            # What the real daemon says when the netmap has no CertDomains (HTTPS off).
            return _error(500, "your Tailscale account does not support getting TLS certs")
        if pair is None or domain not in self.cert_domains:
            # Go's %q of the domain and of the []string, as the real daemon formats it.
            wanted = "[" + " ".join(json.dumps(d) for d in self.cert_domains) + "]"
            return _error(500, f"invalid domain {json.dumps(domain)}; must be one of {wanted}")
        key, chain = pair
        if kind == "pair":
            data = key + chain
        elif kind == "key":
            data = key
        elif kind == "cert":
            data = chain
        else:
            return _error(400, 'invalid type; want "cert", "key", or "pair"')
        return await _send(request, data, "text/plain")

    # ---- control surface (/fake/*) -------------------------------------------------

    async def _ctl_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats())

    async def _ctl_add_peers(self, request: web.Request) -> web.StreamResponse:
        spec = await request.json()
        added = []
        for item in spec if isinstance(spec, list) else [spec]:
            ip, body, path = peer_from_spec(item)
            self.add_peer(ip, body, path=path)
            added.append(ip)
        return web.json_response({"added": added})

    async def _ctl_remove_peer(self, request: web.Request) -> web.StreamResponse:
        try:
            self.remove_peer(request.match_info["ip"])
        except KeyError:
            return web.json_response({"error": "no such peer"}, status=404)
        return web.json_response({"removed": request.match_info["ip"]})

    async def _ctl_mode(self, request: web.Request) -> web.StreamResponse:
        spec = await request.json()
        mode = spec.get("mode", self.mode)
        cert_mode = spec.get("cert_mode", self.cert_mode)
        if mode not in MODES or cert_mode not in CERT_MODES:
            return web.json_response(
                {"error": f"mode in {MODES}, cert_mode in {CERT_MODES}"}, status=400
            )
        self.mode, self.cert_mode = mode, cert_mode
        if "slow_seconds" in spec:
            self.slow_seconds = float(spec["slow_seconds"])
        if mode != "slow":
            self._release.set()
            self._release = asyncio.Event()
        return web.json_response({"mode": self.mode, "cert_mode": self.cert_mode})

    async def _ctl_state(self, request: web.Request) -> web.StreamResponse:
        spec = await request.json()
        try:
            self.set_backend_state(str(spec["state"]))
        except (KeyError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"state": self.backend_state})

    async def _ctl_notify(self, request: web.Request) -> web.StreamResponse:
        self.push_notify(await request.json())
        return web.json_response({"watchers": len(self._watchers)})

    async def _ctl_drop(self, request: web.Request) -> web.StreamResponse:
        count = len(self._watchers)
        self.drop_watchers()
        return web.json_response({"dropped": count})

    async def _ctl_reset(self, request: web.Request) -> web.StreamResponse:
        self.whois_calls.clear()
        self.requests.clear()
        self.cert_calls.clear()
        return web.json_response({"ok": True})

    async def _ctl_self(self, request: web.Request) -> web.StreamResponse:
        """``{"ips": [...]}``: this node's own addresses; pushes a SelfChange line."""
        spec = await request.json()
        self.self_ips = [str(ip) for ip in spec["ips"]]
        prefixes = [f"{ip}/{128 if ':' in ip else 32}" for ip in self.self_ips]
        self.push_notify({"SelfChange": {"Addresses": prefixes}})
        return web.json_response({"self_ips": self.self_ips})

    async def _ctl_cert(self, request: web.Request) -> web.StreamResponse:
        spec = await request.json()
        self.set_cert(spec["domain"], spec["key_pem"].encode(), spec["cert_pem"].encode())
        return web.json_response({"cert_domains": self.cert_domains})


def peer_from_spec(item: Mapping[str, Any]) -> tuple[str, dict[str, Any], str]:
    """One ``/fake/peers`` (or ``--peers`` file) entry -> (ip, whois body, path).

    ``{"ip", "body"}`` serves a body as given; ``{"kind": "user", "ip", "login",
    "node_name"}`` and ``{"kind": "tagged", "ip", "tags"}`` use the builders. Optional:
    ``path`` (direct|derp|peer-relay|idle), ``caps``, ``ipv6``, ``node_name``.
    """
    ip = str(item["ip"])
    path = str(item.get("path", "direct"))
    kind = item.get("kind", "raw" if "body" in item else "user")
    extra = {k: item[k] for k in ("caps", "ipv6") if k in item}
    if kind == "raw":
        return ip, dict(item["body"]), path
    if kind == "user":
        body = user_peer(ip, str(item["login"]), str(item["node_name"]), **extra)
        return ip, body, path
    if kind == "tagged":
        if "node_name" in item:
            extra["node_name"] = item["node_name"]
        return ip, tagged_peer(ip, list(item["tags"]), **extra), item.get("path", "derp")
    raise ValueError(f"unknown peer kind {kind!r}")


def _error(status: int, message: str) -> web.Response:
    # Go's http.Error: text/plain, the message plus a newline.
    return web.Response(
        status=status,
        body=(message + "\n").encode(),
        headers={"Content-Type": "text/plain; charset=utf-8"},
    )


async def _send(request: web.Request, data: bytes, content_type: str) -> web.StreamResponse:
    """Answer like Go's net/http: Content-Length up to 2048 bytes, chunked beyond."""
    if len(data) <= CHUNKING_THRESHOLD:
        return web.Response(body=data, headers={"Content-Type": content_type})
    response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for start in range(0, len(data), 4096):
        await response.write(data[start : start + 4096])
    await response.write_eof()
    return response


def _load_peers_file(path: str) -> list[tuple[str, dict[str, Any], str]]:
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(spec, dict):  # {ip: whois body}
        return [(ip, body, "direct") for ip, body in spec.items()]
    return [peer_from_spec(item) for item in spec]


async def _serve(args: argparse.Namespace) -> None:
    peers: list[tuple[str, dict[str, Any], str]] = [] if args.no_default_peers else default_peers()
    if args.peers:
        peers.extend(_load_peers_file(args.peers))
    fake = FakeTailscaled(args.socket, peers=peers)
    if args.state:
        fake.backend_state = args.state
    if args.self_ips:
        fake.self_ips = list(args.self_ips)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await fake.start()
    print(f"fake tailscaled listening on {fake.socket_path}", flush=True)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.fake_tailscaled")
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    parser.add_argument("--peers", help="JSON file: a list of /fake/peers specs or {ip: body}")
    parser.add_argument("--no-default-peers", action="store_true")
    parser.add_argument("--state", choices=BACKEND_STATES, help="initial backend state")
    parser.add_argument(
        "--self-ip",
        action="append",
        dest="self_ips",
        help="this node's own Tailscale IP (repeatable; default 100.64.0.1 and fd7a:115c:a1e0::1)",
    )
    args = parser.parse_args(argv)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
