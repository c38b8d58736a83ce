"""Hot-path A/B measurement: proxy CPU per connection and per message, interleaved.

Starts one C echo backend, the raw uvloop splice (reference) and one clawgate process per
``--root`` (a directory holding a ``proxy/`` package: the tree as it was before a change
and the current one), all pinned to CPU 1, and drives each with the C loadgen on CPU 0.
Targets are measured in turn inside every repetition, so machine noise hits all alike;
the figure to compare is proxy CPU (utime+stime from /proc) per connection or message.

    .venv/bin/python -m benchmarks.profile_hotpath [--reps 3] [--root before=/tmp/x] ...
    [--pyspy clawgate] (a raw py-spy profile of that target during one extra conns run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import cpu_seconds, free_port, proc_tree, read_ready_line, wait_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
TESTS = {
    "conns": ["conns", "--conc", "50", "--size", "100"],
    "tput100": ["throughput", "--conc", "10", "--window", "16", "--size", "100"],
    "tput64k": ["throughput", "--conc", "10", "--window", "16", "--size", "65536"],
}


def _spawn(cmd: list[str], cpu: str, **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["taskset", "-c", cpu, *cmd], start_new_session=True, **kw)


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _token(tmp: Path) -> tuple[Path, str]:
    path = tmp / "tokens.json"
    r = subprocess.run(
        [sys.executable, "-m", "proxy", "token", "new", "bench", "--file", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return path, r.stdout.strip().splitlines()[-1].strip()


def _clawgate(
    root: Path, tmp: Path, name: str, echo_port: int, tokens: Path, access_log: bool
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cfg = {
        "gateway": {
            "host": "127.0.0.1",
            "port": port,
            "requireToken": True,
            "allowedNetworks": ["127.0.0.0/8"],
        },
        "upstream": f"http://127.0.0.1:{echo_port}",
        "tokens": {"file": str(tokens)},
        "admin": {"port": free_port()},
        "log": {"access": str(tmp / f"access-{name}.log") if access_log else "off"},
        "limits": {
            "maxConnections": 60000,
            "perSourceIp": 60000,
            "perIdentity": 60000,
            "unauthenticatedPerIp": 60000,
        },
    }
    path = tmp / f"clawgate-{name}.json"
    path.write_text(json.dumps(cfg))
    log = open(tmp / f"clawgate-{name}.stderr", "ab")  # noqa: SIM115 - lives with the child
    p = _spawn(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
        "1",
        cwd=str(root),
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    wait_port(port, p, timeout=30)
    return p, port


def _loadgen(port: int, spec: list[str], duration: float, headers: list[str]) -> dict[str, Any]:
    cmd = [
        "taskset",
        "-c",
        "0",
        str(OUT / "loadgen"),
        *spec,
        "--port",
        str(port),
        "--duration",
        str(duration),
        "--warmup",
        "0",
    ]
    for h in headers:
        cmd += ["-H", h]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def measure(pid: int, port: int, test: str, duration: float, headers: list[str]) -> dict[str, Any]:
    pids = proc_tree(pid)
    c0 = cpu_seconds(pids)
    r = _loadgen(port, TESTS[test], duration, headers)
    cpu = cpu_seconds(pids) - c0
    n = r["ok_total"] if test == "conns" else r["msgs_total"]
    return {
        "rate": n / r["wall_s"],
        "cpu_us": cpu * 1e6 / max(n, 1),
        "errors": r.get("errors_total", 0),
        "first_error": r.get("first_error", ""),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--tests", default="conns,tput100,tput64k")
    ap.add_argument(
        "--root",
        action="append",
        default=[],
        help="NAME=DIR: a clawgate tree to measure (default: current=repo)",
    )
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--access-log", choices=("on", "off"), default="on")
    ap.add_argument("--pyspy", default="", help="target name: record a raw py-spy profile")
    ap.add_argument("--pyspy-args", default="", help="extra py-spy arguments (--native)")
    a = ap.parse_args()
    for prog in ("echo", "loadgen"):
        if not (OUT / prog).exists():
            OUT.mkdir(exist_ok=True)
            subprocess.run(
                ["gcc", "-O2", "-Wall", "-o", str(OUT / prog), str(HERE / f"{prog}.c")], check=True
            )
    roots = [tuple(r.split("=", 1)) for r in a.root] or [("current", str(ROOT))]
    tests = a.tests.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="clawgate-hotpath-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        echo = _spawn(
            [str(OUT / "echo"), "--port", "0"],
            "1",
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        procs.append(echo)
        echo_port = int(read_ready_line(echo).split()[1])
        tokens, tok = _token(tmp)
        targets: list[tuple[str, int, int, list[str]]] = []  # name, pid, port, headers
        if not a.no_baseline:
            port = free_port()
            p = _spawn(
                [
                    sys.executable,
                    str(HERE / "baseline_splice.py"),
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--upstream",
                    f"127.0.0.1:{echo_port}",
                ],
                "1",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(p)
            wait_port(port, p)
            targets.append(("baseline", p.pid, port, []))
        for name, root in roots:
            p, port = _clawgate(Path(root), tmp, name, echo_port, tokens, a.access_log == "on")
            procs.append(p)
            targets.append((name, p.pid, port, [f"Authorization: Bearer {tok}"]))
        for _, _, port, hdrs in targets:  # warm up (imports, first allocations)
            _loadgen(port, TESTS["conns"], 1.0, hdrs)
        results: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for rep in range(a.reps):
            order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
            for test in tests:
                for name, pid, port, hdrs in order:
                    m = measure(pid, port, test, a.duration, hdrs)
                    results.setdefault(name, {}).setdefault(test, []).append(m)
                    print(
                        f"rep {rep} {name:10s} {test:8s} rate {m['rate']:9.0f}/s  "
                        f"cpu {m['cpu_us']:7.1f} us  errors {m['errors']:.0f} {m['first_error']}",
                        file=sys.stderr,
                        flush=True,
                    )
        if a.pyspy:
            name, pid, port, hdrs = next(t for t in targets if t[0] == a.pyspy)
            out = OUT / f"pyspy-{name}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
            spy = subprocess.Popen(
                [
                    str(ROOT / ".venv/bin/py-spy"),
                    "record",
                    "-p",
                    str(pid),
                    "-f",
                    "raw",
                    "-r",
                    "500",
                    "-d",
                    str(int(a.duration)),
                    *a.pyspy_args.split(),
                    "-o",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _loadgen(port, TESTS["conns"], a.duration + 1, hdrs)
            spy.wait(60)
            print(f"py-spy raw profile: {out}", file=sys.stderr)
        # x baseline: each run's CPU over the baseline splice's in the same repetition
        # (paired, so load from other work on the machine largely cancels out).
        base = results.get("baseline", {})
        print(
            "| target | test | rate/s (median) | CPU us per unit (median) | CPU x baseline "
            "(median of paired) | CPU us per run |"
        )
        print("|---|---|---:|---:|---:|---|")
        for name, by_test in results.items():
            for test, ms in by_test.items():
                ratio = "-"
                if test in base and name != "baseline":
                    pairs = zip(ms, base[test], strict=True)
                    ratio = f"{statistics.median(m['cpu_us'] / b['cpu_us'] for m, b in pairs):.3f}"
                print(
                    f"| {name} | {test} | {statistics.median(m['rate'] for m in ms):.0f} | "
                    f"{statistics.median(m['cpu_us'] for m in ms):.1f} | {ratio} | "
                    + " ".join(f"{m['cpu_us']:.1f}" for m in ms)
                    + " |"
                )
        return 0
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(tmp, ignore_errors=True)
        _ = os


if __name__ == "__main__":
    sys.exit(main())
