"""Conversions between the engines' domain types and the protobuf contracts.

The one place that knows both sides: the build's stages and the gRPC servicers
both call these.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from unsafechain.domain.reasoning import ReasoningSplit, split_reasoning
from unsafechain.domain.types import (
    Attempt,
    CompletionJudgment,
    CorrectionOutcome,
    CorrectorInfo,
    JudgeIdentity,
    JudgeTarget,
    Message,
    ModelRef,
    RefusalCheck,
    RefusalCheckMode,
    RefusalClass,
    RequestClass,
    RequestReading,
    Role,
    SampledCompletion,
    SamplingParams,
    Verdict,
    VerdictLabel,
)
from unsafechain.v1 import case_pb2, correction_pb2, generation_pb2, judge_pb2

LABEL_TO_PB = {
    VerdictLabel.SAFE: case_pb2.VERDICT_LABEL_SAFE,
    VerdictLabel.UNSAFE: case_pb2.VERDICT_LABEL_UNSAFE,
    VerdictLabel.ERROR: case_pb2.VERDICT_LABEL_ERROR,
}
LABEL_FROM_PB = {value: key for key, value in LABEL_TO_PB.items()}

REFUSAL_TO_PB = {
    RefusalClass.FULL_COMPLIANCE: case_pb2.REFUSAL_CLASS_FULL_COMPLIANCE,
    RefusalClass.FULL_REFUSAL: case_pb2.REFUSAL_CLASS_FULL_REFUSAL,
    RefusalClass.PARTIAL_REFUSAL: case_pb2.REFUSAL_CLASS_PARTIAL_REFUSAL,
}
REFUSAL_FROM_PB = {value: key for key, value in REFUSAL_TO_PB.items()}

REQUEST_TO_PB = {
    RequestClass.BENIGN: case_pb2.REQUEST_CLASS_BENIGN,
    RequestClass.HARMFUL: case_pb2.REQUEST_CLASS_HARMFUL,
}
REQUEST_FROM_PB = {value: key for key, value in REQUEST_TO_PB.items()}

REFUSAL_CHECK_TO_PB = {
    RefusalCheckMode.OFF: correction_pb2.REFUSAL_CHECK_MODE_OFF,
    RefusalCheckMode.RECORD: correction_pb2.REFUSAL_CHECK_MODE_RECORD,
    RefusalCheckMode.REJECT: correction_pb2.REFUSAL_CHECK_MODE_REJECT,
}
REFUSAL_CHECK_FROM_PB = {value: key for key, value in REFUSAL_CHECK_TO_PB.items()}

TARGET_TO_PB = {
    JudgeTarget.FULL: case_pb2.JUDGE_TARGET_FULL,
    JudgeTarget.REASONING: case_pb2.JUDGE_TARGET_REASONING,
    JudgeTarget.ANSWER: case_pb2.JUDGE_TARGET_ANSWER,
}
TARGET_FROM_PB = {value: key for key, value in TARGET_TO_PB.items()}

ROLE_TO_PB = {
    Role.SYSTEM: generation_pb2.CHAT_ROLE_SYSTEM,
    Role.USER: generation_pb2.CHAT_ROLE_USER,
    Role.ASSISTANT: generation_pb2.CHAT_ROLE_ASSISTANT,
}
ROLE_FROM_PB = {value: key for key, value in ROLE_TO_PB.items()}


def timestamp(when: datetime) -> Timestamp:
    """A protobuf timestamp for ``when``."""
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def datetime_from_pb(stamp: Timestamp) -> datetime:
    """A timezone-aware UTC datetime from a protobuf timestamp."""
    return stamp.ToDatetime(tzinfo=UTC)


def model_ref_to_pb(ref: ModelRef | None) -> case_pb2.ModelRef:
    """A model reference as protobuf."""
    if ref is None:
        return case_pb2.ModelRef()
    return case_pb2.ModelRef(
        backend=ref.backend, model=ref.model, endpoint=ref.endpoint, adapter=ref.adapter
    )


def model_ref_from_pb(message: case_pb2.ModelRef) -> ModelRef | None:
    """A model reference from protobuf; None when unset."""
    if not message.backend and not message.model:
        return None
    return ModelRef(message.backend, message.model, message.endpoint, message.adapter)


def identity_to_pb(identity: JudgeIdentity) -> case_pb2.JudgeIdentity:
    """A judge identity as protobuf."""
    return case_pb2.JudgeIdentity(
        name=identity.name, kind=identity.kind, model=model_ref_to_pb(identity.model)
    )


def identity_from_pb(message: case_pb2.JudgeIdentity) -> JudgeIdentity:
    """A judge identity from protobuf."""
    return JudgeIdentity(message.name, message.kind, model_ref_from_pb(message.model))


def verdict_to_pb(verdict: Verdict) -> case_pb2.Verdict:
    """A verdict as protobuf."""
    message = case_pb2.Verdict(
        judge=identity_to_pb(verdict.judge),
        target=TARGET_TO_PB[verdict.target],
        label=LABEL_TO_PB[verdict.label],
        categories=verdict.categories,
        raw_output=verdict.raw_output,
        error=verdict.error,
    )
    if verdict.refusal is not None:
        message.refusal = REFUSAL_TO_PB[verdict.refusal]
    if verdict.score is not None:
        message.score = verdict.score
    return message


def verdict_from_pb(message: case_pb2.Verdict) -> Verdict:
    """A verdict from protobuf.

    Raises:
        ValueError: The label or target is unspecified.
    """
    if message.label not in LABEL_FROM_PB:
        raise ValueError("verdict.label is unspecified")
    if message.target not in TARGET_FROM_PB:
        raise ValueError("verdict.target is unspecified")
    return Verdict(
        judge=identity_from_pb(message.judge),
        target=TARGET_FROM_PB[message.target],
        label=LABEL_FROM_PB[message.label],
        categories=tuple(message.categories),
        score=message.score if message.HasField("score") else None,
        raw_output=message.raw_output,
        error=message.error,
        refusal=REFUSAL_FROM_PB.get(message.refusal),
    )


def sampling_to_pb(params: SamplingParams) -> case_pb2.SamplingParams:
    """Sampling settings as protobuf."""
    message = case_pb2.SamplingParams(
        num_samples=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        max_new_tokens=params.max_new_tokens,
        top_logprobs=params.top_logprobs,
        stop=params.stop,
    )
    if params.seed is not None:
        message.seed = params.seed
    return message


def sampling_from_pb(message: case_pb2.SamplingParams) -> SamplingParams:
    """Sampling settings from protobuf.

    Raises:
        ValueError: A setting is out of range; the message names it.
    """
    return SamplingParams(
        n=message.num_samples,
        temperature=message.temperature,
        top_p=message.top_p,
        top_k=message.top_k,
        max_new_tokens=message.max_new_tokens,
        seed=message.seed if message.HasField("seed") else None,
        top_logprobs=message.top_logprobs,
        stop=tuple(message.stop),
    )


def completion_to_pb(completion: SampledCompletion) -> case_pb2.Completion:
    """A completion, split at its think tags, as protobuf (verdicts not yet set)."""
    split = completion.split
    return case_pb2.Completion(
        index=completion.index,
        text=completion.text,
        reasoning=split.reasoning,
        answer=split.answer,
        has_think_open=split.has_open,
        has_think_close=split.has_close,
        finish_reason=completion.finish_reason,
        think_opened_by_prompt=split.opened_by_prompt,
        truncated=completion.truncated,
    )


def sampled_completion_from_pb(message: case_pb2.Completion) -> SampledCompletion:
    """A sampled completion from protobuf, its split as the sender made it."""
    split = ReasoningSplit(
        message.reasoning,
        message.answer,
        message.has_think_open,
        message.has_think_close,
        message.think_opened_by_prompt,
    )
    return SampledCompletion(message.index, message.text, split, message.finish_reason)


def message_to_pb(message: Message) -> generation_pb2.ChatMessage:
    """A chat message as protobuf."""
    return generation_pb2.ChatMessage(role=ROLE_TO_PB[message.role], content=message.content)


def message_from_pb(message: generation_pb2.ChatMessage) -> Message:
    """A chat message from protobuf.

    Raises:
        ValueError: The role is unspecified.
    """
    if message.role not in ROLE_FROM_PB:
        raise ValueError("role is unspecified")
    return Message(ROLE_FROM_PB[message.role], message.content)


def judgment_to_pb(judgment: CompletionJudgment) -> judge_pb2.JudgeResponse:
    """A completion's judgment as the judge service answers it."""
    return judge_pb2.JudgeResponse(
        verdicts=[verdict_to_pb(verdict) for verdict in judgment.verdicts],
        label=LABEL_TO_PB[judgment.label],
    )


