"""The Control UI of the real gateway in the real Chromium, over HTTPS through clawgate.

clawgate serves `https://web01.tail4c3a9.ts.net:18743/` on the tailnet with the certificate
the (fake) tailscaled hands out, issued by a throwaway CA that the browser's NSS database
trusts as a real CA; Chromium on the phone resolves the name to 100.64.0.1 by
`--host-resolver-rules`. The page is a secure context, so the UI signs with WebCrypto; it
signs in at clawgate's login page, hands the gateway its token, pairs its device key once,
and connects. The token-mode gateway lists the https origin in controlUi.allowedOrigins.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    ALICE,
    GW_TOKEN,
    Clawgate,
    FakeTailscaledProcess,
    artifact_path,
    unavailable,
)
from tests.e2e.openclaw import OpenClawGateway, OpenClawInstall
from tests.e2e.test_openclaw_identity import CDP_PORT, CHROMIUM, Chromium
from tests.netns import GW_V4, PHONE_V4, Tailnet, connect_in
from tests.tlsutil import CA, DOMAIN, Leaf, make_ca, make_leaf

HTTPS_PORT = 18743  # clawgate, TLS from tailscaled, tokens + identity ("both")
ADMIN_PORT = 18744
GW_PORT = 18999  # this module's own token-mode gateway (gw namespace loopback)
ORIGIN = f"https://{DOMAIN}:{HTTPS_PORT}"
CERTUTIL = shutil.which("certutil") or "/usr/bin/certutil"
UI_VERSION = "2026.9.6"


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def test_ca() -> tuple[CA, Leaf]:
    ca = make_ca("clawgate e2e CA")
    return ca, make_leaf(ca, (DOMAIN,))


def _post_unix(sock_path: Path, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST JSON to the fake tailscaled's control surface on its unix socket."""
    conn = http.client.HTTPConnection("local-tailscaled.sock", timeout=5)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(sock_path))
    conn.sock = s
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, (resp.status, data)
        return dict(json.loads(data))
    finally:
        conn.close()


@pytest.fixture(scope="module")
def https_tailscaled(test_ca: tuple[CA, Leaf]) -> Iterator[FakeTailscaledProcess]:
    """A tailscaled of this module's own: it serves the test CA's leaf for DOMAIN."""
    _, leaf = test_ca
    tsd = FakeTailscaledProcess().start()
    try:
        got = _post_unix(
            tsd.socket,
            "/fake/cert",
            {
                "domain": DOMAIN,
                "key_pem": leaf.key_pem.decode(),
                "cert_pem": leaf.cert_pem.decode(),
            },
        )
        assert DOMAIN in got["cert_domains"]
        yield tsd
    finally:
        tsd.stop()


@pytest.fixture(scope="module")
def https_gateway(tailnet: Tailnet, openclaw_install: OpenClawInstall) -> Iterator[OpenClawGateway]:
    # Not the session token gateway: that one has no https origin, and this module leaves a
    # paired browser device behind.
    gw = OpenClawGateway(
        auth="token",
        token=GW_TOKEN,
        netns=tailnet.ns("gw"),
        port=GW_PORT,
        install=openclaw_install,
        extra_config={"gateway.controlUi.allowedOrigins": [ORIGIN]},
    )
    with gw:
        yield gw


@pytest.fixture(scope="module")
def https_clawgate(
    tailnet: Tailnet, https_gateway: OpenClawGateway, https_tailscaled: FakeTailscaledProcess
) -> Iterator[Clawgate]:
    # The fake's first CertDomains entry is its own default node name, so name ours.
    cg = Clawgate(
        tailnet,
        "https",
        {
            "upstream": f"http://127.0.0.1:{https_gateway.port}",
            "tailscale": {"socket": str(https_tailscaled.socket)},
            "tls": {"mode": "tailscale", "domain": DOMAIN},
        },
        port=HTTPS_PORT,
        admin_port=ADMIN_PORT,
    ).start()
    try:
        yield cg
    finally:
        cg.stop()


