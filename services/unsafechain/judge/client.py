"""The judge service's client: a :class:`CompletionJudge` that judges through a judge
service, whatever judges it runs."""

from __future__ import annotations

from collections.abc import Sequence

from unsafechain.domain.convert import TARGET_TO_PB, identity_from_pb, judgment_from_pb
from unsafechain.domain.types import CompletionJudgment, JudgeIdentity, JudgeTarget
from unsafechain.judge.engine import CompletionJudge
from unsafechain.runtime.client import ServiceClient
from unsafechain.runtime.settings import ClientSettings
from unsafechain.v1 import judge_pb2, judge_pb2_grpc

JUDGE_SERVICE = judge_pb2.DESCRIPTOR.services_by_name["JudgeService"].full_name


class RemoteJudgeEngine(ServiceClient, CompletionJudge):
    """Judges through the judge service at ``settings.address``.

    Args:
        settings: How to reach the service.
        targets: Parts to judge when a call names none; empty: the service's default.
    """

    service = JUDGE_SERVICE

    def __init__(self, settings: ClientSettings, targets: Sequence[JudgeTarget] = ()):
        super().__init__(settings)
        self._targets = tuple(targets)
        self._stub = judge_pb2_grpc.JudgeServiceStub(self._connection.channel)
        self._identities: tuple[JudgeIdentity, ...] | None = None

    async def describe(self) -> tuple[JudgeIdentity, ...]:
        """The judges the service reports it runs, in order (asked once)."""
        if self._identities is None:
            answer = await self._connection.call(self._stub.Info, judge_pb2.JudgeInfoRequest())
            self._identities = tuple(identity_from_pb(judge) for judge in answer.judges)
        return self._identities

    async def judge(
        self, prompt: str, response: str, *, targets: Sequence[JudgeTarget] | None = None
    ) -> CompletionJudgment:
        """Judge one response to ``prompt``."""
        answer = await self._connection.call(
            self._stub.Judge, self._request(prompt, response, targets)
        )
        return judgment_from_pb(answer)

    async def judge_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        targets: Sequence[JudgeTarget] | None = None,
    ) -> list[CompletionJudgment]:
        """Judge (prompt, completion) pairs in one call, results in order."""
        if not pairs:
            return []
        request = judge_pb2.JudgeBatchRequest(
            items=[self._request(prompt, response, targets) for prompt, response in pairs]
        )
        answer = await self._connection.call(self._stub.JudgeBatch, request)
        return [judgment_from_pb(result) for result in answer.results]

    def _request(
        self, prompt: str, response: str, targets: Sequence[JudgeTarget] | None
    ) -> judge_pb2.JudgeRequest:
        chosen = targets or self._targets
        return judge_pb2.JudgeRequest(
            prompt=prompt, response=response, targets=[TARGET_TO_PB[t] for t in chosen]
        )
