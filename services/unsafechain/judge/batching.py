"""Micro-batching: concurrent judge requests share model calls.

A model judges a padded batch of pairs in about the time it judges one, so the judge
service does not send each request on its own: requests wait in a queue up to
``max_wait`` for others, and up to ``max_size`` (prompt, response) pairs go to the
engine together. One batch runs at a time; while it runs, the next one gathers, so
under load batches fill up without any waiting at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from unsafechain.domain.types import JudgeTarget
from unsafechain.judge.engine import CompletionJudgment, JudgeEngine

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Pending:
    prompt: str
    response: str
    targets: tuple[JudgeTarget, ...] | None
    # Event-loop time after which nobody waits for the answer; None: no deadline.
    deadline: float | None
    answer: asyncio.Future[CompletionJudgment]


class JudgeBatcher:
    """Gathers concurrent judgments into engine calls of up to ``max_size`` pairs.

    Args:
        engine: Judges each batch.
        max_size: Most pairs in one engine call; 1 judges one by one.
        max_wait: Seconds the first pair of a batch waits for more to arrive.
        observe_batch: Called with the size of every engine call, for metrics.
    """

    def __init__(
        self,
        engine: JudgeEngine,
        *,
        max_size: int = 32,
        max_wait: float = 0.005,
        observe_batch: Callable[[int], None] | None = None,
    ):
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait}")
        self._engine = engine
        self._max_size = max_size
        self._max_wait = max_wait
        self._observe_batch = observe_batch or (lambda size: None)
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    async def judge(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        targets: Sequence[JudgeTarget] | None = None,
        timeout: float | None = None,
    ) -> list[CompletionJudgment]:
        """Judge (prompt, response) pairs, in order, batched with concurrent callers.

        Args:
            pairs: The pairs to judge.
            targets: Parts to judge; None judges the engine's configured ones.
            timeout: Seconds the caller waits; a batch whose callers have all given up
                is cut short.
        """
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="judge-batcher")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        key = tuple(dict.fromkeys(targets)) if targets else None
        answers = []
        for prompt, response in pairs:
            answer: asyncio.Future[CompletionJudgment] = loop.create_future()
            self._queue.put_nowait(_Pending(prompt, response, key, deadline, answer))
            answers.append(answer)
        # Every answer is collected before raising, so no failure goes unretrieved.
        results = await asyncio.gather(*answers, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    async def aclose(self) -> None:
        """Stop the batching task; call after the callers are done."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            closes_at = loop.time() + self._max_wait
            while len(batch) < self._max_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = closes_at - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            await self._dispatch(batch)

    async def _dispatch(self, batch: list[_Pending]) -> None:
        # Callers that gave up (deadline, cancellation) cancelled their futures.
        waiting = [pending for pending in batch if not pending.answer.done()]
        groups: dict[tuple[JudgeTarget, ...] | None, list[_Pending]] = {}
        for pending in waiting:
            groups.setdefault(pending.targets, []).append(pending)
        for targets, group in groups.items():
            self._observe_batch(len(group))
            # The call may run as long as its most patient caller waits.
            deadlines = [pending.deadline for pending in group if pending.deadline is not None]
            timeout = None
            if len(deadlines) == len(group):
                timeout = max(0.0, max(deadlines) - asyncio.get_running_loop().time())
            try:
                async with asyncio.timeout(timeout):
                    judgments = await self._engine.judge_pairs(
                        [(pending.prompt, pending.response) for pending in group], targets=targets
                    )
            except Exception as error:
                for pending in group:
                    if not pending.answer.done():
                        pending.answer.set_exception(error)
                continue
            for pending, judgment in zip(group, judgments, strict=True):
                if not pending.answer.done():
                    pending.answer.set_result(judgment)
