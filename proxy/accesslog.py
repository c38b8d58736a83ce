"""The access log: one JSON line per decision and one per closed connection.

Lines go to stdout by default, or stderr, a file, or nowhere. The destination failing
(disk full, closed pipe) never stops the proxy: the line is dropped, counted, and one
warning goes to stderr. Refusals by network are rate-limited so a scan cannot flood
the log; the next line that gets through says how many were suppressed. Lines written
during one event-loop iteration go out in one write when the iteration ends (measured:
a write syscall per line was ~8% of the proxy's CPU per connection under load).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["AccessLog"]

# One write to a pipe or socket (stdout/stderr) stays at or under PIPE_BUF, so it is atomic
# and lines of several workers sharing the pipe never interleave mid-line.
_PIPE_CHUNK = 4096
# Past this many pending lines, write now rather than at the end of the loop iteration.
_MAX_PENDING = 512
# The milliseconds and zone of a time stamp, ".000Z" to ".999Z": a lookup instead of a
# format call per line.
_MS: tuple[str, ...] = tuple(f".{i:03d}Z" for i in range(1000))
# A JSON string (quotes included) as the line encoder writes one (ensure_ascii=False): C.
json_str: Callable[[str], str] = json.encoder.encode_basestring


def decision_fields(
    conn: int,
    peer: str,
    allow: bool,
    status: int,
    reason: str,
    method: str,
    path: str,
    websocket: bool,
) -> str:
    """A decision line's own fields, encoded as write() encodes the same record (no braces):
    the per-connection line without the generic encoder (tests/unit/test_accesslog_fields)."""
    return (
        f'"event":"decision","conn":{conn},"peer":{json_str(peer)},'
        f'"decision":"{"allow" if allow else "deny"}","status":{status},'
        f'"reason":{json_str(reason)},"method":{json_str(method)},"path":{json_str(path)},'
        f'"websocket":{"true" if websocket else "false"}'
    )


def close_fields(
    conn: int,
    peer: str,
    requests: int,
    bytes_in: int,
    bytes_out: int,
    duration: float,
    reason: str,
) -> str:
    """A close line's own fields, encoded as write() encodes the same record (no braces)."""
    return (
        f'"event":"close","conn":{conn},"peer":{json_str(peer)},"requests":{requests},'
        f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},"duration":{float.__repr__(duration)},'
        f'"reason":{json_str(reason)}'
    )


