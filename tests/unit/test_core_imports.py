"""The layering rules, checked on the source: proxy/core does no I/O, proxy/ has no cycle.

Two independent checks of the first rule: an AST walk of what each proxy.core module names,
and a real import of every proxy.core module in a fresh interpreter where the I/O modules
cannot be imported at all (a sys.meta_path finder refuses them, after they were dropped
from sys.modules). The second rule is an AST walk of every import in proxy/, function-level
ones included, checked twice: the imports that can run, and those plus the ``if
TYPE_CHECKING:`` ones (annotations only: no cycle there either).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROXY = ROOT / "proxy"
BLOCKED = ("asyncio", "os", "socket", "ssl", "subprocess", "aiohttp", "selectors", "uvloop")
# What proxy.core may import besides the standard library: itself, the exception tree, and
# the pure parsers. '_socket' only for inet_pton (address text -> bytes, no socket at all).
ALLOWED_OUTSIDE = {"proxy.errors", "httptools"}
ALLOWED_FROM = {"_socket": {"inet_pton", "AF_INET", "AF_INET6"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, *, type_checking: bool = False) -> list[tuple[str, list[str]]]:
    """(absolute module, names) for every import that can run, at any depth; with
    ``type_checking``, the ``if TYPE_CHECKING:`` imports (annotations only) too."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node) and not type_checking:
            for branch in node.orelse:
                visit(branch)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [alias.name for alias in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def _core_files() -> list[Path]:
    return sorted((PROXY / "core").glob("*.py"))


def test_core_package_exists_with_its_modules() -> None:
    names = {p.stem for p in _core_files()}
    assert {
        "networks",
        "http1",
        "policy",
        "wsframe",
        "tokens",
        "sessions",
        "admission",
        "connect_auth",
        "exchange",
        "jwt",
    } <= names


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: p.stem)
def test_core_module_names_no_io_module(path: Path) -> None:
    for module, names in _imports(path):
        top = module.split(".")[0]
        if module in ALLOWED_FROM:
            assert set(names) <= ALLOWED_FROM[module], (path.name, module, names)
            continue
        assert top not in BLOCKED, (path.name, module)
        if top == "proxy":
            assert module.startswith("proxy.core") or module in ALLOWED_OUTSIDE, (path.name, module)
        elif top not in sys.stdlib_module_names:
            assert top in ALLOWED_OUTSIDE, (path.name, module)


_PROBE = r"""
import importlib, importlib.abc, json, sys
blocked, modules, preload = json.loads(sys.argv[1])
for name in preload:
    importlib.import_module(name)
for name in list(sys.modules):
    if name.split(".")[0] in blocked:
        del sys.modules[name]

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in blocked:
            raise ImportError(f"proxy.core must not import {fullname}")
        return None

sys.meta_path.insert(0, Refuse())
for name in modules:
    importlib.import_module(name)
leaked = sorted(n for n in sys.modules if n.split(".")[0] in blocked)
print(json.dumps(leaked))
"""


def test_core_imports_with_io_modules_blocked() -> None:
    modules = [_module_name(p) for p in _core_files()]
    # The standard-library and third-party modules proxy.core names are imported first
    # (some of them, dataclasses for one, use os internally); then the I/O modules are
    # dropped and refused, so a proxy.core module reaching one, directly or through
    # another proxy module, fails to import.
    preload = sorted(
        {
            module
            for p in _core_files()
            for module, _ in _imports(p)
            if not module.startswith("proxy") and module.split(".")[0] not in BLOCKED
        }
        | {"proxy", "proxy.errors"}
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", _PROBE, json.dumps([list(BLOCKED), modules, preload])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_probe_refuses_a_module_that_does_io(tmp_path: Path) -> None:
    """The probe itself can fail: a module importing asyncio is refused."""
    (tmp_path / "leaky.py").write_text("import asyncio\n")
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + _PROBE,
            json.dumps([list(BLOCKED), ["leaky"], []]),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    assert "must not import asyncio" in out.stderr


def _graph(*, type_checking: bool = False) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PROXY.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for module, names in _imports(path, type_checking=type_checking):
            if module in files:
                edges.add(module)
            edges.update(f"{module}.{n}" for n in names if f"{module}.{n}" in files)
        # A package's __init__ runs before any of its modules: importing proxy.a.b imports
        # proxy.a too, but that edge is implied, not a cycle of the code's making.
        edges.discard(name)
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_proxy_import_graph_has_no_cycle() -> None:
    assert _cycles(_graph()) == []


def test_proxy_import_graph_has_no_cycle_counting_type_checking_imports() -> None:
    """Annotations too: a module that needs another's objects but is imported by it
    names what it needs as a Protocol (authz.Peer, upstream.Client, runtime.Connection)."""
    graph = _graph(type_checking=True)
    assert graph["proxy.front"] >= {"proxy.runtime", "proxy.authz"}  # the edges are seen
    assert _cycles(graph) == []


def test_type_checking_imports_are_edges() -> None:
    """The walk sees an import under ``if TYPE_CHECKING:`` only when asked to."""
    front = PROXY / "front.py"
    assert ("proxy.runtime", ["Runtime"]) not in _imports(front)
    assert ("proxy.runtime", ["Runtime"]) in _imports(front, type_checking=True)


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
