"""The benchmark's two-namespace topology: servers in one network namespace, the client in another.

On loopback every peer is 127.0.0.1, which clawgate (correctly) keys by ip:port, so its
identity cache can never be warm there. This module builds a private two-host network
instead: `cgb<pid>-srv` (100.64.0.1/10, every server) and `cgb<pid>-cli` (100.101.102.103/10,
the load client, plus 100.102.0.0/16 as AnyIP source addresses for the cold-cache test),
joined by one veth pair. It is torn down at exit, on failure and on SIGINT/SIGTERM.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TypeVar

SRV_ADDR = "100.64.0.1"
CLI_ADDR = "100.101.102.103"
COLD_NET = "100.102.0.0/16"  # AnyIP in the client namespace, routed back via CLI_ADDR
COLD_BASE = "100.102.0.1"
PREFIX = "cgb"

_T = TypeVar("_T")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _in_netns(ns: str, fn: Callable[[], _T]) -> _T:
    """Run fn on a throwaway thread moved into `ns` (setns moves only the calling thread)."""
    out: list[_T] = []
    err: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns({ns}): {os.strerror(e)}")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            err.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(30)
    if err:
        raise err[0]
    if not out:
        raise RuntimeError(f"setns thread for {ns} did not finish")
    return out[0]


def cleanup_stale() -> list[str]:
    """Delete cgb<pid>-* namespaces whose creating process is gone (a killed earlier run)."""
    gone = []
    r = _ip("netns", "list", check=False)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX) or "-" not in name:
            continue
        pid_s = name[len(PREFIX) :].split("-", 1)[0]
        if not pid_s.isdigit() or int(pid_s) == os.getpid():
            continue
        if not os.path.exists(f"/proc/{pid_s}"):
            _ip("netns", "del", name, check=False)
            gone.append(name)
    return gone


class Topology:
    """Either the two namespaces (`netns`) or plain loopback (`loopback`, no isolation)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        pid = os.getpid()
        self.srv = f"{PREFIX}{pid}-srv"
        self.cli = f"{PREFIX}{pid}-cli"
        self._veth_s = f"{PREFIX}{pid}s"
        self._veth_c = f"{PREFIX}{pid}c"
        self.up = False
        self._lock = threading.Lock()

    # -- addresses
    @property
    def netns(self) -> bool:
        return self.kind == "netns"

    @property
    def server_host(self) -> str:
        """Where the proxies listen and the client connects."""
        return SRV_ADDR if self.netns else "127.0.0.1"

    @property
    def client_addr(self) -> str:
        return CLI_ADDR if self.netns else "127.0.0.1"

    @property
    def cold_base(self) -> str:
        return COLD_BASE if self.netns else "127.3.0.1"

    def srv_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.srv] if self.netns else []

    def cli_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.cli] if self.netns else []

    # -- life cycle
    def create(self) -> None:
        if not self.netns:
            return
        cleanup_stale()
        self.up = True  # from here on close() must run
        s, c, vs, vc = self.srv, self.cli, self._veth_s, self._veth_c
        _ip("netns", "add", s)
        _ip("netns", "add", c)
        _ip("link", "add", vs, "type", "veth", "peer", "name", vc)
        _ip("link", "set", vs, "netns", s)
        _ip("link", "set", vc, "netns", c)
        _ip("-n", s, "addr", "add", f"{SRV_ADDR}/10", "dev", vs)
        _ip("-n", c, "addr", "add", f"{CLI_ADDR}/10", "dev", vc)
        for ns, dev in ((s, vs), (c, vc)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        # cold test: every address of COLD_NET is local to the client (AnyIP, no 65k
        # `ip addr add`), and the server reaches them through the client's one address, so
        # its neighbour table holds one entry instead of one per source address
        _ip("-n", c, "route", "add", "local", COLD_NET, "dev", "lo")
        _ip("-n", s, "route", "add", COLD_NET, "via", CLI_ADDR, "dev", vs)
        self._sysctl(
            c, {"net/ipv4/ip_local_port_range": "1024 65000", "net/ipv4/tcp_tw_reuse": "1"}
        )
        self._sysctl(
            s,
            {
                "net/core/somaxconn": "4096",
                "net/ipv4/tcp_max_syn_backlog": "4096",
                "net/ipv4/ip_local_port_range": "1024 65000",
                "net/ipv4/tcp_tw_reuse": "1",
            },
        )
        self._wait_link(time.monotonic() + 10)

    def _sysctl(self, ns: str, values: dict[str, str]) -> None:
        def write() -> None:
            for k, v in values.items():
                with open(f"/proc/sys/{k}", "w") as f:
                    f.write(v)

        _in_netns(ns, write)

    def _wait_link(self, deadline: float) -> None:
        """Until the client reaches a listener on the server address (veth up, DAD done)."""
        lsock = self.listen(SRV_ADDR, 0)
        port = lsock.getsockname()[1]
        try:
            while True:
                try:
                    self.probe(port, timeout=0.5)
                    return
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("veth link between the namespaces did not come up")
                    time.sleep(0.05)
        finally:
            lsock.close()

    def sysctls(self) -> dict[str, dict[str, str]]:
        """The TCP settings that matter here, as seen inside each namespace."""
        keys = (
            "net/core/somaxconn",
            "net/ipv4/tcp_tw_reuse",
            "net/ipv4/ip_local_port_range",
            "net/ipv4/tcp_max_syn_backlog",
        )

        def read() -> dict[str, str]:
            out = {}
            for k in keys:
                with open(f"/proc/sys/{k}") as f:
                    out[k.replace("/", ".")] = " ".join(f.read().split())
            return out

        return {"srv": _in_netns(self.srv, read), "cli": _in_netns(self.cli, read)}

    def close(self) -> None:
        with self._lock:
            if not self.up:
                return
            self.up = False
        for ns in (self.cli, self.srv):
            _ip("netns", "del", ns, check=False)

    # -- sockets inside the namespaces
    def listen(self, host: str, port: int) -> socket.socket:
        def mk() -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(16)
            return s

        return _in_netns(self.srv, mk) if self.netns else mk()

    def free_port(self) -> int:
        """A port free on the server side (in its namespace)."""

        def pick() -> int:
            with socket.socket() as s:
                s.bind(("0.0.0.0" if self.netns else "127.0.0.1", 0))
                return int(s.getsockname()[1])

        return _in_netns(self.srv, pick) if self.netns else pick()

    def probe(self, port: int, timeout: float = 0.5, host: str | None = None) -> None:
        """One TCP connect from the client side to the server; raises OSError if refused."""
        h = host or self.server_host

        def go() -> None:
            with socket.create_connection((h, port), timeout=timeout):
                pass

        if self.netns:
            _in_netns(self.cli, go)
        else:
            go()

    def probe_local(self, port: int, timeout: float = 0.5) -> None:
        """A TCP connect to 127.0.0.1:port inside the server namespace (the echo backend)."""

        def go() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout):
                pass

        if self.netns:
            _in_netns(self.srv, go)
        else:
            go()
