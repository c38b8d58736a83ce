"""Paired devices and setup codes through the edge gate, with the real gateway and CLI.

clawgate (gw namespace, 100.64.0.1) holds every first frame that carries no clawgate
credential and admits it only if the gateway would: its shared token, or a device token /
setup-code token found in the gateway's own pairing store (read-only, by
``gatewayToken.stateDir``). The phone (100.101.102.103) pairs the real CLI through the gate,
reconnects with only its device token, and pairs a node with a setup code; forged, revoked
and another gateway's device tokens are closed with 1008 at the edge, and the gateway's own
log shows that no connect request reached it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import connect

from tests.e2e import test_control_ui_https as ui_https
from tests.e2e.conftest import ALICE, GW_TOKEN, Clawgate, FakeTailscaledProcess, artifact_path
from tests.e2e.gwclient import CLI_CLIENT
from tests.e2e.openclaw import OpenClawGateway, OpenClawInstall
from tests.e2e.test_control_ui_https import TrustingChromium, _navigate, _poll
from tests.netns import GW_V4, PHONE_V4, Tailnet, connect_in
from tests.tlsutil import DOMAIN

GATED_PORT = 18797
OTHER_GW_PORT = 18996  # a second, unrelated gateway (its device tokens are foreign here)
OTHER_TOKEN = "e2e-other-gateway-token-3c81f-0a6d9b24e7"
OTHER_GATED_PORT = 18799
UI_PORT = 18747  # clawgate over HTTPS for the Control UI, the gate on, identity "either"
UI_ORIGIN = f"https://{DOMAIN}:{UI_PORT}"

# The HTTPS Control UI module's fixtures (test CA, tailscaled serving its certificate, a
# Chromium that trusts it), instantiated for this module.
test_ca = ui_https.test_ca
https_tailscaled = ui_https.https_tailscaled
browser = ui_https.browser
PRE_CONNECT = (
    rf"^closed before connect .*host=100\.64\.0\.1:{GATED_PORT} "
    r".*phase=ws_upgrade_started"
)


def state_dir(gw: OpenClawGateway) -> Path:
    return gw.home / ".openclaw"


@pytest.fixture(scope="module")
def gated(
    tailnet: Tailnet, token_gateway: OpenClawGateway, gateway_token_file: Path
) -> Iterator[Clawgate]:
    cg = Clawgate(
        tailnet,
        "gate-devices",
        {
            "upstream": f"http://127.0.0.1:{token_gateway.port}",
            "gatewayToken": {
                "file": str(gateway_token_file),
                "stateDir": str(state_dir(token_gateway)),
            },
            "limits": {"failedAuthCount": 1000},
        },
        port=GATED_PORT,
        admin_port=18798,
    ).start()
    try:
        yield cg
    finally:
        cg.stop()


@pytest.fixture(scope="module")
def other_gated(tailnet: Tailnet, other_gateway: OpenClawGateway) -> Iterator[Clawgate]:
    """The other gateway behind its own gated clawgate (the phone pairs with it there)."""
    token_file = other_gateway.home.parent / "other.token"
    token_file.write_text(OTHER_TOKEN)
    token_file.chmod(0o600)
    cg = Clawgate(
        tailnet,
        "gate-devices-other",
        {
            "upstream": f"http://127.0.0.1:{other_gateway.port}",
            "gatewayToken": {"file": str(token_file), "stateDir": str(state_dir(other_gateway))},
        },
        port=OTHER_GATED_PORT,
        admin_port=18800,
    ).start()
    try:
        yield cg
    finally:
        cg.stop()


@pytest.fixture(scope="module")
def other_gateway(tailnet: Tailnet, openclaw_install: OpenClawInstall) -> Iterator[OpenClawGateway]:
    # Also the Control UI's gateway (section 4): it lists the UI's https origin.
    gw = OpenClawGateway(
        auth="token",
        token=OTHER_TOKEN,
        netns=tailnet.ns("gw"),
        port=OTHER_GW_PORT,
        install=openclaw_install,
        extra_config={"gateway.controlUi.allowedOrigins": [UI_ORIGIN]},
    )
    with gw:
        yield gw


def cli(
    gw: OpenClawGateway, tailnet: Tailnet, *args: str, home: Path, ns: str = "phone"
) -> tuple[int, str]:
    proc = gw.cli(*args, netns=tailnet.ns(ns), home=home)
    return proc.returncode, proc.stdout + proc.stderr


def admin(gw: OpenClawGateway, tailnet: Tailnet, *args: str) -> str:
    proc = gw.cli(*args, *gw.auth_args(), netns=tailnet.ns("gw"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def gw_count(gw: OpenClawGateway, pattern: str) -> int:
    rx = re.compile(pattern)
    return sum(1 for m in gw.log_messages() if rx.search(m))


def wait_gw(gw: OpenClawGateway, pattern: str, at_least: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while gw_count(gw, pattern) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"gateway log: fewer than {at_least} lines match {pattern!r}; "
                f"last: {gw.log_messages()[-8:]}"
            )
        time.sleep(0.1)


def pair_cli(
    gw: OpenClawGateway, tailnet: Tailnet, url: str, token: str, name: str | Path
) -> tuple[Path, str]:
    """Pair a CLI (a fresh home, or an existing one) on the phone through ``url`` with the
    shared token, approved on the gateway host; return (home, deviceId)."""
    home = (
        name
        if isinstance(name, Path)
        else gw.client_home(name, {"gateway.mode": "remote", "gateway.remote.url": url})
    )
    rc, out = cli(gw, tailnet, "cron", "list", "--url", url, "--token", token, home=home)
    assert rc != 0
    m = re.search(r"device pairing required \(requestId: ([0-9a-f-]{36})\)", out)
    assert m is not None, out
    pending = json.loads(admin(gw, tailnet, "devices", "list", "--json"))["pending"]
    (entry,) = [p for p in pending if p["requestId"] == m.group(1)]
    admin(gw, tailnet, "devices", "approve", m.group(1))
    rc, out = cli(gw, tailnet, "cron", "list", "--url", url, "--token", token, home=home)
    assert rc == 0, out
    return home, str(entry["deviceId"])


@pytest.fixture(scope="module")
def paired_phone(
    tailnet: Tailnet, token_gateway: OpenClawGateway, gated: Clawgate
) -> tuple[Path, str]:
    return pair_cli(
        token_gateway, tailnet, f"ws://{GW_V4}:{GATED_PORT}", GW_TOKEN, "gate-dev-phone"
    )


@dataclass(frozen=True)
class Device:
    """A CLI's device identity and stored device token, read from its own state database."""

    device_id: str
    public_key: str  # raw base64url, as the client sends it
    private_key: Ed25519PrivateKey
    tokens: dict[str, str]  # gateway origin -> operator device token


