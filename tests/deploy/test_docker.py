"""The Dockerfile and config/compose.yml for real, on a Docker engine of our own.

The image is built from the Dockerfile as shipped, on a local Debian bookworm base (BASE
build-arg; no registry can be pulled from), pip reading a wheelhouse this machine's pip
downloaded. Then config/compose.yml is brought up with docker-compose, unchanged but for
an override file that only swaps the images (a local sidecar with the real tailscaled
1.96.4, the fake gateway for `openclaw`), points `tailscale up` at our control server
(tests/fakes/testcontrol.py) and shortens the HEALTHCHECK interval. A real tailscaled node
in a network namespace on the compose network (the phone, alice) reaches clawgate over
WireGuard; clawgate, in the sidecar's network namespace, learns who it is from the
sidecar's LocalAPI socket. Stopping the sidecar turns the container unhealthy.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from proxy.keystore import TokenFile
from tests.deploy.support import (
    DOCKER,
    Dockerd,
    build_wheelhouse,
    require_tools,
    rootfs_tarball,
    run,
    serve_directory,
    skip_or_fail,
    tailscale_binaries,
)
from tests.fakes.testcontrol import ControlServer
from tests.harness import ROOT
from tests.netns import _ip, connect_in
from tests.real.tailnet import Node

pytestmark = [pytest.mark.slow]

TAG = f"t{os.getpid()}"
BASE_REF = "clawgate-test/bookworm-python:v1"
CLAWGATE_REF = f"clawgate-test/clawgate:{TAG}"
TAILSCALE_REF = f"clawgate-test/tailscale:1.96.4-{TAG}"
_K = 100 + os.getpid() % 100
SUBNET = f"198.19.{_K}.0/24"
PHONE_UNDERLAY = f"198.19.{_K}.200"
PROJECT = f"cgds{os.getpid()}"


def _root_netfilter() -> tuple[str, str]:
    rules = (
        subprocess.run(
            ["iptables-save"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
        if shutil.which("iptables-save")
        else ""
    )
    rules = "\n".join(ln for ln in rules.splitlines() if not ln.startswith("#"))
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    return rules, forward


@pytest.fixture(scope="module")
def engine() -> Iterator[Dockerd]:
    require_tools("dockerd", "docker-compose", "debootstrap", "ip")
    if not Path(DOCKER).exists():
        skip_or_fail(f"{DOCKER} missing (docker.io)")
    tar = rootfs_tarball()
    before = _root_netfilter()
    d = Dockerd(
        Path(f"/var/tmp/clawgate-docker-{os.getpid()}"), Path(f"/run/clawgate-docker-{os.getpid()}")
    )
    try:
        d.start()
        d.import_rootfs(tar, BASE_REF)
        # Our dockerd leaves the root namespace's firewall and forwarding as they were.
        assert _root_netfilter() == before
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def images(engine: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    base = tmp_path_factory.mktemp("docker")
    wheelhouse = build_wheelhouse(base / "wheelhouse")
    try:
        with serve_directory(wheelhouse) as url:
            # The Dockerfile as shipped; the build stage's pip reads the wheelhouse over
            # loopback (--network host), nothing else differs from a user's build.
            engine.docker(
                "build",
                "--network",
                "host",
                "--build-arg",
                f"BASE={BASE_REF}",
                "--build-arg",
                "PIP_NO_INDEX=1",
                "--build-arg",
                f"PIP_FIND_LINKS={url}",
                "-t",
                CLAWGATE_REF,
                "-f",
                str(ROOT / "Dockerfile"),
                str(ROOT),
                timeout=900,
            )
        ctx = base / "tailscale-image"
        shutil.copytree(ROOT / "tests" / "deploy" / "tailscale-image", ctx)
        ts, tsd = tailscale_binaries()
        shutil.copy2(ts, ctx / "tailscale")
        shutil.copy2(tsd, ctx / "tailscaled")
        engine.docker(
            "build", "--build-arg", f"BASE={BASE_REF}", "-t", TAILSCALE_REF, str(ctx), timeout=300
        )
        yield
    finally:
        for ref in (CLAWGATE_REF, TAILSCALE_REF):
            engine.docker("rmi", "-f", ref, check=False)
        engine.docker("image", "prune", "-f", check=False)


def test_image_as_shipped(engine: Dockerd, images: None) -> None:
    cfg = engine.inspect(CLAWGATE_REF)["Config"]
    assert cfg["User"] == "10001:10001"
    assert cfg["Entrypoint"] == ["clawgate"]
    assert cfg["Cmd"] == ["serve", "--config", "/etc/clawgate/clawgate.json"]
    assert list(cfg["ExposedPorts"]) == ["18789/tcp"]
    assert "CLAWGATE_CONFIG=/etc/clawgate/clawgate.json" in cfg["Env"]
    hc = cfg["Healthcheck"]
    assert hc["Test"][0] == "CMD" and hc["Test"][1] == "python", hc
    assert "http://127.0.0.1:18790/health" in hc["Test"][-1]
    assert engine.docker(
        "run", "--rm", "--network", "none", CLAWGATE_REF, "--version"
    ).stdout.startswith("clawgate ")
    cfg_mount = f"{ROOT / 'config' / 'clawgate.docker.json'}:/etc/clawgate/clawgate.json:ro"
    out = engine.docker(
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        cfg_mount,
        CLAWGATE_REF,
        "check-config",
        "--config",
        "/etc/clawgate/clawgate.json",
    )
    assert "OK" in out.stdout + out.stderr
    probe = (
        "import os, sys, importlib.util as u; "
        "print(os.getuid(), sys.prefix, u.find_spec('pip') is None, "
        "u.find_spec('uvloop') is not None, u.find_spec('httptools') is not None)"
    )
    out = engine.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "python", CLAWGATE_REF, "-c", probe
    )
    # Unprivileged, from the venv, no pip left in the image, the fast paths installed.
    assert out.stdout.split() == ["10001", "/opt/clawgate", "True", "True", "True"], out.stdout


# ------------------------------------------------------------------------------ compose


class Compose:
    def __init__(self, engine: Dockerd, workdir: Path, env: dict[str, str]) -> None:
        self.engine = engine
        self.dir = workdir
        self.env = {**engine.env, **env}

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return run(
            ["docker-compose", "-p", PROJECT, "-f", "compose.yml", "-f", "override.yml", *args],
            cwd=self.dir,
            env=self.env,
            check=check,
            timeout=timeout,
        )

    def container(self, service: str) -> str:
        cid = self("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def health(self, service: str) -> str:
        state = self.engine.inspect(self.container(service))["State"]
        return str(state.get("Health", {}).get("Status", "none"))

    def logs(self, service: str) -> str:
        return self("logs", "--no-color", service, check=False).stdout

    def wait(self, what: str, pred: Any, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = pred()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}\n--- tailscale:\n"
                    f"{self.logs('tailscale')[-3000:]}\n--- clawgate:\n"
                    f"{self.logs('clawgate')[-3000:]}"
                )
            time.sleep(0.3)


def watch_engine(path: str) -> socket.socket:
    """An IPN bus watch asking for engine updates (see tests/real/tailnet.py)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(path)
    sock.sendall(
        b"GET /localapi/v0/watch-ipn-bus?mask=1 HTTP/1.1\r\nHost: local-tailscaled.sock\r\n\r\n"
    )
    return sock


