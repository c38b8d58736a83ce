"""A Tailscale control server for tests: real tailscaled nodes register with it and get netmaps.

Protocol (the reference is tailscale/tailscale v1.96.4: tstest/integration/testcontrol,
control/controlbase, control/controlhttp, control/ts2021, tailcfg):

- ``GET /key?v=N``: the server's Noise public key (``{"legacyPublicKey", "publicKey"}``);
- ``POST /ts2021`` with ``Upgrade: tailscale-control-protocol`` and the client's Noise_IK
  initiation in ``X-Tailscale-Handshake`` (base64): ``101``, the handshake response, then
  Noise transport records (``04 | len16 | ChaCha20-Poly1305``, big-endian counter nonces)
  carrying cleartext HTTP/2;
- over it ``POST /machine/register`` (auth key -> user or tags) and ``POST /machine/map``
  (the long poll: 4-byte little-endian length + zstd-compressed JSON ``MapResponse`` each).

Every change made through the API below sends a full netmap to every streaming node.

Python API (all methods thread-safe; ``ControlServer`` runs its own event loop in a thread)::

    ctl = ControlServer()                       # domain "tail-test.ts.net"; peers are
                                                # offered <node's source IP>:41641
    ctl.start("198.18.1.1", 8080, netns="ns")   # netns None: this process' namespace;
                                                # also TLS on :443 (https_port=None: not)
    ctl.ca_file                                 # its CA: tailscaled's SSL_CERT_FILE
    ctl.url                                     # "http://198.18.1.1:8080" (--login-server)
    key = ctl.create_auth_key(user="alice@example.com")   # or tags=["tag:ci"]
    ctl.wait_nodes(2, timeout=30)               # -> list of node dicts (name, addresses, ...)
    ctl.node("phone")                           # by hostname
    ctl.set_tags("ci", ["tag:prod"])            # a node's tags change; it becomes tagged
    ctl.remove_node("bob")                      # deleted from the tailnet
    ctl.set_key_expiry("server", datetime)      # None: the key never expires
    ctl.add_grant(src="phone", dst="server", cap="example.com/cap/x", values=[{...}])
    ctl.set_endpoints("sidecar", ["172.17.0.2:41641"])  # None: automatic again
    ctl.stop()

CLI, for a separate process (prints one JSON line {"url", "ca_file", "authkeys"} when
listening)::

    python -m tests.fakes.testcontrol --listen 198.18.1.1:8080 [--netns NS] \\
        [--https-port 443 (0: none)] [--endpoint-port 41641] \\
        [--authkey alice@example.com] [--authkey tag:ci] ...

and the same API over plain HTTP on the listener, for that process' clients:
``POST /test/authkey {"user"|"tags"}`` -> ``{"key"}``; ``GET /test/nodes``;
``POST /test/tags {"node", "tags"}``; ``POST /test/remove {"node"}``;
``POST /test/expiry {"node", "expiry"}`` (RFC 3339 or null);
``POST /test/grant {"src", "dst", "cap", "values"}``;
``POST /test/endpoints {"node", "endpoints"}`` (a list of "ip:port", or null).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import zstandard
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ControlServer", "NoiseError", "main"]

log = logging.getLogger("testcontrol")

_T = TypeVar("_T")

PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE_PREFIX = b"Tailscale Control Protocol v"
MSG_INITIATION, MSG_RESPONSE, MSG_ERROR, MSG_RECORD = 1, 2, 3, 4
MAX_MESSAGE = 4096
MAX_PLAINTEXT = MAX_MESSAGE - 3 - 16
TAGGED_DEVICES_ID = 2147455555  # tailcfg's TaggedDevices user id
V4_BASE = ipaddress.IPv4Address("100.64.0.0")
V6_BASE = ipaddress.IPv6Address("fd7a:115c:a1e0::")
KEEPALIVE_SECONDS = 50.0
MSG_LIMIT = 1 << 20


class NoiseError(Exception):
    """The client's Noise handshake or a transport record did not check out."""