def read_device(home: Path) -> Device:
    db = home / ".openclaw" / "state" / "openclaw.sqlite"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        device_id, pem = conn.execute(
            "SELECT device_id, private_key_pem FROM device_identities"
        ).fetchone()
        tokens = dict(
            conn.execute(
                "SELECT gateway_scope, token FROM "
                "gateway_origin_device_tokens WHERE role = 'operator'"
            )
        )
    finally:
        conn.close()
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Device(device_id, base64.urlsafe_b64encode(raw).rstrip(b"=").decode(), key, tokens)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def device_connect(
    tailnet: Tailnet, dev: Device, auth: dict[str, str], signature_token: str
) -> tuple[str, Any]:
    """The real client's handshake with a signed device identity (buildDeviceAuthPayloadV3),
    from the phone through the gate: ("ok", hello) | ("closed", (code, reason)) |
    ("error", message)."""
    sock = await connect_in(tailnet.ns("phone"), GW_V4, GATED_PORT)
    ws = await connect(
        f"ws://{GW_V4}:{GATED_PORT}/",
        sock=sock,
        proxy=None,
        compression=None,
        max_size=None,
        open_timeout=10,
    )
    try:
        challenge = json.loads(await asyncio.wait_for(ws.recv(), 10))
        nonce = challenge["payload"]["nonce"]
        signed_at = int(time.time() * 1000)
        scopes = ["operator.read"]
        payload = "|".join(
            [
                "v3",
                dev.device_id,
                "cli",
                "cli",
                "operator",
                ",".join(scopes),
                str(signed_at),
                signature_token,
                nonce,
                "linux",
                "linux",
            ]
        )
        params = {
            "minProtocol": 4,
            "maxProtocol": 4,
            "role": "operator",
            # What the real CLI on Linux sends (the paired metadata must match).
            "client": {**CLI_CLIENT, "deviceFamily": "Linux"},
            "scopes": scopes,
            "caps": [],
            "auth": auth,
            "device": {
                "id": dev.device_id,
                "publicKey": dev.public_key,
                "signature": _b64url(dev.private_key.sign(payload.encode())),
                "signedAt": signed_at,
                "nonce": nonce,
            },
        }
        await ws.send(
            json.dumps({"type": "req", "id": "c1", "method": "connect", "params": params})
        )
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 15))
            if frame.get("type") == "res" and frame.get("id") == "c1":
                if frame.get("ok"):
                    return "ok", frame["payload"]
                return "error", frame.get("error", {}).get("message")
    except websockets.ConnectionClosed as exc:
        rcvd = exc.rcvd
        return "closed", (rcvd.code, rcvd.reason) if rcvd else (None, "")
    finally:
        await ws.close()


