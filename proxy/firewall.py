"""``clawgate firewall``: the host firewall of the playbook's Step 5, written for one config.

Pure text generation: clawgate's port is opened only to ``gateway.allowedNetworks``, the
gateway's own port is closed to everything but loopback, SSH and tailscaled's WireGuard
port stay open. Nothing is applied: the output is for the operator to read and run.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from .config import HOST_TAILSCALE, Config

__all__ = ["render_firewall", "render_nftables", "render_ufw", "TAILSCALE_UDP_PORT"]

# tailscaled's default WireGuard port: without it inbound, peers fall back to DERP relays.
TAILSCALE_UDP_PORT: Final = 41641
TAILSCALE_IF: Final = "tailscale0"


def _split(cfg: Config) -> tuple[list[str], list[str]]:
    v4: list[str] = []
    v6: list[str] = []
    for text in cfg.gateway.allowed_networks.cidrs:
        net = ipaddress.ip_network(text, strict=False)
        if net.is_loopback:
            continue  # loopback is accepted wholesale first; never firewall it
        (v4 if net.version == 4 else v6).append(str(net))
    return v4, v6


def _gateway_port(cfg: Config) -> int | None:
    u = cfg.upstream
    return u.port if u.unix_path is None and u.host is not None else None


def render_nftables(cfg: Config) -> str:
    """A self-contained ``inet clawgate`` table for ``nft -f``."""
    port = cfg.gateway.port
    v4, v6 = _split(cfg)
    gw_port = _gateway_port(cfg)
    hosts = cfg.gateway.hosts
    # Where clawgate's port is reachable: the tailnet interface, its own addresses, or all.
    if HOST_TAILSCALE in hosts:
        where4 = where6 = f'iifname "{TAILSCALE_IF}" '
    else:
        h4 = [h for h in hosts if ":" not in h and h != "0.0.0.0"]
        h6 = [h for h in hosts if ":" in h and h != "::"]
        where4 = f"ip daddr {{ {', '.join(h4)} }} " if h4 else ""
        where6 = f"ip6 daddr {{ {', '.join(h6)} }} " if h6 else ""
    lines = [
        "#!/usr/sbin/nft -f",
        f"# clawgate firewall for {cfg.source or 'the embedded defaults'} (playbook Step 5).",
        "# Review, then load with: sudo nft -f THIS_FILE   (remove: sudo nft delete table inet "
        "clawgate)",
        "table inet clawgate",
        "delete table inet clawgate",
        "table inet clawgate {",
    ]
    if v4:
        lines += [
            "\tset allowed_v4 {",
            "\t\ttype ipv4_addr",
            "\t\tflags interval",
            f"\t\telements = {{ {', '.join(v4)} }}",
            "\t}",
        ]
    if v6:
        lines += [
            "\tset allowed_v6 {",
            "\t\ttype ipv6_addr",
            "\t\tflags interval",
            f"\t\telements = {{ {', '.join(v6)} }}",
            "\t}",
        ]
    lines += [
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy drop;",
        '\t\tiif "lo" accept comment "loopback: clawgate -> gateway"',
        "\t\tct state established,related accept",
        "\t\tct state invalid drop",
        "\t\tmeta l4proto { icmp, ipv6-icmp } accept",
        '\t\ttcp dport 22 accept comment "keep ssh"',
        f'\t\tudp dport {TAILSCALE_UDP_PORT} accept comment "tailscale wireguard (direct paths)"',
    ]
    if v4:
        lines.append(f'\t\t{where4}ip saddr @allowed_v4 tcp dport {port} accept comment "clawgate"')
    if v6:
        lines.append(
            f'\t\t{where6}ip6 saddr @allowed_v6 tcp dport {port} accept comment "clawgate"'
        )
    if gw_port is not None:
        lines.append(f'\t\ttcp dport {gw_port} drop comment "the gateway: loopback only"')
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


def render_ufw(cfg: Config) -> str:
    """ufw commands; ufw's own before-rules already accept loopback."""
    port = cfg.gateway.port
    v4, v6 = _split(cfg)
    gw_port = _gateway_port(cfg)
    on = f"in on {TAILSCALE_IF} " if HOST_TAILSCALE in cfg.gateway.hosts else ""
    lines = [
        "#!/bin/sh",
        f"# clawgate firewall for {cfg.source or 'the embedded defaults'} (playbook Step 5).",
        "# ufw matches rules in order: the allows come before the gateway's deny.",
        "set -e",
        "sudo ufw default deny incoming",
        "sudo ufw default allow outgoing",
        "sudo ufw allow ssh  # keep SSH access",
        f"sudo ufw allow {TAILSCALE_UDP_PORT}/udp comment 'tailscale wireguard'",
    ]
    for net in v4 + v6:
        lines.append(
            f"sudo ufw allow {on}from {net} to any port {port} proto tcp comment 'clawgate'"
        )
    if gw_port is not None:
        lines.append(f"sudo ufw deny {gw_port}/tcp comment 'openclaw gateway: loopback only'")
    lines.append("sudo ufw enable")
    return "\n".join(lines) + "\n"


def render_firewall(cfg: Config, kind: str = "nftables") -> str:
    if kind == "ufw":
        return render_ufw(cfg)
    if kind == "nftables":
        return render_nftables(cfg)
    raise ValueError(f"unknown firewall kind {kind!r}")
