"""The process and its sockets: listening sockets, the open-files limit, sd_notify.

Thin wrappers over the OS that the serving code (serve.py, runtime.py, tls.py, workers.py)
shares, so that none of them imports another for a helper.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import sys

__all__ = [
    "CONTROL_FD_ENV",
    "IP_FREEBIND",
    "IPV6_FREEBIND",
    "fd_connection_cap",
    "listen_socket",
    "raise_nofile_limit",
    "sd_notify",
]

log = logging.getLogger("clawgate")
IP_FREEBIND = 15  # linux/in.h: bind an address before it exists on an interface
IPV6_FREEBIND = 78  # linux/in6.h: the same for IPv6 (15 at IPPROTO_IPV6 is no option at all)
# A worker's end of its control channel to the parent (workers > 1): the fd number.
CONTROL_FD_ENV = "CLAWGATE_CONTROL_FD"


def sd_notify(message: str, path: str | None = None) -> None:
    """Tell systemd (Type=notify) about READY/RELOADING/STOPPING; no-op elsewhere.

    ``path`` defaults to $NOTIFY_SOCKET (a path, or '@name' for the abstract namespace).
    """
    path = path or os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)


def fd_connection_cap() -> int:
    """Connections that fit in RLIMIT_NOFILE: two descriptors each, some kept spare."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    # Spare: listeners, the log, admin and LocalAPI connections, uvloop's own.
    return max(1, (soft - 48 - soft // 32) // 2)


def raise_nofile_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as Go and nginx do)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)


def listen_socket(host: str, port: int, *, reuse_port: bool, freebind: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if freebind and sys.platform.startswith("linux"):
            level, opt = (
                (socket.IPPROTO_IPV6, IPV6_FREEBIND)
                if family == socket.AF_INET6
                else (socket.IPPROTO_IP, IP_FREEBIND)
            )
            with contextlib.suppress(OSError):
                sock.setsockopt(level, opt, 1)
        sock.bind((host, port))
        sock.listen(4096)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
