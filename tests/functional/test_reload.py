"""Reload of a real clawgate (SIGHUP and `clawgate reload`) and the sessions it ends.

Config, token file and policy are reloaded while a WebSocket session keeps echoing; a bad
config is refused, logged, reported by `clawgate reload` (non-zero) and the old one kept.
Sessions whose token is revoked (`clawgate token revoke`), whose login session expires,
or whose Tailscale identity no longer passes the policy end within a second with a close
frame 1008 and a reason, injected at a frame boundary even while the gateway streams
large frames.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from proxy.keystore import TokenFile
from tests.fakes.fake_gateway import FakeGateway
from tests.harness import ClawgateProcess
from tests.netns import GW_V4, Tailnet, listen_in
from tests.support import (
    PORT,
    base_config,
    clawgate_config,
    cli_in_gw,
    closed_by_server,
    echo_ok,
    eventually,
    fake_tailscaled,
    get,
    running,
    ws_open,
)
from tests.util import build_request, exchange


async def reload_logged(cg: ClawgateProcess, n: int, result: str = "ok") -> None:
    """Until the n-th reload line with this result is in the access log."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        recs = [
            r for r in cg.access_log() if r.get("event") == "reload" and r.get("result") == result
        ]
        if len(recs) >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no reload #{n} ({result}) in {cg.access_log()}")


async def test_sighup_and_cli_reload_keep_a_live_session(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port)
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        ws = await ws_open(tailnet, "phone", cg.tokens["phone"])
        await echo_ok(ws, "before")
        laptop = TokenFile(cg.token_path).add("laptop")
        assert (await get(tailnet, "ci", "/echo", laptop)).status == 401
        cg.reload()  # SIGHUP: the new token file
        await reload_logged(cg, 1)
        assert (await get(tailnet, "ci", "/echo", laptop)).status == 200
        await echo_ok(ws, "after sighup")

        # Policy: the CI network is removed from allowedNetworks, via `clawgate reload`.
        new = json.loads(json.dumps(cg.config))
        new["gateway"]["allowedNetworks"] = ["100.101.0.0/16"]
        cg.write_config(new)
        res = cli_in_gw(cg, "reload", "--config", str(cg.config_path))
        assert res.returncode == 0, res.stderr
        assert "reloaded" in res.stdout
        await reload_logged(cg, 2)
        await echo_ok(ws, "after cli reload")  # the phone is still allowed: kept
        reader_refused = await _refused(tailnet, "ci")
        assert reader_refused
        await ws.close()
        assert cg.proc is not None and cg.proc.poll() is None
        assert "Traceback" not in cg.stderr()


async def _refused(tailnet: Tailnet, role: str) -> bool:
    from tests.util import open_in, read_to_close

    reader, writer = await open_in(tailnet.ns(role), GW_V4, PORT)
    try:
        writer.write(build_request("GET", "/health"))
        return await read_to_close(reader, timeout=5) == b""
    finally:
        writer.close()


@pytest.mark.parametrize(
    "bad",
    [
        "{not json",
        json.dumps({"limits": {"maxConnections": 0}}),
        json.dumps({"gateway": {"allowedNetworks": ["10.0.0.0/33"]}, "noSuchKey": 1}),
    ],
)
async def test_bad_config_is_refused_and_the_old_one_kept(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path, bad: str
) -> None:
    async with running(tailnet, tmp_path / "cg", base_config(fake_gateway.port)) as cg:
        token = cg.tokens["phone"]
        ws = await ws_open(tailnet, "phone", token)
        good = cg.config_path.read_text()
        cg.config_path.write_text(bad)
        cg.reload()
        await reload_logged(cg, 1, "refused")
        rec = [r for r in cg.access_log() if r.get("event") == "reload"][0]
        assert rec["error"]
        await cg.wait_stderr("reload refused, keeping the running config")
        (tmp_path / "cg" / "cli.json").write_text(good)
        res = cli_in_gw(cg, "reload", "--config", str(tmp_path / "cg" / "cli.json"))
        assert res.returncode == 1, res
        assert "reload refused" in res.stderr and rec["error"][:40] in res.stderr
        # The old config is in force and the session never noticed.
        await echo_ok(ws)
        assert (await get(tailnet, "phone", "/echo", token)).status == 200
        assert (await get(tailnet, "phone", "/echo", "nope")).status == 401
        status, body = await cg.admin_json("/health")
        assert any("last reload refused" in w for w in body["warnings"]), body
        # Fixed: the next reload succeeds and clears the warning.
        cg.config_path.write_text(good)
        cg.reload()
        await reload_logged(cg, 1, "ok")
        status, body = await cg.admin_json("/health")
        assert not any("last reload refused" in w for w in body["warnings"]), body
        await echo_ok(ws)
        await ws.close()


