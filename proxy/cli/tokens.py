"""``clawgate token new|list|revoke``: the static tokens of the token file."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from ..config import default_token_file
from ..errors import ClawgateError, TokenStoreError
from ..keystore import TokenFile
from .common import token_file, try_reload

__all__ = ["register"]


def cmd_token_new(args: argparse.Namespace) -> int:
    path = token_file(args)
    token = TokenFile(path).add(args.name)
    print(token)
    print(
        f"clawgate: token {args.name!r} stored (digest only) in {path}; "
        "it is shown once, keep it now",
        file=sys.stderr,
    )
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    path = token_file(args)
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
        from .jwt import revoke_jwt

        return revoke_jwt(args)
    if not args.name:
        raise ClawgateError("say which token: clawgate token revoke NAME (or --jti/--sub)")
    path = token_file(args)
    if not TokenFile(path).revoke(args.name):
        raise TokenStoreError(f"no token named {args.name!r} in {path}")
    print(
        f"revoked {args.name!r}; a running clawgate applies it on reload "
        "(clawgate reload, or SIGHUP)",
        file=sys.stderr,
    )
    try_reload(args, quiet=True)
    return 0


def register(
    tsub: argparse._SubParsersAction,  # type: ignore[type-arg]
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    tn = with_config(tsub.add_parser("new", help="create a token and print it once"))
    tn.add_argument("name")
    tn.add_argument(
        "--file", help=f"token file (default: from config, else {default_token_file()})"
    )
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
