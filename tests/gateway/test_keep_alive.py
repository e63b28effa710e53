"""The gateway's SSE keep-alive: comment frames while the job is silent, no frame lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from worker.gateway.app import KEEP_ALIVE_FRAME, with_keep_alive


async def _collect(frames: AsyncIterator[bytes]) -> list[bytes]:
    return [frame async for frame in frames]


def test_silence_is_filled_with_comments_and_every_frame_arrives_in_order() -> None:
    gate = asyncio.Event()

    async def job_events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        await gate.wait()  # a job waiting in the queue
        yield b"data: 2\n\n"

    async def scenario() -> list[bytes]:
        reader = asyncio.create_task(_collect(with_keep_alive(job_events(), 0.01)))
        await asyncio.sleep(0.1)  # the silence being simulated, not a wait for an event
        gate.set()
        return await asyncio.wait_for(reader, 5)

    out = asyncio.run(scenario())
    data = [f for f in out if f != KEEP_ALIVE_FRAME]
    assert data == [b"data: 1\n\n", b"data: 2\n\n"]
    assert out[0] == b"data: 1\n\n"
    assert out.count(KEEP_ALIVE_FRAME) >= 2
    assert KEEP_ALIVE_FRAME.startswith(b":")  # an SSE comment: every client ignores it


def test_a_busy_stream_gets_no_comments() -> None:
    async def job_events() -> AsyncIterator[bytes]:
        for i in range(50):
            yield f"data: {i}\n\n".encode()

    out = asyncio.run(_collect(with_keep_alive(job_events(), 5.0)))
    assert out == [f"data: {i}\n\n".encode() for i in range(50)]


def test_an_error_in_the_events_reaches_the_reader() -> None:
    async def job_events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise TimeoutError("the job did not end in time")

    async def scenario() -> list[bytes]:
        got = []
        try:
            async for frame in with_keep_alive(job_events(), 5.0):
                got.append(frame)
        except TimeoutError:
            got.append(b"timeout")
        return got

    assert asyncio.run(scenario()) == [b"data: 1\n\n", b"timeout"]
