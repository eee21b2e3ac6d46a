"""Back-pressure between the two legs of a relay, shared by the L4 and L7 proxies.

When one leg's transport says its write buffer is above the high-water mark (`pause_writing`), the
other leg stops reading until it drains (`resume_writing`). Reading on a leg can be paused for
several reasons at once (the peer is slow, a pipelined request waits its turn, a server connection is
being opened); a `ReadGate` resumes only when the last reason is gone. Nothing here buffers data.
"""

from __future__ import annotations

import asyncio
from typing import Final

# uvloop's default low-water mark differs from CPython's: set both on every transport, the same way.
HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024

PEER_BUSY: Final = 1  # the other leg cannot take more data
WAITING: Final = 2  # this leg's next data has nowhere to go yet (pipelining, connecting)


def set_limits(transport: asyncio.WriteTransport) -> None:
    transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)


class ReadGate:
    """Reading from one transport, paused while any reason holds."""

    __slots__ = ("transport", "reasons")

    def __init__(self, transport: asyncio.ReadTransport) -> None:
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons:
            try:
                self.transport.pause_reading()
            except RuntimeError:  # already closing
                pass
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons:
                try:
                    self.transport.resume_reading()
                except RuntimeError:
                    pass
