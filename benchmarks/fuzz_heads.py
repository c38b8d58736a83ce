"""Run a million generated request heads through a live clawgate process (not run in CI).

Heads are mutations of valid ones (byte flips, CR/LF/NUL insertion, duplicated or dropped
header lines, random methods and versions, spoofed forwarding headers, framing headers, huge
values, truncation). They go to a real ``python -m proxy serve`` on loopback over many
concurrent connections, pipelined on keep-alive connections where the head is expected to
pass. A validating gateway in its own process checks every head that reaches it with its
own strict rules (not clawgate's parser). The run fails on a crash (process gone, a
traceback on stderr), a leak (descriptors or RSS not back near the baseline) or a single
malformed head forwarded.

    .venv/bin/python -m benchmarks.fuzz_heads --count 1000000 --seconds 1800
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.soak import _proc_fds, _proc_rss_kib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.core.http1 import parse_request_head  # noqa: E402
from proxy.errors import BadRequest  # noqa: E402

HEAD_BYTES = 16384
BATCH = 8

# ----------------------------------------------------------------------------- generation

_METHODS = [
    b"GET",
    b"POST",
    b"PUT",
    b"DELETE",
    b"HEAD",
    b"OPTIONS",
    b"PATCH",
    b"CONNECT",
    b"TRACE",
    b"PRI",
    b"get",
    b"G ET",
    b"GET\x00",
    b"\xffGET",
    b"FOO",
    b"",
]
_VERSIONS = [
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/2.0",
    b"HTTP/0.9",
    b"HTTP/1.2",
    b"http/1.1",
    b"HTTP/1.1 ",
    b"HTTP/11",
    b"HTTP/1.1\x00",
    b"HTTP/",
]
_TARGETS = [
    b"/",
    b"/chat?session=1",
    b"/ws",
    b"/health",
    b"/%2e%2e/health",
    b"//x",
    b"/a/../b",
    b"*",
    b"http://evil/",
    b"/\xc0\xae",
    b"/a b",
    b"/" + b"a" * 300,
]
_SPOOF = [
    b"X-Forwarded-For: 127.0.0.2",
    b"x_forwarded_for: 10.0.0.1",
    b"Forwarded: for=1.2.3.4",
    b"X-Real-IP: 1.1.1.1",
    b"TAILSCALE-USER-LOGIN: admin@x",
    b"tailscale_user_name: a",
    b"X-Forwarded-User: root",
    b"X-Forwarded-Host: evil",
    b"True-Client-IP: 9.9.9.9",
    b"X-Forwarded-Proto: https",
    b"Connection: X-Forwarded-For, Host",
]
_FRAMING = [
    b"Content-Length: 0",
    b"Content-Length: 5",
    b"Content-Length: 20000",
    b"Content-Length: -1",
    b"Content-Length: 0x5",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: chunked, identity",
    b"Transfer-Encoding: xchunked",
    b"Content_Length: 3",
    b"Transfer_Encoding: chunked",
    b"Upgrade: h2c",
    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
    b"Connection: Upgrade",
    b"Upgrade: websocket",
    b"Upgrade: websocket, h2c",
    b"Expect: 100-continue",
]
_INSERTS = [b"\r", b"\n", b"\x00", b"\r\n", b" ", b"\t", b":", b"\r\n ", b"\x7f", b"\xff"]


def _bases(rng: random.Random) -> list[list[bytes]]:
    tok = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_") for _ in range(43))
    return [
        [
            b"GET /chat?session=1 HTTP/1.1",
            b"Host: 127.0.0.1:28789",
            b"User-Agent: fuzz/1",
            b"Accept: */*",
            b"Cookie: a=1; b=2",
            b"Authorization: Bearer " + tok.encode(),
        ],
        [
            b"GET /ws HTTP/1.1",
            b"Host: 127.0.0.1",
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Sec-WebSocket-Version: 13",
            b"Origin: http://127.0.0.1",
        ],
        [b"POST /echo HTTP/1.1", b"Host: h", b"Content-Type: text/plain", b"Content-Length: 5"],
        [b"HEAD / HTTP/1.1", b"Host: h"],
        [b"GET / HTTP/1.0", b"Connection: keep-alive"],
        [b"OPTIONS /x HTTP/1.1", b"Host: h", b"X-Custom: \t value with tab \t"],
    ]


def mutate(rng: random.Random) -> bytes:
    lines = rng.choice(_bases(rng))
    lines = list(lines)
    for _ in range(rng.choice((0, 1, 1, 2, 2, 3, 4))):
        kind = rng.randrange(12)
        if kind == 0 and len(lines) > 1:  # duplicate a header line
            lines.insert(rng.randrange(1, len(lines) + 1), rng.choice(lines[1:]))
        elif kind == 1 and len(lines) > 1:  # drop one
            del lines[rng.randrange(1, len(lines))]
        elif kind == 2:  # method / target / version
            parts = lines[0].split(b" ")
            if len(parts) == 3:
                which = rng.randrange(3)
                parts[which] = rng.choice((_METHODS, _TARGETS, _VERSIONS)[which])
                lines[0] = b" ".join(parts)
        elif kind == 3:
            lines.insert(rng.randrange(1, len(lines) + 1), rng.choice(_SPOOF))
        elif kind == 4:
            lines.insert(rng.randrange(1, len(lines) + 1), rng.choice(_FRAMING))
        elif kind == 5:  # huge value (some past headBytes)
            lines.append(b"X-Big: " + b"v" * rng.choice((1000, 8000, 15000, 17000, 30000)))
        elif kind == 6 and len(lines) > 2:  # swap two header lines
            i, j = rng.sample(range(1, len(lines)), 2)
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == 7:  # obs-fold
            lines.insert(rng.randrange(1, len(lines) + 1), rng.choice((b" folded", b"\tfold")))
        elif kind == 8:  # odd header name
            lines.append(
                rng.choice(
                    (
                        b"X Y: 1",
                        b"X-\xe9: 1",
                        b": v",
                        b"NoColon",
                        b"X-A : 1",
                        b"X-A:\x01",
                        b"Host: second",
                    )
                )
            )
        # kinds 9..11: byte-level, below
    raw = b"\r\n".join(lines)
    for _ in range(rng.choice((0, 0, 0, 1, 1, 2))):
        kind = rng.randrange(3)
        if not raw:
            break
        pos = rng.randrange(len(raw))
        if kind == 0:  # byte flip
            raw = raw[:pos] + bytes([rng.randrange(256)]) + raw[pos + 1 :]
        elif kind == 1:
            raw = raw[:pos] + rng.choice(_INSERTS) + raw[pos:]
        else:  # truncation
            raw = raw[:pos]
    raw += b"\r\n\r\n"
    # One head per item: cut at the first blank line (what the proxy will see as the head).
    end = raw.find(b"\r\n\r\n")
    return raw[: end + 4]


def predict(raw: bytes) -> tuple[bool, int, bytes]:
    """(keeps the connection open?, body bytes to append, method) for batching only."""
    if len(raw) > HEAD_BYTES:
        return False, 0, b""
    try:
        head = parse_request_head(raw)
    except BadRequest:
        return False, 0, b""
    if head.chunked:
        return head.keep_alive, -1, head.method
    n = head.content_length or 0
    if n > 65536:
        return False, -2, head.method  # a body we will not send: not sent at all
    return head.keep_alive and not head.websocket, n, head.method


# ----------------------------------------------------------------------------- the gateway

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_OURS = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
_SPOOFABLE_EXACT = {b"forwarded", b"x-real-ip", b"true-client-ip", b"x-client-ip"}
_GW_METHODS = {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"}


def validate(raw: bytes) -> tuple[str | None, int, bool]:
    """(problem or None, Content-Length or -1 for chunked, keep-alive) of a forwarded head."""
    if b"\x00" in raw:
        return "NUL", 0, False
    lines = raw[:-4].split(b"\r\n")
    if any(b"\r" in ln or b"\n" in ln for ln in lines):
        return "bare CR/LF", 0, False
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] not in _GW_METHODS or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return f"request line {lines[0][:60]!r}", 0, False
    if not parts[1].startswith(b"/") or any(c <= 0x20 or c == 0x7F for c in parts[1]):
        return "target", 0, False
    counts: dict[bytes, list[bytes]] = {}
    for ln in lines[1:]:
        name, sep, value = ln.partition(b":")
        if not sep or not _TOKEN.match(name):
            return f"header line {ln[:60]!r}", 0, False
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
            return f"control character in {name[:40]!r}", 0, False
        norm = name.lower().replace(b"_", b"-")
        counts.setdefault(norm, []).append(value.strip(b" \t"))
    for norm, values in counts.items():
        if norm in _OURS:
            continue
        if norm in _SPOOFABLE_EXACT or norm.startswith((b"x-forwarded-", b"tailscale-")):
            return f"spoofable header {norm!r} forwarded", 0, False
    if counts.get(b"x-forwarded-for") != [b"127.0.0.1"]:
        return f"X-Forwarded-For {counts.get(b'x-forwarded-for')}", 0, False
    if counts.get(b"x-forwarded-proto") != [b"http"]:
        return "X-Forwarded-Proto", 0, False
    if len(counts.get(b"x-forwarded-host", [])) > 1:
        return "X-Forwarded-Host twice", 0, False
    if parts[2] == b"HTTP/1.1" and len(counts.get(b"host", [])) != 1:
        return "Host count", 0, False
    cl, te = counts.get(b"content-length"), counts.get(b"transfer-encoding")
    if (cl and te) or (cl and len(cl) > 1) or (te and te != [b"chunked"]):
        return "framing", 0, False
    if b"content-length" in [n.lower() for n in counts] and cl and not cl[0].isdigit():
        return "Content-Length value", 0, False
    conn = {t.strip().lower() for v in counts.get(b"connection", []) for t in v.split(b",")}
    keep = b"close" not in conn if parts[2] == b"HTTP/1.1" else b"keep-alive" in conn
    return None, (-1 if te else int(cl[0]) if cl else 0), keep


class _Gateway:
    def __init__(self) -> None:
        self.heads = 0
        self.bad = 0
        self.samples: list[str] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    self.bad += 1
                    self.samples.append("head over 64 KiB")
                    return
                self.heads += 1
                problem, length, keep = validate(raw)
                if problem is not None:
                    self.bad += 1
                    if len(self.samples) < 20:
                        self.samples.append(f"{problem}: {raw[:200]!r}")
                    writer.write(
                        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n"
                    )
                    return
                if length > 0:
                    await reader.readexactly(length)
                elif length < 0:
                    while True:
                        size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                        if size == 0:
                            while await reader.readuntil(b"\r\n") != b"\r\n":
                                pass
                            break
                        await reader.readexactly(size + 2)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"
                    + (b"" if keep else b"Connection: close\r\n")
                    + b"\r\n"
                )
                if not keep:
                    await writer.drain()
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()


async def _gateway_main() -> None:
    gw = _Gateway()
    server = await asyncio.start_server(gw.handle, "127.0.0.1", 0, limit=1 << 16, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    await done.wait()
    server.close()
    print(
        json.dumps(
            {"heads": gw.heads, "bad": gw.bad, "samples": gw.samples, "connections": gw.connections}
        ),
        flush=True,
    )


# ----------------------------------------------------------------------------- the client


class Stats:
    def __init__(self) -> None:
        self.generated = 0
        self.answered = 0  # heads the proxy answered (itself or through the gateway)
        self.unanswered = 0  # pipelined heads after an unexpected close
        self.connections = 0
        self.statuses: dict[int, int] = {}
        self.resets = 0
        self.skipped = 0  # heads declaring a body too big to send


async def _read_response(reader: asyncio.StreamReader, method: bytes) -> tuple[int, bool] | None:
    """(status, connection closes after it) of one response, or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        return None
    status = int(head[9:12])
    closes = re.search(rb"\r\nconnection: *close", head, re.I) is not None
    m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
    if m and method != b"HEAD" and not closes:
        await reader.readexactly(int(m.group(1)))
    return status, closes


