"""Syscalls (and, for clawgate, instructions and allocations) per 1,000 connections.

    sudo .venv/bin/python -m benchmarks.syscalls                  # clawgate, nginx, HAProxy
    sudo .venv/bin/python -m benchmarks.syscalls --targets clawgate --count 2000
    sudo .venv/bin/python -m benchmarks.syscalls --targets clawgate --callgrind

The same topology and targets as the load benchmark (harness.py: two network namespaces,
the C load client, the echo backend; clawgate with every check on: network, token, warm
identity through the fake tailscaled, access log, metrics). Per target: start it, warm it
with --warm connections, attach `strace -c -f` to every thread of every process of the
target, run exactly --count connections of the `conns` test (connect, upgrade, one 100 B
echo, close), detach, and print the calls per 1,000 connections by syscall name. Counts
are robust on a noisy machine; the time column strace prints is not (ptrace), so it is
left out.

--callgrind (clawgate only): a second clawgate under `valgrind --tool=callgrind`, zeroed
after the warm-up and dumped after --callgrind-count connections: instructions per
connection (Ir) and calls of the object allocator (_PyObject_Malloc/_Calloc,
PyMem_Malloc... as pymalloc sees them) per connection. Repeatable to ~1%.

Bounded: every load run by --count and its own time bound; the whole run by --max-minutes.
Results: a table on stdout and benchmarks/out/syscalls-<stamp>.json.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import harness
from .netns import Topology

ALLOC_FUNCS = ("_PyObject_Malloc", "_PyObject_Calloc", "_PyMem_RawMalloc", "_PyMem_RawCalloc")


def thread_ids(pids: list[int]) -> list[int]:
    tids: list[int] = []
    for pid in pids:
        try:
            tids += [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            pass
    return tids


def parse_strace_c(text: str) -> dict[str, dict[str, int]]:
    """The `strace -c` summary table: {syscall: {"calls": n, "errors": n}}."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        f = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(f) < 5 or not re.fullmatch(r"[\d.]+", f[0]) or f[-1] == "total":
            continue
        if len(f) == 6:
            calls, errors = int(f[3]), int(f[4])
        else:
            calls, errors = int(f[3]), 0
        out[f[-1]] = {"calls": calls, "errors": errors}
    return out


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        hargs = harness.parse_args(
            ["--quick", "--targets", ",".join(args.targets), "--tests", "conns"]
        )
        hargs.quiet_wait = args.quiet_wait
        hargs.quiet_budget = args.quiet_wait * 20
        self.h = harness.Harness(hargs)
        self.deadline = time.monotonic() + args.max_minutes * 60

    def conns(self, t: harness.Target, count: int, label: str) -> dict[str, Any]:
        left = self.deadline - time.monotonic()
        if left < 10:
            raise RuntimeError("out of time (--max-minutes)")
        spec = ["conns", "--conc", str(self.args.conc), "--size", "100"]
        spec += ["--count", str(count), "--duration", str(min(300, int(left))), "--warmup", "0"]
        r = self.h.loadgen_run(t, spec, label, timeout=min(left, 330))
        lg = r["loadgen"]
        if lg.get("errors_total"):
            raise RuntimeError(f"{label}: {lg['errors_total']} errors ({lg.get('first_error')})")
        return r

    def strace(self, t: harness.Target) -> dict[str, Any]:
        a = self.args
        t.start("main")
        try:
            self.conns(t, a.warm, f"{t.name} warm-up")
            tids = thread_ids(t.pids())
            out = self.h.tmp / f"strace-{t.name}.txt"
            full = self.args.full_trace
            cmd = (
                ["strace", "-f", "-tt", "-o", str(full)]
                if full
                else ["strace", "-c", "-f", "-o", str(out)]
            )
            for tid in tids:
                cmd += ["-p", str(tid)]
            st = harness.spawn(cmd, cpu=None, stderr=subprocess.PIPE)
            time.sleep(1.0)  # attached (strace prints nothing useful to wait on with -o)
            r = self.conns(t, a.count, f"{t.name} strace")
            st.send_signal(signal.SIGINT)
            try:
                st.wait(30)
            finally:
                harness.forget(st)
            calls = parse_strace_c(out.read_text()) if not full else {}
        finally:
            t.stop()
        n = r["loadgen"]["ok_total"]
        per = {
            k: {
                "calls": round(v["calls"] * 1000 / n, 1),
                "errors": round(v["errors"] * 1000 / n, 1),
            }
            for k, v in sorted(calls.items(), key=lambda kv: -kv[1]["calls"])
        }
        total = round(sum(v["calls"] for v in calls.values()) * 1000 / n, 1)
        return {"connections": n, "threads": len(tids), "per_1000": per, "total_per_1000": total}

    def callgrind(self, t: harness.Clawgate) -> dict[str, Any]:
        """clawgate under callgrind: Ir and allocator calls per connection."""
        a = self.args
        if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
            raise RuntimeError("valgrind not installed (apt-get install valgrind)")
        vg = ClawgateCallgrind(self.h, self.h.tmp / "callgrind.out")
        vg.token, vg.headers = t.token, t.headers
        vg.start("main")
        t = vg
        try:
            pid = t.proc.pid if t.proc else 0
            self.conns(t, a.callgrind_warm, "clawgate callgrind warm-up")
            # zero the counters: the dump below holds the measured connections only
            ctl = ["callgrind_control", "-z", str(pid)]
            subprocess.run(ctl, capture_output=True, timeout=60, check=True)
            r = self.conns(t, a.callgrind_count, "clawgate callgrind")
            subprocess.run(
                ["callgrind_control", "-d", str(pid)], capture_output=True, timeout=120, check=True
            )
        finally:
            t.stop()
        # callgrind_control -d wrote OUT.1; OUT itself is the dump at exit (after the run)
        dump = vg.out.with_name(vg.out.name + ".1")
        if not dump.exists() or dump.stat().st_size == 0:
            raise RuntimeError("callgrind wrote no dump")
        if a.callgrind_keep:
            shutil.copyfile(dump, a.callgrind_keep)  # for callgrind_annotate
        ir, allocs = parse_callgrind(dump.read_text(errors="replace"))
        n = r["loadgen"]["ok_total"]
        return {
            "connections": n,
            "ir_per_connection": round(ir / n),
            "allocator_calls_per_connection": {k: round(v / n, 1) for k, v in allocs.items()},
        }


