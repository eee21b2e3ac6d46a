"""lbproxy: a software load balancer for a farm of HTTP and TCP servers, on asyncio and uvloop."""

from lbproxy import build

__version__ = "0.1.0"

build.choose()  # the compiled hot path, or its source: before any other module of lbproxy is imported
