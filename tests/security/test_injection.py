"""CR, LF, NUL and other control characters in every value clawgate injects, live.

clawgate writes values it did not choose into the head it sends the gateway: the Tailscale
login, display name, profile picture, node name and tags (from tailscaled's whois answer),
and the client's Host (as X-Forwarded-Host). A value that cannot be a header value must be
refused (403, or 400 for the client's own head), never injected: no header splitting, no
control character the gateway's parser would choke on, no extra header line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fakes.fake_gateway import FakeGateway
from tests.netns import CI_V4, PHONE_V4, Tailnet
from tests.support import (
    HOST,
    IDENTITY_HEADER,
    alice_body,
    ci_body,
    fake_tailscaled,
    identity_config,
    plain_config,
    raw_send,
    running,
    status_of,
)

# (label, role, whois body, expected status)
IDENTITIES: list[tuple[str, str, dict[str, Any], int]] = [
    (
        "login CRLF header",
        "phone",
        alice_body(login="alice@example.com\r\nX-Injected: admin@example.com"),
        403,
    ),
    ("login lone CR", "phone", alice_body(login="alice\r@example.com"), 403),
    ("login lone LF", "phone", alice_body(login="alice@example.com\n"), 403),
    ("login NUL", "phone", alice_body(login="alice\x00@example.com"), 403),
    ("login SOH", "phone", alice_body(login="alice\x01@example.com"), 403),
    ("login ESC", "phone", alice_body(login="\x1b[31malice@example.com"), 403),
    ("login VT", "phone", alice_body(login="alice\x0b@example.com"), 403),
    ("login DEL", "phone", alice_body(login="alice\x7f@example.com"), 403),
    ("login U+2028", "phone", alice_body(login="alice\u2028@example.com"), 200),
    ("login NEL", "phone", alice_body(login="alice\u0085@example.com"), 200),
    ("display name CRLF", "phone", alice_body(display_name="Alice\r\nX-Injected: 1"), 403),
    ("display name SOH (q-encoded)", "phone", alice_body(display_name="Alice\x01"), 200),
    (
        "profile pic CRLF",
        "phone",
        alice_body(profile_pic="https://pic.example/a\r\nX-Injected: 1"),
        403,
    ),
    ("profile pic NUL", "phone", alice_body(profile_pic="https://pic.example/\x00"), 403),
    ("profile pic SOH", "phone", alice_body(profile_pic="https://pic.example/\x01"), 403),
    ("tagged node name CRLF", "ci", ci_body(node_name="ci\r\nX-Injected: 1"), 403),
    ("tagged node name SOH", "ci", ci_body(node_name="ci\x01"), 403),
    ("clean user", "phone", alice_body(), 200),
    ("clean tagged", "ci", ci_body(), 200),
]


def _tags(body: dict[str, Any], tags: list[str]) -> dict[str, Any]:
    body["Node"]["Tags"] = tags
    return body


IDENTITIES += [
    ("tag CRLF", "ci", _tags(ci_body(), ["tag:ci\r\nX-Injected: 1"]), 403),
    ("tag NUL", "ci", _tags(ci_body(), ["tag:ci\x00"]), 403),
]


def bad_bytes(raw_head: bytes) -> list[bytes]:
    """Header lines of a head with a control character other than HTAB."""
    lines = raw_head[:-4].split(b"\r\n")
    return [ln for ln in lines if any((c < 0x20 and c != 0x09) or c == 0x7F for c in ln)]


async def test_identity_values_are_refused_not_injected(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with fake_tailscaled() as ts:
        cfg = identity_config(
            fake_gateway, ts.socket_path, cacheTtl=0, taggedIdentity="{node} {tags}"
        )
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            problems = []
            for i, (label, role, body, want) in enumerate(IDENTITIES):
                ts.add_peer(PHONE_V4 if role == "phone" else CI_V4, body, notify=False)
                before = len(fake_gateway.requests)
                resp = await raw_send(
                    tailnet,
                    role,
                    (
                        f"GET /headers?case={i} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer "
                        f"{cg.tokens['phone']}\r\nConnection: close\r\n\r\n"
                    ).encode(),
                )
                got = status_of(resp)
                recs = fake_gateway.requests[before:]
                if got != want:
                    problems.append(f"{label}: {got}, want {want}")
                if got != 200:
                    if recs:
                        problems.append(f"{label}: refused but forwarded")
                    continue
                (rec,) = recs
                names = {n.lower() for n, _ in rec.headers}
                if "x-injected" in names or bad_bytes(rec.raw_head):
                    problems.append(f"{label}: injected {bad_bytes(rec.raw_head)}")
                if len(rec.header_all(IDENTITY_HEADER)) != 1:
                    problems.append(f"{label}: identity header {rec.header_all(IDENTITY_HEADER)}")
            assert problems == []
            refused = [
                r
                for r in cg.access_log()
                if r.get("reason") == "identity value not representable in a header"
            ]
            assert len(refused) == sum(1 for *_, want in IDENTITIES if want == 403)


HOSTS: list[tuple[bytes, int]] = [
    (b"a\rb", 400),
    (b"a\nb", 400),
    (b"a\x00b", 400),
    (b"a\x01b", 400),
    (b"a\x7fb", 400),
    (b"a\x0bb", 400),
    (b"a\x0cb", 400),
    (b"a\x1bb", 400),
    # Host must name clawgate (DNS rebinding, issue 12 item 4): anything else is 421.
    (b"gw.example:18789", 421),
    (b"\xff\xfe", 421),
    (b"a\tb", 421),
    (b"a b", 421),
    (b"   padded   ", 421),
    (b"", 421),
    (b"x" * 2000, 421),
    (b"[::1]:1", 200),
    (b"100.64.0.1:18789", 200),
    (b"   100.64.0.1:18789   ", 200),
    (b"100.64.0.1\t", 200),
    (b"LOCALHOST", 200),
]


async def test_host_reaches_x_forwarded_host_only_as_a_clean_value(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with running(tailnet, tmp_path / "cg", plain_config(fake_gateway)) as cg:
        got = {}
        for i, (host, _) in enumerate(HOSTS):
            before = len(fake_gateway.requests)
            resp = await raw_send(
                tailnet,
                "phone",
                b"GET /headers?case=%d HTTP/1.1\r\nHost: " % i
                + host
                + b"\r\nAuthorization: Bearer "
                + cg.tokens["phone"].encode()
                + b"\r\nConnection: close\r\n\r\n",
            )
            got[host] = status_of(resp)
            recs = fake_gateway.requests[before:]
            if got[host] != 200:
                assert recs == [], host
                continue
            (rec,) = recs
            assert bad_bytes(rec.raw_head) == [], (host, rec.raw_head)
            lines = rec.raw_head[:-4].split(b"\r\n")[1:]
            hosts = [
                ln.partition(b":")[2].strip(b" \t")
                for ln in lines
                if ln.lower().startswith(b"host:")
            ]
            xfh = [
                ln.partition(b":")[2].strip(b" \t")
                for ln in lines
                if ln.lower().startswith(b"x-forwarded-host:")
            ]
            # X-Forwarded-Host is the Host the gateway got, byte for byte, exactly once.
            assert xfh == hosts and len(hosts) == 1, (host, lines)
        assert got == dict(HOSTS)
