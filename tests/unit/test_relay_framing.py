"""Tests of the framing helpers in proxy/core: ChunkedScanner (http1), FrameTracker, close_frame.

However a valid stream is cut into reads, ChunkedScanner finds the same end of the body and
FrameTracker reports a frame boundary exactly where one is; malformed chunked framing is a
ValueError, never a wrong answer.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.http1 import REQUEST_FREE_CHUNKS, ChunkedScanner
from proxy.core.wsframe import FrameTracker, close_frame

# ----------------------------------------------------------------------------- helpers


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split data at the given offsets (sorted, deduplicated, inside the data)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    pieces, prev = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[prev:p])
        prev = p
    return [p for p in pieces if p] or [b""]


def scan(pieces: list[bytes]) -> int:
    """Global offset just past the end of the chunked body, or -1."""
    sc = ChunkedScanner()
    seen = 0
    for piece in pieces:
        end = sc.feed(piece)
        if end >= 0:
            return seen + end
        seen += len(piece)
    return -1


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    out = b""
    for data in draw(st.lists(st.binary(min_size=1, max_size=300), max_size=6)):
        size = f"{len(data):x}"
        size = draw(st.sampled_from([size, size.upper(), "0" * draw(st.integers(0, 3)) + size]))
        ext = draw(st.sampled_from(["", ";a=b", ';name="quoted"', ";x"]))
        out += f"{size}{ext}\r\n".encode() + data + b"\r\n"
    out += draw(st.sampled_from([b"0", b"000", b"0;last"])) + b"\r\n"
    for name, value in draw(
        st.lists(
            st.tuples(
                st.sampled_from([b"X-Trailer", b"Checksum", b"a"]),
                st.binary(max_size=20).map(lambda b: bytes(c for c in b if 0x20 < c < 0x7F)),
            ),
            max_size=3,
        )
    ):
        out += name + b": " + value + b"\r\n"
    return out + b"\r\n"


# ----------------------------------------------------------------------------- chunked


@settings(max_examples=500, deadline=None)
@given(chunked_bodies(), st.lists(st.integers(0, 3000), max_size=30), st.binary(max_size=20))
def test_chunked_end_is_independent_of_chunking(
    body: bytes, cuts: list[int], following: bytes
) -> None:
    stream = body + following  # the next message (or garbage) follows the body
    assert scan([stream]) == len(body)
    assert scan(cut(stream, cuts)) == len(body)
    assert scan([bytes([b]) for b in stream]) == len(body)


@settings(max_examples=200, deadline=None)
@given(chunked_bodies(), st.integers(1, 10**6))
def test_incomplete_chunked_body_needs_more(body: bytes, drop: int) -> None:
    drop = min(drop, len(body))
    assert scan(cut(body[:-drop], [3, 7, 20])) == -1


def test_scanner_can_be_reused_for_the_next_message() -> None:
    sc = ChunkedScanner()
    one = b"3\r\nabc\r\n0\r\n\r\n"
    assert sc.feed(one + one) == len(one)
    assert sc.feed(one) == len(one)


MALFORMED: list[bytes] = [
    b"3\nabc\r\n0\r\n\r\n",  # bare LF after the size
    b"3\r\nabc\n0\r\n\r\n",  # bare LF after data
    b"3\r\nabcX\r\n0\r\n\r\n",  # data longer than declared
    b"3\r\nab\r\n\r\n0\r\n\r\n",  # data shorter: CRLF eaten as data, then 'CR LF' mismatch
    b"g\r\n",
    b"-1\r\n",
    b"+1\r\n",
    b"0x3\r\nabc\r\n",
    b" 3\r\nabc\r\n",
    b"3 \r\nabc\r\n",
    b"\r\n",  # empty size
    b";ext\r\n",
    b"1" * 17 + b"\r\n",  # more than 16 hex digits
    b"0\r\nX-Trailer\r\n\r\n",  # trailer without a colon
    b"0\r\nX: a\r\n folded\r\n\r\n",  # obs-fold in a trailer
    b"0\r\nX: a\n\r\n",
    b"5" + b"0" * 5000,  # a size line that never ends
]


@pytest.mark.parametrize("data", MALFORMED, ids=[repr(d[:24]) for d in MALFORMED])
@pytest.mark.parametrize("bytewise", [False, True])
def test_malformed_chunked_raises(data: bytes, bytewise: bool) -> None:
    sc = ChunkedScanner()
    pieces = [bytes([b]) for b in data] if bytewise else [data]
    with pytest.raises(ValueError):
        for piece in pieces:
            assert sc.feed(piece) == -1


def tiny_chunks(n: int, size: int = 1) -> bytes:
    return (b"%x\r\n" % size + b"x" * size + b"\r\n") * n


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        (tiny_chunks(REQUEST_FREE_CHUNKS - 1) + b"0\r\n\r\n", True),
        (tiny_chunks(REQUEST_FREE_CHUNKS) + b"0\r\n\r\n", False),  # the last-chunk is one too
        (tiny_chunks(3000, 4096) + b"0\r\n\r\n", True),  # one more allowed per 4 KiB
        (tiny_chunks(1000, 4096) + tiny_chunks(1000) + b"0\r\n\r\n", True),
        (tiny_chunks(1000, 4096) + tiny_chunks(1100) + b"0\r\n\r\n", False),
        (tiny_chunks(1) + b"0\r\n" + b"X-A: 1\r\n" * 1100 + b"\r\n", False),  # trailer lines count
    ],
)
def test_request_scanner_bounds_the_number_of_chunks(body: bytes, ok: bool) -> None:
    sc = ChunkedScanner(request=True)
    if ok:
        assert sc.feed(body) == len(body)
        return
    with pytest.raises(ValueError, match="too many chunks"):
        sc.feed(body)
    # The gateway's own responses (e.g. a stream of small events) are not bounded.
    assert ChunkedScanner().feed(body) == len(body)


def test_request_scanner_budget_is_per_message() -> None:
    sc = ChunkedScanner(request=True)
    one = tiny_chunks(REQUEST_FREE_CHUNKS - 1) + b"0\r\n\r\n"
    for _ in range(3):
        assert sc.feed(one) == len(one)


BAD_TRAILERS = [
    b"X-Forwarded-User: a",
    b"x_forwarded_for: 1",
    b"Forwarded: for=x",
    b"X-Real-IP: 1",
    b"Tailscale-User-Login: a",
    b"X-Auth-Request-User: a",
    b"x_auth_request_user: a",
    b"Authorization: Bearer x",
    b"Cookie: a=1",
    b"Host: h",
    b"Content-Length: 1",
    b"Transfer-Encoding: chunked",
    b"X-Forwarded-User : a",
    b": a",
]


@pytest.mark.parametrize("trailer", BAD_TRAILERS)
def test_request_trailers_refuse_the_spoof_catalogue(trailer: bytes) -> None:
    body = b"1\r\nx\r\n0\r\nX-Checksum: abc\r\n" + trailer + b"\r\n\r\n"
    sc = ChunkedScanner(request=True, identity_headers=frozenset({b"x-auth-request-user"}))
    with pytest.raises(ValueError):
        sc.feed(body)
    # Only request trailers are filtered (the gateway's own response trailers are its own).
    if trailer.split(b":")[0].strip():
        assert ChunkedScanner().feed(body) == len(body)


def test_ordinary_request_trailers_pass() -> None:
    body = b"1\r\nx\r\n0\r\nX-Checksum: abc\r\nServer-Timing: db;dur=5\r\n\r\n"
    assert ChunkedScanner(request=True).feed(body) == len(body)


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=8))
def test_random_bytes_raise_only_value_error(data: bytes, cuts: list[int]) -> None:
    try:
        end = scan(cut(data, cuts))
    except ValueError:
        return
    assert end == -1 or 0 < end <= len(data)


# ----------------------------------------------------------------------------- frames


def frame(opcode: int, payload: bytes, *, masked: bool = False, fin: bool = True) -> bytes:
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, mask_bit | n))
    elif n < 65536:
        head = bytes((b0, mask_bit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, mask_bit | 127)) + struct.pack("!Q", n)
    if masked:
        key = b"\x01\x02\x03\x04"
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        return head + key + payload
    return head + payload


_lengths = st.one_of(
    st.integers(0, 130), st.sampled_from([125, 126, 127, 65535, 65536]), st.integers(65530, 70000)
)


@st.composite
def frame_streams(draw: st.DrawFn) -> tuple[bytes, set[int]]:
    data = b""
    edges = {0}
    for _ in range(draw(st.integers(1, 6))):
        n = draw(_lengths)
        data += frame(
            draw(st.sampled_from([0x1, 0x2, 0x0, 0x8, 0x9, 0xA])),
            b"\xab" * n,
            masked=draw(st.booleans()),
            fin=draw(st.booleans()),
        )
        edges.add(len(data))
    return data, edges


@settings(max_examples=300, deadline=None)
@given(frame_streams(), st.lists(st.integers(0, 300000), max_size=40))
def test_frame_boundaries_are_independent_of_chunking(
    stream: tuple[bytes, set[int]], cuts: list[int]
) -> None:
    data, edges = stream
    ft = FrameTracker()
    assert ft.at_boundary
    offset = 0
    for piece in cut(data, cuts + [1, 2, 3, 9, 11]):
        ft.feed(piece)
        offset += len(piece)
        assert ft.at_boundary is (offset in edges), offset
    assert ft.at_boundary


def test_frame_tracker_fast_path_inside_a_large_frame() -> None:
    data = frame(0x2, b"\x00" * (25 * 1024 * 1024))
    ft = FrameTracker()
    ft.feed(data[:10])
    assert ft.remaining == 25 * 1024 * 1024 and not ft.at_boundary
    for i in range(10, len(data), 1 << 20):
        ft.feed(data[i : i + (1 << 20)])
    assert ft.at_boundary


@pytest.mark.parametrize(
    ("code", "reason"), [(1000, ""), (1008, "token revoked"), (1001, "server shutting down")]
)
def test_close_frame(code: int, reason: str) -> None:
    f = close_frame(code, reason)
    assert f[0] == 0x88
    assert f[1] == 2 + len(reason)  # unmasked, short
    assert struct.unpack("!H", f[2:4])[0] == code
    assert f[4:] == reason.encode()


def test_close_frame_reason_fits_a_control_frame() -> None:
    f = close_frame(1008, "é" * 200)
    assert f[1] <= 125
    assert f[4:].decode("utf-8") == "é" * 61  # cut on a character boundary, still UTF-8
    ft = FrameTracker()
    ft.feed(f)
    assert ft.at_boundary
