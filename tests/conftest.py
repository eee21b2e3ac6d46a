"""Every async test runs on uvloop, the loop lbproxy runs on in production; no test asks a DNS server.

Tests send traffic to 127.0.0.1 only, and that holds for name lookups too: `RES_OPTIONS=attempts:0`
makes glibc's resolver send no query at all, so a name under `.invalid` (RFC 6761) fails at once
("Temporary failure in name resolution") instead of reaching the machine's DNS server. `localhost`
still resolves, from /etc/hosts. It is set before any lookup of this process, and subprocesses
(`lbproxy check`, `lbproxy run`) inherit it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest
import uvloop
from pytest_asyncio.plugin import LoopFactory

os.environ["RES_OPTIONS"] = "attempts:0"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, LoopFactory]:
    return {"uvloop": uvloop.new_event_loop}
