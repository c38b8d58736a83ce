"""``workers: N``: N processes on one port (SO_REUSEPORT), supervised by one parent.

The parent is what systemd sees (NotifyAccess=main): it must say READY=1 only once every
worker is ready, pass SIGHUP and SIGTERM on, and exit 0 after a clean drain. Both
workers must actually take connections.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

from tests.fakes.fake_gateway import FakeGateway
from tests.functional.test_systemd_unit import _recv_all
from tests.harness import ClawgateProcess
from tests.netns import GW_V4, Tailnet, socket_in
from tests.util import build_request, exchange

PORT = 18789


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


async def test_two_workers_serve_one_port_and_notify_once(
    tailnet: Tailnet, fake_gateway: FakeGateway, tmp_path: Path
) -> None:
    ns = tailnet.ns("gw")
    notify = socket_in(ns, socket.AF_UNIX, socket.SOCK_DGRAM)
    addr = str(tmp_path / "notify.sock")
    notify.bind(addr)
    cfg = {
        "gateway": {
            "host": GW_V4,
            "port": PORT,
            "requireToken": False,
            "allowedNetworks": ["100.64.0.0/10"],
        },
        "upstream": f"http://127.0.0.1:{fake_gateway.port}",
        "workers": 2,
        "tailscale": {"requireIdentity": False},
    }
    cg = ClawgateProcess(tmp_path / "cg", cfg, netns=ns, env={"NOTIFY_SOCKET": addr})
    try:
        await cg.start(wait_for="started 2 workers")
        msgs = await asyncio.to_thread(_recv_all, notify, "READY=1")
        assert any("STATUS=serving" in m for m in msgs)
        # `ip netns exec` execs the parent in place: its children are the two workers.
        workers = _children(cg.pid)
        assert len(workers) == 2, workers
        # The kernel spreads connections over both listeners (SO_REUSEPORT): after
        # enough connections both workers have taken some.
        for _ in range(60):
            resp = await exchange(
                tailnet.ns("phone"), GW_V4, PORT, build_request("GET", "/health", [])
            )
            assert resp.status == 200
        assert len(fake_gateway.requests) == 60
        ports = {r.peer[1] for r in fake_gateway.requests}
        assert len(ports) == 60
        # Each worker numbers its connections from 1: in the shared access log, ids seen
        # twice prove that both workers took connections.
        decisions = [r for r in cg.access_log() if r.get("event") == "decision"]
        assert len(decisions) == 60
        ids = [r["conn"] for r in decisions]
        assert len(set(ids)) < len(ids), "one worker served everything"

        cg.reload()
        msgs = await asyncio.to_thread(_recv_all, notify, "READY=1")
        assert any("RELOADING=1" in m.split("\n") for m in msgs), msgs

        cg.signal(signal.SIGTERM)
        await asyncio.to_thread(_recv_all, notify, "STOPPING=1")
        assert cg.proc is not None
        assert await asyncio.to_thread(cg.proc.wait, 20) == 0
        assert not any(
            os.path.exists(f"/proc/{w}") and Path(f"/proc/{w}/stat").read_text().split()[2] != "Z"
            for w in workers
        )
    finally:
        await cg.stop()
        notify.close()
