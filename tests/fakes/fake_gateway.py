"""A fake OpenClaw gateway: one real TCP port serving HTTP/1.1 and WebSocket, recording every head.

It reads each request head itself, byte for byte, before anything interprets it, so tests can
assert exactly what a proxy forwarded; WebSocket upgrades are then handed to the Sans-I/O
`websockets.server.ServerProtocol`. Run standalone with `python -m tests.fakes.fake_gateway`.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import json
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import SEND_EOF, State
from websockets.server import ServerProtocol

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "FakeGateway",
    "RecordedRequest",
    "big_body",
    "main",
]

# The real gateway's maxPayload is 25 MiB; a little headroom so a 25 MiB frame plus test slack
# passes, while anything absurd still gets 1009.
DEFAULT_MAX_MESSAGE = 26 * 1024 * 1024
HEAD_LIMIT = 64 * 1024
READ_SIZE = 1024 * 1024
CLOSE_TIMEOUT = 10.0

HEALTH_BODY = b'{"ok":true,"status":"live"}'
INDEX_HTML = (
    b'<!doctype html>\n<html><head><meta charset="utf-8"><title>OpenClaw Control</title>'
    b'</head>\n<body><div id="app">fake OpenClaw Control UI</div>'
    b"<script>/* opens ws://same-origin/ */</script></body></html>\n"
)
CHUNKS = (b"first chunk\n", b"second, a bit longer chunk\n", b"third\n")


def big_body(n: int) -> bytes:
    """The body of `GET /big?n=`: a repeating 0..255 pattern, so truncation or reordering shows."""
    pattern = bytes(range(256))
    return (pattern * (n // 256 + 1))[:n]


@dataclass
class RecordedRequest:
    """One request head as the gateway received it, plus what it made of it."""

    raw_head: bytes
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    peer: tuple[str, int]
    body: bytes = b""
    websocket: bool = False
    received_at: float = field(default_factory=time.time)

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def to_json(self) -> dict[str, Any]:
        return {
            "raw_head": self.raw_head.decode("latin-1"),
            "method": self.method,
            "target": self.target,
            "version": self.version,
            "headers": self.headers,
            "peer": list(self.peer),
            "body_len": len(self.body),
            "websocket": self.websocket,
        }


class BadRequest(Exception):
    """The client sent something that is not HTTP/1.1; answered with 400 and a close."""


def _parse_head(raw: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    lines = raw[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise BadRequest(f"bad request line {lines[0][:80]!r}")
    method, target, version = (p.decode("latin-1") for p in parts)
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        # Obsolete line folding and whitespace before the colon are smuggling tools: refuse them.
        if not sep or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise BadRequest(f"bad header line {line[:80]!r}")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return method, target, version, headers


def _head(status: int, content_type: str, length: int | None, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", f"Content-Type: {content_type}"]
    if status in (204, 304):
        pass  # no body and no framing headers (RFC 9110 8.6, 15.3.5)
    elif length is None:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append(f"Content-Length: {length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _response(
    status: int,
    body: bytes = b"",
    content_type: str = "text/plain; charset=utf-8",
    *,
    close: bool = False,
    head_only: bool = False,
) -> bytes:
    head = _head(status, content_type, len(body), close)
    return head if head_only else head + body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadRequest(f"bad chunk size {line[:40]!r}") from None
        if size == 0:
            break
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise BadRequest("chunk not followed by CRLF")
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass  # trailers: read and dropped
    return b"".join(parts)


class FakeGateway:
    """A real server that behaves like the OpenClaw gateway's listener, selected by path.

    HTTP: /health /healthz /readyz /, /echo (any method), /status/<code>, /chunked, /big?n=,
    /headers (the received headers as JSON), else 404. WebSocket on any path echoes every frame;
    text `close:<code>[:<reason>]` closes with that code; /ws/reject<code> refuses the upgrade;
    /ws/ping pings and reports the pong as text `pong:<payload>`; /ws/openclaw starts with a
    connect.challenge event and answers `connect` requests (1008 on a wrong token).
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
        on_request: Callable[[RecordedRequest], None] | None = None,
    ) -> None:
        self.token = token
        self.max_message = max_message
        self.on_request = on_request
        self.requests: list[RecordedRequest] = []
        self.ws_messages: list[str | bytes] = []
        # (code, reason) of every close frame a client sent us.
        self.ws_closes: list[tuple[int, str]] = []
        self.pongs: list[bytes] = []
        self.connections_opened = 0
        self.connections_closed = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()
        self.address: tuple[str, int] | None = None

    # --- API -------------------------------------------------------------------------------
    async def start(
        self, sock: socket.socket | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> tuple[str, int]:
        """Serve on sock (already bound and listening) or on host:port; return (host, port)."""
        if sock is not None:
            self._server = await asyncio.start_server(self._handle, sock=sock, limit=HEAD_LIMIT)
        else:
            self._server = await asyncio.start_server(
                self._handle, host, port, limit=HEAD_LIMIT, reuse_address=True
            )
        name = self._server.sockets[0].getsockname()
        self.address = (name[0], name[1])
        return self.address

    async def stop(self) -> None:
        """Stop listening and drop every live connection."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> FakeGateway:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        assert self.address is not None, "not started"
        return self.address[1]

    @property
    def active_connections(self) -> int:
        return self.connections_opened - self.connections_closed

    def clear(self) -> None:
        """Forget what was recorded so far (connections keep running)."""
        self.requests.clear()
        self.ws_messages.clear()
        self.ws_closes.clear()
        self.pongs.clear()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until predicate() holds; it is re-checked whenever something is recorded."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    # --- connection handling --------------------------------------------------------------
    def _notify(self) -> None:
        # Wake every waiter, then re-arm: waiters re-check their predicate and wait again.
        self._changed.set()
        self._changed = asyncio.Event()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections_opened += 1
        self._notify()
        peername = writer.get_extra_info("peername")
        peer = (str(peername[0]), int(peername[1])) if peername else ("", 0)
        try:
            try:
                await self._serve_http(reader, writer, peer)
            except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                pass  # the client went away; nothing to answer
            writer.close()
            await writer.wait_closed()
        except ConnectionError:
            pass
        except BaseException:
            # stop() cancelled us (or a bug): drop the socket now, a graceful close could hang
            # on a peer that never reads.
            writer.transport.abort()
            raise
        finally:
            self.connections_closed += 1
            self._tasks.discard(task)
            self._notify()

    def _record(self, rec: RecordedRequest) -> None:
        self.requests.append(rec)
        if self.on_request is not None:
            self.on_request(rec)
        self._notify()

    async def _serve_http(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: tuple[str, int]
    ) -> None:
        while True:
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # clean EOF between requests (keep-alive ends)
            except asyncio.LimitOverrunError:
                writer.write(_response(431, b"head too large\n", close=True))
                await writer.drain()
                return
            try:
                method, target, version, headers = _parse_head(raw)
            except BadRequest as exc:
                self._record(RecordedRequest(raw, "", "", "", [], peer))
                writer.write(_response(400, f"{exc}\n".encode(), close=True))
                await writer.drain()
                return
            rec = RecordedRequest(raw, method, target, version, headers, peer)
            if method == "GET" and "websocket" in (rec.header("upgrade") or "").lower():
                rec.websocket = True
                self._record(rec)
                await self._serve_websocket(rec, reader, writer)
                return
            self._record(rec)
            if not await self._respond(rec, reader, writer):
                return

    def _keep_alive(self, rec: RecordedRequest) -> bool:
        tokens = {t.strip().lower() for v in rec.header_all("connection") for t in v.split(",")}
        if rec.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    async def _respond(
        self, rec: RecordedRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Read the body, answer; return whether the connection stays open."""
        te = ",".join(rec.header_all("transfer-encoding")).lower()
        cls = rec.header_all("content-length")
        try:
            if te and cls:
                # What a smuggling attempt looks like; Node's parser refuses it too.
                raise BadRequest("Content-Length with Transfer-Encoding")
            if (rec.header("expect") or "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if te:
                if te.split(",")[-1].strip() != "chunked":
                    raise BadRequest(f"unsupported transfer-encoding {te!r}")
                rec.body = await _read_chunked(reader)
            elif cls:
                if len(set(cls)) != 1 or not cls[0].isdigit():
                    raise BadRequest(f"bad content-length {cls!r}")
                rec.body = await reader.readexactly(int(cls[0]))
        except BadRequest as exc:
            writer.write(_response(400, f"{exc}\n".encode(), close=True))
            await writer.drain()
            return False
        self._notify()

        keep = self._keep_alive(rec)
        head_only = rec.method == "HEAD"
        path = rec.path
        if path in ("/health", "/healthz"):
            out = _response(
                200,
                HEALTH_BODY,
                "application/json; charset=utf-8",
                close=not keep,
                head_only=head_only,
            )
        elif path == "/readyz":
            out = _response(
                200,
                b'{"ready":true}',
                "application/json; charset=utf-8",
                close=not keep,
                head_only=head_only,
            )
        elif path == "/":
            out = _response(
                200, INDEX_HTML, "text/html; charset=utf-8", close=not keep, head_only=head_only
            )
        elif path == "/echo":
            out = _response(
                200, rec.body, "application/octet-stream", close=not keep, head_only=head_only
            )
        elif path == "/headers":
            body = json.dumps({"headers": rec.headers, "peer": list(rec.peer)}).encode()
            out = _response(200, body, "application/json", close=not keep, head_only=head_only)
        elif path.startswith("/status/") and path[8:].isdigit() and 200 <= int(path[8:]) < 600:
            code = int(path[8:])
            body = json.dumps({"error": {"type": "status", "status": code}}).encode()
            out = _response(
                code,
                body,
                "application/json",
                close=not keep,
                head_only=head_only or code in (204, 304),
            )
        elif path == "/chunked":
            await self._send_chunked(writer, keep, head_only)
            return keep
        elif path == "/big":
            n_arg = rec.query.get("n", ["0"])[0]
            if not n_arg.isdigit():
                writer.write(_response(400, b"n must be a byte count\n", close=True))
                await writer.drain()
                return False
            await self._send_big(writer, int(n_arg), keep, head_only)
            return keep
        else:
            out = _response(404, b"not found\n", close=not keep, head_only=head_only)
        writer.write(out)
        await writer.drain()
        return keep

    async def _send_chunked(
        self, writer: asyncio.StreamWriter, keep: bool, head_only: bool
    ) -> None:
        writer.write(_head(200, "text/plain", None, not keep))
        if not head_only:
            for chunk in CHUNKS:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _send_big(
        self, writer: asyncio.StreamWriter, n: int, keep: bool, head_only: bool
    ) -> None:
        writer.write(_head(200, "application/octet-stream", n, not keep))
        if not head_only:
            body = big_body(n)
            for i in range(0, n, READ_SIZE):
                writer.write(body[i : i + READ_SIZE])
                await writer.drain()
        await writer.drain()

    # --- WebSocket ---------------------------------------------------------------------------
    async def _serve_websocket(
        self, rec: RecordedRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        path = rec.path
        if path.startswith("/ws/reject") and path[10:].isdigit():
            code = int(path[10:])
            body = json.dumps({"error": {"type": "rejected", "status": code}}).encode()
            writer.write(_response(code, body, "application/json", close=True))
            await writer.drain()
            return
        conn = _WsConnection(self, rec, reader, writer)
        await conn.run()


class _WsConnection:
    """One accepted WebSocket: Sans-I/O protocol driven by an asyncio stream pair."""

    def __init__(
        self,
        gw: FakeGateway,
        rec: RecordedRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.gw = gw
        self.rec = rec
        self.reader = reader
        self.writer = writer
        self.proto = ServerProtocol(max_size=gw.max_message)
        self.fragments: list[bytes] = []
        self.fragment_op: Opcode | None = None
        self.echoing = False  # a fragmented message is being echoed frame by frame

    async def flush(self) -> None:
        for data in self.proto.data_to_send():
            if data is SEND_EOF or data == b"":
                if self.writer.can_write_eof():
                    self.writer.write_eof()
            else:
                self.writer.write(data)
        await self.writer.drain()

    async def run(self) -> None:
        proto = self.proto
        proto.receive_data(self.rec.raw_head)
        events = proto.events_received()
        if not events or not isinstance(events[0], Request):
            await self.flush()  # the protocol's own 400 for a malformed handshake
            return
        response = proto.accept(events[0])
        proto.send_response(response)
        await self.flush()
        if response.status_code != 101:
            return
        await self.on_open()
        while True:
            try:
                if proto.close_expected():
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        data = await self.reader.read(READ_SIZE)
                else:
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError:
                return
            if data:
                proto.receive_data(data)
            else:
                proto.receive_eof()
            for event in proto.events_received():
                assert isinstance(event, Frame)
                await self.on_frame(event)
            await self.flush()
            if not data or proto.state is State.CLOSED:
                return

    async def on_open(self) -> None:
        path = self.rec.path
        if path == "/ws/openclaw":
            challenge = {
                "type": "event",
                "event": "connect.challenge",
                "payload": {"nonce": str(uuid.uuid4()), "ts": int(time.time() * 1000)},
            }
            self.proto.send_text(json.dumps(challenge).encode())
        elif path == "/ws/ping":
            self.proto.send_ping(b"fake-gateway-ping")
        await self.flush()

    async def on_frame(self, frame: Frame) -> None:
        op = frame.opcode
        data = bytes(frame.data)
        if op is Opcode.PONG:
            self.gw.pongs.append(data)
            self.gw._notify()
            if self.rec.path == "/ws/ping" and self.proto.state is State.OPEN:
                self.proto.send_text(b"pong:" + data)
            return
        if op is Opcode.CLOSE:
            rcvd = self.proto.close_rcvd
            if rcvd is not None:
                self.gw.ws_closes.append((int(rcvd.code), rcvd.reason))
                self.gw._notify()
            return
        if op not in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            return  # ping: the protocol already queued the pong
        if op is not Opcode.CONT:
            self.fragment_op = op
            self.fragments = []
        self.fragments.append(data)
        kind = self.fragment_op
        if not frame.fin:
            # Echo fragments as they come so fragmentation survives the round trip.
            self._echo(kind, data, first=op is not Opcode.CONT, fin=False)
            self.echoing = True
            return
        message = b"".join(self.fragments)
        self.fragments = []
        if kind is Opcode.TEXT:
            try:
                text = message.decode("utf-8")
            except UnicodeDecodeError:
                self.proto.fail(1007, "invalid UTF-8")
                return
            self.gw.ws_messages.append(text)
        else:
            self.gw.ws_messages.append(message)
        self.gw._notify()
        if self.echoing:
            self._echo(kind, data, first=False, fin=True)
            self.echoing = False
            return
        if kind is Opcode.TEXT and self.command(text):
            return
        self._echo(kind, data, first=True, fin=True)

    def _echo(self, kind: Opcode | None, data: bytes, *, first: bool, fin: bool) -> None:
        if self.proto.state is not State.OPEN:
            return
        if not first:
            self.proto.send_continuation(data, fin=fin)
        elif kind is Opcode.TEXT:
            self.proto.send_text(data, fin=fin)
        else:
            self.proto.send_binary(data, fin=fin)

    def command(self, text: str) -> bool:
        """Handle a control message; return True if it was one (and so is not echoed)."""
        if text.startswith("close:"):
            code, _, reason = text[6:].partition(":")
            if code.isdigit():
                self.proto.send_close(int(code), reason)
                return True
        if self.rec.path == "/ws/openclaw" and text.startswith("{"):
            return self.openclaw_request(text)
        return False

    def openclaw_request(self, text: str) -> bool:
        try:
            msg = json.loads(text)
        except ValueError:
            return False
        if not isinstance(msg, dict) or msg.get("type") != "req":
            return False
        if msg.get("method") == "connect":
            params = msg.get("params")
            auth = params.get("auth") if isinstance(params, dict) else None
            token = auth.get("token") if isinstance(auth, dict) else None
            if self.gw.token is not None and token != self.gw.token:
                self.proto.send_close(1008, "gateway token mismatch")
                return True
            payload: dict[str, Any] = {"type": "hello-ok", "server": {"name": "fake-gateway"}}
        else:
            payload = {"method": msg.get("method")}
        reply = {"type": "res", "id": msg.get("id"), "ok": True, "payload": payload}
        self.proto.send_text(json.dumps(reply).encode())
        return True


# --- standalone -------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    record = open(args.record, "a", buffering=1) if args.record else None

    def log(rec: RecordedRequest) -> None:
        if record is not None:
            record.write(json.dumps(rec.to_json()) + "\n")

    gw = FakeGateway(token=args.token, on_request=log)
    _, port = await gw.start(host=args.host, port=args.port)
    print(f"READY {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await gw.stop()
        if record is not None:
            record.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18789)
    parser.add_argument("--token", default=None, help="token the /ws/openclaw connect must carry")
    parser.add_argument("--record", default=None, help="append one JSON line per request here")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
