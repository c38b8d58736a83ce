"""proxy.tls without sockets: the server context's policy, loading pairs, parsing, messages.

Handshakes run in memory (two SSLObjects joined by MemoryBIOs), so the context is tested by
what a client actually negotiates, not by reading its attributes back.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import stat
import tempfile
import warnings
from pathlib import Path

import pytest

from proxy.errors import ClawgateError
from proxy.tls import (
    CertInfo,
    _private_dir,
    _write_private,
    cert_denied_message,
    load_pair,
    make_server_context,
    parse_chain,
    parse_go_duration,
)
from tests.tlsutil import CA, DOMAIN, client_context, make_ca, make_leaf, peer_serial


@pytest.fixture(scope="module")
def ca() -> CA:
    return make_ca()


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, name: str = DOMAIN
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A full handshake in memory; raises the client's or server's SSLError."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cli = client.wrap_bio(c_in, c_out, server_hostname=name)
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for key, obj in (("c", cli), ("s", srv)):
            if not done[key]:
                try:
                    obj.do_handshake()
                    done[key] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return cli, srv
    raise AssertionError("handshake did not finish")


def served(ca: CA, leaf_pair: tuple[bytes, bytes]) -> ssl.SSLContext:
    ctx = make_server_context()
    load_pair(ctx, *leaf_pair)
    return ctx


# ------------------------------------------------------------------------------- policy


def test_negotiates_tls13_and_http11_only(ca: CA) -> None:
    leaf = make_leaf(ca)
    ctx = served(ca, (leaf.key_pem, leaf.cert_pem))
    cli, srv = handshake(ctx, client_context(ca, alpn=["h2", "http/1.1"]))
    assert cli.version() == "TLSv1.3"
    assert cli.selected_alpn_protocol() == "http/1.1"
    assert peer_serial(cli) == leaf.serial
    cli, _ = handshake(ctx, client_context(ca, alpn=["h2"]))
    assert cli.selected_alpn_protocol() is None  # never h2


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_old_protocols_refused(ca: CA, version: str) -> None:
    leaf = make_leaf(ca)
    ctx = served(ca, (leaf.key_pem, leaf.cert_pem))
    old = client_context(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = getattr(ssl.TLSVersion, version)
        old.maximum_version = getattr(ssl.TLSVersion, version)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError, match="(?i)version|protocol"):
        handshake(ctx, old)


def test_tls12_gets_only_forward_secret_aead_suites(ca: CA) -> None:
    leaf = make_leaf(ca)
    ctx = served(ca, (leaf.key_pem, leaf.cert_pem))
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12, "no TLS 1.2 suites"
    for c in tls12:
        assert c["name"].startswith("ECDHE-") and c["aead"], c["name"]
    cli12 = client_context(ca)
    cli12.maximum_version = ssl.TLSVersion.TLSv1_2
    cli, _ = handshake(ctx, cli12)
    cipher = cli.cipher()
    assert cipher is not None and cli.version() == "TLSv1.2"
    assert cipher[0].startswith("ECDHE-ECDSA-")
    cbc = client_context(ca)
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:AES128-SHA")
    with pytest.raises(ssl.SSLError):
        handshake(ctx, cbc)


def test_no_compression_no_renegotiation() -> None:
    ctx = make_server_context()
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


# ------------------------------------------------------------------------------- loading


def test_swap_in_the_same_context_changes_new_handshakes_only(ca: CA) -> None:
    one, two = make_leaf(ca), make_leaf(ca)
    ctx = served(ca, (one.key_pem, one.cert_pem))
    live, _ = handshake(ctx, client_context(ca))
    load_pair(ctx, two.key_pem, two.cert_pem)
    fresh, _ = handshake(ctx, client_context(ca))
    assert peer_serial(fresh) == two.serial
    assert peer_serial(live) == one.serial


def test_a_bad_pair_leaves_the_context_serving_the_old_certificate(ca: CA) -> None:
    good, other = make_leaf(ca), make_leaf(ca)
    ctx = served(ca, (good.key_pem, good.cert_pem))
    with pytest.raises(ClawgateError, match="do not load together"):
        load_pair(ctx, other.key_pem, good.cert_pem)  # key of another cert
    with pytest.raises(ClawgateError, match="not a PEM certificate"):
        load_pair(ctx, good.key_pem, b"-----BEGIN CERTIFICATE-----\nnope\n")
    with pytest.raises(ClawgateError, match="do not load together"):
        load_pair(
            ctx,
            b"-----BEGIN EC PRIVATE KEY-----\nAA==\n-----END EC PRIVATE KEY-----\n",
            good.cert_pem,
        )
    cli, _ = handshake(ctx, client_context(ca))
    assert peer_serial(cli) == good.serial


def test_pems_never_outlive_the_load(ca: CA) -> None:
    leaf = make_leaf(ca)
    roots = ["/dev/shm", tempfile.gettempdir()]  # noqa: S108

    def leftovers() -> set[str]:
        found = set()
        for root in roots:
            if os.path.isdir(root):
                found |= {
                    os.path.join(root, n) for n in os.listdir(root) if n.startswith("clawgate-tls-")
                }
        return found

    before = leftovers()
    served(ca, (leaf.key_pem, leaf.cert_pem))
    with pytest.raises(ClawgateError):
        load_pair(make_server_context(), make_leaf(ca).key_pem, leaf.cert_pem)
    assert leftovers() == before


def test_private_dir_and_files_are_owner_only(tmp_path: Path) -> None:
    d = _private_dir()
    try:
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        _write_private(os.path.join(d, "k"), b"secret")
        assert stat.S_IMODE(os.stat(os.path.join(d, "k")).st_mode) == 0o600
        with pytest.raises(FileExistsError):  # O_EXCL: never writes through a planted file
            _write_private(os.path.join(d, "k"), b"again")
    finally:
        import shutil

        shutil.rmtree(d)


def test_parse_chain_reads_the_leaf_of_a_chain(ca: CA) -> None:
    when = dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    leaf = make_leaf(ca, [DOMAIN, "other.tail4c3a9.ts.net"], not_after=when, serial=0xC1A3)
    info = parse_chain(leaf.cert_pem + ca.cert_pem)
    assert info.serial == 0xC1A3 and info.not_after == when
    assert info.names == (DOMAIN, "other.tail4c3a9.ts.net")
    assert info.to_json()["serial"] == "c1a3"


@pytest.mark.parametrize(
    ("names", "name", "ok"),
    [
        ((DOMAIN,), DOMAIN, True),
        ((DOMAIN,), DOMAIN.upper() + ".", True),
        ((DOMAIN,), "web02.tail4c3a9.ts.net", False),
        (("*.tail4c3a9.ts.net",), DOMAIN, True),
        (("*.tail4c3a9.ts.net",), "a.b.tail4c3a9.ts.net", False),
        (("*.tail4c3a9.ts.net",), "tail4c3a9.ts.net", False),
    ],
)
def test_covers(names: tuple[str, ...], name: str, ok: bool) -> None:
    info = CertInfo(1, dt.datetime.now(dt.UTC), names, "00")
    assert info.covers(name) is ok


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("720h", 720 * 3600.0),
        ("1h30m", 5400.0),
        ("90s", 90.0),
        ("2h0m5s", 7205.0),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1d", "-1h", "1.5h", "30m2h", " 1h"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_denied_message_names_every_fix() -> None:
    msg = cert_denied_message()
    assert "\n" not in msg
    assert msg.startswith("tailscaled refused this node's TLS certificate (403 cert access denied)")
    for fix in (
        "run clawgate as root",
        "tailscale set --operator=",
        "TS_PERMIT_CERT_UID=",
        "/etc/default/tailscaled",
    ):
        assert fix in msg
