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

from .access.tokens import digest
from .front import CLOSING
from .relay import close_frame

if TYPE_CHECKING:
    from .front import ClientConnection
    from .server import Runtime

__all__ = ["FirstFrameGate", "make_gate_factory", "parse_client_frame"]

# How long a refused client may keep sending (read and dropped) after our close frame.
LINGER_SECONDS = 2.0


def parse_client_frame(buf: bytes, limit: int) -> tuple[str, bytes | None, int]:
    """Parse one masked client frame at the start of ``buf``.

    Returns (status, payload, frame_length): status "more" (need more bytes), "ok", or a
    refusal reason. Only a single unfragmented masked text frame is acceptable.
    """
    if len(buf) < 2:
        return "more", None, 0
    b0, b1 = buf[0], buf[1]
    if b0 & 0x70:
        return "reserved bits set", None, 0
    opcode = b0 & 0x0F
    if not b0 & 0x80 or opcode == 0:
        return "first frame must not be fragmented", None, 0
    if opcode != 0x1:
        return "first frame must be a text frame", None, 0
    if not b1 & 0x80:
        return "client frames must be masked", None, 0
    ln = b1 & 0x7F
    pos = 2
    if ln == 126:
        if len(buf) < 4:
            return "more", None, 0
        ln = int.from_bytes(buf[2:4], "big")
        pos = 4
    elif ln == 127:
        if len(buf) < 10:
            return "more", None, 0
        ln = int.from_bytes(buf[2:10], "big")
        pos = 10
    if ln > limit:
        return "first frame too large", None, 0
    end = pos + 4 + ln
    if len(buf) < end:
        return "more", None, 0
    mask = buf[pos:pos + 4]
    masked = buf[pos + 4:end]
    # Unmask with one big-int XOR: fast for the <= 64 KiB we accept.
    key = (mask * (ln // 4 + 1))[:ln]
    payload = (int.from_bytes(masked, "big") ^ int.from_bytes(key, "big")).to_bytes(ln, "big")
    return "ok", payload, end


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
