"""Which build of lbproxy runs: its hot-path modules compiled with mypyc, or pure Python (issue #19).

The source is the `.py` files either way. `pip install .` compiles the modules of `COMPILED` with
mypyc (setup.py) and records the hash of each one's source in `compiled.json` beside them; when the
compiler or the C build fails, the install goes on without them and lbproxy runs as pure Python.

At import (`lbproxy/__init__.py` calls `choose` before any other module of lbproxy is loaded) the
compiled modules are used only if every one of them matches its source: a `.py` edited since the
build (a developer's tree) would otherwise be shadowed by an older extension, silently. If one does
not match, or `LBPROXY_PURE=1` is set, an import hook loads the `.py` of every compiled module
instead, all of them together: compiled modules call each other directly, so half a build would run
old code. `RUNNING` says which build runs, for `lbproxy --version`, the status page and
`lbproxy_build_info`. Standard library only: setup.py imports this module to know what to compile.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parent
RECORD = PACKAGE / "compiled.json"  # written by the build: {"mypyc": version, "sources": {module: sha256}}
PURE_VARIABLE = "LBPROXY_PURE"  # set (to anything but "" or "0"): pure Python, at build time and at run time

# The hot path, accept to relay: the modules mypyc compiles. Not `tls` (its contexts subclass
# ssl.SSLContext, a C type that compiled classes cannot extend), nor the control plane and the admin
# side, where the time goes to I/O and aiohttp.
COMPILED: tuple[str, ...] = (
    "balancing",
    "flow",
    "framing",
    "handshake",
    "hedging",
    "http_proxy",
    "http_upstream",
    "limits",
    "persistence",
    "pool",
    "proxy_protocol",
    "request_head",
    "routing",
    "selection",
    "tcp_proxy",
    "transaction",
    "upstream",
)

RUNNING = "pure"  # or "mypyc": set by `choose`


def described() -> str:
    """The build that runs, in words: `lbproxy --version` and the status page say it."""
    return "compiled with mypyc" if RUNNING == "mypyc" else "pure Python"


def source_hash(module: str) -> str:
    return hashlib.sha256((PACKAGE / f"{module}.py").read_bytes()).hexdigest()


def choose() -> str:
    """Decide which build runs (see the module's docstring), set RUNNING and return it."""
    global RUNNING
    why = _why_pure()
    if why is None:
        RUNNING = "mypyc"
        return RUNNING
    if why:  # compiled modules that cannot be used: say so once, and load their source instead
        warnings.warn(f"lbproxy runs as pure Python: {why}", RuntimeWarning, stacklevel=2)
    sys.meta_path.insert(0, _Source(COMPILED))
    RUNNING = "pure"
    return RUNNING


def _why_pure() -> str | None:
    """None: the compiled build can run; "": there is none (said nowhere); else why it may not."""
    if os.environ.get(PURE_VARIABLE, "") not in ("", "0"):
        return ""
    try:
        record = json.loads(RECORD.read_text())
    except OSError:
        record = {}
    except ValueError:
        record = {"failed": f"{RECORD} is damaged"}
    if not isinstance(record, dict):
        record = {"failed": f"{RECORD} is damaged"}
    if "failed" in record:  # the install could not compile: said at every start, as pip hides it
        return f"the install could not compile its hot path ({record['failed']})"
    if not _extension(COMPILED[0]):
        return ""
    sources = record.get("sources")
    if not isinstance(sources, dict):
        return f"{RECORD.name} is missing or damaged; reinstall lbproxy (or `make build`) to compile it"
    changed = [module for module in COMPILED if sources.get(module) != source_hash(module)]
    if changed:
        return (
            f"{', '.join(name + '.py' for name in changed)} changed since the compiled build; "
            "`make build` (or `pip install .`) compiles it again"
        )
    return None


def _extension(module: str) -> bool:
    return any((PACKAGE / f"{module}{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES)


class _Source(importlib.abc.MetaPathFinder):
    """Loads the `.py` of the compiled modules, ahead of their extensions."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.names = {f"lbproxy.{module}" for module in modules}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        return importlib.util.spec_from_file_location(fullname, PACKAGE / f"{fullname.rpartition('.')[2]}.py")
