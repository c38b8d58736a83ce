"""The gateway's token checked at the edge, in the client's first WebSocket frame.

Some clients (the Control UI, the mobile apps) carry only the gateway's own token, inside
the ``connect`` request that is their first frame. In that mode clawgate forwards the
upgrade, then holds the client's bytes until that frame is complete, checks its
credentials and only then releases the held bytes and becomes a plain splice: the shared
secret (``params.auth.token`` or ``.password``) in constant time, and a paired device's
``deviceToken`` or a setup code's ``bootstrapToken`` against the gateway's own pairing
store (``proxy.gateway_store``; the decision is ``proxy.core.connect_auth``). Anything
else (a wrong, revoked or foreign token, a fragmented, binary, oversized or late frame)
ends with close 1008, and the gateway never receives a byte of the client's frames.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from .core.connect_auth import (
    ConnectAuth,
    StoreSnapshot,
    StoreUnavailable,
    decide,
    needs_store,
    parse_connect,
)
from .core.exchange import CLOSING
from .core.wsframe import close_frame, parse_client_frame
from .front import ClientConnection
from .gateway_store import DB_RELATIVE, GatewayStore, store_version
from .runtime import Connection, Runtime

__all__ = ["FirstFrameGate", "make_gate_factory"]

log = logging.getLogger("clawgate")

# How long a refused client may keep sending (read and dropped) after our close frame.
LINGER_SECONDS = 2.0


class FirstFrameGate:
    __slots__ = ("conn", "buf", "timer", "limit", "done", "linger", "store", "waiting")

    def __init__(
        self, conn: ClientConnection, limit: int, timeout: float, store: GatewayStore | None = None
    ) -> None:
        self.conn = conn
        self.buf = b""
        self.limit = limit
        self.store = store
        self.done = False
        self.waiting = False  # the pairing store is being re-read for this frame
        self.linger: asyncio.TimerHandle | None = None
        self.timer = conn.rt.loop.call_later(timeout, self._timeout)

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self.buf += data
        if self.waiting:
            # Held with the first frame; bounded while the store is read (milliseconds).
            if len(self.buf) > 2 * self.limit + 14:
                self._refuse("first frame too large")
            return
        status, payload, end = parse_client_frame(self.buf, self.limit)
        if status == "more":
            if len(self.buf) > self.limit + 14:
                self._refuse("first frame too large")
            return
        if status != "ok" or payload is None:
            self._refuse(status)
            return
        auth = parse_connect(payload)
        if isinstance(auth, str):
            self._refuse(auth)
            return
        snap: StoreSnapshot | StoreUnavailable | None = None
        # The token in force now (a reload may have rotated or removed it meanwhile).
        if self.store is not None and needs_store(auth, self.conn.rt.authz.gateway_token_digest):
            snap = self.store.current()
            if snap is None:
                self.waiting = True
                self.conn.rt.spawn(self._decide_after_read(auth), "gate-store-read")
                return
        self._decide(auth, snap)

    async def _decide_after_read(self, auth: ConnectAuth) -> None:
        assert self.store is not None
        snap = await self.store.refresh()
        if self.done:
            return  # timed out, refused or closed meanwhile
        self.waiting = False
        self._decide(auth, snap)

    def _decide(self, auth: ConnectAuth, snap: StoreSnapshot | StoreUnavailable | None) -> None:
        authz = self.conn.rt.authz
        verdict = decide(
            auth,
            authz.gateway_token_digest,
            snap,
            now_ms=int(time.time() * 1000),
            generations=authz.gateway_generations,
        )
        if not verdict.admit:
            self._refuse(verdict.reason)
            return
        grant = self.conn.grant
        if grant is not None and grant.credential is not None:
            if verdict.binding is not None:
                # Bind the tunnel to this secret: a reload that rotates it ends it (1008).
                cred = dataclasses.replace(grant.credential, binding=verdict.binding)
            else:
                # A device's own token: logs name the device; not tied to the gateway token.
                cred = dataclasses.replace(
                    grant.credential, name=f"{verdict.method} {(verdict.device_id or '')[:16]}"
                )
            self.conn.grant = dataclasses.replace(grant, credential=cred)
        self.done = True
        self.timer.cancel()
        held, self.buf = self.buf, b""
        rec: dict[str, Any] = {
            "event": "gateway_token",
            "conn": self.conn.conn_id,
            "peer": self.conn.peer_ip,
            "result": "ok",
            "method": verdict.method,
        }
        if verdict.device_id is not None:
            rec["device"] = verdict.device_id
        self.conn.rt.log.write(rec)
        self.conn.gate_passed(held)

    def _refuse(self, reason: str) -> None:
        self.done = True
        self.timer.cancel()
        self.buf = b""
        conn = self.conn
        conn.rt.metrics.refused["gateway_token"] += 1
        conn.rt.log.write(
            {
                "event": "gateway_token",
                "conn": conn.conn_id,
                "peer": conn.peer_ip,
                "result": "refused",
                "reason": reason,
            }
        )
        conn.rt.note_denied(conn, 401)
        conn.close_reason = reason
        # From here on the client's bytes are read and dropped (front: CLOSING).
        conn.ex.state = CLOSING
        up_t = conn.up_t
        if up_t is not None:
            # The gateway never sees a byte from this client: just drop our side.
            up_t.abort()
        t = conn.transport
        if t is not None and not conn.closed:
            # Our close frame is only clean at a frame boundary of the gateway's stream.
            if conn.up is None or conn.up.frames.at_boundary:
                t.write(close_frame(1008, reason[:100]))
                if t.can_write_eof():
                    # Lingering close: a close() while the client's frame is still in
                    # flight answers it with a RST, which discards our close frame. Send
                    # FIN, drain the client until it closes, give up after LINGER_SECONDS.
                    t.write_eof()
                    self.linger = conn.rt.loop.call_later(
                        LINGER_SECONDS, conn.end_session, 1008, reason
                    )
                    return
            t.close()

    def _timeout(self) -> None:
        if not self.done:
            self._refuse("no connect request within the time limit")

    def cancel(self) -> None:
        self.done = True
        self.timer.cancel()
        if self.linger is not None:
            self.linger.cancel()


def make_gate_factory(rt: Runtime) -> Callable[[Connection], FirstFrameGate]:
    stores: dict[str, GatewayStore] = {}  # one per state dir: a reload keeps its cache
    g = rt.cfg.gateway_token
    if rt.authz.gateway_token_digest is not None and g.state_dir is not None:
        # Say it at startup, not only when the first paired device is refused.
        try:
            store_version(os.path.join(g.state_dir, DB_RELATIVE))
        except OSError as exc:
            log.warning(
                "gatewayToken.stateDir %s: the gateway's pairing store cannot be read "
                "(%s): paired devices and setup codes will be refused at the edge",
                g.state_dir,
                exc.strerror or exc,
            )

    def factory(conn: Connection) -> FirstFrameGate:
        # The registry knows connections by a Protocol; the gate drives a ClientConnection.
        if not isinstance(conn, ClientConnection):
            raise TypeError(f"a first-frame gate needs a ClientConnection, not {conn!r}")
        # Always a gate for a gated grant: should a reload have removed the gateway token
        # since the decision, the gate refuses (fail closed), it never splices unchecked.
        g = rt.cfg.gateway_token
        store = None
        if g.state_dir is not None:
            store = stores.get(g.state_dir)
            if store is None:
                stores.clear()
                store = stores[g.state_dir] = GatewayStore(g.state_dir)
        return FirstFrameGate(conn, g.max_first_frame, g.first_frame_timeout, store)

    return factory
