"""Authorizer in-process: the Authorization header is read once per decided request.

A JWT verifier is configured, so the decision first looks for a JWT that needs keys and
then checks the credential; both answers come from one read of the header.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

import proxy.authz as authz_module
import proxy.core.tokens as core_tokens
from proxy.authz import Authorizer
from proxy.config import parse_config
from proxy.core.http1 import parse_request_head
from proxy.core.sessions import SessionStore
from proxy.core.tokens import Credential, TokenEntry, TokenSet, digest
from proxy.errors import Unauthenticated


class Verifier:
    """The JwtVerifierLike surface, answering for one known JWT."""

    def __init__(self, good: str) -> None:
        self.good = good
        self.prepared: list[str] = []

    def needs_keys(self, token: str) -> bool:
        return False

    async def prepare(self, token: str) -> None:
        self.prepared.append(token)

    def verify(self, token: str) -> Credential:
        if token != self.good:
            raise Unauthenticated("invalid jwt")
        return Credential("jwt", "ci", subject="ci")


GOOD_JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJjaSJ9.c2ln"


def _authz(verifier: Verifier | None = None) -> Authorizer:
    cfg = parse_config(
        {
            "log": {"access": "off"},
            "gateway": {"host": "127.0.0.1", "port": 8443, "requireToken": True},
        }
    )
    ts = TokenSet([TokenEntry("phone", digest("p-secret-1"))])
    return Authorizer(
        cfg,
        ts,
        SessionStore(60),
        identity=None,
        identity_present=False,
        jwt=verifier or Verifier(GOOD_JWT),
    )


def _conn() -> Any:
    rt = SimpleNamespace(
        check_host=lambda conn, head: None, check_lockout=lambda conn, identity: None
    )
    return SimpleNamespace(rt=rt, peer_ip="100.64.0.9", peer_port=40000)


def _head(auth: str | None) -> Any:
    extra = f"Authorization: {auth}\r\n" if auth is not None else ""
    return parse_request_head(f"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    if (authz_module.__file__ or "").endswith(".so"):
        # Compiled by mypyc too (setup.py's HOT_PATH), authz calls read_authorization and
        # extract_token natively: no patch can see the calls. The pure build, which CI
        # runs as well, counts them in the same source.
        pytest.skip("counted in the pure build (proxy/authz.py is compiled here)")
    seen: list[str] = []
    real = core_tokens.extract_token

    def counting(value: str | None) -> tuple[str | None, str | None]:
        seen.append(value or "")
        return real(value)

    monkeypatch.setattr(core_tokens, "extract_token", counting)
    # Wherever else it was imported by name (an old second reader would be counted too).
    monkeypatch.setattr(authz_module, "extract_token", counting, raising=False)
    if core_tokens.__file__ and core_tokens.__file__.endswith(".so"):
        # Compiled by mypyc, read_authorization calls extract_token natively (the patch
        # above is not seen): count the calls of its one caller, read_authorization, that
        # reach extract_token (those of a request with an Authorization header) instead.
        real_read = core_tokens.read_authorization

        def counting_read(head: Any) -> Any:
            if head.header(b"authorization") is not None:
                seen.append("read")
            return real_read(head)

        monkeypatch.setattr(authz_module, "read_authorization", counting_read)
    return seen


@pytest.mark.parametrize(
    ("auth", "allow", "name"),
    [
        ("Bearer p-secret-1", True, "phone"),
        (f"Bearer {GOOD_JWT}", True, "ci"),
        ("Bearer wrong", False, None),
        ("Bearer eyJx.eyJy.z", False, None),  # JWT-shaped, refused by the verifier
        ("Basic !!!", False, None),
    ],
)
def test_authorization_is_parsed_once_sync(
    reads: list[str], auth: str, allow: bool, name: str | None
) -> None:
    grant = _authz().authorize_sync(_conn(), _head(auth))
    assert grant is not None
    assert grant.decision.allow is allow
    assert (grant.credential.name if grant.credential else None) == name
    assert len(reads) == 1


def test_authorization_is_parsed_once_async(reads: list[str]) -> None:
    verifier = Verifier(GOOD_JWT)
    authz = _authz(verifier)
    grant = asyncio.run(authz.authorize(_conn(), _head(f"Bearer {GOOD_JWT}")))
    assert grant.decision.allow and grant.credential is not None
    assert grant.credential.name == "ci"
    assert verifier.prepared == [GOOD_JWT]
    assert len(reads) == 1


def test_no_authorization_is_no_parse(reads: list[str]) -> None:
    grant = _authz().authorize_sync(_conn(), _head(None))
    assert grant is not None and not grant.decision.allow
    assert reads == []
