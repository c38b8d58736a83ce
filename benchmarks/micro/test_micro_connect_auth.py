"""Micro-benchmarks of the first-frame gate's decision and its pairing-store check. Run with:

    PYTHONPATH=. .venv/bin/pytest benchmarks/micro/test_micro_connect_auth.py --benchmark-enable \
        -p no:randomly

The frame is what the real CLI sends (device identity + device token); the store holds 50
paired devices, written as the gateway writes it (tests/fakes/pairing_store.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from proxy.core.connect_auth import ConnectAuth, decide, parse_connect, shared_generations
from proxy.core.tokens import digest
from proxy.gateway_store import GatewayStore
from tests.fakes.pairing_store import FakeDevice, PairingStore

GW = "gateway-token-" + "x" * 30


def _frame(auth: dict[str, str], dev: FakeDevice | None = None) -> bytes:
    params: dict[str, object] = {
        "minProtocol": 4,
        "maxProtocol": 4,
        "role": "operator",
        "scopes": ["operator.read"],
        "auth": auth,
        "client": {"id": "cli", "mode": "cli", "platform": "linux"},
    }
    if dev is not None:
        params["device"] = {
            "id": dev.device_id,
            "publicKey": dev.public_key,
            "signature": "s" * 86,
            "signedAt": 1,
            "nonce": "n" * 36,
        }
    return json.dumps({"type": "req", "id": "c1", "method": "connect", "params": params}).encode()


def _parsed(frame: bytes) -> ConnectAuth:
    auth = parse_connect(frame)
    assert isinstance(auth, ConnectAuth), auth  # a str is the refusal reason
    return auth


def _store(tmp_path: Path) -> tuple[GatewayStore, list[FakeDevice]]:
    writer = PairingStore(tmp_path / "state")
    devs = [FakeDevice.new() for _ in range(50)]
    for i, dev in enumerate(devs):
        writer.pair(dev, f"device-token-{i}")
    writer.close()
    store = GatewayStore(str(tmp_path / "state"))
    # Twice: with no gateway holding the database open, the first read-only open creates
    # its -wal/-shm files (a changed version); from then on the version is stable.
    asyncio.run(store.refresh())
    asyncio.run(store.refresh())
    assert store.current() is not None
    return store, devs


def test_gate_decision_shared_token(benchmark):  # type: ignore[no-untyped-def]
    frame, d = _frame({"token": GW}), digest(GW)
    assert benchmark(lambda: decide(_parsed(frame), d, None, now_ms=0)).admit


def test_gate_decision_device_token(benchmark, tmp_path):  # type: ignore[no-untyped-def]
    store, devs = _store(tmp_path)
    snap = store.current()
    frame, d, gens = (
        _frame({"deviceToken": "device-token-7"}, devs[7]),
        digest(GW),
        shared_generations(GW.encode()),
    )
    assert benchmark(lambda: decide(_parsed(frame), d, snap, now_ms=0, generations=gens)).admit


def test_store_version_check(benchmark, tmp_path):  # type: ignore[no-untyped-def]
    store, _ = _store(tmp_path)
    assert benchmark(store.current) is not None