# --- Noise_IK (control/controlbase) -------------------------------------------------------------


def _blake2s(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def _hkdf(salt: bytes, ikm: bytes, n: int) -> list[bytes]:
    prk = hmac.new(salt, ikm, hashlib.blake2s).digest()
    out, t = [], b""
    for i in range(1, n + 1):
        t = hmac.new(prk, t + bytes([i]), hashlib.blake2s).digest()
        out.append(t)
    return out


def _pub(priv: X25519PrivateKey) -> bytes:
    return priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(priv: X25519PrivateKey, pub: bytes) -> bytes:
    return priv.exchange(X25519PublicKey.from_public_bytes(pub))


class _Symmetric:
    def __init__(self) -> None:
        self.h = _blake2s(PROTOCOL_NAME)
        self.ck = self.h

    def mix_hash(self, data: bytes) -> None:
        self.h = _blake2s(self.h, data)

    def mix_dh(self, priv: X25519PrivateKey, pub: bytes) -> bytes:
        self.ck, k = _hkdf(self.ck, _dh(priv, pub), 2)
        return k

    def decrypt_and_hash(self, k: bytes, ciphertext: bytes) -> bytes:
        try:
            plain = ChaCha20Poly1305(k).decrypt(bytes(12), ciphertext, self.h)
        except Exception as exc:  # cryptography's InvalidTag
            raise NoiseError("handshake decryption failed") from exc
        self.mix_hash(ciphertext)
        return plain

    def encrypt_and_hash(self, k: bytes, plaintext: bytes) -> bytes:
        ct = ChaCha20Poly1305(k).encrypt(bytes(12), plaintext, self.h)
        self.mix_hash(ct)
        return ct

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = _hkdf(self.ck, b"", 2)
        return k1, k2


def noise_accept(server_key: X25519PrivateKey, init: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """Answer a 101-byte initiation: (response message, client machine key, tx key, rx key)."""
    if len(init) != 101:
        raise NoiseError("wrong handshake initiation size")
    version, mtype, length = struct.unpack(">HBH", init[:5])
    if mtype != MSG_INITIATION or length != 96:
        raise NoiseError("bad handshake initiation header")
    s = _Symmetric()
    s.mix_hash(PROLOGUE_PREFIX + str(version).encode())
    s.mix_hash(_pub(server_key))
    client_eph = init[5:37]
    s.mix_hash(client_eph)
    k = s.mix_dh(server_key, client_eph)
    machine = s.decrypt_and_hash(k, init[37:85])
    k = s.mix_dh(server_key, machine)
    s.decrypt_and_hash(k, init[85:101])
    eph = X25519PrivateKey.generate()
    eph_pub = _pub(eph)
    s.mix_hash(eph_pub)
    s.mix_dh(eph, client_eph)
    k = s.mix_dh(eph, machine)
    tag = s.encrypt_and_hash(k, b"")
    c1, c2 = s.split()
    resp = struct.pack(">BH", MSG_RESPONSE, 48) + eph_pub + tag
    return resp, machine, c2, c1  # the server sends with c2, receives with c1


class _NoiseConn:
    """Noise transport records over an asyncio stream pair."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tx_key: bytes,
        rx_key: bytes,
    ) -> None:
        self.reader, self.writer = reader, writer
        self._tx, self._rx = ChaCha20Poly1305(tx_key), ChaCha20Poly1305(rx_key)
        self._tx_n = self._rx_n = 0

    async def read(self) -> bytes:
        hdr = await self.reader.readexactly(3)
        mtype, length = struct.unpack(">BH", hdr)
        if mtype != MSG_RECORD or length > MAX_MESSAGE - 3:
            raise NoiseError(f"unexpected record type {mtype} / length {length}")
        ct = await self.reader.readexactly(length)
        nonce = bytes(4) + struct.pack(">Q", self._rx_n)
        self._rx_n += 1
        try:
            return self._rx.decrypt(nonce, ct, None)
        except Exception as exc:
            raise NoiseError("record decryption failed") from exc

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), MAX_PLAINTEXT):
            chunk = data[i : i + MAX_PLAINTEXT]
            nonce = bytes(4) + struct.pack(">Q", self._tx_n)
            self._tx_n += 1
            ct = self._tx.encrypt(nonce, chunk, None)
            self.writer.write(struct.pack(">BH", MSG_RECORD, len(ct)) + ct)


# --- the tailnet state --------------------------------------------------------------------------


def _now_iso(t: float | None = None) -> str:
    dt = datetime.fromtimestamp(time.time() if t is None else t, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _User:
    id: int
    login: str
    display: str

    def profile(self) -> dict[str, Any]:
        return {"ID": self.id, "LoginName": self.login, "DisplayName": self.display}


@dataclass
class _Node:
    id: int
    node_key: str
    machine_key: str
    user: _User
    tags: list[str]
    hostinfo: dict[str, Any]
    created: str
    cap: int
    disco_key: str = ""
    endpoints: list[str] = field(default_factory=list)
    fixed_endpoints: list[str] | None = None
    key_expiry: str | None = None

    @property
    def hostname(self) -> str:
        return str(self.hostinfo.get("Hostname") or f"node{self.id}")

    @property
    def v4(self) -> str:
        return str(V4_BASE + self.id)

    @property
    def v6(self) -> str:
        return str(V6_BASE + self.id)

    def to_tailcfg(self, domain: str, owner: _User) -> dict[str, Any]:
        addrs = [f"{self.v4}/32", f"{self.v6}/128"]
        node: dict[str, Any] = {
            "ID": self.id,
            "StableID": f"TESTCTRL{self.id:08x}",
            "Name": f"{self.hostname}.{domain}.",
            "User": owner.id,
            "Key": self.node_key,
            "Machine": self.machine_key,
            "Addresses": addrs,
            "AllowedIPs": addrs,
            "Hostinfo": self.hostinfo,
            "Created": self.created,
            "Cap": self.cap,
            "Online": True,
            "LastSeen": _now_iso(),
            "MachineAuthorized": True,
        }
        if self.disco_key:
            node["DiscoKey"] = self.disco_key
        if self.endpoints:
            node["Endpoints"] = self.endpoints
        if self.tags:
            node["Tags"] = list(self.tags)
        if self.key_expiry:
            node["KeyExpiry"] = self.key_expiry
        return node


@dataclass
class _Grant:
    src: str  # a node hostname or "*"
    dst: str
    cap: str
    values: list[Any]


class _Stream:
    """One long-polling /machine/map: the netmaps queued for it."""

    def __init__(self, node_key: str) -> None:
        self.node_key = node_key
        self.wake = asyncio.Event()
        self.closed = False


# --- HTTP/2 over Noise ----------------------------------------------------------------------------


class _H2Session:
    def __init__(
        self, ctl: ControlServer, noise: _NoiseConn, machine_key: str, remote_ip: str
    ) -> None:
        self.ctl = ctl
        self.remote_ip = remote_ip
        self.noise = noise
        self.machine_key = machine_key
        cfg = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.bodies: dict[int, bytearray] = {}
        self.headers: dict[int, dict[str, str]] = {}
        self.window = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.dead: set[int] = set()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.noise.write(data)

    async def run(self) -> None:
        self.h2.initiate_connection()
        self.flush()
        try:
            while True:
                data = await self.noise.read()
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    log.warning("h2 protocol error: %s", exc)
                    self.flush()
                    return
                for ev in events:
                    self._event(ev)
                self.flush()
        except (asyncio.IncompleteReadError, ConnectionError, NoiseError) as exc:
            log.debug("noise session ended: %r", exc)
        finally:
            for t in list(self.tasks):
                t.cancel()

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self.headers[ev.stream_id] = {str(k): str(v) for k, v in ev.headers}
            self.bodies[ev.stream_id] = bytearray()
        elif isinstance(ev, h2.events.DataReceived):
            self.bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data)
            self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            task = asyncio.get_running_loop().create_task(self._handle(ev.stream_id))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif isinstance(ev, h2.events.StreamReset):
            self.dead.add(ev.stream_id)
            self.window.set()
        elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.window.set()

    async def send(self, sid: int, data: bytes, end: bool = False) -> None:
        while data:
            if sid in self.dead:
                raise ConnectionError("stream reset")
            n = min(
                self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size, len(data)
            )
            if n <= 0:
                self.window.clear()
                await self.window.wait()
                continue
            self.h2.send_data(sid, data[:n])
            data = data[n:]
            self.flush()
        if end:
            self.h2.end_stream(sid)
            self.flush()

    def respond(self, sid: int, status: int, ctype: str = "application/json") -> None:
        self.h2.send_headers(sid, [(":status", str(status)), ("content-type", ctype)])
        self.flush()

    async def _handle(self, sid: int) -> None:
        hdrs = self.headers.pop(sid, {})
        body = bytes(self.bodies.pop(sid, b""))
        path = hdrs.get(":path", "")
        try:
            if path == "/machine/register":
                res = self.ctl._register(self.machine_key, json.loads(body))
                self.respond(sid, 200)
                await self.send(sid, json.dumps(res).encode(), end=True)
            elif path == "/machine/map":
                await self._map(sid, json.loads(body))
            elif path in ("/machine/update-health", "/machine/set-dns"):
                self.respond(sid, 204 if path.endswith("health") else 200)
                await self.send(sid, b"", end=True)
            else:
                log.info("unhandled control request %s %s", hdrs.get(":method"), path)
                self.respond(sid, 404, "text/plain")
                await self.send(sid, b"not found\n", end=True)
        except (ConnectionError, h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        except Exception as exc:  # a bug here must show in the test's log, not vanish
            log.exception("control request %s failed: %r", path, exc)
            try:
                self.respond(sid, 400, "text/plain")
                await self.send(sid, str(exc).encode(), end=True)
            except (ConnectionError, h2.exceptions.H2Error):
                pass

    async def _map(self, sid: int, req: dict[str, Any]) -> None:
        node_key = str(req.get("NodeKey", ""))
        node = self.ctl._nodes.get(node_key)
        if node is None or node.machine_key != self.machine_key:
            self.respond(sid, 400, "text/plain")
            await self.send(sid, b"node not found\n", end=True)
            return
        log.debug(
            "map request from %s: %s",
            node.hostname,
            {k: v for k, v in req.items() if k != "Hostinfo"},
        )
        if not req.get("ReadOnly"):
            self.ctl._update_from_map(node, req, self.remote_ip)
        compress = bool(req.get("Compress"))
        streaming = bool(req.get("Stream")) and not req.get("ReadOnly")
        self.respond(sid, 200)
        if not streaming:
            await self._send_map(sid, self.ctl._map_response(node_key) or {}, compress)
            self.h2.end_stream(sid)
            self.flush()
            return
        stream = _Stream(node_key)
        self.ctl._streams.add(stream)
        try:
            while not stream.closed:
                res = self.ctl._map_response(node_key)
                if res is None:  # removed: the node's poll ends
                    break
                stream.wake.clear()
                await self._send_map(sid, res, compress)
                while True:
                    try:
                        await asyncio.wait_for(stream.wake.wait(), KEEPALIVE_SECONDS)
                        break
                    except TimeoutError:
                        await self._send_map(sid, {"KeepAlive": True}, compress)
            self.h2.end_stream(sid)
            self.flush()
        finally:
            self.ctl._streams.discard(stream)

    async def _send_map(self, sid: int, msg: dict[str, Any], compress: bool) -> None:
        raw = json.dumps(msg).encode()
        if compress:
            raw = zstandard.ZstdCompressor(level=1).compress(raw)
        await self.send(sid, struct.pack("<I", len(raw)) + raw)


# --- the server ---------------------------------------------------------------------------------


def _listen(host: str, port: int, netns: str | None) -> socket.socket:
    if netns is not None:
        from tests.netns import listen_in

        return listen_in(netns, host, port)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class ControlServer:
    """The control server: state, the asyncio listener, and the test API (see module doc)."""

    def __init__(self, domain: str = "tail-test.ts.net", endpoint_port: int = 41641) -> None:
        self.domain = domain
        self.endpoint_port = endpoint_port
        self._noise_key = X25519PrivateKey.generate()
        self._legacy_key = X25519PrivateKey.generate()
        self._users: dict[str, _User] = {}
        self._tagged = _User(TAGGED_DEVICES_ID, "tagged-devices", "Tagged Devices")
        self._authkeys: dict[str, tuple[str | None, tuple[str, ...]]] = {}
        self._nodes: dict[str, _Node] = {}  # by node key
        self._grants: list[_Grant] = []
        self._streams: set[_Stream] = set()
        self._next_id = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tls_server: asyncio.Server | None = None
        self._tmp = ""  # made by start() when it serves TLS, removed by stop()
        self.ca_file = ""
        self._changed: asyncio.Event | None = None
        self.url = ""

    # lifecycle -----------------------------------------------------------------------------
    def start(
        self, host: str, port: int = 0, *, netns: str | None = None, https_port: int | None = 443
    ) -> str:
        """Listen on host:port (inside netns when given) from a thread of its own; the URL.

        With https_port, also TLS on host:https_port, with a certificate for host from a CA
        of this server's (its PEM at `ca_file`: give it to tailscaled as SSL_CERT_FILE).
        tailscaled falls back to HTTPS on 443 whenever a control connection dropped less
        than 2 minutes after it was dialed (controlhttp's forceNoise443), and then keeps
        dialing 443 only: without this listener such a node never reconnects.
        """
        sock = _listen(host, port, netns)
        tls_sock = _listen(host, https_port, netns) if https_port is not None else None
        if tls_sock is not None:
            self._tmp = tempfile.mkdtemp(prefix="testcontrol-")
            self.ca_file = os.path.join(self._tmp, "ca.pem")
        ssl_ctx = self._tls_context(host) if tls_sock is not None else None
        port = sock.getsockname()[1]
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def serve() -> None:
                self._changed = asyncio.Event()
                self._server = await asyncio.start_server(self._http1, sock=sock)
                if tls_sock is not None:
                    self._tls_server = await asyncio.start_server(
                        self._http1, sock=tls_sock, ssl=ssl_ctx
                    )
                ready.set()

            loop.run_until_complete(serve())
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="testcontrol", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("testcontrol did not start")
        return self.url

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            for srv in (self._server, self._tls_server):
                if srv is not None:
                    srv.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _tls_context(self, host: str) -> ssl.SSLContext:
        """A CA (written to ca_file) and a leaf for host (an IP or a name) signed by it."""
        now = datetime.now(UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "testcontrol CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        with open(self.ca_file, "wb") as f:
            f.write(ca.public_bytes(Encoding.PEM))
        cert_path, key_path = os.path.join(self._tmp, "leaf.pem"), os.path.join(self._tmp, "k")
        with open(cert_path, "wb") as f:
            f.write(leaf.public_bytes(Encoding.PEM) + ca.public_bytes(Encoding.PEM))
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert_path, key_path)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run fn on the server's loop (state is only touched there)."""
        loop = self._loop
        if loop is None:
            return fn()
        if threading.current_thread() is self._thread:
            return fn()

        async def wrap() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrap(), loop).result(10)

    def _notify(self) -> None:
        for st in self._streams:
            st.wake.set()
        if self._changed is not None:
            self._changed.set()

    # API -----------------------------------------------------------------------------------
    def create_auth_key(
        self, user: str | None = None, tags: list[str] | tuple[str, ...] = ()
    ) -> str:
        """A reusable auth key that registers nodes as `user` (a login name) or as `tags`."""
        if (user is None) == (not tags):
            raise ValueError("an auth key is for a user or for tags, not both or neither")
        key = "tskey-auth-test-" + secrets.token_hex(12)

        def add() -> str:
            self._authkeys[key] = (user, tuple(tags))
            if user is not None:
                self._user(user)
            return key

        return self._call(add)

    def nodes(self) -> list[dict[str, Any]]:
        """Every node: name, id, node_key, user, tags, addresses, key_expiry, hostinfo."""

        def snap() -> list[dict[str, Any]]:
            return [
                {
                    "name": n.hostname,
                    "id": n.id,
                    "node_key": n.node_key,
                    "user": n.user.login,
                    "tags": list(n.tags),
                    "v4": n.v4,
                    "v6": n.v6,
                    "key_expiry": n.key_expiry,
                    "disco_key": n.disco_key,
                    "endpoints": list(n.endpoints),
                    "hostinfo": dict(n.hostinfo),
                }
                for n in self._nodes.values()
            ]

        return self._call(snap)

    def node(self, name: str) -> dict[str, Any]:
        for n in self.nodes():
            if n["name"] == name:
                return n
        raise KeyError(f"no node {name!r}")

    def wait_nodes(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Block until `count` nodes have registered and sent a map poll (with a disco key)."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.nodes()
            if len([n for n in nodes if n["disco_key"]]) >= count:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} of {count} nodes registered: {nodes}")
            time.sleep(0.1)

    def set_tags(self, name: str, tags: list[str]) -> None:
        """Change a node's tags (a user's node with tags becomes a tagged node)."""

        def change() -> None:
            n = self._by_name(name)
            n.tags = list(tags)
            if tags:
                n.user = self._tagged
            self._notify()

        self._call(change)

    def remove_node(self, name: str) -> None:
        """Delete a node: peers stop seeing it and its own map poll ends."""

        def remove() -> None:
            n = self._by_name(name)
            del self._nodes[n.node_key]
            self._grants = [g for g in self._grants if name not in (g.src, g.dst)]
            self._notify()

        self._call(remove)

    def set_key_expiry(self, name: str, when: datetime | None) -> None:
        """Set the node key's expiry (None: never expires), sent in the next netmap."""

        def change() -> None:
            n = self._by_name(name)
            n.key_expiry = (
                None if when is None else when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            )
            self._notify()

        self._call(change)

    def set_endpoints(self, name: str, endpoints: list[str] | None) -> None:
        """Offer peers these "ip:port" endpoints for node `name` (None: back to automatic:
        what it reports, else <source IP of its control connection>:endpoint_port)."""

        def change() -> None:
            n = self._by_name(name)
            n.fixed_endpoints = list(endpoints) if endpoints is not None else None
            if endpoints is not None:
                n.endpoints = list(endpoints)
            self._notify()

        self._call(change)

    def add_grant(self, src: str, dst: str, cap: str, values: list[Any] | None = None) -> None:
        """A grant: node `src` (hostname, or "*") gets app capability `cap` on node `dst`."""

        def add() -> None:
            self._grants.append(_Grant(src, dst, cap, list(values or [])))
            self._notify()

        self._call(add)

    # internals (run on the loop) ---------------------------------------------------------
    def _user(self, login: str) -> _User:
        u = self._users.get(login)
        if u is None:
            u = _User(1000 + len(self._users) + 1, login, login.split("@")[0].title())
            self._users[login] = u
        return u

    def _by_name(self, name: str) -> _Node:
        for n in self._nodes.values():
            if n.hostname == name:
                return n
        raise KeyError(f"no node {name!r}")

    def _register(self, machine_key: str, req: dict[str, Any]) -> dict[str, Any]:
        node_key = str(req.get("NodeKey") or "")
        if not node_key.startswith("nodekey:"):
            raise ValueError("register: no NodeKey")
        old = str(req.get("OldNodeKey") or "")
        if old in self._nodes and node_key not in self._nodes:
            moved = self._nodes.pop(old)
            moved.node_key = node_key
            self._nodes[node_key] = moved
        node = self._nodes.get(node_key)
        if node is None:
            auth = (req.get("Auth") or {}).get("AuthKey") or ""
            grant = self._authkeys.get(auth)
            if grant is None:
                return {"Error": "invalid authkey"}
            login, tags = grant
            user = self._tagged if tags else self._user(str(login))
            node = _Node(
                id=self._next_id,
                node_key=node_key,
                machine_key=machine_key,
                user=user,
                tags=list(tags),
                hostinfo=dict(req.get("Hostinfo") or {}),
                created=_now_iso(),
                cap=int(req.get("Version") or 0),
            )
            self._next_id += 1
            self._nodes[node_key] = node
            log.info(
                "registered %s (%s) as %s",
                node.hostname,
                node.v4,
                ",".join(node.tags) or node.user.login,
            )
            self._notify()
        elif node.machine_key != machine_key:
            return {"Error": "node key registered to another machine"}
        u = node.user
        return {
            "User": {"ID": u.id, "DisplayName": u.display},
            "Login": {
                "ID": u.id,
                "Provider": "testcontrol",
                "LoginName": u.login,
                "DisplayName": u.display,
            },
            "NodeKeyExpired": False,
            "MachineAuthorized": True,
            "AuthURL": "",
        }

    def _update_from_map(self, node: _Node, req: dict[str, Any], remote_ip: str) -> None:
        changed = False
        eps = [e for e in (req.get("Endpoints") or []) if not str(e).startswith("[fe80")]
        if not eps and self.endpoint_port:
            # With no DERP map (no STUN) tailscaled reports no endpoints of its own: offer
            # peers the address it reached us from, on its fixed WireGuard port.
            eps = [
                f"[{remote_ip}]:{self.endpoint_port}"
                if ":" in remote_ip
                else f"{remote_ip}:{self.endpoint_port}"
            ]
        if node.fixed_endpoints is not None:
            eps = node.fixed_endpoints
        if eps != node.endpoints:
            node.endpoints, changed = eps, True
        disco = str(req.get("DiscoKey") or "")
        if disco and disco != node.disco_key:
            node.disco_key, changed = disco, True
        if req.get("Hostinfo"):
            if req["Hostinfo"] != node.hostinfo:
                node.hostinfo, changed = dict(req["Hostinfo"]), True
        node.cap = int(req.get("Version") or node.cap)
        if changed:
            self._notify()

    def _packet_filter(self, node: _Node) -> list[dict[str, Any]]:
        rules: list[dict[str, Any]] = [
            {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]},
        ]
        for g in self._grants:
            if g.dst != node.hostname:
                continue
            if g.src == "*":
                srcs = ["*"]
            else:
                try:
                    s = self._by_name(g.src)
                except KeyError:
                    continue
                srcs = [f"{s.v4}/32", f"{s.v6}/128"]
            rules.append(
                {
                    "SrcIPs": srcs,
                    "CapGrant": [
                        {
                            "Dsts": [f"{node.v4}/32", f"{node.v6}/128"],
                            "CapMap": {g.cap: g.values or None},
                        }
                    ],
                }
            )
        return rules

    def _map_response(self, node_key: str) -> dict[str, Any] | None:
        node = self._nodes.get(node_key)
        if node is None:
            return None
        peers = [
            p.to_tailcfg(self.domain, p.user)
            for p in sorted(self._nodes.values(), key=lambda p: p.id)
            if p is not node
        ]
        users = {u.id: u for u in [*self._users.values(), self._tagged]}
        self_node = node.to_tailcfg(self.domain, node.user)
        # No DERP map here: keep tailscaled from probing the internet for a captive portal.
        self_node["CapMap"] = {"disable-captive-portal-detection": None}
        return {
            "Node": self_node,
            "Peers": peers,
            "Domain": self.domain,
            "CollectServices": True,
            "PacketFilter": self._packet_filter(node),
            "UserProfiles": [u.profile() for u in users.values()],
            "ControlTime": _now_iso(),
        }

    # HTTP/1 front door ---------------------------------------------------------------------
    async def _http1(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            hdrs = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    hdrs[k.strip().lower()] = v.strip()
            length = int(hdrs.get("content-length", "0") or 0)
            body = await reader.readexactly(min(length, MSG_LIMIT)) if length else b""
            path = target.split("?", 1)[0]
            if path == "/ts2021" and method == "POST":
                await self._upgrade(reader, writer, hdrs)
                return
            status, payload = self._http1_route(method, target, body)
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
            ValueError,
        ) as exc:
            log.debug("http1: %r", exc)
        finally:
            writer.close()

    def _http1_route(self, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        path = target.split("?", 1)[0]
        if path == "/key":
            pub = {
                "legacyPublicKey": "mkey:" + _pub(self._legacy_key).hex(),
                "publicKey": "mkey:" + _pub(self._noise_key).hex(),
            }
            return 200, json.dumps(pub).encode()
        if path == "/test/nodes":
            return 200, json.dumps(self.nodes()).encode()
        if method != "POST" or not path.startswith("/test/"):
            return 404, b'{"error":"not found"}'
        try:
            req = json.loads(body or b"{}")
            out: Any = {}
            if path == "/test/authkey":
                out = {"key": self.create_auth_key(req.get("user"), req.get("tags") or ())}
            elif path == "/test/tags":
                self.set_tags(req["node"], list(req["tags"]))
            elif path == "/test/remove":
                self.remove_node(req["node"])
            elif path == "/test/expiry":
                exp = req.get("expiry")
                self.set_key_expiry(
                    req["node"],
                    None if exp is None else datetime.fromisoformat(exp.replace("Z", "+00:00")),
                )
            elif path == "/test/endpoints":
                self.set_endpoints(req["node"], req.get("endpoints"))
            elif path == "/test/grant":
                self.add_grant(req["src"], req["dst"], req["cap"], req.get("values"))
            else:
                return 404, b'{"error":"not found"}'
            return 200, json.dumps(out).encode()
        except (KeyError, ValueError, TypeError) as exc:
            return 400, json.dumps({"error": repr(exc)}).encode()

    async def _upgrade(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hdrs: dict[str, str]
    ) -> None:
        if hdrs.get("upgrade", "").lower() != "tailscale-control-protocol":
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        try:
            init = base64.b64decode(hdrs.get("x-tailscale-handshake", ""), validate=True)
            resp, machine, tx, rx = noise_accept(self._noise_key, init)
        except (ValueError, NoiseError) as exc:
            log.warning("noise handshake refused: %s", exc)
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n\r\n" + resp
        )
        noise = _NoiseConn(reader, writer, tx, rx)
        peer = writer.get_extra_info("peername") or ("", 0)
        await _H2Session(self, noise, "mkey:" + machine.hex(), str(peer[0])).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.fakes.testcontrol", description="Tailscale test control server"
    )
    ap.add_argument("--listen", required=True, help="ADDR:PORT (PORT 0: any)")
    ap.add_argument("--netns", help="listen inside this network namespace")
    ap.add_argument("--domain", default="tail-test.ts.net")
    ap.add_argument(
        "--endpoint-port",
        type=int,
        default=41641,
        help="WireGuard port offered to peers with a node's source IP",
    )
    ap.add_argument(
        "--https-port",
        type=int,
        default=443,
        help="also serve TLS here (0: not at all); its CA is printed as ca_file",
    )
    ap.add_argument(
        "--authkey",
        action="append",
        default=[],
        help="make an auth key for a login name or for tag:a,tag:b (repeatable)",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="testcontrol: %(message)s",
        stream=sys.stderr,
    )
    host, _, port = args.listen.rpartition(":")
    ctl = ControlServer(args.domain, endpoint_port=args.endpoint_port)
    ctl.start(host.strip("[]"), int(port), netns=args.netns, https_port=args.https_port or None)
    keys = {}
    for spec in args.authkey:
        if spec.startswith("tag:"):
            keys[spec] = ctl.create_auth_key(tags=spec.split(","))
        else:
            keys[spec] = ctl.create_auth_key(user=spec)
    print(json.dumps({"url": ctl.url, "ca_file": ctl.ca_file, "authkeys": keys}), flush=True)
    # SIGTERM stops it cleanly too (the temp dir with its CA goes).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ctl.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
