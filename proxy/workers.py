"""``workers: N``: N independent processes accepting on one port with SO_REUSEPORT.

Workers share the config file and the store of login sessions and lockout counters the
parent creates for them (``shared_state``); each has its own event loop, identity cache
and connection counters (only worker 0 serves the admin listener). The parent
supervises: it forwards SIGTERM/SIGINT (drain) and exits with the first non-zero worker
status, or 0.

The parent owns reloads. Each worker has a control channel to it (a socketpair, JSON
lines): SIGHUP to the parent, or ``POST /-/reload`` on worker 0's admin (which asks the
parent), runs one two-phase reload over every worker: all prepare (read and validate the
config and tokens, change nothing), and only when every worker could does the parent tell
them all to commit; otherwise all keep the running config. The admin answers only after
every worker has answered, with each worker's result: when ``clawgate token revoke``
returns, no worker accepts the token any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from .config import Config
from .core.sessions import StoreUnavailable
from .errors import ClawgateError
from .system import CONTROL_FD_ENV, sd_notify

if TYPE_CHECKING:
    from .runtime import Runtime, Snapshot

__all__ = ["run_workers", "WorkerControl", "ReloadCoordinator", "RELOAD_PHASE_SECONDS"]

log = logging.getLogger("clawgate")

# How long the parent waits for every worker in each phase of a reload; a worker that
# has not answered by then counts as failed (and, in the first phase, nobody commits).
RELOAD_PHASE_SECONDS = 10.0
_MAX_LINE = 1 << 20


def _send(sock: socket.socket, msg: dict[str, Any]) -> bool:
    """One JSON line to a blocking control socket; False when the other side is gone."""
    try:
        sock.sendall(json.dumps(msg).encode() + b"\n")
        return True
    except OSError:
        return False


class WorkerControl:
    """A worker's end of its control channel: answers the parent's prepare/commit/abort,
    and lets this worker's admin ask the parent for a reload of every worker."""

    def __init__(
        self, rt: Runtime, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.rt = rt
        self.index = index
        self._reader = reader
        self._writer = writer
        self._pending: dict[int, Snapshot | None] = {}
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[Any] | None = None

    @classmethod
    async def attach(cls, rt: Runtime, index: int, fd: int) -> WorkerControl:
        sock = socket.socket(fileno=fd)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=_MAX_LINE)
        control = cls(rt, index, reader, writer)
        control._task = rt.spawn(control._run(), "worker-control")
        return control

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._writer.close()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ClawgateError("the workers' parent went away"))

    def _write(self, msg: dict[str, Any]) -> None:
        if not self._writer.is_closing():
            self._writer.write(json.dumps(msg).encode() + b"\n")

    async def _run(self) -> None:
        try:
            while line := await self._reader.readline():
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.error("worker control: not JSON from the parent: %r", line[:80])
                    continue
                if isinstance(msg, dict):
                    self._handle(msg)
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ClawgateError("the workers' parent went away"))

    def _handle(self, msg: dict[str, Any]) -> None:
        op, rt = msg.get("op"), self.rt
        gen = msg.get("gen")
        if op == "prepare" and isinstance(gen, int):
            prepared = rt.prepare_reload()
            self._pending = {gen: prepared}  # an older, unanswered prepare is void
            self._write(
                {
                    "op": "prepared",
                    "gen": gen,
                    "worker": self.index,
                    "pid": os.getpid(),
                    "ok": prepared is not None,
                    "error": None if prepared is not None else rt.last_reload_error,
                }
            )
        elif op == "commit" and isinstance(gen, int):
            prepared = self._pending.pop(gen, None)
            if prepared is None:  # pragma: no cover - the parent commits only what was ready
                self._write(
                    {
                        "op": "committed",
                        "gen": gen,
                        "worker": self.index,
                        "pid": os.getpid(),
                        "ok": False,
                        "error": "nothing prepared",
                    }
                )
                return
            ended = rt.commit_reload(prepared)
            self._write(
                {
                    "op": "committed",
                    "gen": gen,
                    "worker": self.index,
                    "pid": os.getpid(),
                    "ok": True,
                    "sessions_ended": ended,
                }
            )
        elif op == "abort" and isinstance(gen, int):
            self._pending.pop(gen, None)
            if msg.get("error") and rt.last_reload_error is None:
                # Valid here but refused elsewhere: say so in this worker's /health too.
                rt.reload_refused(str(msg["error"]))
        elif op == "reload-result":
            fut = self._waiting.pop(msg.get("req"), None)  # type: ignore[arg-type]
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def reload_all(self) -> dict[str, Any]:
        """Ask the parent to reload every worker; its per-worker answer."""
        req = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = self.rt.loop.create_future()
        self._waiting[req] = fut
        self._write({"op": "reload-all", "req": req})
        try:
            async with asyncio.timeout(3 * RELOAD_PHASE_SECONDS):
                return await fut
        except TimeoutError:
            raise ClawgateError("the workers' parent did not answer the reload") from None
        finally:
            self._waiting.pop(req, None)


