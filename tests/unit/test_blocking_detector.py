"""The blocking-call detector of tests/conftest.py is on for in-process async tests.

proxy/ code that blocks on a running event loop (here: the token file written from a
coroutine) raises BlockingError there; the same call outside a loop, or from the test's own
code, is fine; the allowed config-building call sites stay allowed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from blockbuster import BlockingError

from proxy.config import load_config
from proxy.keystore import TokenFile


async def test_proxy_code_blocking_on_the_loop_fails(tmp_path: Path) -> None:
    with pytest.raises(BlockingError):
        TokenFile(tmp_path / "tokens.json").add("phone")


async def test_the_tests_own_blocking_calls_pass(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("set-up may block")
    assert (tmp_path / "x").read_text() == "set-up may block"


async def test_config_loading_is_an_allowed_call_site(tmp_path: Path) -> None:
    path = tmp_path / "clawgate.json"
    path.write_text('{"upstream": "http://127.0.0.1:18789"}')
    assert load_config(path).upstream.port == 18789


def test_outside_a_loop_nothing_is_detected(tmp_path: Path) -> None:
    assert TokenFile(tmp_path / "tokens.json").add("phone")
