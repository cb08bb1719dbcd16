"""The in-process transport: bounded queues between stages, a pool of workers per
stage, and one runner that owns delivery.

Every case that enters comes out at the sink exactly once: a stage that fails on
a case marks it failed and sends it on, so nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

from unsafechain.streaming.stages import PROMPTS, RECORDS, Stage, run_stage
from unsafechain.v1 import case_pb2

logger = logging.getLogger(__name__)

Sink = Callable[[case_pb2.Case], Awaitable[None]]


class EmbeddedTransport:
    """Runs stages in this process, connected by bounded asyncio queues.

    Args:
        stages: The stages; each consumes one topic.
        concurrency: Workers per stage, i.e. cases in flight in each stage.
        queue_size: Capacity of each queue: a slow stage makes the ones before it
            wait instead of buffering without bound.
    """

    def __init__(self, stages: Sequence[Stage], *, concurrency: int = 4, queue_size: int = 16):
        self._stages = list(stages)
        self._concurrency = concurrency
        self._queue_size = queue_size

    async def run(self, cases: Iterable[case_pb2.Case], sink: Sink) -> int:
        """Push ``cases`` through the stages into ``sink``; return how many arrived."""
        topics = {stage.consumes for stage in self._stages} | {RECORDS}
        queues: dict[str, asyncio.Queue[case_pb2.Case]] = {
            topic: asyncio.Queue(maxsize=self._queue_size) for topic in topics
        }
        pending = 0
        delivered = 0
        fed = asyncio.Event()
        finished = asyncio.Event()

        async def work(stage: Stage) -> None:
            queue = queues[stage.consumes]
            while True:
                case = await queue.get()
                for topic, output in await run_stage(stage, case):
                    await queues[topic].put(output)
                queue.task_done()

        async def drain() -> None:
            nonlocal pending, delivered
            while True:
                case = await queues[RECORDS].get()
                await sink(case)
                pending -= 1
                delivered += 1
                if fed.is_set() and pending == 0:
                    finished.set()

        async def feed() -> None:
            nonlocal pending
            for case in cases:
                pending += 1
                await queues[PROMPTS].put(case)
            fed.set()
            if pending == 0:
                finished.set()

        workers = [
            asyncio.create_task(work(stage), name=f"{stage.name}-{i}")
            for stage in self._stages
            for i in range(self._concurrency)
        ]
        workers.append(asyncio.create_task(drain(), name="sink"))
        feeder = asyncio.create_task(feed(), name="feed")
        waiter = asyncio.create_task(finished.wait(), name="finished")
        watched = {waiter, feeder, *workers}
        try:
            while not waiter.done():
                done, watched = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    error = task.exception() if task is not waiter else None
                    if error is not None:
                        raise error
        finally:
            for task in [waiter, feeder, *workers]:
                task.cancel()
            await asyncio.gather(waiter, feeder, *workers, return_exceptions=True)
        return delivered
