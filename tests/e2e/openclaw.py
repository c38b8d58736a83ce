"""The real OpenClaw gateway as a test upstream: install, start isolated, probe, drive, stop.

`OpenClawGateway` runs npm `openclaw` (installed by scripts/install-openclaw.sh) in a private
temp HOME with a config written from parameters, optionally inside a network namespace, and
removes every trace on stop. `openclaw_gateways` is a pytest fixture factory for suites.
Facts behind the choices here are in docs/openclaw-notes.md.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

__all__ = [
    "DEFAULT_TOKEN",
    "GatewayStartError",
    "OpenClawGateway",
    "OpenClawInstall",
    "OpenClawUnavailable",
    "TrustedProxyAuth",
    "install_openclaw",
    "openclaw_gateways",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-openclaw.sh"
DEFAULT_TOKEN = "TEST-TOKEN"
DEFAULT_PORT = 18789
LOOPBACK_TRUSTED_PROXIES = ("127.0.0.1/32", "::1/128")
STOP_GRACE_S = 5.0


class OpenClawUnavailable(RuntimeError):
    """The pinned gateway could not be installed (e.g. the npm registry is unreachable)."""


class GatewayStartError(RuntimeError):
    """The gateway exited or did not become ready in time; the message carries its log tail."""


@dataclass(frozen=True)
class OpenClawInstall:
    launcher: Path  # sh launcher that runs openclaw.mjs under the pinned Node 24
    node: Path

    @property
    def prefix(self) -> Path:
        return self.launcher.parent.parent

    @property
    def compile_cache(self) -> Path:
        # Node's on-disk compile cache, shared by all runs of this install: it cuts a few
        # seconds off every gateway/CLI start after the first one.
        return self.prefix / "node-compile-cache"


@functools.cache
def install_openclaw() -> OpenClawInstall:
    """Run the idempotent installer once per process; raise OpenClawUnavailable on failure."""
    try:
        proc = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OpenClawUnavailable(f"{INSTALL_SCRIPT.name} could not run: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise OpenClawUnavailable(f"{INSTALL_SCRIPT.name} exited {proc.returncode}: {tail}")
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    try:
        return OpenClawInstall(Path(values["OPENCLAW_BIN"]), Path(values["OPENCLAW_NODE"]))
    except KeyError as exc:
        raise OpenClawUnavailable(f"unexpected installer output: {proc.stdout!r}") from exc


@dataclass(frozen=True)
class TrustedProxyAuth:
    """`gateway.auth.mode: "trusted-proxy"` parameters (identity taken from a proxy header)."""

    user_header: str = "x-forwarded-user"
    required_headers: tuple[str, ...] = ("x-forwarded-proto",)
    allow_users: tuple[str, ...] = ()
    allow_loopback: bool = True
    identity_scopes: Mapping[str, Sequence[str]] = field(default_factory=dict)
    # Local fallback credential for callers that bypass the proxy (admin CLI: devices approve).
    password: str | None = "LOCAL-ADMIN-PASSWORD"
    device_auto_approve: bool | None = None

    def to_config(self) -> dict[str, Any]:
        trusted: dict[str, Any] = {
            "userHeader": self.user_header,
            "requiredHeaders": list(self.required_headers),
            "allowUsers": list(self.allow_users),
            "allowLoopback": self.allow_loopback,
        }
        if self.device_auto_approve is not None:
            trusted["deviceAutoApprove"] = {"enabled": self.device_auto_approve}
        auth: dict[str, Any] = {"mode": "trusted-proxy", "trustedProxy": trusted}
        if self.identity_scopes:
            auth["identityScopes"] = {k: list(v) for k, v in self.identity_scopes.items()}
        if self.password is not None:
            auth["password"] = self.password
        return auth


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Merge `extra` into `base`; a dotted key ("gateway.controlUi.allowedOrigins") nests."""
    for raw_key, value in extra.items():
        *parents, leaf = raw_key.split(".")
        node = base
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"extra_config {raw_key!r}: {part!r} is not an object")
            node = child
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            _deep_merge(node[leaf], value)
        else:
            node[leaf] = copy.deepcopy(value)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _netns_prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


# Runs inside `ip netns exec` (the namespace's loopback is unreachable from here).
_PROBE_SCRIPT = """
import sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit(1)
"""


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (loopback http)
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _open_paths() -> set[str]:
    """Every path some process holds open (like fuser), to spare other gateways' lock files."""
    held: set[str] = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    held.add(os.readlink(fd))
        except OSError:
            continue
    return held


def cleanup_state_locks() -> None:
    """Remove /tmp/openclaw-state-locks-<uid> files no live process holds; the dir if empty.

    The gateway creates that dir outside TMPDIR; other gateways of the same uid may be using
    it right now, so only unheld files go.
    """
    locks = Path(tempfile.gettempdir()) / f"openclaw-state-locks-{os.getuid()}"
    if not locks.is_dir():
        return
    held = _open_paths()
    for entry in locks.iterdir():
        if str(entry) not in held:
            with contextlib.suppress(OSError):
                entry.unlink()
    with contextlib.suppress(OSError):
        locks.rmdir()


