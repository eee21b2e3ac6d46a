"""lbproxy: a software load balancer for a farm of HTTP and TCP servers, on asyncio and uvloop."""

__version__ = "0.1.0"
