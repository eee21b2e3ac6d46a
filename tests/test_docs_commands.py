"""The samples of output in docs/operations.md are what the commands print: run them and compare.

The format, kept light so that the page still reads as documentation:

- A sample is a fenced block whose language is `console` (GitHub shows it as a shell session). Its
  lines that start with `$ ` are commands (a line ending with a backslash goes on on the next one);
  the lines after a command, up to the next command or the end of the block, are what it prints
  (standard output, then standard error). Blocks may be indented, as in a numbered list.
- Every `console` block is run, in the order of the page, against one lbproxy this test starts on
  127.0.0.1: only put commands there that can run against it (`lbproxy ctl ...`, `lbproxy check -c
  ...`, `curl` to the admin server). Commands that need a real farm (systemctl, docker, keepalived)
  go in `sh` blocks, which are not run; an `sh` block shows no output.
- The farm is the page's: pool `farm` with srvappout1 to srvappout4 (backup pool `dr-site`) and pool
  `dr-site` with srvdrout1 and srvdrout2, with an HTTP probe of /ServiceCenter/ that every back-end
  answers 200, except srvappout3, which refuses connections (so it is down, `FAIL connection
  refused`), and srvappout2, drained before the first command runs. Commands change it as they go
  (a `drain` sample drains), so a sample shows the farm as the samples before it left it.
- A command runs in `sh` with `lbproxy` on PATH, `$LBPROXY_ADMIN` and `$LBPROXY_ADMIN_TOKEN` set for
  this lbproxy, `http://127.0.0.1:9090` replaced by its admin address and the example config's
  installed path `/etc/lbproxy/lbproxy.yaml` by config/lbproxy.yaml (and both the other way in
  what it prints).

The comparison is of shape, not of figures: the same number of lines; in each line the same cells
(columns are two spaces or more apart), each cell the same text once every number is replaced by N
and every time (`-`, `12s ago`, `3m 05s ago`) by T. So a missing column, a renamed state or a new
word fails; a different request count or age does not.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lbproxy.runtime import Runtime
from tests.support import Backend, eventually, free_port, running

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"
DOC_ADMIN = "http://127.0.0.1:9090"
DOC_PATHS = {"/etc/lbproxy/lbproxy.yaml": ROOT / "config" / "lbproxy.yaml"}
TOKEN = "docs-token"

CONFIG = """
admin:
  bind: 127.0.0.1:0
  token: {token}
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
pools:
  farm:
    backup_pool: dr-site
    health: {{type: http, path: /ServiceCenter/, interval: 100ms, timeout: 1s, rise: 2, fall: 1}}
    passive: {{consecutive_failures: 3}}
    servers:
      - {{name: srvappout1, address: "{srvappout1}"}}
      - {{name: srvappout2, address: "{srvappout2}"}}
      - {{name: srvappout3, address: "{srvappout3}"}}
      - {{name: srvappout4, address: "{srvappout4}", ratio: 2}}
  dr-site:
    health: {{type: http, path: /ServiceCenter/, interval: 100ms}}
    servers:
      - {{name: srvdrout1, address: "{srvdrout1}"}}
      - {{name: srvdrout2, address: "{srvdrout2}"}}
"""


@dataclass
class Sample:
    command: str
    output: list[str]
    line: int  # of the command in the page, for the failure message


def samples(markdown: str) -> list[Sample]:
    """The commands of the page's `console` blocks, each with the output printed under it."""
    found: list[Sample] = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        opening = re.fullmatch(r"( *)```console", lines[index])
        index += 1
        if opening is None:
            continue
        indent, first = len(opening.group(1)), len(found)
        while not lines[index].strip().startswith("```"):
            text = lines[index][indent:]
            if text.startswith("$ "):
                command, start = text[2:], index + 1
                while command.endswith("\\"):
                    index += 1
                    command = command[:-1] + "\n" + lines[index][indent:]
                found.append(Sample(command, [], start))
            else:
                assert len(found) > first, f"operations.md:{index + 1}: output before the block's first `$ ` command"
                found[-1].output.append(text)
            index += 1
        index += 1
    return found


TIME = re.compile(r"-|(?:\d+[smhd] )*\d+[smhd] ago")
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def shape(output: list[str]) -> list[list[str]]:
    """Each line's cells, with numbers as N and times as T (see the module's docstring)."""
    return [
        ["T" if TIME.fullmatch(cell) else NUMBER.sub("N", cell) for cell in re.split(r" {2,}", line.rstrip())]
        for line in output
    ]


