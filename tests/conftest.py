"""Shared pytest fixtures for clawgate's tests: real servers on real sockets, no mocks.

Each section below has one owner; add new fixtures in a section of your own, marked the same
way, rather than editing someone else's.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import AsyncIterator, Iterator

import pytest
from blockbuster import blockbuster_ctx

from tests.fakes.fake_gateway import FakeGateway
from tests.netns import (
    NetnsUnavailable,
    Tailnet,
    cleanup_stale,
    listen_in,
    netns_unavailable_reason,
)

# ================================================================================================
# Tailnet (network namespaces) and fake gateway: tests/netns.py, tests/fakes/fake_gateway.py
# ================================================================================================

# Set in CI, where we are root: a tailnet test that would skip there fails instead, so a broken
# runner cannot turn the network checks into silent skips.
REQUIRE_NETNS_ENV = "CLAWGATE_REQUIRE_NETNS"


def require_netns() -> None:
    """Skip (or, with CLAWGATE_REQUIRE_NETNS=1, fail) when namespaces are unavailable."""
    reason = netns_unavailable_reason()
    if reason is None:
        return
    if os.environ.get(REQUIRE_NETNS_ENV) == "1":
        pytest.fail(f"{REQUIRE_NETNS_ENV}=1 but {reason}")
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Anything that needs the tailnet is a netns test, so `-m "not netns"` deselects it.
    for item in items:
        if "tailnet" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.netns)
    # The real OpenClaw gateways are session-scoped and hold 127.0.0.1:18789 in the gw
    # namespace once started: run the e2e suite after everything else (stable sort).
    items.sort(key=lambda item: "/tests/e2e/" in str(getattr(item, "path", "")))


@pytest.fixture(scope="session")
def tailnet() -> Iterator[Tailnet]:
    """The session's tailnet: gw 100.64.0.1, phone 100.101.102.103, ci 100.88.12.34, public."""
    require_netns()
    cleanup_stale()
    try:
        tn = Tailnet.create()
    except NetnsUnavailable as exc:
        # Root without CAP_SYS_ADMIN (an unprivileged container) lists namespaces but cannot
        # make them; same rule as above: skip locally, fail where netns is required.
        if os.environ.get(REQUIRE_NETNS_ENV) == "1":
            pytest.fail(f"{REQUIRE_NETNS_ENV}=1 but {exc}")
        pytest.skip(str(exc))
    with tn:
        yield tn


@pytest.fixture
async def fake_gateway(tailnet: Tailnet) -> AsyncIterator[FakeGateway]:
    """A fake gateway on 127.0.0.1:<random> inside the gw namespace (the proxy's loopback)."""
    gw = FakeGateway()
    await gw.start(sock=listen_in(tailnet.ns("gw"), "127.0.0.1"))
    try:
        yield gw
    finally:
        await gw.stop()


@pytest.fixture
async def fake_gateway_local() -> AsyncIterator[FakeGateway]:
    """A fake gateway on the root namespace's 127.0.0.1:<random>, for tests without netns."""
    gw = FakeGateway()
    await gw.start(host="127.0.0.1", port=0)
    try:
        yield gw
    finally:
        await gw.stop()


# ================================================================================================
# (next section: add your fixtures below this line, under your own banner)
# ================================================================================================

# ================================================================================================
# Blocking-call detector (blockbuster) for the in-process async tests
# ================================================================================================

# A blocking call (file I/O, time.sleep, a blocking socket, os.stat...) made by proxy/ code on a
# running event loop stalls every connection of the process. In an in-process async test such
# a call raises blockbuster.BlockingError and fails the test. Only proxy/ frames are scanned:
# the tests' own set-up may block. Tests that drive clawgate as a subprocess (the tailnet ones,
# e2e, real, deploy) are not in-process: the detector stays off there.


IN_PROCESS_DIRS = ("/tests/unit/", "/tests/functional/", "/tests/security/")

# clawgate imports its modules at start, never on a running loop; a test that imports one
# lazily inside an async test must not see the import's own I/O (prometheus_client reads
# /proc/self/stat when proxy.metrics first imports it) as a blocking call. Imported here,
# once, so a test file run alone behaves as in the whole suite.
_RUNTIME = importlib.import_module("proxy.runtime")


def _in_process_async(item: pytest.Item) -> bool:
    fn = getattr(item, "function", None)
    if fn is None or not inspect.iscoroutinefunction(fn):
        return False
    if not any(d in str(getattr(item, "path", "")) for d in IN_PROCESS_DIRS):
        return False  # e2e, real, deploy: clawgate and the gateway run as processes
    return "tailnet" not in getattr(item, "fixturenames", ())


# Known blocking calls on the loop, allowed by call site (a frame of this file and function
# anywhere on the stack). Each is a finding, not an endorsement: building a config snapshot
# (start and every reload, the admin's /-/reload included) reads the config, token, key and
# secret files synchronously; the LocalAPI client stats the candidate socket paths when it
# opens a session. Bounded and rare, but on the event loop (issue 14's keystore moves them).
ALLOWED_BLOCKING = [
    ("proxy/config.py", {"load_config"}),
    ("proxy/runtime.py", {"_build"}),
    ("proxy/access/jwt.py", {"from_config"}),
    ("proxy/tailscale/localapi.py", {"find_socket"}),
]
if (_RUNTIME.__file__ or "").endswith(".so"):
    # Compiled by mypyc (the compiled build), runtime.py has no Python frames for the
    # allowance above to find: the token file read that _build makes is allowed where it
    # happens instead (TokenFile.load, called by _build only on the server's side).
    ALLOWED_BLOCKING.append(("proxy/keystore.py", {"load"}))


@pytest.fixture(autouse=True)
def _no_blocking_calls(request: pytest.FixtureRequest) -> Iterator[None]:
    if not _in_process_async(request.node):
        yield
        return
    with blockbuster_ctx("proxy") as bb:
        for fn in bb.functions.values():
            for path, names in ALLOWED_BLOCKING:
                fn.can_block_in(path, names)
        yield