@dataclass
class _Worker:
    index: int
    pid: int
    alive: Callable[[], bool]
    sock: socket.socket | None
    buf: bytes = b""


@dataclass
class _Reload:
    """One reload of every worker, in two phases; ``waiters``: who gets the answer
    (a worker index and its request id, or None for SIGHUP to the parent)."""

    gen: int
    workers: list[_Worker]
    waiters: list[tuple[int, int] | None]
    deadline: float
    phase: str = "prepare"
    answers: dict[int, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None  # the first worker's own refusal

    def missing(self) -> list[_Worker]:
        return [w for w in self.workers if w.index not in self.answers]


class ReloadCoordinator:
    """The parent's side of reloads: one two-phase reload at a time over every worker.

    Driven by the parent's select loop: ``read`` when a control socket is readable,
    ``ask`` for SIGHUP, ``tick`` after each round. ``notify`` tells systemd (SIGHUP only).
    """

    def __init__(
        self,
        workers: list[_Worker],
        notify: Callable[[str], None],
        phase_seconds: float = RELOAD_PHASE_SECONDS,
    ) -> None:
        self.workers = workers
        self.notify = notify
        self.phase_seconds = phase_seconds
        self.queued: list[tuple[int, int] | None] = []
        self.current: _Reload | None = None
        self._gens = itertools.count(1)

    def ask(self, waiter: tuple[int, int] | None = None) -> None:
        self.queued.append(waiter)

    def tick(self, now: float) -> None:
        # A request that arrives during a reload gets a fresh one after it (the running
        # one may have read the files before the caller changed them).
        if self.current is None and self.queued:
            self.current = self._start(self.queued, now)
            self.queued = []
        if self.current is not None and self._advance(self.current, now):
            self.current = None

    def read(self, w: _Worker) -> None:
        assert w.sock is not None
        try:
            data = w.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            w.sock.close()
            w.sock = None
            return
        w.buf += data
        while b"\n" in w.buf:
            line, w.buf = w.buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict):
                self._on_message(w, msg)
        if len(w.buf) > _MAX_LINE:
            w.buf = b""

    def _on_message(self, w: _Worker, msg: dict[str, Any]) -> None:
        op, cur = msg.get("op"), self.current
        if op == "reload-all" and isinstance(msg.get("req"), int):
            self.ask((w.index, msg["req"]))
        elif (
            op in ("prepared", "committed")
            and cur is not None
            and msg.get("gen") == cur.gen
            and cur.phase == ("prepare" if op == "prepared" else "commit")
        ):
            cur.answers[w.index] = msg

    def _start(self, waiters: list[tuple[int, int] | None], now: float) -> _Reload:
        live = [w for w in self.workers if w.sock is not None and w.alive()]
        r = _Reload(next(self._gens), live, waiters, now + self.phase_seconds)
        if None in waiters:
            self.notify(f"RELOADING=1\nMONOTONIC_USEC={int(time.monotonic() * 1e6)}")
        for w in live:
            if w.sock is None or not _send(w.sock, {"op": "prepare", "gen": r.gen}):
                r.answers[w.index] = {"ok": False, "error": "worker exited"}
        return r

    def _advance(self, r: _Reload, now: float) -> bool:
        """Move the reload on when everyone answered (or time is up); True when done."""
        for w in r.missing():
            if w.sock is None or not w.alive():
                r.answers[w.index] = {"ok": False, "error": "worker exited"}
        if r.missing() and now < r.deadline:
            return False
        for w in r.missing():
            r.answers[w.index] = {"ok": False, "error": f"no answer within {self.phase_seconds:g}s"}
        if r.phase == "prepare":
            if r.answers and all(a.get("ok") for a in r.answers.values()):
                r.answers = {}
                r.phase = "commit"
                r.deadline = now + self.phase_seconds
                for w in r.workers:
                    if w.sock is None or not _send(w.sock, {"op": "commit", "gen": r.gen}):
                        r.answers[w.index] = {"ok": False, "error": "worker exited"}
                return False
            error = next(
                (str(a.get("error")) for a in r.answers.values() if not a.get("ok")),
                "no worker is running",
            )
            r.error = error
            for w in r.workers:
                if w.sock is not None and r.answers.get(w.index, {}).get("ok"):
                    _send(w.sock, {"op": "abort", "gen": r.gen, "error": error})
                    # Valid there, but not applied: no worker reports success.
                    r.answers[w.index] = {
                        "ok": False,
                        "error": f"not applied: another worker refused ({error})",
                    }
        self._finish(r)
        return True

    def _finish(self, r: _Reload) -> None:
        results: list[dict[str, Any]] = []
        for w in r.workers:
            a = r.answers.get(w.index, {})
            results.append(
                {
                    "worker": w.index,
                    "pid": w.pid,
                    "ok": bool(a.get("ok")),
                    "error": None if a.get("ok") else a.get("error"),
                    "sessions_ended": int(a.get("sessions_ended") or 0),
                }
            )
        ok = bool(results) and all(x["ok"] for x in results)
        error = (
            None
            if ok
            else r.error
            or next((x["error"] for x in results if not x["ok"]), "no worker is running")
        )
        body = {
            "op": "reload-result",
            "ok": ok,
            "error": error,
            "stage": r.phase if not ok else "done",
            "workers": results,
            "sessions_ended": sum(x["sessions_ended"] for x in results),
        }
        if ok:
            log.info("reload applied by all %d workers", len(results))
        else:
            log.error(
                "reload refused (%s): every worker keeps the running config"
                if r.phase == "prepare"
                else "reload incomplete (%s)",
                error,
            )
        for waiter in r.waiters:
            if waiter is None:
                self.notify(
                    "READY=1\nSTATUS=" + ("serving" if ok else f"reload refused: {error}"[:200])
                )
                continue
            idx, req = waiter
            sock = self.workers[idx].sock
            if sock is not None:
                _send(sock, {**body, "req": req})


