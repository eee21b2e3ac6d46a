"""Which build runs (issue #19, lbproxy/build.py): compiled with mypyc, or pure Python, and saying so.

`make test` runs this suite on both builds. Here: `--version` and `lbproxy_build_info` say the build
that runs; `LBPROXY_PURE=1` runs the source; a module edited after the build makes lbproxy run pure
Python with a warning rather than older compiled code; a C compiler that fails leaves an install that
runs pure Python and says why at every start. The last two work on a copy of the package in a temp
folder, run by a fresh interpreter, never on the tree under test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lbproxy
from lbproxy import build, metrics
from tests.support import Backend, admin_farm, running

ROOT = Path(__file__).resolve().parent.parent
COMPILED_HERE = build.RECORD.exists() and bool(list(build.PACKAGE.glob(f"{build.COMPILED[0]}.*.so")))


def python(code: str, path: Path | None = None, pure: bool = False, **environ: str) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter, lbproxy imported from `path` (default: the tree under test)."""
    env = {key: value for key, value in os.environ.items() if key != build.PURE_VARIABLE}
    env.update(environ)
    if pure:
        env[build.PURE_VARIABLE] = "1"
    if path is not None:
        env["PYTHONPATH"] = str(path)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=path or ROOT, timeout=120
    )


RUNNING = "import lbproxy.http_proxy as h, lbproxy.build as b; print(b.RUNNING, h.__file__.endswith('.py'))"


async def test_version_and_metrics_say_which_build_runs(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lbproxy", "--version", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    assert out.decode().strip() == f"lbproxy {lbproxy.__version__} ({build.described()})"
    async with Backend("a") as a, Backend("b") as b, running(admin_farm(), tmp_path, a=a.address, b=b.address) as lb:
        families = {family.name: family for family in metrics.families(metrics.read(lb))}
        [sample] = families["lbproxy_build_info"].samples
        assert sample.labels == {"version": lbproxy.__version__, "build": build.RUNNING}
        assert sample.value == 1


def test_lbproxy_pure_runs_the_source() -> None:
    done = python(RUNNING, pure=True)
    assert done.stdout.split() == ["pure", "True"], done.stderr
    done = python("import lbproxy, lbproxy.cli as c; c.main(['--version'])", pure=True)
    assert done.stdout.strip() == f"lbproxy {lbproxy.__version__} (pure Python)"


@pytest.mark.skipif(not COMPILED_HERE, reason="no compiled build in this tree (make build)")
def test_the_compiled_build_runs_when_it_matches_its_source_and_not_when_it_does_not(tmp_path: Path) -> None:
    copy = tmp_path / "lbproxy"
    shutil.copytree(build.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    done = python(RUNNING, tmp_path)
    assert done.stdout.split() == ["mypyc", "False"], done.stderr
    assert done.stderr == ""
    with (copy / "framing.py").open("a") as source:
        source.write("# edited after the build\n")
    done = python(RUNNING, tmp_path)
    assert done.stdout.split() == ["pure", "True"]  # every compiled module from its source, not just framing
    assert (
        "RuntimeWarning: lbproxy runs as pure Python: framing.py changed since the compiled build; "
        "`make build` (or `pip install .`) compiles it again"
    ) in done.stderr


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc: nothing to make fail")
def test_a_failed_c_build_installs_pure_python_that_says_why(tmp_path: Path) -> None:
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(
        build.PACKAGE, tmp_path / "lbproxy", ignore=shutil.ignore_patterns("__pycache__", "*.so", build.RECORD.name)
    )
    env = {key: value for key, value in os.environ.items() if key != build.PURE_VARIABLE}
    done = subprocess.run(
        [sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "CC": "false"},  # a C compiler that fails, whatever it is given
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]  # the build goes on...
    assert "WARNING: lbproxy: the C build of the compiled modules failed" in done.stderr  # ...and says so
    assert not list((tmp_path / "lbproxy").glob("*.so"))  # nothing half built is left
    done = python(RUNNING, tmp_path)
    assert done.stdout.split() == ["pure", "True"], done.stderr
    assert "RuntimeWarning: lbproxy runs as pure Python: the install could not compile its hot path" in done.stderr
