"""Everything clawgate learns from tailscaled: peer identities, our own status, the IPN bus.

The LocalAPI client (``localapi``) is the only code here that does I/O on the socket; the
identity cache and the monitor (``identity``) build on it through narrow protocols.
"""

from __future__ import annotations

from ..core.networks import is_loopback, unmap_ip
from .identity import (
    BACKEND_STATES,
    BUS_MASK,
    Identity,
    IdentityCache,
    IdentitySource,
    StatusSource,
    TailscaleMonitor,
    cache_key,
    classify_notify,
)
from .localapi import (
    DEFAULT_SOCKET_PATHS,
    LOCALAPI_HOST,
    NOTIFY_INITIAL_STATE,
    NOTIFY_RATE_LIMIT,
    LocalAPIClient,
    Status,
    find_socket,
    format_addr,
    parse_time,
    peer_path,
    split_lines,
)

__all__ = [
    "BACKEND_STATES",
    "BUS_MASK",
    "DEFAULT_SOCKET_PATHS",
    "LOCALAPI_HOST",
    "NOTIFY_INITIAL_STATE",
    "NOTIFY_RATE_LIMIT",
    "Identity",
    "IdentityCache",
    "IdentitySource",
    "LocalAPIClient",
    "Status",
    "StatusSource",
    "TailscaleMonitor",
    "cache_key",
    "classify_notify",
    "find_socket",
    "format_addr",
    "is_loopback",
    "parse_time",
    "peer_path",
    "split_lines",
    "unmap_ip",
]