def override(ctl_url: str, ca_file: str, gw_record: Path) -> dict[str, Any]:
    return {
        "services": {
            "tailscale": {
                "image": TAILSCALE_REF,
                "environment": [
                    f"TS_EXTRA_ARGS=--advertise-tags=tag:openclaw --login-server={ctl_url}",
                    # No log uploads to log.tailscale.com (nothing leaves here).
                    "TS_NO_LOGS_NO_SUPPORT=true",
                    # The control server's HTTPS fallback (port 443) uses its CA.
                    "SSL_CERT_FILE=/etc/testcontrol-ca.pem",
                ],
                "volumes": [f"{ca_file}:/etc/testcontrol-ca.pem:ro"],
            },
            "clawgate": {
                "image": CLAWGATE_REF,
                # The image's own HEALTHCHECK command, polled faster for the test.
                "healthcheck": {
                    "interval": "2s",
                    "timeout": "5s",
                    "retries": 2,
                    "start_period": "2s",
                },
            },
            "openclaw": {
                # The fake gateway in place of the real one (which npx would fetch).
                "image": CLAWGATE_REF,
                "user": "10001:10001",
                "entrypoint": ["python", "-m", "tests.fakes.fake_gateway"],
                "command": [
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "18789",
                    "--record",
                    "/record/requests.jsonl",
                ],
                "working_dir": "/src",
                "volumes": [f"{ROOT / 'tests'}:/src/tests:ro", f"{gw_record}:/record"],
            },
        },
        "networks": {"default": {"external": True, "name": PROJECT}},
    }


