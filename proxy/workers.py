"""``workers: N``: N independent processes accepting on one port with SO_REUSEPORT.

Workers share the config file and the store of login sessions and lockout counters the
parent creates for them (``shared_state``); each has its own event loop, identity cache
and connection counters (only worker 0 serves the admin listener). The parent only supervises:
it forwards SIGHUP (reload) and SIGTERM/SIGINT (drain) and exits with the first non-zero
worker status, or 0.
"""

from __future__ import annotations

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
from types import FrameType

from .config import Config
from .errors import ClawgateError
from .server import sd_notify
from .sessions import StoreUnavailable

__all__ = ["run_workers"]

log = logging.getLogger("clawgate")


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
    env = {**os.environ, "NOTIFY_SOCKET": inbox_path, STATE_DIR_ENV: state_dir}
    procs = [subprocess.Popen([*argv, "--worker-index", str(i)], env=env)  # noqa: S603
             for i in range(cfg.workers)]
    log.info("started %d workers: %s", len(procs), ", ".join(str(p.pid) for p in procs))
    waiting_ready = len(procs)

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal waiting_ready
        if signum == signal.SIGHUP:
            _outer(outer_notify, f"RELOADING=1\nMONOTONIC_USEC={int(time.monotonic() * 1e6)}")
            waiting_ready = sum(1 for p in procs if p.poll() is None)
        elif signum in (signal.SIGTERM, signal.SIGINT):
            _outer(outer_notify, "STOPPING=1")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            ready, _, _ = select.select([inbox], [], [], 0.2)
            if ready:
                msg = inbox.recv(4096).decode("utf-8", "replace")
                if "READY=1" in msg.splitlines() and waiting_ready > 0:
                    waiting_ready -= 1
                    if waiting_ready == 0:
                        _outer(outer_notify, "READY=1\nSTATUS=serving")
            for p in procs:
                rc = p.poll()
                if rc not in (None, 0) and status == 0:
                    status = rc
                    log.error("worker %d exited with %d: stopping the others", p.pid, rc)
                    forward(signal.SIGTERM, None)
    finally:
        inbox.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return status

