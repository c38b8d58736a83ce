"""proxy.core's per-connection functions timed with timeit: the pure against the mypyc build.

    .venv/bin/python -m benchmarks.core_timeit            # the build in the tree
    scripts/setup --compiled && .venv/bin/python -m benchmarks.core_timeit
    scripts/setup --pure && .venv/bin/python -m benchmarks.core_timeit

Each case is the best of --repeat runs of a loop sized to ~0.2 s (the minimum: the least
disturbed by other load on the machine), in ns per call, on the data a real connection
carries (benchmarks/micro/test_micro_hotpath.py's browser-sized WebSocket upgrade head).
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

import proxy.core.http1 as http1
from benchmarks.micro.test_micro_hotpath import HEAD, NETS
from proxy.core.exchange import scan_head
from proxy.core.networks import NetworkSet
from proxy.core.tokens import TokenEntry, TokenSet, digest, read_authorization


def cases() -> dict[str, Callable[[], object]]:
    head = http1.parse_request_head(HEAD)
    ids = frozenset({b"x-forwarded-user"})
    add = [(b"X-Forwarded-User", b"alice@example.com")]
    nets = NetworkSet.from_strings(NETS)
    tokens = TokenSet(TokenEntry(f"t{i}", digest(f"token-{i}")) for i in range(10))
    scanner_body = b"".join(b"%x\r\n" % 100 + b"x" * 100 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"

    def rewrite_of(parsed: http1.RequestHead) -> bytes:
        return http1.rewrite_request_head(
            parsed,
            client_ip="100.101.102.103",
            proto=b"http",
            identity_headers=ids,
            add=add,
            drop_authorization=True,
            session_cookie=b"clawgate_session",
        )

    def rewrite() -> bytes:
        return rewrite_of(head)

    def parse_and_rewrite() -> bytes:
        return rewrite_of(http1.parse_request_head(HEAD))

    return {
        "scan_head": lambda: scan_head(HEAD, 0, 16384),
        "parse_request_head": lambda: http1.parse_request_head(HEAD),
        "rewrite_request_head": rewrite,
        "parse + rewrite": parse_and_rewrite,
        "NetworkSet.contains (v4)": lambda: nets.contains("100.101.102.103"),
        "NetworkSet.contains (v6)": lambda: nets.contains("fd7a:115c:a1e0::1"),
        "read_authorization": lambda: read_authorization(head),
        "TokenSet.verify (10)": lambda: tokens.verify("token-7"),
        "ChunkedScanner.feed (8 chunks)": lambda: http1.ChunkedScanner(True).feed(scanner_body),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    build = "compiled" if (http1.__file__ or "").endswith(".so") else "pure"
    print(f"build: {build} ({http1.__file__})")
    for name, fn in cases().items():
        timer = timeit.Timer(fn)
        number, _ = timer.autorange()
        number = max(1, number)
        best = min(timer.repeat(repeat=args.repeat, number=number)) / number
        print(f"{name:32s} {best * 1e9:9.0f} ns")


if __name__ == "__main__":
    main()
