"""HTTPS and WSS through a real clawgate process on the netns tailnet, with Tailscale's certs.

The fake tailscaled (in this process, on a unix socket the clawgate process reaches across
namespaces) serves certificates of a test CA for web01.tail4c3a9.ts.net; the "phone"
connects to 100.64.0.1 trusting only that CA. Covers the handshake policy, X-Forwarded-Proto,
frames and close codes through the TLS splice, renewal without a restart (timer and
SIGHUP), a failed renewal, the 403 startup message and the redirect port.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import ssl
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect

from proxy.tls import cert_denied_message
from tests.fakes.fake_gateway import FakeGateway
from tests.fakes.fake_tailscaled import FakeTailscaled
from tests.harness import ClawgateProcess
from tests.netns import GW_V4, GW_V6, Tailnet, connect_in
from tests.tlsutil import CA, DOMAIN, Leaf, client_context, make_ca, make_leaf, peer_serial

PORT = 8443
REDIRECT_PORT = 8080


@pytest.fixture(scope="module")
def ca() -> CA:
    return make_ca()


@pytest.fixture
async def fake_ts(tmp_path: Path, ca: CA) -> AsyncIterator[FakeTailscaled]:
    fake = FakeTailscaled(tmp_path / "tailscaled.sock")
    fake.self_key_expiry = None  # tagged-server style: no node key expiry warnings
    fake.cert_domains[:] = []
    fake.set_cert(DOMAIN, *_pems(make_leaf(ca)))
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def _pems(leaf: Leaf) -> tuple[bytes, bytes]:
    return leaf.key_pem, leaf.cert_pem


def _config(gw: FakeGateway, fake: FakeTailscaled, **tls: Any) -> dict[str, Any]:
    return {
        "gateway": {"host": "tailscale", "port": PORT},
        "upstream": f"http://127.0.0.1:{gw.port}",
        "tailscale": {"socket": fake.socket_path},
        "tls": {"mode": "tailscale", **tls},
    }


@pytest.fixture
async def start(tmp_path: Path, tailnet: Tailnet) -> AsyncIterator[Any]:
    procs: list[ClawgateProcess] = []

    async def _start(config: dict[str, Any], *, wait: bool = True) -> ClawgateProcess:
        proc = ClawgateProcess(tmp_path / f"cg{len(procs)}", config, netns=tailnet.ns("gw"))
        procs.append(proc)
        if wait:
            await proc.start(wait_for=f"listening on {GW_V4}:{PORT}")
        else:
            await proc.start(wait_for="")
        return proc

    yield _start
    for proc in procs:
        await proc.stop()


async def _tls(
    tailnet: Tailnet,
    ca: CA,
    *,
    host: str = GW_V4,
    alpn: list[str] | None = None,
    ctx: ssl.SSLContext | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = await connect_in(tailnet.ns("phone"), host, PORT)
    return await asyncio.open_connection(
        sock=sock, ssl=ctx or client_context(ca, alpn=alpn), server_hostname=DOMAIN
    )


async def _serial(tailnet: Tailnet, ca: CA) -> int:
    """The serial a NEW handshake sees (fresh context: no session resumption)."""
    _, writer = await _tls(tailnet, ca)
    serial = peer_serial(writer.get_extra_info("ssl_object"))
    writer.close()
    return serial


async def _wait_serial(tailnet: Tailnet, ca: CA, want: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = await _serial(tailnet, ca)
        if seen == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"new handshakes still see serial {seen:x}, want {want:x}")


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, token: str
) -> tuple[int, bytes, bytes]:
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {DOMAIN}:{PORT}\r\n"
        f"Authorization: Bearer {token}\r\nX-Forwarded-Proto: http\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


def _wss(tailnet: Tailnet, ca: CA, token: str, sock: Any, path: str = "/ws") -> Any:
    return connect(
        f"wss://{DOMAIN}:{PORT}{path}",
        sock=sock,
        ssl=client_context(ca),
        server_hostname=DOMAIN,
        proxy=None,
        max_size=None,
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=10,
        close_timeout=5,
    )


# ------------------------------------------------------------------------------- serving


async def test_https_and_wss_through_the_tailnet(
    tailnet: Tailnet, fake_gateway: FakeGateway, fake_ts: FakeTailscaled, ca: CA, start: Any
) -> None:
    cg = await start(_config(fake_gateway, fake_ts))
    token = cg.tokens["phone"]
    assert fake_ts.cert_calls == [(DOMAIN, "pair", "720h")]

    reader, writer = await _tls(tailnet, ca, alpn=["h2", "http/1.1"])
    ssl_obj = writer.get_extra_info("ssl_object")
    assert ssl_obj.selected_alpn_protocol() == "http/1.1"
    assert ssl_obj.version() in ("TLSv1.2", "TLSv1.3")
    status, _, body = await _get(reader, writer, "/headers", token)
    assert status == 200
    seen = fake_gateway.requests[-1]
    # Set by clawgate from the TLS listener; the client's own "http" never reaches it.
    assert seen.header_all("x-forwarded-proto") == ["https"]
    assert seen.header("host") == f"{DOMAIN}:{PORT}"

    # The IPv6 tailnet address serves the same certificate.
    _, w6 = await _tls(tailnet, ca, host=GW_V6)
    assert peer_serial(w6.get_extra_info("ssl_object")) == peer_serial(ssl_obj)
    w6.close()

    sock = await connect_in(tailnet.ns("phone"), GW_V4, PORT)
    async with _wss(tailnet, ca, token, sock) as ws:
        await ws.send("hello over wss")
        assert await ws.recv() == "hello over wss"
        blob = bytes(range(256)) * 1024
        await ws.send(blob)
        assert await ws.recv() == blob
        big = b"\x5a" * (25 * 1024 * 1024)  # the gateway's max frame
        await ws.send(big)
        echoed = await asyncio.wait_for(ws.recv(), 30)
        assert len(echoed) == len(big) and echoed == big
        await ws.send("close:4321:bye")
        # The gateway's FIN after its close handshake must end the TLS connection at once
        # (TLS cannot half-close): well under the client's 5 s close_timeout.
        t0 = time.monotonic()
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert time.monotonic() - t0 < 2.0
        assert ws.close_code == 4321 and ws.close_reason == "bye"
    # And the client's own close code reaches the gateway through the TLS splice.
    sock = await connect_in(tailnet.ns("phone"), GW_V4, PORT)
    async with _wss(tailnet, ca, token, sock) as ws:
        await ws.send("x")
        await ws.recv()
        await ws.close(4002, "client says bye")
    await fake_gateway.wait_until(lambda: (4002, "client says bye") in fake_gateway.ws_closes)


async def test_handshake_policy(
    tailnet: Tailnet, fake_gateway: FakeGateway, fake_ts: FakeTailscaled, ca: CA, start: Any
) -> None:
    await start(_config(fake_gateway, fake_ts))
    # TLS 1.1 is refused, even by a client willing to go that low (SECLEVEL=0 so that
    # OpenSSL 3 on the client side actually offers it).
    old = client_context(ca)
    with warnings.catch_warnings():  # TLSv1/1.1 are deprecated: exactly the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    # (uvloop may drop the connection right after the protocol_version alert: either way
    # the handshake fails.)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await _tls(tailnet, ca, ctx=old)
    # A client offering only h2 gets no ALPN at all (never h2): it must speak HTTP/1.1.
    _, writer = await _tls(tailnet, ca, alpn=["h2"])
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
    writer.close()
    # TLS 1.2 with a modern AEAD suite works; a CBC-only client is refused.
    tls12 = client_context(ca)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    _, writer = await _tls(tailnet, ca, ctx=tls12)
    name, version, _ = writer.get_extra_info("ssl_object").cipher()
    assert version == "TLSv1.2" and ("GCM" in name or "CHACHA20" in name)
    writer.close()
    cbc = client_context(ca)
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await _tls(tailnet, ca, ctx=cbc)
    # A client that does not trust the test CA fails verification (the name is real).
    with pytest.raises(ssl.SSLCertVerificationError):
        await _tls(tailnet, ca, ctx=ssl.create_default_context())


# ------------------------------------------------------------------------------- renewal


async def test_timer_renewal_swaps_the_certificate_while_a_wss_session_stays(
    tailnet: Tailnet, fake_gateway: FakeGateway, fake_ts: FakeTailscaled, ca: CA, start: Any
) -> None:
    first = make_leaf(ca)
    fake_ts.set_cert(DOMAIN, *_pems(first))
    cg = await start(_config(fake_gateway, fake_ts, renewCheckSeconds=5))
    token = cg.tokens["phone"]
    assert await _serial(tailnet, ca) == first.serial

    sock = await connect_in(tailnet.ns("phone"), GW_V4, PORT)
    async with _wss(tailnet, ca, token, sock) as ws:
        await ws.send("before")
        assert await ws.recv() == "before"
        second = make_leaf(ca)
        fake_ts.set_cert(DOMAIN, *_pems(second))
        # No signal: the 5 s renewal timer must pick it up.
        await _wait_serial(tailnet, ca, second.serial, timeout=12)
        for i in range(20):  # the live session is untouched and keeps echoing
            await ws.send(f"after {i}")
            assert await ws.recv() == f"after {i}"
        assert peer_serial(ws.transport.get_extra_info("ssl_object")) == first.serial
    rec = await cg.wait_log(lambda r: r.get("event") == "tls" and r.get("result") == "renewed")
    assert rec["serial"] == f"{second.serial:x}" and rec["why"] == "timer"
    status, health = await cg.admin_json("/health")
    assert health["tls"]["certificate"]["serial"] == f"{second.serial:x}"
    assert health["tls"]["renewals"] == 1
    assert not any("TLS" in w for w in health["warnings"])
    assert fake_ts.cert_calls[-1] == (DOMAIN, "pair", "720h")


async def test_failed_renewal_keeps_the_old_certificate_and_warns(
    tailnet: Tailnet, fake_gateway: FakeGateway, fake_ts: FakeTailscaled, ca: CA, start: Any
) -> None:
    expiring = make_leaf(ca, not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=3))
    fake_ts.set_cert(DOMAIN, *_pems(expiring))
    cg = await start(_config(fake_gateway, fake_ts, minValidity="720h"))
    # Served, but /health already warns: 3 days is below half of minValidity.
    _, health = await cg.admin_json("/health")
    assert any(re.search(r"expires in 2\.9|expires in 3\.0", w) for w in health["warnings"])
    assert 2.9 < health["tls"]["days_left"] <= 3.0

    fake_ts.cert_mode = "403"
    cg.reload()  # SIGHUP re-checks the certificate at once
    await cg.wait_log(lambda r: r.get("event") == "tls" and r.get("result") == "renewal_failed")
    assert await _serial(tailnet, ca) == expiring.serial
    _, health = await cg.admin_json("/health")
    warning = next(w for w in health["warnings"] if "renewal failed" in w)
    assert "cert access denied" in warning
    m = re.search(r"expires in ([0-9.]+) days", warning)
    assert m is not None, warning
    days = float(m.group(1))
    assert 2.9 <= days <= 3.0
    assert "renewal failed" in cg.stderr() and "keeping the current certificate" in cg.stderr()

    # tailscaled works again with a fresh certificate: swapped, warning gone.
    fresh = make_leaf(ca)
    fake_ts.set_cert(DOMAIN, *_pems(fresh))
    fake_ts.cert_mode = "ok"
    cg.reload()
    await _wait_serial(tailnet, ca, fresh.serial, timeout=5)
    _, health = await cg.admin_json("/health")
    assert not any("TLS" in w for w in health["warnings"]), health["warnings"]

    # A pair whose key does not match its certificate is refused; the good one stays.
    wrong = make_leaf(ca)
    fake_ts.set_cert(DOMAIN, make_leaf(ca).key_pem, wrong.cert_pem)
    cg.reload()
    await cg.wait_log(
        lambda r: (
            r.get("result") == "renewal_failed" and "do not load together" in r.get("error", "")
        )
    )
    assert await _serial(tailnet, ca) == fresh.serial


# ------------------------------------------------------------------------------- startup


async def test_cert_access_denied_at_startup_is_one_clear_line(
    fake_gateway: FakeGateway, fake_ts: FakeTailscaled, start: Any
) -> None:
    fake_ts.cert_mode = "403"
    cg = await start(_config(fake_gateway, fake_ts), wait=False)
    deadline = time.monotonic() + 15
    while cg.proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert cg.proc.returncode == 1
    err = cg.stderr()
    assert "Traceback" not in err
    # Log lines aside, the error is exactly one line.
    lines = [ln for ln in err.splitlines() if not re.match(r"clawgate: (DEBUG|INFO|WARNING): ", ln)]
    assert lines == ["clawgate: " + cert_denied_message()], err
    assert "TS_PERMIT_CERT_UID=root" in lines[0] and "tailscale set --operator=root" in lines[0]


async def test_tailnet_without_https_certificates_says_so(
    fake_gateway: FakeGateway, fake_ts: FakeTailscaled, start: Any
) -> None:
    fake_ts.cert_domains[:] = []
    cg = await start(_config(fake_gateway, fake_ts), wait=False)
    deadline = time.monotonic() + 15
    while cg.proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert cg.proc.returncode == 1
    err = cg.stderr()
    assert "Traceback" not in err
    assert (
        "clawgate: this tailnet does not issue HTTPS certificates: enable HTTPS "
        "Certificates (with MagicDNS) in the tailnet's admin console"
    ) in err


# ------------------------------------------------------------------------------- redirect


async def test_redirect_port_only_redirects(
    tailnet: Tailnet, fake_gateway: FakeGateway, fake_ts: FakeTailscaled, ca: CA, start: Any
) -> None:
    await start(_config(fake_gateway, fake_ts, redirectPort=REDIRECT_PORT))

    async def plain(raw: bytes, host: str = GW_V4) -> bytes:
        sock = await connect_in(tailnet.ns("phone"), host, REDIRECT_PORT)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(raw)
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return data

    data = await plain(b"GET /chat?session=1 HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 308 ")
    assert f"Location: https://{DOMAIN}:{PORT}/chat?session=1".encode() in head.split(b"\r\n")
    data = await plain(b"POST http://evil.example/x HTTP/1.1\r\nHost: a\r\n\r\n", host=GW_V6)
    assert f"Location: https://{DOMAIN}:{PORT}/\r\n".encode() in data
    data = await plain(b"GET /a\r\nInjected: 1 HTTP/1.1\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 ")
    data = await plain(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 200)
    assert data.startswith(b"HTTP/1.1 400 ")
    # Nothing on the redirect port ever reaches the gateway.
    assert fake_gateway.requests == []
    # The HTTPS port keeps working on the same addresses.
    _, writer = await _tls(tailnet, ca)
    writer.close()


async def test_files_mode(
    tmp_path: Path, tailnet: Tailnet, fake_gateway: FakeGateway, ca: CA, start: Any
) -> None:
    from tests.tlsutil import write_pems

    leaf = make_leaf(ca)
    cert, key = write_pems(tmp_path / "pems", leaf)
    cg = await start(
        {
            "gateway": {"host": GW_V4, "port": PORT, "requireToken": True},
            "upstream": f"http://127.0.0.1:{fake_gateway.port}",
            "tls": {"certFile": str(cert), "keyFile": str(key)},
        }
    )
    reader, writer = await _tls(tailnet, ca)
    assert peer_serial(writer.get_extra_info("ssl_object")) == leaf.serial
    status, _, _ = await _get(reader, writer, "/headers", cg.tokens["phone"])
    assert status == 200
    assert fake_gateway.requests[-1].header("x-forwarded-proto") == "https"
    # Replace the files and SIGHUP: new handshakes get the new certificate.
    newer = make_leaf(ca)
    write_pems(tmp_path / "pems", newer)
    cg.reload()
    await _wait_serial(tailnet, ca, newer.serial, timeout=5)
    _, health = await cg.admin_json("/health")
    assert health["tls"]["mode"] == "files"
    assert json.dumps(health).count(f"{newer.serial:x}") == 1