class ClawgateCallgrind(harness.Clawgate):
    """clawgate with every check on, under valgrind --tool=callgrind (slow to start)."""

    def __init__(self, h: harness.Harness, out: Path) -> None:
        super().__init__(h)
        self.out = out

    def start(self, variant: str) -> None:
        self.port = harness.free_port()
        path = self.h.tmp / f"clawgate-callgrind-{self.port}.json"
        path.write_text(json.dumps(self.config(variant), indent=2))
        vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}"]
        self.proc = harness.spawn(
            [*vg, sys.executable, "-m", "proxy", "serve", "--config", str(path)],
            cpu=self.cpu,
            log=self.h.tmp / "clawgate-callgrind.log",
            cwd=harness.ROOT,
            prefix=harness.TOPO.srv_prefix(),
        )
        harness.wait_port(self.port, self.proc, timeout=180)


def parse_callgrind(text: str) -> tuple[int, dict[str, int]]:
    """Total Ir (the `summary:` or `totals:` line) and the calls of ALLOC_FUNCS."""
    names: dict[str, str] = {}
    total = 0
    calls = dict.fromkeys(ALLOC_FUNCS, 0)
    pending: str | None = None

    def name_of(spec: str) -> str:
        m = re.match(r"\((\d+)\)(?:\s+(.*))?", spec)
        if not m:
            return spec.strip()
        if m.group(2):
            names[m.group(1)] = m.group(2).strip()
        return names.get(m.group(1), "")

    for line in text.splitlines():
        if line.startswith(("summary:", "totals:")):
            total = max(total, int(line.split()[1]))
        elif line.startswith(("fn=", "cfn=", "cfi=", "cfl=", "fl=", "fi=", "fe=", "ob=", "cob=")):
            key, _, spec = line.partition("=")
            nm = name_of(spec) if key in ("fn", "cfn") else ""
            if key == "cfn":
                pending = nm if nm in calls else None
        elif line.startswith("calls=") and pending is not None:
            calls[pending] += int(line[6:].split()[0])
            pending = None
    return total, calls


