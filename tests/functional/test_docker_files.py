"""The Docker files, checked without a Docker engine (tests/deploy/test_docker.py builds
and runs them on a real one).

config/compose.yml is parsed and its key properties asserted (the sidecar's shared network
namespace, persisted Tailscale state, the tailscaled socket shared through a volume, no
secrets inline, the gateway on loopback); scripts/check-docker-image is run, and shown to
fail on broken Dockerfiles; the image's HEALTHCHECK command is run against a real clawgate
started from config/clawgate.docker.json, healthy and then degraded."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import parse_config
from proxy.doctor import Facts, FileInfo, run_checks, secret_kind
from tests.fakes.fake_gateway import FakeGateway
from tests.harness import ROOT, ClawgateProcess
from tests.netns import GW_V4, Tailnet, run_in
from tests.support import (
    fake_tailscaled,
)

COMPOSE = ROOT / "config" / "compose.yml"
DOCKER_CONFIG = ROOT / "config" / "clawgate.docker.json"
GATEWAY_CONFIG = ROOT / "config" / "openclaw.docker.json"
DOCKERFILE = ROOT / "Dockerfile"
CHECK = ROOT / "scripts" / "check-docker-image"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """target -> (source, options) for short-syntax volumes."""
    out = {}
    for v in service.get("volumes") or []:
        src, target, *opts = str(v).split(":")
        out[target] = (src, opts[0] if opts else "rw")
    return out


def test_sidecar_shares_the_network_namespace(compose: dict[str, Any]) -> None:
    svcs = compose["services"]
    assert set(svcs) >= {"tailscale", "clawgate", "openclaw"}
    assert svcs["clawgate"]["network_mode"] == "service:tailscale"
    assert svcs["openclaw"]["network_mode"] == "service:tailscale"
    assert "tailscale" in svcs["clawgate"]["depends_on"]
    # Nothing is published: the only way in is the tailnet address.
    for name in ("clawgate", "openclaw"):
        assert "ports" not in svcs[name]


def test_tailscale_state_is_persisted(compose: dict[str, Any]) -> None:
    ts = compose["services"]["tailscale"]
    env = env_of(ts)
    state_dir = env["TS_STATE_DIR"]
    src, _ = mounts(ts)[state_dir]
    assert src in compose["volumes"], "state lives in a named volume, not in the container"
    assert env["TS_USERSPACE"] == "false"
    assert "/dev/net/tun" in mounts(ts)
    assert {"NET_ADMIN", "NET_RAW"} <= set(ts["cap_add"])


def test_tailscaled_socket_shared_through_a_volume(compose: dict[str, Any]) -> None:
    ts, cg = compose["services"]["tailscale"], compose["services"]["clawgate"]
    sock = env_of(ts)["TS_SOCKET"]
    sock_dir = os.path.dirname(sock)
    ts_src, _ = mounts(ts)[sock_dir]
    cg_src, cg_opts = mounts(cg)[sock_dir]
    assert ts_src == cg_src and ts_src in compose["volumes"]
    assert cg_opts == "ro"
    cfg = json.loads(DOCKER_CONFIG.read_text())
    assert cfg["tailscale"]["socket"] == sock


def test_clawgate_mounts_config_and_tokens_read_only(compose: dict[str, Any]) -> None:
    cg = compose["services"]["clawgate"]
    m = mounts(cg)
    src, opts = m["/etc/clawgate/clawgate.json"]
    assert (COMPOSE.parent / src).resolve() == DOCKER_CONFIG and opts == "ro"
    assert m["/etc/clawgate/tokens.json"][1] == "ro"
    assert cg["read_only"] is True and cg["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in cg["security_opt"]
    cfg = parse_config(json.loads(DOCKER_CONFIG.read_text()), str(DOCKER_CONFIG))
    assert cfg.tokens.file == "/etc/clawgate/tokens.json"
    assert cfg.listens_on_tailscale and cfg.gateway.require_token
    assert cfg.upstream.host == "127.0.0.1"


def test_no_secrets_inline(compose: dict[str, Any]) -> None:
    def strings(node: Any, path: str = "") -> Any:
        if isinstance(node, dict):
            for k, v in node.items():
                yield from strings(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from strings(v, f"{path}[{i}]")
        elif isinstance(node, str):
            yield path, node

    for doc in (
        compose,
        json.loads(DOCKER_CONFIG.read_text()),
        json.loads(GATEWAY_CONFIG.read_text()),
    ):
        for path, value in strings(doc):
            key, _, val = value.partition("=") if "=" in value else ("", "", value)
            assert secret_kind(key or path.rsplit(".", 1)[-1], val) is None, path
    env = env_of(compose["services"]["tailscale"])
    # The auth key comes from the operator's environment, never from the file.
    assert env["TS_AUTHKEY"] == "${TAILSCALE_AUTHKEY}"
    assert "tskey-" not in COMPOSE.read_text().replace("tskey-...", "")


def test_gateway_on_loopback_and_trusting_clawgate(compose: dict[str, Any]) -> None:
    oc = compose["services"]["openclaw"]
    cmd = oc["command"]
    assert cmd[cmd.index("--bind") + 1] == "loopback"
    assert cmd[cmd.index("--port") + 1] == "18789"
    src, opts = mounts(oc)["/home/node/.openclaw/openclaw.json"]
    assert (COMPOSE.parent / src).resolve() == GATEWAY_CONFIG and opts == "ro"
    doc = json.loads(GATEWAY_CONFIG.read_text())
    facts = Facts(
        cfg=parse_config(json.loads(DOCKER_CONFIG.read_text())),
        gateway_config=FileInfo(str(GATEWAY_CONFIG), True, 0o644, 0),
        gateway_doc=doc,
    )
    gw = [
        f
        for f in run_checks(facts)
        if f.check in ("trustedProxies", "gatewayBind", "gatewayConfig")
    ]
    assert gw and all(f.severity == "ok" for f in gw), gw


# ------------------------------------------------------------------ scripts/check-docker-image


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )


def test_check_docker_image_passes() -> None:
    proc = run_check()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout and "all checks passed" in proc.stdout


BROKEN = [
    ("root", lambda t: t.replace("USER 10001:10001", "USER root")),
    ("no-user", lambda t: t.replace("USER 10001:10001\n", "")),
    (
        "no-healthcheck",
        lambda t: (
            t.split("HEALTHCHECK")[0] + 'ENTRYPOINT ["clawgate"]\n'
            'CMD ["serve", "--config", "/etc/clawgate/clawgate.json"]\n'
        ),
    ),
    ("healthcheck-port", lambda t: t.replace("127.0.0.1:18790/health", "127.0.0.1:8080/health")),
    ("curl", lambda t: t.replace('CMD ["python", "-c"', 'CMD ["curl", "-f"')),
    ("entrypoint-shell", lambda t: t.replace('ENTRYPOINT ["clawgate"]', "ENTRYPOINT clawgate")),
    ("cmd", lambda t: t.replace('"/etc/clawgate/clawgate.json"]', '"/config.json"]')),
    ("expose", lambda t: t.replace("EXPOSE 18789", "EXPOSE 8080")),
    ("copy-missing", lambda t: t.replace("COPY proxy ./proxy", "COPY proxyy ./proxy")),
    ("base", lambda t: t.replace("ARG BASE=python:3.11-slim\n", "ARG BASE=ubuntu:24.04\n")),
]


@pytest.mark.parametrize("mutate", [b[1] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_check_docker_image_catches(tmp_path: Path, mutate: Any) -> None:
    original = DOCKERFILE.read_text()
    broken = mutate(original)
    assert broken != original
    path = tmp_path / "Dockerfile"
    path.write_text(broken)
    proc = run_check("--dockerfile", str(path))
    assert proc.returncode == 1, proc.stdout
    assert "FAIL" in proc.stdout


# ------------------------------------------------------------------ the HEALTHCHECK, for real


def healthcheck_argv() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK"))
    argv = json.loads(line.split(" CMD ", 1)[1])
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


async def test_healthcheck_against_a_real_clawgate(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    argv = healthcheck_argv()
    ns = tailnet.ns("gw")

    async def health_exit() -> int:
        proc = run_in(ns, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return await asyncio.to_thread(proc.wait, 30)

    async def until(code: int) -> None:
        deadline = time.monotonic() + 10
        while (got := await health_exit()) != code:
            assert time.monotonic() < deadline, f"HEALTHCHECK still exits {got}, want {code}"
            await asyncio.sleep(0.1)

    assert await health_exit() != 0  # nothing listens yet: unhealthy
    async with fake_tailscaled() as ts:
        cfg = copy.deepcopy(json.loads(DOCKER_CONFIG.read_text()))
        cfg["tailscale"]["socket"] = ts.socket_path
        cfg["upstream"]["url"] = f"http://127.0.0.1:{fake_gateway.port}"
        del cfg["tokens"]
        del cfg["log"]
        # host "tailscale": clawgate binds the address the (fake) tailscaled reports.
        cg = ClawgateProcess(tmp_path / "cg", cfg, netns=ns)
        try:
            await cg.start(wait_for=f"listening on {GW_V4}:18789")
            await until(0)
            ts.set_backend_state("NeedsLogin")
            await until(1)
            ts.set_backend_state("Running")
            await until(0)
            await fake_gateway.stop()
            await until(1)
        finally:
            await cg.stop()
