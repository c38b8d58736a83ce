"""A minimal Python client for the OpenClaw gateway's WebSocket handshake (protocol 4).

It does what the real clients do on the wire: read `connect.challenge`, send
`{"type":"req","id":…,"method":"connect","params":{…}}`, read the `res` (hello-ok or an
error), then optionally call methods. No device key: use it for token/password auth and for
the trusted-proxy identity mode, where an allowed user gets hello-ok without a device and the
session scopes are its `gateway.auth.identityScopes` (a Control UI client id additionally
needs an allowed `Origin`). Unlike the CLI it can send any headers and client identity.
Params schema: ConnectParams in the shipped dist (see docs/openclaw-notes.md).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

__all__ = [
    "CONTROL_UI_CLIENT",
    "CLI_CLIENT",
    "PROTOCOL_VERSION",
    "GatewayClient",
    "HandshakeError",
    "connect_params",
]

PROTOCOL_VERSION = 4
# What the shipped Control UI sends as `client` (control-ui-core: id, version, platform from
# navigator.platform or "web", mode "webchat").
CONTROL_UI_CLIENT: Mapping[str, str] = {
    "id": "openclaw-control-ui",
    "version": "2026.9.6",
    "platform": "web",
    "mode": "webchat",
}
CLI_CLIENT: Mapping[str, str] = {
    "id": "cli",
    "version": "2026.9.6",
    "platform": "linux",
    "mode": "cli",
}


class HandshakeError(Exception):
    """The gateway refused `connect` (error res and/or close) or closed before answering."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Mapping[str, Any] | None = None,
        close_code: int | None = None,
        close_reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.details = dict(details or {})
        self.close_code = close_code
        self.close_reason = close_reason

    @property
    def detail_code(self) -> str | None:
        value = self.details.get("code")
        return value if isinstance(value, str) else None


def connect_params(
    *,
    client: Mapping[str, str] = CONTROL_UI_CLIENT,
    role: str = "operator",
    scopes: Sequence[str] = ("operator.read", "operator.write"),
    token: str | None = None,
    password: str | None = None,
    caps: Sequence[str] = (),
) -> dict[str, Any]:
    """The `connect` params; only minProtocol, maxProtocol and client are required."""
    params: dict[str, Any] = {
        "minProtocol": PROTOCOL_VERSION,
        "maxProtocol": PROTOCOL_VERSION,
        "client": dict(client),
        "role": role,
        "scopes": list(scopes),
        "caps": list(caps),
        "locale": "en-US",
        "userAgent": "clawgate-tests/gwclient",
    }
    auth = {k: v for k, v in (("token", token), ("password", password)) if v is not None}
    if auth:
        params["auth"] = auth
    return params


@dataclass
class GatewayClient:
    """`async with GatewayClient.connect(url, ...) as gw:` → `gw.hello`, `await gw.call(m)`."""

    ws: ClientConnection
    challenge: dict[str, Any]
    hello: dict[str, Any]

    @property
    def scopes(self) -> list[str]:
        auth = self.hello.get("auth") or {}
        return list(auth.get("scopes") or [])

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        origin: str | None = None,
        params: Mapping[str, Any] | None = None,
        timeout: float = 15.0,
        sock: socket.socket | None = None,
        **param_kwargs: Any,
    ) -> _Connector:
        """Open, handshake, return the client. `params` overrides `connect_params(**kw)`.
        `sock`: an already connected socket (e.g. `await connect_in(ns, host, port)`)."""
        return _Connector(
            url,
            headers=dict(headers or {}),
            origin=origin,
            params=dict(params) if params is not None else connect_params(**param_kwargs),
            timeout=timeout,
            sock=sock,
        )

    async def call(
        self, method: str, params: Mapping[str, Any] | None = None, timeout: float = 15.0
    ) -> Any:
        """Send one request; return its payload or raise HandshakeError-like RuntimeError."""
        req_id = str(uuid.uuid4())
        await self.ws.send(
            json.dumps(
                {"type": "req", "id": req_id, "method": method, "params": dict(params or {})}
            )
        )
        async with asyncio.timeout(timeout):
            while True:
                frame = json.loads(await self.ws.recv())
                if frame.get("type") == "res" and frame.get("id") == req_id:
                    if frame.get("ok"):
                        return frame.get("payload")
                    error = frame.get("error") or {}
                    raise RuntimeError(f"{method}: {error.get('code')}: {error.get('message')}")

    async def close(self) -> None:
        await self.ws.close()


class _Connector:
    """Awaitable and async context manager around the handshake."""

    _ids = itertools.count(1)

    def __init__(
        self,
        url: str,
        *,
        headers: dict[str, str],
        origin: str | None,
        params: dict[str, Any],
        timeout: float,
        sock: socket.socket | None = None,
    ) -> None:
        self.url, self.headers, self.origin = url, headers, origin
        self.params, self.timeout, self.sock = params, timeout, sock
        self.client: GatewayClient | None = None

    async def _open(self) -> GatewayClient:
        ws = await websockets.connect(
            self.url,
            additional_headers=self.headers,
            origin=self.origin,  # type: ignore[arg-type]
            max_size=None,
            compression=None,  # the gateway negotiates no permessage-deflate anyway
            open_timeout=self.timeout,
            sock=self.sock,
            proxy=None,
        )
        try:
            async with asyncio.timeout(self.timeout):
                challenge = json.loads(await ws.recv())
                if challenge.get("event") != "connect.challenge":
                    raise HandshakeError(f"first frame is not connect.challenge: {challenge!r}")
                req_id = f"connect-{next(self._ids)}"
                await ws.send(
                    json.dumps(
                        {"type": "req", "id": req_id, "method": "connect", "params": self.params}
                    )
                )
                while True:
                    frame = json.loads(await ws.recv())
                    if frame.get("type") != "res" or frame.get("id") != req_id:
                        continue  # events (e.g. tick) may interleave
                    if frame.get("ok"):
                        payload = frame.get("payload") or {}
                        return GatewayClient(ws, challenge, payload)
                    error = frame.get("error") or {}
                    raise HandshakeError(
                        str(error.get("message")),
                        code=error.get("code"),
                        details=error.get("details") or {},
                        close_code=ws.close_code,
                        close_reason=ws.close_reason,
                    )
        except websockets.ConnectionClosed as exc:
            await ws.close()
            rcvd = exc.rcvd
            raise HandshakeError(
                f"closed during handshake: {rcvd.code if rcvd else None} "
                f"{rcvd.reason if rcvd else ''}",
                close_code=rcvd.code if rcvd else None,
                close_reason=rcvd.reason if rcvd else None,
            ) from exc
        except BaseException:
            await ws.close()
            raise

    def __await__(self) -> Any:
        return self._open().__await__()

    async def __aenter__(self) -> GatewayClient:
        self.client = await self._open()
        return self.client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.client is not None:
            await self.client.close()
