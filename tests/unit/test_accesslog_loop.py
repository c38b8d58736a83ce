"""AccessLog's flush scheduling: on the loop running now, never on a stale cached one."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from proxy.accesslog import AccessLog


def _lines(p: Path) -> list[str]:
    return p.read_text().splitlines() if p.exists() else []


def test_lines_of_one_iteration_are_flushed_when_it_ends(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    log = AccessLog(str(p))

    async def main() -> None:
        log.write({"event": "a"})
        log.write({"event": "b"})
        assert _lines(p) == []  # still pending: written when the iteration ends
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(_lines(p)) == 2

    asyncio.run(main())
    log.close()


def test_a_second_loop_and_no_loop_after_a_cached_one(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    log = AccessLog(str(p))

    async def one(event: str) -> None:
        log.write({"event": event})
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(one("first"))
    asyncio.run(one("second"))  # the first loop is closed: the flush goes on this one
    assert [line.count('"second"') for line in _lines(p)] == [0, 1]
    log.write({"event": "no loop"})  # no loop running: written through at once
    assert len(_lines(p)) == 3
    log.close()


def test_a_loop_running_in_another_thread_is_not_used(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    log = AccessLog(str(p))
    loop = asyncio.new_event_loop()
    started, stop = threading.Event(), threading.Event()

    async def hold() -> None:
        log.write({"event": "thread"})  # caches the thread's loop
        started.set()
        while not stop.is_set():
            await asyncio.sleep(0.01)

    t = threading.Thread(target=loop.run_until_complete, args=(hold(),))
    t.start()
    try:
        assert started.wait(5)
        for _ in range(500):  # the thread's line flushed: nothing pending any more
            if _lines(p):
                break
            time.sleep(0.01)
        assert len(_lines(p)) == 1
        log.write({"event": "main"})  # main thread, no loop of its own: through at once
        assert any('"main"' in line for line in _lines(p))
    finally:
        stop.set()
        t.join(5)
        loop.close()
    log.close()


def test_a_tail_fragment_gives_the_same_line_as_one_record(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    log = AccessLog(str(p))
    rec = {"time": "t", "event": "close", "n": 1, "d": 0.25, "w": True, "x": None}
    extra = {"token": 'bénch\n"q"', "tags": ["tag:a"], "os": None, "peer_path": "direct"}
    log.write({**rec, **extra})
    log.write(rec, log.fragment(extra))
    log.write({"time": "t", **extra})
    log.write({"time": "t"}, log.fragment(extra))
    log.write(extra)  # no fields but the tail: braces and the time still right
    log.write({}, log.fragment(extra))
    log.write(rec, log.fragment({}))  # an empty tail: the record alone
    log.write(rec)
    a, b, c, d, g, h, e, f = _lines(p)
    assert a == b and c == d and e == f
    assert g.split(",", 1)[1] == h.split(",", 1)[1] and h.startswith('{"time":"')
    log.close()
