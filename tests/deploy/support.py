"""The deployment targets for real: a Debian bookworm rootfs booted by systemd-nspawn with
systemd as PID 1, and a Docker engine of our own.

Nothing here is pulled from an image registry (none is reachable): the rootfs comes from
debootstrap through scripts/install-rootfs.sh (cached tarball), Python packages from a
wheelhouse that the host's pip downloads (its configured index) and a loopback HTTP server
hands to `docker build`. Every process, container, image, machine and interface made here is
removed again by the object that made it.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT

# Set by scripts/test in CI: a deployment test that would skip fails instead.
REQUIRE_DEPLOY_ENV = "CLAWGATE_REQUIRE_DEPLOY"


def skip_or_fail(reason: str) -> None:
    if os.environ.get(REQUIRE_DEPLOY_ENV) == "1":
        pytest.fail(f"{REQUIRE_DEPLOY_ENV}=1 but {reason}")
    pytest.skip(reason)


def require_tools(*tools: str) -> None:
    if os.geteuid() != 0:
        skip_or_fail("the deployment tests need root")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        skip_or_fail(f"not installed: {', '.join(missing)} (scripts/test installs them)")


def _script_vars(script: str) -> dict[str, str]:
    proc = subprocess.run(
        [str(ROOT / "scripts" / script)], capture_output=True, text=True, timeout=900, check=False
    )
    if proc.returncode != 0:
        skip_or_fail(f"scripts/{script} failed: {proc.stderr[-1500:]}")
    return dict(line.split("=", 1) for line in proc.stdout.split() if "=" in line)


def rootfs_tarball() -> Path:
    """The cached bookworm rootfs (debootstrap minbase + python3.11, venv, systemd, dbus)."""
    return Path(_script_vars("install-rootfs.sh")["ROOTFS_TAR"])


def tailscale_binaries() -> tuple[Path, Path]:
    """(tailscale, tailscaled) 1.96.4, the official static builds (scripts/install-tailscale.sh)."""
    v = _script_vars("install-tailscale.sh")
    return Path(v["TAILSCALE_BIN"]), Path(v["TAILSCALED_BIN"])


def build_wheelhouse(dest: Path) -> Path:
    """clawgate's wheel and every wheel it needs (cp311, manylinux), plus the build backend.

    Downloaded by this machine's pip with its own configuration (whatever index it uses),
    so the image build and the nspawn install need no registry of their own."""
    dest.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PIP_REQUIRE_VIRTUALENV"}
    # clawgate's own wheel pure (no mypyc), as the image builds it; mypy is a build requirement.
    env["CLAWGATE_COMPILE"] = "0"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    backend = ["setuptools>=77", "wheel", "mypy>=1.11"]
    for argv in (
        [*pip, "download", "--only-binary=:all:", "-d", str(dest), ".", *backend],
        [*pip, "wheel", "--no-deps", "-w", str(dest), "."],
    ):
        proc = subprocess.run(
            argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv[3:5])} failed:\n{proc.stderr[-3000:]}")
    return dest


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """A loopback HTTP server listing `directory` (a pip --find-links page); yields its URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(directory), **kw)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def run(
    argv: Sequence[str],
    *,
    timeout: float = 120,
    check: bool = True,
    env: dict[str, str] | None = None,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, env=env, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def extract_rootfs(tar: Path, root: Path) -> None:
    root.mkdir(parents=True)
    run(["tar", "-C", str(root), "--numeric-owner", "-xf", str(tar)], timeout=300)


def chroot(root: Path, script: str, *, timeout: float = 300) -> str:
    """Run a shell script in the rootfs with a clean environment (no host PIP_* settings)."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
    }
    return run(["chroot", str(root), "/bin/sh", "-ec", script], env=env, timeout=timeout).stdout


# ============================================================================ systemd-nspawn


class Machine:
    """A rootfs booted with systemd as PID 1 (systemd-nspawn -b), on a private network.

    Driven with `nsenter -t <leader> -a` (--register=no: no machined, no machinectl).
    `netns` is the machine's network namespace attached under /run/netns, so the helpers of
    tests/netns.py (connect_in, listen_in) reach its loopback from the test process."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.netns = f"{name}-net"
        self.log_path = root.parent / f"{name}.console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 60) -> None:
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--register=no",
                    "--keep-unit",
                    "-b",
                    "-D",
                    str(self.root),
                    f"--machine={self.name}",
                    "--private-network",
                    "--console=passive",
                    # IPAddressDeny= is enforced with cgroup BPF: these let systemd attach it.
                    "--capability=CAP_BPF,CAP_PERFMON",
                    "--system-call-filter=bpf",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"systemd-nspawn exited {self.proc.returncode}:\n"
                    f"{self.log_path.read_text(errors='replace')[-3000:]}"
                )
            assert time.monotonic() < deadline, "no container init within the timeout"
            # nspawn forks an intermediate child first: the leader is the one running systemd.
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                for kid in (task / "children").read_text().split():
                    with contextlib.suppress(OSError):
                        if Path(f"/proc/{kid}/comm").read_text().strip() == "systemd":
                            self.leader = int(kid)
            time.sleep(0.05)
        while True:  # until systemd's private bus answers, then until boot is done
            state = self.run(
                ["systemctl", "is-system-running", "--wait"], check=False, timeout=timeout
            ).stdout.strip()
            if state or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert state in ("running", "degraded"), (
            state,
            self.run(["systemctl", "--failed", "--no-pager"], check=False).stdout,
        )
        run(["ip", "netns", "attach", self.netns, str(self.leader)])

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        assert self.leader, "not booted"
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0",
        }
        return run(
            ["nsenter", "-t", str(self.leader), "-a", *argv], check=check, timeout=timeout, env=env
        )

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 90
    ) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, lines: int = 50) -> str:
        return self.run(
            ["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "cat"], check=False
        ).stdout

    def close(self) -> None:
        run(["ip", "netns", "delete", self.netns], check=False)
        if self.proc is not None and self.proc.poll() is None:
            # SIGTERM to nspawn powers the container off cleanly; SIGKILL the group if stuck.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


# ============================================================================ Docker engine

DOCKER = "/usr/bin/docker"  # the engine's own client (docker.io), matching its API version


class Dockerd:
    """A dockerd of our own: its own socket, data root and exec root, so it never meets a
    system daemon; no default bridge, no iptables rules, no ip_forward change (the root
    namespace's firewall and routes stay as they were, registry access included).
    User-defined networks come from 198.19.0.0/16 (RFC 2544, never a private range).
    Data and exec roots are per run and removed by stop(); the base image is imported
    from the cached rootfs tarball (a few seconds)."""

    def __init__(self, state: Path, run_dir: Path) -> None:
        self.state = state
        self.run_dir = run_dir
        self.sock = run_dir / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = run_dir / "dockerd.log"

    def start(self, timeout: float = 60) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        pidfile = self.run_dir / "dockerd.pid"
        if pidfile.exists():  # a dockerd of a killed earlier run: stop it, by its own PID
            with contextlib.suppress(ValueError, ProcessLookupError):
                pid = int(pidfile.read_text())
                if Path(f"/proc/{pid}/exe").resolve().name == "dockerd":
                    os.kill(pid, signal.SIGTERM)
                    deadline = time.monotonic() + 20
                    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                        time.sleep(0.1)
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(
                [
                    "dockerd",
                    "--host",
                    self.host,
                    "--data-root",
                    str(self.state),
                    "--exec-root",
                    str(self.run_dir / "exec"),
                    "--pidfile",
                    str(pidfile),
                    "--bridge=none",
                    "--iptables=false",
                    "--ip6tables=false",
                    "--ip-forward=false",
                    "--ip-masq=false",
                    "--default-address-pool",
                    "base=198.19.0.0/16,size=24",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while self.docker("version", check=False, timeout=10).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "dockerd did not come up:\n" + self.log_path.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.2)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_HOST"] = self.host
        return env

    def docker(
        self, *args: str, check: bool = True, timeout: float = 300, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return run([DOCKER, *args], check=check, timeout=timeout, env=self.env, **kw)

    def has_image(self, ref: str) -> bool:
        return self.docker("image", "inspect", ref, check=False).returncode == 0

    def import_rootfs(self, tar: Path, ref: str) -> None:
        """`docker import` of the cached rootfs tarball, unless the tag is there already."""
        if self.has_image(ref):
            return
        self.docker(
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            'CMD ["/bin/sh"]',
            str(tar),
            ref,
        )

    def inspect(self, ref: str) -> Any:
        return json.loads(self.docker("inspect", ref).stdout)[0]

    def stop(self) -> None:
        """Stop the daemon (by its PID) and remove its data and exec roots."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

        # dockerd leaves exec-root/netns/default (an nsfs bind mount) behind, and a killed
        # one its overlay mounts: unmount what lies under our roots, then delete them.
        for root in (self.run_dir, self.state):
            umount_under(root)
            shutil.rmtree(root, ignore_errors=True)


def umount_under(path: Path) -> None:
    prefix = str(path.resolve()) + "/"
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        run(["umount", "-l", point], check=False)
