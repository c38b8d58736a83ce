"""The gateway's token checked at the edge, in the client's first WebSocket frame.

Some clients (the Control UI, the mobile apps) carry only the gateway's own token, inside
the ``connect`` request that is their first frame. In that mode clawgate forwards the
upgrade, then holds the client's bytes until that frame is complete, checks
``params.auth.token`` (or ``params.auth.password``) against the gateway token in constant
time, and only then releases the held bytes and becomes a plain splice. Anything else (a
wrong token, a fragmented, binary, oversized or late frame) ends with close 1008, and the
gateway never receives a byte of the client's frames.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
from typing import TYPE_CHECKING, Any

from .core.tokens import digest
from .core.wsframe import close_frame, parse_client_frame
from .front import CLOSING

if TYPE_CHECKING:
    from .front import ClientConnection
    from .server import Runtime

__all__ = ["FirstFrameGate", "make_gate_factory"]

# How long a refused client may keep sending (read and dropped) after our close frame.
LINGER_SECONDS = 2.0


class FirstFrameGate:
    __slots__ = ("conn", "buf", "timer", "limit", "done", "linger")

    def __init__(self, conn: ClientConnection, limit: int, timeout: float) -> None:
        self.conn = conn
        self.buf = b""
        self.limit = limit
        self.done = False
        self.linger: asyncio.TimerHandle | None = None
        self.timer = conn.rt.loop.call_later(timeout, self._timeout)

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self.buf += data
        status, payload, end = parse_client_frame(self.buf, self.limit)
        if status == "more":
            if len(self.buf) > self.limit + 14:
                self._refuse("first frame too large")
            return
        if status != "ok" or payload is None:
            self._refuse(status)
            return
        why = self._check(payload)
        if why is not None:
            self._refuse(why)
            return
        self.done = True
        self.timer.cancel()
        held, self.buf = self.buf, b""
        self.conn.rt.log.write({"event": "gateway_token", "conn": self.conn.conn_id,
                                "peer": self.conn.peer_ip, "result": "ok"})
        self.conn.gate_passed(held)

    def _check(self, payload: bytes) -> str | None:
        try:
            msg: Any = json.loads(payload)
        except (UnicodeError, ValueError):
            return "first frame is not JSON"
        if not isinstance(msg, dict) or msg.get("type") != "req" or msg.get("method") != \
                "connect":
            return "first frame must be the connect request"
        params = msg.get("params")
        auth = params.get("auth") if isinstance(params, dict) else None
        secret = None
        if isinstance(auth, dict):
            for key in ("token", "password"):
                value = auth.get(key)
                if isinstance(value, str) and value:
                    secret = value
                    break
        if secret is None:
            return "connect request carries no gateway token"
        # The token in force now (a reload may have rotated or removed it meanwhile).
        expected = self.conn.rt.authz.gateway_token_digest
        presented = digest(secret)
        if expected is None or not hmac.compare_digest(presented, expected):
            return "gateway token mismatch"
        # Bind the tunnel to this secret: a reload that rotates it ends the tunnel (1008).
        grant = self.conn.grant
        if grant is not None and grant.credential is not None:
            self.conn.grant = dataclasses.replace(
                grant, credential=dataclasses.replace(grant.credential, binding=presented))
        return None

    def _refuse(self, reason: str) -> None:
        self.done = True
        self.timer.cancel()
        self.buf = b""
        conn = self.conn
        conn.rt.metrics.refused["gateway_token"] += 1
        conn.rt.log.write({"event": "gateway_token", "conn": conn.conn_id,
                           "peer": conn.peer_ip, "result": "refused", "reason": reason})
        conn.rt.note_denied(conn, 401)
        conn.close_reason = reason
        # From here on the client's bytes are read and dropped (front: CLOSING).
        conn.state = CLOSING
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
                        LINGER_SECONDS, conn.end_session, 1008, reason)
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


def make_gate_factory(rt: Runtime) -> Any:
    def factory(conn: ClientConnection) -> FirstFrameGate:
        # Always a gate for a gated grant: should a reload have removed the gateway token
        # since the decision, the gate refuses (fail closed), it never splices unchecked.
        g = rt.cfg.gateway_token
        return FirstFrameGate(conn, g.max_first_frame, g.first_frame_timeout)

    return factory
