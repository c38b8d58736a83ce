"""doctor's ``tls_cert_access`` check: the table over Facts, and the facts from a real fake daemon.

The fake tailscaled (a real server on a unix socket) answers 403 ``cert access denied`` in
its 403 cert mode, exactly like tailscaled for a user that is not root, operator or
TS_PERMIT_CERT_UID.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import parse_config
from proxy.doctor import Facts, TailscaleFacts, _tailscale_facts, check_tls_cert_access
from tests.fakes.fake_tailscaled import FakeTailscaled
from tests.tlsutil import DOMAIN, make_ca, make_leaf

TLS_ON = {"tls": "tailscale"}


def _ts(**over: Any) -> TailscaleFacts:
    base: dict[str, Any] = {
        "socket": "/run/tailscale/tailscaled.sock",
        "reachable": True,
        "backend_state": "Running",
        "cert_domains": (DOMAIN,),
        "cert_access": "ok",
    }
    base.update(over)
    return TailscaleFacts(**base)


@pytest.mark.parametrize(
    ("raw", "ts", "want"),
    [
        ({}, _ts(cert_access="denied"), None),  # tls off: nothing to say
        (TLS_ON, None, None),
        (TLS_ON, _ts(reachable=False), None),  # check_tailscaled reports that
        (TLS_ON, _ts(backend_state="NeedsLogin"), None),
        (TLS_ON, _ts(), ("ok", f"certificate for {DOMAIN}")),
        (TLS_ON, _ts(cert_domains=()), ("error", "does not issue HTTPS certificates")),
        (TLS_ON, _ts(cert_access="denied"), ("error", "403 cert access denied")),
        (TLS_ON, _ts(cert_access="tailscaled timed out after 30.0s"), ("error", "timed out")),
    ],
)
def test_table(
    raw: dict[str, Any], ts: TailscaleFacts | None, want: tuple[str, str] | None
) -> None:
    findings = check_tls_cert_access(Facts(cfg=parse_config(raw), tailscale=ts))
    if want is None:
        assert findings == []
        return
    (f,) = findings
    assert f.check == "tls_cert_access" and f.severity == want[0] and want[1] in f.what


def test_denied_finding_says_how_to_fix() -> None:
    (f,) = check_tls_cert_access(
        Facts(cfg=parse_config(TLS_ON), tailscale=_ts(cert_access="denied"))
    )
    assert "tailscale set --operator=" in f.fix and "TS_PERMIT_CERT_UID=" in f.fix


@pytest.mark.parametrize(("cert_mode", "want"), [("ok", "ok"), ("403", "denied")])
async def test_facts_from_the_fake_daemon(tmp_path: Path, cert_mode: str, want: str) -> None:
    leaf = make_leaf(make_ca())
    async with FakeTailscaled(tmp_path / "ts.sock") as fake:
        fake.cert_domains[:] = []
        fake.set_cert(DOMAIN, leaf.key_pem, leaf.cert_pem)
        fake.cert_mode = cert_mode
        cfg = parse_config({"tls": "tailscale", "tailscale": {"socket": fake.socket_path}})
        facts = await _tailscale_facts(cfg)
        assert facts.cert_domains == (DOMAIN,) and facts.cert_access == want
        assert fake.cert_calls == [(DOMAIN, "pair", "720h")]
        off = await _tailscale_facts(parse_config({"tailscale": {"socket": fake.socket_path}}))
        assert off.cert_access is None and len(fake.cert_calls) == 1
