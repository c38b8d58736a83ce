"""benchmarks/syscalls.py's parsers: the `strace -c` table and a callgrind dump."""

from __future__ import annotations

from benchmarks.syscalls import parse_callgrind, parse_strace_c

STRACE_C = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 31.02    0.101000          12      8000           read
 20.11    0.065000           9      3000      1000 epoll_ctl
  0.01    0.000030          30         1           getpid
------ ----------- ----------- --------- --------- ----------------
100.00    0.166030          15     11001      1000 total
"""


def test_parse_strace_c_calls_and_errors_without_the_total() -> None:
    assert parse_strace_c(STRACE_C) == {
        "read": {"calls": 8000, "errors": 0},
        "epoll_ctl": {"calls": 3000, "errors": 1000},
        "getpid": {"calls": 1, "errors": 0},
    }


def test_parse_strace_c_ignores_other_lines() -> None:
    assert parse_strace_c("strace: Process 12 attached\n\n") == {}


CALLGRIND = """\
version: 1
events: Ir
fn=(1) main
0 100
cfn=(2) _PyObject_Malloc
calls=7 0
0 50
cfn=(3) other
calls=5 0
0 9
fn=(4) f
cfn=(2)
calls=3 0
0 20
cfn=(5) _PyObject_Calloc
calls=2 0
0 4
summary: 183
"""


def test_parse_callgrind_total_and_allocator_calls_by_compressed_name() -> None:
    total, calls = parse_callgrind(CALLGRIND)
    assert total == 183
    assert calls["_PyObject_Malloc"] == 10  # 7 by full name, 3 by the "(2)" back-reference
    assert calls["_PyObject_Calloc"] == 2
    assert calls["_PyMem_RawMalloc"] == 0
