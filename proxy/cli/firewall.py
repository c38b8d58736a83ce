"""``clawgate firewall``: print host firewall rules (ufw or nftables) for this config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .common import load

__all__ = ["register"]


def cmd_firewall(args: argparse.Namespace) -> int:
    from ..firewall import render_firewall

    cfg = load(args)
    sys.stdout.write(render_firewall(cfg, "nftables" if args.nftables else "ufw"))
    return 0


def register(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    f = with_config(
        sub.add_parser(
            "firewall", help="print host firewall rules for this config (playbook Step 5)"
        )
    )
    kind = f.add_mutually_exclusive_group()
    kind.add_argument("--ufw", action="store_true", help="ufw commands (the default)")
    kind.add_argument("--nftables", action="store_true", help="an nft -f ruleset")
    f.set_defaults(func=cmd_firewall)