def judgment_from_pb(message: judge_pb2.JudgeResponse) -> CompletionJudgment:
    """A completion's judgment from the judge service's answer.

    Raises:
        ValueError: A label or target is unspecified.
    """
    if message.label not in LABEL_FROM_PB:
        raise ValueError("label is unspecified")
    verdicts = tuple(verdict_from_pb(verdict) for verdict in message.verdicts)
    return CompletionJudgment(verdicts, LABEL_FROM_PB[message.label])


def refusal_check_to_pb(check: RefusalCheck) -> case_pb2.RefusalCheck:
    """A refusal judge's second look at an attempt as protobuf."""
    message = case_pb2.RefusalCheck(verdict=verdict_to_pb(check.verdict))
    if check.request is not None:
        message.request_asked = True
        message.request_raw_output = check.request.raw_output
        message.request_error = check.request.error
        if check.request.request is not None:
            message.request = REQUEST_TO_PB[check.request.request]
    return message


def refusal_check_from_pb(message: case_pb2.RefusalCheck) -> RefusalCheck:
    """A refusal judge's second look at an attempt from protobuf.

    Raises:
        ValueError: The verdict's label or target is unspecified.
    """
    request = None
    if message.request_asked:
        request = RequestReading(
            REQUEST_FROM_PB.get(message.request),
            message.request_raw_output,
            message.request_error,
        )
    return RefusalCheck(verdict_from_pb(message.verdict), request)


