"""The access decision: a pure function over plain data, table-tested.

Inputs are what the front end already knows (credential check outcome, identity lookup
outcome, the policy settings); the output is one Decision with one status per meaning:
400 bad input, 401 not authenticated, 403 known but not allowed, 503 an access
dependency failed. Every path that is not an explicit allow is a deny with a reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "Decision",
    "IdentityOutcome",
    "PolicySettings",
    "IdentityLike",
    "decide",
    "check_identity",
    "ALLOW_EXEMPT",
]


class IdentityLike(Protocol):
    @property
    def login(self) -> str | None: ...
    @property
    def node_name(self) -> str: ...
    @property
    def node_id(self) -> str: ...
    @property
    def tags(self) -> tuple[str, ...]: ...
    @property
    def caps(self) -> Mapping[str, tuple[Any, ...]]: ...
    @property
    def tagged(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class IdentityOutcome:
    """What identity lookup gave: an identity, "none" (not asked / local process),
    "unknown" (whois 404: not a tailnet peer), or "unavailable" (tailscaled failed)."""

    kind: str  # "identity" | "none" | "unknown" | "unavailable"
    identity: IdentityLike | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class PolicySettings:
    require_token: bool
    require_identity: bool
    auth_mode: str  # both | either | identity
    allow_users: frozenset[str] = frozenset()
    allow_tags: frozenset[str] = frozenset()
    allow_nodes: frozenset[str] = frozenset()
    require_capability: str | None = None
    require_token_user_match: bool = False  # a JWT for alice must come from alice's device


@dataclass(frozen=True, slots=True)
class Decision:
    allow: bool
    status: int
    reason: str


ALLOW_EXEMPT = Decision(True, 200, "exempt path")
_ALLOW_TOKEN = Decision(True, 200, "token")
_ALLOW_IDENTITY = Decision(True, 200, "identity")
_ALLOW_BOTH = Decision(True, 200, "token+identity")
_ALLOW_OPEN = Decision(True, 200, "network")


def check_identity(ident: IdentityLike, s: PolicySettings) -> str | None:
    """None when the identity passes the allow lists and capability rule, else why not."""
    if s.allow_users or s.allow_tags or s.allow_nodes:
        ok = False
        if not ident.tagged and ident.login is not None and ident.login in s.allow_users:
            ok = True
        elif ident.tagged and any(t in s.allow_tags for t in ident.tags):
            ok = True
        elif ident.node_name in s.allow_nodes or ident.node_id in s.allow_nodes:
            ok = True
        if not ok:
            who = ",".join(ident.tags) if ident.tagged else (ident.login or "?")
            return f"{who} on {ident.node_name} is not allowed by policy"
    if s.require_capability is not None and s.require_capability not in ident.caps:
        return f"{ident.node_name} lacks capability {s.require_capability}"
    return None


def decide(
    s: PolicySettings,
    *,
    token_name: str | None,
    token_error: str | None,
    token_subject: str | None,
    identity: IdentityOutcome,
) -> Decision:
    """Combine credential and identity per ``s.auth_mode``.

    ``token_name`` is set when a credential was presented and verified; ``token_error``
    when one was presented and refused (always a 401, whatever the mode: a wrong token
    is never silently ignored).
    """
    if token_error is not None:
        return Decision(False, 401, token_error)

    # Identity verdict: None = passes; otherwise a deny Decision.
    ident_deny: Decision | None = None
    if s.require_identity:
        if identity.kind == "identity" and identity.identity is not None:
            why = check_identity(identity.identity, s)
            if why is not None:
                ident_deny = Decision(False, 403, why)
        elif identity.kind == "unavailable":
            ident_deny = Decision(False, 503, identity.reason or "tailscale identity unavailable")
        elif identity.kind == "unknown":
            ident_deny = Decision(False, 403, identity.reason or "not a known tailnet peer")
        else:
            ident_deny = Decision(False, 403, identity.reason or "no tailnet identity")

    if s.require_token_user_match and token_subject is not None:
        # A token for alice must come from one of alice's devices, in every auth mode and
        # whether or not identity is otherwise required: a tagged node, an unknown peer or
        # a missing identity cannot prove that, so the token is refused (fail closed).
        ident = identity.identity if identity.kind == "identity" else None
        if ident is None or ident.tagged or ident.login != token_subject:
            if identity.kind == "unavailable":
                return Decision(False, 503, identity.reason or "tailscale identity unavailable")
            return Decision(False, 403, "token subject does not match the device's user")

    has_token = token_name is not None
    mode = s.auth_mode
    if mode == "identity":
        return ident_deny or _ALLOW_IDENTITY
    if mode == "either":
        if has_token:
            return _ALLOW_TOKEN
        if ident_deny is None:
            return _ALLOW_IDENTITY
        if ident_deny.status == 503:
            return ident_deny
        return Decision(False, 401, "token or an allowed tailnet identity required")
    # both
    if ident_deny is not None and ident_deny.status == 503:
        # tailscaled failed: nothing can be decided. Never a 401 for a daemon's outage
        # (it sends users hunting for a token and counts towards their lockout).
        return ident_deny
    if s.require_token and not has_token:
        return Decision(False, 401, "token required")
    if ident_deny is not None:
        return ident_deny
    if s.require_identity:
        return _ALLOW_BOTH if has_token else _ALLOW_IDENTITY
    return _ALLOW_TOKEN if has_token else _ALLOW_OPEN
