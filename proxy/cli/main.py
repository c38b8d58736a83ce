"""Command line: argv and environment in, a Config out, then run.

This is the only module that reads argv or the environment for settings, or installs
uvloop. Every user-facing error is one line on stderr and a non-zero exit status (2 for
a bad config or bad usage); no traceback reaches a user.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import ClawgateError, ConfigError
from . import doctor, firewall, jwt, ops, tokens
from .common import ENV_CONFIG, config_path, load, try_reload

__all__ = ["main"]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="clawgate: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        logging.getLogger("clawgate").warning("uvloop not installed: using asyncio's loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load(args)
    _setup_logging(cfg.log.level)
    if cfg.workers > 1 and args.worker_index is None:
        from ..workers import run_workers

        return run_workers(cfg, config_path(args))
    _install_uvloop()
    from ..serve import serve

    return asyncio.run(serve(cfg, worker_index=args.worker_index or 0))


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load(args)
    print(f"{cfg.source or '(embedded defaults)'}: OK")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    try_reload(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clawgate",
        description="Access-control proxy for the OpenClaw gateway over Tailscale.",
    )
    p.add_argument("--version", action="version", version=f"clawgate {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--config",
            "-c",
            metavar="FILE",
            help=f"JSON config (default: ${ENV_CONFIG}, else embedded defaults)",
        )
        return sp

    s = with_config(sub.add_parser("serve", help="run the proxy"))
    s.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)
    s = with_config(sub.add_parser("check-config", help="validate a config and exit"))
    s.set_defaults(func=cmd_check)
    s = with_config(sub.add_parser("reload", help="tell the running clawgate to reload"))
    s.set_defaults(func=cmd_reload)

    t = sub.add_parser("token", help="manage access tokens")
    tsub = t.add_subparsers(dest="token_command", metavar="ACTION")
    tokens.register(tsub, with_config)
    ops.register(sub, with_config)
    doctor.register(sub, with_config)
    firewall.register(sub, with_config)
    jwt.register(tsub, with_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        rc: int = args.func(args)
        return rc
    except ConfigError as exc:
        print(f"clawgate: config error: {exc}", file=sys.stderr)
        return 2
    except ClawgateError as exc:
        print(f"clawgate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
