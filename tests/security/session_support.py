"""Pieces the session and lockout attacks share: a browser login, a WebSocket held with
its cookie, the first-frame connect request, and which worker holds a connection."""

from __future__ import annotations

import json
import re
import subprocess

from websockets.asyncio.client import ClientConnection

from tests.functional.hardening_support import PORT, ws_open
from tests.netns import GW_V4, Tailnet
from tests.util import Response, build_request, exchange

FORM = ("Content-Type", "application/x-www-form-urlencoded")


async def login(tailnet: Tailnet, role: str, token: str) -> Response:
    return await exchange(tailnet.ns(role), GW_V4, PORT, build_request(
        "POST", "/__clawgate/login", [FORM], f"token={token}&next=/".encode()))


async def login_cookie(tailnet: Tailnet, role: str, token: str) -> str:
    """Log in with ``token``; the ``name=value`` of the session cookie."""
    resp = await login(tailnet, role, token)
    assert resp.status == 303, resp.raw
    return (resp.header("Set-Cookie") or b"").split(b";", 1)[0].decode()


async def with_cookie(tailnet: Tailnet, role: str, cookie: str, path: str = "/echo"
                      ) -> Response:
    return await exchange(tailnet.ns(role), GW_V4, PORT,
                          build_request("GET", path, [("Cookie", cookie)]))


async def ws_with_cookie(tailnet: Tailnet, role: str, cookie: str) -> ClientConnection:
    return await ws_open(tailnet, role, headers={"Cookie": cookie})


async def logout(tailnet: Tailnet, role: str, cookie: str) -> Response:
    return await exchange(tailnet.ns(role), GW_V4, PORT, build_request(
        "POST", "/__clawgate/logout", [("Cookie", cookie)]))


def connect_frame(token: str) -> str:
    return json.dumps({"type": "req", "id": "c1", "method": "connect",
                       "params": {"minProtocol": 4, "maxProtocol": 4,
                                  "client": {"id": "cli", "version": "1",
                                             "platform": "linux", "mode": "cli"},
                                  "auth": {"token": token}}})


def pids_holding(ns: str, port: int = PORT) -> list[int]:
    """The pid of the process behind each established connection to ``port`` in ns."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htnp", "state", "established",
                          f"( sport = :{port} )"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    return [int(m) for m in re.findall(r"pid=(\d+)", out)]