def attempt_to_pb(attempt: Attempt) -> case_pb2.CorrectionAttempt:
    """One correction attempt as protobuf."""
    message = case_pb2.CorrectionAttempt(
        attempt=attempt.number,
        text=attempt.text,
        reasoning=attempt.split.reasoning,
        answer=attempt.split.answer,
        verdicts=[verdict_to_pb(verdict) for verdict in attempt.verdicts],
        label=LABEL_TO_PB[attempt.label],
        failure_reason=attempt.failure_reason,
        finished_at=timestamp(attempt.finished_at),
    )
    if attempt.refusal_check is not None:
        message.refusal_check.CopyFrom(refusal_check_to_pb(attempt.refusal_check))
    return message


def attempt_from_pb(message: case_pb2.CorrectionAttempt) -> Attempt:
    """One correction attempt from protobuf.

    The engine splits every attempt's text with :func:`split_reasoning`, so splitting
    it again gives the same split, think-tag flags included.

    Raises:
        ValueError: A label or target is unspecified.
    """
    if message.label not in LABEL_FROM_PB:
        raise ValueError(f"attempt {message.attempt}: label is unspecified")
    return Attempt(
        number=message.attempt,
        text=message.text,
        split=split_reasoning(message.text),
        verdicts=tuple(verdict_from_pb(verdict) for verdict in message.verdicts),
        label=LABEL_FROM_PB[message.label],
        failure_reason=message.failure_reason,
        finished_at=datetime_from_pb(message.finished_at),
        refusal_check=(
            refusal_check_from_pb(message.refusal_check)
            if message.HasField("refusal_check")
            else None
        ),
    )


def correction_to_pb(
    outcome: CorrectionOutcome, completion_index: int, corrector: ModelRef | None
) -> case_pb2.Correction:
    """The correction of completion ``completion_index`` as protobuf."""
    return case_pb2.Correction(
        completion_index=completion_index,
        attempts=[attempt_to_pb(attempt) for attempt in outcome.attempts],
        passed=outcome.passed is not None,
        failure_reason=outcome.failure_reason,
        corrector=model_ref_to_pb(corrector),
    )


def correction_from_pb(message: case_pb2.Correction) -> CorrectionOutcome:
    """A correction outcome from protobuf; ``passed`` and ``failure_reason`` follow from
    the attempts.

    Raises:
        ValueError: A label or target is unspecified.
    """
    return CorrectionOutcome(tuple(attempt_from_pb(attempt) for attempt in message.attempts))


def unsafe_categories(completion: case_pb2.Completion) -> list[str]:
    """The category codes of a completion's unsafe verdicts, first seen first."""
    return list(
        dict.fromkeys(
            code
            for verdict in completion.verdicts
            if verdict.label == case_pb2.VERDICT_LABEL_UNSAFE
            for code in verdict.categories
        )
    )


def corrector_info_to_pb(info: CorrectorInfo) -> correction_pb2.CorrectionInfoResponse:
    """What a correction service runs, as its Info RPC answers."""
    message = correction_pb2.CorrectionInfoResponse(
        corrector=model_ref_to_pb(info.model),
        sampling=sampling_to_pb(info.params),
        max_attempts=info.max_attempts,
        judges=[identity_to_pb(identity) for identity in info.judges],
        refusal_check=REFUSAL_CHECK_TO_PB[info.refusal_check],
    )
    if info.refusal_judge is not None:
        message.refusal_judge.CopyFrom(identity_to_pb(info.refusal_judge))
    return message


def corrector_info_from_pb(message: correction_pb2.CorrectionInfoResponse) -> CorrectorInfo:
    """What a correction service runs, from its Info answer.

    Raises:
        ValueError: The answer names no corrector.
    """
    model = model_ref_from_pb(message.corrector)
    if model is None:
        raise ValueError("corrector is unset")
    return CorrectorInfo(
        model,
        sampling_from_pb(message.sampling),
        message.max_attempts,
        tuple(identity_from_pb(identity) for identity in message.judges),
        # A service older than the refusal check reports none: it takes none.
        REFUSAL_CHECK_FROM_PB.get(message.refusal_check, RefusalCheckMode.OFF),
        identity_from_pb(message.refusal_judge) if message.HasField("refusal_judge") else None,
    )
