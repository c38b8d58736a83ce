"""The tailnet listeners are bound before their address is on tailscale0 (IP/IPV6_FREEBIND).

tailscaled reports a node's addresses on the IPN bus a moment before it puts them on the
interface; the real 1.96.4 showed the IPv6 bind failing with EADDRNOTAVAIL in that window
(tests/real: test_binds_the_addresses_when_they_appear). Nothing is sent: bind and close.
"""

from __future__ import annotations

import sys

import pytest

from proxy.system import listen_socket

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux FREEBIND")


@pytest.mark.parametrize("host", ["100.127.255.254", "fd7a:115c:a1e0:ffff::fe"])
def test_binds_an_address_not_on_any_interface(host: str) -> None:
    sock = listen_socket(host, 0, reuse_port=False, freebind=True)
    try:
        assert sock.getsockname()[0] == host
    finally:
        sock.close()


def test_without_freebind_the_same_bind_fails() -> None:
    with pytest.raises(OSError):
        listen_socket("fd7a:115c:a1e0:ffff::fe", 0, reuse_port=False, freebind=False).close()
