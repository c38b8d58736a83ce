"""tests/fuzz/fuzz_head.py on proxy/core/_head.c built with AddressSanitizer and UBSan.

Copies of _head.c are built into a temporary directory as importable modules and the
atheris harness fuzzes THEM (CLAWGATE_HEAD_DIR) against the Python oracle, in subprocesses:

1. guided: the copy built with UBSan alone (gcc -O1 -g -fsanitize=undefined, every report
   fatal), whose runtime loads privately with the module, so libFuzzer sees the oracle's
   Python coverage and grows a corpus from the seeds below;
2. sanitized: the copy built with gcc -O1 -g -fsanitize=address,undefined
   -fno-sanitize-recover=undefined -fno-omit-frame-pointer, run on that corpus and on
   mutations of it, gcc's libasan preloaded (Python is not built with it),
   PYTHONMALLOC=malloc (every object an ASan-guarded allocation, not a slot in a pymalloc
   arena), leaks not checked. (Preloaded, libasan also answers the coverage hooks atheris
   registers with, which blinds the fuzzer: hence the guided run first, whose corpus this
   run replays and mutates.)

Each run is bounded by -runs and -max_total_time; a sanitizer report, a crash or a
mismatch with the oracle exits non-zero and fails here. The compiled build only (the one
with the C module); CI runs it.
"""

from __future__ import annotations

import importlib.machinery
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "proxy" / "core" / "_head.c"
HARNESS = ROOT / "tests" / "fuzz" / "fuzz_head.py"
DICT = ROOT / "tests" / "fuzz" / "head.dict"
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
COMPILED = os.environ.get("CLAWGATE_BUILD") == "compiled" or any(
    (ROOT / "proxy" / "core").glob("*.so")
)
GUIDED_RUNS, GUIDED_SECONDS = 600_000, 30
RUNS, SECONDS = 200_000, 60
SANITIZE_UB = ["-fsanitize=undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
SANITIZE = [
    "-O1",
    "-g",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",
    "-fno-omit-frame-pointer",
]
# Heads to start from (the harness's mode 0: the first byte even, the head after it).
SEEDS = [
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: 100.64.0.1:18789\r\nConnection: keep-alive, Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Authorization: Bearer xyz\r\nCookie: a=1; clawgate_session=S\r\n\r\n",
    b"POST /v1 HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close, X-A\r\n"
    b"X-A: 1\r\nX-Openclaw-User: me\r\n\r\n",
    b"GET /?a=b HTTP/1.0\r\nConnection: keep-alive\r\nTailscale-User-Login: x\r\n\r\n",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not COMPILED,
        reason="the C module proxy/core/_head.c is part of the compiled build only "
        "(scripts/setup --compiled; CI runs that build too)",
    ),
]


def _gcc(*args: str) -> str:
    return subprocess.run(
        ["gcc", *args], check=True, capture_output=True, text=True, timeout=300
    ).stdout


def _build(directory: Path, flags: list[str]) -> Path:
    """_head.c copied into ``directory`` and built there as an importable module."""
    directory.mkdir()
    copy = directory / "_head.c"
    shutil.copyfile(SOURCE, copy)
    module = directory / f"_head{SUFFIX}"
    include = sysconfig.get_paths()["include"]
    _gcc("-shared", "-fPIC", "-std=c11", *flags, f"-I{include}", str(copy), "-o", str(module))
    return module


def _fuzz(
    module: Path, corpus: Path, runs: int, seconds: int, env: dict[str, str], *flags: str
) -> tuple[int, int, int, str]:
    """Run the harness on ``module``: (runs done, parsed, rewritten, its output)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            f"-runs={runs}",
            f"-max_total_time={seconds}",
            f"-dict={DICT}",
            "-print_final_stats=1",
            *flags,
            str(corpus),
        ],
        env=dict(os.environ, CLAWGATE_HEAD_DIR=str(module.parent), **env),
        cwd=module.parent,  # where libFuzzer would write a crash-* file
        capture_output=True,
        text=True,
        timeout=seconds * 4 + 120,
    )
    out = proc.stdout + proc.stderr
    # What went wrong first (a sanitizer's report, the harness's mismatch), then the end.
    key = re.findall(r"^.*(?:runtime error|ERROR: \w+Sanitizer|SUMMARY|Error:).*$", out, re.M)
    assert proc.returncode == 0, "\n".join(key[:10]) + "\n...\n" + out[-3000:]
    # The harness fuzzed the module built here, not the one of the build.
    assert f"fuzz_head: {module} against {ROOT / 'proxy' / 'core' / 'http1.py'}" in out
    done = re.search(r"Done (\d+) runs in (\d+) second", out)
    counts = re.findall(
        r"fuzz_head: execs=(\d+) parsed=(\d+) deferred=\d+ refused=\d+ "
        r"rewritten=(\d+)",
        out,
    )
    assert done and counts, out[-3000:]
    execs, parsed, rewritten = map(int, counts[-1])
    # The C paths were exercised, not only deferrals.
    assert parsed > execs // 50 and rewritten > execs // 50, counts[-1]
    cov = re.findall(r"cov: \d+ ft: \d+", out)[-1:]
    print(f"fuzz_head: {done.group(0)}; execs, parsed, rewritten {counts[-1]}; {cov}")
    return int(done.group(1)), parsed, rewritten, out


def test_the_harness_finds_nothing_on_the_sanitized_build(tmp_path: Path) -> None:
    assert shutil.which("gcc"), "gcc is needed (it builds the compiled build too)"
    libasan = _gcc("-print-file-name=libasan.so").strip()
    assert os.path.isabs(libasan) and os.path.exists(libasan), f"no libasan: {libasan}"
    ubsan = _build(tmp_path / "ubsan", ["-O1", "-g", *SANITIZE_UB])
    asan = _build(tmp_path / "asan", SANITIZE)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(SEEDS):
        (corpus / f"seed{i}").write_bytes(b"\x00" + seed)
    ub = {"UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    runs, _, _, out = _fuzz(ubsan, corpus, GUIDED_RUNS, GUIDED_SECONDS, ub, "-use_value_profile=1")
    assert "cov: " in out  # guided: libFuzzer saw the oracle's coverage
    env = {
        **ub,
        "LD_PRELOAD": libasan,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
        "PYTHONMALLOC": "malloc",
    }
    # -keep_seed: without coverage libFuzzer would drop the corpus it has just run.
    runs, _, _, _ = _fuzz(asan, corpus, RUNS, SECONDS, env, "-keep_seed=1")
    assert runs > 0