async def _worker(port: int, rng: random.Random, stats: Stats, deadline: float, count: int) -> None:
    while stats.generated < count and time.monotonic() < deadline:
        batch: list[tuple[bytes, bytes]] = []  # (bytes to send, method)
        while len(batch) < BATCH and stats.generated < count:
            raw = mutate(rng)
            stats.generated += 1
            keep, body, method = predict(raw)
            if body == -2:
                stats.skipped += 1
                continue
            if body > 0:
                raw += b"x" * body
            elif body < 0:
                raw += b"3\r\nabc\r\n0\r\n\r\n"
            batch.append((raw, method))
            if not keep:
                break
        if not batch:
            continue
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        except OSError:
            stats.resets += 1
            stats.unanswered += len(batch)
            await asyncio.sleep(0.01)
            continue
        stats.connections += 1
        try:
            writer.write(b"".join(r for r, _ in batch))
            got = 0
            for _, method in batch:
                async with asyncio.timeout(30):
                    status = await _read_response(reader, method)
                if status is None:
                    break
                got += 1
                stats.statuses[status[0]] = stats.statuses.get(status[0], 0) + 1
                if status[1]:
                    break
            stats.answered += got
            stats.unanswered += len(batch) - got
        except (ConnectionError, TimeoutError):
            stats.resets += 1
        finally:
            writer.transport.abort()