class AccessLog:
    def __init__(self, destination: str, refused_per_second: float = 10.0) -> None:
        self.destination = destination
        self.enabled = destination != "off"
        self._fh: IO[str] | None = None
        self._own = False
        self.errors = 0
        self.lines = 0
        self._warned = False
        self._rate = refused_per_second
        self._bucket = refused_per_second
        self._bucket_t = time.monotonic()
        self.suppressed = 0
        self._newline = ""  # "\n" when a failed write may have left half a line
        self._pending: list[str] = []  # encoded lines not written yet (this loop iteration)
        # The loop (and its thread) the flush was last scheduled on: asyncio.get_running_loop()
        # is a getpid() syscall per call on Python 3.11 (its fork check), once per
        # connection here. Workers are exec'd, never forked, so the check buys nothing.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._sec = -1  # the second _stamp was made for
        self._stamp = ""
        if destination == "stdout":
            self._fh = sys.stdout
        elif destination == "stderr":
            self._fh = sys.stderr
        elif self.enabled:
            self._open_file()
        self._dumps: Callable[[dict[str, Any]], str] = json.JSONEncoder(
            separators=(",", ":"), ensure_ascii=False, default=str
        ).encode
        c_make = getattr(json.encoder, "c_make_encoder", None)
        if c_make is not None:
            # The same C encoder JSONEncoder.encode uses, made once instead of per call
            # (2.7 -> 1.7 us a line). No circular-reference markers: records are flat.
            one = c_make(
                None, str, json.encoder.encode_basestring, None, ":", ",", False, False, True
            )
            self._dumps = lambda record: "".join(one(record, 0))

    def _open_file(self) -> None:
        try:
            fd = os.open(self.destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            if self.errors and _ends_mid_line(self.destination):
                # A write that failed half way (disk full) left a torn line: end it, or
                # the next record is glued to it and lost to JSON-lines readers too.
                self._newline = "\n"
            # Block-buffered: flush() writes the whole batch in one syscall.
            self._fh = os.fdopen(fd, "a", encoding="utf-8", buffering=65536)
            self._own = True
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError, lines: int = 1) -> None:
        self.errors += lines
        if not self._warned:
            self._warned = True
            try:
                sys.stderr.write(
                    f"clawgate: access log {self.destination}: {exc.strerror or exc}; "
                    "dropping lines until it recovers\n"
                )
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def fragment(self, fields: dict[str, Any]) -> str:
        """``fields`` encoded as write() would, without the braces: a ``tail`` to reuse."""
        return self._dumps(fields)[1:-1]

    def write(self, record: dict[str, Any], tail: str = "") -> None:
        """One line: ``record``, then ``tail`` (a fragment() of the last fields) if any."""
        if not self.enabled:
            return
        line = self._dumps(record)
        if tail:
            line = (line[:-1] + "," if len(line) > 2 else "{") + tail + "}"
        if "time" not in record and len(line) > 2:
            # The time goes first, as before; splicing it in avoids copying the dict.
            line = '{"time":"' + self._now() + '",' + line[1:]
        self._append(line)

    def write_fields(self, fields: str, tail: str = "") -> None:
        """The line write() makes of a record without "time" whose encoding without braces
        is ``fields`` (non-empty; decision_fields, close_fields), then ``tail``."""
        if not self.enabled:
            return
        if tail:
            self._append('{"time":"' + self._now() + '",' + fields + "," + tail + "}")
        else:
            self._append('{"time":"' + self._now() + '",' + fields + "}")

    def _append(self, line: str) -> None:
        pending = self._pending
        pending.append(line)
        if len(pending) == 1:
            loop = self._loop
            if loop is None or self._loop_thread != threading.get_ident() or not loop.is_running():
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # no event loop (CLI, tests): write through
                    self._loop = None
                    self.flush()
                    return
                self._loop, self._loop_thread = loop, threading.get_ident()
            loop.call_soon(self.flush)
        elif len(pending) >= _MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        """Write the pending lines; a failure drops and counts them, never raises."""
        lines = self._pending
        if not lines:
            return
        self._pending = []
        n = len(lines)
        fh = self._fh
        if fh is None:
            self._open_file()
            fh = self._fh
            if fh is None:
                self.errors += n - 1  # _open_file counted one already
                return
        try:
            if self._own:
                fh.write(self._newline + "\n".join(lines) + "\n")
            else:
                # stdout/stderr may be a pipe shared by workers: whole lines, <= PIPE_BUF.
                chunk = self._newline
                for line in lines:
                    if chunk and len(chunk) + len(line) >= _PIPE_CHUNK:
                        fh.write(chunk)
                        fh.flush()
                        chunk = ""
                    chunk += line + "\n"
                fh.write(chunk)
            fh.flush()
            self._newline = ""
            self.lines += n
            self._warned = False if self.errors == 0 else self._warned
        except (OSError, ValueError) as exc:
            if isinstance(exc, ValueError):  # closed file object
                exc = OSError(0, "closed")
            self._fail(exc, n)
            if self._own:
                # Reopen next time: the file may have been rotated or the disk freed.
                try:
                    fh.close()
                except OSError:
                    pass
                self._fh = None

    def _now(self) -> str:
        t = time.time()
        sec = int(t)
        if sec != self._sec:  # strftime once per second, not per line
            self._sec = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return self._stamp + _MS[int(t % 1 * 1000) % 1000]

    def refused(self, record: dict[str, Any]) -> None:
        """A rate-limited line for refusals a scan can generate in bulk."""
        if not self.enabled:
            return
        now = time.monotonic()
        self._bucket = min(self._rate, self._bucket + (now - self._bucket_t) * self._rate)
        self._bucket_t = now
        if self._bucket < 1.0:
            self.suppressed += 1
            return
        self._bucket -= 1.0
        if self.suppressed:
            record = {**record, "suppressed": self.suppressed}
            self.suppressed = 0
        self.write(record)

    def close(self) -> None:
        self.flush()
        if self._fh is not None:
            try:
                self._fh.flush()
                if self._own:
                    self._fh.close()
            except (OSError, ValueError):
                pass
        self._fh = None
        # A line written after shutdown must not reopen the destination (with "stdout"
        # that would create a file of that name).
        self.enabled = False


def _ends_mid_line(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # write-only for us: cannot tell
        return False
    try:
        size = os.fstat(fd).st_size
        return size > 0 and os.pread(fd, 1, size - 1) != b"\n"
    except OSError:  # not seekable (a FIFO, a device)
        return False
    finally:
        os.close(fd)