def nothing_reached(gw: OpenClawGateway, before: tuple[int, int]) -> None:
    """The gateway saw an upgrade closed before any connect request, and no auth attempt."""
    unauthorized, pre_connect = before
    wait_gw(gw, PRE_CONNECT, pre_connect + 1)
    assert gw_count(gw, r"^unauthorized ") == unauthorized


def gw_marks(gw: OpenClawGateway) -> tuple[int, int]:
    return gw_count(gw, r"^unauthorized "), gw_count(gw, PRE_CONNECT)


def last_gate(cg: Clawgate, mark: int) -> dict[str, Any]:
    return cg.wait_for(lambda r: r["event"] == "gateway_token", mark)


# ------------------------------------------------------------------ 1. paired device


def test_paired_cli_reconnects_through_the_gate_with_only_its_device_token(
    token_gateway: OpenClawGateway,
    tailnet: Tailnet,
    gated: Clawgate,
    paired_phone: tuple[Path, str],
) -> None:
    home, device_id = paired_phone
    mark = gated.mark()
    unauthorized = gw_count(token_gateway, r"^unauthorized ")
    # No --url, no --token: the CLI reaches gateway.remote.url with its stored device token.
    rc, out = cli(token_gateway, tailnet, "cron", "list", home=home)
    assert rc == 0, out
    rec = last_gate(gated, mark)
    assert (rec["result"], rec["method"], rec["device"], rec["peer"]) == (
        "ok",
        "device-token",
        device_id,
        PHONE_V4,
    )
    assert gw_count(token_gateway, r"^unauthorized ") == unauthorized


async def test_signed_device_client_right_token_passes_forged_one_never_reaches_the_gateway(
    token_gateway: OpenClawGateway,
    tailnet: Tailnet,
    gated: Clawgate,
    paired_phone: tuple[Path, str],
) -> None:
    dev = read_device(paired_phone[0])
    token = dev.tokens[f"ws://{GW_V4}:{GATED_PORT}"]
    mark = gated.mark()
    kind, hello = await device_connect(tailnet, dev, {"deviceToken": token}, token)
    assert kind == "ok", (
        hello,
        [m for m in token_gateway.log_messages() if "metadata upgrade" in m][-1:],
    )
    assert hello["auth"]["role"] == "operator"
    assert last_gate(gated, mark)["method"] == "device-token"

    # The same signed frame with a forged token (signed over that token, as a thief would):
    # the edge refuses it, the gateway never sees the connect request.
    for auth, reason in [
        ({"deviceToken": "forged-" + token[7:]}, "device token mismatch"),
        ({"token": "forged-" + token[7:]}, "gateway token mismatch"),
        ({"bootstrapToken": "forged-setup-code-token"}, "bootstrap token invalid"),
    ]:
        mark = gated.mark()
        before = gw_marks(token_gateway)
        secret = next(iter(auth.values()))
        kind, got = await device_connect(tailnet, dev, auth, secret)
        assert (kind, got) == ("closed", (1008, reason))
        rec = last_gate(gated, mark)
        assert (rec["result"], rec["reason"]) == ("refused", reason)
        nothing_reached(token_gateway, before)


def server_token(gw: OpenClawGateway, device_id: str, role: str = "operator") -> str:
    """The device token ``gw`` issued to ``device_id``, from its own pairing store."""
    db = state_dir(gw) / "state" / "openclaw.sqlite"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT tokens_json FROM device_pairing_paired WHERE device_id = ?", (device_id,)
        ).fetchone()
    finally:
        conn.close()
    assert row is not None, f"{device_id} is not paired with {gw.port}"
    return str(json.loads(row[0])[role]["token"])


