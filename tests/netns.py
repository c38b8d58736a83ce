"""A real tailnet made of Linux network namespaces, for tests whose source addresses must be real.

`Tailnet` builds four hosts (`gw`, `phone`, `ci`, `public`) joined by one bridge that lives in
its own namespace, so the root namespace is never touched; `socket_in` and friends let this very
process hold sockets inside any of them (setns on a short-lived thread) and use them with asyncio.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

__all__ = [
    "add_bridge",
    "CI_V4",
    "CI_V6",
    "GW_PUBLIC_V4",
    "GW_PUBLIC_V6",
    "GW_V4",
    "GW_V6",
    "HOSTS",
    "PHONE_V4",
    "PHONE_V6",
    "PUBLIC_V4",
    "PUBLIC_V6",
    "NetnsUnavailable",
    "Tailnet",
    "check_output_in",
    "cleanup_stale",
    "connect_in",
    "listen_in",
    "netns_unavailable_reason",
    "open_connection_in",
    "run_in",
    "socket_in",
]

# The tailnet side: Tailscale's CGNAT range and ULA prefix.
GW_V4 = "100.64.0.1"
GW_V6 = "fd7a:115c:a1e0::1"
PHONE_V4 = "100.101.102.103"
PHONE_V6 = "fd7a:115c:a1e0::6667"
CI_V4 = "100.88.12.34"
CI_V6 = "fd7a:115c:a1e0::c1"
# The "internet" side: 198.18.0.0/15 (RFC 2544) and 2001:db8::/32 (RFC 3849). Not
# 203.0.113.0/24: the package registries are reached through that range here.
GW_PUBLIC_V4 = "198.18.0.1"
GW_PUBLIC_V6 = "2001:db8::1"
PUBLIC_V4 = "198.18.0.7"
PUBLIC_V6 = "2001:db8::7"

TAILNET_V4 = "100.64.0.0/10"
TAILNET_V6 = "fd7a:115c:a1e0::/48"

HOSTS: tuple[str, ...] = ("gw", "phone", "ci", "public")
_BRIDGE_NS = "br"

# role -> addresses given to its veth (CIDR form), in the order they are added.
_ADDRESSES: dict[str, tuple[str, ...]] = {
    "gw": (f"{GW_V4}/10", f"{GW_PUBLIC_V4}/24", f"{GW_V6}/48", f"{GW_PUBLIC_V6}/64"),
    "phone": (f"{PHONE_V4}/10", f"{PHONE_V6}/48"),
    "ci": (f"{CI_V4}/10", f"{CI_V6}/48"),
    "public": (f"{PUBLIC_V4}/24", f"{PUBLIC_V6}/64"),
}

# Namespace names carry the creator's full PID (so cleanup_stale can tell a dead owner) and a
# per-process counter (so one process may hold several tailnets): cg<pid>x<n>-<role>.
_NS_RE = re.compile(r"^cg(?P<pid>\d+)x(?P<n>\d+)-(?P<role>[a-z]+)$")
_NETNS_DIR = "/var/run/netns"
_CLONE_NEWNET = 0x40000000
_counter = itertools.count()

_T = TypeVar("_T")


class NetnsUnavailable(RuntimeError):
    """Raised when network namespaces cannot be used here (not root, no `ip netns`)."""


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be used on this machine, or None if they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 `ip` not found"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=5)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` unavailable: {exc}"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and proc.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def add_bridge(ns: str, name: str) -> None:
    """Create bridge ``name`` in namespace ``ns`` and bring it up.

    STP and snooping off: the bridge must forward, and flood ND/ARP, from the first
    packet, with no querier.
    """
    _ip(
        "-n",
        ns,
        "link",
        "add",
        name,
        "type",
        "bridge",
        "stp_state",
        "0",
        "forward_delay",
        "0",
        "mcast_snooping",
        "0",
    )
    _ip("-n", ns, "link", "set", name, "up")


def _list_netns() -> list[str]:
    # `ip netns list` prints "name (id: N)" for namespaces with an id; keep the name only.
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete leftover namespaces of ours whose creating process is dead; return their names."""
    removed = []
    for name in _list_netns():
        m = _NS_RE.match(name)
        if m is None or _pid_alive(int(m["pid"])):
            continue
        if _ip("netns", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed


# --- setns on a dedicated thread ---------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _in_netns(ns_name: str, fn: Callable[[], _T]) -> _T:
    """Run fn on a fresh thread that has joined ns_name, and return its result.

    setns(CLONE_NEWNET) moves only the calling thread, so a throwaway thread confines the switch:
    the thread ends right after, and no pooled thread is ever left in a foreign namespace.
    """
    result: list[_T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(os.path.join(_NETNS_DIR, ns_name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            error.append(NetnsUnavailable(f"no network namespace {ns_name!r}"))
            return
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                error.append(OSError(err, f"setns({ns_name}): {os.strerror(err)}"))
                return
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread, re-raised there
            error.append(exc)

    thread = threading.Thread(target=target, name=f"setns-{ns_name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def socket_in(
    ns_name: str,
    family: socket.AddressFamily = socket.AF_INET,
    type: socket.SocketKind = socket.SOCK_STREAM,
    proto: int = 0,
) -> socket.socket:
    """A socket created inside network namespace ns_name; it stays there for life."""
    return _in_netns(ns_name, lambda: socket.socket(family, type, proto))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listen_in(ns_name: str, host: str, port: int = 0, backlog: int = 128) -> socket.socket:
    """A bound, listening, non-blocking TCP socket in ns_name (for loop.create_server(sock=))."""
    sock = socket_in(ns_name, _family(host))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if host == "::":
            # Dual stack on purpose: v4 peers then show up as ::ffff:a.b.c.d, as in production.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def connect_in(
    ns_name: str, host: str, port: int, *, timeout: float = 5.0, source: str | None = None
) -> socket.socket:
    """A connected, non-blocking TCP socket from ns_name (for websockets.connect(sock=) etc)."""
    sock = socket_in(ns_name, _family(host))
    try:
        sock.setblocking(False)
        if source is not None:
            sock.bind((source, 0))
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_connection_in(
    ns_name: str, host: str, port: int, **kwargs: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio.open_connection, but from inside ns_name."""
    sock = await connect_in(ns_name, host, port)
    try:
        return await asyncio.open_connection(sock=sock, **kwargs)
    except BaseException:
        sock.close()
        raise


def run_in(ns_name: str, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen[Any]:
    """Start argv inside ns_name (through `ip netns exec`)."""
    return subprocess.Popen(["ip", "netns", "exec", ns_name, *argv], **popen_kw)


def check_output_in(ns_name: str, argv: Sequence[str], **kw: Any) -> Any:
    """subprocess.check_output of argv inside ns_name."""
    kw.setdefault("timeout", 30)
    return subprocess.check_output(["ip", "netns", "exec", ns_name, *argv], **kw)


def _write_sysctls(ns_name: str, values: dict[str, str]) -> None:
    # /proc/sys/net follows the opening thread's namespace, so no `ip netns exec` process is needed.
    def write() -> None:
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)

    _in_netns(ns_name, write)


# --- the tailnet --------------------------------------------------------------------------------


class Tailnet:
    """Four hosts on one bridge: the proxy host `gw`, a `phone`, a tagged `ci` server, `public`.

    Use as a context manager (or call close()); an atexit hook removes it too if the test
    process ends without closing it. A SIGKILLed owner leaves namespaces for cleanup_stale().
    """

    def __init__(self, tag: str) -> None:
        self.tag = tag
        # Interface names live only inside our namespaces; the short PID prefix keeps them
        # recognisable and within IFNAMSIZ (15): cg<pid%100000><role>[b].
        self._ifprefix = f"cg{os.getpid() % 100000}"
        self._names = {role: f"{tag}-{role}" for role in (*HOSTS, _BRIDGE_NS)}
        self._created: list[str] = []
        self._closed = False

    # names ------------------------------------------------------------------------------------
    def ns(self, name: str) -> str:
        """The real namespace name of host `name` (gw, phone, ci, public, or br for the bridge)."""
        try:
            return self._names[name]
        except KeyError:
            raise KeyError(f"no host {name!r} in the tailnet; have {sorted(self._names)}") from None

    @property
    def namespaces(self) -> list[str]:
        return list(self._names.values())

    def ifname(self, role: str) -> str:
        """The name of role's veth end inside its own namespace."""
        return f"{self._ifprefix}{role}"

    # lifecycle ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, *, ready_timeout: float = 10.0) -> Tailnet:
        reason = netns_unavailable_reason()
        if reason is not None:
            raise NetnsUnavailable(reason)
        tn = cls(f"cg{os.getpid()}x{next(_counter)}")
        atexit.register(tn.close)
        try:
            tn._build()
            tn._wait_ready(ready_timeout)
        except BaseException:
            tn.close()
            raise
        return tn

    def __enter__(self) -> Tailnet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Delete every namespace this tailnet made; veths and the bridge go with them."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for name in reversed(self._created):
            _ip("netns", "del", name, check=False)
        self._created.clear()

    def _build(self) -> None:
        for role, name in self._names.items():
            _ip("netns", "add", name)
            self._created.append(name)
            sysctls = {
                # DAD would keep fresh v6 addresses "tentative" (unusable) for about a second.
                "net.ipv6.conf.all.accept_dad": "0",
                "net.ipv6.conf.default.accept_dad": "0",
            }
            if role == _BRIDGE_NS:
                # The bridge host has no addresses; no v6 keeps it from chattering RS/MLD.
                sysctls["net.ipv6.conf.default.disable_ipv6"] = "1"
            _write_sysctls(name, sysctls)
            _ip("-n", name, "link", "set", "lo", "up")

        br_ns = self._names[_BRIDGE_NS]
        bridge = f"{self._ifprefix}br"
        add_bridge(br_ns, bridge)
        for role in HOSTS:
            host_ns = self._names[role]
            host_if = self.ifname(role)
            br_if = f"{host_if}b"
            # Both ends are born inside their namespaces: nothing appears in the root namespace.
            _ip(
                "link",
                "add",
                host_if,
                "netns",
                host_ns,
                "type",
                "veth",
                "peer",
                "name",
                br_if,
                "netns",
                br_ns,
            )
            _ip("-n", br_ns, "link", "set", br_if, "master", bridge)
            _ip("-n", br_ns, "link", "set", br_if, "up")
            for cidr in _ADDRESSES[role]:
                extra = ("nodad",) if ":" in cidr else ()
                _ip("-n", host_ns, "addr", "add", cidr, "dev", host_if, *extra)
            _ip("-n", host_ns, "link", "set", host_if, "up")
        pub = self._names["public"]
        pub_if = self.ifname("public")
        # The public host reaches the proxy's tailnet addresses only through gw's public address,
        # like a packet from the internet that was routed to this machine.
        _ip("-n", pub, "route", "add", TAILNET_V4, "via", GW_PUBLIC_V4, "dev", pub_if)
        _ip("-n", pub, "route", "add", TAILNET_V6, "via", GW_PUBLIC_V6, "dev", pub_if)

    def _wait_ready(self, timeout: float) -> None:
        """Block until every host reaches gw over v4 and v6.

        Links come up asynchronously and the first packet waits on ARP/ND; a TCP handshake from
        each host proves the path and leaves warm neighbour caches, so tests see no 1 s SYN retry.
        """
        deadline = time.monotonic() + timeout
        self._wait_links_up(deadline)
        gw = self._names["gw"]
        listeners = [listen_in(gw, "0.0.0.0"), listen_in(gw, "::")]
        for lst in listeners:
            lst.setblocking(True)
            lst.settimeout(1.0)
        try:
            probes = [
                ("phone", GW_V4, 0),
                ("phone", GW_V6, 1),
                ("ci", GW_V4, 0),
                ("ci", GW_V6, 1),
                ("public", GW_V4, 0),
                ("public", GW_V6, 1),
            ]
            for role, dst, which in probes:
                port = listeners[which].getsockname()[1]
                self._probe(role, dst, port, listeners[which], deadline)
        finally:
            for lst in listeners:
                lst.close()

    def _wait_links_up(self, deadline: float) -> None:
        checks = [(self._names[r], self.ifname(r)) for r in HOSTS]
        checks += [(self._names[_BRIDGE_NS], f"{self.ifname(r)}b") for r in HOSTS]
        for ns_name, ifname in checks:
            while True:
                out = _ip("-n", ns_name, "-j", "link", "show", "dev", ifname).stdout
                if json.loads(out)[0].get("operstate") == "UP":
                    break
                if time.monotonic() > deadline:
                    raise NetnsUnavailable(f"{ifname} in {ns_name} never came up")
                time.sleep(0.01)

    def _probe(
        self, role: str, dst: str, port: int, listener: socket.socket, deadline: float
    ) -> None:
        while True:
            sock = socket_in(self._names[role], _family(dst))
            try:
                # Short connect timeout, retried: cheaper than waiting out the kernel's 1 s SYN RTO.
                sock.settimeout(0.2)
                sock.connect((dst, port))
                conn, _ = listener.accept()
                conn.close()
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise NetnsUnavailable(f"{role} cannot reach {dst}: {exc}") from exc
                time.sleep(0.01)
            finally:
                sock.close()

    def __repr__(self) -> str:
        return f"Tailnet({self.tag!r}, closed={self._closed})"
