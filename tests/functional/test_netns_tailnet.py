"""Tests of the namespace tailnet: real source addresses from every host, v4 and v6.

The proxy's network checks are only as honest as this tooling, so these tests pin down what
each host looks like from gw, that sockets stay in their namespace, and that teardown and
cleanup_stale leave nothing behind.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tests.fakes.fake_gateway import HEALTH_BODY, FakeGateway
from tests.netns import (
    CI_V4,
    CI_V6,
    GW_PUBLIC_V4,
    GW_V4,
    GW_V6,
    PHONE_V4,
    PHONE_V6,
    PUBLIC_V4,
    PUBLIC_V6,
    Tailnet,
    check_output_in,
    cleanup_stale,
    connect_in,
    listen_in,
    open_connection_in,
    run_in,
    socket_in,
)

REPO = Path(__file__).resolve().parents[2]

# Linux values; the socket module does not export them.
IP_PKTINFO = 8
IP_RECVTTL = 12


def _netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _thread_netns() -> int:
    # /proc/self is the thread-group leader; the calling thread's namespace is under thread-self.
    return os.stat("/proc/thread-self/ns/net").st_ino


async def _accept_from(
    tailnet: Tailnet, role: str, listen_host: str, dst: str
) -> tuple[tuple[str, int], tuple[str, int]]:
    """Connect from role to dst on a fresh gw listener; return (peer, local) as gw sees them."""
    lst = listen_in(tailnet.ns("gw"), listen_host)
    accepted: asyncio.Future[tuple[tuple[str, int], tuple[str, int]]] = (
        asyncio.get_running_loop().create_future()
    )

    def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        if not accepted.done():
            accepted.set_result(((peer[0], peer[1]), (local[0], local[1])))
        writer.close()

    server = await asyncio.start_server(on_conn, sock=lst)
    try:
        port = lst.getsockname()[1]
        reader, writer = await open_connection_in(tailnet.ns(role), dst, port)
        result = await asyncio.wait_for(accepted, 5)
        writer.close()
        await writer.wait_closed()
        return result
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("role", "dst", "peer"),
    [
        ("phone", GW_V4, PHONE_V4),
        ("ci", GW_V4, CI_V4),
        ("public", GW_V4, PUBLIC_V4),  # routed via 198.18.0.1, arrives at the tailnet address
        ("public", GW_PUBLIC_V4, PUBLIC_V4),
        ("phone", GW_V6, PHONE_V6),
        ("ci", GW_V6, CI_V6),
        ("public", GW_V6, PUBLIC_V6),
        ("gw", GW_V4, GW_V4),  # the proxy host talking to itself
    ],
)
async def test_peer_address_seen_on_gw(tailnet: Tailnet, role: str, dst: str, peer: str) -> None:
    got_peer, local = await _accept_from(tailnet, role, dst, dst)
    assert got_peer[0] == peer
    assert local[0] == dst


@pytest.mark.parametrize(
    ("role", "dst", "peer"),
    [
        ("phone", GW_V4, f"::ffff:{PHONE_V4}"),
        ("ci", GW_V4, f"::ffff:{CI_V4}"),
        ("public", GW_V4, f"::ffff:{PUBLIC_V4}"),
        ("phone", GW_V6, PHONE_V6),
        ("public", GW_V6, PUBLIC_V6),
    ],
)
async def test_dual_stack_listener_sees_v4_mapped(
    tailnet: Tailnet, role: str, dst: str, peer: str
) -> None:
    got_peer, _ = await _accept_from(tailnet, role, "::", dst)
    assert got_peer[0] == peer


def _udp_arrival(tailnet: Tailnet, role: str) -> tuple[str, int, int, str]:
    """Send one datagram from role to GW_V4; return (source, ingress ifindex, ttl, dst)."""
    rx = socket_in(tailnet.ns("gw"), socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket_in(tailnet.ns(role), socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        rx.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
        rx.bind((GW_V4, 0))
        rx.settimeout(5)
        tx.sendto(b"x", (GW_V4, rx.getsockname()[1]))
        _, ancdata, _, src = rx.recvmsg(16, 256)
    ifindex = ttl = -1
    dst = ""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            ifindex, _spec, addr = struct.unpack("=i4s4s", data[:12])
            dst = socket.inet_ntoa(addr)
        elif level == socket.IPPROTO_IP and kind == 2:  # IP_TTL
            (ttl,) = struct.unpack("=i", data[:4])
    return src[0], ifindex, ttl, dst


def test_public_differs_from_phone_only_by_source_address(tailnet: Tailnet) -> None:
    phone = _udp_arrival(tailnet, "phone")
    public = _udp_arrival(tailnet, "public")
    assert phone[0] == PHONE_V4 and public[0] == PUBLIC_V4
    # Same ingress interface, same TTL (no routing hop), same destination address: a proxy
    # can tell them apart by the source address and nothing else.
    assert phone[1:] == public[1:]
    assert phone[3] == GW_V4 and phone[2] == 64


def test_socket_stays_in_its_namespace(tailnet: Tailnet) -> None:
    before = _thread_netns()
    phone_sock = socket_in(tailnet.ns("phone"))
    gw_sock = socket_in(tailnet.ns("gw"))
    root_sock = socket.socket()
    with phone_sock, gw_sock, root_sock:
        assert _thread_netns() == before  # the caller's thread never moved
        # Only the phone namespace has the phone's address; bind() runs on this thread, yet it
        # resolves in the socket's namespace.
        phone_sock.bind((PHONE_V4, 0))
        for other in (gw_sock, root_sock):
            with pytest.raises(OSError) as info:
                other.bind((PHONE_V4, 0))
            assert info.value.errno == errno.EADDRNOTAVAIL
        gw_sock.bind((GW_V4, 0))


def test_socket_in_from_many_threads(tailnet: Tailnet) -> None:
    # Concurrent socket_in calls for different namespaces must not cross over.
    errors: list[BaseException] = []

    def work(role: str, addr: str) -> None:
        try:
            for _ in range(20):
                with socket_in(tailnet.ns(role)) as s:
                    s.bind((addr, 0))
        except OSError as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=a)
        for a in [("phone", PHONE_V4), ("ci", CI_V4), ("gw", GW_V4), ("public", PUBLIC_V4)]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


async def test_gw_loopback_is_private_to_gw(tailnet: Tailnet, fake_gateway: FakeGateway) -> None:
    # The fixture's gateway listens on gw's own 127.0.0.1, like the real one behind the proxy.
    reader, writer = await open_connection_in(tailnet.ns("gw"), "127.0.0.1", fake_gateway.port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert await reader.readexactly(len(HEALTH_BODY)) == HEALTH_BODY
    writer.close()
    await writer.wait_closed()
    assert fake_gateway.requests[0].peer[0] == "127.0.0.1"
    # Not on gw's tailnet address, so the phone has no way around the proxy.
    with pytest.raises(ConnectionRefusedError):
        await connect_in(tailnet.ns("phone"), GW_V4, fake_gateway.port)


async def test_websocket_from_phone_with_real_source(tailnet: Tailnet) -> None:
    gw = FakeGateway()
    _, port = await gw.start(sock=listen_in(tailnet.ns("gw"), GW_V4))
    try:
        sock = await connect_in(tailnet.ns("phone"), GW_V4, port)
        async with connect(f"ws://{GW_V4}:{port}/ws", sock=sock, proxy=None) as ws:
            await ws.send("from the phone")
            assert await ws.recv() == "from the phone"
        [rec] = gw.requests
        assert rec.websocket and rec.peer[0] == PHONE_V4
        assert rec.header("host") == f"{GW_V4}:{port}"
    finally:
        await gw.stop()


def test_run_in_and_check_output_in(tailnet: Tailnet) -> None:
    out = check_output_in(tailnet.ns("phone"), ["ip", "-br", "addr"], text=True)
    assert PHONE_V4 in out and PHONE_V6 in out and GW_V4 not in out
    # A standalone fake gateway started inside gw, reached from ci across the bridge.
    proc = run_in(
        tailnet.ns("gw"),
        [sys.executable, "-m", "tests.fakes.fake_gateway", "--host", GW_V4, "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        port = int(line.split()[1])

        async def headers_from_ci() -> bytes:
            reader, writer = await open_connection_in(tailnet.ns("ci"), GW_V4, port)
            writer.write(b"GET /headers HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            data = await reader.read()
            writer.close()
            await writer.wait_closed()
            return data

        assert f'"peer": ["{CI_V4}"'.encode() in asyncio.run(headers_from_ci())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_unknown_host_name(tailnet: Tailnet) -> None:
    with pytest.raises(KeyError):
        tailnet.ns("laptop")
    assert tailnet.ns("br").endswith("-br")


def test_teardown_leaves_no_namespace(tailnet: Tailnet) -> None:
    with Tailnet.create() as tn:
        names = set(tn.namespaces)
        assert len(names) == 5 and names <= _netns_list()
        assert names.isdisjoint(tailnet.namespaces)
    assert names.isdisjoint(_netns_list())
    tn.close()  # idempotent
    # The session's own tailnet is untouched.
    assert set(tailnet.namespaces) <= _netns_list()


def test_cleanup_stale_removes_a_killed_owners_tailnet(tailnet: Tailnet) -> None:
    code = (
        "import time; from tests.netns import Tailnet; t = Tailnet.create(); "
        "print(' '.join(t.namespaces), flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        names = set(proc.stdout.readline().split())
        assert len(names) == 5 and names <= _netns_list()
    finally:
        proc.kill()  # SIGKILL: no atexit, the namespaces are left behind
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    # No membership check between the kill and the cleanup: a concurrent test session's own
    # cleanup_stale() may legitimately collect these first.
    removed = set(cleanup_stale())
    assert names.isdisjoint(_netns_list())
    # A live owner's namespaces (ours) are never collected.
    assert set(tailnet.namespaces) <= _netns_list()
    assert removed.isdisjoint(tailnet.namespaces)