async def test_another_gateways_device_token_is_refused_at_the_edge(
    token_gateway: OpenClawGateway,
    other_gateway: OpenClawGateway,
    tailnet: Tailnet,
    gated: Clawgate,
    other_gated: Clawgate,
    paired_phone: tuple[Path, str],
) -> None:
    # The same phone (same device key) also paired with an unrelated gateway: that
    # gateway's device token for it is foreign here.
    home = paired_phone[0]
    other_url = f"ws://{GW_V4}:{OTHER_GATED_PORT}"
    pair_cli(other_gateway, tailnet, other_url, OTHER_TOKEN, home)
    dev = read_device(home)
    foreign = dev.tokens[other_url]
    assert foreign == server_token(other_gateway, dev.device_id)
    assert foreign != server_token(token_gateway, dev.device_id)
    mark = gated.mark()
    before = gw_marks(token_gateway)
    kind, got = await device_connect(tailnet, dev, {"deviceToken": foreign}, foreign)
    assert (kind, got) == ("closed", (1008, "device token mismatch"))
    assert last_gate(gated, mark)["reason"] == "device token mismatch"
    nothing_reached(token_gateway, before)
    # A device known only to the other gateway: not paired here.
    other_home, _ = pair_cli(other_gateway, tailnet, other_url, OTHER_TOKEN, "other-only")
    stranger = read_device(other_home)
    token = stranger.tokens[other_url]
    before = gw_marks(token_gateway)
    kind, got = await device_connect(tailnet, stranger, {"deviceToken": token}, token)
    assert (kind, got) == ("closed", (1008, "device not paired"))
    nothing_reached(token_gateway, before)


# ------------------------------------------------------------------ 2. setup code


