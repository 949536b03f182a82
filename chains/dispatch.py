"""Sending model requests one loop turn at a time, so that a burst of messages is pipelined.

When many messages arrive together (a busy server, a raid, a benchmark), each reply's
task prepares its request (LangChain, the openai client) and sends it. On Python 3.11,
aiohttp does not write a request out in the task that sends it: it buffers the headers
and writes them with the body from a new task, which the event loop runs only after
every task already queued. So the first request of a burst of 200 left only once all
200 were prepared, and every answer waited for the whole burst's preparation (about
150-250 ms on 2 cores) on top of the model's own latency. (Python 3.12 and later start
that task eagerly.)

`DispatchGate.turn()` admits one task per loop iteration: the admitted task prepares and
sends its request while the next waits, and aiohttp's writer task runs in between. A
lone message passes straight through.
"""

from __future__ import annotations

import asyncio
from collections import deque


class DispatchGate:
    """Admits model requests one event-loop turn apart, in arrival order."""

    def __init__(self) -> None:
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._open = True

    async def turn(self) -> None:
        """Wait until this task may send its request; it should do so before it next waits."""
        loop = asyncio.get_running_loop()
        if self._open and not self._waiting:
            self._open = False
        else:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    # Admitted and cancelled at once: pass the turn on rather than lose it.
                    loop.call_soon(self._admit_next)
                raise
        # Queued now, so it runs after what this task schedules while it sends (the writer).
        loop.call_soon(self._admit_next)

    def _admit_next(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._open = True
