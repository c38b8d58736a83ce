"""tests/fakes/testcontrol.py as a separate process (the way the compose test runs it).

Loopback only: the CLI prints its URL and keys, serves /key, and answers the /test/* API.
The protocol itself is proven by real tailscaled nodes in tests/real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _http(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=5) as r:  # noqa: S310
        return json.loads(r.read())


def test_cli_prints_url_and_keys_and_serves_the_test_api() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakes.testcontrol",
            "--listen",
            "127.0.0.1:0",
            "--https-port",
            "0",
            "--authkey",
            "alice@example.com",
            "--authkey",
            "tag:ci",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["url"].startswith("http://127.0.0.1:")
        assert sorted(info["authkeys"]) == ["alice@example.com", "tag:ci"]
        assert all(k.startswith("tskey-auth-") for k in info["authkeys"].values())
        keys = _http(info["url"] + "/key?v=133")
        assert keys["publicKey"].startswith("mkey:") and len(keys["publicKey"]) == 5 + 64
        new = _http(info["url"] + "/test/authkey", {"tags": ["tag:prod"]})
        assert new["key"].startswith("tskey-auth-")
        assert _http(info["url"] + "/test/nodes") == []
        try:  # no such node: 400 with the reason, the server keeps running
            _http(info["url"] + "/test/endpoints", {"node": "nope", "endpoints": ["1.2.3.4:5"]})
            raise AssertionError("expected HTTP 400")
        except urllib.error.HTTPError as exc:
            assert exc.code == 400 and b"nope" in exc.read()
        assert _http(info["url"] + "/test/nodes") == []
    finally:
        proc.terminate()
        proc.wait(10)
