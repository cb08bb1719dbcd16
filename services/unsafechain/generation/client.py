"""The generation service's client: a :class:`Generator` whose model is a generation
service.

Seeds travel with the requests, so a seeded remote call returns what the engine in
process returns.
"""

from __future__ import annotations

from unsafechain.backends.base import BackendError
from unsafechain.domain.convert import message_to_pb, model_ref_from_pb, sampling_to_pb
from unsafechain.domain.types import Generation, GenerationRequest, ModelRef, SamplingParams
from unsafechain.generation.engine import Generator
from unsafechain.runtime.client import ServiceClient
from unsafechain.runtime.settings import ClientSettings
from unsafechain.v1 import generation_pb2, generation_pb2_grpc

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


class RemoteGenerationEngine(ServiceClient, Generator):
    """Samples through the generation service at ``settings.address``.

    Args:
        settings: How to reach the service.
        params: Sampling settings, sent with every request (``n`` is K); a client that
            only asks what the service runs needs none.
        system_prompt: Optional system turn placed before the prompt.
    """

    service = GENERATION_SERVICE

    def __init__(
        self,
        settings: ClientSettings,
        params: SamplingParams | None = None,
        *,
        system_prompt: str = "",
        prompt_opens_think: bool | None = None,
    ):
        ServiceClient.__init__(self, settings)
        Generator.__init__(
            self,
            params or SamplingParams(),
            system_prompt=system_prompt,
            prompt_opens_think=prompt_opens_think,
        )
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._connection.channel)
        self._model: ModelRef | None = None

    async def sample(self, request: GenerationRequest) -> list[Generation]:
        """Sample through the service; conversations only (the service renders them
        with the model's chat template).

        Raises:
            BackendError: The request is a rendered prompt, or the call failed.
        """
        if request.messages is None:
            raise BackendError("the generation service takes conversations, not rendered prompts")
        answer = await self._connection.call(
            self._stub.Generate,
            generation_pb2.GenerateRequest(
                messages=[message_to_pb(message) for message in request.messages],
                sampling=sampling_to_pb(request.params),
            ),
        )
        # The service split each text knowing its rendered prompt: the split here
        # follows it.
        return [
            Generation(
                text=completion.text,
                finish_reason=completion.finish_reason or None,
                prompt_opens_think=completion.think_opened_by_prompt,
            )
            for completion in answer.completions
        ]

    async def describe(self) -> ModelRef:
        """The model the service reports it runs (asked once).

        Raises:
            BackendError: The call failed, or the service names no model.
        """
        if self._model is None:
            answer = await self._connection.call(
                self._stub.Info, generation_pb2.GenerationInfoRequest()
            )
            model = model_ref_from_pb(answer.model)
            if model is None:
                raise BackendError(f"{self._connection}: Info names no model")
            self._model = model
        return self._model
