"""What every subcommand shares: the config path, the admin listener, the reload call."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from ..config import Config, default_token_file, load_config
from ..core.networks import hostport
from ..errors import ClawgateError, ConfigError

__all__ = [
    "ENV_CONFIG",
    "config_path",
    "load",
    "token_file",
    "admin_url",
    "admin_get",
    "try_reload",
]

ENV_CONFIG = "CLAWGATE_CONFIG"


def config_path(args: argparse.Namespace) -> str | None:
    path: str | None = getattr(args, "config", None) or os.environ.get(ENV_CONFIG)
    return path


def load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args))


def token_file(args: argparse.Namespace) -> str:
    if getattr(args, "file", None):
        return str(args.file)
    path = config_path(args)
    if path:
        return load_config(path).tokens.file
    return default_token_file()


def admin_url(args: argparse.Namespace, path: str) -> str:
    cfg = load(args)
    return f"http://{hostport(cfg.admin.host, cfg.admin.port)}{path}"


def try_reload(args: argparse.Namespace, quiet: bool = False) -> bool:
    """POST /-/reload and report each worker's answer; raise when any refused.

    ``quiet``: a clawgate that is not running is not an error (``token revoke``).
    """
    try:
        url = admin_url(args, "/-/reload")
        # A JSON body: the admin refuses anything a cross-origin form could send.
        req = urllib.request.Request(  # noqa: S310 - loopback admin
            url, method="POST", data=b"{}", headers={"Content-Type": "application/json"}
        )
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
    lines = [
        _worker_line(w)
        for w in (workers if isinstance(workers, list) else [])
        if isinstance(w, dict)
    ]
    if not body.get("ok"):
        for line in lines:
            print(line, file=sys.stderr)
        if len(lines) > 1:
            raise ClawgateError(
                f"reload refused: {body.get('error')} (every worker keeps the running config)"
            )
        raise ClawgateError(f"reload refused: {body.get('error')}")
    if quiet:
        print(
            f"applied by the running clawgate ({len(lines)} worker"
            f"{'s' if len(lines) != 1 else ''}):",
            file=sys.stderr,
        )
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


def admin_get(cfg: Config, path: str) -> Any:
    if not cfg.admin.enabled:
        raise ClawgateError("the admin listener is disabled in this config (admin.enabled)")
    url = f"http://{hostport(cfg.admin.host, cfg.admin.port)}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback admin
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ClawgateError(f"cannot reach the running clawgate at {url}: {reason}") from None
