"""Tests of proxy/config.py: every key loads, every bad value names its key path.

The playbook's Step 2 blocks load as written; each bad document gives one ConfigError whose
text is ``key.path: message``; and random JSON-ish documents (hypothesis) never raise
anything but ConfigError, so ``clawgate serve`` never shows a traceback for a bad config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import (
    DEFAULT_ALLOWED,
    Config,
    load_config,
    parse_config,
)
from proxy.errors import ConfigError

# ----------------------------------------------------------------------------- the playbook

PLAYBOOK_SINGLE_HOST = {"gateway": {"host": "100.101.102.103", "port": 18789, "requireToken": True}}
PLAYBOOK_ALL_INTERFACES = {
    "gateway": {
        "host": "0.0.0.0",
        "port": 18789,
        "requireToken": True,
        "allowedNetworks": ["127.0.0.1/32", "100.64.0.0/10"],
    }
}


def test_playbook_single_host_loads_as_written() -> None:
    cfg = parse_config(PLAYBOOK_SINGLE_HOST)
    assert cfg.gateway.hosts == ("100.101.102.103",)
    assert cfg.gateway.port == 18789
    assert cfg.gateway.require_token is True
    # No allowedNetworks written: the tailnet and loopback ranges are enforced.
    assert cfg.gateway.allowed_networks_set is False
    assert cfg.gateway.allowed_networks.cidrs == DEFAULT_ALLOWED
    assert "100.101.102.103" in cfg.gateway.allowed_networks
    assert "203.0.113.7" not in cfg.gateway.allowed_networks
    assert cfg.upstream.host == "127.0.0.1" and cfg.upstream.port == 18789


def test_playbook_all_interfaces_loads_with_the_gateway_moved() -> None:
    # The block itself is untouched; the gateway sits on another loopback port, as it must,
    # since clawgate on 0.0.0.0:18789 cannot share 18789 with the gateway on 127.0.0.1.
    cfg = parse_config({**PLAYBOOK_ALL_INTERFACES, "upstream": "http://127.0.0.1:18780"})
    g = cfg.gateway
    assert g.hosts == ("0.0.0.0",)
    assert g.require_token is True
    assert g.allowed_networks_set is True
    assert g.allowed_networks.cidrs == ("127.0.0.1/32", "100.64.0.0/10")
    for ip, inside in [
        ("127.0.0.1", True),
        ("100.64.0.0", True),
        ("100.127.255.255", True),
        ("100.101.102.103", True),
        ("127.0.0.2", False),
        ("100.128.0.0", False),
        ("203.0.113.7", False),
        ("::1", False),
        ("fd7a:115c:a1e0::1", False),
    ]:
        assert (ip in g.allowed_networks) is inside, ip


def test_playbook_all_interfaces_with_the_default_upstream_is_refused_with_a_reason() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(PLAYBOOK_ALL_INTERFACES)
    assert ei.value.path == "gateway.port"
    assert "upstream" in ei.value.message


def test_embedded_defaults() -> None:
    cfg = parse_config({})
    assert cfg == load_config(None)
    assert cfg.gateway.hosts == ("tailscale",) and cfg.listens_on_tailscale
    assert cfg.gateway.port == 18789 and cfg.gateway.require_token
    assert cfg.gateway.exempt_paths == frozenset({"/health", "/healthz"})
    assert cfg.upstream.url == "http://127.0.0.1:18789"
    assert cfg.admin.host == "127.0.0.1" and cfg.admin.port == 18790
    assert cfg.log.access == "stdout"
    assert cfg.limits.head_bytes == 16384 and cfg.limits.head_timeout == 10.0
    assert cfg.limits.idle_timeout >= 3600.0
    assert cfg.source is None


def test_config_is_immutable() -> None:
    cfg = parse_config({})
    with pytest.raises(AttributeError):
        cfg.gateway.port = 1  # type: ignore[misc]


# ----------------------------------------------------------------------------- good values


def _get(cfg: Config, attr: str) -> Any:
    value: Any = cfg
    for part in attr.split("."):
        value = getattr(value, part)
    return value


GOOD: list[tuple[dict[str, Any], str, Any]] = [
    ({"gateway": {"host": "100.101.102.103"}}, "gateway.hosts", ("100.101.102.103",)),
    (
        {"gateway": {"host": ["100.101.102.103", "fd7a:115c:a1e0::1"]}},
        "gateway.hosts",
        ("100.101.102.103", "fd7a:115c:a1e0::1"),
    ),
    (
        {"gateway": {"host": ["tailscale", "127.0.0.1"], "port": 18791}},
        "gateway.hosts",
        ("tailscale", "127.0.0.1"),
    ),
    ({"gateway": {"host": "[::1]", "port": 18791}}, "gateway.hosts", ("::1",)),
    (
        {"gateway": {"host": "::", "allowedNetworks": ["fd7a:115c:a1e0::/48"], "port": 1}},
        "gateway.hosts",
        ("::",),
    ),
    ({"gateway": {"port": 1}}, "gateway.port", 1),
    ({"gateway": {"port": 65535}}, "gateway.port", 65535),
    ({"gateway": {"requireToken": False}}, "gateway.require_token", False),
    (
        {"gateway": {"allowedNetworks": ["10.0.0.0/8", "::1"]}},
        "gateway.allowed_networks.cidrs",
        ("10.0.0.0/8", "::1/128"),
    ),
    (
        {"gateway": {"exemptPaths": ["/health", "/status/live"]}},
        "gateway.exempt_paths",
        frozenset({"/health", "/status/live"}),
    ),
    ({"gateway": {"exemptPaths": []}}, "gateway.exempt_paths", frozenset()),
    (
        {
            "gateway": {
                "allowedHosts": ["OpenClaw.Example.com.", "[FD7A::1]", "fd7a::2", "198.18.0.1"]
            }
        },
        "gateway.allowed_hosts",
        ("openclaw.example.com", "fd7a::1", "fd7a::2", "198.18.0.1"),
    ),
    ({"upstream": "http://127.0.0.1:18780"}, "upstream.port", 18780),
    ({"upstream": "http://[::1]:18789"}, "upstream.host", "::1"),
    ({"upstream": "ws://localhost"}, "upstream.port", 80),
    ({"upstream": "unix:/run/openclaw.sock"}, "upstream.unix_path", "/run/openclaw.sock"),
    ({"upstream": {"connectTimeout": 2}}, "upstream.url", "http://127.0.0.1:18789"),
    (
        {"upstream": {"url": "unix:/run/o.sock", "connectTimeout": 0.5}},
        "upstream.connect_timeout",
        0.5,
    ),
    ({"tokens": {"file": "/etc/clawgate/tokens.json"}}, "tokens.file", "/etc/clawgate/tokens.json"),
    ({"tokens": {"env": "CLAWGATE_TOKEN"}}, "tokens.env", ("CLAWGATE_TOKEN",)),
    ({"tokens": {"env": ["A", "B_2"]}}, "tokens.env", ("A", "B_2")),
    ({"tokens": {"sessionTtl": 60}}, "tokens.session_ttl", 60.0),
    ({"tokens": {"cookieName": "cg"}}, "tokens.cookie_name", "cg"),
    (
        {"gatewayToken": {"env": "OPENCLAW_GATEWAY_TOKEN"}},
        "gateway_token.env",
        "OPENCLAW_GATEWAY_TOKEN",
    ),
    (
        {"gatewayToken": {"file": "/etc/gw.token", "firstFrameTimeout": 5, "maxFirstFrame": 1024}},
        "gateway_token.max_first_frame",
        1024,
    ),
    (
        {"gatewayToken": {"stateDir": "/var/lib/openclaw/.openclaw/"}},
        "gateway_token.state_dir",
        "/var/lib/openclaw/.openclaw",
    ),
    ({"gatewayToken": {"stateDir": None}}, "gateway_token.state_dir", None),
    (
        {
            "jwt": {
                "enabled": True,
                "issuer": "i",
                "audience": "a",
                "keyFile": "/k.pem",
                "algorithms": ["ES256"],
                "leeway": 0,
            }
        },
        "jwt.algorithms",
        ("ES256",),
    ),
    (
        {
            "jwt": {
                "enabled": True,
                "issuer": "i",
                "audience": "a",
                "algorithms": ["HS256"],
                "hs256SecretFile": "/s",
            }
        },
        "jwt.hs256_secret_file",
        "/s",
    ),
    ({"tailscale": {"socket": "/tmp/ts.sock"}}, "tailscale.socket", "/tmp/ts.sock"),
    ({"tailscale": {"requireIdentity": False}}, "tailscale.require_identity", False),
    ({"tailscale": {"requireIdentity": None}}, "tailscale.require_identity", None),
    (
        {"tailscale": {"allowUsers": ["alice@example.com"]}},
        "tailscale.allow_users",
        frozenset({"alice@example.com"}),
    ),
    ({"tailscale": {"allowTags": ["tag:ci"]}}, "tailscale.allow_tags", frozenset({"tag:ci"})),
    (
        {"tailscale": {"allowNodes": ["ci.tail1234.ts.net."]}},
        "tailscale.allow_nodes",
        frozenset({"ci.tail1234.ts.net"}),
    ),
    (
        {"tailscale": {"requireCapability": "example.com/cap/openclaw"}},
        "tailscale.require_capability",
        "example.com/cap/openclaw",
    ),
    ({"tailscale": {"authMode": "either"}}, "tailscale.auth_mode", "either"),
    (
        {"tailscale": {"identityHeader": "X-Openclaw-User"}},
        "tailscale.identity_header",
        "X-Openclaw-User",
    ),
    (
        {"tailscale": {"taggedIdentity": "{node} ({tags})"}},
        "tailscale.tagged_identity",
        "{node} ({tags})",
    ),
    ({"tailscale": {"taggedIdentity": ""}}, "tailscale.tagged_identity", ""),
    (
        {
            "tailscale": {
                "sendTailscaleHeaders": True,
                "cacheTtl": 0,
                "timeout": 0.05,
                "keyExpiryWarnDays": 0,
            }
        },
        "tailscale.send_tailscale_headers",
        True,
    ),
    ({"admin": {"enabled": False}}, "admin.enabled", False),
    ({"admin": {"host": "::1", "port": 0}}, "admin.host", "::1"),
    ({"admin": {"host": "127.0.0.5"}}, "admin.host", "127.0.0.5"),
    ({"admin": {"host": "localhost"}}, "admin.host", "localhost"),
    ({"log": {"access": "off", "level": "debug", "refusedPerSecond": 0}}, "log.access", "off"),
    ({"log": {"access": "/var/log/clawgate.jsonl"}}, "log.access", "/var/log/clawgate.jsonl"),
    ({"limits": {"headBytes": 1024, "headTimeout": 0.1}}, "limits.head_bytes", 1024),
    ({}, "limits.head_lines", 100),
    ({"limits": {"headLines": 8}}, "limits.head_lines", 8),
    ({"limits": {"headLines": 5000}}, "limits.head_lines", 5000),
    (
        {
            "limits": {
                "maxConnections": 1,
                "perSourceIp": 1,
                "perIdentity": 1,
                "unauthenticatedPerIp": 1,
                "idleTimeout": 1,
                "failedAuthCount": 1,
                "failedAuthWindow": 1,
                "failedAuthLockout": 0,
                "drainSeconds": 0,
                "highWater": 16384,
            }
        },
        "limits.high_water",
        16384,
    ),
    ({"tls": "off"}, "tls.mode", "off"),
    ({"tls": "tailscale"}, "tls.mode", "tailscale"),
    ({"tls": {"certFile": "/c.pem", "keyFile": "/k.pem"}}, "tls.mode", "files"),
    (
        {
            "tls": {
                "mode": "tailscale",
                "domain": "gw.tail1234.ts.net",
                "minValidity": "24h30m",
                "renewCheckSeconds": 5,
                "redirectPort": 80,
            }
        },
        "tls.min_validity",
        "24h30m",
    ),
    ({"workers": 4}, "workers", 4),
]


@pytest.mark.parametrize(
    ("doc", "attr", "expected"), GOOD, ids=[f"{i}-{a}" for i, (_, a, _) in enumerate(GOOD)]
)
def test_every_key_loads(doc: dict[str, Any], attr: str, expected: Any) -> None:
    assert _get(parse_config(doc), attr) == expected


def test_gateway_state_dir_defaults_like_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENCLAW_STATE_DIR", "/srv/openclaw-state")
    assert parse_config({}).gateway_token.state_dir == "/srv/openclaw-state"
    monkeypatch.delenv("OPENCLAW_STATE_DIR")
    monkeypatch.setenv("HOME", "/home/gw")
    monkeypatch.delenv("OPENCLAW_HOME", raising=False)
    assert parse_config({}).gateway_token.state_dir == "/home/gw/.openclaw"


def test_tokens_file_expands_the_home_directory() -> None:
    cfg = parse_config({"tokens": {"file": "~/tokens.json"}})
    assert cfg.tokens.file == os.path.join(os.path.expanduser("~"), "tokens.json")


# ----------------------------------------------------------------------------- bad values

BAD: list[tuple[dict[str, Any] | list[Any], str, str]] = [
    # unknown keys, at every level
    ({"gatway": {}}, "gatway", "unknown key"),
    ({"gateway": {"hosts": "100.64.0.1"}}, "gateway.hosts", "unknown key"),
    ({"upstream": {"url": "http://127.0.0.1:1", "tls": True}}, "upstream.tls", "unknown key"),
    ({"tokens": {"fiel": "/x"}}, "tokens.fiel", "unknown key"),
    ({"gatewayToken": {"envv": "X"}}, "gatewayToken.envv", "unknown key"),
    ({"jwt": {"issuers": "x"}}, "jwt.issuers", "unknown key"),
    ({"tailscale": {"allowUser": []}}, "tailscale.allowUser", "unknown key"),
    ({"admin": {"bind": "127.0.0.1"}}, "admin.bind", "unknown key"),
    ({"log": {"format": "json"}}, "log.format", "unknown key"),
    ({"limits": {"headByte": 1}}, "limits.headByte", "unknown key"),
    ({"tls": {"cert": "/c"}}, "tls.cert", "unknown key"),
    ({"a\nclawgate: forged line": 1}, "'a\\nclawgate: forged line'", "unknown key"),
    ({"gateway": {"x\r": 1}}, "gateway.'x\\r'", "unknown key"),
    # wrong types
    ([], "(top level)", "expected an object"),
    ({"gateway": []}, "gateway", "expected an object, got a list"),
    ({"gateway": {"port": "18789"}}, "gateway.port", "expected a whole number, got a string"),
    ({"gateway": {"port": 18789.0}}, "gateway.port", "expected a whole number"),
    ({"gateway": {"port": True}}, "gateway.port", "got a boolean"),
    ({"gateway": {"port": 0}}, "gateway.port", "out of range"),
    ({"gateway": {"port": 65536}}, "gateway.port", "out of range"),
    ({"gateway": {"requireToken": "true"}}, "gateway.requireToken", "expected true or false"),
    ({"gateway": {"requireToken": 1}}, "gateway.requireToken", "expected true or false"),
    ({"gateway": {"host": 100}}, "gateway.host", "expected an address"),
    ({"gateway": {"host": []}}, "gateway.host", "non-empty list"),
    ({"gateway": {"host": [1]}}, "gateway.host[0]", "expected a string"),
    (
        {"gateway": {"allowedNetworks": "100.64.0.0/10"}},
        "gateway.allowedNetworks",
        "expected a list",
    ),
    (
        {"gateway": {"allowedNetworks": [10]}},
        "gateway.allowedNetworks[0]",
        "expected a network string",
    ),
    ({"gateway": {"exemptPaths": "/health"}}, "gateway.exemptPaths", "expected a list"),
    ({"upstream": 18789}, "upstream", "expected an object"),
    ({"upstream": {"connectTimeout": "1"}}, "upstream.connectTimeout", "expected a number"),
    ({"tokens": {"sessionTtl": 1}}, "tokens.sessionTtl", "out of range"),
    ({"tokens": {"env": 5}}, "tokens.env", "expected a variable name or a list"),
    ({"tailscale": {"requireIdentity": "yes"}}, "tailscale.requireIdentity", "true or false"),
    ({"tailscale": {"allowUsers": "alice"}}, "tailscale.allowUsers", "expected a list"),
    ({"tailscale": {"authMode": "any"}}, "tailscale.authMode", "is not one of"),
    ({"tailscale": {"timeout": float("nan")}}, "tailscale.timeout", "out of range"),
    ({"tailscale": {"cacheTtl": float("inf")}}, "tailscale.cacheTtl", "out of range"),
    ({"log": {"level": "trace"}}, "log.level", "is not one of"),
    ({"log": {"access": ""}}, "log.access", "must not be empty"),
    ({"log": {"access": "/x\n"}}, "log.access", "CR, LF or NUL"),
    ({"limits": {"headBytes": 100}}, "limits.headBytes", "out of range"),
    ({"limits": {"headLines": 7}}, "limits.headLines", "out of range"),
    ({"limits": {"headLines": 10**6}}, "limits.headLines", "out of range"),
    ({"limits": {"headLines": "100"}}, "limits.headLines", ""),
    ({"limits": {"highWater": 1 << 29}}, "limits.highWater", "out of range"),
    ({"workers": 0}, "workers", "out of range"),
    ({"tls": {"mode": "acme"}}, "tls.mode", "is not one of"),
    ({"tls": {"mode": "files", "certFile": "/c"}}, "tls.certFile", "needs certFile and keyFile"),
    ({"tls": {"minValidity": "30d"}}, "tls.minValidity", "not a duration"),
    # bad CIDRs and addresses
    (
        {"gateway": {"allowedNetworks": ["100.64.0.0/10", "10.0.0.0/33"]}},
        "gateway.allowedNetworks[1]",
        "'10.0.0.0/33' is not a network",
    ),
    (
        {"gateway": {"allowedNetworks": ["10/8"]}},
        "gateway.allowedNetworks[0]",
        "'10/8' is not a network",
    ),
    ({"gateway": {"allowedNetworks": ["127.1"]}}, "gateway.allowedNetworks[0]", "is not a network"),
    (
        {"gateway": {"allowedNetworks": ["10.0.0.0/08"]}},
        "gateway.allowedNetworks[0]",
        "is not a network",
    ),
    (
        {"gateway": {"allowedNetworks": ["10.0.0.0/-1"]}},
        "gateway.allowedNetworks[0]",
        "is not a network",
    ),
    (
        {"gateway": {"allowedNetworks": [" 10.0.0.0/8"]}},
        "gateway.allowedNetworks[0]",
        "is not a network",
    ),
    (
        {"gateway": {"allowedNetworks": ["::/129"]}},
        "gateway.allowedNetworks[0]",
        "is not a network",
    ),
    (
        {"gateway": {"allowedNetworks": ["fd7a::1%eth0/128"]}},
        "gateway.allowedNetworks[0]",
        "is not a network",
    ),
    (
        {"gateway": {"allowedNetworks": ["example.com"]}},
        "gateway.allowedNetworks[0]",
        "is not a network",
    ),
    (
        {"gateway": {"allowedNetworks": ["100.101.102.103/10"]}},
        "gateway.allowedNetworks[0]",
        "has host bits set (did you mean '100.64.0.0/10'?)",
    ),
    (
        {"gateway": {"allowedNetworks": ["fd7a:115c:a1e0::1/48"]}},
        "gateway.allowedNetworks[0]",
        "has host bits set",
    ),
    ({"gateway": {"allowedNetworks": []}}, "gateway.allowedNetworks", "is empty"),
    ({"gateway": {"host": "100.64.0.256"}}, "gateway.host", "is not an IP address"),
    ({"gateway": {"host": "gateway.local"}}, "gateway.host", "is not an IP address"),
    ({"gateway": {"host": "fe80::1%eth0"}}, "gateway.host", "is not an IP address"),
    ({"gateway": {"host": ["\udcff"]}}, "gateway.host[0]", "is not an IP address"),
    ({"admin": {"host": "127.\udcff"}}, "admin.host", "is not an IP address"),
    ({"gateway": {"host": ["100.64.0.1", "bogus"]}}, "gateway.host[1]", "is not an IP address"),
    ({"gateway": {"host": ["100.64.0.1", "100.64.0.1"]}}, "gateway.host", "twice"),
    ({"upstream": "https://127.0.0.1:18789"}, "upstream.url", "expected http://HOST:PORT"),
    ({"upstream": "http://[::1"}, "upstream.url", "expected http://HOST:PORT"),
    ({"upstream": "http://127.0.0.1:99999"}, "upstream.url", "bad port"),
    ({"upstream": "http://127.0.0.1:18789/api"}, "upstream.url", "only scheme, host and port"),
    ({"upstream": "http://u:p@127.0.0.1:1"}, "upstream.url", "only scheme, host and port"),
    ({"upstream": "http://:1"}, "upstream.url", "no host"),
    ({"upstream": "unix:run/o.sock"}, "upstream.url", "absolute path"),
    ({"upstream": {"url": "ftp://x"}}, "upstream.url", "expected http://HOST:PORT"),
    # 0.0.0.0 or :: without allowedNetworks
    (
        {"gateway": {"host": "0.0.0.0", "port": 18788}},
        "gateway.host",
        "listens on every interface: set gateway.allowedNetworks",
    ),
    ({"gateway": {"host": "::", "port": 18788}}, "gateway.host", "listens on every interface"),
    (
        {"gateway": {"host": ["100.64.0.1", "0.0.0.0"], "port": 18788}},
        "gateway.host",
        "every interface",
    ),
    # the proxy on the upstream's own address and port
    ({"gateway": {"host": "127.0.0.1"}}, "gateway.host", "upstream gateway's own address"),
    (
        {"gateway": {"host": "127.0.0.1", "port": 9000}, "upstream": "http://127.0.0.1:9000"},
        "gateway.host",
        "upstream gateway's own address",
    ),
    (
        {"gateway": {"host": "127.0.0.1"}, "upstream": "http://localhost:18789"},
        "gateway.host",
        "upstream gateway's own address",
    ),
    (
        {"gateway": {"host": "::1", "port": 80}, "upstream": "http://[::1]"},
        "gateway.host",
        "upstream gateway's own address",
    ),
    (
        {"gateway": {"host": "0.0.0.0", "allowedNetworks": ["100.64.0.0/10"]}},
        "gateway.port",
        "would take the upstream's port",
    ),
    # secrets inline
    ({"tokens": {"token": "s3cret"}}, "tokens.token", "secrets never go in the config"),
    ({"tokens": {"tokens": ["s3cret"]}}, "tokens.tokens", "secrets never go in the config"),
    ({"tokens": {"secret": "s3cret"}}, "tokens.secret", "secrets never go in the config"),
    ({"gatewayToken": {"value": "s3cret"}}, "gatewayToken.value", "secrets never go in the config"),
    ({"gatewayToken": {"token": "s3cret"}}, "gatewayToken.token", "secrets never go in the config"),
    ({"jwt": {"secret": "s3cret"}}, "jwt.secret", "secrets never go in the config"),
    ({"jwt": {"key": "-----BEGIN"}}, "jwt.key", "secrets never go in the config"),
    ({"tokens": {"env": "s3cret-token-value"}}, "tokens.env", "not an environment variable name"),
    ({"gatewayToken": {"env": "abc def"}}, "gatewayToken.env", "not an environment variable name"),
    (
        {"gatewayToken": {"stateDir": "relative/dir"}},
        "gatewayToken.stateDir",
        "is not an absolute path",
    ),
    ({"gatewayToken": {"stateDir": 5}}, "gatewayToken.stateDir", "expected a string"),
    ({"gatewayToken": {"stateDir": ""}}, "gatewayToken.stateDir", "must not be empty"),
    # admin is loopback only
    ({"admin": {"host": "0.0.0.0"}}, "admin.host", "loopback only"),
    ({"admin": {"host": "100.64.0.1"}}, "admin.host", "loopback only"),
    ({"admin": {"host": "::"}}, "admin.host", "loopback only"),
    ({"admin": {"host": "127.0.0.1.5"}}, "admin.host", "is not an IP address"),
    (
        {"admin": {"port": 18791}, "gateway": {"host": "127.0.0.1", "port": 18791}},
        "admin.port",
        "is the port clawgate listens on",
    ),
    # cross-key rules and the rest
    ({"gateway": {"exemptPaths": ["health"]}}, "gateway.exemptPaths[0]", "plain absolute path"),
    (
        {"gateway": {"allowedHosts": ["a.example", "a.example:443"]}},
        "gateway.allowedHosts[1]",
        "not a host name",
    ),
    (
        {"gateway": {"allowedHosts": ["https://a.example"]}},
        "gateway.allowedHosts[0]",
        "not a host name",
    ),
    ({"gateway": {"allowedHosts": ["*.example"]}}, "gateway.allowedHosts[0]", "not a host name"),
    ({"gateway": {"allowedHosts": "a.example"}}, "gateway.allowedHosts", "expected a list"),
    (
        {"tailscale": {"requireIdentity": False, "allowUsers": ["a@b"]}},
        "tailscale.requireIdentity",
        "contradicts tailscale.allowUsers",
    ),
    ({"gateway": {"exemptPaths": ["/a/../health"]}}, "gateway.exemptPaths[0]", "normalised"),
    ({"gateway": {"exemptPaths": ["//health"]}}, "gateway.exemptPaths[0]", "plain absolute"),
    ({"gateway": {"exemptPaths": ["/health%2F"]}}, "gateway.exemptPaths[0]", "plain absolute"),
    (
        {"tailscale": {"identityHeader": "X Forwarded"}},
        "tailscale.identityHeader",
        "not a valid header name",
    ),
    (
        {"tailscale": {"identityHeader": "x-forwarded-for"}},
        "tailscale.identityHeader",
        "names a header clawgate sets itself",
    ),
    (
        {"tailscale": {"authMode": "identity", "requireIdentity": False}},
        "tailscale.requireIdentity",
        "contradicts authMode",
    ),
    ({"tailscale": {"allowTags": ["ci"]}}, "tailscale.allowTags[0]", "is not a tag"),
    (
        {"tailscale": {"requireCapability": "openclaw"}},
        "tailscale.requireCapability",
        "not a capability name",
    ),
    ({"tailscale": {"taggedIdentity": "{user}"}}, "tailscale.taggedIdentity", "may use only"),
    ({"tailscale": {"taggedIdentity": "{node.upper}"}}, "tailscale.taggedIdentity", "may use only"),
    ({"tailscale": {"taggedIdentity": "{node.foo}"}}, "tailscale.taggedIdentity", "may use only"),
    ({"tailscale": {"taggedIdentity": "{node[0]}"}}, "tailscale.taggedIdentity", "may use only"),
    ({"tailscale": {"taggedIdentity": "{0}"}}, "tailscale.taggedIdentity", "may use only"),
    ({"tailscale": {"taggedIdentity": "{node"}}, "tailscale.taggedIdentity", "may use only"),
    ({"jwt": {"enabled": True}}, "jwt.issuer", "required"),
    (
        {"jwt": {"enabled": True, "issuer": "i", "audience": "a"}},
        "jwt.keyFile",
        "set keyFile, jwksUrl or hs256SecretFile",
    ),
    (
        {
            "jwt": {
                "enabled": True,
                "issuer": "i",
                "audience": "a",
                "keyFile": "/k",
                "algorithms": ["none"],
            }
        },
        "jwt.algorithms[0]",
        "is not one of",
    ),
    ({"jwt": {"algorithms": []}}, "jwt.algorithms", "at least one"),
    (
        {
            "jwt": {
                "enabled": True,
                "issuer": "i",
                "audience": "a",
                "keyFile": "/k",
                "algorithms": ["HS256"],
            }
        },
        "jwt.algorithms",
        "HS256 needs",
    ),
]


@pytest.mark.parametrize(
    ("doc", "path", "fragment"), BAD, ids=[f"{i}-{p}" for i, (_, p, _) in enumerate(BAD)]
)
def test_bad_config_names_the_key_path(doc: Any, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(doc)
    err = ei.value
    assert err.path == path
    assert fragment in err.message
    # One line, ``key.path: message``: what `clawgate serve` prints.
    assert str(err) == f"{path}: {err.message}"
    assert "\n" not in str(err)


def test_inline_secret_value_is_never_echoed() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({"tokens": {"token": "very-secret-value"}})
    assert "very-secret-value" not in str(ei.value)


# ----------------------------------------------------------------------------- files


def _write(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "clawgate.json"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


FILE_ERRORS: list[tuple[str | bytes, str, str]] = [
    ('{"gateway": {"port": 1, "port": 2}}', "gateway.port", "appears twice"),
    ('{"log": {}, "log": {}}', "log", "appears twice"),
    ('{"log": {"a\\n": 1, "a\\n": 2}}', "log.'a\\n'", "appears twice"),
    (
        '{"gateway": {"allowedNetworks": [{"a": 1, "a": 1}]}}',
        "gateway.allowedNetworks[0].a",
        "appears twice",
    ),
    ('{"gateway": {"port": 1,}}', "", "not valid JSON"),
    ("", "", "not valid JSON"),
    (b'{"log": {"access": "\xff"}}', "", "clawgate.json"),
    ('{"limits": {"headBytes": ' + "9" * 5000 + "}}", "", "not a usable JSON document"),
    ('{"gateway": ' + "[" * 100000 + "]" * 100000 + "}", "", "not a usable JSON document"),
    ('{"gateway": {"port": 0}}', "gateway.port", "out of range"),
]


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    FILE_ERRORS,
    ids=[f"{i}-{p or 'file'}" for i, (_, p, _) in enumerate(FILE_ERRORS)],
)
def test_bad_config_file(tmp_path: Path, text: str | bytes, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(_write(tmp_path, text))
    assert ei.value.path == path
    assert fragment in str(ei.value)
    assert "\n" not in str(ei.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")


def test_config_file_records_its_source(tmp_path: Path) -> None:
    p = _write(tmp_path, json.dumps(PLAYBOOK_SINGLE_HOST))
    cfg = load_config(p)
    assert cfg.source == str(p)
    assert cfg.gateway.hosts == ("100.101.102.103",)


# ----------------------------------------------------------------------------- fuzz

_SECTIONS = {
    "gateway": ["host", "port", "requireToken", "allowedNetworks", "exemptPaths", "allowedHosts"],
    "upstream": ["url", "connectTimeout"],
    "tokens": ["file", "env", "sessionTtl", "cookieName", "token"],
    "gatewayToken": ["file", "env", "firstFrameTimeout", "maxFirstFrame", "stateDir", "value"],
    "jwt": [
        "enabled",
        "algorithms",
        "issuer",
        "audience",
        "keyFile",
        "jwksUrl",
        "hs256SecretFile",
        "leeway",
        "subjectClaim",
        "requireTailscaleUser",
    ],
    "tailscale": [
        "socket",
        "requireIdentity",
        "allowUsers",
        "allowTags",
        "allowNodes",
        "requireCapability",
        "authMode",
        "identityHeader",
        "taggedIdentity",
        "sendTailscaleHeaders",
        "cacheTtl",
        "timeout",
    ],
    "admin": ["enabled", "host", "port"],
    "log": ["access", "level", "refusedPerSecond"],
    "limits": [
        "maxConnections",
        "headBytes",
        "headLines",
        "headTimeout",
        "highWater",
        "idleTimeout",
    ],
    "tls": ["mode", "certFile", "keyFile", "domain", "minValidity", "redirectPort"],
}
_INTERESTING_STRINGS = [
    "tailscale",
    "0.0.0.0",
    "::",
    "127.0.0.1",
    "100.64.0.1",
    "::1",
    "[::1]",
    "100.64.0.0/10",
    "10.0.0.0/33",
    "10/8",
    "fd7a:115c:a1e0::/48",
    "::ffff:10.0.0.0/104",
    "http://127.0.0.1:18789",
    "http://[::1",
    "unix:/x",
    "unix:x",
    "both",
    "either",
    "identity",
    "files",
    "off",
    "HS256",
    "{node}",
    "{node.x}",
    "{0}",
    "tag:ci",
    "/health",
    "//x",
    "720h",
    "X-Forwarded-User",
    "",
    "\x00",
    "\r\n",
    "\udcff",
]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(_INTERESTING_STRINGS),
    st.text(max_size=20),
)
_json = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)


@st.composite
def _documents(draw: st.DrawFn) -> Any:
    """Mostly well-shaped documents (real section and key names) with random values."""
    if draw(st.integers(0, 9)) == 0:
        return draw(_json)
    doc: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from(sorted(_SECTIONS)), max_size=4, unique=True)):
        keys = draw(st.lists(st.sampled_from(_SECTIONS[section]), max_size=4, unique=True))
        value: dict[str, Any] = {}
        for k in keys:
            value[k] = draw(
                st.one_of(_json, st.lists(st.sampled_from(_INTERESTING_STRINGS), max_size=3))
            )
        doc[section] = value if draw(st.integers(0, 9)) else draw(_json)
    if draw(st.booleans()):
        doc[draw(st.sampled_from(["workers", "upstream", "tls", "extra"]))] = draw(_json)
    return doc


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_documents())
def test_random_documents_raise_only_config_error(doc: Any) -> None:
    try:
        parse_config(doc)
    except ConfigError as exc:
        assert "\n" not in exc.path
        assert str(exc).startswith(f"{exc.path}: ") or not exc.path


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=80),
        st.binary(max_size=80),
        _documents().map(lambda d: json.dumps(d, allow_nan=True)),
    )
)
def test_random_files_raise_only_config_error(
    tmp_path_factory: pytest.TempPathFactory, text: str | bytes
) -> None:
    p = tmp_path_factory.mktemp("cfg") / "c.json"
    if isinstance(text, str):
        p.write_bytes(text.encode("utf-8", "surrogatepass"))
    else:
        p.write_bytes(text)
    try:
        load_config(p)
    except ConfigError:
        pass
