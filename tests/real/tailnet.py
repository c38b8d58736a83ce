"""A tailnet of REAL tailscaled nodes, each in its own network namespace, under testcontrol.

Underlay: one bridge in its own namespace (``…-br``, 198.18.1.1/24, where the control server
listens) and one veth per node (198.18.1.10 + i). Each node runs the real tailscaled 1.96.4
(scripts/install-tailscale.sh) with kernel TUN (``tailscale0``) inside its namespace, its
own --statedir and --socket, no log uploads, and ``tailscale up --accept-dns=false
--netfilter-mode=off``: nothing outside the namespaces is touched. The tailnet addresses
(100.64.0.N, fd7a:115c:a1e0::N) are assigned by tests/fakes/testcontrol.py.

Namespaces are named like tests/netns.py's (cg<pid>x<n>-<role>), so its cleanup_stale()
removes what a killed test process left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fakes.testcontrol import ControlServer
from tests.netns import _counter, _ip, _write_sysctls, add_bridge  # the project's netns plumbing

ROOT = Path(__file__).resolve().parent.parent.parent
UNDERLAY_PREFIX = "198.18.1."
CONTROL_ADDR = UNDERLAY_PREFIX + "1"


def install_tailscale() -> tuple[str, str]:
    """(tailscale, tailscaled) paths, installed by scripts/install-tailscale.sh if needed."""
    out = subprocess.run(
        [str(ROOT / "scripts" / "install-tailscale.sh")],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    paths = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return paths["TAILSCALE_BIN"], paths["TAILSCALED_BIN"]


@dataclass
class Node:
    """One real tailscaled node."""

    name: str
    ns: str
    underlay: str
    dir: Path
    tailscale_bin: str
    tailscaled_bin: str
    ca_file: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> str:
        return str(self.dir / "sock" / "tailscaled.sock")

    def start(self) -> None:
        """Start tailscaled (again, after stop(): same state dir, same node key)."""
        (self.dir / "sock").mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # left by a SIGKILLed daemon
            os.unlink(self.socket_path)
        log = open(self.dir / "tailscaled.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            self.proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.ns,
                    self.tailscaled_bin,
                    f"--statedir={self.dir / 'state'}",
                    f"--socket={self.socket_path}",
                    "--tun=tailscale0",
                    "--port=41641",
                    "--no-logs-no-support",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={
                    **os.environ,
                    "TS_NO_LOGS_NO_SUPPORT": "true",
                    # Log config here, not in /var/lib/tailscale of the host.
                    "TS_LOGS_DIR": str(self.dir / "logs"),
                    # The control server's HTTPS fallback listener is signed by its own CA.
                    "SSL_CERT_FILE": self.ca_file,
                },
            )
        finally:
            log.close()
        deadline = time.monotonic() + 15
        while not os.path.exists(self.socket_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tailscaled {self.name} did not start:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        try:
            return (self.dir / "tailscaled.log").read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def cli(
        self, *args: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`tailscale --socket=<this node's> ARGS` inside the node's namespace."""
        return subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.ns,
                self.tailscale_bin,
                f"--socket={self.socket_path}",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json").stdout)  # type: ignore[no-any-return]

    def up(self, login_server: str, authkey: str) -> None:
        self.cli(
            "up",
            f"--login-server={login_server}",
            f"--authkey={authkey}",
            f"--hostname={self.name}",
            "--accept-dns=false",
            "--netfilter-mode=off",
            "--timeout=30s",
            timeout=40,
        )

    def watch_engine(self) -> socket.socket:
        """An open IPN bus watch with engine updates (tailscaled polls its engine every 2 s)."""
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(5)
        sock.connect(self.socket_path)
        sock.sendall(
            b"GET /localapi/v0/watch-ipn-bus?mask=1 HTTP/1.1\r\nHost: local-tailscaled.sock\r\n\r\n"
        )
        return sock

    def ips(self) -> list[str]:
        return list(self.status().get("Self", {}).get("TailscaleIPs") or [])