@pytest.fixture(scope="module")
def stack(
    engine: Dockerd, images: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """compose.yml up with the sidecar joined to our control server; the phone on the net.
    Module-scoped: the tests below run in file order, the sidecar-stopping one last."""
    ts_bin, tsd_bin = tailscale_binaries()
    tmp_path = tmp_path_factory.mktemp("compose")
    work = tmp_path / "compose"
    work.mkdir()
    # The operator's directory: compose.yml and its two configs as shipped, plus tokens.json.
    for name in ("compose.yml", "clawgate.docker.json", "openclaw.docker.json"):
        shutil.copy2(ROOT / "config" / name, work / name)
    token = TokenFile(work / "tokens.json").add("phone")
    os.chown(work / "tokens.json", 10001, 10001)
    os.chmod(work / "tokens.json", 0o600)
    record = tmp_path / "gw-record"
    record.mkdir()
    os.chmod(record, 0o777)

    phone_ns = f"{PROJECT}-phone"
    veth = f"{PROJECT[-8:]}ph"
    ctl = ControlServer()
    phone = Node("phone", phone_ns, PHONE_UNDERLAY, tmp_path / "phone", str(ts_bin), str(tsd_bin))
    compose: Compose | None = None
    made_ns = False
    ups: list[subprocess.Popen[bytes]] = []
    try:
        engine.docker(
            "network",
            "create",
            "--subnet",
            SUBNET,
            "-o",
            f"com.docker.network.bridge.name={PROJECT[-10:]}br",
            PROJECT,
        )
        bridge = f"{PROJECT[-10:]}br"
        # The phone: a namespace whose veth is a port of the compose network's bridge.
        _ip("netns", "add", phone_ns)
        made_ns = True
        _ip("-n", phone_ns, "link", "set", "lo", "up")
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", phone_ns)
        _ip("link", "set", veth, "master", bridge)
        _ip("link", "set", veth, "up")
        _ip("-n", phone_ns, "addr", "add", f"{PHONE_UNDERLAY}/24", "dev", "eth0")
        _ip("-n", phone_ns, "link", "set", "eth0", "up")
        # The control server listens in the phone's namespace, on the compose network.
        ctl.start(PHONE_UNDERLAY, 0, netns=phone_ns)
        server_key = ctl.create_auth_key(tags=["tag:openclaw"])
        alice_key = ctl.create_auth_key(user="alice@example.com")
        (work / "override.yml").write_text(yaml.safe_dump(override(ctl.url, ctl.ca_file, record)))
        phone.ca_file = ctl.ca_file
        compose = Compose(engine, work, {"TAILSCALE_AUTHKEY": server_key})
        compose("up", "-d")
        phone.start()
        ups.append(
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    phone_ns,
                    str(ts_bin),
                    f"--socket={phone.socket_path}",
                    "up",
                    f"--login-server={ctl.url}",
                    f"--authkey={alice_key}",
                    "--hostname=phone",
                    "--accept-dns=false",
                    "--netfilter-mode=off",
                    "--timeout=60s",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        try:
            ctl.wait_nodes(2, timeout=60)
        except TimeoutError as exc:
            raise AssertionError(
                f"{exc}\n--- sidecar:\n{compose.logs('tailscale')[-4000:]}"
                f"\n--- phone:\n{phone.log()}"
            ) from None
        server = next(n for n in ctl.nodes() if n["name"] != "phone")
        st: dict[str, Any] = {
            "compose": compose,
            "ctl": ctl,
            "phone": phone,
            "server": server,
            "token": token,
            "record": record / "requests.jsonl",
        }
        link_up(st)
        compose.wait(
            "clawgate listening on the sidecar's tailnet address",
            lambda: f"listening on {server['v4']}:18789" in compose.logs("clawgate"),
        )
        yield st
    finally:
        for p in ups:
            if p.poll() is None:
                p.kill()
                p.wait()
        phone.stop()
        if compose is not None:
            compose("down", "-v", "--timeout", "5", check=False)
        ctl.stop()
        engine.docker("network", "rm", PROJECT, check=False)
        if made_ns:
            _ip("netns", "del", phone_ns, check=False)
        _ip("link", "del", veth, check=False)


def link_up(st: dict[str, Any]) -> None:
    """No DERP map: a TSMP ping each way, with engine watchers open, makes both Running."""
    compose: Compose = st["compose"]
    phone: Node = st["phone"]
    sock_dir = compose.engine.inspect(f"{PROJECT}_tailscale-socket")["Mountpoint"]
    sidecar_sock = os.path.join(sock_dir, "tailscaled.sock")
    compose.wait("the sidecar's socket", lambda: os.path.exists(sidecar_sock))
    watchers = [watch_engine(phone.socket_path), watch_engine(sidecar_sock)]
    try:
        phone.cli(
            "ping", "--tsmp", "--c=10", "--timeout=3s", st["server"]["v4"], timeout=60, check=False
        )
        compose.engine.docker(
            "exec",
            compose.container("tailscale"),
            "tailscale",
            "--socket=/var/run/tailscale/tailscaled.sock",
            "ping",
            "--tsmp",
            "--c=10",
            "--timeout=3s",
            st["ctl"].node("phone")["v4"],
            check=False,
            timeout=60,
        )
        compose.wait("phone Running", lambda: phone.status().get("BackendState") == "Running")

        def sidecar_running() -> bool:
            out = compose.engine.docker(
                "exec",
                compose.container("tailscale"),
                "tailscale",
                "--socket=/var/run/tailscale/tailscaled.sock",
                "status",
                "--json",
                check=False,
            ).stdout
            return '"BackendState": "Running"' in out

        compose.wait("sidecar Running", sidecar_running)
    finally:
        for w in watchers:
            w.close()


async def ws_echo(st: dict[str, Any], text: str) -> str:
    sock = await connect_in(st["phone"].ns, st["server"]["v4"], 18789, timeout=5)
    async with connect(
        f"ws://{st['server']['v4']}:18789/ws",
        sock=sock,
        proxy=None,
        open_timeout=10,
        additional_headers={"Authorization": f"Bearer {st['token']}"},
    ) as ws:
        await ws.send(text)
        return str(await ws.recv())


async def test_compose_sidecar_admits_by_identity(stack: dict[str, Any]) -> None:
    compose: Compose = stack["compose"]
    server_v4 = stack["server"]["v4"]
    phone: Node = stack["phone"]
    compose.wait("clawgate healthy", lambda: compose.health("clawgate") == "healthy")

    # Without a token: refused, from a real tailnet peer.
    sock = await connect_in(phone.ns, server_v4, 18789, timeout=10)
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"ws://{server_v4}:18789/ws", sock=sock, proxy=None, open_timeout=10)
    assert refused.value.response.status_code == 401

    # With the phone's token: through, and clawgate knows the peer from the real whois.
    assert await ws_echo(stack, "over the tailnet") == "over the tailnet"

    def decision() -> dict[str, Any] | None:
        for line in compose.logs("clawgate").splitlines():
            _, _, body = line.partition("| ")
            if '"event":"decision"' in body.replace(" ", "") and '"allow"' in body:
                return json.loads(body)  # type: ignore[no-any-return]
        return None

    rec = compose.wait("an allow decision in clawgate's access log", decision)
    assert rec["login"] == "alice@example.com" and rec["node"].startswith("phone"), rec
    assert rec["token"] == "phone" and rec["peer"] == phone_v4(stack), rec
    # The gateway (in the same namespace) got it from clawgate, without the token.
    seen = [json.loads(ln) for ln in stack["record"].read_text().splitlines()]
    assert seen and all(
        "authorization" not in {k.lower() for k, _ in r.get("headers", [])} for r in seen
    ), seen

    # Only the tailnet address listens: the container's compose-network address does not.
    ts_ip = compose.engine.inspect(compose.container("tailscale"))["NetworkSettings"]["Networks"][
        PROJECT
    ]["IPAddress"]
    with pytest.raises(OSError):
        s = await connect_in(phone.ns, ts_ip, 18789, timeout=3)
        s.close()


def phone_v4(stack: dict[str, Any]) -> str:
    return str(stack["ctl"].node("phone")["v4"])


async def test_healthcheck_unhealthy_when_sidecar_stops(stack: dict[str, Any]) -> None:
    compose: Compose = stack["compose"]
    compose.wait("clawgate healthy", lambda: compose.health("clawgate") == "healthy")
    compose("stop", "--timeout", "5", "tailscale")
    compose.wait(
        "clawgate unhealthy", lambda: compose.health("clawgate") == "unhealthy", timeout=40
    )
    # clawgate itself keeps running (and answers 503 on /health) rather than exiting.
    state = compose.engine.inspect(compose.container("clawgate"))["State"]
    assert state["Running"] is True, state
    last = state["Health"]["Log"][-1]
    assert last["ExitCode"] != 0, last
    # And /health says why (the admin listener is in the sidecar's namespace, which
    # clawgate still holds): the HEALTHCHECK's own command, run in the container.
    hc = compose.engine.inspect(compose.container("clawgate"))["Config"]["Healthcheck"]["Test"]
    probe = compose.engine.docker("exec", compose.container("clawgate"), *hc[1:], check=False)
    assert probe.returncode == 1, probe
    body = compose.engine.docker(
        "exec",
        compose.container("clawgate"),
        "python",
        "-c",
        "import urllib.request as u, urllib.error as e\n"
        "try: u.urlopen('http://127.0.0.1:18790/health', timeout=4)\n"
        "except e.HTTPError as x: print(x.code, x.read().decode())\n",
    ).stdout
    assert body.startswith("503 ") and "tailscale" in body, body

    # The sidecar back (same state volume, same node). clawgate is still in the sidecar's
    # old network namespace: tailscaled Running again through the socket volume, but no
    # tailnet address where clawgate listens. Seen: that was "healthy" and unreachable.
    compose("start", "tailscale")
    link_up(stack)
    with pytest.raises(OSError):
        await ws_echo(stack, "stale namespace")
    compose.wait(
        "clawgate unhealthy in the stale namespace",
        lambda: compose.health("clawgate") == "unhealthy",
        timeout=40,
    )
    body = compose.engine.docker(
        "exec",
        compose.container("clawgate"),
        "python",
        "-c",
        "import urllib.request as u, urllib.error as e\n"
        "try: u.urlopen('http://127.0.0.1:18790/health', timeout=4)\n"
        "except e.HTTPError as x: print(x.code, x.read().decode())\n",
    ).stdout
    assert "on no interface" in body, body
    # What docs/operations.md says to do: restart what shares the sidecar's namespace
    # (clawgate, and the gateway, or clawgate's upstream stays in the old one).
    compose("restart", "--timeout", "5", "openclaw", "clawgate")
    compose.wait(
        "clawgate healthy after its restart",
        lambda: compose.health("clawgate") == "healthy",
        timeout=60,
    )
    assert await ws_echo(stack, "after the restart") == "after the restart"