async def _settle(pid: int, baseline: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        fds = _proc_fds(pid)
        if fds <= baseline or time.monotonic() > deadline:
            return fds
        await asyncio.sleep(0.1)


async def _run_phase(
    port: int, count: int, seconds: float, concurrency: int, seed: int
) -> tuple[Stats, float]:
    stats = Stats()
    deadline = time.monotonic() + seconds
    t0 = time.monotonic()
    await asyncio.gather(
        *(
            _worker(port, random.Random(seed * 1000 + i), stats, deadline, count)
            for i in range(concurrency)
        )
    )
    return stats, time.monotonic() - t0


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1_000_000, help="heads to generate")
    ap.add_argument("--seconds", type=float, default=1800, help="stop generating after this")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--port", type=int, default=28789)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rss-slack-kib", type=int, default=16384)
    ap.add_argument("--gateway", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.gateway:
        await _gateway_main()
        return 0

    from tests.harness import ClawgateProcess

    work = Path(tempfile.mkdtemp(prefix="clawgate-fuzz-"))
    gw = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.fuzz_heads", "--gateway"],
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert gw.stdout is not None
    gw_port = int(gw.stdout.readline())
    cfg: dict[str, Any] = {
        "gateway": {
            "host": "127.0.0.1",
            "port": args.port,
            "requireToken": False,
            "allowedNetworks": ["127.0.0.0/8"],
        },
        "upstream": f"http://127.0.0.1:{gw_port}",
        "tailscale": {"requireIdentity": False},
        "limits": {
            "perSourceIp": 100000,
            "unauthenticatedPerIp": 100000,
            "failedAuthLockout": 0,
            "headTimeout": 10,
            "maxConnections": 100000,
        },
        "log": {"access": "off", "level": "warning"},
        "admin": {"enabled": False},
    }
    cg = ClawgateProcess(work / "cg", cfg, admin_port=args.port + 1)
    failures: list[str] = []
    report: dict[str, Any] = {}
    try:
        await cg.start(wait_for="", timeout=15)
        await _wait_port(args.port)
        # Warm-up: lazily created state (buffers, caches) exists before the baseline.
        warm, _ = await _run_phase(args.port, 20000, 120, args.concurrency, args.seed + 99)
        fds0 = await _settle(cg.pid, 0, timeout=1.0)
        rss0 = _proc_rss_kib(cg.pid)
        stats, took = await _run_phase(
            args.port, args.count, args.seconds, args.concurrency, args.seed
        )
        alive = cg.proc is not None and cg.proc.poll() is None
        fds1 = await _settle(cg.pid, fds0) if alive else -1
        rss1 = _proc_rss_kib(cg.pid) if alive else -1
        err = cg.stderr()
        report = {
            "heads_generated": stats.generated,
            "heads_answered": stats.answered,
            "heads_unanswered": stats.unanswered,
            "connections": stats.connections,
            "resets": stats.resets,
            "skipped_big_body": stats.skipped,
            "seconds": round(took, 1),
            "heads_per_second": round(stats.generated / took),
            "statuses": dict(sorted(stats.statuses.items())),
            "fds_baseline": fds0,
            "fds_after": fds1,
            "rss_kib_baseline": rss0,
            "rss_kib_after": rss1,
            "warmup_heads": warm.generated,
        }
        if not alive:
            failures.append("clawgate exited")
        if "Traceback" in err:
            failures.append("stderr:\n" + err[-3000:])
        if fds1 > fds0:
            failures.append(f"descriptors: {fds0} -> {fds1}")
        if rss1 > rss0 + args.rss_slack_kib:
            failures.append(f"RSS: {rss0} -> {rss1} KiB")
    finally:
        await cg.stop()
        gw.send_signal(signal.SIGTERM)
        out, _ = gw.communicate(timeout=30)
        gw_stats = json.loads(out.strip().splitlines()[-1])
        report["gateway_heads"] = gw_stats["heads"]
        report["gateway_bad_heads"] = gw_stats["bad"]
        report["gateway_connections"] = gw_stats["connections"]
        if gw_stats["bad"]:
            failures.append("malformed heads forwarded:\n" + "\n".join(gw_stats["samples"]))
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    print("PASS" if not failures else "FAIL", file=sys.stderr)
    return 0 if not failures else 1


async def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