class TrustingChromium(Chromium):
    """Chromium with a fresh HOME whose NSS database trusts the test CA (as an admin would
    add a private CA), and the tailnet name mapped to clawgate's address."""

    def __init__(self, tailnet: Tailnet, ns: str, ca: CA) -> None:
        super().__init__(tailnet, ns)
        self.home = self.profile / "home"
        nssdb = self.home / ".pki" / "nssdb"
        nssdb.mkdir(parents=True)
        ca_pem = self.profile / "ca.pem"
        ca_pem.write_bytes(ca.cert_pem)
        for args in (
            ["-N", "--empty-password"],
            ["-A", "-t", "C,,", "-n", "clawgate-test", "-i", str(ca_pem)],
        ):
            proc = subprocess.run(
                [CERTUTIL, "-d", f"sql:{nssdb}", *args],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr

    async def start(self) -> TrustingChromium:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "TMPDIR": str(self.profile),
        }
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
                f"--user-data-dir={self.profile / 'data'}",
                f"--host-resolver-rules=MAP {DOMAIN} {GW_V4}",
                f"--remote-debugging-port={CDP_PORT}",
                "--remote-debugging-address=127.0.0.1",
                "--window-size=1280,900",
                "about:blank",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.profile / "chromium.log", "wb"),  # noqa: SIM115
            start_new_session=True,
        )  # stop() kills the whole group
        from websockets.asyncio.client import connect

        targets = await self._targets()
        page = next(t for t in targets if t["type"] == "page")
        sock = await connect_in(self.tailnet.ns(self.ns), "127.0.0.1", CDP_PORT)
        self.ws = await connect(
            page["webSocketDebuggerUrl"], sock=sock, proxy=None, max_size=None, open_timeout=10
        )
        return self

    async def js(self, expression: str) -> Any:
        res = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in res:
            raise AssertionError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")


@pytest.fixture
async def browser(tailnet: Tailnet, test_ca: tuple[CA, Leaf]) -> AsyncIterator[TrustingChromium]:
    if not Path(CHROMIUM).exists():
        unavailable("chromium is not installed (apt-get install chromium)")
    if not Path(CERTUTIL).exists():
        unavailable("certutil is not installed (apt-get install libnss3-tools)")
    b = TrustingChromium(tailnet, "phone", test_ca[0])
    try:
        yield await b.start()
    finally:
        await b.stop()


# ------------------------------------------------------------------ helpers