def _alive(proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
    return lambda: proc.poll() is None


def _outer(path: str | None, message: str) -> None:
    if path:  # only when systemd (or whoever started us) asked for notifications
        sd_notify(message, path)


def run_workers(cfg: Config, config_path: str | None) -> int:
    argv = [sys.executable, "-m", "proxy", "serve"]
    if config_path:
        argv += ["--config", config_path]
    # Workers tell the parent (not systemd) that they are ready, on a private datagram
    # socket; the parent says READY=1 to systemd once every worker has. With the unit's
    # NotifyAccess=main, systemd only listens to this process anyway.
    outer_notify = os.environ.get("NOTIFY_SOCKET")
    tmp = tempfile.mkdtemp(prefix="clawgate-workers-")
    inbox_path = os.path.join(tmp, "notify.sock")
    inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    inbox.bind(inbox_path)
    # Login sessions and lockout counters are one for all workers: a store in this
    # private (0700) directory, created before any worker starts, removed with it.
    from .shared_state import STATE_DIR_ENV, create_state

    state_dir = os.path.join(tmp, "state")
    try:
        os.mkdir(state_dir, 0o700)
        os.chmod(state_dir, 0o700)  # whatever the umask
        create_state(state_dir)
    except (OSError, StoreUnavailable, sqlite3.Error) as exc:
        inbox.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise ClawgateError(f"cannot create the workers' shared session store: {exc}") from None
    workers: list[_Worker] = []
    procs: list[subprocess.Popen[bytes]] = []
    for i in range(cfg.workers):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {
            **os.environ,
            "NOTIFY_SOCKET": inbox_path,
            STATE_DIR_ENV: state_dir,
            CONTROL_FD_ENV: str(theirs.fileno()),
        }
        proc = subprocess.Popen(
            [*argv, "--worker-index", str(i)],
            env=env,  # noqa: S603
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        procs.append(proc)
        workers.append(_Worker(i, proc.pid, _alive(proc), mine))
    log.info("started %d workers: %s", len(procs), ", ".join(str(p.pid) for p in procs))
    waiting_ready = len(procs)
    reload_asked = False
    reloads = ReloadCoordinator(workers, lambda msg: _outer(outer_notify, msg))

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal reload_asked
        if signum == signal.SIGHUP:
            reload_asked = True  # the main loop runs it: it does I/O on the channels
            return
        if signum in (signal.SIGTERM, signal.SIGINT):
            _outer(outer_notify, "STOPPING=1")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            socks = [w.sock for w in workers if w.sock is not None]
            ready, _, _ = select.select([inbox, *socks], [], [], 0.2)
            if inbox in ready:
                msg = inbox.recv(4096).decode("utf-8", "replace")
                if "READY=1" in msg.splitlines() and waiting_ready > 0:
                    waiting_ready -= 1
                    if waiting_ready == 0:
                        _outer(outer_notify, "READY=1\nSTATUS=serving")
            for w in workers:
                if w.sock is not None and w.sock in ready:
                    reloads.read(w)
            if reload_asked:
                reload_asked = False
                reloads.ask(None)
            reloads.tick(time.monotonic())
            for p in procs:
                rc = p.poll()
                if rc not in (None, 0) and status == 0:
                    status = rc
                    log.error("worker %d exited with %d: stopping the others", p.pid, rc)
                    forward(signal.SIGTERM, None)
    finally:
        inbox.close()
        for w in workers:
            if w.sock is not None:
                with contextlib.suppress(OSError):
                    w.sock.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return status
