"""Issue 12 item 5: every combination of requireToken / authMode / requireIdentity / allow
lists, with and without a tailscaled at start, against every kind of request.

For each config that loads, the decision clawgate would take (config -> effective
settings -> identity source -> ``decide``) must never admit a request that the written
policy refuses. The oracle below is the policy as a user reads it, written independently
of ``decide``: an allow list or capability rule is a condition on who may connect, in
every mode; a required token is required; 'either' is a valid token or a passing identity.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.authz import policy_settings
from proxy.config import parse_config
from proxy.core.policy import IdentityLike, IdentityOutcome, decide
from proxy.errors import ConfigError

ALICE = "alice@example.com"
CAP = "example.com/cap/openclaw"


@dataclass(frozen=True)
class Ident:
    login: str | None
    node_name: str
    node_id: str
    tags: tuple[str, ...] = ()
    caps: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def tagged(self) -> bool:
        return bool(self.tags)


IDENTITIES = {
    "alice+cap": Ident(ALICE, "alice-laptop", "n1", caps={CAP: ({},)}),
    "alice": Ident(ALICE, "alice-laptop", "n1"),
    "bob+cap": Ident("bob@example.com", "bob-phone", "n2", caps={CAP: ({},)}),
    "ci-tag": Ident(None, "ci-runner", "n3", tags=("tag:ci",)),
    "other-tag": Ident(None, "db", "n4", tags=("tag:db",)),
}
# What tailscaled can answer for a peer, when it is there.
OUTCOMES = [*IDENTITIES, "unknown", "unavailable", "local"]

POLICIES: dict[str, dict[str, Any]] = {
    "none": {},
    "users": {"allowUsers": [ALICE]},
    "tags": {"allowTags": ["tag:ci"]},
    "nodes": {"allowNodes": ["ci-runner"]},
    "cap": {"requireCapability": CAP},
    "users+cap": {"allowUsers": [ALICE], "requireCapability": CAP},
    "users+tags": {"allowUsers": [ALICE], "allowTags": ["tag:ci"]},
}
CREDENTIALS = ["none", "valid", "invalid"]


def written_policy_admits(
    require_token: bool,
    mode: str,
    require_identity: bool | None,
    policy: dict[str, Any],
    credential: str,
    ident: IdentityLike | None,
) -> bool:
    """The policy as written; ``ident`` None: no identity was established."""
    if credential == "invalid":
        return False  # a wrong token is never ignored
    users = set(policy.get("allowUsers", ()))
    tags = set(policy.get("allowTags", ()))
    nodes = set(policy.get("allowNodes", ()))
    cap = policy.get("requireCapability")
    lists = bool(users or tags or nodes)

    def passes(i: IdentityLike | None) -> bool:
        if i is None:
            return False
        if lists and not (
            (not i.tagged and i.login in users)
            or (i.tagged and bool(set(i.tags) & tags))
            or i.node_name in nodes
            or i.node_id in nodes
        ):
            return False
        return cap is None or cap in i.caps

    token = credential == "valid"
    if mode == "either":
        return token or passes(ident)
    if mode == "identity":
        return passes(ident)
    # both
    if require_token and not token:
        return False
    if lists or cap is not None or require_identity:
        return passes(ident)
    return True


def _config(
    require_token: bool, mode: str, require_identity: bool | None, policy: dict[str, Any]
) -> dict[str, Any]:
    ts: dict[str, Any] = {"authMode": mode, **policy}
    if require_identity is not None:
        ts["requireIdentity"] = require_identity
    return {"gateway": {"requireToken": require_token}, "tailscale": ts}


CASES = list(
    itertools.product(
        [True, False],
        ["both", "either", "identity"],
        [None, True, False],
        list(POLICIES),
        [True, False],
    )
)


@pytest.mark.parametrize(
    ("require_token", "mode", "require_identity", "policy", "tailscaled"), CASES
)
def test_no_combination_admits_what_the_policy_refuses(
    require_token: bool, mode: str, require_identity: bool | None, policy: str, tailscaled: bool
) -> None:
    written = POLICIES[policy]
    try:
        cfg = parse_config(_config(require_token, mode, require_identity, written))
    except ConfigError as exc:
        # Refusing to start is always safe; it must name the contradicting key.
        assert str(exc).startswith("tailscale.requireIdentity: false contradicts"), exc
        return
    # clawgate sets up an identity source when tailscaled is found, or when the config
    # needs identity (then lookups fail with 503 until tailscaled appears).
    source = tailscaled or cfg.tailscale.identity_needed
    settings = policy_settings(cfg, identity_present=source)
    outcomes = OUTCOMES if tailscaled else ["no-tailscaled"]
    for outcome_name, credential in itertools.product(outcomes, CREDENTIALS):
        if not source:
            outcome = IdentityOutcome("none")
        elif outcome_name == "no-tailscaled":
            outcome = IdentityOutcome("unavailable", reason="tailscale identity unavailable")
        elif outcome_name in IDENTITIES:
            outcome = IdentityOutcome("identity", IDENTITIES[outcome_name])
        elif outcome_name == "local":
            outcome = IdentityOutcome("none", reason="local process, not a tailnet peer")
        else:
            outcome = IdentityOutcome(outcome_name, reason=outcome_name)
        ident = outcome.identity if outcome.kind == "identity" else None
        d = decide(
            settings,
            token_name="phone" if credential == "valid" else None,
            token_error="invalid token" if credential == "invalid" else None,
            token_subject=None,
            identity=outcome,
        )
        may = written_policy_admits(
            require_token, mode, require_identity, written, credential, ident
        )
        where = (outcome_name, credential, d)
        if d.allow:
            assert may, f"admitted what the written policy refuses: {where}"
        if outcome.kind == "unavailable" and not d.allow and credential != "invalid":
            # An identity outage is 503 (never a 401 that sends users hunting for a
            # token, never a silent admit).
            assert d.status == 503 or (mode == "both" and require_token and credential == "none"), (
                where
            )


def test_allow_list_without_tailscaled_needs_identity() -> None:
    """The two fail-open configs of the issue, directly."""
    cfg = parse_config(_config(False, "both", None, POLICIES["users"]))
    assert cfg.tailscale.identity_needed
    assert policy_settings(cfg, identity_present=True).require_identity
    with pytest.raises(
        ConfigError, match="tailscale.requireIdentity: false contradicts tailscale.allowUsers"
    ):
        parse_config(_config(False, "both", False, POLICIES["users"]))


def test_nothing_written_and_no_tailscaled_is_token_only() -> None:
    cfg = parse_config(_config(True, "both", None, {}))
    assert not cfg.tailscale.identity_needed
    assert not policy_settings(cfg, identity_present=False).require_identity
    assert policy_settings(cfg, identity_present=True).require_identity