class OpenClawGateway:
    """One real `openclaw gateway run` in an isolated temp HOME (optionally in a netns).

    auth="token": `gateway.auth = {mode: token, token}`; auth="trusted-proxy": from
    `trusted_proxy` (TrustedProxyAuth). `extra_config` is deep-merged last; dotted keys nest,
    e.g. {"gateway.controlUi.allowedOrigins": ["https://gw.example.ts.net"]}. Unknown keys
    make the real gateway refuse to start (the error is in the raised GatewayStartError).
    """

    def __init__(
        self,
        *,
        auth: Literal["token", "trusted-proxy"] = "token",
        token: str = DEFAULT_TOKEN,
        trusted_proxy: TrustedProxyAuth | None = None,
        trusted_proxies: Sequence[str] = LOOPBACK_TRUSTED_PROXIES,
        extra_config: Mapping[str, Any] | None = None,
        netns: str | None = None,
        port: int | None = None,
        log_level: str | None = None,
        ready_timeout: float = 60.0,
        install: OpenClawInstall | None = None,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.auth_mode = auth
        self.token = token if auth == "token" else None
        self.trusted_proxy = (
            (trusted_proxy or TrustedProxyAuth()) if auth == "trusted-proxy" else None
        )
        self.password = self.trusted_proxy.password if self.trusted_proxy else None
        self.trusted_proxies = list(trusted_proxies)
        self.extra_config = dict(extra_config or {})
        self.netns = netns
        # In a namespace the port is the namespace's own; on the host pick a free one so that
        # parallel suites (and other engineers) do not collide on 18789.
        self.port = port if port is not None else (DEFAULT_PORT if netns else _free_port())
        self.log_level = log_level
        self.ready_timeout = ready_timeout
        self._install = install
        self._base_dir = base_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout: Any = None
        self.root: Path | None = None
        self.startup_seconds: float | None = None

    # -- paths -------------------------------------------------------------------------
    def _require_root(self) -> Path:
        if self.root is None:
            raise RuntimeError("gateway not started")
        return self.root

    @property
    def home(self) -> Path:
        return self._require_root() / "home"

    @property
    def config_path(self) -> Path:
        return self.home / ".openclaw" / "openclaw.json"

    @property
    def log_path(self) -> Path:
        return self._require_root() / "openclaw.log"

    @property
    def stdout_path(self) -> Path:
        return self._require_root() / "gateway.stdout.log"

    @property
    def cli_home(self) -> Path:
        """HOME of the default CLI: a separate "client machine" with its own device key."""
        return self._require_root() / "cli-home"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def install(self) -> OpenClawInstall:
        if self._install is None:
            self._install = install_openclaw()
        return self._install

    # -- config ------------------------------------------------------------------------
    def build_config(self) -> dict[str, Any]:
        auth: dict[str, Any]
        if self.trusted_proxy is not None:
            auth = self.trusted_proxy.to_config()
        else:
            auth = {"mode": "token", "token": self.token}
        logging: dict[str, Any] = {"file": str(self.log_path)}
        if self.log_level:
            logging["level"] = self.log_level
        config: dict[str, Any] = {
            "gateway": {
                "mode": "local",
                "port": self.port,
                "bind": "loopback",
                "auth": auth,
                "trustedProxies": list(self.trusted_proxies),
            },
            "logging": logging,
            "discovery": {"mdns": {"mode": "off"}},
            "update": {"checkOnStart": False},
            "models": {"catalogRefresh": {"enabled": False}},
        }
        _deep_merge(config, self.extra_config)
        return config

    def env(self, home: Path | None = None) -> dict[str, str]:
        """The isolated environment (HOME, OPENCLAW_HOME, TMPDIR, DO_NOT_TRACK) for `home`."""
        home = home or self.home
        keep = ("PATH", "LANG", "LC_ALL", "TERM", "SYSTEMROOT")
        env = {k: v for k, v in os.environ.items() if k in keep}
        env.update(
            HOME=str(home),
            OPENCLAW_HOME=str(home),
            TMPDIR=str(home / "tmp"),
            DO_NOT_TRACK="1",
            NO_COLOR="1",
            NODE_COMPILE_CACHE=str(self.install.compile_cache),
        )
        return env

    def _prepare_home(self, home: Path, config: Mapping[str, Any]) -> None:
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        (home / ".openclaw").mkdir(parents=True, exist_ok=True)
        (home / ".openclaw" / "openclaw.json").write_text(json.dumps(config, indent=2))

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> OpenClawGateway:
        if self._proc is not None:
            raise RuntimeError("gateway already started")
        install = self.install
        self.root = Path(tempfile.mkdtemp(prefix="clawgate-openclaw-", dir=self._base_dir))
        try:
            self._prepare_home(self.home, self.build_config())
            # Without a logging.file the CLI writes to /tmp/openclaw/ (outside TMPDIR).
            self._prepare_home(self.cli_home, {"logging": {"file": str(self.root / "cli.log")}})
            cmd = [
                *_netns_prefix(self.netns),
                str(install.launcher),
                "gateway",
                "run",
                "--port",
                str(self.port),
                "--bind",
                "loopback",
            ]
            self._stdout = open(self.stdout_path, "wb")  # noqa: SIM115 (closed in stop)
            started = time.monotonic()
            self._proc = subprocess.Popen(
                cmd,
                env=self.env(),
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=self._stdout,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() reaches its workers
            )
            self._wait_ready(started)
            self.startup_seconds = time.monotonic() - started
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, started: float) -> None:
        assert self._proc is not None
        deadline = started + self.ready_timeout
        probe: subprocess.Popen[bytes] | None = None
        if self.netns:
            probe = subprocess.Popen(
                [
                    *_netns_prefix(self.netns),
                    sys.executable,
                    "-c",
                    _PROBE_SCRIPT,
                    f"{self.http_url}/readyz",
                    str(self.ready_timeout),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise GatewayStartError(
                        f"openclaw gateway exited with {self._proc.returncode} before ready:\n"
                        + self._tail()
                    )
                if probe is not None:
                    rc = probe.poll()
                    if rc == 0:
                        return
                    if rc is not None:
                        break
                elif _http_ok(f"{self.http_url}/readyz"):
                    return
                time.sleep(0.2)
        finally:
            if probe is not None and probe.poll() is None:
                probe.kill()
                probe.wait()
        raise GatewayStartError(
            f"openclaw gateway not ready on {self.http_url}/readyz after "
            f"{self.ready_timeout:.0f}s:\n" + self._tail()
        )

    def _tail(self, lines: int = 40) -> str:
        try:
            text = self.stdout_path.read_text(errors="replace")
        except OSError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after 5 s; remove the temp dir and stale locks."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # Workers that outlived the leader (same group) must not linger either.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._stdout is not None:
            self._stdout.close()
            self._stdout = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
        cleanup_state_locks()

    def __enter__(self) -> OpenClawGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observing ---------------------------------------------------------------------
    def logs(self) -> str:
        """The gateway's log file (JSON lines) as text; empty before the first line."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_messages(self) -> list[str]:
        """The `message` of every JSON log line (what the console shows, without colours)."""
        out: list[str] = []
        for line in self.logs().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            message = record.get("message") if isinstance(record, dict) else None
            if isinstance(message, str):
                out.append(message)
        return out

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        """Return the first log message containing `needle`, polling until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.log_messages():
                if needle in message:
                    return message
            if time.monotonic() >= deadline:
                raise AssertionError(f"no gateway log message contains {needle!r}")
            time.sleep(0.2)

    # -- driving -----------------------------------------------------------------------
    def auth_args(self, url: str | None = None) -> list[str]:
        """`--url <direct url> --token T` (or `--password P` in trusted-proxy mode)."""
        args = ["--url", url or self.url]
        if self.token is not None:
            args += ["--token", self.token]
        elif self.password is not None:
            args += ["--password", self.password]
        return args

    def client_home(self, name: str, config: Mapping[str, Any] | None = None) -> Path:
        """A further simulated client machine (own HOME, own device identity); `config` is
        merged into its openclaw.json, e.g. {"gateway.mode": "remote",
        "gateway.remote.url": "ws://100.64.0.1:18789"} to reach a gateway without --url."""
        home = self._require_root() / f"client-{name}"
        client_config: dict[str, Any] = {"logging": {"file": str(home / "cli.log")}}
        _deep_merge(client_config, config or {})
        self._prepare_home(home, client_config)
        return home

    def cli(
        self,
        *args: str,
        netns: str | None = None,
        home: Path | None = None,
        timeout: float = 60.0,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real `openclaw` CLI (default HOME: `cli_home`); `netns` runs it in one."""
        cmd = [*_netns_prefix(netns), str(self.install.launcher), *args]
        return subprocess.run(
            cmd,
            env=self.env(home or self.cli_home),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def rss_bytes(self) -> int:
        """Resident memory of the whole gateway process group (leader + workers)."""
        if self._proc is None:
            return 0
        pgid = self._proc.pid
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) != pgid:  # fields[2] is pgrp
                    continue
                status = (stat.parent / "status").read_text()
            except (OSError, IndexError, ValueError):
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total


@pytest.fixture
def openclaw_gateways() -> Iterator[Any]:
    """Factory fixture: `gw = openclaw_gateways(auth="token", ...)` starts one (skips the
    test if the gateway cannot be installed); all are stopped at teardown.

    Wire it with `from tests.e2e.openclaw import openclaw_gateways` in a conftest; for a
    module-scoped variant, wrap `OpenClawGateway` the same way with `scope="module"`.
    """
    started: list[OpenClawGateway] = []

    def start(**kwargs: Any) -> OpenClawGateway:
        try:
            install = install_openclaw()
        except OpenClawUnavailable as exc:
            pytest.skip(f"real OpenClaw gateway unavailable: {exc}")
        gw = OpenClawGateway(install=install, **kwargs)
        started.append(gw)
        return gw.start()

    try:
        yield start
    finally:
        for gw in reversed(started):
            gw.stop()
