"""clawgate load benchmark: clawgate vs direct vs nginx vs HAProxy vs a raw uvloop splice.

Run it with `benchmarks/run.sh` (installs nginx/haproxy, builds the C programs, runs the
correctness check, then this). Directly: `python -m benchmarks [--quick] [...]`.

Topology (default `--topology netns`, see netns.py): two network namespaces joined by a veth
pair; every server (echo, nginx, HAProxy, baseline, clawgate) in `cgb<pid>-srv` on
100.64.0.1, pinned to CPU 1; the load client in `cgb<pid>-cli` (100.101.102.103, and
100.102.0.0/16 for the cold test), pinned to CPU 0. A fake tailscaled (tests/fakes) answers
clawgate's whois: 100.101.102.103 is alice, every cold-test address a user of its own.
`--topology loopback` runs everything on 127.0.0.1 instead (no warm identity cache possible).

Layout of one run: per repetition, per target (order rotated each repetition):
    main instance:  conns, rtt1, rtt100, tput100, tput64k       (one proxy process)
    fresh instance: idle (RSS per idle connection, N connections)
    clawgate only:  cold (fresh process, every connection from a new source IP)
                    refused (a config whose allowedNetworks excludes the client)
    baseline only:  refused (--refuse: close at accept; reference for clawgate)
    variants:       clawgate+gate (gateway token in the first frame), *-tls (same cert for
                    clawgate, nginx, HAProxy), clawgate-1w/2w (workers 1/2, both CPUs)
  then (--profile) py-spy and perf stat on clawgate under the conns load.
Every loadgen run is bounded by --duration/--count and its own watchdog, and the harness
kills it (by process group) if it overruns. Servers are started in their own process
groups and stopped by pid at the end, also on Ctrl-C.

Results: benchmarks/out/results-<stamp>.json (+ results-latest.json) and, for a full run,
benchmarks/RESULTS.md (a --quick run writes benchmarks/out/RESULTS-quick.md instead).
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import importlib.metadata
import json
import os
import platform
import queue
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import report
from .netns import Topology

TOPO = Topology("loopback")  # replaced in main() by the --topology choice

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HZ = os.sysconf("SC_CLK_TCK")
CLIENT_CPU = "0"
SERVER_CPU = "1"

# ---------------------------------------------------------------- process bookkeeping

_procs: list[subprocess.Popen[bytes]] = []  # every process we started (own process group each)


def _kill_group(p: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)  # the group we created with start_new_session
    except ProcessLookupError:
        return
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(5)


def cleanup_all() -> None:
    while _procs:
        _kill_group(_procs.pop())


def spawn(
    cmd: list[str],
    *,
    cpu: str | None,
    log: Path | None = None,
    cwd: Path | None = None,
    stdout: Any = None,
    stdin: Any = None,
    stderr: Any = None,
    env: dict[str, Any] | None = None,
    prefix: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    # prefix = `ip netns exec NS`: it execs, so the pid we get is the program's own pid
    full = (prefix or []) + (["taskset", "-c", cpu] if cpu is not None else []) + cmd
    out = stdout if stdout is not None else (open(log, "ab") if log else subprocess.DEVNULL)
    err = stderr if stderr is not None else (open(log, "ab") if log else subprocess.DEVNULL)
    p = subprocess.Popen(
        full,
        stdout=out,
        stderr=err,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        cwd=str(cwd) if cwd else None,
        start_new_session=True,
        env=env,
    )
    _procs.append(p)
    return p


def forget(p: subprocess.Popen[bytes]) -> None:
    if p in _procs:
        _procs.remove(p)


# ---------------------------------------------------------------- /proc helpers


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants (nginx master + workers, ...)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            ppid = int(s[s.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) seconds summed over the processes (all threads), /proc/<pid>/stat."""
    ut = st = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
            fields = s[s.rindex(")") + 2 :].split()
            ut += int(fields[11])  # field 14 of stat
            st += int(fields[12])  # field 15
        except (OSError, ValueError, IndexError):
            pass
    return ut / HZ, st / HZ


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of each process (all its threads), from /proc/<pid>/stat."""
    return sum(cpu_split(pids))


def rss_kib(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def nfds(pids: list[int]) -> int:
    n = 0
    for p in pids:
        try:
            n += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return n


def cpu_stat() -> dict[str, tuple[int, int]]:
    """per-cpu (busy, total) ticks from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                v = [int(x) for x in parts[1:]]
                idle = v[3] + (v[4] if len(v) > 4 else 0)
                out[parts[0]] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def busy_frac(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    r = {}
    for k in b:
        db, dt_ = b[k][0] - a[k][0], b[k][1] - a[k][1]
        r[k] = round(db / dt_, 3) if dt_ > 0 else 0.0
    return r


def free_port() -> int:
    """A free port on the server side (inside the server namespace in netns mode)."""
    return TOPO.free_port()


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    """Until the client side can connect to the server address:port (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            TOPO.probe(port)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {TOPO.server_host}:{port} after {timeout}s")


def read_ready_line(p: subprocess.Popen[bytes], timeout: float = 10.0) -> str:
    stdout = p.stdout
    assert stdout is not None, "spawned without stdout=PIPE"
    q: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=lambda: q.put(stdout.readline()), daemon=True).start()
    try:
        return q.get(timeout=timeout).decode(errors="replace")
    except queue.Empty:
        raise RuntimeError("no READY line") from None


def unix_http_get(sock_path: str, path: str, timeout: float = 5.0) -> Any:
    """GET over a unix socket (fake tailscaled's /fake/stats); returns parsed JSON."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: local-tailscaled.sock\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            n = int(size_line.split(b";")[0], 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2 :]
        body = out
    return json.loads(body)


def find_count(obj: Any, word: str = "whois") -> float | None:
    """First numeric value under a key containing `word` (fake tailscaled stats shape TBD)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if word in str(k).lower() and isinstance(v, (int, float)):
                return float(v)
        for v in obj.values():
            r = find_count(v, word)
            if r is not None:
                return r
    return None


# ---------------------------------------------------------------- targets


class Target:
    name = "?"
    proxied = True
    variants = ("main", "fresh")  # which instance kinds it supports
    tests: tuple[str, ...] = ("conns", "rtt1", "rtt100", "tput100", "tput64k", "idle")
    cpu = SERVER_CPU  # where the server runs (the workers comparison widens it)
    tls = False

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.headers: list[str] = []
        self.lg_extra: list[str] = ["--tls"] if self.tls else []  # extra loadgen options

    def available(self) -> str | None:
        """None if usable, else the reason it is skipped."""
        return None

    def start(self, variant: str) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return proc_tree(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            forget(self.proc)
            self.proc = None

    def version(self) -> str:
        return ""


class Direct(Target):
    name = "direct"
    proxied = False
    tests = ("conns", "rtt1", "rtt100", "tput100", "tput64k")

    def start(self, variant: str) -> None:
        self.port = self.h.echo_port

    def pids(self) -> list[int]:
        return []


class Baseline(Target):
    name = "baseline"
    tests = ("conns", "rtt1", "rtt100", "tput100", "tput64k", "idle", "refused")

    def start(self, variant: str) -> None:
        self.port = free_port()
        cmd = [
            sys.executable,
            str(HERE / "baseline_splice.py"),
            "--listen",
            f"{TOPO.server_host}:{self.port}",
            "--upstream",
            f"127.0.0.1:{self.h.echo_port}",
        ]
        if variant == "refused":
            cmd.append("--refuse")
        self.proc = spawn(
            cmd, cpu=self.cpu, log=self.h.tmp / "baseline.log", prefix=TOPO.srv_prefix()
        )
        wait_port(self.port, self.proc)

    def version(self) -> str:
        return f"uvloop {importlib.metadata.version('uvloop')}"


class Nginx(Target):
    name = "nginx"

    def available(self) -> str | None:
        if not shutil.which("nginx"):
            return "nginx not installed (run benchmarks/run.sh)"
        return self.h.cert_missing() if self.tls else None

    def start(self, variant: str) -> None:
        self.port = free_port()
        d = self.h.tmp / f"nginx-{self.port}"
        for sub in ("logs", "tmp"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.h.tmp, 0o755)
        os.chmod(d, 0o755)
        alog = (
            f"access_log {d}/logs/access.log combined buffer=64k flush=1s;"
            if self.h.args.access_log == "on"
            else "access_log off;"
        )
        ssl = ""
        if self.tls:
            # the same certificate as clawgate and HAProxy; TLS 1.3 is what all three pick
            ssl = (
                f"ssl_certificate {self.h.cert};\n        ssl_certificate_key {self.h.key};\n"
                "        ssl_protocols TLSv1.2 TLSv1.3;"
            )
        conf = f"""
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {self.h.nofile};
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 65536; use epoll; }}  # fds are capped by the rlimit
http {{
    {alog}
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream echo {{ server 127.0.0.1:{self.h.echo_port}; }}
    server {{
        listen {TOPO.server_host}:{self.port} backlog=4096{" ssl" if self.tls else ""};
        {ssl}
        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""
        (d / "nginx.conf").write_text(conf)
        self.proc = spawn(
            ["nginx", "-p", str(d), "-c", str(d / "nginx.conf")],
            cpu=self.cpu,
            log=self.h.tmp / "nginx.log",
            prefix=TOPO.srv_prefix(),
        )
        wait_port(self.port, self.proc)

    def version(self) -> str:
        r = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
        return (r.stderr or r.stdout).strip().replace("nginx version: ", "")


class NginxTls(Nginx):
    name = "nginx-tls"
    tests = ("conns", "tput64k")
    tls = True


class Haproxy(Target):
    name = "haproxy"

    def available(self) -> str | None:
        if not shutil.which("haproxy"):
            return "haproxy not installed (run benchmarks/run.sh)"
        return self.h.cert_missing() if self.tls else None

    def start(self, variant: str) -> None:
        self.port = free_port()
        d = self.h.tmp / f"haproxy-{self.port}"
        d.mkdir(parents=True, exist_ok=True)
        on = self.h.args.access_log == "on"
        ssl = f" ssl crt {self.h.cert_pem_bundle}" if self.tls else ""
        conf = f"""
global
    maxconn {self.h.maxconn}
    nbthread 1
    {"log stdout format raw local0" if on else ""}
defaults
    mode http
    {"log global" if on else ""}
    {"option httplog" if on else ""}
    option forwardfor
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    maxconn {self.h.maxconn}
frontend fe
    bind {TOPO.server_host}:{self.port}{ssl}
    default_backend be
backend be
    server echo 127.0.0.1:{self.h.echo_port} maxconn {self.h.maxconn}
"""
        (d / "haproxy.cfg").write_text(conf)
        self.proc = spawn(
            ["haproxy", "-db", "-f", str(d / "haproxy.cfg")],
            cpu=self.cpu,
            log=d / "haproxy.out",
            prefix=TOPO.srv_prefix(),
        )
        wait_port(self.port, self.proc)

    def version(self) -> str:
        r = subprocess.run(["haproxy", "-v"], capture_output=True, text=True)
        return (
            r.stdout.splitlines()[0].replace("HAProxy version ", "").split(" - ")[0]
            if r.stdout
            else ""
        )


class HaproxyTls(Haproxy):
    name = "haproxy-tls"
    tests = ("conns", "tput64k")
    tls = True


class Clawgate(Target):
    """Contract: python -m proxy serve --config CONFIG.json; token via `proxy token new`.

    Every check on: allowedNetworks, a bearer token, whois through the fake tailscaled
    (requireIdentity, netns topology only), the access log to a file, the admin/metrics
    listener."""

    name = "clawgate"
    tests: tuple[str, ...] = (
        "conns",
        "rtt1",
        "rtt100",
        "tput100",
        "tput64k",
        "idle",
        "cold",
        "refused",
    )
    workers = 1

    def __init__(self, h: Harness) -> None:
        super().__init__(h)
        self._why: str | None = None
        self.token: str | None = None
        safe = "".join(ch if ch.isalnum() else "-" for ch in self.name)
        self.tokens_file = h.tmp / f"tokens-{safe}.json"

    def available(self) -> str | None:
        py = sys.executable
        r = subprocess.run(
            [
                py,
                "-c",
                "import proxy, importlib.util as u, sys; "
                "sys.exit(0 if u.find_spec('proxy.__main__') else 3)",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["proxy/__main__.py missing"])[-1]
            return f"`import proxy` / `python -m proxy` not usable yet: {last}"
        r = subprocess.run(
            [py, "-m", "proxy", "token", "new", "bench", "--file", str(self.tokens_file)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        tok = r.stdout.strip().splitlines()[-1].strip() if r.stdout.strip() else ""
        if r.returncode != 0 or not tok:
            return (
                f"`python -m proxy token new` failed (rc={r.returncode}): {r.stderr.strip()[-300:]}"
            )
        self.token = tok
        self.headers = [f"Authorization: Bearer {tok}"]
        return self.h.cert_missing() if self.tls else None

    def config(self, variant: str) -> dict[str, Any]:
        a = self.h.args
        alog = (
            str(self.h.tmp / f"clawgate-access-{self.port}.log") if a.access_log == "on" else "off"
        )
        if TOPO.netns:
            # refused: the client is 100.101.102.103, which 100.88.0.0/16 excludes
            nets = ["100.88.0.0/16"] if variant == "refused" else ["100.64.0.0/10"]
        else:
            nets = ["127.0.0.2/32"] if variant == "refused" else ["127.0.0.0/8"]
        cfg: dict[str, Any] = {
            "gateway": {
                "host": TOPO.server_host,
                "port": self.port,
                "requireToken": True,
                "allowedNetworks": nets,
            },
            "upstream": f"http://127.0.0.1:{self.h.echo_port}",
            "tokens": {"file": str(self.tokens_file)},
            "admin": {"port": free_port()},  # metrics on (served on loopback)
            "log": {"access": alog},
            # the idle test holds ~10,000 connections from one address with one token: lift
            # the per-source / per-identity caps (defaults 512) so they do not answer 429
            "limits": {
                "maxConnections": 60000,
                "perSourceIp": 60000,
                "perIdentity": 60000,
                # 50 handshakes in flight from one address are "unauthenticated" until
                # decided; the default cap would answer 429 to a load client
                "unauthenticatedPerIp": 60000,
            },
        }
        if self.h.ts_socket:
            # whois through the (fake) tailscaled; a long TTL so the cold test measures
            # first lookups only, and the warm tests never expire mid-run
            cfg["tailscale"] = {
                "socket": self.h.ts_socket_cold if variant == "cold" else self.h.ts_socket,
                "requireIdentity": True,
                "cacheTtl": 3600,
            }
        if self.workers != 1:
            cfg["workers"] = self.workers
        if self.tls:
            cfg["tls"] = {"certFile": str(self.h.cert), "keyFile": str(self.h.key)}
        self.extra_config(cfg)
        if a.clawgate_extra:
            deep_merge(cfg, json.loads(a.clawgate_extra))
        return cfg

    def extra_config(self, cfg: dict[str, Any]) -> None:
        """Hook for the variants below."""

    def start(self, variant: str) -> None:
        self.port = free_port()
        safe = "".join(ch if ch.isalnum() else "-" for ch in self.name)
        path = self.h.tmp / f"{safe}-{variant}-{self.port}.json"
        path.write_text(json.dumps(self.config(variant), indent=2))
        self.proc = spawn(
            [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
            cpu=self.cpu,
            log=self.h.tmp / f"{safe}-{variant}.log",
            cwd=ROOT,
            prefix=TOPO.srv_prefix(),
        )
        wait_port(self.port, self.proc, timeout=30)
        if self.workers > 1:
            # every worker must be accepting before we measure (SO_REUSEPORT spreads by hash)
            deadline = time.monotonic() + 30
            while len(self.pids()) < self.workers + 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)

    def version(self) -> str:
        return git_rev()


class ClawgateGate(Clawgate):
    """No clawgate credential: the gateway's token travels in the first frame (proxy/gate.py)."""

    name = "clawgate+gate"
    tests = ("conns",)
    GW_TOKEN = "bench-gateway-token-0123456789abcdef"

    def available(self) -> str | None:
        why = super().available()
        self.headers = []  # no Authorization: the first-frame gate decides
        f = self.h.tmp / "gateway-token"
        f.write_text(self.GW_TOKEN + "\n")
        os.chmod(f, 0o600)
        connect = {
            "type": "req",
            "id": "1",
            "method": "connect",
            "params": {"auth": {"token": self.GW_TOKEN}, "client": {"id": "bench"}},
        }
        self.lg_extra = ["--first-text", json.dumps(connect, separators=(",", ":"))]
        return why

    def extra_config(self, cfg: dict[str, Any]) -> None:
        cfg["gatewayToken"] = {"file": str(self.h.tmp / "gateway-token")}


class ClawgateTls(Clawgate):
    name = "clawgate-tls"
    tests = ("conns", "tput64k")
    tls = True


class ClawgateWorkers1(Clawgate):
    """workers: 1 with both CPUs allowed: the reference for the 2-worker figure."""

    name = "clawgate-1w-2cpu"
    tests = ("conns",)
    cpu = f"{CLIENT_CPU},{SERVER_CPU}"


class ClawgateWorkers2(Clawgate):
    name = "clawgate-2w-2cpu"
    tests = ("conns",)
    cpu = f"{CLIENT_CPU},{SERVER_CPU}"
    workers = 2


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> None:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            deep_merge(a[k], v)
        else:
            a[k] = v


def git_rev() -> str:
    def g(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    rev = g("rev-parse", "--short=12", "HEAD") or "no commit yet"
    dirty = g("status", "--porcelain", "--", "proxy")
    return rev + (" + uncommitted changes in proxy/" if dirty else "")


MAIN_TESTS = ("conns", "rtt1", "rtt100", "tput100", "tput64k")


def _frame_key(frame: str) -> str:
    """'func (path/file.py:123)' -> 'func (file.py)': aggregate a function over its lines."""
    name, sep, loc = frame.rpartition(" (")
    if not sep:
        return frame
    path = loc.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"


def aggregate_pyspy(raw: str, top: int = 40) -> dict[str, Any]:
    """py-spy `-f raw` (collapsed stacks 'f1;f2;...;fn COUNT') -> self and inclusive shares."""
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        c = int(n)
        total += c
        frames = [_frame_key(f) for f in stack.split(";") if f]
        if not frames:
            continue
        self_c[frames[-1]] = self_c.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c

    def topn(d: dict[str, int]) -> list[list[Any]]:
        return [
            [k, v, round(100 * v / total, 1)]
            for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]
        ]

    return {"pyspy_samples": total, "pyspy_self": topn(self_c), "pyspy_inclusive": topn(incl)}


def parse_perf_csv(text: str) -> dict[str, Any]:
    """`perf stat -x ,` lines: value,unit,event,... -> {event: value}."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        f = line.split(",")
        if len(f) < 3 or not f[2]:
            continue
        try:
            out[f[2]] = float(f[0])
        except ValueError:
            out[f[2]] = f[0]  # "<not supported>" / "<not counted>"
    return out


# ---------------------------------------------------------------- the harness


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="clawgate-bench-"))
        self.loadgen = self.out / "loadgen"
        self.echo_bin = self.out / "echo"
        self.echo: subprocess.Popen[bytes] | None = None
        self.echo_port = 0
        self.runs: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []
        self.t_start = time.monotonic()
        self.step = 0
        self.quiet_spent = 0.0
        self.total_steps = 0
        self.tty = sys.stderr.isatty()
        self.deadline = self.t_start + args.max_minutes * 60
        self.out_of_time = False
        self.ts_procs: list[subprocess.Popen[bytes]] = []
        self.ts_socket: str = args.tailscale_socket or ""
        self.ts_socket_cold: str = self.ts_socket
        self.cert = self.tmp / "bench-cert.pem"
        self.key = self.tmp / "bench-key.pem"
        self.cert_pem_bundle = self.tmp / "bench-haproxy.pem"  # HAProxy: cert + key in one file
        self._cert_why: str | None = None
        self._cert_done = False
        self.profile: dict[str, Any] | None = None
        # one proxied connection = 2 fds in the proxy; RLIMIT_NOFILE caps the idle test
        self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        # clawgate answers 503 beyond (soft - 48 - soft/32) / 2 connections (its fd guard,
        # proxy/runtime.py); stay under it so every proxy gets the same count, error-free
        self.maxconn = max(100, (self.nofile - 64 - self.nofile // 32) // 2)
        if args.idle_conns > self.maxconn:
            self.notes.append(
                f"RLIMIT_NOFILE is {self.nofile} and cannot be raised here (no CAP_SYS_RESOURCE), "
                f"so a proxy can hold at most ~{self.maxconn} proxied connections: the idle test "
                f"uses {self.maxconn} connections instead of {args.idle_conns}"
            )
            args.idle_conns = self.maxconn

    # -- the TLS certificate (one self-signed ECDSA P-256 certificate for every TLS target)
    def cert_missing(self) -> str | None:
        if self._cert_done:
            return self._cert_why
        self._cert_done = True
        if not shutil.which("openssl"):
            self._cert_why = "openssl not installed (run benchmarks/run.sh)"
            return self._cert_why
        r = subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-days", "2", "-subj", "/CN=clawgate-bench",
                "-addext", f"subjectAltName=IP:{TOPO.server_host}",
                "-keyout", str(self.key), "-out", str(self.cert),
            ],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if r.returncode != 0:
            self._cert_why = f"openssl req failed: {r.stderr.strip()[-200:]}"
            return self._cert_why
        os.chmod(self.key, 0o600)
        self.cert_pem_bundle.write_bytes(self.cert.read_bytes() + self.key.read_bytes())
        os.chmod(self.cert_pem_bundle, 0o600)
        return None

    # -- the fake tailscaleds (identity). Two instances, because clawgate polls status with
    # every peer each 30 s: "small" (alice + one tagged node) serves every warm target, "cold"
    # (alice + one user per cold-test source address) only the cold test, so the cost of a
    # big tailnet's status poll lands where a big tailnet is being measured.
    def start_tailscaled(self) -> None:
        if self.ts_socket or not TOPO.netns or self.args.identity == "off":
            return
        import ipaddress

        base = int(ipaddress.IPv4Address(TOPO.cold_base))
        peers = [
            {
                "kind": "user",
                "ip": str(ipaddress.IPv4Address(base + i)),
                "login": f"cold{i}@example.com",
                "node_name": f"cold-{i}",
            }
            for i in range(self.args.cold_peers)
        ]
        pf = self.tmp / "peers.json"
        pf.write_text(json.dumps(peers))
        self.ts_socket = self._fake_tailscaled("small", None, 2)
        self.ts_socket_cold = self._fake_tailscaled("cold", pf, len(peers) + 2)

    def _fake_tailscaled(self, tag: str, peers_file: Path | None, want: int) -> str:
        sock = str(self.tmp / f"tailscaled-{tag}.sock")
        cmd = [sys.executable, "-m", "tests.fakes.fake_tailscaled", "--socket", sock]
        if peers_file is not None:
            cmd += ["--peers", str(peers_file)]
        # on the client's CPU: it is a Python stand-in for a Go daemon, and its status of N
        # peers would otherwise take CPU 1 from the proxies
        p = spawn(cmd, cpu=CLIENT_CPU, log=self.tmp / f"tailscaled-{tag}.log", cwd=ROOT)
        self.ts_procs.append(p)
        deadline = time.monotonic() + 60
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"fake tailscaled ({tag}) exited with {p.returncode}")
            try:
                st = unix_http_get(sock, "/fake/stats", timeout=2)
                if len(st.get("peers", [])) >= want:
                    return sock
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"fake tailscaled ({tag}) did not come up within 60 s")
            time.sleep(0.2)

    # -- echo backend (one for the whole run; restarted if it dies)
    def ensure_echo(self) -> None:
        if self.echo is not None and self.echo.poll() is None:
            return
        if self.echo is not None:
            self.notes.append("echo backend died and was restarted")
            forget(self.echo)
        p = spawn(
            # netns: 0.0.0.0 of the server namespace = 127.0.0.1 for the proxies and
            # 100.64.0.1 for the direct client; nothing else is reachable from there
            [str(self.echo_bin), "--host", "0.0.0.0" if TOPO.netns else "127.0.0.1", "--port", "0"],
            cpu=SERVER_CPU,
            stdout=subprocess.PIPE,
            log=self.tmp / "echo.log",
            prefix=TOPO.srv_prefix(),
        )
        line = read_ready_line(p)
        if not line.startswith("READY "):
            raise RuntimeError(f"echo did not start: {line!r}")
        self.echo, self.echo_port = p, int(line.split()[1])

    # -- quiet check: other work on the machine skews everything; wait (bounded) for calm
    def wait_quiet(self) -> dict[str, Any]:
        # per measurement at most --quiet-wait, per run at most --quiet-budget in total
        limit = max(0.0, min(self.args.quiet_wait, self.args.quiet_budget - self.quiet_spent))
        t0 = time.monotonic()
        while True:
            a = cpu_stat()
            time.sleep(0.4)
            b = cpu_stat()
            bf = busy_frac(a, b)
            busy = max(bf.get("cpu0", 0), bf.get("cpu1", 0))
            if busy <= self.args.quiet_threshold or time.monotonic() - t0 >= limit:
                self.quiet_spent += max(0.0, time.monotonic() - t0 - 0.4)
                return {
                    "busy_before": bf,
                    "quiet_wait_s": round(time.monotonic() - t0, 2),
                    "quiet": busy <= self.args.quiet_threshold,
                }

    # -- progress
    def progress(self, msg: str, live: bool = False) -> None:
        el = time.monotonic() - self.t_start
        eta = ""
        if self.step and self.total_steps:
            rem = el / self.step * (self.total_steps - self.step)
            eta = f" eta {int(rem // 60):02d}:{int(rem % 60):02d}"
        line = (
            f"[{self.step:3d}/{self.total_steps} {int(el // 60):02d}:{int(el % 60):02d}{eta}] {msg}"
        )
        if live:
            if self.tty:
                sys.stderr.write("\r\033[K" + line[:160])
                sys.stderr.flush()
        else:
            if self.tty:
                sys.stderr.write("\r\033[K")
            print(line, file=sys.stderr, flush=True)

    # -- one loadgen run with CPU accounting
    def loadgen_run(
        self,
        target: Target,
        args: list[str],
        label: str,
        timeout: float | None = None,
        before_start: Any = None,
    ) -> dict[str, Any]:
        cmd = [
            str(self.loadgen),
            *args,
            "--host",
            TOPO.server_host,
            "--port",
            str(target.port),
            "--progress",
            *target.lg_extra,
        ]
        for h in target.headers:
            cmd += ["-H", h]
        quiet = self.wait_quiet()
        if before_start is not None:
            before_start()  # e.g. attach a profiler once the machine is quiet
        pids = target.pids()
        echo_pids = [self.echo.pid] if self.echo else []
        (u0, k0), e0, s0, t0 = cpu_split(pids), cpu_seconds(echo_pids), cpu_stat(), time.monotonic()
        c0 = u0 + k0
        outf = tempfile.TemporaryFile(dir=self.tmp)
        p = spawn(
            cmd, cpu=CLIENT_CPU, stdout=outf, stderr=subprocess.PIPE, prefix=TOPO.cli_prefix()
        )
        err_lines: list[str] = []
        stderr = p.stderr
        assert stderr is not None

        def ticks() -> None:  # loadgen prints "tick t=.. done=.. rate=.." once a second
            for raw in stderr:
                line = raw.decode(errors="replace").strip()
                err_lines.append(line)
                if line.startswith("tick"):
                    self.progress(f"{label}: {line[5:]}", live=True)

        th = threading.Thread(target=ticks, daemon=True)
        th.start()
        try:
            p.wait(timeout=timeout or (2 * self.args.duration + 90))
        except subprocess.TimeoutExpired:
            _kill_group(p)
            forget(p)
            raise RuntimeError(f"loadgen overran its time bound: {shlex.join(cmd)}") from None
        forget(p)
        th.join(2)
        t1 = time.monotonic()
        (u1, k1), e1, s1 = cpu_split(pids), cpu_seconds(echo_pids), cpu_stat()
        c1 = u1 + k1
        outf.seek(0)
        text = outf.read().decode(errors="replace").strip()
        outf.close()
        if p.returncode != 0 or not text:
            raise RuntimeError(
                f"loadgen failed rc={p.returncode}: {shlex.join(cmd)} {err_lines[-3:]}"
            )
        res = json.loads(text.splitlines()[-1])
        wall = t1 - t0
        busy_all = sum(s1[k][0] - s0[k][0] for k in s1 if k in ("cpu0", "cpu1")) / HZ
        ours = (c1 - c0) + (e1 - e0) + res.get("client_cpu_s", 0)
        return {
            "loadgen": res,
            "cmd": shlex.join(cmd),
            "wall_s": round(wall, 3),
            "proxy_cpu_s": round(c1 - c0, 3) if pids else None,
            "proxy_user_s": round(u1 - u0, 3) if pids else None,
            "proxy_sys_s": round(k1 - k0, 3) if pids else None,
            "echo_cpu_s": round(e1 - e0, 3),
            "foreign_cpu_s": round(max(0.0, busy_all - ours), 3),
            "cpu_busy": busy_frac(s0, s1),
            **quiet,
        }

    def record(
        self,
        rep: int,
        target: Target,
        test: str,
        r: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        rec = {"rep": rep, "target": target.name, "test": test, **r, **(extra or {})}
        self.runs.append(rec)
        lg = r.get("loadgen", {})
        summ = summarize_line(test, rec)
        errs = lg.get("errors_total", 0)
        warn = f"  !! {errs} errors ({lg.get('first_error', '')})" if errs else ""
        self.progress(f"rep {rep} {target.name:9s} {test:8s} {summ}{warn}")
        return rec

    # -- tests
    def run_main_tests(self, rep: int, t: Target) -> None:
        a = self.args
        d, w = str(a.duration), str(a.warmup)
        specs = {
            "conns": ["conns", "--conc", "50", "--size", "100"],
            "rtt1": ["rtt", "--conc", "1", "--size", "100"],
            "rtt100": ["rtt", "--conc", "100", "--size", "100"],
            "tput100": [
                "throughput",
                "--conc",
                str(a.tput_conns),
                "--window",
                str(a.window),
                "--size",
                "100",
            ],
            "tput64k": [
                "throughput",
                "--conc",
                str(a.tput_conns),
                "--window",
                str(a.window_64k),
                "--size",
                "65536",
            ],
        }
        for test in ("conns", "rtt1", "rtt100", "tput100", "tput64k"):
            if test not in t.tests or test not in a.tests:
                continue
            if self.over_time():
                return
            self.ensure_echo()
            if not t.alive():
                raise RuntimeError(f"{t.name} died (see logs in {self.tmp})")
            self.progress(f"rep {rep} {t.name:9s} {test:8s} running {d}s ...", live=True)
            r = self.loadgen_run(
                t, specs[test] + ["--duration", d, "--warmup", w], f"rep {rep} {t.name} {test}"
            )
            self.step += 1
            self.record(rep, t, test, r)

    def run_idle(self, rep: int, t: Target) -> None:
        a = self.args
        self.ensure_echo()
        t.start("fresh")
        try:
            # warm the process (lazy imports, first-connection allocations) before the baseline
            self.loadgen_run(
                t,
                ["conns", "--conc", "10", "--count", "200", "--duration", "10", "--warmup", "0"],
                "idle-warm",
            )
            time.sleep(0.5)
            pids = t.pids()
            rss0, fds0 = rss_kib(pids), nfds(pids)
            cmd = [
                str(self.loadgen),
                "idle",
                "--count",
                str(a.idle_conns),
                "--conc",
                "64",
                "--duration",
                str(a.idle_setup),
                "--hold",
                str(a.idle_setup + 30),
                "--timeout",
                "10",
                "--host",
                TOPO.server_host,
                "--port",
                str(t.port),
                *t.lg_extra,
            ]
            for h in t.headers:
                cmd += ["-H", h]
            self.progress(
                f"rep {rep} {t.name:9s} idle     opening {a.idle_conns} connections ...", live=True
            )
            c0 = cpu_seconds(pids)
            p = spawn(
                cmd,
                cpu=CLIENT_CPU,
                stdout=subprocess.PIPE,
                stdin=subprocess.PIPE,
                prefix=TOPO.cli_prefix(),
            )
            assert p.stdin is not None
            try:
                ready = read_ready_line(p, timeout=a.idle_setup + 30)
                if not ready.startswith("READY"):
                    raise RuntimeError(f"idle loadgen: {ready!r}")
                time.sleep(1.0)
                pids = t.pids()
                samples = []
                for _ in range(3):
                    samples.append(rss_kib(pids))
                    time.sleep(0.2)
                rss1, fds1 = max(samples), nfds(pids)
                c1 = cpu_seconds(pids)
                p.stdin.write(b"release\n")
                p.stdin.flush()
                out, _ = p.communicate(timeout=60)
            except (subprocess.TimeoutExpired, RuntimeError):
                _kill_group(p)
                raise
            finally:
                forget(p)
            res = json.loads(out.decode().strip().splitlines()[-1])
            kv = dict(x.split("=") for x in ready.split()[1:])
            up = int(kv.get("up", 0))
            r = {
                "loadgen": res,
                "cmd": shlex.join(cmd),
                "ready_line": ready.strip(),
                "rss0_kib": rss0,
                "rss1_kib": rss1,
                "fds0": fds0,
                "fds1": fds1,
                "up": up,
                "rss_kib_per_conn": round((rss1 - rss0) / up, 3) if up else None,
                "proxy_cpu_s": round(c1 - c0, 3),
            }
            self.step += 1
            self.record(rep, t, "idle", r)
        finally:
            t.stop()

    def run_cold(self, rep: int, t: Clawgate) -> None:
        a = self.args
        self.ensure_echo()
        t.start("cold")
        try:
            stats0 = self.fake_stats()
            n = a.cold_peers
            r = self.loadgen_run(
                t,
                [
                    "conns",
                    "--conc",
                    "50",
                    "--size",
                    "100",
                    "--src-base",
                    TOPO.cold_base,
                    "--src-count",
                    str(n),
                    "--count",
                    str(n),  # each connection from an address never seen by this process
                    "--duration",
                    str(a.duration),
                    "--warmup",
                    str(a.warmup),
                ],
                "cold",
            )
            stats1 = self.fake_stats()
            lg = r["loadgen"]
            peers = min(n, lg.get("started", lg.get("ok_total", 0) + lg.get("errors_total", 0)))
            extra: dict[str, Any] = {"new_peers": peers}
            if stats0 is not None and stats1 is not None:
                w0 = stats0.get("whois_calls", {})
                w1 = stats1.get("whois_calls", {})
                delta = {ip: c - w0.get(ip, 0) for ip, c in w1.items() if c - w0.get(ip, 0) > 0}
                calls = sum(delta.values())
                extra["whois_calls"] = calls
                extra["whois_distinct_ips"] = len(delta)
                extra["whois_max_per_ip"] = max(delta.values(), default=0)
                if peers:
                    extra["whois_per_new_peer"] = round(calls / peers, 4)
            self.step += 1
            self.record(rep, t, "cold", r, extra)
        finally:
            t.stop()

    def run_refused(self, rep: int, t: Target) -> None:
        a = self.args
        self.ensure_echo()
        t.start("refused")
        try:
            r = self.loadgen_run(
                t,
                [
                    "refused",
                    "--conc",
                    "50",
                    "--duration",
                    str(a.duration),
                    "--warmup",
                    str(a.warmup),
                    "--timeout",
                    "5",
                ],
                "refused",
            )
            self.step += 1
            self.record(rep, t, "refused", r)
        finally:
            t.stop()

    def fake_stats(self) -> Any:
        """HOOK (identity): the fake tailscaled's counters, from GET /fake/stats on its socket."""
        sock = self.ts_socket_cold
        if not sock:
            return None
        try:
            return unix_http_get(sock, "/fake/stats")
        except (OSError, ValueError) as e:
            self.notes.append(f"/fake/stats unavailable: {e}")
            return None

    # -- the whole run
    def over_time(self) -> bool:
        """True once the run's time bound (--max-minutes) is spent: the rest is skipped."""
        if not self.out_of_time and time.monotonic() > self.deadline:
            self.out_of_time = True
            msg = (
                f"time bound of {self.args.max_minutes} min reached after {self.step} "
                f"measurements: the remaining ones were skipped"
            )
            self.notes.append(msg)
            print(f"WARN {msg}", file=sys.stderr, flush=True)
        return self.out_of_time

    def run(self) -> dict[str, Any]:
        a = self.args
        started = dt.datetime.now(dt.UTC)
        all_targets: list[Target] = [
            Direct(self),
            Baseline(self),
            Nginx(self),
            Haproxy(self),
            Clawgate(self),
            ClawgateGate(self),
            NginxTls(self),
            HaproxyTls(self),
            ClawgateTls(self),
            ClawgateWorkers1(self),
            ClawgateWorkers2(self),
        ]
        self.start_tailscaled()
        if not self.ts_socket:
            self.notes.append(
                "no tailscaled: clawgate ran without the identity check "
                "(loopback topology, or --identity off)"
            )
        targets = []
        for t in all_targets:
            if t.name not in a.targets:
                continue
            why = t.available()
            if why:
                self.skipped[t.name] = why
                print(f"SKIP {t.name}: {why}", file=sys.stderr, flush=True)
            else:
                targets.append(t)
        self.total_steps = a.reps * sum(len([x for x in t.tests if x in a.tests]) for t in targets)
        self.ensure_echo()
        print(
            f"bench: {len(targets)} targets x {a.reps} repetitions, "
            f"{self.total_steps} measurements, "
            f"{a.duration}s each, at most {a.max_minutes} min; topology {TOPO.kind}; "
            f"client on CPU {CLIENT_CPU}, servers on CPU {SERVER_CPU}; tmp {self.tmp}",
            file=sys.stderr,
            flush=True,
        )
        for rep in range(1, a.reps + 1):
            k = (rep - 1) % max(1, len(targets))
            order = targets[k:] + targets[:k]  # rotate so no target always runs first
            for t in order:
                if self.over_time():
                    break
                try:
                    if any(x in t.tests and x in a.tests for x in MAIN_TESTS):
                        t.start("main")
                        try:
                            self.run_main_tests(rep, t)
                        finally:
                            t.stop()
                    if "idle" in t.tests and "idle" in a.tests and not self.over_time():
                        self.run_idle(rep, t)
                    if "cold" in t.tests and "cold" in a.tests and not self.over_time():
                        self.run_cold(rep, t)  # type: ignore[arg-type]
                    if "refused" in t.tests and "refused" in a.tests and not self.over_time():
                        self.run_refused(rep, t)
                except RuntimeError as e:
                    msg = f"rep {rep} {t.name}: {e}"
                    self.notes.append(msg)
                    print(f"ERROR {msg}", file=sys.stderr, flush=True)
                    t.stop()
        claw = next((t for t in targets if t.name == "clawgate"), None)
        if a.profile and claw is not None and not self.over_time():
            try:
                self.profile = self.run_profile(claw)
            except RuntimeError as e:
                self.notes.append(f"profile: {e}")
                claw.stop()
        meta = self.meta(started, targets)
        out = {"meta": meta, "runs": self.runs}
        if self.profile:
            out["profile"] = self.profile
        return out

    # -- where clawgate's time goes under the conns load: py-spy, then perf stat
    def run_profile(self, t: Target) -> dict[str, Any]:
        a = self.args
        secs = max(3.0, a.profile_seconds)
        res: dict[str, Any] = {"seconds": secs, "test": "conns (50 concurrent)"}
        pyspy = ROOT / ".venv" / "bin" / "py-spy"
        if not pyspy.exists():
            pyspy = Path(shutil.which("py-spy") or "")
        t.start("main")
        try:
            lg_args = ["conns", "--conc", "50", "--size", "100", "--warmup", "0"]
            pids = t.pids()
            if pyspy.is_file():
                raw = self.tmp / "pyspy.raw"
                self.progress(f"profile: py-spy on clawgate pid {pids[0]} for {secs:.0f}s", True)
                holder: list[subprocess.Popen[bytes]] = []

                def attach_pyspy() -> None:
                    holder.append(
                        spawn(
                            [
                                str(pyspy),
                                "record",
                                "-p",
                                str(pids[0]),
                                "-d",
                                str(int(secs)),
                                "-r",
                                "250",
                                "-f",
                                "raw",
                                "--nonblocking",
                                "-o",
                                str(raw),
                            ],
                            cpu=CLIENT_CPU,
                            log=self.tmp / "pyspy.log",
                        )  # fmt: skip
                    )
                    time.sleep(0.5)  # attached before the load starts

                r = self.loadgen_run(
                    t,
                    [*lg_args, "--duration", str(secs + 1)],
                    "profile py-spy",
                    before_start=attach_pyspy,
                )
                for sp in holder:
                    try:
                        sp.wait(timeout=secs + 30)
                    except subprocess.TimeoutExpired:
                        _kill_group(sp)
                    forget(sp)
                res["pyspy_conns_per_s"] = r["loadgen"].get("rate")
                res["pyspy_proxy_user_s"] = r.get("proxy_user_s")
                res["pyspy_proxy_sys_s"] = r.get("proxy_sys_s")
                if raw.exists():
                    res.update(aggregate_pyspy(raw.read_text(errors="replace")))
                res["pyspy_log"] = (self.tmp / "pyspy.log").read_text(errors="replace")[-300:]
            else:
                res["pyspy_error"] = "py-spy not found (.venv/bin/py-spy)"
            if shutil.which("perf"):
                self.progress(f"profile: perf stat on clawgate for {secs:.0f}s", True)
                pholder: list[subprocess.Popen[bytes]] = []

                def attach_perf() -> None:
                    pholder.append(
                        spawn(
                            [
                                "perf",
                                "stat",
                                "-x",
                                ",",
                                "-e",
                                "task-clock,context-switches,cpu-migrations,page-faults,"
                                "cycles,instructions",
                                "-p",
                                ",".join(str(p) for p in pids),
                                "--",
                                "sleep",
                                str(secs),
                            ],
                            cpu=CLIENT_CPU,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE,
                        )  # fmt: skip
                    )

                r = self.loadgen_run(
                    t,
                    [*lg_args, "--duration", str(secs + 0.5)],
                    "profile perf",
                    before_start=attach_perf,
                )
                err = b""
                for pf in pholder:
                    try:
                        _, err = pf.communicate(timeout=secs + 30)
                    except subprocess.TimeoutExpired:
                        _kill_group(pf)
                    forget(pf)
                res["perf_conns_per_s"] = r["loadgen"].get("rate")
                res["perf_ok_total"] = r["loadgen"].get("ok_total")
                res["perf"] = parse_perf_csv(err.decode(errors="replace"))
        finally:
            t.stop()
        return res

    def meta(self, started: dt.datetime, targets: list[Target]) -> dict[str, Any]:
        a = self.args
        cpu_model = ""
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
        mem_kib = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_kib = int(line.split()[1])

        def sysctl(name: str) -> str:
            try:
                return " ".join(Path("/proc/sys/" + name.replace(".", "/")).read_text().split())
            except OSError:
                return "?"

        versions = {
            "python": platform.python_version(),
            "uvloop": importlib.metadata.version("uvloop"),
            "gcc": subprocess.run(
                ["gcc", "-dumpfullversion"], capture_output=True, text=True
            ).stdout.strip(),
            "clawgate": git_rev(),
        }
        for t in targets:
            if t.name in ("nginx", "haproxy"):
                versions[t.name] = t.version()
        ossl = subprocess.run(["openssl", "version"], capture_output=True, text=True)
        versions["openssl"] = ossl.stdout.strip()
        for name in ("websockets", "httptools", "aiohttp"):
            try:
                versions[name] = __import__(name).__version__
            except Exception:  # noqa: BLE001
                pass
        return {
            "date": started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "duration_total_s": round(time.monotonic() - self.t_start, 1),
            "command": a.command or ("benchmarks/run.sh " + shlex.join(sys.argv[1:])).strip(),
            "quick": a.quick,
            "machine": {
                "cpu": cpu_model,
                "cores": os.cpu_count(),
                "kernel": platform.release(),
                "mem_gib": round(mem_kib / 1048576, 1),
                "loadavg_at_start": a.loadavg_at_start,
                "busy_at_start": a.busy_at_start,
            },
            "sysctl": {
                k: sysctl(k)
                for k in (
                    "net.core.somaxconn",
                    "net.ipv4.tcp_tw_reuse",
                    "net.ipv4.ip_local_port_range",
                    "net.ipv4.tcp_max_syn_backlog",
                )
            },
            "sysctl_netns": TOPO.sysctls() if TOPO.netns and TOPO.up else None,
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
            "versions": versions,
            "params": {
                "reps": a.reps,
                "duration_s": a.duration,
                "warmup_s": a.warmup,
                "conns_concurrency": 50,
                "msg_size_small": 100,
                "msg_size_large": 65536,
                "tput_connections": a.tput_conns,
                "window_100B": a.window,
                "window_64KiB": a.window_64k,
                "idle_conns": a.idle_conns,
                "cold_peers": a.cold_peers,
                "access_log": a.access_log,
                "pinning": {
                    "client": CLIENT_CPU,
                    "servers": SERVER_CPU,
                    "exception": "clawgate-1w-2cpu / clawgate-2w-2cpu: the proxy may use "
                    f"CPUs {CLIENT_CPU},{SERVER_CPU}; client and echo stay pinned",
                },
                "topology": TOPO.kind,
                "addresses": {
                    "server": TOPO.server_host,
                    "client": TOPO.client_addr,
                    "cold_sources": f"{TOPO.cold_base} + {a.cold_peers}",
                }
                if TOPO.netns
                else {"server": "127.0.0.1"},
                "max_minutes": a.max_minutes,
                "quiet_threshold": a.quiet_threshold,
                "quiet_wait_s": a.quiet_wait,
                "quiet_budget_s": a.quiet_budget,
                "quiet_spent_s": round(self.quiet_spent, 1),
                "tailscale": (
                    "fake tailscaled (tests/fakes/fake_tailscaled.py), requireIdentity, "
                    "cacheTtl 3600 s"
                    if self.ts_socket
                    else None
                ),
                "tls_cert": "self-signed ECDSA P-256, the same file for every *-tls target",
            },
            "targets": [t.name for t in targets],
            "skipped": self.skipped,
            "notes": self.notes,
        }


def summarize_line(test: str, rec: dict[str, Any]) -> str:
    lg = rec.get("loadgen", {})
    cc = lg.get("client_cpu_frac_measure")
    pc = rec.get("proxy_cpu_s")
    wall = rec.get("wall_s") or 0
    extra = f"client cpu {cc * 100:.0f}%" if cc is not None else ""
    if pc is not None and wall:
        extra += f", proxy cpu {pc / wall * 100:.0f}%"
    if rec.get("foreign_cpu_s") and wall:
        extra += f", other {rec['foreign_cpu_s'] / wall * 100:.0f}%"
    if test in ("conns", "cold", "refused"):
        s = f"{lg.get('rate', 0):>10,.0f} conn/s"
        if test == "cold" and "whois_per_new_peer" in rec:
            s += f"  whois/peer {rec['whois_per_new_peer']}"
    elif test.startswith("rtt"):
        s = f"p50 {lg.get('lat_p50_us', 0):>7.1f} us  p99 {lg.get('lat_p99_us', 0):>8.1f} us"
    elif test.startswith("tput"):
        s = f"{lg.get('rate', 0):>10,.0f} msg/s ({lg.get('mbytes_per_s', 0):.0f} MB/s)"
    elif test == "idle":
        return (
            f"{rec.get('up')} up, "
            f"RSS +{(rec.get('rss1_kib', 0) - rec.get('rss0_kib', 0)) / 1024:.1f} MiB"
            f" = {rec.get('rss_kib_per_conn')} KiB/conn, alive {lg.get('alive')}"
        )
    else:
        s = ""
    return f"{s}   ({extra})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 repetition, short runs")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 1)")
    ap.add_argument(
        "--duration", type=float, default=None, help="seconds per measurement (default 6; quick 2)"
    )
    ap.add_argument(
        "--warmup", type=float, default=None, help="seconds excluded at the start (default 1)"
    )
    ap.add_argument(
        "--targets",
        default="direct,baseline,nginx,haproxy,clawgate,clawgate+gate,"
        "nginx-tls,haproxy-tls,clawgate-tls,clawgate-1w-2cpu,clawgate-2w-2cpu",
    )
    ap.add_argument(
        "--topology",
        choices=("netns", "loopback"),
        default="netns",
        help="netns (default): servers and client in two namespaces of their own; "
        "loopback: everything on 127.0.0.1 (no warm identity cache possible)",
    )
    ap.add_argument(
        "--identity",
        choices=("on", "off"),
        default="on",
        help="netns: start the fake tailscaled and require identity (default on)",
    )
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="time bound of the run (29; quick 12)"
    )
    ap.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="py-spy + perf stat of clawgate under the conns load at the end (default on)",
    )
    ap.add_argument("--profile-seconds", type=float, default=None, help="default 8; quick 3")
    ap.add_argument("--tests", default="conns,rtt1,rtt100,tput100,tput64k,idle,cold,refused")
    ap.add_argument(
        "--idle-conns", type=int, default=None, help="idle connections (default 10000; quick 2000)"
    )
    ap.add_argument("--idle-setup", type=float, default=60.0, help="max seconds to open them")
    ap.add_argument(
        "--cold-peers",
        type=int,
        default=6000,
        help="distinct source IPs (and fake tailnet users) for the cold test (default 6000: "
        "the fake tailscaled's status of N peers must stay well under clawgate's 2 s timeout)",
    )
    ap.add_argument("--tput-conns", type=int, default=10)
    ap.add_argument(
        "--window", type=int, default=16, help="messages in flight per connection, 100 B"
    )
    ap.add_argument(
        "--window-64k", type=int, default=16, help="messages in flight per connection, 64 KiB"
    )
    ap.add_argument(
        "--access-log",
        choices=("on", "off"),
        default="on",
        help="access logs for nginx, HAProxy and clawgate (to a file), default on",
    )
    ap.add_argument(
        "--tailscale-socket",
        default=os.environ.get("BENCH_TAILSCALE_SOCKET", ""),
        help="HOOK: fake tailscaled LocalAPI socket (identity checks + /fake/stats)",
    )
    ap.add_argument("--clawgate-extra", default="", help="JSON merged into the clawgate config")
    ap.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.15,
        help="before each measurement wait until both CPUs are below this busy fraction",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="max seconds to wait for quiet before one measurement (default 15; quick 3)",
    )
    ap.add_argument(
        "--quiet-budget",
        type=float,
        default=None,
        help="max seconds of quiet-waiting in the whole run (default 180; quick 20)",
    )
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--keep-tmp", action="store_true", help="keep configs and logs of this run")
    ap.add_argument("--results-md", default=None, help="where to write the markdown report")
    ap.add_argument(
        "--command", default=os.environ.get("BENCH_COMMAND", ""), help=argparse.SUPPRESS
    )
    a = ap.parse_args(argv)
    q = a.quick
    a.reps = a.reps or (1 if q else 3)
    a.duration = a.duration or (2.0 if q else 6.0)
    a.max_minutes = a.max_minutes or (12.0 if q else 29.0)
    a.profile_seconds = a.profile_seconds or (3.0 if q else 8.0)
    a.warmup = a.warmup if a.warmup is not None else (0.5 if q else 1.0)
    a.idle_conns = a.idle_conns or (2000 if q else 10000)
    a.quiet_wait = a.quiet_wait if a.quiet_wait is not None else (3.0 if q else 15.0)
    a.quiet_budget = a.quiet_budget if a.quiet_budget is not None else (20.0 if q else 180.0)
    a.targets = [x.strip() for x in a.targets.split(",") if x.strip()]
    a.tests = [x.strip() for x in a.tests.split(",") if x.strip()]
    if a.results_md is None:
        a.results_md = str(Path(a.out) / "RESULTS-quick.md") if q else str(HERE / "RESULTS.md")
    for bound in ("duration", "idle_setup"):
        if not 0 < getattr(a, bound) <= 300:
            ap.error(f"--{bound.replace('_', '-')} must be in (0, 300]")
    a.reps = max(1, min(a.reps, 20))
    a.idle_conns = max(1, min(a.idle_conns, 30000))
    a.cold_peers = max(1, min(a.cold_peers, 65000))  # AnyIP /16 in the client namespace
    a.loadavg_at_start = Path("/proc/loadavg").read_text().split()[:3]
    # who else was using the machine when we started (other engineers' tests, benchmarks)
    ps = subprocess.run(
        ["ps", "-eo", "pcpu,args", "--sort=-pcpu", "--no-headers"],
        capture_output=True,
        text=True,
    )
    a.busy_at_start = [
        " ".join(line.split()[:4])[:90]
        for line in ps.stdout.splitlines()[:8]
        if line.split() and float(line.split()[0]) >= 5.0
    ]
    return a


def raise_nofile(n: int = 262144) -> None:
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    global TOPO
    args = parse_args(argv)
    raise_nofile()
    TOPO = Topology(args.topology)
    h = Harness(args)
    for b in (h.loadgen, h.echo_bin):
        if not b.exists():
            print(f"missing {b}: build with benchmarks/run.sh (gcc -O2)", file=sys.stderr)
            return 2
    atexit.register(TOPO.close)  # runs after cleanup_all (atexit is last-in first-out)
    atexit.register(cleanup_all)

    def on_signal(signum: int, frame: Any) -> None:
        cleanup_all()
        TOPO.close()
        shutil.rmtree(h.tmp, ignore_errors=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        TOPO.create()
        data = h.run()
    finally:
        cleanup_all()
        TOPO.close()
        if args.keep_tmp:
            print(f"kept {h.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(h.tmp, ignore_errors=True)
    # the raw results first: a report bug must never lose a 25-minute run
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    jpath = Path(args.out) / f"results-{stamp}{'-quick' if args.quick else ''}.json"
    jpath.write_text(json.dumps(data, indent=1))
    # a --quick run must not replace the full run that RESULTS.md is generated from
    latest = "results-latest-quick.json" if args.quick else "results-latest.json"
    (Path(args.out) / latest).write_text(json.dumps(data, indent=1))
    report.analyse(data)
    md = report.render(data, json_path=jpath)
    Path(args.results_md).write_text(md)
    print(f"\nresults: {jpath}\nreport:  {args.results_md}\n", file=sys.stderr)
    print(report.console_summary(data))
    return 0
