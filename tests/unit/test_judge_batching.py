import asyncio

from unsafechain.domain.types import CompletionJudgment, VerdictLabel
from unsafechain.judge.batching import JudgeBatcher
from unsafechain.judge.engine import CompletionJudge


class _GatedEngine(CompletionJudge):
    """Records each call's pairs and when it began; a call ends when its gate opens."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, list[tuple[str, str]]]] = []
        self.gates: list[asyncio.Event] = []

    async def describe(self):
        return ()

    async def judge_pairs(self, pairs, *, targets=None):
        gate = asyncio.Event()
        self.calls.append((asyncio.get_running_loop().time(), list(pairs)))
        self.gates.append(gate)
        await gate.wait()
        return [CompletionJudgment((), VerdictLabel.SAFE) for _ in pairs]


async def _until(condition, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


def test_an_idle_batcher_waits_max_wait_for_more_pairs_before_calling_the_engine():
    async def scenario():
        engine = _GatedEngine()
        batcher = JudgeBatcher(engine, max_size=8, max_wait=0.2)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.create_task(batcher.judge([("p1", "r1")]))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher.judge([("p2", "r2")]))
        await _until(lambda: engine.calls)
        engine.gates[0].set()
        await asyncio.gather(first, second)
        await batcher.aclose()
        return started, engine.calls

    started, calls = asyncio.run(scenario())
    [(called_at, pairs)] = calls
    assert pairs == [("p1", "r1"), ("p2", "r2")]
    assert called_at - started >= 0.19
