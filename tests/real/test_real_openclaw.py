"""The real OpenClaw gateway behind clawgate on a real tailscaled node, reached over the tailnet.

The gateway (trusted-proxy mode: the user is X-Forwarded-User, alice@example.com only, with
identityScopes operator.read + operator.write) listens on the server node's 127.0.0.1:18889;
clawgate, on the same node with "host": "tailscale" and the real tailscaled at its default
socket, is the only way in. The phone (alice's, a real tailscaled) runs the real OpenClaw CLI
and a gateway client through WireGuard; the tagged ci node is refused by the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.gwclient import CLI_CLIENT, GatewayClient, HandshakeError
from tests.e2e.openclaw import (
    OpenClawGateway,
    OpenClawUnavailable,
    TrustedProxyAuth,
    install_openclaw,
)
from tests.netns import connect_in
from tests.real.conftest import ALICE, PORT, ServerClawgate, server_config
from tests.real.tailnet import RealTailnet

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

GW_PORT = 18889
ALICE_SCOPES = ("operator.read", "operator.write")
GW_PASSWORD = "real-ts-local-admin-password-41c9"


@pytest.fixture(scope="module")
def real_gateway(real_tailnet: RealTailnet) -> Iterator[OpenClawGateway]:
    try:
        install = install_openclaw()
    except OpenClawUnavailable as exc:
        if os.environ.get("CLAWGATE_REQUIRE_E2E") == "1":
            pytest.fail(f"CLAWGATE_REQUIRE_E2E=1 but the real OpenClaw is unavailable: {exc}")
        pytest.skip(f"real OpenClaw gateway unavailable: {exc}")
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
        netns=real_tailnet.ns("server"),
        port=GW_PORT,
        install=install,
    )
    # OpenClaw creates /tmp/openclaw even when its logs go elsewhere: remove it if ours.
    tmp_logs = Path("/tmp/openclaw")  # noqa: S108 - the path OpenClaw itself uses
    existed = tmp_logs.exists()
    try:
        with gw:
            yield gw
    finally:
        if not existed:
            with contextlib.suppress(OSError):  # not there, or not empty: leave it
                tmp_logs.rmdir()


@pytest.fixture(scope="module")
def clawgate_for_gateway(
    real_tailnet: RealTailnet, real_gateway: OpenClawGateway
) -> Iterator[ServerClawgate]:
    workdir = Path(tempfile.mkdtemp(prefix="clawgate-real-oc-"))
    cg = ServerClawgate(real_tailnet, workdir, server_config(GW_PORT))
    asyncio.run(cg.start(timeout=20))
    try:
        yield cg
    finally:
        asyncio.run(cg.stop())


async def _connect(tn: RealTailnet, node: str, **kw: Any) -> Any:
    """GatewayClient.connect from `node` through the tailnet (async with / await it)."""
    host = tn.v4("server")
    sock = await connect_in(tn.ns(node), host, PORT)
    return GatewayClient.connect(f"ws://{host}:{PORT}", sock=sock, **kw)


def test_real_cli_from_the_phone_over_the_tailnet(
    real_tailnet: RealTailnet, real_gateway: OpenClawGateway, clawgate_for_gateway: ServerClawgate
) -> None:
    tn = real_tailnet
    # The CLI insists on a credential with --url; in trusted-proxy mode the gateway ignores
    # it and authenticates the identity clawgate set from the real whois.
    proc = real_gateway.cli(
        "gateway",
        "call",
        "status",
        "--json",
        "--url",
        f"ws://{tn.v4('server')}:{PORT}",
        "--token",
        "unused",
        netns=tn.ns("phone"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert isinstance(json.loads(proc.stdout), dict)
    recs = [r for r in clawgate_for_gateway.access_log() if r.get("event") == "decision"]
    assert recs, clawgate_for_gateway.access_log()
    assert (recs[-1]["decision"], recs[-1]["peer"], recs[-1]["login"], recs[-1]["websocket"]) == (
        "allow",
        tn.v4("phone"),
        ALICE,
        True,
    )


async def test_alice_gets_her_scopes_and_ci_is_refused(
    real_tailnet: RealTailnet, real_gateway: OpenClawGateway, clawgate_for_gateway: ServerClawgate
) -> None:
    tn = real_tailnet
    async with await _connect(tn, "phone", client=CLI_CLIENT, scopes=["operator.admin"]) as gw:
        assert gw.hello["type"] == "hello-ok"
        assert gw.hello["auth"]["method"] == "trusted-proxy"
        assert sorted(gw.scopes) == sorted(ALICE_SCOPES)  # what identityScopes gives, no more
        assert isinstance(await gw.call("status"), dict)
    # laptop is alice's too (another real node, same user): same scopes.
    async with await _connect(tn, "laptop", client=CLI_CLIENT) as gw:
        assert sorted(gw.scopes) == sorted(ALICE_SCOPES)
    # ci is a tagged node, not a user: clawgate lets it through as itself, the gateway
    # (allowUsers: alice) refuses it: no device pairing, no way in.
    with pytest.raises(HandshakeError):
        await (await _connect(tn, "ci", client=CLI_CLIENT, headers={"X-Forwarded-User": ALICE}))
