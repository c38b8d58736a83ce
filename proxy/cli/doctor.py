"""``clawgate doctor``: gather facts, run the pure checks of proxy/doctor.py, report."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .common import config_path

__all__ = ["register"]


def cmd_doctor(args: argparse.Namespace) -> int:
    from ..doctor import exit_status, gather, render_json, render_text, run_checks

    path: str | None = config_path(args)
    findings = run_checks(gather(path, args.gateway_config))
    print(render_json(findings) if args.json else render_text(findings))
    return exit_status(findings)


def register(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    d = with_config(
        sub.add_parser(
            "doctor", help="check config, tailscaled, the gateway and this host; exit 1 on errors"
        )
    )
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument(
        "--gateway-config",
        metavar="PATH",
        help="the gateway's openclaw.json (default: "
        "$OPENCLAW_HOME/.openclaw/openclaw.json, else ~/.openclaw/openclaw.json)",
    )
    d.set_defaults(func=cmd_doctor)
