"""Issue 12: a gateway token shorter than 32 bytes is refused at load and on reload.

A short shared secret is guessable from the tailnet (the first-frame gate and the login
form both accept it); clawgate refuses to run with one, naming the key that holds it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.runtime import build_authorizer_inputs
from tests.harness import run_cli

SHORT = "gateway-secret-0123456789abcdef"  # 31 bytes
LONG = "gateway-secret-0123456789abcdef-0"  # 33 bytes


def _cfg(tmp_path: Path, **gateway_token: str) -> object:
    return parse_config(
        {"tokens": {"file": str(tmp_path / "tokens.json")}, "gatewayToken": gateway_token}
    )


@pytest.mark.parametrize("value", [SHORT, "zq", " " * 40 + "short"])
def test_short_token_in_a_file_is_refused(tmp_path: Path, value: str) -> None:
    f = tmp_path / "gw.token"
    f.write_text(value + "\n")
    f.chmod(0o600)
    with pytest.raises(ConfigError) as err:
        build_authorizer_inputs(_cfg(tmp_path, file=str(f)))  # type: ignore[arg-type]
    assert str(err.value).startswith("gatewayToken.file: ")
    assert "at least 32 bytes" in str(err.value)
    assert value.strip() not in str(err.value)  # the secret itself is never echoed


def test_short_token_in_env_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CG_TEST_GW_TOKEN", SHORT)
    with pytest.raises(ConfigError) as err:
        build_authorizer_inputs(_cfg(tmp_path, env="CG_TEST_GW_TOKEN"))  # type: ignore[arg-type]
    assert str(err.value).startswith("gatewayToken.env: ")
    monkeypatch.setenv("CG_TEST_GW_TOKEN", LONG)
    _, gw = build_authorizer_inputs(_cfg(tmp_path, env="CG_TEST_GW_TOKEN"))  # type: ignore[arg-type]
    assert gw == LONG.encode()


def test_32_bytes_is_enough(tmp_path: Path) -> None:
    f = tmp_path / "gw.token"
    f.write_text("a" * 32)
    f.chmod(0o600)
    _, gw = build_authorizer_inputs(_cfg(tmp_path, file=str(f)))  # type: ignore[arg-type]
    assert gw == b"a" * 32


def test_serve_with_a_short_token_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "gw.token"
    f.write_text(SHORT)
    f.chmod(0o600)
    cfg = tmp_path / "clawgate.json"
    cfg.write_text(
        json.dumps(
            {
                "gateway": {"host": "127.0.0.1", "port": 1, "requireToken": True},
                "tokens": {"file": str(tmp_path / "tokens.json")},
                "gatewayToken": {"file": str(f)},
                "admin": {"enabled": False},
                "tailscale": {"requireIdentity": False},
            }
        )
    )
    r = run_cli("serve", "--config", str(cfg), timeout=10)
    assert r.returncode == 2, r
    assert "config error: gatewayToken.file:" in r.stderr and "32 bytes" in r.stderr
    assert "Traceback" not in r.stderr and SHORT not in r.stderr
