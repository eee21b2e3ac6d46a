"""The build of lbproxy (the metadata is in pyproject.toml): its hot-path modules compiled with mypyc.

`pip install .` compiles the modules of lbproxy.build.COMPILED with mypyc, as black and mypy ship
themselves, and records the hash of each one's source beside them (`lbproxy/compiled.json`), which
lbproxy checks at start. When mypyc cannot be imported, or it or the C compiler fails, the install
goes on without the extensions, with a warning: the `.py` files are always in the package, and
lbproxy runs them (`lbproxy --version` says which build runs). `LBPROXY_PURE=1` skips the compiler.

`python setup.py build_ext --inplace` (`make build`) compiles in the source tree, for a developer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _build_module() -> ModuleType:
    """lbproxy/build.py, loaded by itself: standard library only, and without lbproxy/__init__.py
    (which would check the compiled modules this build is about to replace)."""
    spec = importlib.util.spec_from_file_location("lbproxy_build", Path(__file__).resolve().parent / "lbproxy/build.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _build_module()


def _warn(message: str) -> None:
    print(f"\nWARNING: lbproxy: {message}; lbproxy is installed as pure Python\n", file=sys.stderr)


def _extensions() -> list[Extension]:
    if os.environ.get(build.PURE_VARIABLE, "") not in ("", "0"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as error:
        _warn(f"mypyc is not available ({error})")
        return []
    try:
        paths = [f"lbproxy/{module}.py" for module in build.COMPILED]
        return list(
            mypycify(paths, opt_level="3", debug_level="0", group_name="lbproxy.compiled")
        )  # its shared library inside the package
    except BaseException as error:  # mypyc reports a type error by SystemExit
        _warn(f"mypyc could not compile the hot path ({error!r})")
        return []


class OptionalBuild(build_ext):
    """Builds every extension, or none: a failure leaves no extension behind (a half-compiled package
    would mix old and new code), only a warning."""

    def run(self) -> None:
        if not self.extensions:
            return
        record = Path(self.get_ext_fullpath("lbproxy.http_proxy")).parent / build.RECORD.name
        try:
            super().run()
        except Exception as error:  # the C compiler missing or failing, in any of its forms
            for extension in self.extensions:
                Path(self.get_ext_fullpath(extension.name)).unlink(missing_ok=True)
            self.extensions = []
            self.distribution.ext_modules = []
            _warn(f"the C build of the compiled modules failed ({error})")
            # pip shows a build's output only when it fails: lbproxy says it at every start instead
            short = str(error) if len(str(error)) < 200 else str(error)[:200] + "..."
            record.write_text(json.dumps({"failed": f"the C build failed: {short}"}) + "\n")
            return
        sources = {module: build.source_hash(module) for module in build.COMPILED}
        record.write_text(json.dumps({"mypyc": _mypy_version(), "sources": sources}, indent=1) + "\n")

    def get_outputs(self) -> list[str]:
        outputs: list[str] = super().get_outputs()
        record = Path(self.get_ext_fullpath("lbproxy.http_proxy")).parent / build.RECORD.name
        if record.exists():
            outputs.append(str(record))
        return outputs


def _mypy_version() -> str:
    try:
        from mypy.version import __version__
    except ImportError:
        return "unknown"
    return str(__version__)


options: dict[str, Any] = {"ext_modules": _extensions(), "cmdclass": {"build_ext": OptionalBuild}}
setup(**options)