async def _poll(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def _gw_lines(gw: OpenClawGateway, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [m for m in gw.log_messages() if rx.search(m)]


async def _wait_gw(gw: OpenClawGateway, pattern: str, at_least: int, timeout: float) -> list[str]:
    async def found() -> list[str] | None:
        lines = _gw_lines(gw, pattern)
        return lines if len(lines) >= at_least else None

    try:
        result: list[str] = await _poll(found, timeout, f"gateway log {pattern!r}")
    except AssertionError:
        raise AssertionError(
            f"gateway log: no {pattern!r}; last: {gw.log_messages()[-6:]}"
        ) from None
    return result


async def _navigate(b: TrustingChromium, url: str) -> None:
    res = await b.call("Page.navigate", url=url)
    # A certificate the browser does not trust fails the navigation right here
    # (net::ERR_CERT_AUTHORITY_INVALID), instead of showing a page.
    assert "errorText" not in res, res


# ------------------------------------------------------------------ the test


@pytest.mark.slow
async def test_control_ui_over_https_connects_with_device_identity(
    tailnet: Tailnet,
    https_gateway: OpenClawGateway,
    https_clawgate: Clawgate,
    browser: TrustingChromium,
) -> None:
    gw, cg = https_gateway, https_clawgate
    mark = cg.mark()
    await browser.call("Page.enable")

    # 1. https://web01...:18743/ -> clawgate's login page, over a certificate the browser
    #    verified against the test CA, in a secure context.
    await _navigate(browser, f"{ORIGIN}/")
    await _poll(
        lambda: browser.js("!!document.querySelector('input[name=token]')"),
        20,
        "clawgate's login page",
    )
    page = await browser.js(
        "({origin: location.origin, secure: window.isSecureContext, subtle: typeof crypto.subtle})"
    )
    assert page == {"origin": ORIGIN, "secure": True, "subtle": "object"}

    # 2. Sign in with clawgate's token (form fill, as a person would paste it).
    token = json.dumps(cg.tokens["phone"])
    await browser.js(
        f"document.querySelector('input[name=token]').value = {token};"
        "document.querySelector('form').submit(); true"
    )
    await asyncio.to_thread(cg.wait_for, lambda r: r["event"] == "login", mark, 15)
    login = [r for r in cg.since(mark) if r["event"] == "login"]
    assert [(r["result"], r["token"], r["peer"]) for r in login] == [("ok", "phone", PHONE_V4)]
    cookies = (await browser.call("Network.getCookies", urls=[f"{ORIGIN}/"]))["cookies"]
    # clawgate's session cookie: Secure (so it never travels over plain HTTP) and HttpOnly.
    assert [(c["name"], c["secure"], c["httpOnly"]) for c in cookies] == [
        ("clawgate_session", True, True)
    ], cookies

    # 3. Hand the UI the gateway's token by URL fragment (it never reaches a server or a
    #    log), with a full load so the app reads it at boot.
    ui = (
        r"^closed before connect .*origin="
        + re.escape(ORIGIN)
        + r" .*host="
        + re.escape(f"{DOMAIN}:{HTTPS_PORT}")
        + r" .*pairing required"
    )
    before = len(_gw_lines(gw, ui))
    await _navigate(browser, "about:blank")
    await _navigate(browser, f"{ORIGIN}/#token={GW_TOKEN}")

    # 4. The WebSocket went through clawgate (TLS, the phone, its cookie and alice's
    #    identity) and the gateway asks to pair the browser's own device key.
    def ws_allowed(r: dict[str, Any]) -> bool:
        return r["event"] == "decision" and r.get("websocket") is True

    rec = await asyncio.to_thread(cg.wait_for, ws_allowed, mark, 30)
    assert (rec["decision"], rec["peer"], rec["token"], rec["login"]) == (
        "allow",
        PHONE_V4,
        "phone",
        ALICE,
    )
    line = (await _wait_gw(gw, ui, before + 1, timeout=30))[-1]
    assert f"fwd={PHONE_V4} " in line
    request_id = re.search(r"requestId: ([0-9a-f-]{36})", line).group(1)  # type: ignore[union-attr]
    listed = await asyncio.to_thread(
        gw.cli, "devices", "list", "--json", *gw.auth_args(), netns=tailnet.ns("gw")
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    pending = {p["requestId"]: p for p in json.loads(listed.stdout)["pending"]}
    device = pending[request_id]
    assert (device["clientId"], device["remoteIp"]) == ("openclaw-control-ui", PHONE_V4)
    await _poll(lambda: _has_text(browser, "Approve this browser"), 30, "the pairing page")
    await browser.screenshot(artifact_path("control-ui-https-pairing.png"))

    # 5. The operator approves on the gateway host; the page connects by itself.
    connected_rx = r"^webchat connected .*openclaw-control-ui"
    before_ok = len(_gw_lines(gw, connected_rx))
    approved = await asyncio.to_thread(
        gw.cli, "devices", "approve", request_id, *gw.auth_args(), netns=tailnet.ns("gw")
    )
    assert approved.returncode == 0, approved.stdout + approved.stderr
    await _wait_gw(gw, connected_rx, before_ok + 1, timeout=45)

    async def connected() -> bool:
        text = await browser.text()
        return "Model Setup" in text and UI_VERSION in text and "Approve this" not in text

    await _poll(connected, 30, "the connected UI")
    listed = await asyncio.to_thread(
        gw.cli, "devices", "list", "--json", *gw.auth_args(), netns=tailnet.ns("gw")
    )
    paired = json.loads(listed.stdout)["paired"]
    assert [
        (d["deviceId"], d["clientId"]) for d in paired if d["deviceId"] == device["deviceId"]
    ] == [(device["deviceId"], "openclaw-control-ui")]
    assert await browser.js("window.isSecureContext") is True
    shot = await browser.screenshot(artifact_path("control-ui-https.png"))
    print(f"\nscreenshot: {shot}")
    # Only the phone reached this clawgate: refused (401, the login page) until it signed
    # in, then every request and WebSocket passed with its token and alice's identity.
    # (A favicon request already on its way may still be refused just after the login.)
    decisions = [r for r in cg.since(mark) if r["event"] == "decision"]
    assert all(r["peer"] == PHONE_V4 for r in decisions)
    denied = [r for r in decisions if r["decision"] == "deny"]
    allowed = [r for r in decisions if r["decision"] == "allow"]
    assert denied and all(
        (r["status"], r["reason"], r["websocket"]) == (401, "token required", False) for r in denied
    )
    assert (
        decisions[0] in denied
        and len(allowed) > 10
        and all((r["reason"], r["token"]) == ("token+identity", "phone") for r in allowed)
    )


async def _has_text(b: TrustingChromium, needle: str) -> bool:
    return needle in await b.text()
