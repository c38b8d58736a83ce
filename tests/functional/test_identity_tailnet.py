"""Tailscale identity end to end: policy tables, the identity headers, the per-device log.

clawgate runs as a real process in the gw namespace, asking a fake tailscaled (a real
LocalAPI server on a unix socket) who each real source address is: alice's laptop
100.101.102.103 (alice@example.com), the tagged CI server 100.88.12.34 (tag:ci), and the
public host 198.18.0.7 (let in by allowedNetworks, unknown to tailscaled). The fake
gateway records the exact head it receives, so spoofed or missing identity shows.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.config import load_config
from tests.fakes.fake_gateway import FakeGateway
from tests.netns import CI_V4, GW_V4, GW_V6, PHONE_V4, PHONE_V6, PUBLIC_V4, Tailnet
from tests.support import (
    ALICE,
    ALICE_NODE,
    CAP,
    CI_NODE,
    alice_body,
    ci_body,
    clawgate_config,
    eventually,
    fake_tailscaled,
    reconfigure,
    request,
    running,
    stable_id,
)

# Who is asking: (namespace, destination) -> the verdict the fake daemon's answer leads to.
CLIENTS = {"alice": ("phone", GW_V4), "ci": ("ci", GW_V4), "unknown": ("public", GW_V4)}

# Identity verdict of each policy for each client: P passes the allow lists / capability,
# D is identified but refused, U is not a tailnet peer (whois 404).
POLICIES: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "no-lists": ({}, {"alice": "P", "ci": "P", "unknown": "U"}),
    "allowUsers-alice": ({"allowUsers": [ALICE]}, {"alice": "P", "ci": "D", "unknown": "U"}),
    "allowUsers-bob": (
        {"allowUsers": ["bob@example.com"]},
        {"alice": "D", "ci": "D", "unknown": "U"},
    ),
    # A tagged node is its tags: the tagged-devices pseudo-user is never a login.
    "allowUsers-tagged-devices": (
        {"allowUsers": ["tagged-devices"]},
        {"alice": "D", "ci": "D", "unknown": "U"},
    ),
    "allowTags-ci": ({"allowTags": ["tag:ci"]}, {"alice": "D", "ci": "P", "unknown": "U"}),
    "allowTags-other": ({"allowTags": ["tag:prod"]}, {"alice": "D", "ci": "D", "unknown": "U"}),
    "allowNodes-magicdns": (
        {"allowNodes": [ALICE_NODE + "."]},
        {"alice": "P", "ci": "D", "unknown": "U"},
    ),
    "allowNodes-stableid": ({"allowNodes": ["@ci"]}, {"alice": "D", "ci": "P", "unknown": "U"}),
    "users-or-tags": (
        {"allowUsers": [ALICE], "allowTags": ["tag:ci"]},
        {"alice": "P", "ci": "P", "unknown": "U"},
    ),
    "requireCapability": ({"requireCapability": CAP}, {"alice": "P", "ci": "D", "unknown": "U"}),
    "requireCapability-missing": (
        {"requireCapability": "example.com/cap/other"},
        {"alice": "D", "ci": "D", "unknown": "U"},
    ),
    "allowTags+requireCapability": (
        {"allowTags": ["tag:ci"], "requireCapability": CAP},
        {"alice": "D", "ci": "D", "unknown": "U"},
    ),
}

# The status for (verdict, credential) in each authMode; credential: good / none / bad token.
STATUS = {
    "both": {
        ("P", "good"): 200,
        ("D", "good"): 403,
        ("U", "good"): 403,
        ("P", "none"): 401,
        ("D", "none"): 401,
        ("U", "none"): 401,
        ("P", "bad"): 401,
        ("D", "bad"): 401,
        ("U", "bad"): 401,
    },
    "either": {
        ("P", "good"): 200,
        ("D", "good"): 200,
        ("U", "good"): 200,
        ("P", "none"): 200,
        ("D", "none"): 401,
        ("U", "none"): 401,
        ("P", "bad"): 401,
        ("D", "bad"): 401,
        ("U", "bad"): 401,
    },
    "identity": {
        ("P", "good"): 200,
        ("D", "good"): 403,
        ("U", "good"): 403,
        ("P", "none"): 200,
        ("D", "none"): 403,
        ("U", "none"): 403,
        ("P", "bad"): 401,
        ("D", "bad"): 401,
        ("U", "bad"): 401,
    },
}
EXPECTED_USER = {"alice": ALICE, "ci": CI_NODE}


@pytest.mark.parametrize("mode", ["both", "either", "identity"])
async def test_policy_table(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path, mode: str
) -> None:
    """Every authMode x credential x allow list x client gives its status; allowed
    requests carry the right identity header to the gateway and never a spoofed one."""
    async with fake_tailscaled() as ts:
        ci_id = stable_id(ci_body())
        cfg = clawgate_config(fake_gateway, ts.socket_path, tailscale={"authMode": mode})
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            good = cg.tokens["phone"]
            creds = {"good": good, "none": None, "bad": good[:-4] + "AAAA"}
            mismatches: list[str] = []
            n = itertools.count()
            for policy, (rules, verdicts) in POLICIES.items():
                rules = {
                    k: [ci_id if x == "@ci" else x for x in v] if isinstance(v, list) else v
                    for k, v in rules.items()
                }
                await reconfigure(cg, {"tailscale": {**cfg["tailscale"], **rules}})
                for client, (role, dst) in CLIENTS.items():
                    for cred, token in creds.items():
                        want = STATUS[mode][(verdicts[client], cred)]
                        tag = f"n={next(n)}"
                        resp = await request(
                            tailnet,
                            role,
                            dst,
                            path=f"/headers?{tag}",
                            token=token,
                            headers=[
                                ("X-Forwarded-User", "mallory@evil"),
                                ("Tailscale-User-Login", "mallory@evil"),
                            ],
                        )
                        where = f"{mode}/{policy}/{client}/{cred}"
                        if resp.status != want:
                            mismatches.append(
                                f"{where}: got {resp.status} want {want} ({resp.body[:80]!r})"
                            )
                            continue
                        seen = [r for r in fake_gateway.requests if r.target.endswith(tag)]
                        if want != 200:
                            if seen:
                                mismatches.append(f"{where}: denied but reached the gateway")
                            continue
                        assert len(seen) == 1, where
                        users = seen[0].header_all("X-Forwarded-User")
                        # An allowed unknown peer (either + token) has no identity to tell.
                        expect = [EXPECTED_USER[client]] if client in EXPECTED_USER else []
                        if users != expect:
                            mismatches.append(f"{where}: gateway saw X-Forwarded-User {users}")
                        if seen[0].header_all("Tailscale-User-Login"):
                            mismatches.append(f"{where}: spoofed Tailscale-User-Login passed")
            assert not mismatches, "\n".join(mismatches)


async def test_identity_headers_replace_spoofed_ones(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    """alice over v4 and v6 and the tagged node: the gateway sees exactly what clawgate
    vouches for; every client-sent identity and forwarding header (any case, '_') is gone."""
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(
            fake_gateway,
            ts.socket_path,
            host=[GW_V4, GW_V6],
            tailscale={"sendTailscaleHeaders": True},
        )
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            spoof = [
                ("X-Forwarded-User", "mallory@evil.example"),
                ("x_forwarded_user", "mallory@evil.example"),
                ("TAILSCALE-USER-LOGIN", "mallory@evil.example"),
                ("Tailscale-User-Name", "Mallory"),
                ("Tailscale_User_Profile_Pic", "https://evil.example/p.png"),
                ("Tailscale-Headers-Info", "https://evil.example"),
                ("X-Forwarded-For", "100.101.102.103"),
                ("X-Real-IP", "100.101.102.103"),
            ]
            cases = [
                ("alice-v4", "phone", GW_V4, PHONE_V4),
                ("alice-v6", "phone", GW_V6, PHONE_V6),
                ("ci", "ci", GW_V4, CI_V4),
            ]
            for name, role, dst, src in cases:
                fake_gateway.clear()
                resp = await request(tailnet, role, dst, token=cg.tokens["phone"], headers=spoof)
                assert resp.status == 200, (name, resp)
                (rec,) = fake_gateway.requests
                raw = rec.raw_head.decode("latin-1").lower()
                assert "mallory" not in raw and "evil.example" not in raw, (name, raw)
                assert "x_forwarded_user" not in raw and "tailscale_user" not in raw
                assert "tagged-devices" not in raw and "tagged devices" not in raw
                assert rec.header_all("X-Forwarded-For") == [src]
                assert rec.header_all("X-Forwarded-Proto") == ["http"]
                assert rec.header_all("Authorization") == []  # clawgate's own token
                if name.startswith("alice"):
                    assert rec.header_all("X-Forwarded-User") == [ALICE]
                    assert rec.header_all("Tailscale-User-Login") == [ALICE]
                    assert rec.header_all("Tailscale-User-Name") == ["Alice Example"]
                    assert rec.header_all("Tailscale-User-Profile-Pic") == [
                        "https://lh3.googleusercontent.com/a/ACg8ocJexample=s96-c"
                    ]
                else:
                    # A tagged node: taggedIdentity ("{node}" by default), and no
                    # Tailscale-User-* at all, as `tailscale serve` does.
                    assert rec.header_all("X-Forwarded-User") == [CI_NODE]
                    assert not [h for h, _ in rec.headers if h.lower().startswith("tailscale-")]


@pytest.mark.parametrize(
    ("template", "expect"),
    [
        ("{node}", [CI_NODE]),
        ("tag:{tags}", ["tag:tag:ci"]),
        ("svc-{host}", ["svc-ci-runner-1"]),
        ("", []),  # no identity header for tagged nodes at all
    ],
)
async def test_tagged_identity_value(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path, template: str, expect: list[str]
) -> None:
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(
            fake_gateway,
            ts.socket_path,
            tailscale={"taggedIdentity": template, "allowTags": ["tag:ci"]},
        )
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            resp = await request(
                tailnet,
                "ci",
                token=cg.tokens["phone"],
                headers=[("X-Forwarded-User", "tagged-devices")],
            )
            assert resp.status == 200
            (rec,) = fake_gateway.requests
            assert rec.header_all("X-Forwarded-User") == expect
            assert "tagged-devices" not in rec.raw_head.decode("latin-1")


async def test_custom_identity_header(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(
            fake_gateway, ts.socket_path, tailscale={"identityHeader": "X-Auth-Request-User"}
        )
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            resp = await request(
                tailnet,
                "phone",
                token=cg.tokens["phone"],
                headers=[("X-Auth-Request-User", "mallory"), ("x-auth-request_user", "mallory")],
            )
            assert resp.status == 200
            (rec,) = fake_gateway.requests
            assert rec.header_all("X-Auth-Request-User") == [ALICE]
            assert "mallory" not in rec.raw_head.decode("latin-1")


async def test_non_ascii_names_are_q_encoded(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    """Tailscale-User-* as `tailscale serve` sends them: RFC 2047 Q-encoding for non-ASCII."""
    zoe = alice_body(login="zoe@example.com", display_name="Zoë")
    zoe_full = alice_body(login="zoë@example.com", display_name="Zoë Ünal")
    async with fake_tailscaled(peers=[(PHONE_V4, zoe, "direct")]) as ts:
        cfg = clawgate_config(
            fake_gateway, ts.socket_path, tailscale={"sendTailscaleHeaders": True, "cacheTtl": 0}
        )
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            resp = await request(tailnet, "phone", token=cg.tokens["phone"])
            assert resp.status == 200
            (rec,) = fake_gateway.requests
            assert rec.header_all("Tailscale-User-Name") == ["=?utf-8?q?Zo=C3=AB?="]
            assert rec.header_all("Tailscale-User-Login") == ["zoe@example.com"]
            ts.add_peer(PHONE_V4, zoe_full, notify=True)
            fake_gateway.clear()
            resp = await request(tailnet, "phone", token=cg.tokens["phone"])
            assert resp.status == 200
            (rec,) = fake_gateway.requests
            assert rec.header_all("Tailscale-User-Name") == ["=?utf-8?q?Zo=C3=AB_=C3=9Cnal?="]
            # Go keeps printable ASCII (here '@' and '.') as is: byte for byte what
            # `tailscale serve` sends.
            assert rec.header_all("Tailscale-User-Login") == ["=?utf-8?q?zo=C3=AB@example.com?="]
            # Long values become several encoded-words of at most 75 characters.
            ts.add_peer(PHONE_V4, alice_body(display_name="é" * 12), notify=True)
            fake_gateway.clear()
            resp = await request(tailnet, "phone", token=cg.tokens["phone"])
            assert resp.status == 200
            (rec,) = fake_gateway.requests
            assert rec.header_all("Tailscale-User-Name") == [
                "=?utf-8?q?" + "=C3=A9" * 10 + "?= =?utf-8?q?" + "=C3=A9" * 2 + "?="
            ]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("login", "alice@example.com\r\nX-Forwarded-User: admin@example.com"),
        ("login", "alice\n@example.com"),
        ("login", "alice\x00@example.com"),
        ("display_name", "Alice\r\nX-Injected: 1"),
        ("display_name", "Alice\x00"),
    ],
)
async def test_control_characters_in_identity_are_refused(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path, field: str, value: str
) -> None:
    """A whois answer whose identity cannot be a header value never reaches the gateway."""
    body = alice_body(**{field: value})
    async with fake_tailscaled(peers=[(PHONE_V4, body, "direct")]) as ts:
        cfg = clawgate_config(
            fake_gateway, ts.socket_path, tailscale={"sendTailscaleHeaders": True}
        )
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            resp = await request(tailnet, "phone", token=cg.tokens["phone"])
            assert resp.status == 403, resp
            assert b"identity" in resp.body
            assert fake_gateway.requests == []
            assert fake_gateway.connections_opened == 0


async def test_access_log_names_the_device(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    """Decision and close lines carry node, login, tags, OS and the path from status."""
    async with fake_tailscaled() as ts:
        cfg = clawgate_config(fake_gateway, ts.socket_path, tailscale={"allowUsers": [ALICE]})
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            # /health asks tailscaled for status on the spot: the peer paths are known after it.
            await eventually(lambda: cg.admin_json("/health"), lambda r: r[0] == 200)
            token = cg.tokens["phone"]
            assert (await request(tailnet, "phone", token=token)).status == 200
            assert (await request(tailnet, "ci", token=token)).status == 403
            want: dict[str, dict[str, Any]] = {
                PHONE_V4: {
                    "node": ALICE_NODE,
                    "login": ALICE,
                    "tags": [],
                    "os": "macOS",
                    "peer_path": "direct",
                },
                CI_V4: {
                    "node": CI_NODE,
                    "login": None,
                    "tags": ["tag:ci"],
                    "os": "linux",
                    "peer_path": "derp:nyc",
                },
            }
            for ip, fields in want.items():
                for event in ("decision", "close"):
                    rec = await cg.wait_log(
                        lambda r, ip=ip, e=event: r.get("event") == e and r.get("peer") == ip
                    )
                    got = {k: rec.get(k) for k in fields}
                    assert got == fields, (event, rec)
            # The path follows status: alice now through a peer relay, seen at the next poll
            # (a SelfChange on the bus makes clawgate poll at once).
            ts.set_peer_path(PHONE_V4, "peer-relay")
            ts.push_notify({"SelfChange": {"ID": 1}})

            async def path_now() -> Any:
                await request(tailnet, "phone", token=token)
                return [
                    r.get("peer_path")
                    for r in cg.access_log()
                    if r.get("event") == "decision" and r.get("peer") == PHONE_V4
                ]

            await eventually(path_now, lambda paths: paths[-1] == "peer-relay")
            # The unknown peer: denied with a reason, no identity fields invented.
            resp = await request(tailnet, "public", token=token)
            assert resp.status == 403
            assert resp.body == b"not a known tailnet peer\n"
            rec = await cg.wait_log(
                lambda r: r.get("event") == "decision" and r.get("peer") == PUBLIC_V4
            )
            assert "login" not in rec and "node" not in rec


# Keys of the gateway-side snippet that OpenClaw 2026.9.6 is known to accept (its config
# refuses unknown keys at startup): reference/openclaw-gateway.md, docs/openclaw-notes.md.
_GATEWAY_KEYS = {"mode", "port", "bind", "trustedProxies", "auth", "controlUi"}
_AUTH_KEYS = {"mode", "password", "trustedProxy", "identityScopes"}
_TRUSTED_PROXY_KEYS = {
    "userHeader",
    "requiredHeaders",
    "allowUsers",
    "allowLoopback",
    "deviceAutoApprove",
}


async def test_shipped_configs_pair_up(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    """config/clawgate.identity.example.json in front of a gateway configured with
    config/openclaw.gateway.json: what clawgate sends is what that gateway reads."""
    repo = Path(__file__).resolve().parents[2]
    gw_side = json.loads((repo / "config" / "openclaw.gateway.json").read_text())
    ours = json.loads((repo / "config" / "clawgate.identity.example.json").read_text())
    load_config(repo / "config" / "clawgate.identity.example.json")  # valid, no unknown keys

    g = gw_side["gateway"]
    assert set(gw_side) == {"gateway"} and set(g) <= _GATEWAY_KEYS
    assert set(g["auth"]) <= _AUTH_KEYS and set(g["auth"]["trustedProxy"]) <= _TRUSTED_PROXY_KEYS
    assert "password" not in g["auth"] and "token" not in g["auth"]  # secrets never shipped
    tp = g["auth"]["trustedProxy"]
    assert g["bind"] == "loopback" and g["auth"]["mode"] == "trusted-proxy"
    assert g["trustedProxies"] == ["127.0.0.1/32", "::1/128"]
    assert tp["userHeader"] == ours["tailscale"]["identityHeader"].lower()
    assert set(g["auth"]["identityScopes"]) <= set(tp["allowUsers"])
    assert sorted(tp["allowUsers"]) == sorted(ours["tailscale"]["allowUsers"])

    async with fake_tailscaled() as ts:
        cfg = {
            **ours,
            "upstream": f"http://127.0.0.1:{fake_gateway.port}",
            "gateway": {**ours["gateway"], "host": GW_V4},
            "tailscale": {**ours["tailscale"], "socket": ts.socket_path},
        }
        del cfg["tokens"], cfg["log"], cfg["admin"]  # the harness's own
        async with running(tailnet, tmp_path / "cg", cfg) as cg:
            # alice's browser, no token: identity mode lets her in, and tells the gateway.
            resp = await request(tailnet, "phone", headers=[("X-Forwarded-User", "admin")])
            assert resp.status == 200
            (rec,) = fake_gateway.requests
            assert rec.header_all(tp["userHeader"]) == [ALICE]
            for name in tp["requiredHeaders"]:
                assert rec.header(name), name
            # The gateway attributes the client from X-Forwarded-For (never loopback) and
            # trusts it only because the connection comes from a trusted proxy address.
            assert rec.header_all("X-Forwarded-For") == [PHONE_V4]
            assert any(
                ipaddress.ip_address(rec.peer[0]) in ipaddress.ip_network(n)
                for n in g["trustedProxies"]
            )
            # The shared CI server is not alice: refused at the edge.
            assert (await request(tailnet, "ci", token=cg.tokens["phone"])).status == 403
            assert (await request(tailnet, "ci")).status == 403
            assert len(fake_gateway.requests) == 1
