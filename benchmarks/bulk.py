"""L4 bulk: bytes through one TCP connection, a source server and the receiving client.

    python benchmarks/bulk.py serve PORT

The source listens on 127.0.0.1:PORT and serves one connection at a time: it reads one line holding
a byte count, sends that many bytes (from one 1 MiB buffer, so that the source costs little) and
closes. A connection that closes without asking (a readiness probe) gets nothing. `receive()` is the
client: it asks through a proxy, reads to the end into one buffer and returns the seconds it took.
Standard library only.
"""

from __future__ import annotations

import socket
import sys
import time

CHUNK = 1024 * 1024
MAX_CONNECTIONS = 100_000  # the source's accept loop is bounded; the benchmark stops it long before


def serve(port: int) -> None:
    payload = memoryview(bytes(CHUNK))
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        for _ in range(MAX_CONNECTIONS):
            connection, _ = listener.accept()
            with connection:
                try:
                    request = connection.makefile("rb").readline(32)
                    if not request.strip().isdigit():
                        continue
                    left = int(request)
                    while left > 0:
                        sent = connection.send(payload[: min(left, CHUNK)])
                        left -= sent
                    connection.shutdown(socket.SHUT_WR)
                except OSError:
                    continue


def receive(port: int, size: int, timeout: float = 120.0) -> float:
    """Ask the source behind 127.0.0.1:`port` for `size` bytes; the seconds until the last one arrived."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    got = 0
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(b"%d\n" % size)
        for _ in range(size // 4096 + 1_000_000):  # bounded: at least 4 KiB per read, far more in practice
            count = connection.recv_into(view)
            if not count:
                break
            got += count
    elapsed = time.perf_counter() - start
    if got != size:
        raise RuntimeError(f"bulk through port {port}: got {got} bytes of {size}")
    return elapsed


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        raise SystemExit(__doc__)
    serve(int(sys.argv[2]))
