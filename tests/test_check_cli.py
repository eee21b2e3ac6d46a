"""`lbproxy check` agrees with `lbproxy run`, and both say what is wrong in words a person reads.

The real `lbproxy` command in subprocesses, as an operator types it, on files in tmp_path. Server
names that must not resolve are under `.invalid` (RFC 6761 §6.4); `localhost` is the one that does.
Nothing is sent anywhere but 127.0.0.1: every listener binds port 0 of 127.0.0.1, and the `run`
cases stop before binding.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lbproxy import config
from lbproxy.runtime import Runtime, StartError
from tests.support import Backend, get, port_of

REPO = Path(__file__).resolve().parent.parent
UNRESOLVABLE = "srv.example.invalid"

# Line numbers below refer to this file.
CONFIG = """\
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
pools:
  farm:
    servers:
      - name: a
        address: {address}
"""


def lbproxy(*args: str) -> subprocess.CompletedProcess[str]:
    """`lbproxy ARGS` as installed beside this Python (the venv's console script)."""
    script = Path(sys.executable).with_name("lbproxy")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lbproxy"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60, cwd=REPO, check=False)


def write(directory: Path, text: str, name: str = "lbproxy.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# -- server names -----------------------------------------------------------------------------


def test_check_reports_a_server_name_that_does_not_resolve(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG.format(address=f"{UNRESOLVABLE}:80"))
    result = lbproxy("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    first, summary = result.stderr.splitlines()
    assert first.startswith(f"{path}:9: pools.farm.servers[0].address: cannot resolve '{UNRESOLVABLE}': ")
    assert summary == f"{path}: 1 error"


def test_run_stops_on_the_same_name(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG.format(address=f"{UNRESOLVABLE}:80"))
    result = lbproxy("run", "-c", str(path))
    assert result.returncode == 1
    assert f"pools.farm: server a: cannot resolve '{UNRESOLVABLE}': " in result.stderr
    # and both give the resolver's reason in the same words
    reason = lbproxy("check", "-c", str(path)).stderr.splitlines()[0].rpartition(": ")[2]
    assert result.stderr.rstrip().endswith(f"cannot resolve '{UNRESOLVABLE}': {reason}")


def test_check_no_resolve_skips_the_lookup(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG.format(address=f"{UNRESOLVABLE}:80"))
    result = lbproxy("check", "--no-resolve", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: OK: 1 listener, 1 pool, 1 server\n"


def test_check_passes_a_name_that_resolves(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG.format(address="localhost:80"))
    result = lbproxy("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: OK: 1 listener, 1 pool, 1 server\n"


def test_check_help_lists_no_resolve() -> None:
    result = lbproxy("check", "--help")
    assert result.returncode == 0
    assert "--no-resolve" in result.stdout


async def test_the_runtime_connects_where_resolve_says(tmp_path: Path) -> None:
    """`run` looks names up with `config.resolve`, the function `check` uses: a name reaches its server."""
    if config.resolve(config.Address("localhost", 80)) != "127.0.0.1":
        pytest.skip("localhost resolves to IPv6 first here; the back-end listens on 127.0.0.1")
    async with Backend("a") as backend:
        path = write(tmp_path, CONFIG.format(address=f"localhost:{backend.port}"))
        runtime = Runtime(config.load(path, environ={}))
        await runtime.start()
        try:
            assert runtime.pools["farm"].servers[0].endpoint.host == "127.0.0.1"
            response = await get(port_of(runtime))
        finally:
            await runtime.stop()
    assert response.status == 200
    assert len(backend.requests) == 1


async def test_the_runtime_refuses_a_name_that_does_not_resolve(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG.format(address=f"{UNRESOLVABLE}:80"))
    runtime = Runtime(config.load(path, environ={}))
    with pytest.raises(StartError, match=rf"^pools\.farm: server a: cannot resolve '{UNRESOLVABLE}': "):
        await runtime.start()
    await runtime.stop()


# -- messages a person reads ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_missing_file(tmp_path: Path, command: str) -> None:
    path = tmp_path / "absent.yaml"
    result = lbproxy(command, "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"cannot read {path}: No such file or directory"


def test_a_folder(tmp_path: Path) -> None:
    result = lbproxy("check", "-c", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"cannot read {tmp_path}: Is a directory", f"{tmp_path}: 1 error"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG.format(address="127.0.0.1:80"))
    path.chmod(0)
    result = lbproxy("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"cannot read {path}: Permission denied"


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_port_out_of_range(tmp_path: Path, command: str) -> None:
    path = write(tmp_path, CONFIG.format(address="127.0.0.1:80800"))
    result = lbproxy(command, "-c", str(path))
    assert result.returncode == 1
    assert f"{path}:9: pools.farm.servers[0].address: port 80800 is out of range 1-65535" in result.stderr


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_yaml_indentation_error(tmp_path: Path, command: str) -> None:
    path = write(tmp_path, CONFIG.format(address="127.0.0.1:80") + "       ratio: 2\n")
    result = lbproxy(command, "-c", str(path))
    assert result.returncode == 1
    message = f"{path}:10: invalid YAML: the indentation of this line does not match the lines above it"
    assert result.stderr.splitlines()[0] == message


def test_a_key_at_the_wrong_level(tmp_path: Path) -> None:
    text = CONFIG.format(address="127.0.0.1:80").replace("    pool: farm\n", "    pool: farm\n    retries: 3\n")
    path = write(tmp_path, text)
    result = lbproxy("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}:5: listeners[0].retries: unknown key 'retries' here; it belongs under pools.<name>",
        f"{path}: 1 error",
    ]