def render(res: dict[str, Any]) -> str:
    st = res.get("strace", {})
    names: list[str] = []
    for tr in st.values():
        for k in tr["per_1000"]:
            if k not in names:
                names.append(k)
    targets = list(st)
    lines: list[str] = []
    if targets:
        lines += [
            "syscalls per 1,000 connections (strace -c -f; calls, errors in brackets)",
            "",
            "| syscall | " + " | ".join(targets) + " |",
            "|---|" + "---|" * len(targets),
        ]
    for k in names:
        cells = []
        for t in targets:
            v = st[t]["per_1000"].get(k)
            cells.append(
                ""
                if v is None
                else f"{v['calls']:g}" + (f" ({v['errors']:g})" if v["errors"] else "")
            )
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if targets:
        total = " | ".join(f"{st[t]['total_per_1000']:g}" for t in targets)
        lines.append(f"| **total** | {total} |")
    cg = res.get("callgrind")
    if cg:
        lines += [
            "",
            f"clawgate under callgrind, {cg['connections']} connections: "
            f"{cg['ir_per_connection']:,} instructions per connection; allocator calls per "
            "connection: "
            + ", ".join(f"{k} {v:g}" for k, v in cg["allocator_calls_per_connection"].items()),
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.syscalls",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--targets", default="clawgate,nginx,haproxy")
    ap.add_argument("--count", type=int, default=2000, help="connections traced (default 2000)")
    ap.add_argument("--warm", type=int, default=500, help="connections before tracing")
    ap.add_argument("--conc", type=int, default=50, help="connections in flight (as `conns`)")
    ap.add_argument("--callgrind", action="store_true", help="clawgate under callgrind too")
    ap.add_argument("--no-strace", action="store_true", help="skip the strace runs")
    ap.add_argument("--callgrind-count", type=int, default=500)
    ap.add_argument("--callgrind-warm", type=int, default=200)
    ap.add_argument("--callgrind-keep", default="", help="copy the callgrind dump to this file")
    ap.add_argument(
        "--full-trace", default="", help="write the whole strace (not -c) to this file instead"
    )
    ap.add_argument("--quiet-wait", type=float, default=3.0)
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--out", default=str(harness.HERE / "out"))
    a = ap.parse_args(argv)
    a.targets = [x.strip() for x in a.targets.split(",") if x.strip()]
    for name in ("count", "warm", "callgrind_count", "callgrind_warm"):
        if not 1 <= getattr(a, name) <= 100_000:
            ap.error(f"--{name.replace('_', '-')} must be in [1, 100000]")
    if not 1 <= a.conc <= 1000 or not 0 < a.max_minutes <= 60:
        ap.error("--conc must be in [1, 1000] and --max-minutes in (0, 60]")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("strace") and not args.no_strace:
        print("strace not installed (apt-get install strace)", file=sys.stderr)
        return 2
    harness.raise_nofile()
    harness.TOPO = Topology("netns")
    run = Run(args)
    h = run.h
    for b in (h.loadgen, h.echo_bin):
        if not b.exists():
            print(f"missing {b}: build with benchmarks/run.sh (gcc -O2)", file=sys.stderr)
            return 2
    atexit.register(harness.TOPO.close)
    atexit.register(harness.cleanup_all)

    def on_signal(signum: int, frame: Any) -> None:
        harness.cleanup_all()
        harness.TOPO.close()
        shutil.rmtree(h.tmp, ignore_errors=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    classes: dict[str, type[harness.Target]] = {
        "clawgate": harness.Clawgate,
        "clawgate+gate": harness.ClawgateGate,
        "nginx": harness.Nginx,
        "haproxy": harness.Haproxy,
        "baseline": harness.Baseline,
    }
    res: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": harness.git_rev(),
        "command": " ".join(["python -m benchmarks.syscalls", *(argv or sys.argv[1:])]),
        "strace": {},
    }
    try:
        harness.TOPO.create()
        h.start_tailscaled()
        h.ensure_echo()
        for name in args.targets:
            if name not in classes:
                print(f"unknown target {name}", file=sys.stderr)
                return 2
            t = classes[name](h)
            why = t.available()
            if why:
                print(f"SKIP {name}: {why}", file=sys.stderr)
                continue
            if not args.no_strace:
                res["strace"][name] = run.strace(t)
            if args.callgrind and isinstance(t, harness.Clawgate) and name == "clawgate":
                res["callgrind"] = run.callgrind(t)
    finally:
        harness.cleanup_all()
        harness.TOPO.close()
        shutil.rmtree(h.tmp, ignore_errors=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(args.out) / f"syscalls-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(render(res))
    print(f"\nresults: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
