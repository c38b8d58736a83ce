"""The Python part of one proxied connection, replayed in-process without sockets.

Drives the real ``ClientConnection`` / ``UpstreamConnection`` callbacks in the order uvloop
calls them for the loadgen ``conns`` session (accept, upgrade head, 101, one 100 B echo
each way, close), against in-memory transports, and reports thread CPU microseconds per
connection (min and median of several batches). No syscalls, so it is far less noisy than
the load benchmark on a busy machine: use it to see what a change to front/upstream/authz/
core.http1/accesslog costs, then confirm with profile_hotpath.sh. Also times tunnel frames.

    .venv/bin/python -m benchmarks.hotpath_replay [--root DIR] [--conns 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any


class MemTransport(asyncio.Transport):
    """Just the transport surface clawgate uses; writes are counted, not sent."""

    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__()
        self.peer = peer
        self.reading = True
        self.closing = False
        self.written = 0
        self.protocol: Any = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def set_protocol(self, p: Any) -> None:
        self.protocol = p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="", help="directory holding the proxy/ tree to time")
    ap.add_argument("--conns", type=int, default=5000, help="connections per batch")
    ap.add_argument("--batches", type=int, default=7)
    ap.add_argument("--access-log", choices=("on", "off"), default="on")
    a = ap.parse_args()
    if a.root:
        sys.path.insert(0, a.root)
    import uvloop

    from proxy.config import load_config
    from proxy.front import ClientConnection
    from proxy.runtime import Runtime

    try:
        from proxy.core.tokens import TokenEntry, digest, new_token
        from proxy.keystore import TokenFile
    except ImportError:  # trees from before proxy/core (--root)
        from proxy.access.tokens import (  # type: ignore[import-not-found,no-redef]
            TokenEntry,
            TokenFile,
            digest,
            new_token,
        )

    tmp = tempfile.mkdtemp(prefix="clawgate-replay-")
    token = new_token()
    TokenFile(os.path.join(tmp, "tokens.json")).save([TokenEntry("bench", digest(token))])
    cfg_path = os.path.join(tmp, "cfg.json")
    with open(cfg_path, "w") as fh:
        json.dump(
            {
                "gateway": {
                    "host": "127.0.0.1",
                    "port": 1,
                    "requireToken": True,
                    "allowedNetworks": ["127.0.0.0/8"],
                },
                "upstream": "http://127.0.0.1:2",
                "tokens": {"file": os.path.join(tmp, "tokens.json")},
                "log": {
                    "access": os.path.join(tmp, "access.log") if a.access_log == "on" else "off"
                },
                "limits": {
                    "maxConnections": 60000,
                    "perSourceIp": 60000,
                    "perIdentity": 60000,
                    "unauthenticatedPerIp": 60000,
                },
            },
            fh,
        )
    head = (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:18789\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n"
    )
    resp = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )
    frame_up = b"\x82\xe4" + b"\x00" * 4 + b"x" * 100  # masked, client -> gateway
    frame_down = b"\x82\x64" + b"x" * 100  # unmasked, gateway -> client

    async def run() -> None:
        loop = asyncio.get_running_loop()
        rt = Runtime(load_config(cfg_path), loop)
        rt.apply_config(rt.cfg)

        async def one_batch(n: int) -> float:
            t0 = time.thread_time()
            for i in range(n):
                c = ClientConnection(rt)
                t = MemTransport(("127.0.0.1", 10000 + i % 50000))
                c.connection_made(t)
                c.data_received(head)
                for _ in range(3):  # the dial completes; _dialed runs (or the old task)
                    await asyncio.sleep(0)
                up = c.up
                assert up is not None, "not forwarded"
                up.data_received(resp)
                c.data_received(frame_up)
                up.data_received(frame_down)
                c.eof_received()
                up.eof_received()
                up.connection_lost(None)
                c.connection_lost(None)
            await asyncio.sleep(0)  # the access log's end-of-iteration flush
            return (time.thread_time() - t0) / n * 1e6

        await one_batch(500)
        per_conn = [await one_batch(a.conns) for _ in range(a.batches)]
        # The tunnel: 100 B frames each way on one live connection.
        c = ClientConnection(rt)
        c.connection_made(MemTransport(("127.0.0.1", 9999)))
        c.data_received(head)
        for _ in range(3):
            await asyncio.sleep(0)
        up = c.up
        assert up is not None
        up.data_received(resp)
        per_msg = []
        for _ in range(a.batches):
            t0 = time.thread_time()
            for _ in range(100000):
                c.data_received(frame_up)
                up.data_received(frame_down)
            per_msg.append((time.thread_time() - t0) / 100000 * 1e6)
        batch16 = frame_down * 16  # a read holding 16 frames (the window of tput100)
        per16 = []
        for _ in range(a.batches):
            t0 = time.thread_time()
            for _ in range(20000):
                up.data_received(batch16)
            per16.append((time.thread_time() - t0) / 20000 / 16 * 1e6)
        print(
            json.dumps(
                {
                    "root": a.root or "repo",
                    "conn_us_min": round(min(per_conn), 2),
                    "conn_us_median": round(statistics.median(per_conn), 2),
                    "tunnel_roundtrip_us_min": round(min(per_msg), 3),
                    "down_per_frame_16_per_read_us_min": round(min(per16), 3),
                    "log_lines": rt.log.lines,
                    "log_errors": rt.log.errors,
                }
            )
        )

    class ReplayLoop(uvloop.Loop):
        """uvloop, but the gateway is in memory: the real dial path (its task, timer and
        done callbacks) runs, and no monkeypatch of a module global is needed (a global
        such as front.dial is not looked up again once mypyc compiles front.py)."""

        async def create_connection(  # type: ignore[override]
            self, protocol_factory: Any, *args: Any, **kwargs: Any
        ) -> tuple[asyncio.Transport, Any]:
            t = MemTransport(("127.0.0.1", 2))
            up = protocol_factory()
            up.connection_made(t)
            return t, up

    try:
        uvloop.run(run(), loop_factory=ReplayLoop)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
