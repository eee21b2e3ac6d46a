"""`lbproxy ctl` as an operator types it, and the help of the `lbproxy` command that lists it.

Each test runs `python -m lbproxy` as a subprocess, against a real lbproxy on 127.0.0.1 where it talks
to one: where `--admin` may go, what `--help` says, and which modules a `ctl` call loads (start-up
time is a matter of modules, not of a timed assertion: benchmarks are kept out of tests/).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

from lbproxy.pool import AdminState
from tests.support import Backend, admin_farm, free_port, running

CONFIG = admin_farm(admin="  token: {token}\n")

# Modules that make `import lbproxy.cli` slow (about 0.3 s together): `ctl` must load none of them.
HEAVY = ("asyncio", "uvloop", "aiohttp", "yaml", "httptools", "prometheus_client", "lbproxy.config", "lbproxy.runtime")


async def lbproxy(*args: str, env: dict[str, str] | None = None, python: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """`python PYTHON -m lbproxy ARGS` with no $LBPROXY_* but those of `env`: exit code, stdout, stderr."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("LBPROXY_")}
    environment["COLUMNS"] = "200"  # argparse wraps help at the terminal's width
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *python,
        "-m",
        "lbproxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**environment, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


async def test_admin_before_or_after_the_command(tmp_path: Path) -> None:
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, token="''") as lb,
    ):
        base = f"http://127.0.0.1:{lb.bound['admin'].port}"
        server_b = lb.pools["farm"].by_name["b"]
        code, out, err = await lbproxy("ctl", "--admin", base, "drain", "farm", "b")
        assert (code, out, err) == (0, "farm/b: draining, up, 0 in flight\n", "")
        code, out, err = await lbproxy("ctl", "enable", "farm", "b", "--admin", base)
        assert (code, out, err) == (0, "farm/b: enabled, up, 0 in flight\n", "")
        assert server_b.admin is AdminState.ENABLED
        code, out, _ = await lbproxy("ctl", "status", "--admin", base)
        assert code == 0
        assert [line.split()[:2] for line in out.splitlines()[1:]] == [["farm", "a"], ["farm", "b"]]
        code, out, _ = await lbproxy("ctl", "drain", "--admin", base, "farm", "b")
        assert code == 0
        assert server_b.admin is AdminState.DRAINING

        # Given in both places, the one after the command wins, whichever way round.
        code, out, _ = await lbproxy("ctl", "--admin", closed_url(), "enable", "farm", "b", "--admin", base)
        assert (code, out) == (0, "farm/b: enabled, up, 0 in flight\n")
        closed = closed_url()
        code, _, err = await lbproxy("ctl", "--admin", base, "drain", "farm", "b", "--admin", closed)
        assert code == 2
        assert f"cannot reach the admin server at {closed}" in err
        assert server_b.admin is AdminState.ENABLED

        # $LBPROXY_ADMIN is the default; --admin, before or after, overrides it.
        code, out, _ = await lbproxy("ctl", "drain", "farm", "a", env={"LBPROXY_ADMIN": base})
        assert (code, out) == (0, "farm/a: draining, up, 0 in flight\n")
        code, out, _ = await lbproxy("ctl", "reload", "--admin", base, env={"LBPROXY_ADMIN": closed})
        assert (code, out) == (0, "reloaded\n")


async def test_token_before_or_after_the_command(tmp_path: Path) -> None:
    async with (
        Backend("a") as a,
        Backend("b") as b,
        running(CONFIG, tmp_path, a=a.address, b=b.address, token="s3cret") as lb,
    ):
        base = f"http://127.0.0.1:{lb.bound['admin'].port}"
        code, _, err = await lbproxy("ctl", "--admin", base, "drain", "farm", "a")
        assert code == 1
        assert "401 missing or wrong bearer token" in err
        code, _, _ = await lbproxy("ctl", "--admin", base, "drain", "farm", "a", "--token", "s3cret")
        assert code == 0
        code, _, _ = await lbproxy("ctl", "--token", "s3cret", "enable", "farm", "a", "--admin", base)
        assert code == 0
        code, _, _ = await lbproxy("ctl", "--admin", base, "drain", "farm", "b", env={"LBPROXY_ADMIN_TOKEN": "s3cret"})
        assert code == 0
        code, _, err = await lbproxy(
            "ctl", "drain", "farm", "a", "--token", "wrong", "--admin", base, env={"LBPROXY_ADMIN_TOKEN": "s3cret"}
        )
        assert code == 1
        assert "401" in err
        assert lb.pools["farm"].by_name["a"].admin is AdminState.ENABLED


async def test_ctl_help_names_the_default_admin_and_the_variables() -> None:
    code, out, _ = await lbproxy("ctl", "--help")
    assert code == 0
    assert "--admin URL" in out
    assert "default: http://127.0.0.1:9090; $LBPROXY_ADMIN overrides it" in out
    assert "default: $LBPROXY_ADMIN_TOKEN" in out
    assert "before or after the command" in out
    for command in ("status", "reload", "drain", "disable", "enable"):
        assert re.search(rf"^ +{command} +\S", out, re.MULTILINE), f"{command} is listed without help"
    # With the variable set, the help shows where --admin will go.
    code, out, _ = await lbproxy("ctl", "--help", env={"LBPROXY_ADMIN": "http://10.56.0.11:9090"})
    assert code == 0
    assert "default: $LBPROXY_ADMIN, now http://10.56.0.11:9090" in out
    # Each command's own help has the options too, since they may follow it.
    code, out, _ = await lbproxy("ctl", "drain", "--help")
    assert code == 0
    assert "--admin URL" in out
    assert "--token TOKEN" in out


async def test_ctl_loads_no_heavy_module() -> None:
    """`lbproxy ctl` imports the standard library and lbproxy.ctl: not uvloop, aiohttp, PyYAML, the runtime."""
    code, _, err = await lbproxy("ctl", "--admin", closed_url(), "reload", python=("-X", "importtime"))
    assert code == 2  # the admin server cannot be reached: the whole command ran
    assert "cannot reach the admin server" in err
    loaded = {line.rpartition("|")[2].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert "lbproxy.ctl" in loaded
    assert "lbproxy.cli" in loaded
    assert sorted(name for name in loaded if name in HEAVY or name.split(".")[0] in HEAVY) == []


async def test_help_describes_every_command_it_lists() -> None:
    code, out, _ = await lbproxy("--help")
    assert code == 0
    usage = re.search(r"\{([a-z,-]+)\}", out)
    assert usage is not None
    listed = usage.group(1).split(",")
    assert set(listed) >= {"check", "run", "ctl"}
    for command in listed:
        assert re.search(rf"^ {{4}}{command} +\S", out, re.MULTILINE), f"{command} has no help"
    # `worker` is started by the supervisor of `run --workers N`: not shown, still there.
    assert "worker" not in out
    code, out, _ = await lbproxy("worker", "--help")
    assert code == 0
    assert out.startswith("usage: lbproxy worker")  # its options are the supervisor's business
