"""``workers: N``: N independent processes accepting on one port with SO_REUSEPORT.

Workers share nothing but the config file: each has its own event loop, identity cache
and counters (only worker 0 serves the admin listener). The parent only supervises:
it forwards SIGHUP (reload) and SIGTERM/SIGINT (drain) and exits with the first non-zero
worker status, or 0.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from types import FrameType

from .config import Config

__all__ = ["run_workers"]

log = logging.getLogger("clawgate")


def run_workers(cfg: Config, config_path: str | None) -> int:
    argv = [sys.executable, "-m", "proxy", "serve"]
    if config_path:
        argv += ["--config", config_path]
    procs = [subprocess.Popen([*argv, "--worker-index", str(i)])  # noqa: S603
             for i in range(cfg.workers)]
    log.info("started %d workers: %s", len(procs), ", ".join(str(p.pid) for p in procs))

    def forward(signum: int, _frame: FrameType | None) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    status = 0
    while any(p.poll() is None for p in procs):
        time.sleep(0.2)
        for p in procs:
            rc = p.poll()
            if rc not in (None, 0) and status == 0:
                status = rc
                log.error("worker %d exited with %d: stopping the others", p.pid, rc)
                forward(signal.SIGTERM, None)
    return status
