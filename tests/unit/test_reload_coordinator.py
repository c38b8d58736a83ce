"""The parent's two-phase reload over every worker (proxy.workers.ReloadCoordinator).

Real control sockets (socketpairs); the test plays the workers' end and answers as a
worker would, or refuses, or stays silent, or is dead. What must hold: nobody commits
unless every worker prepared; the one who asked gets every worker's result; a request
made during a reload gets a reload of its own after it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.workers import ReloadCoordinator, _Worker


class Pair:
    """One worker's end of its channel; ``alive`` flips to simulate its death."""

    def __init__(self, index: int) -> None:
        self.parent, self.me = socket.socketpair()
        self.me.settimeout(2)
        self.alive = True
        self.worker = _Worker(index, 1000 + index, lambda: self.alive, self.parent)
        self._buf = b""

    def recv(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            self._buf += self.me.recv(65536)
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def nothing_pending(self) -> bool:
        self.me.setblocking(False)
        try:
            return not self._buf and not self.me.recv(65536)
        except BlockingIOError:
            return True
        finally:
            self.me.settimeout(2)

    def send(self, **msg: Any) -> None:
        self.me.sendall(json.dumps(msg).encode() + b"\n")

    def close(self) -> None:
        self.me.close()
        if self.worker.sock is not None:
            self.worker.sock.close()


@pytest.fixture
def pairs() -> Iterator[list[Pair]]:
    ps = [Pair(0), Pair(1)]
    yield ps
    for p in ps:
        p.close()


def _pump(c: ReloadCoordinator, ps: list[Pair], now: float = 0.0) -> None:
    import select

    socks = [p.worker.sock for p in ps if p.worker.sock is not None]
    ready, _, _ = select.select(socks, [], [], 0.2)
    for p in ps:
        if p.worker.sock is not None and p.worker.sock in ready:
            c.read(p.worker)
    c.tick(now)


def test_all_prepare_then_all_commit_and_the_asker_gets_every_result(pairs: list[Pair]) -> None:
    notes: list[str] = []
    c = ReloadCoordinator([p.worker for p in pairs], notes.append)
    pairs[0].send(op="reload-all", req=7)
    _pump(c, pairs)
    preps = [p.recv() for p in pairs]
    assert [m["op"] for m in preps] == ["prepare", "prepare"]
    gen = preps[0]["gen"]
    pairs[0].send(op="prepared", gen=gen, ok=True)
    _pump(c, pairs)
    assert pairs[1].nothing_pending() and pairs[0].nothing_pending()  # nobody commits yet
    pairs[1].send(op="prepared", gen=gen, ok=True)
    _pump(c, pairs)
    assert [p.recv() for p in pairs] == [{"op": "commit", "gen": gen}] * 2
    pairs[1].send(op="committed", gen=gen, ok=True, sessions_ended=2)
    pairs[0].send(op="committed", gen=gen, ok=True, sessions_ended=1)
    _pump(c, pairs)
    _pump(c, pairs)
    result = pairs[0].recv()
    assert result["op"] == "reload-result" and result["req"] == 7 and result["ok"] is True
    assert result["sessions_ended"] == 3
    assert [(w["worker"], w["pid"], w["ok"]) for w in result["workers"]] == [
        (0, 1000, True),
        (1, 1001, True),
    ]
    assert notes == []  # not a SIGHUP: systemd is not told
    assert c.current is None


def test_one_refusal_means_nobody_commits(pairs: list[Pair]) -> None:
    c = ReloadCoordinator([p.worker for p in pairs], lambda _m: None)
    pairs[0].send(op="reload-all", req=1)
    _pump(c, pairs)
    gen = [p.recv() for p in pairs][0]["gen"]
    pairs[0].send(op="prepared", gen=gen, ok=True)
    pairs[1].send(op="prepared", gen=gen, ok=False, error="limits.maxConnections: bad")
    _pump(c, pairs)
    _pump(c, pairs)
    abort = pairs[0].recv()
    assert abort == {"op": "abort", "gen": gen, "error": "limits.maxConnections: bad"}
    result = pairs[0].recv()
    assert result["ok"] is False and result["error"] == "limits.maxConnections: bad"
    assert [w["ok"] for w in result["workers"]] == [False, False]
    assert "not applied" in result["workers"][0]["error"]
    assert pairs[1].nothing_pending()  # the refusing worker gets no commit, no abort


def test_a_silent_worker_times_out_and_nobody_commits(pairs: list[Pair]) -> None:
    c = ReloadCoordinator([p.worker for p in pairs], lambda _m: None, phase_seconds=5)
    pairs[0].send(op="reload-all", req=1)
    _pump(c, pairs, now=100.0)
    gen = [p.recv() for p in pairs][0]["gen"]
    pairs[0].send(op="prepared", gen=gen, ok=True)
    _pump(c, pairs, now=101.0)
    assert c.current is not None  # still waiting for worker 1
    c.tick(106.0)
    assert pairs[0].recv()["op"] == "abort"
    result = pairs[0].recv()
    assert result["ok"] is False and "no answer within 5s" in result["workers"][1]["error"]


def test_a_dead_worker_fails_the_reload(pairs: list[Pair]) -> None:
    c = ReloadCoordinator([p.worker for p in pairs], lambda _m: None)
    pairs[0].send(op="reload-all", req=1)
    _pump(c, pairs)
    gen = [p.recv() for p in pairs][0]["gen"]
    pairs[0].send(op="prepared", gen=gen, ok=True)
    pairs[1].alive = False
    _pump(c, pairs)
    assert pairs[0].recv()["op"] == "abort"
    result = pairs[0].recv()
    assert result["workers"][1]["error"] == "worker exited"


def test_a_request_during_a_reload_gets_a_fresh_one(pairs: list[Pair]) -> None:
    notes: list[str] = []
    c = ReloadCoordinator([p.worker for p in pairs], notes.append)
    c.ask(None)  # SIGHUP to the parent
    c.tick(0.0)
    gen1 = [p.recv() for p in pairs][0]["gen"]
    assert notes and notes[0].startswith("RELOADING=1")
    pairs[0].send(op="reload-all", req=9)  # arrives mid-reload
    for p in pairs:
        p.send(op="prepared", gen=gen1, ok=True)
    _pump(c, pairs)
    _pump(c, pairs)
    assert [p.recv() for p in pairs] == [{"op": "commit", "gen": gen1}] * 2
    for p in pairs:
        p.send(op="committed", gen=gen1, ok=True, sessions_ended=0)
    _pump(c, pairs)
    _pump(c, pairs)
    assert notes[-1] == "READY=1\nSTATUS=serving"
    # The queued request: a new generation, prepared again by everyone.
    preps = [p.recv() for p in pairs]
    assert {m["op"] for m in preps} == {"prepare"} and preps[0]["gen"] == gen1 + 1
    # A stale answer (the old generation) is ignored.
    for p in pairs:
        p.send(op="prepared", gen=gen1, ok=False, error="stale")
    _pump(c, pairs)
    assert c.current is not None and c.current.phase == "prepare"