async def test_token_revoke_ends_its_sessions_with_1008(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(
        tailnet, tmp_path / "cg", base_config(fake_gateway.port), token_names=("phone", "laptop")
    ) as cg:
        doomed = [
            await ws_open(tailnet, "phone", cg.tokens["phone"]),
            await ws_open(tailnet, "ci", cg.tokens["phone"]),
        ]
        kept = await ws_open(tailnet, "phone", cg.tokens["laptop"])
        for ws in (*doomed, kept):
            await echo_ok(ws)
        res = cli_in_gw(cg, "token", "revoke", "phone", "--config", str(cg.config_path))
        t_revoked = time.monotonic()
        assert res.returncode == 0, res.stderr
        for ws in doomed:
            code, reason, t = await closed_by_server(ws, timeout=3)
            assert code == 1008 and reason == "token phone revoked"
            assert t - t_revoked < 1.0
        await echo_ok(kept)
        recs = [r for r in cg.access_log() if r.get("event") == "session_ended"]
        assert len(recs) == 2 and {r["reason"] for r in recs} == {"token phone revoked"}
        assert (await get(tailnet, "phone", "/echo", cg.tokens["phone"])).status == 401
        await kept.close()
        # The gateway's side was closed too: no connection of the revoked token remains.
        await fake_gateway.wait_until(lambda: fake_gateway.active_connections == 0)


async def test_login_session_expiry_ends_the_websocket_with_1008(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    cfg = base_config(fake_gateway.port, tokens={"sessionTtl": 2})
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        body = f"token={cg.tokens['phone']}".encode()
        resp = await exchange(
            tailnet.ns("phone"),
            GW_V4,
            PORT,
            build_request(
                "POST",
                "/__clawgate/login",
                [("Content-Type", "application/x-www-form-urlencoded")],
                body,
            ),
        )
        assert resp.status == 303
        t_login = time.time()
        cookie = (resp.header("Set-Cookie") or b"").split(b";", 1)[0].decode()
        ws = await ws_open(tailnet, "phone", headers={"Cookie": cookie})
        await echo_ok(ws)
        code, reason, _ = await closed_by_server(ws, timeout=5)
        took = time.time() - t_login
        assert code == 1008 and reason == "credential expired"
        assert 1.9 < took < 2 + 1.2, took  # the sweep runs every second
        rec = await cg.wait_log(lambda r: r.get("event") == "session_ended")
        assert rec["reason"] == "credential phone expired"
        with pytest.raises(Exception) as exc:  # noqa: B017 - InvalidStatus, checked below
            await ws_open(tailnet, "phone", headers={"Cookie": cookie})
        assert getattr(exc.value, "response", None) is not None
        assert exc.value.response.status_code == 401  # type: ignore[attr-defined]


async def test_policy_change_ends_the_sessions_it_no_longer_allows(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with fake_tailscaled() as tsd:
        cfg = clawgate_config(
            fake_gateway,
            tsd.socket_path,
            gateway={"requireToken": False},
            tailscale={"allowUsers": ["alice@example.com"], "allowTags": ["tag:ci"]},
        )
        cg = ClawgateProcess(tmp_path / "cg", cfg, netns=tailnet.ns("gw"))
        await cg.start()
        try:
            alice = await ws_open(tailnet, "phone")
            ci = await ws_open(tailnet, "ci")
            await echo_ok(alice)
            await echo_ok(ci)
            new = json.loads(json.dumps(cg.config))
            new["tailscale"]["allowUsers"] = ["bob@example.com"]
            cg.write_config(new)
            cg.reload()
            t0 = time.monotonic()
            code, reason, t = await closed_by_server(alice, timeout=3)
            assert code == 1008 and "alice@example.com" in reason, reason
            assert t - t0 < 1.0
            await echo_ok(ci)  # still allowed by its tag
            rec = await cg.wait_log(lambda r: r.get("event") == "session_ended")
            assert rec["reason"] == reason and rec["peer"] == "100.101.102.103"
            await ci.close()
        finally:
            await cg.stop()


# ------------------------------------------------------------------ frame boundaries

FRAME = 4 * 1024 * 1024


def _frame_header(n: int) -> bytes:
    return bytes((0x82, 127)) + struct.pack("!Q", n)  # binary, FIN, unmasked


class StreamingGateway:
    """A gateway that streams 4 MiB binary frames and stops mid-frame when told to.

    Frame k's payload is the byte k repeated, so a truncated or spliced frame shows.
    """

    def __init__(self) -> None:
        self.hold = asyncio.Event()  # set: stop in the middle of the next frame
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self.sent = 0  # bytes written to the proxy, 101 head included
        self.server: asyncio.base_events.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(
            hashlib.sha1(  # noqa: S324 - RFC 6455
                key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            ).digest()
        )
        head = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        writer.write(head)
        self.sent += len(head)
        try:
            for k in range(1, 200):
                payload = bytes([k % 256]) * FRAME
                if self.hold.is_set() and not self.release.is_set():
                    writer.write(_frame_header(FRAME) + payload[: FRAME // 2])
                    self.sent += 10 + FRAME // 2
                    await writer.drain()
                    self.holding.set()
                    await self.release.wait()
                    writer.write(payload[FRAME // 2 :])
                    self.sent += FRAME - FRAME // 2
                else:
                    writer.write(_frame_header(FRAME) + payload)
                    self.sent += 10 + FRAME
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def start(self, tailnet: Tailnet) -> int:
        self.server = await asyncio.start_server(
            self.handle, sock=listen_in(tailnet.ns("gw"), "127.0.0.1")
        )
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def streaming_gateway(tailnet: Tailnet) -> AsyncIterator[StreamingGateway]:
    gw = StreamingGateway()
    gw.port = await gw.start(tailnet)  # type: ignore[attr-defined]
    try:
        yield gw
    finally:
        gw.release.set()
        assert gw.server is not None
        gw.server.close()


@pytest.mark.parametrize("resume", [True, False])
async def test_close_frame_is_injected_at_a_frame_boundary(
    tailnet: Tailnet, streaming_gateway: StreamingGateway, tmp_path: Path, resume: bool
) -> None:
    cfg = base_config(streaming_gateway.port)  # type: ignore[attr-defined]
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        ws = await ws_open(tailnet, "phone", cg.tokens["phone"], max_size=2 * FRAME)
        got: list[bytes] = []
        ended: list[ConnectionClosed] = []

        async def read_all() -> None:
            # Keep reading throughout: a client that stops reading stalls the gateway.
            try:
                while True:
                    got.append(await ws.recv())  # type: ignore[arg-type]
            except ConnectionClosed as exc:
                ended.append(exc)

        reader = asyncio.create_task(read_all())
        while not got:
            await asyncio.sleep(0.01)
        streaming_gateway.hold.set()
        await asyncio.wait_for(streaming_gateway.holding.wait(), 10)

        async def relayed() -> int:
            _, body = await cg.admin_json("/connections")
            return max((c["bytes_out"] for c in body["connections"]), default=0)

        # The proxy has relayed everything the gateway sent: it is inside a frame now.
        await eventually(relayed, lambda n: n == streaming_gateway.sent, timeout=10)
        TokenFile(cg.token_path).revoke("phone")
        cg.reload()
        await cg.wait_log(lambda r: r.get("event") == "session_ended", timeout=10)
        t0 = time.monotonic()  # the proxy is now waiting for the frame to end
        if resume:
            streaming_gateway.release.set()
        await asyncio.wait_for(reader, 5)
        [closed] = ended
        took = time.monotonic() - t0
        assert all(len(m) == FRAME and m == m[:1] * FRAME for m in got)  # whole frames only
        if resume:
            # The frame in flight completes, then 1008; nothing of later frames.
            assert closed.rcvd is not None, closed
            assert (closed.rcvd.code, closed.rcvd.reason) == (1008, "token phone revoked")
            assert [m[:1] for m in got] == [bytes([k]) for k in range(1, len(got) + 1)]
            assert took < 1.5, took
        else:
            # The frame never ends: after the grace second the connection is cut (no close
            # frame could be sent without corrupting the stream).
            assert closed.rcvd is None
            assert 0.3 < took < 3.0, took  # the grace second, less the log-poll latency
            rec = await cg.wait_log(
                lambda r: r.get("event") == "close" and "no frame boundary" in r.get("reason", "")
            )
            assert rec["reason"].startswith("token phone revoked")
