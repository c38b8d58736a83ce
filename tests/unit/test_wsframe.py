"""Tests of proxy/core/wsframe.py's first-frame parser and FrameTracker.bytes_to_boundary,
as tables over real frame bytes."""

from __future__ import annotations

import os

import pytest

from proxy.core.wsframe import FrameTracker, parse_client_frame


def masked(
    payload: bytes,
    opcode: int = 0x1,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    key: bytes = b"\x01\x02\x03\x04",
) -> bytes:
    b0 = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    if n < 126:
        head = bytes((b0, (0x80 if mask else 0) | n))
    elif n < 65536:
        head = bytes((b0, (0x80 if mask else 0) | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, (0x80 if mask else 0) | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + body


@pytest.mark.parametrize(
    ("frame", "limit", "status"),
    [
        (masked(b'{"type":"req"}'), 1024, "ok"),
        (masked(b"x" * 200), 1024, "ok"),  # 16-bit length
        (masked(b"x" * 70000), 1 << 20, "ok"),  # 64-bit length
        (masked(b"x" * 200), 100, "first frame too large"),
        (masked(b"hi", opcode=0x2), 1024, "first frame must be a text frame"),
        (masked(b"hi", opcode=0x9), 1024, "first frame must be a text frame"),
        (masked(b"hi", fin=False), 1024, "first frame must not be fragmented"),
        (masked(b"hi", opcode=0x0), 1024, "first frame must not be fragmented"),
        (masked(b"hi", rsv=0x40), 1024, "reserved bits set"),
        (masked(b"hi", mask=False), 1024, "client frames must be masked"),
    ],
)
def test_first_frame_table(frame: bytes, limit: int, status: str) -> None:
    got, payload, end = parse_client_frame(frame + b"next", limit)
    assert got == status
    if status == "ok":
        assert end == len(frame)
        assert payload is not None and masked(payload) == frame
    else:
        assert payload is None and end == 0


@pytest.mark.parametrize("size", [0, 5, 125, 126, 300, 65535, 65536])
def test_every_prefix_asks_for_more(size: int) -> None:
    frame = masked(os.urandom(size), key=os.urandom(4))
    for cut in range(0, len(frame), max(1, len(frame) // 40)):
        assert parse_client_frame(frame[:cut], 1 << 20) == ("more", None, 0)
    status, payload, end = parse_client_frame(frame, 1 << 20)
    assert (status, end) == ("ok", len(frame)) and payload is not None and len(payload) == size


@pytest.mark.parametrize("cut", range(2, 10))
def test_a_cut_64_bit_length_asks_for_more(cut: int) -> None:
    # A 127 length marker needs all eight length bytes before the size is known.
    frame = masked(b"x" * 70000)
    assert parse_client_frame(frame[:cut], 1 << 20) == ("more", None, 0)


def unmasked(payload: bytes, opcode: int = 0x1) -> bytes:
    """A server-to-client frame (what FrameTracker follows)."""
    return masked(payload, opcode=opcode, mask=False)


SMALL = unmasked(b"abc")  # 2 + 3 bytes
MID = unmasked(b"m" * 300)  # 4 + 300 bytes
BIG = unmasked(b"b" * 70000)  # 10 + 70000 bytes


@pytest.mark.parametrize(
    ("before", "data", "used"),
    [
        # Already at a frame edge: nothing is taken.
        (b"", SMALL, 0),
        (SMALL, SMALL + SMALL, 0),
        # Inside a frame's payload: up to its end, not into the next frame.
        (SMALL[:3], SMALL[3:] + SMALL, 2),
        (MID[:4], MID[4:] + SMALL, 300),
        (MID[:100], MID[100:] + SMALL, 204),
        (BIG[:10], BIG[10:] + SMALL, 70000),
        # Inside a frame header: byte by byte through the header, then the payload.
        (SMALL[:1], SMALL[1:] + SMALL, 4),
        (MID[:1], MID[1:] + SMALL, 303),
        (MID[:3], MID[3:], 301),
        (BIG[:5], BIG[5:] + SMALL, 70005),
        # The data ends before the frame does: all of it fed, no edge reached.
        (SMALL[:3], SMALL[3:4], -1),
        (MID[:1], MID[1:3], -1),
        (BIG[:10], BIG[10:5000], -1),
        (SMALL[:3], b"", -1),
    ],
)
def test_bytes_to_boundary(before: bytes, data: bytes, used: int) -> None:
    ft = FrameTracker()
    ft.feed(before)
    assert ft.bytes_to_boundary(data) == used
    if used >= 0:
        assert ft.at_boundary
        # What is left of ``data`` starts a whole frame (or is empty).
        rest = data[used:]
        ft.feed(rest)
        assert ft.at_boundary == (rest in (b"", SMALL, SMALL + SMALL))
    else:
        assert not ft.at_boundary
