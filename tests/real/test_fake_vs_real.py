"""The fake tailscaled (tests/fakes/fake_tailscaled.py) against the real 1.96.4, side by side.

The same LocalAPI requests go to the real server node and to a FakeTailscaled told to be
1.96.4; what clawgate depends on must match: status codes and error bodies, the security
headers, the whois/status fields clawgate parses, the IPN bus framing. (Data differs by
design: the fake's peers are not our tailnet's.)
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.fake_tailscaled import (
    DEFAULT_ALICE_IP,
    SELF_HOST,
    SELF_IPV4,
    TAILNET,
    FakeTailscaled,
)
from tests.real.tailnet import RealTailnet

pytestmark = pytest.mark.netns

REAL_VERSION = "1.96.4-t8cf541dfd-g62bc84ce7"


def _raw(
    sock_path: str, path: str, host: str = "local-tailscaled.sock", read_for: float | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 GET over the unix socket: (status, headers, de-chunked body)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(0.5 if read_for else 5)
    s.connect(sock_path)
    close = "" if read_for else "Connection: close\r\n"
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{close}\r\n".encode())
    data = b""
    deadline = time.monotonic() + (read_for or 10)
    try:
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pass
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            try:
                n = int(size, 16)
            except ValueError:
                break
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2 :]
        body = out
    return int(lines[0].split(" ", 2)[1]), headers, body


SECURITY_HEADERS = (
    "content-security-policy",
    "x-frame-options",
    "x-content-type-options",
    "tailscale-version",
    "tailscale-cap",
)


async def test_fake_tailscaled_matches_the_real_daemon(real_tailnet: RealTailnet) -> None:
    tn = real_tailnet
    real_sock = tn.nodes["server"].socket_path
    with tempfile.TemporaryDirectory(prefix="cg-fake-vs-real-") as d:
        fake = FakeTailscaled(Path(d) / "tailscaled.sock", version=REAL_VERSION)
        fake.cert_domains = []  # as our control server: no CertDomains in the netmap
        await fake.start()
        try:

            async def both(path: str, **kw: Any) -> tuple[Any, Any]:
                return (
                    await asyncio.to_thread(_raw, real_sock, path, **kw),
                    await asyncio.to_thread(_raw, fake.socket_path, path, **kw),
                )

            # Errors clawgate maps to verdicts: same status, same body.
            for path in (
                "/localapi/v0/whois?addr=100.99.1.1:1",
                "/localapi/v0/whois?addr=nonsense",
                f"/localapi/v0/whois?addr=[::ffff:{tn.v4('phone')}]:1234",
                "/localapi/v0/cert/server.tail-test.ts.net?type=pair",
            ):
                real, fk = await both(path)
                if "ffff" in path:  # the fake's peer at its own address
                    fk = await asyncio.to_thread(
                        _raw,
                        fake.socket_path,
                        f"/localapi/v0/whois?addr=[::ffff:{DEFAULT_ALICE_IP}]:1234",
                    )
                assert (real[0], real[2]) == (fk[0], fk[2]), path
            real, fk = await both("/localapi/v0/status", host="evil.example")
            assert (real[0], real[2]) == (fk[0], fk[2]) == (403, b"invalid localapi request\n")

            # The headers of a successful answer.
            real, fk = await both("/localapi/v0/status?peers=false")
            assert real[0] == fk[0] == 200
            for h in SECURITY_HEADERS:
                assert real[1].get(h) == fk[1].get(h), (h, real[1], fk[1])
            assert real[2].startswith(b"{\n\t") and fk[2].startswith(b"{\n\t")  # tab-indented

            # The fields clawgate reads from status and whois exist in both, same types.
            rs, fs = json.loads(real[2]), json.loads(fk[2])
            for key in ("BackendState", "TailscaleIPs", "Self", "Health", "CertDomains"):
                assert key in rs and key in fs, key
            for key in ("DNSName", "HostName", "OS", "TailscaleIPs", "KeyExpiry", "Online"):
                assert (key in rs["Self"]) or key == "KeyExpiry", key
                assert key in fs["Self"], key
            whois_real = json.loads(
                (
                    await asyncio.to_thread(
                        _raw, real_sock, f"/localapi/v0/whois?addr={tn.v4('phone')}:1"
                    )
                )[2]
            )
            whois_fake = json.loads(
                (
                    await asyncio.to_thread(
                        _raw, fake.socket_path, f"/localapi/v0/whois?addr={DEFAULT_ALICE_IP}:1"
                    )
                )[2]
            )
            assert set(whois_real) == set(whois_fake) == {"Node", "UserProfile", "CapMap"}
            for key in (
                "ID",
                "StableID",
                "Name",
                "User",
                "Key",
                "Addresses",
                "Hostinfo",
                "ComputedName",
                "ComputedNameWithHost",
                "MachineAuthorized",
            ):
                assert key in whois_real["Node"] and key in whois_fake["Node"], key
            assert set(whois_real["UserProfile"]) <= set(whois_fake["UserProfile"])

            # whois of the node's own address: the node itself (and its owner), not a 404.
            real_self = await asyncio.to_thread(
                _raw, real_sock, f"/localapi/v0/whois?addr={tn.v4('server')}:1"
            )
            fake_self = await asyncio.to_thread(
                _raw, fake.socket_path, f"/localapi/v0/whois?addr={SELF_IPV4}:1"
            )
            assert real_self[0] == fake_self[0] == 200
            rn, fn = json.loads(real_self[2]), json.loads(fake_self[2])
            assert rn["Node"]["Name"] == "server.tail-test.ts.net."
            assert fn["Node"]["Name"] == f"{SELF_HOST}.{TAILNET}."
            assert fn["Node"]["User"] == fn["UserProfile"]["ID"]

            # IPN bus, mask 2: one chunked JSON line first, same keys, NetMap null.
            real, fk = await both("/localapi/v0/watch-ipn-bus?mask=2", read_for=1.5)
            assert real[1].get("transfer-encoding") == fk[1].get("transfer-encoding") == "chunked"
            r0, f0 = (json.loads(x[2].split(b"\n", 1)[0]) for x in (real, fk))
            assert set(r0) == set(f0), (sorted(r0), sorted(f0))
            assert r0["NetMap"] is None and f0["NetMap"] is None
            assert r0["State"] == f0["State"] == 6  # Running
        finally:
            await fake.stop()
