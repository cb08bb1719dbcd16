"""The correction service's client: a :class:`Corrector` that corrects through a
correction service, which re-judges every attempt with its own judges on the targets
the client sends."""

from __future__ import annotations

from collections.abc import Sequence

from unsafechain.correction.engine import Corrector
from unsafechain.domain.convert import TARGET_TO_PB, correction_from_pb, corrector_info_from_pb
from unsafechain.domain.types import CorrectionOutcome, CorrectorInfo, JudgeTarget
from unsafechain.runtime.client import ServiceClient
from unsafechain.runtime.settings import ClientSettings
from unsafechain.v1 import case_pb2, correction_pb2, correction_pb2_grpc

CORRECTION_SERVICE = correction_pb2.DESCRIPTOR.services_by_name["CorrectionService"].full_name


class RemoteCorrectionEngine(ServiceClient, Corrector):
    """Corrects through the correction service at ``settings.address``.

    Args:
        settings: How to reach the service.
        targets: Parts of every attempt to re-judge when a call names none (the build's
            judge stage's); empty: the service's own.
    """

    service = CORRECTION_SERVICE

    def __init__(self, settings: ClientSettings, targets: Sequence[JudgeTarget] = ()):
        super().__init__(settings)
        self._targets = tuple(targets)
        self._stub = correction_pb2_grpc.CorrectionServiceStub(self._connection.channel)
        self._info: CorrectorInfo | None = None

    async def describe(self) -> CorrectorInfo:
        """What the service reports it runs (asked once).

        Raises:
            BackendError: The call failed.
            ValueError: The answer names no corrector.
        """
        if self._info is None:
            answer = await self._connection.call(
                self._stub.Info, correction_pb2.CorrectionInfoRequest()
            )
            self._info = corrector_info_from_pb(answer)
        return self._info

    async def correct(
        self,
        prompt: str,
        completion: str,
        categories: Sequence[str],
        *,
        seed: int | None = None,
        targets: Sequence[JudgeTarget] | None = None,
    ) -> CorrectionOutcome:
        """Correct one unsafe ``completion`` of ``prompt``; every attempt re-judged."""
        request = correction_pb2.CorrectRequest(
            prompt=prompt,
            completion=case_pb2.Completion(text=completion),
            categories=categories,
            targets=[TARGET_TO_PB[target] for target in targets or self._targets],
        )
        if seed is not None:
            request.seed = seed
        answer = await self._connection.call(self._stub.Correct, request)
        return correction_from_pb(answer.correction)
