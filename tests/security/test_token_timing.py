"""Timing of token comparison: verification time does not depend on how much of a real
token (or of its digest) the presented one matches.

Measured in process on ``TokenSet.verify`` and ``verify_digest`` with many interleaved
samples; the two distributions (0 vs 31 leading bytes matching) are compared by their
medians, a statistic robust to scheduler noise, with a generous bound and retries. A
positive control runs the same measurement on a deliberately leaky comparison, so the
method is shown able to see the difference it is looking for. The structural check says
why there is none: the presented token is hashed first, and every stored entry is compared
digest to digest (32 bytes against 32 bytes) whatever the token's length.
"""

from __future__ import annotations

import gc
import hmac
import random
import statistics
import time
from collections.abc import Callable

import pytest

from proxy.core.tokens import TokenEntry, TokenSet, digest, new_token

SAMPLES = 301
BATCH = 40
RATIO = 0.15  # medians may differ by this fraction; a real leak is far beyond it


def measure(a: Callable[[], object], b: Callable[[], object]) -> tuple[float, float]:
    """Median ns per call of a and b, sampled in a random interleaving."""
    ta: list[float] = []
    tb: list[float] = []
    order = [0] * SAMPLES + [1] * SAMPLES
    random.Random(7).shuffle(order)
    rng = range(BATCH)
    for which in order:
        fn = b if which else a
        t0 = time.perf_counter_ns()
        for _ in rng:
            fn()
        (tb if which else ta).append((time.perf_counter_ns() - t0) / BATCH)
    return statistics.median(ta), statistics.median(tb)


def relative_gap(a: Callable[[], object], b: Callable[[], object], tries: int = 3) -> float:
    """The smallest |median(a) - median(b)| / min over a few tries (noise only inflates)."""
    best = float("inf")
    gc.disable()
    try:
        for _ in range(tries):
            ma, mb = measure(a, b)
            best = min(best, abs(ma - mb) / min(ma, mb))
            if best < RATIO / 3:
                break
    finally:
        gc.enable()
    return best


def _prefix_match(real: str, n: int) -> str:
    """A token of the same length sharing exactly its first n characters with ``real``."""
    out = list(real[:n])
    for c in real[n:]:
        out.append("A" if c != "A" else "B")
    return "".join(out)


def test_verify_time_does_not_depend_on_matching_prefix() -> None:
    tokens = [new_token() for _ in range(4)]
    ts = TokenSet(TokenEntry(f"t{i}", digest(t)) for i, t in enumerate(tokens))
    real = tokens[2]
    none_match = _prefix_match(real, 0)
    prefix_31 = _prefix_match(real, 31)
    assert ts.verify(none_match) is None and ts.verify(prefix_31) is None
    assert relative_gap(lambda: ts.verify(none_match), lambda: ts.verify(prefix_31)) < RATIO


def test_digest_compare_time_does_not_depend_on_matching_prefix() -> None:
    """One level down: presented digests sharing 0 or 31 of 32 bytes with a stored one."""
    tokens = [new_token() for _ in range(4)]
    ts = TokenSet(TokenEntry(f"t{i}", digest(t)) for i, t in enumerate(tokens))
    stored = digest(tokens[1])
    d0 = bytes(b ^ 0xFF for b in stored)
    d31 = stored[:31] + bytes([stored[31] ^ 0xFF])
    assert ts.verify_digest(d0) is None and ts.verify_digest(d31) is None
    assert relative_gap(lambda: ts.verify_digest(d0), lambda: ts.verify_digest(d31)) < RATIO


def test_the_method_sees_a_real_leak() -> None:
    """Positive control: an early-exit comparison of the same inputs is flagged."""
    stored = digest(new_token()) * 8  # long enough that early exit is visible in Python

    def leaky(presented: bytes) -> bool:
        for x, y in zip(stored, presented, strict=True):
            if x != y:
                return False
        return True

    d0 = bytes(b ^ 0xFF for b in stored)
    d_most = stored[:-1] + bytes([stored[-1] ^ 0xFF])
    gap = max(relative_gap(lambda: leaky(d0), lambda: leaky(d_most), tries=1) for _ in range(2))
    assert gap > 3 * RATIO, gap


def test_every_entry_is_compared_digest_to_digest_whatever_the_length() -> None:
    tokens = [new_token() for _ in range(5)]
    entries = [TokenEntry(f"t{i}", digest(t)) for i, t in enumerate(tokens)]
    ts = TokenSet(entries)
    for presented in ("", "x", tokens[0][:31], tokens[3], "y" * 4096, "é" * 100):
        calls: list[tuple[int, int]] = []
        real = hmac.compare_digest

        # A wrapper, not a profile hook: the mypyc-compiled build makes no profiled calls.
        def recording(a: bytes, b: bytes) -> bool:
            calls.append((len(a), len(b)))
            return real(a, b)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(hmac, "compare_digest", recording)
            ts.verify(presented)
        assert calls == [(32, 32)] * len(entries), (presented[:10], calls)
