"""``clawgate status``: the live sessions of the running clawgate, as a table.

``status`` reads the running clawgate's admin ``/connections``. The table formatting here
is pure, so it is tested without a terminal.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .common import admin_get, load

__all__ = ["register", "format_sessions", "human_bytes", "human_age"]


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"  # pragma: no cover - the loop always returns


def human_age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _clean(value: Any) -> str:
    # Names come from the tailnet (node names, logins): never let them drive the terminal.
    text = "" if value is None else str(value)
    return "".join(ch if ch.isprintable() else "?" for ch in text) or "-"


def format_sessions(conns: Sequence[Mapping[str, Any]]) -> str:
    """The live sessions as a table, one line per connection, like `tailscale status`."""
    if not conns:
        return "no live sessions"
    header = ("ID", "PEER", "NODE", "LOGIN", "TAGS", "TOKEN", "PATH", "KIND", "IN", "OUT", "AGE")
    rows = [header]
    for c in conns:
        node = str(c.get("node") or "")
        rows.append(
            (
                _clean(c.get("id")),
                _clean(c.get("peer")),
                _clean(node.split(".", 1)[0] if node else None),
                _clean(c.get("login")),
                _clean(",".join(c.get("tags") or []) or None),
                _clean(c.get("token")),
                _clean(c.get("peer_path")),
                "ws" if c.get("websocket") else "http",
                human_bytes(int(c.get("bytes_in") or 0)),
                human_bytes(int(c.get("bytes_out") or 0)),
                human_age(float(c.get("age_seconds") or 0)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load(args)
    body = admin_get(cfg, "/connections")
    conns = body.get("connections", []) if isinstance(body, dict) else []
    if args.json:
        print(json.dumps(conns, indent=2))
    else:
        print(format_sessions(conns))
    return 0


def register(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    s = with_config(sub.add_parser("status", help="live sessions of the running clawgate"))
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)
