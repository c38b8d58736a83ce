"""Command line: argv and environment in, a Config out, then run.

This is the only module that reads argv or the environment for settings, or installs
uvloop. Every user-facing error is one line on stderr and a non-zero exit status (2 for
a bad config or bad usage); no traceback reaches a user.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from . import __version__
from .access.tokens import TokenFile
from .config import Config, default_token_file, load_config
from .core.networks import hostport
from .errors import ClawgateError, ConfigError, TokenStoreError

__all__ = ["main"]

ENV_CONFIG = "CLAWGATE_CONFIG"


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="clawgate: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


def _config_path(args: argparse.Namespace) -> str | None:
    path: str | None = getattr(args, "config", None) or os.environ.get(ENV_CONFIG)
    return path


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


def _token_file(args: argparse.Namespace) -> str:
    if getattr(args, "file", None):
        return str(args.file)
    path = _config_path(args)
    if path:
        return load_config(path).tokens.file
    return default_token_file()


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        logging.getLogger("clawgate").warning("uvloop not installed: using asyncio's loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _setup_logging(cfg.log.level)
    if cfg.workers > 1 and args.worker_index is None:
        from .workers import run_workers

        return run_workers(cfg, _config_path(args))
    _install_uvloop()
    from .server import serve

    return asyncio.run(serve(cfg, worker_index=args.worker_index or 0))


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(f"{cfg.source or '(embedded defaults)'}: OK")
    return 0


def cmd_token_new(args: argparse.Namespace) -> int:
    path = _token_file(args)
    token = TokenFile(path).add(args.name)
    print(token)
    print(f"clawgate: token {args.name!r} stored (digest only) in {path}; "
          "it is shown once, keep it now", file=sys.stderr)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    path = _token_file(args)
    entries = TokenFile(path).load()
    if args.json:
        print(json.dumps([{"name": e.name, "created": e.created} for e in entries]))
        return 0
    if not entries:
        print(f"no tokens in {path}")
        return 0
    width = max(len(e.name) for e in entries)
    for e in entries:
        print(f"{e.name:<{width}}  {e.created}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    if getattr(args, "jti", None) or getattr(args, "sub", None):
        from .access.jwt_cli import revoke_jwt

        return revoke_jwt(args)
    if not args.name:
        raise ClawgateError("say which token: clawgate token revoke NAME (or --jti/--sub)")
    path = _token_file(args)
    if not TokenFile(path).revoke(args.name):
        raise TokenStoreError(f"no token named {args.name!r} in {path}")
    print(f"revoked {args.name!r}; a running clawgate applies it on reload "
          "(clawgate reload, or SIGHUP)", file=sys.stderr)
    _try_reload(args, quiet=True)
    return 0


def _admin_url(args: argparse.Namespace, path: str) -> str:
    cfg = _load(args)
    return f"http://{hostport(cfg.admin.host, cfg.admin.port)}{path}"


def _try_reload(args: argparse.Namespace, quiet: bool = False) -> bool:
    """POST /-/reload and report each worker's answer; raise when any refused.

    ``quiet``: a clawgate that is not running is not an error (``token revoke``).
    """
    try:
        url = _admin_url(args, "/-/reload")
        # A JSON body: the admin refuses anything a cross-origin form could send.
        req = urllib.request.Request(  # noqa: S310 - loopback admin
            url, method="POST", data=b"{}", headers={"Content-Type": "application/json"})
        # Longer than the parent's two reload phases (proxy.workers): it answers once every
        # worker has, or says which did not.
        with urllib.request.urlopen(req, timeout=35) as resp:  # noqa: S310 - loopback admin
            body = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        # 409: the running clawgate refused the new config and says why in the body.
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {"error": f"HTTP {exc.code}"}
        finally:
            exc.close()
    except (urllib.error.URLError, OSError, ValueError, ConfigError) as exc:
        if not quiet:
            raise ClawgateError(f"cannot reach the running clawgate: {exc}") from None
        return False
    if not isinstance(body, dict):
        body = {"error": "unexpected answer from the admin listener"}
    workers = body.get("workers")
    lines = [_worker_line(w) for w in (workers if isinstance(workers, list) else [])
             if isinstance(w, dict)]
    if not body.get("ok"):
        for line in lines:
            print(line, file=sys.stderr)
        if len(lines) > 1:
            raise ClawgateError(f"reload refused: {body.get('error')} (every worker keeps "
                                "the running config)")
        raise ClawgateError(f"reload refused: {body.get('error')}")
    if quiet:
        print(f"applied by the running clawgate ({len(lines)} worker"
              f"{'s' if len(lines) != 1 else ''}):", file=sys.stderr)
        for line in lines:
            print(line, file=sys.stderr)
    else:
        print(f"reloaded; {body.get('sessions_ended', 0)} sessions ended")
        if len(lines) > 1:
            for line in lines:
                print(line)
    return True


def _worker_line(w: dict[str, object]) -> str:
    who = f"  worker {w.get('worker')} (pid {w.get('pid')})"
    if w.get("ok"):
        return f"{who}: reloaded, {w.get('sessions_ended', 0)} sessions ended"
    return f"{who}: refused: {w.get('error')}"


def cmd_reload(args: argparse.Namespace) -> int:
    _try_reload(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clawgate",
        description="Access-control proxy for the OpenClaw gateway over Tailscale.",
    )
    p.add_argument("--version", action="version", version=f"clawgate {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", "-c", metavar="FILE",
                        help=f"JSON config (default: ${ENV_CONFIG}, else embedded defaults)")
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
    tn = with_config(tsub.add_parser("new", help="create a token and print it once"))
    tn.add_argument("name")
    tn.add_argument("--file", help="token file (default: from config, else "
                    f"{default_token_file()})")
    tn.set_defaults(func=cmd_token_new)
    tl = with_config(tsub.add_parser("list", help="list token names"))
    tl.add_argument("--file")
    tl.add_argument("--json", action="store_true")
    tl.set_defaults(func=cmd_token_list)
    tr = with_config(tsub.add_parser("revoke", help="revoke a token (or JWTs by --jti/--sub)"))
    tr.add_argument("name", nargs="?")
    tr.add_argument("--file")
    tr.add_argument("--jti")
    tr.add_argument("--sub")
    tr.set_defaults(func=cmd_token_revoke)
    _register_optional(sub, tsub, with_config)
    return p


def _register_optional(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
                       tsub: argparse._SubParsersAction,  # type: ignore[type-arg]
                       with_config: object) -> None:
    """Subcommands that live in their own modules (doctor, status, firewall, JWT)."""
    import importlib

    for module in ("proxy.ops_cli", "proxy.access.jwt_cli"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        mod.register(sub, tsub, with_config)


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
