"""A real Node HTTP server (node_echo.js) as clawgate's upstream, inside the gw namespace.

The Node is the one the e2e suite installs for the OpenClaw gateway (Node 24, llhttp):
``scripts/install-openclaw.sh`` (idempotent, cached). Where it cannot be installed the tests
skip, or fail with CLAWGATE_REQUIRE_E2E=1 (CI), like the e2e suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import Tailnet, run_in
from tests.util import open_in, read_response

__all__ = ["NodeEcho", "node_binary", "node_echo"]

ECHO_JS = Path(__file__).with_name("node_echo.js")


def node_binary() -> Path:
    from tests.e2e.openclaw import OpenClawUnavailable, install_openclaw

    try:
        return install_openclaw().node
    except OpenClawUnavailable as exc:
        if os.environ.get("CLAWGATE_REQUIRE_E2E") == "1":
            pytest.fail(f"CLAWGATE_REQUIRE_E2E=1 but Node is not installed: {exc}")
        pytest.skip(f"Node 24 not installed: {exc}")


class NodeEcho:
    def __init__(self, tailnet: Tailnet, proc: subprocess.Popen[bytes], port: int) -> None:
        self.tailnet = tailnet
        self.proc = proc
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def seen(self) -> dict[str, Any]:
        """What the Node server recorded, asked directly (not through clawgate)."""
        reader, writer = await open_in(self.tailnet.ns("gw"), "127.0.0.1", self.port)
        try:
            writer.write(
                b"GET /__echo/seen HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"X-Echo-Control: 1\r\nConnection: close\r\n\r\n"
            )
            resp = await read_response(reader, timeout=10)
        finally:
            writer.close()
        assert resp.status == 200, resp.raw
        data: dict[str, Any] = json.loads(resp.body)
        return data


@contextlib.asynccontextmanager
async def node_echo(
    tailnet: Tailnet, max_headers_count: int | None = None
) -> AsyncIterator[NodeEcho]:
    argv = [str(node_binary()), str(ECHO_JS)]
    if max_headers_count is not None:
        argv.append(str(max_headers_count))
    proc = run_in(
        tailnet.ns("gw"),
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
        assert line.startswith(b"listening "), line
        yield NodeEcho(tailnet, proc, int(line.split()[1]))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
