"""Correctness check of the C programs against the python `websockets` library.

1. echo.c is driven by a websockets client: text, binary 100 B / 64 KiB / 1 MiB,
   a fragmented message, ping/pong, close code echoed; then by a raw socket that sends
   the handshake and a masked 64 KiB frame one small chunk at a time (split reads).
2. loadgen.c runs every mode against a websockets echo server (which validates the
   client's handshake, masking and close handshake) and must report zero errors.

    python -m benchmarks.check [--out benchmarks/out]
Exit status 0 = all good. Loopback only, every step bounded by a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

HERE = Path(__file__).resolve().parent
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ok(msg: str) -> None:
    print(f"  ok   {msg}", flush=True)


async def check_echo(port: int) -> None:
    uri = f"ws://127.0.0.1:{port}/"
    async with connect(uri, compression=None, max_size=4 << 20, open_timeout=5) as ws:
        await ws.send("hello text")
        assert await asyncio.wait_for(ws.recv(), 5) == "hello text"
        for n in (100, 125, 126, 65535, 65536, 1 << 20):
            data = os.urandom(n)
            await ws.send(data)
            assert await asyncio.wait_for(ws.recv(), 5) == data, n
        ok("echo: text + binary 100 B .. 1 MiB (7/16/64-bit lengths) echoed byte for byte")
        parts = [b"frag-one-", b"frag-two-", b"frag-three"]
        await ws.send(parts)  # an iterable is sent as a fragmented message
        assert await asyncio.wait_for(ws.recv(), 5) == b"".join(parts)
        ok("echo: fragmented message reassembled by the client")
        pong = await ws.ping(b"pp")
        await asyncio.wait_for(pong, 5)
        ok("echo: ping -> pong")
        await ws.close(code=4001, reason="bye")
    assert ws.close_code == 4001 and ws.close_reason == "bye", (ws.close_code, ws.close_reason)
    ok("echo: close handshake, code 4001 + reason echoed")


def check_echo_split_reads(port: int) -> None:
    """Handshake and a masked 64 KiB frame written in tiny pieces."""
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET /x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    payload = os.urandom(65536 + 7)
    mask = os.urandom(4)
    frame = bytes([0x82, 0x80 | 127]) + len(payload).to_bytes(8, "big") + mask
    frame += bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(head), 3):
            s.sendall(head[i : i + 3])
            time.sleep(0.0005)
        resp = b""
        while b"\r\n\r\n" not in resp:
            resp += s.recv(4096)
        h, _, rest = resp.partition(b"\r\n\r\n")
        assert h.startswith(b"HTTP/1.1 101"), h
        want = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        assert f"Sec-WebSocket-Accept: {want}".encode() in h, h
        # header bytes one at a time, then the payload in odd-sized chunks
        for i in range(14):
            s.sendall(frame[i : i + 1])
            time.sleep(0.0005)
        pos, step = 14, 1
        while pos < len(frame):
            s.sendall(frame[pos : pos + step])
            pos += step
            step = step * 3 + 1 if step < 5000 else 997
        buf = rest
        need = 2 + 8 + len(payload)
        while len(buf) < need:
            chunk = s.recv(1 << 20)
            assert chunk, "EOF before echo"
            buf += chunk
        assert buf[0] == 0x82 and buf[1] == 127, buf[:2]
        assert int.from_bytes(buf[2:10], "big") == len(payload)
        assert buf[10:need] == payload
    ok("echo: handshake + 64 KiB frame split over many reads; Sec-WebSocket-Accept = SHA-1/base64")


def run_loadgen(loadgen: Path, port: int, args: list[str]) -> dict[str, Any]:
    cmd = [str(loadgen), *args, "--port", str(port)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (cmd, p.returncode, p.stderr)
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


def check_loadgen(loadgen: Path, port: int) -> None:
    r = run_loadgen(loadgen, port, ["conns", "--conc", "20", "--count", "300", "--duration", "20"])
    assert r["errors_total"] == 0 and r["ok_total"] == 300, r
    ok("loadgen conns: 300 sessions (upgrade, 100 B echo verified, close handshake), 0 errors")
    r = run_loadgen(
        loadgen, port, ["rtt", "--conc", "5", "--count", "500", "--duration", "10", "--warmup", "0"]
    )
    assert r["errors_total"] == 0 and r["msgs_total"] >= 500 and r["lat_n"] > 0, r
    ok(f"loadgen rtt: {r['msgs_total']} ping-pongs verified, p50 {r['lat_p50_us']} us")
    for size in ("100", "65536"):
        r = run_loadgen(
            loadgen,
            port,
            [
                "throughput",
                "--conc",
                "3",
                "--window",
                "8",
                "--size",
                size,
                "--count",
                "600",
                "--duration",
                "10",
                "--warmup",
                "0",
                "--verify",
                "1",
            ],
        )
        assert r["errors_total"] == 0 and r["msgs_total"] >= 600, r
        ok(f"loadgen throughput {size} B: {r['msgs_total']} pipelined messages verified")
    # idle: hold 200, release via stdin, each must echo once
    p = subprocess.Popen(
        [
            str(loadgen),
            "idle",
            "--count",
            "200",
            "--conc",
            "50",
            "--hold",
            "10",
            "--duration",
            "20",
            "--port",
            str(port),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdin is not None  # both are PIPEs
    try:
        line = p.stdout.readline()
        assert line.startswith("READY up=200 failed=0"), line
        p.stdin.write("go\n")
        p.stdin.flush()
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    r = json.loads(out.strip().splitlines()[-1])
    assert r["alive"] == 200 and r["errors_total"] == 0, r
    ok("loadgen idle: 200 held, released by stdin, 200 alive")


def check_loadgen_against_echo(loadgen: Path, port: int) -> None:
    r = run_loadgen(loadgen, port, ["conns", "--conc", "20", "--count", "2000", "--duration", "20"])
    assert r["errors_total"] == 0 and r["ok_total"] == 2000, r
    ok("loadgen conns vs echo.c: 2000 sessions, 0 errors")
    r = run_loadgen(loadgen, port, ["refused", "--conc", "5", "--count", "50", "--duration", "5"])
    assert r["errors"].get("accepted") == 50, r
    ok("loadgen refused: an accepting server is reported as 50 x 'accepted' (an error)")


def check_refused(loadgen: Path, port: int) -> None:
    r = run_loadgen(
        loadgen, port, ["refused", "--conc", "10", "--count", "500", "--duration", "10"]
    )
    assert r["errors_total"] == 0 and r["ok_total"] == 500, r
    ok("loadgen refused vs a server that closes at accept: 500 closes counted, 0 errors")


def check_loadgen_tls_and_first_text(loadgen: Path, port: int, tls_port: int) -> None:
    first = '{"type":"req","id":"1","method":"connect","params":{"auth":{"token":"t"}}}'
    r = run_loadgen(
        loadgen,
        port,
        ["conns", "--conc", "10", "--count", "200", "--duration", "20", "--first-text", first],
    )
    assert r["errors_total"] == 0 and r["ok_total"] == 200, r
    ok("loadgen --first-text: 200 sessions, the connect frame echoed and verified first")
    r = run_loadgen(loadgen, tls_port, ["conns", "--conc", "10", "--count", "200", "--tls"])
    assert r["errors_total"] == 0 and r["ok_total"] == 200 and r["tls"] == 1, r
    ok("loadgen --tls conns: 200 TLS sessions (handshake, upgrade, echo, close), 0 errors")
    for size in ("100", "65536"):
        r = run_loadgen(
            loadgen,
            tls_port,
            ["throughput", "--conc", "3", "--window", "8", "--size", size, "--count", "600",
             "--duration", "10", "--warmup", "0", "--verify", "1", "--tls"],
        )  # fmt: skip
        assert r["errors_total"] == 0 and r["msgs_total"] >= 600, r
        ok(f"loadgen --tls throughput {size} B: {r['msgs_total']} messages verified")


def self_signed(d: Path) -> ssl.SSLContext:
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=check", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def start_echo_server_thread(
    ssl_ctx: ssl.SSLContext | None = None,
) -> tuple[int, threading.Event]:
    """A websockets echo server in a thread; returns its port and a stop event."""
    ready = threading.Event()
    stop = threading.Event()
    holder: dict[str, int] = {}

    async def handler(ws):  # type: ignore[no-untyped-def]
        async for msg in ws:
            await ws.send(msg)

    async def main() -> None:
        quiet = logging.getLogger("bench-check-server")
        quiet.setLevel(logging.CRITICAL)  # loadgen ends rtt/throughput runs with a plain close
        async with serve(
            handler, "127.0.0.1", 0, compression=None, max_size=4 << 20, logger=quiet, ssl=ssl_ctx
        ) as srv:
            holder["port"] = list(srv.sockets)[0].getsockname()[1]
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)

    t = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    t.start()
    assert ready.wait(10)
    return holder["port"], stop


def start_proc(cmd: list[str]) -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith("READY "), line
    return p, int(line.split()[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "out"))
    a = ap.parse_args()
    out = Path(a.out)
    echo, loadgen = out / "echo", out / "loadgen"
    procs: list[subprocess.Popen[str]] = []
    try:
        print("check: echo.c against the websockets client", flush=True)
        p, eport = start_proc([str(echo), "--port", "0"])
        procs.append(p)
        asyncio.run(check_echo(eport))
        check_echo_split_reads(eport)
        print("check: loadgen.c against the websockets server", flush=True)
        wport, stop = start_echo_server_thread()
        check_loadgen(loadgen, wport)
        with tempfile.TemporaryDirectory(prefix="bench-check-") as td:
            tport, tstop = start_echo_server_thread(self_signed(Path(td)))
            check_loadgen_tls_and_first_text(loadgen, wport, tport)
            tstop.set()
        stop.set()
        print("check: loadgen.c against echo.c, and the refused mode", flush=True)
        check_loadgen_against_echo(loadgen, eport)
        p2, rport = start_proc(
            [
                sys.executable,
                str(HERE / "baseline_splice.py"),
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                f"127.0.0.1:{eport}",
                "--refuse",
            ]
        )
        procs.append(p2)
        check_refused(loadgen, rport)
        p3, sport = start_proc(
            [
                sys.executable,
                str(HERE / "baseline_splice.py"),
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                f"127.0.0.1:{eport}",
            ]
        )
        procs.append(p3)
        asyncio.run(check_echo(sport))
        ok("baseline_splice: the same websockets checks pass through the splice")
    except AssertionError as e:
        print(f"  FAIL {e!r}", flush=True)
        return 1
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
    print("check: all good", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
