"""Tests of proxy/core/tokens.py and proxy/keystore.py: format, file, verification, extraction.

Tokens carry at least 256 bits and are URL-safe; the file holds only names and digests and
is mode 0600; verification visits every entry whatever matched; and credentials are taken
from ``Authorization: Bearer`` and ``Basic`` (the ``ws://NAME:TOKEN@host`` form).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.http1 import parse_request_head
from proxy.core.tokens import (
    TOKEN_NAME_RE,
    TokenEntry,
    TokenSet,
    cookie_value,
    digest,
    extract_token,
    new_token,
    session_cookie,
)
from proxy.errors import TokenStoreError
from proxy.keystore import TokenFile

_URLSAFE = re.compile(r"^[A-Za-z0-9_-]+$")


def test_token_entropy_and_format() -> None:
    seen = set()
    for _ in range(200):
        tok = new_token()
        assert _URLSAFE.match(tok), tok
        # base64 carries 6 bits per character; no padding.
        assert len(tok) * 6 >= 256
        assert len(base64.urlsafe_b64decode(tok + "=" * (-len(tok) % 4))) >= 32
        seen.add(tok)
    assert len(seen) == 200


def test_token_characters_are_spread() -> None:
    # A cheap sanity check that the bytes are random, not a counter or a constant pad.
    text = "".join(new_token() for _ in range(400))
    counts = {c: text.count(c) for c in set(text)}
    assert len(counts) == 64
    entropy = -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())
    assert entropy > 5.9


def test_digest_is_sha256() -> None:
    assert digest("abc") == hashlib.sha256(b"abc").digest()
    assert digest(b"abc") == digest("abc")


# ----------------------------------------------------------------------------- the file


def test_token_file_round_trip_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tokens.json"
    tf = TokenFile(path)
    t1 = tf.add("phone")
    t2 = tf.add("ci.runner@host")
    assert t1 != t2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    raw = path.read_text()
    assert t1 not in raw and t2 not in raw
    data = json.loads(raw)
    assert data["version"] == 1
    assert [set(e) for e in data["tokens"]] == [{"name", "digest", "created"}] * 2
    assert data["tokens"][0]["digest"] == "sha256:" + hashlib.sha256(t1.encode()).hexdigest()
    entries = tf.load()
    assert [e.name for e in entries] == ["phone", "ci.runner@host"]
    assert all(t not in repr(e) for e in entries for t in (t1, t2))
    ts = TokenSet(entries)
    assert ts.verify(t1) == "phone"
    assert ts.verify(t2) == "ci.runner@host"
    assert ts.verify(t1 + "x") is None
    assert ts.names == frozenset({"phone", "ci.runner@host"})
    # No temporary files left behind by the atomic write.
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokens.json"]


def test_revoke(tmp_path: Path) -> None:
    tf = TokenFile(tmp_path / "tokens.json")
    t1 = tf.add("a")
    t2 = tf.add("b")
    assert tf.revoke("a") is True
    assert tf.revoke("a") is False
    assert tf.revoke("zzz") is False
    ts = TokenSet(tf.load())
    assert ts.verify(t1) is None
    assert ts.verify(t2) == "b"
    assert stat.S_IMODE((tmp_path / "tokens.json").stat().st_mode) == 0o600


def test_add_refuses_duplicates_and_bad_names(tmp_path: Path) -> None:
    tf = TokenFile(tmp_path / "tokens.json")
    tf.add("phone")
    with pytest.raises(TokenStoreError, match="already exists"):
        tf.add("phone")
    for bad in ["", "-x", "a b", "a/b", "x" * 65, "ümlaut", "a\nb", ".hidden"]:
        with pytest.raises(TokenStoreError, match="invalid token name"):
            tf.add(bad)
    assert [e.name for e in tf.load()] == ["phone"]


def test_missing_file(tmp_path: Path) -> None:
    tf = TokenFile(tmp_path / "none.json")
    assert tf.load() == []
    with pytest.raises(TokenStoreError, match="does not exist"):
        tf.load(missing_ok=False)


_GOOD_DIGEST = "sha256:" + "ab" * 32


def _doc(*entries: dict[str, str]) -> str:
    return json.dumps({"version": 1, "tokens": list(entries)})


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("not json", "not JSON"),
        ("[]", "expected an object with 'tokens'"),
        ('{"tokens": {}}', "expected an object with 'tokens'"),
        ('{"tokens": [1]}', "tokens[0]: expected an object"),
        (_doc({"name": "a", "digest": _GOOD_DIGEST, "token": "clear"}), "unknown key 'token'"),
        (_doc({"name": "a b", "digest": _GOOD_DIGEST}), "invalid token name"),
        (
            _doc({"name": "a", "digest": _GOOD_DIGEST}, {"name": "a", "digest": _GOOD_DIGEST}),
            "duplicate name 'a'",
        ),
        ('{"tokens": [{"name": "a", "digest": "md5:00"}]}', "expected 'sha256:<hex>'"),
        ('{"tokens": [{"name": "a", "digest": "sha256:zz"}]}', "not hex"),
        ('{"tokens": [{"name": "a", "digest": "sha256:abcd"}]}', "wrong length"),
    ],
)
def test_malformed_token_file(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(content)
    with pytest.raises(TokenStoreError, match=re.escape(fragment)):
        TokenFile(path).load()


# ----------------------------------------------------------------------------- verify


def _compare_digest_calls(fn: Callable[[], object]) -> tuple[object, list[tuple[bytes, ...]]]:
    """Run fn and record the arguments of every hmac.compare_digest call.

    By wrapping hmac.compare_digest, not with a profile hook: the mypyc-compiled build makes
    no profiled calls, but looks the function up on the hmac module at each call as the
    pure build does."""
    calls: list[tuple[bytes, ...]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hmac, "compare_digest", recording)
        result = fn()
    return result, calls


@pytest.mark.parametrize("which", ["first", "last", "none"])
def test_verify_visits_every_entry(which: str) -> None:
    """Structure, not timing: every stored digest is compared, whichever matched."""
    tokens = [new_token() for _ in range(5)]
    entries = [TokenEntry(f"t{i}", digest(t)) for i, t in enumerate(tokens)]
    ts = TokenSet(entries)
    probe = {"first": tokens[0], "last": tokens[4], "none": "not-a-token"}[which]
    expected = {"first": "t0", "last": "t4", "none": None}[which]
    result, calls = _compare_digest_calls(lambda: ts.verify(probe))
    assert result == expected
    assert [stored for stored, _ in calls] == [e.digest for e in entries]
    # Digests are compared, never the token itself.
    assert all(presented == digest(probe) for _, presented in calls)


def test_empty_token_set_verifies_nothing() -> None:
    assert TokenSet([]).verify("") is None
    assert len(TokenSet([])) == 0


# ----------------------------------------------------------------------------- extract


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


EXTRACT: list[tuple[str | None, str | None, str | None]] = [
    (None, None, None),
    ("Bearer abc", "abc", None),
    ("bearer abc", "abc", None),
    ("BEARER abc", "abc", None),
    ("Bearer   abc  ", "abc", None),
    ("  Bearer abc", "abc", None),
    ("Bearer", None, "malformed bearer credential"),
    ("Bearer ", None, "malformed bearer credential"),
    ("Bearer a b", None, "malformed bearer credential"),
    (_basic("clawgate", "TOKEN"), "TOKEN", None),
    (_basic("", "TOKEN"), "TOKEN", None),  # ws://:TOKEN@host
    (_basic("phone", "to:ken"), "to:ken", None),  # only the first ':' splits
    ("basic " + base64.b64encode(b"u:tok").decode(), "tok", None),
    (_basic("clawgate", ""), None, "malformed basic credential"),
    ("Basic " + base64.b64encode(b"no-colon").decode(), None, "malformed basic credential"),
    ("Basic !!!", None, "malformed basic credential"),
    ("Basic dTp0b2s", None, "malformed basic credential"),  # missing padding
    ("Basic " + base64.b64encode(b"u:\xff\xfe").decode(), None, "malformed basic credential"),
    ("Basic ", None, "malformed basic credential"),
    ("Basic", None, "malformed basic credential"),
    ("Digest username=x", None, "unsupported authorization scheme"),
    ("Token abc", None, "unsupported authorization scheme"),
    ("abc", None, "unsupported authorization scheme"),
    ("", None, "unsupported authorization scheme"),
]


@pytest.mark.parametrize(
    ("header", "token", "error"), EXTRACT, ids=[f"{i}" for i in range(len(EXTRACT))]
)
def test_extract_token(header: str | None, token: str | None, error: str | None) -> None:
    assert extract_token(header) == (token, error)


def test_ws_url_credentials_become_basic_and_verify(tmp_path: Path) -> None:
    """What `ws://clawgate:TOKEN@host:18789` becomes in a client, end to end."""
    tf = TokenFile(tmp_path / "t.json")
    tok = tf.add("cli")
    header = _basic("clawgate", tok)
    got, err = extract_token(header)
    assert err is None and got == tok
    assert TokenSet(tf.load()).verify(got) == "cli"


@given(st.text(max_size=60))
def test_extract_never_raises(header: str) -> None:
    token, error = extract_token(header)
    assert (token is None) or (error is None)


@given(st.from_regex(TOKEN_NAME_RE, fullmatch=True))
def test_every_valid_name_is_accepted(name: str) -> None:
    assert TOKEN_NAME_RE.match(name)


@pytest.fixture
def _umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_mode_is_0600_even_with_a_permissive_umask(tmp_path: Path, _umask: None) -> None:
    path = tmp_path / "tokens.json"
    TokenFile(path).add("x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("cookie", "value"),
    [
        (b"cg=abc", "abc"),
        (b"a=1; cg=abc; b=2", "abc"),
        (b"a=1;cg=abc", "abc"),
        (b"cg=first; cg=second", "first"),  # the first one counts
        (b"cg=", ""),
        (b"cg=a=b", "a=b"),  # only the first '=' separates
        (b"xcg=abc", None),  # a name that merely ends in ours
        (b"cgx=abc", None),
        (b"cg", None),  # no '=': not a pair
        (b"a=1; b=2", None),
        (b"", None),
        (b"cg=caf\xc3\xa9", None),  # not ASCII: no session id
        (b"cg=caf\xc3\xa9; cg=abc", None),  # the first pair decides, even when unreadable
    ],
)
def test_cookie_value(cookie: bytes, value: str | None) -> None:
    assert cookie_value(cookie, b"cg") == value


@pytest.mark.parametrize(
    ("lines", "sid"),
    [
        ((), None),
        (("Cookie: cg=abc",), "abc"),
        (("cookie: a=1; cg=abc",), "abc"),
        # Split Cookie lines (as HTTP/2 front ends send them): any line may carry it.
        (("Cookie: a=1", "Cookie: cg=abc"), "abc"),
        (("Cookie: cg=one", "Cookie: cg=two"), "one"),
        # A line that mentions the name without the pair does not stop the search.
        (("Cookie: xcg=1", "Cookie: cg=abc"), "abc"),
        (("Cookie: a=cg", "Cookie: b=2"), None),
        # Only Cookie lines count.
        (("X-Cookie: cg=abc",), None),
        (("Set-Cookie: cg=abc",), None),
        (("Cookie: cg=caf\xc3\xa9", "Cookie: cg=abc"), "abc"),
    ],
)
def test_session_cookie(lines: tuple[str, ...], sid: str | None) -> None:
    raw = b"\r\n".join([b"GET / HTTP/1.1", b"Host: h", *(ln.encode("latin-1") for ln in lines)])
    head = parse_request_head(raw + b"\r\n\r\n")
    assert session_cookie(head, b"cg") == sid
