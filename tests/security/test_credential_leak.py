"""clawgate's own credentials never reach the gateway; the gateway's own still do.

A request may carry several credentials: clawgate's session cookie, a clawgate token
(Bearer or Basic), the gateway's own token. Whichever one the decision used, every clawgate
credential that was presented is removed from every line that carries it: the session
cookie from every Cookie line, a clawgate token from Authorization. The gateway's own token
(and a credential clawgate does not know, when clawgate does not require one) passes. Two
Authorization lines are refused: parsers disagree on which one counts (Node keeps the first).
"""

from __future__ import annotations

import base64
from pathlib import Path

from tests.fakes.fake_gateway import FakeGateway
from tests.netns import GW_V4, Tailnet
from tests.support import (
    HOST,
    PORT,
    plain_config,
    raw_send,
    running,
    status_of,
)
from tests.util import build_request, exchange

GW_SECRET = "gateway-secret-0123456789abcdef-0123456789"  # the gateway's own token (>= 32 B)
COOKIE = "clawgate_session"


async def login(tailnet: Tailnet, token: str) -> str:
    resp = await exchange(
        tailnet.ns("phone"),
        GW_V4,
        PORT,
        build_request(
            "POST",
            "/__clawgate/login",
            [("Content-Type", "application/x-www-form-urlencoded")],
            f"token={token}&next=/".encode(),
        ),
    )
    assert resp.status == 303, resp.raw
    cookie = (resp.header("Set-Cookie") or b"").decode()
    name, _, sid = cookie.split(";")[0].partition("=")
    assert name == COOKIE
    return sid


async def test_no_clawgate_credential_reaches_the_gateway(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    secret = tmp_path / "gw.token"
    secret.write_text(GW_SECRET + "\n")
    secret.chmod(0o600)
    cfg = plain_config(fake_gateway)
    cfg["gatewayToken"] = {"file": str(secret)}
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        token = cg.tokens["phone"]
        sid = await login(tailnet, token)
        basic = base64.b64encode(f"me:{token}".encode()).decode()
        cases: dict[str, tuple[list[str], list[str], list[str]]] = {
            # label: (client lines, Authorization the gateway must see, Cookie lines it sees)
            "session + clawgate bearer": (
                [f"Cookie: {COOKIE}={sid}", f"Authorization: Bearer {token}"],
                [],
                [],
            ),
            "session + clawgate basic": (
                [f"Cookie: a=1; {COOKIE}={sid}", f"Authorization: Basic {basic}"],
                [],
                ["Cookie: a=1"],
            ),
            "session in a second Cookie line": (
                ["Cookie: theme=dark", f"Cookie: {COOKIE}={sid}; lang=en"],
                [],
                ["Cookie: theme=dark", "Cookie: lang=en"],
            ),
            "session in a second line + bearer": (
                ["Cookie: theme=dark", f"Cookie: {COOKIE}={sid}", f"Authorization: Bearer {token}"],
                [],
                ["Cookie: theme=dark"],
            ),
            "bearer + stale session cookie": (
                [f"Authorization: Bearer {token}", f"Cookie: x=1; {COOKIE}=stale"],
                [],
                ["Cookie: x=1"],
            ),
            "session + gateway token": (
                [f"Cookie: {COOKIE}={sid}", f"Authorization: Bearer {GW_SECRET}"],
                [f"Bearer {GW_SECRET}"],
                [],
            ),
            "gateway token + cookie of ours": (
                [f"Authorization: Bearer {GW_SECRET}", f"Cookie: {COOKIE}=whatever; b=2"],
                [f"Bearer {GW_SECRET}"],
                ["Cookie: b=2"],
            ),
        }
        problems = []
        for label, (lines, want_auth, want_cookies) in cases.items():
            fake_gateway.clear()
            raw = (
                "\r\n".join(["GET /headers HTTP/1.1", f"Host: {HOST}", *lines, "Connection: close"])
                + "\r\n\r\n"
            ).encode()
            resp = await raw_send(tailnet, "phone", raw)
            if status_of(resp) != 200:
                problems.append(f"{label}: {resp[:80]!r}")
                continue
            (rec,) = fake_gateway.requests
            auth = rec.header_all("Authorization")
            cookies = [f"Cookie: {v}" for v in rec.header_all("Cookie")]
            if auth != want_auth or cookies != want_cookies:
                problems.append(f"{label}: gateway saw Authorization={auth} {cookies}")
            for _, value in rec.headers:
                if token in value or sid in value:
                    problems.append(f"{label}: a clawgate credential in {value!r}")
        assert problems == []


async def test_two_authorization_lines_are_refused(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(tailnet, tmp_path / "cg", plain_config(fake_gateway)) as cg:
        token = cg.tokens["phone"]
        for second in (f"Bearer {token}", "Bearer other", f"Basic {token}"):
            resp = await raw_send(
                tailnet,
                "phone",
                (
                    f"GET /headers HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n"
                    f"authorization: {second}\r\nConnection: close\r\n\r\n"
                ).encode(),
            )
            assert status_of(resp) == 400, resp[:120]
            assert b"more than one Authorization" in resp
        assert fake_gateway.requests == []
