"""The clawgate command line as a user meets it: real processes, real files, real exits.

A bad config is one line on stderr naming the key path and exit status 2, from both
``check-config`` and ``serve``; ``token new`` prints the token once and stores only its
digest; ``token list`` and ``token revoke`` work on that file; and ``clawgate serve`` with
the embedded defaults and no tailscaled starts on 127.0.0.1:18790 with one warning line
(plus one saying that no token exists yet).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.tailscale import DEFAULT_SOCKET_PATHS
from tests.harness import ROOT, run_cli
from tests.netns import Tailnet, run_in
from tests.util import build_request, exchange

# (config document or raw text, the key path the one error line must name)
BAD_CONFIGS: list[tuple[Any, str]] = [
    (
        {"gateway": {"allowedNetworks": ["100.64.0.0/10", "10.0.0.0/33"]}},
        "gateway.allowedNetworks[1]: '10.0.0.0/33' is not a network",
    ),
    ({"gateway": {"allowedNetworks": ["10/8"]}}, "gateway.allowedNetworks[0]"),
    (
        {"gateway": {"allowedNetworks": ["100.101.102.103/10"]}},
        "gateway.allowedNetworks[0]: '100.101.102.103/10' has host bits set",
    ),
    ({"gateway": {"host": "0.0.0.0", "port": 18788}}, "gateway.host"),
    ({"gateway": {"host": "::", "port": 18788}}, "gateway.host"),
    ({"gateway": {"host": "127.0.0.1"}}, "gateway.host"),
    ({"gateway": {"host": "100.64.0.300"}}, "gateway.host"),
    ({"gateway": {"port": "18789"}}, "gateway.port"),
    ({"gateway": {"requireTokens": True}}, "gateway.requireTokens: unknown key"),
    ({"gatway": {}}, "gatway: unknown key"),
    ({"tokens": {"token": "s3cret"}}, "tokens.token"),
    ({"gatewayToken": {"value": "s3cret"}}, "gatewayToken.value"),
    ({"admin": {"host": "0.0.0.0"}}, "admin.host"),
    ({"upstream": "http://[::1"}, "upstream.url"),
    ('{"gateway": {"port": 18789, "port": 18790}}', "gateway.port: appears twice"),
    ('{"gateway": {"port": 18789,}}', "not valid JSON"),
    ('{"limits": {"headBytes": ' + "9" * 5000 + "}}", "not a usable JSON document"),
]


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """An environment whose HOME and XDG_CONFIG_HOME are private to the test."""
    h = tmp_path / "home"
    h.mkdir()
    env = {"HOME": str(h), "XDG_CONFIG_HOME": str(h / ".config")}
    os.environ.pop("CLAWGATE_CONFIG", None)
    return env


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize(
    ("doc", "fragment"),
    BAD_CONFIGS,
    ids=[f"{i}-{f.split(':')[0][:30]}" for i, (_, f) in enumerate(BAD_CONFIGS)],
)
def test_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, home: dict[str, str], doc: Any, fragment: str, command: str
) -> None:
    cfg = tmp_path / "clawgate.json"
    cfg.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    r = run_cli(command, "--config", str(cfg), env=home)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("clawgate: config error: ")
    assert fragment in lines[0]
    assert "Traceback" not in r.stderr and "s3cret" not in r.stderr
    assert r.stdout == ""


def test_check_config_accepts_the_playbook_block(tmp_path: Path, home: dict[str, str]) -> None:
    cfg = tmp_path / "clawgate.json"
    cfg.write_text(
        json.dumps({"gateway": {"host": "100.101.102.103", "port": 18789, "requireToken": True}})
    )
    r = run_cli("check-config", "--config", str(cfg), env=home)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"{cfg}: OK\n"
    r = run_cli("check-config", env=home)
    assert (r.returncode, r.stdout) == (0, "(embedded defaults): OK\n")


def test_missing_config_file(tmp_path: Path, home: dict[str, str]) -> None:
    r = run_cli("check-config", "--config", str(tmp_path / "nope.json"), env=home)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and "does not exist" in r.stderr


def test_help() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for word in ("serve", "check-config", "token", "reload"):
        assert word in r.stdout
    r = run_cli("token", "--help")
    assert r.returncode == 0 and "new" in r.stdout and "revoke" in r.stdout
    r = run_cli()
    assert r.returncode == 2 and "usage" in r.stderr.lower()


def test_token_new_list_revoke(tmp_path: Path, home: dict[str, str]) -> None:
    f = tmp_path / "tokens.json"
    # --config with the admin disabled on a dead port: revoke's reload attempt stays local.
    cfg = tmp_path / "clawgate.json"
    cfg.write_text(json.dumps({"admin": {"enabled": False, "port": 1}}))
    r = run_cli("token", "new", "phone", "--file", str(f), env=home)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert len(out) == 1
    token = out[0]
    assert len(token) >= 43 and all(c.isalnum() or c in "-_" for c in token)
    assert token not in r.stderr and "phone" in r.stderr
    raw = f.read_text()
    assert token not in raw
    data = json.loads(raw)
    assert data["tokens"][0]["name"] == "phone"
    assert data["tokens"][0]["digest"] == "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    assert stat.S_IMODE(f.stat().st_mode) == 0o600

    r2 = run_cli("token", "new", "laptop", "--file", str(f), env=home)
    assert r2.returncode == 0 and r2.stdout.strip() != token
    dup = run_cli("token", "new", "phone", "--file", str(f), env=home)
    assert dup.returncode == 1 and len(dup.stderr.splitlines()) == 1
    assert "already exists" in dup.stderr
    bad = run_cli("token", "new", "bad name", "--file", str(f), env=home)
    assert bad.returncode == 1 and "invalid token name" in bad.stderr

    listed = run_cli("token", "list", "--file", str(f), env=home)
    assert listed.returncode == 0
    assert [ln.split()[0] for ln in listed.stdout.splitlines()] == ["phone", "laptop"]
    assert token not in listed.stdout
    as_json = run_cli("token", "list", "--json", "--file", str(f), env=home)
    assert [e["name"] for e in json.loads(as_json.stdout)] == ["phone", "laptop"]

    rv = run_cli("token", "revoke", "phone", "--file", str(f), "--config", str(cfg), env=home)
    assert rv.returncode == 0, rv.stderr
    assert [e["name"] for e in json.loads(f.read_text())["tokens"]] == ["laptop"]
    again = run_cli("token", "revoke", "phone", "--file", str(f), "--config", str(cfg), env=home)
    assert again.returncode == 1 and "no token named 'phone'" in again.stderr
    assert len(again.stderr.splitlines()) == 1


def test_token_file_from_the_config(tmp_path: Path, home: dict[str, str]) -> None:
    f = tmp_path / "from-config.json"
    cfg = tmp_path / "clawgate.json"
    cfg.write_text(json.dumps({"tokens": {"file": str(f)}}))
    r = run_cli("token", "new", "ci", "--config", str(cfg), env=home)
    assert r.returncode == 0, r.stderr
    assert [e["name"] for e in json.loads(f.read_text())["tokens"]] == ["ci"]


def test_token_new_default_file_under_home(home: dict[str, str]) -> None:
    r = run_cli("token", "new", "me", env=home)
    assert r.returncode == 0, r.stderr
    path = Path(home["XDG_CONFIG_HOME"]) / "clawgate" / "tokens.json"
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600


# ----------------------------------------------------------------------------- defaults


async def test_serve_with_embedded_defaults(
    tailnet: Tailnet, home: dict[str, str], tmp_path: Path
) -> None:
    if any(os.path.exists(p) for p in DEFAULT_SOCKET_PATHS):
        pytest.skip("a tailscaled socket exists on this machine")
    ns = tailnet.ns("ci")  # a fresh loopback: nothing holds 18789 or 18790 there
    env = {**os.environ, **home, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CLAWGATE_CONFIG", None)
    err_path = tmp_path / "stderr.log"
    out_path = tmp_path / "stdout.log"
    with open(err_path, "wb") as err, open(out_path, "wb") as out:
        proc = run_in(
            ns,
            [sys.executable, "-m", "proxy", "serve"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=str(ROOT),
        )
        try:
            deadline = time.monotonic() + 15
            while "listening on" not in err_path.read_text():
                assert proc.poll() is None, err_path.read_text()
                assert time.monotonic() < deadline, err_path.read_text()
                await asyncio.sleep(0.05)
            stderr = err_path.read_text()
            warnings = [ln for ln in stderr.splitlines() if "WARNING" in ln]
            # Exactly two lines: no tailscaled (loopback only), and no token exists yet.
            assert len(warnings) == 2, stderr
            (ts_line,) = [w for w in warnings if "tailscaled not found" in w]
            assert "127.0.0.1:18790" in ts_line
            (tok_line,) = [w for w in warnings if "no token exists yet" in w]
            assert "clawgate token new NAME" in tok_line
            assert "listening on 127.0.0.1:18790 -> http://127.0.0.1:18789" in stderr

            # It enforces the defaults: a token is required; /health is exempt but the
            # gateway (nothing on 18789 here) is down, so a fast 502.
            r = await exchange(
                ns, "127.0.0.1", 18790, build_request("GET", "/x", host="127.0.0.1:18790")
            )
            assert r.status == 401
            r = await exchange(
                ns, "127.0.0.1", 18790, build_request("GET", "/health", host="127.0.0.1:18790")
            )
            assert r.status == 502
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    assert rc == 0, err_path.read_text()
    assert "Traceback" not in err_path.read_text()
    # The access log goes to stdout by default: JSON lines.
    records = [json.loads(ln) for ln in out_path.read_text().splitlines() if ln.strip()]
    assert {"decision", "close"} <= {r["event"] for r in records}
