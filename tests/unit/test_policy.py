"""Tests of proxy/core/policy.py: the pure access decision, as a table.

Rows cover requireToken x authMode x identity outcome x allow lists; a product test checks
the invariants over every combination: a wrong token is always 401, an identity failure is
never an allow where identity is required, and 503 only ever means tailscaled failed.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.core.policy import (
    Decision,
    IdentityOutcome,
    PolicySettings,
    check_identity,
    decide,
)


@dataclass(frozen=True)
class Ident:
    login: str | None = "alice@example.com"
    node_name: str = "phone.tail1234.ts.net"
    node_id: str = "nPhone"
    tags: tuple[str, ...] = ()
    caps: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def tagged(self) -> bool:
        return bool(self.tags)


ALICE = Ident()
BOB = Ident(login="bob@example.com", node_name="laptop.tail1234.ts.net", node_id="nLap")
CI = Ident(login=None, node_name="ci.tail1234.ts.net", node_id="nCI", tags=("tag:ci",))
CAPPED = Ident(caps={"example.com/cap/openclaw": ({"role": "admin"},)})

OUTCOMES = {
    "alice": IdentityOutcome("identity", ALICE),
    "bob": IdentityOutcome("identity", BOB),
    "ci": IdentityOutcome("identity", CI),
    "capped": IdentityOutcome("identity", CAPPED),
    "none": IdentityOutcome("none", reason="local process, not a tailnet peer"),
    "unknown": IdentityOutcome("unknown", reason="not a known tailnet peer"),
    "unavailable": IdentityOutcome("unavailable", reason="tailscale identity unavailable: x"),
}
LISTS: dict[str, dict[str, Any]] = {
    "open": {},
    "users": {"allow_users": frozenset({"alice@example.com"})},
    "tags": {"allow_tags": frozenset({"tag:ci"})},
    "nodes": {"allow_nodes": frozenset({"laptop.tail1234.ts.net"})},
    "cap": {"require_capability": "example.com/cap/openclaw"},
}
TOKENS = {"token": ("phone", None), "none": (None, None), "bad": (None, "invalid token")}


def run(
    require_token: bool,
    require_identity: bool,
    mode: str,
    lists: str,
    token: str,
    outcome: str,
    subject: str | None = None,
    user_match: bool = False,
) -> Decision:
    s = PolicySettings(
        require_token=require_token,
        require_identity=require_identity,
        auth_mode=mode,
        require_token_user_match=user_match,
        **LISTS[lists],
    )
    name, err = TOKENS[token]
    return decide(
        s, token_name=name, token_error=err, token_subject=subject, identity=OUTCOMES[outcome]
    )


# (require_token, require_identity, mode, lists, token, outcome) -> (allow, status, reason)
TABLE: list[tuple[tuple[bool, bool, str, str, str, str], tuple[bool, int, str]]] = [
    # The playbook: token required, no tailscaled (identity not required).
    ((True, False, "both", "open", "token", "none"), (True, 200, "token")),
    ((True, False, "both", "open", "none", "none"), (False, 401, "token required")),
    ((True, False, "both", "open", "bad", "none"), (False, 401, "invalid token")),
    ((False, False, "both", "open", "none", "none"), (True, 200, "network")),
    ((False, False, "both", "open", "token", "none"), (True, 200, "token")),
    ((False, False, "both", "open", "bad", "none"), (False, 401, "invalid token")),
    # both: token and identity
    ((True, True, "both", "open", "token", "alice"), (True, 200, "token+identity")),
    ((True, True, "both", "open", "none", "alice"), (False, 401, "token required")),
    (
        (True, True, "both", "open", "token", "unavailable"),
        (False, 503, "tailscale identity unavailable: x"),
    ),
    ((True, True, "both", "open", "token", "unknown"), (False, 403, "not a known tailnet peer")),
    (
        (True, True, "both", "open", "token", "none"),
        (False, 403, "local process, not a tailnet peer"),
    ),
    ((False, True, "both", "open", "none", "alice"), (True, 200, "identity")),
    # tailscaled down is a 503 even without a token: not a 401 that sends users hunting
    (
        (True, True, "both", "open", "none", "unavailable"),
        (False, 503, "tailscale identity unavailable: x"),
    ),
    (
        (False, True, "both", "open", "none", "unavailable"),
        (False, 503, "tailscale identity unavailable: x"),
    ),
    ((True, True, "both", "users", "token", "alice"), (True, 200, "token+identity")),
    (
        (True, True, "both", "users", "token", "bob"),
        (False, 403, "bob@example.com on laptop.tail1234.ts.net is not allowed by policy"),
    ),
    (
        (True, True, "both", "users", "token", "ci"),
        (False, 403, "tag:ci on ci.tail1234.ts.net is not allowed by policy"),
    ),
    ((True, True, "both", "tags", "token", "ci"), (True, 200, "token+identity")),
    ((True, True, "both", "tags", "token", "alice"), (False, 403, "")),
    ((True, True, "both", "nodes", "token", "bob"), (True, 200, "token+identity")),
    ((True, True, "both", "nodes", "token", "alice"), (False, 403, "")),
    ((True, True, "both", "cap", "token", "capped"), (True, 200, "token+identity")),
    (
        (True, True, "both", "cap", "token", "alice"),
        (False, 403, "phone.tail1234.ts.net lacks capability example.com/cap/openclaw"),
    ),
    # either: a token, or an allowed identity
    ((True, True, "either", "open", "token", "unavailable"), (True, 200, "token")),
    ((True, True, "either", "open", "token", "unknown"), (True, 200, "token")),
    ((True, True, "either", "open", "none", "alice"), (True, 200, "identity")),
    (
        (True, True, "either", "users", "none", "bob"),
        (False, 401, "token or an allowed tailnet identity required"),
    ),
    (
        (True, True, "either", "open", "none", "unknown"),
        (False, 401, "token or an allowed tailnet identity required"),
    ),
    (
        (True, True, "either", "open", "none", "unavailable"),
        (False, 503, "tailscale identity unavailable: x"),
    ),
    ((True, True, "either", "open", "bad", "alice"), (False, 401, "invalid token")),
    # identity only: a token does not help
    ((True, True, "identity", "open", "none", "alice"), (True, 200, "identity")),
    ((True, True, "identity", "open", "token", "unknown"), (False, 403, "")),
    ((True, True, "identity", "users", "token", "bob"), (False, 403, "")),
    ((True, True, "identity", "open", "none", "unavailable"), (False, 503, "")),
    ((True, True, "identity", "open", "bad", "alice"), (False, 401, "invalid token")),
]


@pytest.mark.parametrize(
    ("args", "expected"), TABLE, ids=["-".join(str(a) for a in row) for row, _ in TABLE]
)
def test_decision_table(
    args: tuple[bool, bool, str, str, str, str], expected: tuple[bool, int, str]
) -> None:
    d = run(*args)
    assert (d.allow, d.status) == expected[:2]
    if expected[2]:
        assert d.reason == expected[2]
    assert d.reason


@pytest.mark.parametrize(
    ("require_token", "require_identity", "mode", "lists", "token", "outcome"),
    list(
        itertools.product(
            [True, False],
            [True, False],
            ["both", "either", "identity"],
            sorted(LISTS),
            sorted(TOKENS),
            sorted(OUTCOMES),
        )
    ),
)
def test_invariants(
    require_token: bool, require_identity: bool, mode: str, lists: str, token: str, outcome: str
) -> None:
    d = run(require_token, require_identity, mode, lists, token, outcome)
    assert d.status in (200, 401, 403, 503)
    assert d.allow is (d.status == 200)
    assert d.reason
    if token == "bad":
        assert (d.allow, d.status) == (False, 401)  # a wrong token is never ignored
    if d.status == 503:
        assert outcome == "unavailable" and require_identity
    ident = OUTCOMES[outcome].identity
    ident_ok = (
        ident is not None
        and check_identity(
            ident, PolicySettings(require_token, require_identity, mode, **LISTS[lists])
        )
        is None
    )
    if require_identity and mode in ("both", "identity") and not ident_ok:
        assert not d.allow  # fail closed: no identity, no entry
    if mode == "both" and require_token and token != "token":
        assert not d.allow
    if mode == "identity" and require_identity:
        assert d.allow is (ident_ok and token != "bad")
    if mode == "either" and require_identity and token == "none":
        assert d.allow is ident_ok


@pytest.mark.parametrize("mode", ["both", "either", "identity"])
@pytest.mark.parametrize(
    ("subject", "outcome", "status"),
    [
        ("alice@example.com", "alice", 200),
        ("bob@example.com", "alice", 403),
        (None, "alice", 200),  # a static token has no subject
        ("someone", "ci", 403),  # a tagged device cannot prove it belongs to the subject
        ("alice@example.com", "unknown", 403),
        ("alice@example.com", "none", 403),
        ("alice@example.com", "unavailable", 503),
    ],
)
def test_token_user_must_match_the_device(
    mode: str, subject: str | None, outcome: str, status: int
) -> None:
    d = run(True, True, mode, "open", "token", outcome, subject=subject, user_match=True)
    if mode == "identity" and status == 200:
        assert d.allow
        return
    assert (d.allow, d.status) == (status == 200, status)
    if status == 403:
        assert d.reason == "token subject does not match the device's user"


def test_check_identity_node_id_and_tagged_user_lists() -> None:
    s = PolicySettings(True, True, "both", allow_nodes=frozenset({"nCI"}))
    assert check_identity(CI, s) is None
    # A tagged node is never admitted by a user list, even if it had a login.
    tagged_with_login = Ident(login="alice@example.com", tags=("tag:x",))
    s = PolicySettings(True, True, "both", allow_users=frozenset({"alice@example.com"}))
    assert check_identity(tagged_with_login, s) is not None
    assert check_identity(ALICE, s) is None
