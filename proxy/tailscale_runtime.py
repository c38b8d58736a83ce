"""Wiring tailscaled into the running proxy: client, identity cache, monitor, addresses.

With no tailscaled socket anywhere (and none configured) clawgate runs without identity.
With one, identity is looked up for every peer, the cache is kept honest by the IPN bus,
and, when ``host`` is ``"tailscale"``, listeners follow this node's tailnet addresses.
"""

from __future__ import annotations

import logging

from .errors import TailscaleError
from .runtime import Runtime
from .tailscale import IdentityCache, LocalAPIClient, TailscaleMonitor, find_socket

__all__ = ["attach_tailscale"]

log = logging.getLogger("clawgate")


async def attach_tailscale(rt: Runtime, *, want_addresses: bool) -> list[str]:
    """Set up identity on ``rt``; return this node's tailnet addresses when known now."""
    ts = rt.cfg.tailscale
    path = find_socket(ts.socket)
    if path is None and ts.socket is None:
        if ts.identity_needed:
            # Identity was asked for (requireIdentity, an allow list, requireCapability or
            # authMode either/identity): fail closed (503) until tailscaled appears.
            log.warning(
                "the config needs tailnet identity (tailscale.requireIdentity, "
                "allow lists, requireCapability or authMode) but no tailscaled "
                "socket was found: requests get 503 until it appears"
            )
        else:
            return []
    client = LocalAPIClient(ts.socket, timeout=ts.timeout)
    cache = IdentityCache(client, ttl=ts.cache_ttl)
    rt.localapi = client
    rt.identity_cache = cache
    rt.identity_present = True

    def on_addresses(addrs: list[str]) -> None:
        if want_addresses and rt.on_tailnet_addresses is not None and addrs:
            rt.on_tailnet_addresses(list(addrs))

    def on_state(state: str) -> None:
        rt.log.write({"event": "tailscale", "state": state})
        if state != "Running":
            log.warning("tailscale backend state is %s: identity lookups may fail", state)

    monitor = TailscaleMonitor(
        client,
        cache,
        on_addresses=on_addresses,
        on_state=on_state,
        key_expiry_warn_days=ts.key_expiry_warn_days,
    )
    rt.monitor = monitor
    addresses: list[str] = []
    try:
        status = await client.status(peers=False)
        # This node's names, for the Host check of the very first requests (the monitor's
        # first poll runs after the listeners are up).
        monitor.self_dns_name = status.self_dns_name
        monitor.cert_domains = status.cert_domains
        if status.running:
            addresses = list(status.tailscale_ips)
        else:
            log.warning(
                "tailscale is %s, not Running: will listen once it is up", status.backend_state
            )
    except TailscaleError as exc:
        log.warning(
            "tailscaled at %s not answering (%s): will listen once it is up", path or ts.socket, exc
        )
    monitor.start()
    return addresses if want_addresses else []
