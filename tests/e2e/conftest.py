"""Fixtures for the end-to-end suite: the real OpenClaw gateway behind clawgate on the tailnet.

The real gateway takes ~10 s to start and ~1 GB of memory, so one gateway per auth mode is
shared by the whole session (token mode on the gw namespace's 127.0.0.1:18789, trusted-proxy
mode on 127.0.0.1:18889); clawgate processes are cheap and belong to the module that needs
them. When the gateway cannot be installed the tests skip, unless CLAWGATE_REQUIRE_E2E=1
(CI), where they fail.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.openclaw import (
    OpenClawGateway,
    OpenClawInstall,
    OpenClawUnavailable,
    TrustedProxyAuth,
    install_openclaw,
)
from tests.harness import ClawgateProcess
from tests.netns import GW_V4, Tailnet

REQUIRE_E2E_ENV = "CLAWGATE_REQUIRE_E2E"
GW_TOKEN = "e2e-gateway-token-5d1f0c2a9b7e-8c41aa"
GW_PASSWORD = "e2e-local-admin-password-77c3"
TOKEN_GW_PORT = 18789
IDENTITY_GW_PORT = 18889
ALICE = "alice@example.com"
ALICE_SCOPES = ("operator.read", "operator.write")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/e2e drives the real gateway (or its edge checks): mark it e2e.
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.e2e)


def unavailable(reason: str) -> None:
    """Skip, or fail where CLAWGATE_REQUIRE_E2E=1 (CI) says the e2e suite must run."""
    if os.environ.get(REQUIRE_E2E_ENV) == "1":
        pytest.fail(f"{REQUIRE_E2E_ENV}=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def openclaw_install() -> Iterator[OpenClawInstall]:
    # OpenClaw creates /tmp/openclaw (outside TMPDIR) even when every log goes elsewhere:
    # remove it after the session when it was ours and is empty.
    tmp_logs = Path("/tmp/openclaw")
    existed = tmp_logs.exists()
    try:
        yield install_openclaw()
    except OpenClawUnavailable as exc:
        unavailable(f"real OpenClaw gateway unavailable: {exc}")
        raise  # unreachable: skip/fail raise
    finally:
        if not existed:
            try:
                tmp_logs.rmdir()
            except OSError:  # not there, or not empty: leave it
                pass


@pytest.fixture(scope="session")
def token_gateway(tailnet: Tailnet, openclaw_install: OpenClawInstall) -> Iterator[OpenClawGateway]:
    """The real gateway in token mode on the gw namespace's 127.0.0.1:18789."""
    gw = OpenClawGateway(
        auth="token",
        token=GW_TOKEN,
        netns=tailnet.ns("gw"),
        port=TOKEN_GW_PORT,
        install=openclaw_install,
    )
    with gw:
        yield gw


@pytest.fixture(scope="session")
def identity_gateway(
    tailnet: Tailnet, openclaw_install: OpenClawInstall
) -> Iterator[OpenClawGateway]:
    """The real gateway in trusted-proxy mode (alice only) on the gw namespace's :18889."""
    auth = TrustedProxyAuth(
        user_header="x-forwarded-user",
        required_headers=("x-forwarded-proto",),
        allow_users=(ALICE,),
        identity_scopes={ALICE: list(ALICE_SCOPES)},
        password=GW_PASSWORD,
    )
    gw = OpenClawGateway(
        auth="trusted-proxy",
        trusted_proxy=auth,
        netns=tailnet.ns("gw"),
        port=IDENTITY_GW_PORT,
        install=openclaw_install,
    )
    with gw:
        yield gw


class Clawgate:
    """A ClawgateProcess started and stopped from sync (module-scoped) fixtures."""

    def __init__(
        self,
        tailnet: Tailnet,
        name: str,
        config: dict[str, Any],
        *,
        port: int,
        admin_port: int,
        env: dict[str, str] | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"clawgate-e2e-{name}-"))
        base: dict[str, Any] = {
            "gateway": {"host": GW_V4, "port": port},
            "log": {"refusedPerSecond": 100000},
        }
        self.proc = ClawgateProcess(
            self.dir, _merge(base, config), netns=tailnet.ns("gw"), admin_port=admin_port, env=env
        )
        self.port = port

    @property
    def tokens(self) -> dict[str, str]:
        return self.proc.tokens

    def start(self) -> Clawgate:
        try:
            asyncio.run(self.proc.start())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc.proc is not None:
            asyncio.run(self.proc.stop())
        shutil.rmtree(self.dir, ignore_errors=True)

    def access_log(self) -> list[dict[str, Any]]:
        return self.proc.access_log()

    def mark(self) -> int:
        """The number of access-log lines so far: pass it to `since` to see only new ones."""
        return len(self.access_log())

    def since(self, mark: int) -> list[dict[str, Any]]:
        return self.access_log()[mark:]

    def wait_for(self, pred: Any, mark: int = 0, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for rec in self.since(mark):
                if pred(rec):
                    return rec
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no matching access-log line in {timeout}s: {self.since(mark)}"
                )
            time.sleep(0.05)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="session")
def gateway_token_file() -> Iterator[Path]:
    """The gateway's token in a 0600 file, for clawgate's gatewayToken.file."""
    d = Path(tempfile.mkdtemp(prefix="clawgate-e2e-gwtoken-"))
    path = d / "gateway.token"
    path.write_text(GW_TOKEN + "\n")
    path.chmod(0o600)
    try:
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


class FakeTailscaledProcess:
    """`python -m tests.fakes.fake_tailscaled` as a process: its unix socket is reachable
    from every network namespace, so clawgate inside gw can use it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="clawgate-e2e-tsd-"))
        self.socket = self.dir / "tailscaled.sock"
        self.log = self.dir / "tailscaled.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FakeTailscaledProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fakes.fake_tailscaled", "--socket", str(self.socket)],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 15
        while b"listening on" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    "fake tailscaled did not start: " + self.log.read_text(errors="replace")
                )
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def fake_tailscaled() -> Iterator[FakeTailscaledProcess]:
    """Default peers: alice@example.com's laptop = the phone (100.101.102.103), tag:ci = ci."""
    tsd = FakeTailscaledProcess().start()
    try:
        yield tsd
    finally:
        tsd.stop()


def artifact_path(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name
