"""The real OpenClaw gateway in trusted-proxy mode behind clawgate's Tailscale identity.

The gateway takes the user from X-Forwarded-User (allowUsers: alice@example.com, whose
identityScopes are operator.read + operator.write); clawgate, told who each tailnet peer is
by the fake tailscaled, is the only one that may set that header. alice (the phone) gets in
with no device key and no token; anybody else is refused by the gateway, or by clawgate's
own allowUsers. Also: the Control UI in a real headless Chromium on the phone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from tests.e2e.conftest import (
    ALICE,
    ALICE_SCOPES,
    Clawgate,
    FakeTailscaledProcess,
    artifact_path,
    unavailable,
)
from tests.e2e.gwclient import CLI_CLIENT, GatewayClient, HandshakeError
from tests.e2e.openclaw import OpenClawGateway
from tests.netns import CI_V4, GW_V4, PHONE_V4, Tailnet, connect_in

IDENTITY_PORT = 18789  # clawgate: identity only (authMode identity), anybody on the tailnet
ALICE_ONLY_PORT = 18795  # clawgate: identity, and its own allowUsers [alice]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CDP_PORT = 9222
ORIGIN = f"http://{GW_V4}:{IDENTITY_PORT}"


def _identity_config(
    gw: OpenClawGateway, tsd: FakeTailscaledProcess, **tailscale: Any
) -> dict[str, Any]:
    return {
        "upstream": f"http://127.0.0.1:{gw.port}",
        "tailscale": {"socket": str(tsd.socket), "authMode": "identity", **tailscale},
    }


@pytest.fixture(scope="module")
def by_identity(
    tailnet: Tailnet, identity_gateway: OpenClawGateway, fake_tailscaled: FakeTailscaledProcess
) -> Iterator[Clawgate]:
    cg = Clawgate(
        tailnet,
        "identity",
        _identity_config(identity_gateway, fake_tailscaled),
        port=IDENTITY_PORT,
        admin_port=18796,
    ).start()
    try:
        yield cg
    finally:
        cg.stop()


@pytest.fixture(scope="module")
def alice_only(
    tailnet: Tailnet, identity_gateway: OpenClawGateway, fake_tailscaled: FakeTailscaledProcess
) -> Iterator[Clawgate]:
    cg = Clawgate(
        tailnet,
        "alice-only",
        _identity_config(identity_gateway, fake_tailscaled, allowUsers=[ALICE]),
        port=ALICE_ONLY_PORT,
        admin_port=18797,
    ).start()
    try:
        yield cg
    finally:
        cg.stop()


async def _connect(tailnet: Tailnet, host: str, port: int, **kw: Any) -> Any:
    sock = await connect_in(tailnet.ns(host), GW_V4, port)
    return GatewayClient.connect(f"ws://{GW_V4}:{port}", sock=sock, **kw)


def _log_lines(gw: OpenClawGateway, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [m for m in gw.log_messages() if rx.search(m)]


def _wait_log(gw: OpenClawGateway, pattern: str, at_least: int, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = _log_lines(gw, pattern)
        if len(found) >= at_least:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"gateway log: no {pattern!r}; last: {gw.log_messages()[-6:]}")
        time.sleep(0.1)


# ------------------------------------------------------------------ 5. identity mode


async def test_alice_gets_her_identity_scopes_without_device_or_token(
    tailnet: Tailnet, identity_gateway: OpenClawGateway, by_identity: Clawgate
) -> None:
    # (The Control UI client id is covered by the real browser below: on a same-origin load
    # the gateway also wants the UI's own build id, which only the real page knows.)
    mark = by_identity.mark()
    before = len(_log_lines(identity_gateway, rf"^authenticated user connected .*user={ALICE}$"))
    async with await _connect(
        tailnet, "phone", IDENTITY_PORT, client=CLI_CLIENT, scopes=["operator.admin"]
    ) as gw:
        assert gw.hello["type"] == "hello-ok"
        assert gw.hello["auth"]["method"] == "trusted-proxy"
        # Exactly what identityScopes gives her, not what she asked for.
        assert sorted(gw.scopes) == sorted(ALICE_SCOPES)
        assert isinstance(await gw.call("status"), dict)  # needs operator.read
    _wait_log(identity_gateway, rf"^authenticated user connected .*user={ALICE}$", before + 1)
    rec = by_identity.wait_for(lambda r: r["event"] == "decision", mark)
    assert (rec["decision"], rec["peer"], rec["login"], rec["websocket"]) == (
        "allow",
        PHONE_V4,
        ALICE,
        True,
    )


async def test_alice_claiming_to_be_admin_from_loopback_is_still_alice(
    tailnet: Tailnet, identity_gateway: OpenClawGateway, by_identity: Clawgate
) -> None:
    before = len(_log_lines(identity_gateway, rf"^authenticated user connected .*user={ALICE}$"))
    spoofed = {
        "X-Forwarded-User": "admin",
        "X-Forwarded-For": "127.0.0.1",
        "X-Forwarded-Proto": "https",
        "Tailscale-User-Login": "admin",
    }
    async with await _connect(
        tailnet, "phone", IDENTITY_PORT, headers=spoofed, client=CLI_CLIENT
    ) as gw:
        assert sorted(gw.scopes) == sorted(ALICE_SCOPES)
    _wait_log(identity_gateway, rf"^authenticated user connected .*user={ALICE}$", before + 1)
    assert not _log_lines(identity_gateway, r"user=admin\b")


@pytest.mark.parametrize("spoof", [{}, {"X-Forwarded-User": ALICE}], ids=["plain", "claims-alice"])
async def test_a_peer_outside_allow_users_is_refused_by_the_gateway(
    tailnet: Tailnet,
    identity_gateway: OpenClawGateway,
    by_identity: Clawgate,
    spoof: dict[str, str],
) -> None:
    mark = by_identity.mark()
    # (the close reason depends on who closes first: the gateway's 1008 or our 1000)
    refused = r"^closed before connect .*fwd=100\.88\.12\.34 "
    before = len(_log_lines(identity_gateway, refused))
    with pytest.raises(HandshakeError) as info:
        await (await _connect(tailnet, "ci", IDENTITY_PORT, headers=spoof, client=CLI_CLIENT))
    # clawgate let the tagged CI node through with ITS identity; the gateway said no.
    assert info.value.code == "NOT_PAIRED"
    assert info.value.detail_code == "DEVICE_IDENTITY_REQUIRED"
    rec = by_identity.wait_for(lambda r: r["event"] == "decision", mark)
    assert (rec["decision"], rec["peer"], rec["tags"]) == ("allow", CI_V4, ["tag:ci"])
    _wait_log(identity_gateway, refused, before + 1)


async def test_clawgate_allow_users_refuses_others_with_403(
    tailnet: Tailnet, identity_gateway: OpenClawGateway, alice_only: Clawgate
) -> None:
    mark = alice_only.mark()
    before = len(_log_lines(identity_gateway, r"host=100\.64\.0\.1:18795 "))
    with pytest.raises(websockets.InvalidStatus) as info:
        await (await _connect(tailnet, "ci", ALICE_ONLY_PORT, client=CLI_CLIENT))
    assert info.value.response.status_code == 403
    rec = alice_only.wait_for(lambda r: r["event"] == "decision", mark)
    assert (rec["decision"], rec["status"], rec["peer"]) == ("deny", 403, CI_V4)
    # ...and alice passes the same clawgate.
    async with await _connect(tailnet, "phone", ALICE_ONLY_PORT, client=CLI_CLIENT) as gw:
        assert sorted(gw.scopes) == sorted(ALICE_SCOPES)
    assert len(_log_lines(identity_gateway, r"host=100\.64\.0\.1:18795 ")) == before


def test_real_cli_as_alice_by_identity(
    tailnet: Tailnet, identity_gateway: OpenClawGateway, by_identity: Clawgate
) -> None:
    # The CLI insists on a credential with --url; the gateway ignores it in this mode and
    # authenticates the header identity clawgate set.
    proc = identity_gateway.cli(
        "gateway",
        "call",
        "status",
        "--json",
        "--url",
        f"ws://{GW_V4}:{IDENTITY_PORT}",
        "--token",
        "unused",
        netns=tailnet.ns("phone"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert isinstance(json.loads(proc.stdout), dict)


# ------------------------------------------------------------------ 6. the Control UI


class Chromium:
    """Headless Debian Chromium in a namespace, driven over the DevTools protocol."""

    def __init__(self, tailnet: Tailnet, ns: str) -> None:
        self.tailnet, self.ns = tailnet, ns
        self.profile = Path(tempfile.mkdtemp(prefix="clawgate-e2e-chromium-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.ws: ClientConnection | None = None
        self._ids = 0
        self.events: list[dict[str, Any]] = []

    async def start(self) -> Chromium:
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.tailnet.ns(self.ns),
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={self.profile}",
                f"--remote-debugging-port={CDP_PORT}",
                "--remote-debugging-address=127.0.0.1",
                "--window-size=1280,900",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.profile / "chromium.log", "wb"),  # noqa: SIM115
            # Chromium leaves org.chromium.Chromium.* dirs in TMPDIR: keep them in the
            # profile, which stop() removes.
            env={**os.environ, "TMPDIR": str(self.profile)},
            # Its own process group: stop() must reach the zygote and renderers too, or
            # they write into the profile after it is removed.
            start_new_session=True,
        )
        targets = await self._targets()
        page = next(t for t in targets if t["type"] == "page")
        sock = await connect_in(self.tailnet.ns(self.ns), "127.0.0.1", CDP_PORT)
        self.ws = await connect(
            page["webSocketDebuggerUrl"], sock=sock, proxy=None, max_size=None, open_timeout=10
        )
        return self

    async def _targets(self) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 20
        while True:
            try:
                reader, writer = await asyncio.open_connection(
                    sock=await connect_in(self.tailnet.ns(self.ns), "127.0.0.1", CDP_PORT)
                )
                break
            except OSError:
                if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                    raise
                await asyncio.sleep(0.1)
        try:
            writer.write(b"GET /json/list HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
            return list(json.loads(await reader.readexactly(length)))
        finally:
            writer.close()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.ws is not None
        self._ids += 1
        mid = self._ids
        await self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        async with asyncio.timeout(20):
            while True:
                msg = json.loads(await self.ws.recv())
                if msg.get("id") == mid:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return dict(msg.get("result") or {})
                self.events.append(msg)

    async def text(self) -> str:
        res = await self.call("Runtime.evaluate", expression="document.body.innerText")
        return str(res["result"].get("value", ""))

    async def screenshot(self, path: Path) -> Path:
        res = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(res["data"]))
        return path

    async def stop(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # children that outlived it
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
async def chromium(tailnet: Tailnet) -> AsyncIterator[Chromium]:
    if not Path(CHROMIUM).exists():
        unavailable("chromium is not installed (apt-get install chromium)")
    browser = Chromium(tailnet, "phone")
    try:
        yield await browser.start()
    finally:
        await browser.stop()


async def _poll(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.25)


@pytest.mark.slow
async def test_control_ui_in_chromium_reaches_the_gateway_by_identity(
    tailnet: Tailnet, identity_gateway: OpenClawGateway, by_identity: Clawgate, chromium: Chromium
) -> None:
    mark = by_identity.mark()
    ui = r"^closed before connect .*origin=http://100\.64\.0\.1:18789 .*HeadlessChrome"
    before = len(_log_lines(identity_gateway, ui))
    await chromium.call("Page.enable")
    await chromium.call("Page.navigate", url=f"{ORIGIN}/")

    # The page loaded through clawgate and opened its WebSocket, allowed by alice's identity.
    def ws_allowed(r: dict[str, Any]) -> bool:
        return r["event"] == "decision" and r.get("websocket") is True

    rec = by_identity.wait_for(ws_allowed, mark, timeout=30)
    assert (rec["decision"], rec["peer"], rec["login"]) == ("allow", PHONE_V4, ALICE)
    pages = [
        r for r in by_identity.since(mark) if r["event"] == "decision" and not r.get("websocket")
    ]
    assert pages and all(r["decision"] == "allow" for r in pages)

    # The browser makes its own device key, so the gateway asks to pair this browser; the
    # request carries the phone's address and the browser's Origin, through clawgate.
    line = _wait_log(identity_gateway, ui + r".*pairing required", before + 1, timeout=30)[-1]
    assert f"fwd={PHONE_V4} " in line and f"host={GW_V4}:{IDENTITY_PORT} " in line
    request_id = re.search(r"requestId: ([0-9a-f-]{36})", line).group(1)  # type: ignore[union-attr]
    await _poll(lambda: _has_text(chromium, "Approve this browser"), 30, "the pairing page")
    shot = await chromium.screenshot(artifact_path("control-ui-pairing.png"))
    print(f"\nscreenshot: {shot}")

    # The operator approves on the gateway host; the page connects by itself.
    before_ok = len(_log_lines(identity_gateway, r"^webchat connected "))
    proc = identity_gateway.cli(
        "devices", "approve", request_id, *identity_gateway.auth_args(), netns=tailnet.ns("gw")
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = _wait_log(identity_gateway, r"^webchat connected ", before_ok + 1, timeout=45)[-1]
    assert "openclaw-control-ui" in line

    # Connected: the settings view shows what it loaded over that WebSocket (the gateway's
    # version and its model setup), instead of the pairing page or loading skeletons.
    async def connected() -> bool:
        text = await chromium.text()
        return "Model Setup" in text and "2026.9.6" in text and "Approve this" not in text

    await _poll(connected, 30, "the connected UI")
    shot = await chromium.screenshot(artifact_path("control-ui.png"))
    print(f"screenshot: {shot}")
    closes = [r for r in by_identity.since(mark) if r["event"] == "close"]
    assert all(r["peer"] == PHONE_V4 for r in closes)


async def _has_text(browser: Chromium, needle: str) -> bool:
    return needle in await browser.text()


# ------------------------------------------------------------------ config/openclaw.gateway.json

GATEWAY_CONFIG_FILE = Path(__file__).resolve().parents[2] / "config" / "openclaw.gateway.json"
FILE_GW_PORT = 18989
FILE_CG_PORT = 18798


class FileConfigGateway(OpenClawGateway):
    """The real gateway run with config/openclaw.gateway.json as shipped; only the port
    (shared namespace) and the test isolation keys (log file, no mDNS/update checks) differ."""

    def build_config(self) -> dict[str, Any]:
        config: dict[str, Any] = json.loads(GATEWAY_CONFIG_FILE.read_text())
        base = super().build_config()
        config["gateway"]["port"] = self.port
        for key in ("logging", "discovery", "update", "models"):
            config.setdefault(key, base[key])
        return config


@pytest.mark.slow
async def test_shipped_gateway_config_is_accepted_and_works_behind_clawgate(
    tailnet: Tailnet, identity_gateway: OpenClawGateway, fake_tailscaled: FakeTailscaledProcess
) -> None:
    # Unknown keys are fatal to the real gateway: starting it is the schema check.
    gw = FileConfigGateway(
        netns=tailnet.ns("gw"), port=FILE_GW_PORT, install=identity_gateway.install
    )
    await asyncio.to_thread(gw.start)
    cg = None
    try:
        cg = Clawgate(
            tailnet,
            "file-config",
            _identity_config(gw, fake_tailscaled),
            port=FILE_CG_PORT,
            admin_port=18799,
        )
        await asyncio.to_thread(cg.start)
        async with await _connect(tailnet, "phone", FILE_CG_PORT, client=CLI_CLIENT) as c:
            assert c.hello["auth"]["method"] == "trusted-proxy"
            assert sorted(c.scopes) == sorted(ALICE_SCOPES)
        with pytest.raises(HandshakeError) as info:
            await (await _connect(tailnet, "ci", FILE_CG_PORT, client=CLI_CLIENT))
        assert info.value.detail_code == "DEVICE_IDENTITY_REQUIRED"
    finally:
        if cg is not None:
            await asyncio.to_thread(cg.stop)
        await asyncio.to_thread(gw.stop)
