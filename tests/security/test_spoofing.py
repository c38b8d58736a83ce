"""Forwarded and identity header spoofing, every variant, against the live proxy.

Each forwarding or identity header a client could use to lie about itself (Forwarded, the
X-Forwarded-* family, X-Real-IP, True-Client-IP, the Tailscale-* identity headers and the
configured identity header) is sent in many spellings (case mixes, '_' for '-') and forms
(duplicated, padded with whitespace, empty, folded, listed in Connection), on plain
requests and on WebSocket upgrades. The gateway must see none of the client's values: only
clawgate's own X-Forwarded-For (the real peer, exactly once) and the identity headers of
the real Tailscale identity. Folded lines are refused outright (400, nothing forwarded).
"""

from __future__ import annotations

from pathlib import Path

from tests.fakes.fake_gateway import FakeGateway, RecordedRequest
from tests.netns import GW_V4, PHONE_V4, Tailnet
from tests.support import (
    ALICE,
    ALICE_PIC,
    HOST,
    IDENTITY_HEADER,
    PORT,
    fake_tailscaled,
    forwarding_view,
    gather_limited,
    identity_config,
    norm,
    raw_send,
    running,
    status_of,
)
from tests.util import open_in, read_response

SPOOF_NAMES = [
    "Forwarded",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Forwarded-Server",
    "X-Forwarded-User",
    "X-Real-IP",
    "True-Client-IP",
    "Tailscale-User-Login",
    "Tailscale-User-Name",
    "Tailscale-User-Profile-Pic",
    "Tailscale-Headers-Info",
    "Tailscale-Funnel-Request",
    IDENTITY_HEADER,
]

# What the gateway must see, and nothing else of these families: clawgate's own values.
EXPECTED = {
    "x-forwarded-for": [PHONE_V4],
    "x-forwarded-proto": ["http"],
    "x-forwarded-host": [HOST],
    norm(IDENTITY_HEADER): [ALICE],
    "tailscale-user-login": [ALICE],
    "tailscale-user-name": ["Alice Example"],
    "tailscale-user-profile-pic": [ALICE_PIC],
}


def spellings(name: str) -> list[str]:
    alt = "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(name))
    alt2 = "".join(c.lower() if i % 2 else c.upper() for i, c in enumerate(name))
    out = [
        name,
        name.lower(),
        name.upper(),
        alt,
        alt2,
        name.replace("-", "_"),
        name.lower().replace("-", "_"),
        name.replace("-", "_", 1),
        alt.replace("-", "_"),
    ]
    return list(dict.fromkeys(out))


def forms(s: str, v: str) -> dict[str, tuple[list[str], int]]:
    """form -> (header lines, expected status)."""
    return {
        "plain": ([f"{s}: {v}"], 200),
        "no-space": ([f"{s}:{v}"], 200),
        "duplicated": ([f"{s}: {v}", f"{s}: {v}-2"], 200),
        "two-spellings": ([f"{s}: {v}", f"{s.swapcase()}: {v}-3"], 200),
        "whitespace": ([f"{s}: \t  {v} \t "], 200),
        "empty": ([f"{s}:"], 200),
        "in-connection": ([f"Connection: keep-alive, {s}", f"{s}: {v}"], 200),
        "connection-after": ([f"{s}: {v}", f"Connection: {s}, close"], 200),
        "folded": ([f"{s}: {v}", f"  {v}-folded"], 400),
        "fold-looks-like-header": (["X-Other: a", f"\t{s}: {v}"], 400),
    }


FORMS = list(forms("X", "v"))


def cases(token: str) -> list[tuple[str, bytes, int, str]]:
    """(label, request bytes, expected status, marker) for every name x spelling x form."""
    out: list[tuple[str, bytes, int, str]] = []
    for name in SPOOF_NAMES:
        for s in spellings(name):
            for form in FORMS:
                marker = f"spoof{len(out)}z"
                lines, status = forms(s, f"10.9.8.7;{marker}")[form]
                head = [
                    f"GET /headers?case={len(out)} HTTP/1.1",
                    f"Host: {HOST}",
                    f"Authorization: Bearer {token}",
                    "Connection: close",
                    *lines,
                ]
                out.append(
                    (
                        f"{name} as {s!r} ({form})",
                        ("\r\n".join(head) + "\r\n\r\n").encode(),
                        status,
                        marker,
                    )
                )
    return out


async def test_no_spoofed_header_reaches_the_gateway(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with (
        fake_tailscaled() as ts,
        running(tailnet, tmp_path / "cg", identity_config(fake_gateway, ts.socket_path)) as cg,
    ):
        table = cases(cg.tokens["phone"])
        assert len(table) > 1000
        answers = await gather_limited(
            [raw_send(tailnet, "phone", raw) for _, raw, _, _ in table], 8
        )
        wrong_status = [
            (label, status_of(a), want)
            for (label, _, want, _), a in zip(table, answers, strict=True)
            if status_of(a) != want
        ]
        assert wrong_status == []
        by_case: dict[str, list[RecordedRequest]] = {}
        for rec in fake_gateway.requests:
            by_case.setdefault(rec.query["case"][0], []).append(rec)
        problems = []
        for i, (label, _, want, marker) in enumerate(table):
            recs = by_case.get(str(i), [])
            if want != 200:
                if recs:
                    problems.append(f"{label}: refused but forwarded")
                continue
            if len(recs) != 1:
                problems.append(f"{label}: forwarded {len(recs)} times")
                continue
            rec = recs[0]
            view = forwarding_view(rec)
            if view != EXPECTED:
                problems.append(f"{label}: gateway saw {view}")
            if marker.encode() in rec.raw_head:
                problems.append(f"{label}: the spoofed value reached the gateway")
        assert problems == [], problems[:20]


async def test_no_spoofed_header_rides_a_websocket_upgrade(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with (
        fake_tailscaled() as ts,
        running(tailnet, tmp_path / "cg", identity_config(fake_gateway, ts.socket_path)) as cg,
    ):
        token = cg.tokens["phone"]
        table: list[bytes] = []
        for name in SPOOF_NAMES:
            for s in (name, name.lower().replace("-", "_")):
                for extra in (
                    [f"{s}: spoof{len(table)}z"],
                    [f"{s}: spoof{len(table)}z", f"{s}: spoof{len(table)}z"],
                    [f"{s}: \t spoof{len(table)}z \t"],
                ):
                    conn = "Upgrade" if len(extra) < 2 else f"Upgrade, {s}"
                    head = [
                        f"GET /ws?case={len(table)} HTTP/1.1",
                        f"Host: {HOST}",
                        f"Authorization: Bearer {token}",
                        "Upgrade: websocket",
                        f"Connection: {conn}",
                        "Sec-WebSocket-Version: 13",
                        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                        *extra,
                    ]
                    table.append(("\r\n".join(head) + "\r\n\r\n").encode())

        async def upgrade(raw: bytes) -> int:
            reader, writer = await open_in(tailnet.ns("phone"), GW_V4, PORT)
            try:
                writer.write(raw)
                return (await read_response(reader, timeout=10)).status
            finally:
                writer.close()

        statuses = await gather_limited([upgrade(raw) for raw in table], 8)
        assert statuses == [101] * len(table)
        await fake_gateway.wait_until(lambda: len(fake_gateway.requests) == len(table))
        for rec in fake_gateway.requests:
            assert rec.websocket
            assert forwarding_view(rec) == EXPECTED, (rec.target, forwarding_view(rec))
            assert b"spoof" not in rec.raw_head, rec.raw_head