def test_setup_code_pairing_through_the_gate(
    token_gateway: OpenClawGateway, tailnet: Tailnet, gated: Clawgate
) -> None:
    gw = token_gateway
    # The operator mints a setup code on the gateway host. `qr` insists on wss:// for a
    # tailnet address (production would use the TLS name); the code is base64url JSON
    # {url, bootstrapToken, expiresAtMs}, so point its url at clawgate's plain ws:// here.
    proc = gw.cli(
        "qr", "--json", "--url", gw.url, *gw.auth_args()[2:], netns=tailnet.ns("gw"), home=gw.home
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    setup = json.loads(base64.urlsafe_b64decode(json.loads(proc.stdout)["setupCode"] + "=="))
    assert set(setup) == {"url", "bootstrapToken", "expiresAtMs"}, setup
    setup["url"] = f"ws://{GW_V4}:{GATED_PORT}"
    code = _b64url(json.dumps(setup, separators=(",", ":")).encode())
    home = gw.client_home("setup-code-node")
    mark = gated.mark()
    before_unauth = gw_count(gw, r"^unauthorized ")
    node = subprocess.Popen(
        ["ip", "netns", "exec", tailnet.ns("phone"), str(gw.install.launcher), "connect", code],
        env=gw.env(home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []

    def wait_line(rx: str, timeout: float = 60) -> re.Match[str]:
        assert node.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            for line in lines:
                if (m := re.search(rx, line)) is not None:
                    return m
            if time.monotonic() > deadline or node.poll() is not None:
                raise AssertionError(f"node: no {rx!r} in: " + "".join(lines)[-2000:])
            chunk = node.stdout.readline()
            if chunk:
                lines.append(chunk)
            else:
                time.sleep(0.1)

    try:
        assert node.stdout is not None
        os.set_blocking(node.stdout.fileno(), False)
        # Through the gate the node is a remote client: the operator approves its pairing
        # (on the gateway host), and it connects by itself.
        request_id = wait_line(r"pairing required \(requestId: ([0-9a-f-]{36})\)").group(1)
        admin(gw, tailnet, "devices", "approve", request_id)
        wait_line(r"node host gateway connected")
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
    gates = [r for r in gated.since(mark) if r["event"] == "gateway_token"]
    assert gates and gates[0]["method"] == "bootstrap-token", gates
    assert all(r["result"] == "ok" and r["peer"] == PHONE_V4 for r in gates), gates
    node_id = gates[0]["device"]
    paired = json.loads(admin(gw, tailnet, "devices", "list", "--json"))["paired"]
    (dev,) = [d for d in paired if d["deviceId"] == node_id]
    assert "node" in (dev.get("roles") or [dev.get("role")])
    assert gw_count(gw, r"^unauthorized ") == before_unauth


# ------------------------------------------------------------------ 4. the Control UI


@pytest.fixture(scope="module")
def ui_gated(
    tailnet: Tailnet,
    other_gateway: OpenClawGateway,
    other_gated: Clawgate,
    https_tailscaled: FakeTailscaledProcess,
) -> Iterator[Clawgate]:
    """HTTPS (the UI needs a secure context for its device key), pages let in by alice's
    identity, the WebSocket by the gate: no clawgate token or login anywhere."""
    cg = Clawgate(
        tailnet,
        "gate-devices-ui",
        {
            "upstream": f"http://127.0.0.1:{other_gateway.port}",
            "gatewayToken": {
                "file": str(other_gateway.home.parent / "other.token"),
                "stateDir": str(state_dir(other_gateway)),
            },
            "tailscale": {
                "socket": str(https_tailscaled.socket),
                "authMode": "either",
                "allowUsers": [ALICE],
            },
            "tls": {"mode": "tailscale", "domain": DOMAIN},
        },
        port=UI_PORT,
        admin_port=18748,
    ).start()
    try:
        yield cg
    finally:
        cg.stop()


async def _storage(b: TrustingChromium) -> dict[str, Any]:
    return dict(
        await b.js(
            "({local: Object.fromEntries(Object.entries(localStorage)),"
            " session: Object.fromEntries(Object.entries(sessionStorage))})"
        )
    )


@pytest.mark.slow
async def test_control_ui_reconnects_on_reload_with_its_device_token(
    tailnet: Tailnet, other_gateway: OpenClawGateway, ui_gated: Clawgate, browser: TrustingChromium
) -> None:
    gw, cg = other_gateway, ui_gated
    await browser.call("Page.enable")
    mark = cg.mark()
    connected_rx = r"^webchat connected .*openclaw-control-ui"
    pairing_rx = r"^closed before connect .*origin=" + re.escape(UI_ORIGIN) + r" .*pairing required"
    before = gw_count(gw, pairing_rx)
    # The gateway's token by URL fragment (never sent to a server): the gate admits it.
    await _navigate(browser, f"{UI_ORIGIN}/#token={OTHER_TOKEN}")
    wait_gw(gw, pairing_rx, before + 1, timeout=45)
    line = [m for m in gw.log_messages() if re.search(pairing_rx, m)][-1]
    request_id = re.search(r"requestId: ([0-9a-f-]{36})", line).group(1)  # type: ignore[union-attr]
    assert f"fwd={PHONE_V4} " in line
    ok = gw_count(gw, connected_rx)
    admin(gw, tailnet, "devices", "approve", request_id)
    wait_gw(gw, connected_rx, ok + 1, timeout=45)
    first = [r for r in cg.since(mark) if r["event"] == "gateway_token"]
    assert first and all(r["result"] == "ok" and r["method"] == "gateway-token" for r in first), (
        first
    )

    async def ui_connected() -> bool:
        text = await browser.text()
        return "Model Setup" in text and "Approve this" not in text

    await _poll(ui_connected, 30, "the connected UI")

    # The UI keeps the gateway's token for this browser session only (sessionStorage) and
    # the device token it was issued in localStorage.
    store = await _storage(browser)
    session_key = f"openclaw.control.token.v1:wss://{DOMAIN}:{UI_PORT}"
    assert store["session"].get(session_key) == OTHER_TOKEN, store["session"]
    device_auth = json.loads(store["local"][f"openclaw.device.auth.v1:wss://{DOMAIN}:{UI_PORT}"])
    device_id = device_auth["deviceId"]
    assert device_auth["tokens"]["operator"]["token"]

    # A new browser session (the tab closed and opened again): no gateway token any more,
    # only the device token. The reload reconnects through the gate with it.
    await browser.js(f"sessionStorage.removeItem({json.dumps(session_key)}); true")
    mark = cg.mark()
    ok = gw_count(gw, connected_rx)
    unauthorized = gw_count(gw, r"^unauthorized ")
    await browser.call("Page.reload", ignoreCache=True)
    wait_gw(gw, connected_rx, ok + 1, timeout=45)
    await _poll(ui_connected, 30, "the UI connected again after the reload")
    gates = [r for r in cg.since(mark) if r["event"] == "gateway_token"]
    assert gates and all(
        (r["result"], r["method"], r["device"], r["peer"])
        == ("ok", "device-token", device_id, PHONE_V4)
        for r in gates
    ), gates
    assert gw_count(gw, r"^unauthorized ") == unauthorized
    assert session_key not in (await _storage(browser))["session"]
    shot = await browser.screenshot(artifact_path("control-ui-gate-device-token.png"))
    print(f"\nscreenshot: {shot}")


# ------------------------------------------------------------------ 3. revoked (last)


def test_revoked_device_token_is_refused_at_the_edge(
    token_gateway: OpenClawGateway,
    tailnet: Tailnet,
    gated: Clawgate,
    paired_phone: tuple[Path, str],
) -> None:
    home, device_id = paired_phone
    admin(token_gateway, tailnet, "devices", "revoke", "--device", device_id, "--role", "operator")
    mark = gated.mark()
    before = gw_marks(token_gateway)
    rc, out = cli(token_gateway, tailnet, "cron", "list", home=home)
    assert rc != 0
    assert "device token revoked" in out, out
    rec = last_gate(gated, mark)
    assert (rec["result"], rec["reason"], rec["peer"]) == (
        "refused",
        "device token revoked",
        PHONE_V4,
    )
    nothing_reached(token_gateway, before)
