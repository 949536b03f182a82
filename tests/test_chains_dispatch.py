"""The dispatch gate: a burst of model requests goes out one loop turn apart, in order."""

from __future__ import annotations

import asyncio

from chains.dispatch import DispatchGate


async def _burst(gate: DispatchGate | None, n: int) -> list[str]:
    """n tasks that each "send" a request whose bytes a new task writes, as aiohttp does on 3.11."""
    events: list[str] = []
    writers: list[asyncio.Task[None]] = []

    async def write(i: int) -> None:
        events.append(f"write{i}")

    async def send(i: int) -> None:
        if gate is not None:
            await gate.turn()
        events.append(f"send{i}")
        writers.append(asyncio.get_running_loop().create_task(write(i)))
        await asyncio.sleep(0.01)  # waiting for the response

    await asyncio.gather(*(send(i) for i in range(n)))
    await asyncio.gather(*writers)
    return events


async def test_without_the_gate_every_request_is_prepared_before_any_is_written() -> None:
    events = await _burst(None, 4)
    assert events == ["send0", "send1", "send2", "send3", "write0", "write1", "write2", "write3"]


async def test_the_gate_lets_each_request_out_before_the_next_is_prepared() -> None:
    events = await _burst(DispatchGate(), 4)
    assert events == ["send0", "write0", "send1", "write1", "send2", "write2", "send3", "write3"]


async def test_a_lone_request_passes_straight_through_every_time() -> None:
    gate = DispatchGate()
    for _ in range(3):
        await asyncio.wait_for(gate.turn(), 1)
        await asyncio.sleep(0)  # the next turn is handed out on the next loop iteration


def _three_at_the_gate(gate: DispatchGate, order: list[str]) -> list[asyncio.Task[None]]:
    """Tasks "first", the one to cancel, and "last", in that order at the gate."""

    async def one(name: str) -> None:
        await gate.turn()
        order.append(name)

    return [asyncio.create_task(one(name)) for name in ("first", "cancelled", "last")]


async def test_a_cancelled_waiter_does_not_hold_up_the_rest() -> None:
    order: list[str] = []
    first, doomed, last = _three_at_the_gate(DispatchGate(), order)
    await asyncio.sleep(0)  # all three reach the gate; "first" goes through
    doomed.cancel()
    await asyncio.wait_for(asyncio.gather(first, last), 1)
    assert order == ["first", "last"] and doomed.cancelled()


async def test_a_task_cancelled_just_as_its_turn_comes_passes_the_turn_on() -> None:
    order: list[str] = []
    first, unlucky, last = _three_at_the_gate(DispatchGate(), order)
    await asyncio.sleep(0)  # "first" is through and has queued the next admission
    await asyncio.sleep(0)  # the admission runs: "unlucky" is woken, not yet running
    unlucky.cancel()
    await asyncio.wait_for(asyncio.gather(first, last), 1)
    assert order == ["first", "last"] and unlucky.cancelled()