def drift(sample: Sample, printed: list[str]) -> str | None:
    """None when `printed` has the shape of the sample; else what differs, to fix the page."""
    expected, got = shape(sample.output), shape(printed)
    if expected == got:
        return None
    different = next(
        (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), min(len(expected), len(got))
    )
    return (
        f"docs/operations.md:{sample.line}: `{sample.command}` prints something else than its sample "
        f"(first difference in line {different + 1}).\n"
        "The sample:\n" + "\n".join(sample.output) + "\nWhat it prints today:\n" + "\n".join(printed)
    )


@pytest.fixture
def documented() -> list[Sample]:
    found = samples(OPERATIONS.read_text())
    assert found, "docs/operations.md has no ```console samples"
    return found


async def run(command: str, admin: str) -> list[str]:
    for doc, real in ((DOC_ADMIN, admin), *DOC_PATHS.items()):
        command = command.replace(doc, str(real))
    environment = {key: value for key, value in os.environ.items() if not key.startswith("LBPROXY_")}
    environment.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}",
        LBPROXY_ADMIN=admin,
        LBPROXY_ADMIN_TOKEN=TOKEN,
        COLUMNS="100",
    )
    process = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    printed = out.decode() + err.decode()
    for doc, real in ((DOC_ADMIN, admin), *DOC_PATHS.items()):
        printed = printed.replace(str(real), doc)
    return printed.splitlines()


async def test_the_samples_of_operations_md_match_what_the_commands_print(
    tmp_path: Path, documented: list[Sample]
) -> None:
    lbproxy = Path(sys.executable).parent / "lbproxy"
    if not lbproxy.exists():
        pytest.skip(f"no `lbproxy` command beside {sys.executable}: pip install -e . first")
    if shutil.which("curl") is None and any("curl" in sample.command for sample in documented):
        pytest.skip("curl is missing: the page's curl samples cannot run")
    names = ("srvappout1", "srvappout2", "srvappout4", "srvdrout1", "srvdrout2")
    backends = {name: Backend(name) for name in names}
    for backend in backends.values():
        await backend.start()
    try:
        addresses = {name: backend.address for name, backend in backends.items()}
        addresses["srvappout3"] = f"127.0.0.1:{free_port()}"  # nothing listens: connection refused
        async with running(CONFIG, tmp_path, token=TOKEN, **addresses) as lb:
            await farm_as_documented(lb)
            admin = f"http://127.0.0.1:{lb.bound['admin'].port}"
            problems = []
            for sample in documented:
                problem = drift(sample, await run(sample.command, admin))
                if problem is not None:
                    problems.append(problem)
            assert not problems, "\n\n".join(problems)
    finally:
        for backend in backends.values():
            await backend.stop()


async def farm_as_documented(lb: Runtime) -> None:
    """srvappout2 drained, srvappout3 down (its probes fail), every other server probed and up."""
    farm, dr = lb.pools["farm"], lb.pools["dr-site"]
    lb.drain(farm.by_name["srvappout2"])
    await eventually(lambda: not farm.by_name["srvappout3"].up, what="srvappout3 down")
    await eventually(
        lambda: all(s.check_ok for s in (*farm.servers, *dr.servers) if s.name != "srvappout3"),
        what="every other server probed",
    )


def test_a_sample_that_drifts_fails(documented: list[Sample]) -> None:
    """The comparison catches what the page once had wrong: `ctl status` without REQ/S and ERR/S."""
    (status,) = (sample for sample in documented if sample.command == "lbproxy ctl status")
    rows = [re.split(r" {2,}", line) for line in status.output]
    rates = (rows[0].index("REQ/S"), rows[0].index("ERR/S"))
    without_rates = ["  ".join(cell for i, cell in enumerate(row) if i not in rates) for row in rows]
    assert drift(status, without_rates) is not None
    assert drift(status, status.output) is None
    other_figures = [
        "   ".join("1h 02m ago" if TIME.fullmatch(cell) else re.sub(r"\d+", "7", cell) for cell in row) for row in rows
    ]
    assert drift(status, other_figures) is None
    renamed = [line.replace("draining", "drained") for line in status.output]
    assert drift(status, renamed) is not None