class RealTailnet:
    """The control server plus one real tailscaled per name in `nodes` (name -> auth spec).

    An auth spec is a login name ("alice@example.com") or tags ("tag:ci"). Use as a context
    manager; close() stops every daemon (by PID) and deletes every namespace made here.
    """

    def __init__(self, nodes: dict[str, str]) -> None:
        self.specs = dict(nodes)
        self.tag = f"cg{os.getpid()}x{next(_counter)}"
        self.ifprefix = f"cg{os.getpid() % 100000}"
        self.br_ns = f"{self.tag}-br"
        self.dir = Path(tempfile.mkdtemp(prefix="clawgate-realts-"))
        self.ctl = ControlServer()
        self.nodes: dict[str, Node] = {}
        self._created: list[str] = []
        self._closed = False
        atexit.register(self.close)

    def __enter__(self) -> RealTailnet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ns(self, name: str) -> str:
        """The network namespace of node `name` (as tests.netns.Tailnet.ns)."""
        return self.nodes[name].ns

    def v4(self, name: str) -> str:
        """Node `name`'s tailnet IPv4 address, as assigned by the control server."""
        return str(self.ctl.node(name)["v4"])

    def v6(self, name: str) -> str:
        return str(self.ctl.node(name)["v6"])

    def start(self, hub: str, timeout: float = 60.0) -> RealTailnet:
        """Build, register every node, and bring each one's path to `hub` up."""
        ts, tsd = install_tailscale()
        self._build()
        self.ctl.start(CONTROL_ADDR, 0, netns=self.br_ns)
        keys: dict[str, str] = {}
        for spec in sorted(set(self.specs.values())):
            keys[spec] = (
                self.ctl.create_auth_key(tags=spec.split(","))
                if spec.startswith("tag:")
                else self.ctl.create_auth_key(user=spec)
            )
        for node in self.nodes.values():
            node.tailscale_bin, node.tailscaled_bin = ts, tsd
            node.ca_file = self.ctl.ca_file
            node.start()
        # `tailscale up` for all nodes at once: each waits for its own registration.
        ups = {
            name: subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    n.ns,
                    ts,
                    f"--socket={n.socket_path}",
                    "up",
                    f"--login-server={self.ctl.url}",
                    f"--authkey={keys[self.specs[name]]}",
                    f"--hostname={name}",
                    "--accept-dns=false",
                    "--netfilter-mode=off",
                    f"--timeout={int(timeout)}s",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for name, n in self.nodes.items()
        }
        try:
            # With no DERP map `up` only returns once a peer path is live: make them live.
            self.ctl.wait_nodes(len(self.nodes), timeout)
            self.connect_all(hub, timeout)
            for name, p in ups.items():
                out, _ = p.communicate(timeout=timeout)
                if p.returncode != 0:
                    raise RuntimeError(
                        f"tailscale up on {name} failed: {out.decode()}\n{self.nodes[name].log()}"
                    )
        finally:
            for p in ups.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return self

    def _build(self) -> None:
        _ip("netns", "add", self.br_ns)
        self._created.append(self.br_ns)
        _write_sysctls(
            self.br_ns,
            {"net.ipv6.conf.default.disable_ipv6": "1", "net.ipv6.conf.all.disable_ipv6": "1"},
        )
        _ip("-n", self.br_ns, "link", "set", "lo", "up")
        bridge = f"{self.ifprefix}rb"
        add_bridge(self.br_ns, bridge)
        _ip("-n", self.br_ns, "addr", "add", f"{CONTROL_ADDR}/24", "dev", bridge)
        for i, name in enumerate(self.specs):
            ns = f"{self.tag}-{name}"
            _ip("netns", "add", ns)
            self._created.append(ns)
            _write_sysctls(
                ns, {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"}
            )
            _ip("-n", ns, "link", "set", "lo", "up")
            host_if, br_if = f"{self.ifprefix}r{i}", f"{self.ifprefix}r{i}b"
            _ip(
                "link",
                "add",
                host_if,
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                br_if,
                "netns",
                self.br_ns,
            )
            _ip("-n", self.br_ns, "link", "set", br_if, "master", bridge)
            _ip("-n", self.br_ns, "link", "set", br_if, "up")
            addr = f"{UNDERLAY_PREFIX}{10 + i}"
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", host_if)
            _ip("-n", ns, "link", "set", host_if, "up")
            self.nodes[name] = Node(name, ns, addr, self.dir / name, "", "")

    def connect_all(self, hub: str, timeout: float = 30.0) -> None:
        """Make every node reach `hub` over WireGuard (a TSMP ping to it), then Running.

        With no DERP map a node stays "Starting" until its engine status shows a live peer,
        and tailscaled refreshes that status only every minute unless an IPN bus watcher asks
        for engine updates (mask 1, what the GUIs do): hold one open on each node meanwhile.
        """
        registered = {n["name"] for n in self.ctl.nodes()}
        live = {
            name: n for name, n in self.nodes.items() if name in registered and n.proc is not None
        }
        watchers = [node.watch_engine() for node in live.values()]
        try:
            hub_ip = self.ctl.node(hub)["v4"]
            # All at once: each first ping waits out one WireGuard handshake retry (5 s).
            pings = [
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        node.ns,
                        node.tailscale_bin,
                        f"--socket={node.socket_path}",
                        "ping",
                        "--tsmp",
                        "--c=10",
                        "--timeout=3s",
                        hub_ip,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for name, node in live.items()
                if name != hub
            ]
            try:
                for p in pings:
                    p.wait(timeout)
            finally:
                for p in pings:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            deadline = time.monotonic() + timeout
            for name, node in live.items():
                while node.status().get("BackendState") != "Running":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} not Running: {node.status()}\n{node.log()}")
                    time.sleep(0.2)
        finally:
            for w in watchers:
                w.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for node in self.nodes.values():
            node.stop()
        self.ctl.stop()
        for ns in reversed(self._created):
            _ip("netns", "del", ns, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
