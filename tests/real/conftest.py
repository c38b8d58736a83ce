"""Fixtures for tests/real: one tailnet of real tailscaled nodes shared by all its tests.

Nodes: server (tag:server, runs clawgate), phone and laptop (alice@example.com), ci (tag:ci),
bob (bob@example.com). The control server grants phone the capability CAP on server. Every
test that uses `real_tailnet` is a `netns` test (and fails instead of skipping under
CLAWGATE_REQUIRE_NETNS=1, as scripts/test sets it where it runs as root).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REQUIRE_NETNS_ENV, require_netns
from tests.fakes.fake_gateway import FakeGateway
from tests.harness import ClawgateProcess
from tests.netns import NetnsUnavailable, cleanup_stale, listen_in
from tests.real.tailnet import RealTailnet

ALICE = "alice@example.com"
BOB = "bob@example.com"
CAP = "example.com/cap/clawgate"
CAP_VALUE = {"role": "operator"}
PORT = 18789
ADMIN_PORT = 18790
NODES = {"server": "tag:server", "phone": ALICE, "laptop": ALICE, "ci": "tag:ci", "bob": BOB}


@pytest.fixture(scope="package")
def real_tailnet() -> Iterator[RealTailnet]:
    """tests/real's real tailnet, every node Running with a live path to `server`; torn
    down (daemons, namespaces) once the package's last test is done, not at session end."""
    require_netns()
    cleanup_stale()
    tn = RealTailnet(NODES)
    try:
        tn.start(hub="server", timeout=60)
    except NetnsUnavailable as exc:
        tn.close()
        if os.environ.get(REQUIRE_NETNS_ENV) == "1":
            pytest.fail(f"{REQUIRE_NETNS_ENV}=1 but {exc}")
        pytest.skip(str(exc))
    except BaseException:
        tn.close()
        raise
    tn.ctl.add_grant(src="phone", dst="server", cap=CAP, values=[CAP_VALUE])
    with tn:
        yield tn


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "real_tailnet" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.netns)


class ServerClawgate(ClawgateProcess):
    """clawgate on the server node, finding tailscaled at the real default socket path.

    It runs in the server's network namespace and in a private mount namespace of its own
    where a tmpfs covers /run and /run/tailscale is the server node's socket directory, so
    /var/run/tailscale/tailscaled.sock (the first default) is that node's tailscaled; the
    host's own /run is never touched.
    """

    def __init__(self, tn: RealTailnet, workdir: Path, config: dict[str, Any]) -> None:
        self.tn = tn
        super().__init__(workdir, config, netns=tn.nodes["server"].ns, admin_port=ADMIN_PORT)

    def argv(self, *args: str) -> list[str]:
        sockdir = str(Path(self.tn.nodes["server"].socket_path).parent)
        script = (
            "mount -t tmpfs tmpfs /run && mkdir -p /run/tailscale && "
            'mount --bind "$0" /run/tailscale && shift && exec "$@"'
        )
        return [
            "ip",
            "netns",
            "exec",
            self.tn.nodes["server"].ns,
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            sockdir,
            "-",
            sys.executable,
            "-m",
            "proxy",
            *args,
        ]


@pytest.fixture
async def server_gateway(real_tailnet: RealTailnet) -> AsyncIterator[FakeGateway]:
    """A fake gateway on the server node's loopback."""
    gw = FakeGateway()
    await gw.start(sock=listen_in(real_tailnet.nodes["server"].ns, "127.0.0.1"))
    try:
        yield gw
    finally:
        await gw.stop()


def server_config(gw_port: int, **tailscale: Any) -> dict[str, Any]:
    """clawgate on the server node: host "tailscale", no socket configured, identity only."""
    return {
        "gateway": {"host": "tailscale", "port": PORT},
        "upstream": f"http://127.0.0.1:{gw_port}",
        "tailscale": {"authMode": "identity", **tailscale},
        "limits": {"failedAuthLockout": 0},
    }


async def start_server_clawgate(
    tn: RealTailnet, workdir: Path, config: dict[str, Any], wait_for: str = "listening on"
) -> ServerClawgate:
    cg = ServerClawgate(tn, workdir, config)
    await cg.start(wait_for=wait_for, timeout=20)
    return cg


@pytest.fixture
async def clawgate_on_server(
    real_tailnet: RealTailnet, server_gateway: FakeGateway, tmp_path: Path
) -> AsyncIterator[ServerClawgate]:
    cg = await start_server_clawgate(
        real_tailnet, tmp_path / "cg", server_config(server_gateway.port)
    )
    try:
        # Bound to the tailnet addresses: wait until both show up in the listen log.
        await asyncio.sleep(0)
        yield cg
    finally:
        await cg.stop()
