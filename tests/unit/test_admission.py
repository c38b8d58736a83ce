"""proxy/core/admission.py as tables: the accept-time limits, in order, and the counts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from proxy.core.admission import Admission
from proxy.core.sessions import LockoutTable


@dataclass(frozen=True)
class Lim:
    max_connections: int = 10
    per_source_ip: int = 3
    unauthenticated_per_ip: int = 2
    per_identity: int = 2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _admit(
    adm: Admission,
    ip: str = "100.64.0.1",
    *,
    lim: Lim = Lim(),
    active: int = 0,
    fd_cap: int = 100,
    draining: bool = False,
    lockouts: LockoutTable | None = None,
    loopback: bool = False,
) -> tuple[str, int, str, int | None] | None:
    return adm.admit(
        ip,
        lim,
        active=active,
        fd_cap=fd_cap,
        draining=draining,
        lockouts=lockouts if lockouts is not None else LockoutTable(),
        loopback=loopback,
    )


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({}, None),
        ({"draining": True}, ("", 503, "server shutting down", None)),
        ({"active": 10}, ("max_connections", 503, "too many connections", None)),
        (
            {"active": 5, "fd_cap": 5},
            ("fd_limit", 503, "too many connections (file descriptor limit)", None),
        ),
        # Draining wins over every limit; the connection cap over the descriptor budget.
        ({"draining": True, "active": 10, "fd_cap": 0}, ("", 503, "server shutting down", None)),
        ({"active": 10, "fd_cap": 0}, ("max_connections", 503, "too many connections", None)),
    ],
)
def test_accept_refusals_in_order(kwargs: dict[str, object], expect: object) -> None:
    adm = Admission()
    assert _admit(adm, **kwargs) == expect  # type: ignore[arg-type]
    counted = expect is None
    assert (adm.per_ip["100.64.0.1"] == 1) is counted
    assert (adm.unauth_per_ip["100.64.0.1"] == 1) is counted


def test_per_ip_and_unauthenticated_counts() -> None:
    adm = Admission()
    assert _admit(adm) is None and _admit(adm) is None
    # Two undecided from this address: the third waits for one of them to be decided.
    assert _admit(adm) == (
        "unauthenticated_per_ip",
        429,
        "too many unauthenticated connections from this address",
        1,
    )
    adm.decided("100.64.0.1")
    assert _admit(adm) is None
    adm.decided("100.64.0.1")
    # Three live from this address: perSourceIp, whatever is decided.
    assert _admit(adm) == ("per_ip", 429, "too many connections from this address", 1)
    assert _admit(adm, "100.64.0.2") is None  # another address is not affected
    adm.release("100.64.0.1", None)
    assert _admit(adm) is None
    for _ in range(3):
        adm.release("100.64.0.1", None)
    assert adm.unauth_per_ip["100.64.0.1"] == 2  # the last two were never decided
    adm.decided("100.64.0.1")
    adm.decided("100.64.0.1")
    assert "100.64.0.1" not in adm.per_ip and "100.64.0.1" not in adm.unauth_per_ip


def test_source_lockout_at_accept_with_injected_clock() -> None:
    clock = Clock()
    table = LockoutTable(clock=clock)
    for _ in range(3):
        table.fail("ip:100.64.0.1", count=3, window=60, lockout=30)
    adm = Admission()
    assert _admit(adm, lockouts=table) == ("locked_out", 429, "too many failed authentications", 31)
    # A loopback peer is never refused by an address lockout (a shared 127.0.0.1).
    assert _admit(adm, "100.64.0.1", lockouts=table, loopback=True) is None
    assert _admit(adm, "100.64.0.2", lockouts=table) is None
    clock.now += 20.5
    assert _admit(adm, lockouts=table) == ("locked_out", 429, "too many failed authentications", 10)
    clock.now += 10
    assert _admit(adm, lockouts=table) is None


def test_per_identity_counts_move_with_the_connection() -> None:
    adm = Admission()
    assert adm.admit_identity("ts:alice", None, 2)
    assert adm.admit_identity("ts:alice", None, 2)
    assert not adm.admit_identity("ts:alice", None, 2)  # a third connection: over
    assert adm.per_identity["ts:alice"] == 2
    # The same connection again (keep-alive): never counted twice.
    assert adm.admit_identity("ts:alice", "ts:alice", 2)
    assert adm.per_identity["ts:alice"] == 2
    # A connection's next request under another principal moves its count.
    assert adm.admit_identity("token:phone", "ts:alice", 2)
    assert adm.per_identity == {"ts:alice": 1, "token:phone": 1}
    adm.release(None, "token:phone")
    adm.release(None, "ts:alice")
    assert not adm.per_identity
