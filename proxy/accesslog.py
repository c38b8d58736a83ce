"""The access log: one JSON line per decision and one per closed connection.

Lines go to stdout by default, or stderr, a file, or nowhere. The destination failing
(disk full, closed pipe) never stops the proxy: the line is dropped, counted, and one
warning goes to stderr. Refusals by network are rate-limited so a scan cannot flood
the log; the next line that gets through says how many were suppressed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any

__all__ = ["AccessLog"]


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
        if destination == "stdout":
            self._fh = sys.stdout
        elif destination == "stderr":
            self._fh = sys.stderr
        elif self.enabled:
            self._open_file()
        self._dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                                       default=str).encode

    def _open_file(self) -> None:
        try:
            fd = os.open(self.destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            if self.errors and _ends_mid_line(self.destination):
                # A write that failed half way (disk full) left a torn line: end it, or
                # the next record is glued to it and lost to JSON-lines readers too.
                self._newline = "\n"
            self._fh = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
            self._own = True
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.errors += 1
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

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        fh = self._fh
        if fh is None:
            self._open_file()
            fh = self._fh
            if fh is None:
                return
        if "time" not in record:
            record = {"time": _now(), **record}
        try:
            fh.write(self._newline + self._dumps(record) + "\n")
            if not self._own:
                fh.flush()
            self._newline = ""
            self.lines += 1
            self._warned = False if self.errors == 0 else self._warned
        except (OSError, ValueError) as exc:
            if isinstance(exc, ValueError):  # closed file object
                exc = OSError(0, "closed")
            self._fail(exc)
            if self._own:
                # Reopen next time: the file may have been rotated or the disk freed.
                try:
                    fh.close()
                except OSError:
                    pass
                self._fh = None

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
        if self._fh is not None:
            try:
                self._fh.flush()
                if self._own:
                    self._fh.close()
            except (OSError, ValueError):
                pass
        self._fh = None


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


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
