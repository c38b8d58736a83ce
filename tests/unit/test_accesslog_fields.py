"""The per-connection log lines, encoded without the generic JSON encoder (issue 15, lever 3).

decision_fields/close_fields and AccessLog.write_fields must give the very line that
AccessLog.write gives for the same record: the encoder's own output is the oracle, over any
text (quotes, backslashes, control characters, non-ASCII, lone surrogates), any int and
any float the close line can hold.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.accesslog import AccessLog, close_fields, decision_fields

TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
INT = st.integers(min_value=0, max_value=2**63)


def _oracle(record: dict[str, object]) -> str:
    """The encoding write() uses for a record, without the braces."""
    log = AccessLog("off")
    return log.fragment(record)


@settings(max_examples=400, deadline=None)
@given(
    conn=INT,
    peer=TEXT,
    allow=st.booleans(),
    status=st.integers(min_value=100, max_value=599),
    reason=TEXT,
    method=TEXT,
    path=TEXT,
    websocket=st.booleans(),
)
def test_decision_fields_are_what_the_encoder_writes(
    conn: int,
    peer: str,
    allow: bool,
    status: int,
    reason: str,
    method: str,
    path: str,
    websocket: bool,
) -> None:
    record = {
        "event": "decision",
        "conn": conn,
        "peer": peer,
        "decision": "allow" if allow else "deny",
        "status": status,
        "reason": reason,
        "method": method,
        "path": path,
        "websocket": websocket,
    }
    assert decision_fields(conn, peer, allow, status, reason, method, path, websocket) == (
        _oracle(record)
    )


@settings(max_examples=400, deadline=None)
@given(
    conn=INT,
    peer=TEXT,
    requests=INT,
    bytes_in=INT,
    bytes_out=INT,
    duration=st.floats(min_value=0, max_value=1e9, allow_nan=False).map(lambda f: round(f, 4)),
    reason=TEXT,
)
def test_close_fields_are_what_the_encoder_writes(
    conn: int,
    peer: str,
    requests: int,
    bytes_in: int,
    bytes_out: int,
    duration: float,
    reason: str,
) -> None:
    record = {
        "event": "close",
        "conn": conn,
        "peer": peer,
        "requests": requests,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "duration": duration,
        "reason": reason,
    }
    fields = close_fields(conn, peer, requests, bytes_in, bytes_out, duration, reason)
    assert fields == _oracle(record)
    assert json.loads("{" + fields + "}") == record


@pytest.mark.parametrize("tail", ["", '"token":"phone","node":"phone.tail\\"x"'])
def test_write_fields_writes_the_line_write_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tail: str
) -> None:
    """The same file content, time stamp first, through either method (no event loop:
    each line is written through)."""
    record = {
        "event": "close",
        "conn": 7,
        "peer": "100.101.102.103",
        "requests": 1,
        "bytes_in": 10,
        "bytes_out": 20,
        "duration": 0.0123,
        "reason": 'client closed "x"\n',
    }
    a, b = AccessLog(str(tmp_path / "a.log")), AccessLog(str(tmp_path / "b.log"))
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.25)
    a.write(record, tail)
    b.write_fields(
        close_fields(7, "100.101.102.103", 1, 10, 20, 0.0123, 'client closed "x"\n'), tail
    )
    a.close()
    b.close()
    line = (tmp_path / "a.log").read_text()
    assert line == (tmp_path / "b.log").read_text()
    assert line.startswith('{"time":"2023-11-14T22:13:20.250Z","event":"close",')
    assert json.loads(line)["reason"] == 'client closed "x"\n'


def test_write_fields_on_a_disabled_log_writes_nothing(tmp_path: Path) -> None:
    log = AccessLog("off")
    log.write_fields('"event":"close"')
    assert log.lines == 0 and log._pending == []


@pytest.mark.parametrize(
    ("t", "stamp"),
    [
        (1_700_000_000.0, "2023-11-14T22:13:20.000Z"),
        (1_700_000_000.0005, "2023-11-14T22:13:20.000Z"),
        (1_700_000_000.25, "2023-11-14T22:13:20.250Z"),
        (1_700_000_000.999, "2023-11-14T22:13:20.999Z"),
        (math.nextafter(1_700_000_001.0, 0.0), "2023-11-14T22:13:20.999Z"),
    ],
)
def test_the_time_stamp_milliseconds(monkeypatch: pytest.MonkeyPatch, t: float, stamp: str) -> None:
    """A table lookup now: ".000Z" to ".999Z", truncated as before, never out of range."""
    log = AccessLog("off")
    monkeypatch.setattr(time, "time", lambda: t)
    assert log._now() == stamp
