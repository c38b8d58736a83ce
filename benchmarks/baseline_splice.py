"""Raw splice baseline: the upper bound for a Python (uvloop + asyncio.Protocol) proxy.

No HTTP parsing, no checks, no logging: accept, dial the upstream, move bytes both ways
with backpressure and half-close. clawgate = this + its checks, so the gap between the two
is the cost of the checks.

    python benchmarks/baseline_splice.py --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT
    [--refuse]   close every connection at accept (reference for clawgate's refused path)
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop


class Side(asyncio.Protocol):
    """One socket of a spliced pair; `peer` is the other side's Side."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is None:
            return True  # upstream still connecting: _dialed forwards the EOF
        if peer is None or peer.transport is None or peer.transport.is_closing():
            return False
        if peer.eof:  # both directions done
            peer.transport.close()
            return False
        peer.transport.write_eof()
        return True  # keep our write side open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()

    def pause_writing(self) -> None:  # our buffer is full: stop reading the other side
        self.peer.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()  # type: ignore[union-attr]


class Front(Side):
    def __init__(self, upstream: tuple[str, int], refuse: bool) -> None:
        super().__init__()
        self.upstream, self.refuse = upstream, refuse
        self.early: list[bytes] | None = []  # bytes that arrive before the upstream is up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.refuse:
            transport.close()
            return
        # NB: uvloop ignores pause_reading() inside connection_made (it starts reading
        # right after it returns), so early bytes are buffered instead.
        up = Side()
        up.peer, self.peer = self, up
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_connection(lambda: up, *self.upstream))
        task.add_done_callback(self._dialed)

    def data_received(self, data: bytes) -> None:
        if self.early is None:
            self.peer.transport.write(data)  # type: ignore[union-attr]
        else:
            self.early.append(data)
            self.transport.pause_reading()  # type: ignore[union-attr]

    def _dialed(self, task: asyncio.Task) -> None:  # type: ignore[type-arg]
        early, self.early = self.early, None
        if task.cancelled() or task.exception() is not None:
            self.transport.close()  # type: ignore[union-attr]
        elif self.transport.is_closing():  # type: ignore[union-attr]
            self.peer.transport.close()  # type: ignore[union-attr]
        else:
            if early:
                self.peer.transport.write(b"".join(early))  # type: ignore[union-attr]
            if self.eof:
                self.peer.transport.write_eof()  # type: ignore[union-attr]
            else:
                self.transport.resume_reading()  # type: ignore[union-attr]


async def serve(listen: tuple[str, int], upstream: tuple[str, int], refuse: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Front(upstream, refuse), *listen, backlog=4096)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=hostport, required=True)
    ap.add_argument("--upstream", type=hostport, required=True)
    ap.add_argument("--refuse", action="store_true")
    a = ap.parse_args()
    uvloop.run(serve(a.listen, a.upstream, a.refuse))
