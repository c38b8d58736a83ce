"""Optional ahead-of-time compilation of proxy/core (and the hot-path protocols) with mypyc
(issue 15).

All project metadata lives in pyproject.toml; this file only adds the extension modules.
CLAWGATE_COMPILE picks the build:

- ``0``: pure Python (the modules as they are);
- ``1``: compile proxy/core and HOT_PATH with mypyc, build the C module proxy/core/_head.c,
  and fail when that is not possible;
- ``auto`` (the default): compile when mypyc, a C compiler and the Python headers are
  there, else build pure.

The compiled modules behave as the pure ones (tests/unit runs on both builds; see
scripts/test and CLAWGATE_BUILDS).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from glob import glob
from typing import Any

from setuptools import Extension, setup

# Modules mypyc must not compile: none today (list a module here with the reason).
PURE_ONLY: frozenset[str] = frozenset()


# Modules outside proxy/core compiled too: what every connection runs through (issue 15
# lever 1). The asyncio Protocol classes (ClientConnection, UpstreamConnection,
# BoundaryCloser: data_received and the relay), the authorizer (credential, decision,
# rewrite), the runtime's per-connection bookkeeping (admission, log lines, close) with the
# access log and the metrics it counts in: compiled, -11.5% instructions per connection
# (callgrind, benchmarks/notes/issue15-lever4.md). One group with proxy/core, so their
# calls into each other are native calls.
HOT_PATH: tuple[str, ...] = (
    "proxy/front.py",
    "proxy/upstream.py",
    "proxy/authz.py",
    "proxy/runtime.py",
    "proxy/accesslog.py",
    "proxy/metrics.py",
)


def _compiled_modules() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    paths = sorted(glob(os.path.join(here, "proxy", "core", "*.py")))
    rel = [os.path.relpath(p, here) for p in paths] + list(HOT_PATH)
    return [p for p in rel if os.path.basename(p) != "__init__.py" and p not in PURE_ONLY]


def _can_compile() -> str | None:
    """None when a compiled build is possible, else why not."""
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc is not installed"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"no Python headers ({include}/Python.h)"
    return None


def _ext_modules() -> list[Any]:
    mode = os.environ.get("CLAWGATE_COMPILE", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        sys.exit(f"CLAWGATE_COMPILE must be 0, 1 or auto, not {mode!r}")
    if mode == "0":
        return []
    why_not = _can_compile()
    if why_not is not None:
        if mode == "1":
            sys.exit(f"CLAWGATE_COMPILE=1 but proxy/core cannot be compiled: {why_not}")
        print(f"clawgate: building pure Python ({why_not})", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    # group_name: the shared library is proxy/core/_native__mypyc.*.so, inside the package
    # (an editable install maps only the proxy package; scripts/setup --pure removes it).
    compiled = mypycify(_compiled_modules(), opt_level="3", group_name="proxy.core._native")
    # The request head's common case in C (issue 15 lever 4; proxy/core/_head.c): part of
    # the compiled build, absent from the pure one (http1 then parses every head itself).
    fast_head = Extension(
        "proxy.core._head",
        ["proxy/core/_head.c"],
        extra_compile_args=["-O2"],
    )
    return [*compiled, fast_head]


setup(ext_modules=_ext_modules())
