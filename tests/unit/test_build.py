"""The build under test is the one meant, and a compiled one is never stale (issue 15).

proxy/core is pure Python, or compiled by mypyc (``scripts/setup --compiled``): then
proxy/core/X.*.so sits beside X.py and Python imports it instead. An .so older than its .py
would run yesterday's code while every test reads today's source, so with any .so present
each module must have one, built after its .py was last changed, and be the one imported.
scripts/test names the build it runs (CLAWGATE_BUILD, "pure" or "compiled"); without it the
build is read off the tree. The per-connection modules outside proxy/core (setup.py's
HOT_PATH: front, upstream, authz, runtime, accesslog, metrics) are compiled with proxy/core
and checked the same way, and so is the C module proxy/core/_head.c.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import os
from pathlib import Path

import pytest

PROXY = Path(__file__).resolve().parents[2] / "proxy"
CORE = PROXY / "core"


def _setup_hot_path() -> list[str]:
    """setup.py's HOT_PATH, read from its source: ["front", "upstream", ...]."""
    tree = ast.parse((PROXY.parent / "setup.py").read_text("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and ast.unparse(node.target) == "HOT_PATH":
            assert node.value is not None
            return [Path(p).stem for p in ast.literal_eval(node.value)]
    raise AssertionError("setup.py has no HOT_PATH")


HOT_PATH = _setup_hot_path()
# Dotted names below proxy (core.http1, front) of every module a compiled build compiles.
MODULES = sorted(f"core.{p.stem}" for p in CORE.glob("*.py") if p.name != "__init__.py")
MODULES += HOT_PATH
# C modules of the compiled build (setup.py's Extension list): proxy/core/X.c
C_MODULES = sorted(f"core.{p.stem}" for p in CORE.glob("*.c"))
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # e.g. .cpython-311-x86_64-linux-gnu.so


def _compiled_files() -> list[Path]:
    return sorted(CORE.glob("*.so")) + sorted(PROXY.glob("*.so"))


def _source(name: str) -> Path:
    return PROXY.joinpath(*name.split(".")).with_suffix(".py")


def _expected_build() -> str:
    build = os.environ.get("CLAWGATE_BUILD", "")
    if build:
        assert build in ("pure", "compiled"), f"CLAWGATE_BUILD={build!r}"
        return build
    return "compiled" if _compiled_files() else "pure"


def test_core_modules_are_found() -> None:
    assert {"core.http1", "core.networks", "core.tokens", "core.exchange"} <= set(MODULES)
    assert all(_source(name).exists() for name in MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_the_imported_module_is_the_build_under_test(name: str) -> None:
    module = importlib.import_module(f"proxy.{name}")
    assert module.__file__ is not None
    if _expected_build() == "compiled":
        assert module.__file__.endswith(".so"), f"proxy.{name} is not compiled"
    else:
        assert module.__file__.endswith(".py"), f"proxy.{name} is {module.__file__}"


@pytest.mark.parametrize("name", MODULES)
def test_a_compiled_module_is_not_older_than_its_source(name: str) -> None:
    if _expected_build() == "pure":
        assert _compiled_files() == [], "pure build, yet compiled modules in proxy"
        return
    source = _source(name)
    # The module's own extension (a thin stub) and the shared library holding its code.
    for compiled in (source.with_suffix(SUFFIX), CORE / f"_native__mypyc{SUFFIX}"):
        assert compiled.exists(), f"{compiled.name} is missing: run scripts/setup --compiled"
        assert compiled.stat().st_mtime >= source.stat().st_mtime, (
            f"{compiled.name} is older than {source.name}: run scripts/setup --compiled"
        )


def test_no_compiled_module_without_a_source() -> None:
    """Every .so is a module of today's tree, mypyc's shared library or a C module."""
    names = {
        ("core." if p.parent == CORE else "") + p.name.split(".")[0] for p in _compiled_files()
    }
    assert names <= set(MODULES) | {"core._native__mypyc"} | set(C_MODULES)


@pytest.mark.parametrize("name", C_MODULES)
def test_a_c_module_is_there_exactly_in_the_compiled_build(name: str) -> None:
    """proxy/core/_head.c is built with the compiled build, never older than its source,
    and used by http1 (FAST_HEAD); the pure build has no trace of it."""
    from proxy.core import http1

    source = PROXY.joinpath(*name.split(".")).with_suffix(".c")
    compiled = source.with_suffix(SUFFIX)
    assert source.exists()
    if _expected_build() == "pure":
        assert not compiled.exists()
        assert http1.FAST_HEAD is False
        return
    assert compiled.exists(), f"{compiled.name} is missing: run scripts/setup --compiled"
    assert compiled.stat().st_mtime >= source.stat().st_mtime, (
        f"{compiled.name} is older than {source.name}: run scripts/setup --compiled"
    )
    module = importlib.import_module(f"proxy.{name}")
    assert module.__file__ == str(compiled)
    assert http1.FAST_HEAD is True
