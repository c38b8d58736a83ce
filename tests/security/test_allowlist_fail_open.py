"""Issue 12 item 5: allow lists must never fail open.

The attacks: ``requireToken: false`` with ``tailscale.allowUsers`` admitted anonymous
requests when no tailscaled socket was found at start (no identity source, so the list
was never consulted), and when ``requireIdentity: false`` was written beside the list.
Now an allow list (or requireCapability) makes identity required: with no tailscaled
every request gets 503 until it appears; and ``requireIdentity: false`` beside one is a
config error naming the key (exit 2). The full combination audit is in
tests/unit/test_policy_combinations.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fakes.fake_gateway import FakeGateway
from tests.harness import run_cli
from tests.netns import Tailnet
from tests.support import (
    ALICE,
    CAP,
    clawgate_config,
    request,
    running,
)


@pytest.mark.parametrize(
    "policy",
    [
        {"allowUsers": [ALICE]},
        {"allowTags": ["tag:ci"]},
        {"allowNodes": ["alice-laptop"]},
        {"requireCapability": CAP},
    ],
)
async def test_no_tailscaled_at_start_gives_503_not_admit(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path, policy: dict[str, object]
) -> None:
    # No socket configured and none at the platform paths: no identity source at start.
    cfg = clawgate_config(fake_gateway, None, gateway={"requireToken": False}, tailscale=policy)
    async with running(tailnet, tmp_path / "cg", cfg) as cg:
        for role in ("phone", "ci"):
            for path in ("/headers", "/"):
                resp = await request(tailnet, role, path=path)
                assert resp.status == 503, (role, path, resp)
                assert b"tailscale" in resp.body.lower()
        assert fake_gateway.requests == [], "an anonymous request reached the gateway"
        assert "Traceback" not in cg.stderr()


@pytest.mark.parametrize(
    ("policy", "key"),
    [
        ({"allowUsers": [ALICE]}, "allowUsers"),
        ({"allowTags": ["tag:ci"]}, "allowTags"),
        ({"allowNodes": ["alice-laptop"]}, "allowNodes"),
        ({"requireCapability": CAP}, "requireCapability"),
    ],
)
def test_require_identity_false_beside_an_allow_list_is_refused(
    tmp_path: Path, policy: dict[str, object], key: str
) -> None:
    cfg = tmp_path / "clawgate.json"
    cfg.write_text(
        json.dumps(
            {"gateway": {"requireToken": False}, "tailscale": {"requireIdentity": False, **policy}}
        )
    )
    r = run_cli("check-config", "--config", str(cfg))
    assert r.returncode == 2, r
    assert (
        f"config error: tailscale.requireIdentity: false contradicts tailscale.{key}" in r.stderr
    ), r.stderr
