"""Atheris harness: proxy/core/_head.c against the Python code, its oracle (issue 15 lever 4).

    .venv/bin/python tests/fuzz/fuzz_head.py -runs=100000
    .venv/bin/python tests/fuzz/fuzz_head.py -max_total_time=60 -dict=tests/fuzz/head.dict DIR

The module under test is proxy.core._head (the compiled build), or the _head module built
in the directory CLAWGATE_HEAD_DIR names (tests/unit/test_fuzz_head.py builds one there with
AddressSanitizer and UBSan). The oracle is proxy/core/http1.py as Python source, in the
compiled build too, imported under atheris.instrument_imports() so that its branches guide
the fuzzer.

An input is a head plus rewrite arguments. Its first byte picks how the head is made: the
rest of the input as it is (mode 0, which seeds and the dictionary serve), or built from
the input (method, target, version, header lines from a catalogue or from the input, then
up to three byte insertions, deletions or replacements anywhere). The properties, those of
tests/unit/test_head_fast.py: a head C answers for is parsed by Python into the same fields
(values and types); a head Python refuses (400, 431) C deferred; C's rewrite is None or
Python's bytes, for every head Python accepts. A mismatch raises AssertionError, which
libFuzzer reports as a crash (exit status non-zero), as it does a sanitizer's report.
Every power of two executions from 1024 on, a line ``fuzz_head: ...`` counts the answers.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import atheris  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
HTTP1 = ROOT / "proxy" / "core" / "http1.py"
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds proxy.core.http1 as its .py source, also where a compiled one sits beside it."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "proxy.core.http1":
            return None
        return importlib.util.spec_from_file_location(fullname, HTTP1)


def _load_oracle() -> ModuleType:
    finder = _SourceFirst()
    with atheris.instrument_imports(include=["proxy"]):
        # After atheris's own finder (which wraps what the next finders return) and before
        # the path finder (which would return the compiled module).
        sys.meta_path.insert(sys.meta_path.index(importlib.machinery.PathFinder), finder)
        try:
            import proxy.core.http1 as module
        finally:
            sys.meta_path.remove(finder)
    assert module.__file__ == str(HTTP1), module.__file__
    return module


def _load_head() -> Any:
    where = os.environ.get("CLAWGATE_HEAD_DIR")
    if not where:
        from proxy.core import _head

        return _head
    path = Path(where) / f"_head{SUFFIX}"
    spec = importlib.util.spec_from_file_location("_head", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


http1: Any = _load_oracle()
HEAD: Any = _load_head()

FIELDS = (
    "method",
    "target",
    "version",
    "request_line",
    "lines",
    "names",
    "values",
    "content_length",
    "chunked",
    "websocket",
    "keep_alive",
    "host",
)
METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"CONNECT", b"get"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0"]
TARGETS = [b"/", b"/ws", b"/chat?x=1", b"/a/b#f", b"/%7E?q=a+b", b"*", b"http://h/"]
NAMES = [
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Upgrade",
    b"Connection",
    b"Authorization",
    b"Cookie",
    b"X-Forwarded-For",
    b"X-Forwarded-User",
    b"X-Real-IP",
    b"Forwarded",
    b"Tailscale-User-Login",
    b"X-Openclaw-User",
    b"Proxy-Connection",
    b"Keep-Alive",
    b"TE",
    b"Proxy-Authorization",
    b"HTTP2-Settings",
    b"Sec-WebSocket-Key",
    b"Origin",
    b"User-Agent",
    b"X-Debug",
    b"content_length",
    b"X_Forwarded_For",
    b"host",
    b"CONNECTION",
]
VALUES = [
    b"h",
    b"gw.example:18789",
    b"0",
    b"12",
    b"007",
    b"123456789012345",
    b"1234567890123456",
    b"chunked",
    b"Chunked",
    b"gzip, chunked",
    b"websocket",
    b"WebSocket",
    b"h2c",
    b"keep-alive",
    b"close",
    b"Upgrade",
    b"keep-alive, Upgrade",
    b"X-Forwarded-For, x_debug",
    b"Host, Cookie",
    b"Bearer t",
    b"a=1; clawgate_session=S",
    b"theme=dark",
    b"127.0.0.1",
    b"a b",
]
# Values that fit the name (usually picked), then anything.
FITTING = {
    b"host": [b"h", b"gw.example:18789"],
    b"content-length": [b"0", b"12", b"123456789012345"],
    b"transfer-encoding": [b"chunked", b"Chunked"],
    b"upgrade": [b"websocket", b"WebSocket"],
    b"connection": [b"keep-alive", b"close", b"Upgrade", b"keep-alive, Upgrade", b"x_debug, te"],
    b"authorization": [b"Bearer t"],
    b"cookie": [b"theme=dark", b"a=1; clawgate_session=S"],
}
SEPARATORS = [b": ", b": ", b":", b":  ", b" : ", b":\t"]
PIECES = [b"\r", b"\n", b"\x00", b" ", b"\t", b"_", b"\x7f", b"\x80", b"\xff", b":", b",", b"\r\n"]
IDENTITY = [b"x-openclaw-user", b"x-forwarded-user", b"cookie", b"host", b"X-Debug", b"x-debug"]
IDENTITY += [b"x-%d" % i for i in range(10)]
ADD_VALUES = [b"alice@example.com", b"", b"a\r\nb", b"a\x00"]
IPS = ["100.101.102.103", "fd7a:115c:a1e0::6667", "::1", "caf\u00e9"]
COOKIES = [None, None, b"clawgate_session", b"a", b""]
LIMITS = [http1.DEFAULT_HEAD_LINES] * 5 + [0, 1, 3, 8]

counts = {"execs": 0, "parsed": 0, "deferred": 0, "refused": 0, "rewritten": 0, "kept": 0}


def _shape(v: object) -> object:
    if isinstance(v, list | tuple):
        return (type(v), tuple(_shape(x) for x in v))
    return type(v)


def _built_head(fdp: Any) -> bytes:
    # Each choice's 0 (what an exhausted input gives) is the common case.
    method = METHODS[0] if fdp.ConsumeBool() else fdp.PickValueInList(METHODS)
    which = fdp.ConsumeIntInRange(0, 3)
    if which < 2:
        target = fdp.PickValueInList(TARGETS)
    else:
        target = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
        if which == 2:  # printable
            target = bytes(0x21 + c % 94 for c in target)
        target = b"/" + target
    version = VERSIONS[0] if fdp.ConsumeBool() else fdp.PickValueInList(VERSIONS)
    lines = [method + b" " + target + b" " + version]
    if fdp.ConsumeIntInRange(0, 7) != 7:
        lines.append(b"Host: h")
    for _ in range(fdp.ConsumeIntInRange(0, 10)):
        if fdp.ConsumeIntInRange(0, 3) != 3:
            name = fdp.PickValueInList(NAMES)
        else:
            name = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 12))
        which = fdp.ConsumeIntInRange(0, 3)
        if which == 3:
            value = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24))
        elif which == 2:
            value = fdp.PickValueInList(VALUES)
        else:
            value = fdp.PickValueInList(FITTING.get(name.lower(), [b"1", b"a b", b"*/*"]))
        lines.insert(
            fdp.ConsumeIntInRange(1, len(lines)), name + fdp.PickValueInList(SEPARATORS) + value
        )
    raw = bytearray(b"\r\n".join(lines) + b"\r\n\r\n")
    for _ in range(max(0, fdp.ConsumeIntInRange(0, 7) - 4)):  # none 5 times in 8
        pos = fdp.ConsumeIntInRange(0, len(raw))
        piece = fdp.PickValueInList(PIECES) if fdp.ConsumeBool() else fdp.ConsumeBytes(1)
        op = fdp.ConsumeIntInRange(0, 2)
        if op == 0:
            raw[pos:pos] = piece
        elif op == 1:
            del raw[pos : pos + 1 + len(piece)]
        else:
            raw[pos : pos + len(piece)] = piece
    return bytes(raw)


def check(raw: bytes, max_lines: int, rewrite_kw: dict[str, Any]) -> None:
    got = HEAD.parse(raw, max_lines)
    try:
        py = http1.parse_request_head_py(raw, max_lines)
    except http1.BadRequest as e:
        counts["refused"] += 1
        if got is not None:
            raise AssertionError(f"C parsed a head Python refuses ({e.reason}): {raw!r}") from None
        return
    if got is None:
        counts["deferred"] += 1
    else:
        counts["parsed"] += 1
        want = tuple(getattr(py, f) for f in FIELDS)
        if got != want or _shape(got) != _shape(want):
            raise AssertionError(f"C {got!r} != Python {want!r} for {raw!r}")
    out = HEAD.rewrite(
        py.request_line,
        py.lines,
        py.names,
        py.values,
        py.host,
        py.websocket,
        py.keep_alive,
        py.version == (1, 0),
        rewrite_kw["client_ip"],
        rewrite_kw["proto"],
        rewrite_kw["identity_headers"],
        rewrite_kw["add"],
        rewrite_kw["drop_authorization"],
        rewrite_kw["session_cookie"],
    )
    try:
        want_out = http1.rewrite_request_head_py(py, **rewrite_kw)
    except ValueError:  # an injected value with CR/LF/NUL, a client_ip that is not ASCII
        if out is not None:
            raise AssertionError(f"C rewrote what Python refuses: {raw!r} {rewrite_kw!r}") from None
        return
    if out is None:
        counts["kept"] += 1
    elif type(out) is not bytes or out != want_out:
        raise AssertionError(f"C rewrite {out!r} != Python {want_out!r} ({raw!r} {rewrite_kw!r})")
    else:
        counts["rewritten"] += 1


def TestOneInput(data: bytes) -> None:
    counts["execs"] += 1
    n = counts["execs"]
    if n >= 1024 and n & (n - 1) == 0:
        print("fuzz_head: " + " ".join(f"{k}={v}" for k, v in counts.items()), file=sys.stderr)
    if not data:
        return
    fdp = atheris.FuzzedDataProvider(data[1:])
    mode = data[0]
    rewrite_kw = {
        "client_ip": IPS[mode >> 6 & 3],
        "proto": b"https" if mode & 0x20 else b"http",
        "identity_headers": frozenset(IDENTITY[i] for i in range(mode >> 2 & 7)),
        "add": [(b"X-Forwarded-User", ADD_VALUES[mode >> 3 & 3])] if mode & 4 else [],
        "drop_authorization": bool(mode & 2),
        "session_cookie": COOKIES[mode % len(COOKIES)],
    }
    if mode & 1 == 0:  # the rest as it is: the seeds' mode
        check(data[1:], http1.DEFAULT_HEAD_LINES, rewrite_kw)
        return
    raw = _built_head(fdp)
    rewrite_kw["identity_headers"] = frozenset(
        fdp.PickValueInList(IDENTITY) for _ in range(fdp.ConsumeIntInRange(0, 12))
    )
    check(raw, fdp.PickValueInList(LIMITS), rewrite_kw)


def main() -> None:
    print(f"fuzz_head: {HEAD.__file__} against {http1.__file__}", file=sys.stderr)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
