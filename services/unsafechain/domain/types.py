"""Domain types shared by the engines. Plain Python: no gRPC, no protobuf."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from unsafechain.domain.reasoning import ReasoningSplit


class Role(enum.StrEnum):
    """The speaker of a chat message."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of a conversation."""

    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        """The message as the ``{"role", "content"}`` mapping chat templates and APIs take."""
        return {"role": self.role.value, "content": self.content}


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling settings for one request.

    Attributes:
        n: Number of completions to sample (K).
        temperature: 0 selects greedy decoding.
        top_p: Nucleus sampling mass.
        top_k: Sample only from the k most likely tokens; 0 is off (every token is a
            candidate, as in SafeChain and STAR-1). Off really is off: the local
            backend overrides transformers' default of 50, and remote backends are
            sent no top-k at all.
        max_new_tokens: Upper bound on generated tokens per completion.
        seed: Seed for reproducible sampling, where the backend supports one.
        top_logprobs: Alternatives to return per generated token; 0 returns no
            log-probabilities at all.
        stop: Strings that end generation.
    """

    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 512
    seed: int | None = None
    top_logprobs: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 is off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (temperature 0)."""
        return self.temperature == 0

    @property
    def sampled_top_k(self) -> int:
        """The top-k a backend applies: ``top_k`` when sampling, 0 (off) when greedy,
        where there is nothing to cut and some servers would start sampling if sent one."""
        return 0 if self.greedy else self.top_k


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A request to a model: a conversation to render with the model's chat template,
    or a prompt already rendered to text. Exactly one of the two is set.

    A rendered prompt is the whole text the model sees, special tokens included as the
    chat template writes them, except where the backend adds a BOS itself
    (:attr:`~unsafechain.backends.base.ModelBackend.adds_bos`)."""

    params: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[Message, ...] | None = None
    prompt: str | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerationRequest needs exactly one of messages or prompt")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token with its log-probability and the most likely alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


TRUNCATED = "length"
"""The finish reason of a generation cut off by its token limit."""


@dataclass(frozen=True, slots=True)
class Generation:
    """One generated completion.

    Attributes:
        text: The generated text.
        finish_reason: Why generation stopped (``stop``, ``length``, ...), as the
            backend said.
        tokens: Per-token log-probabilities, when asked for.
        prompt_opens_think: Whether the rendered prompt ended inside an open think
            section, so the text starts in the reasoning; None when the backend does
            not see the rendered prompt (a server applies the chat template).
    """

    text: str
    finish_reason: str | None = None
    tokens: tuple[TokenLogprob, ...] | None = None
    prompt_opens_think: bool | None = None


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A model as reached by a backend; never carries credentials."""

    backend: str
    model: str
    endpoint: str = ""
    adapter: str = ""


class VerdictLabel(enum.StrEnum):
    """A judge's label. ``ERROR`` means the judge gave no usable answer; it is never
    read as safe."""

    SAFE = "safe"
    UNSAFE = "unsafe"
    ERROR = "error"


class RefusalClass(enum.StrEnum):
    """How a response answers its prompt, in the three classes of XSTest."""

    FULL_COMPLIANCE = "full_compliance"
    FULL_REFUSAL = "full_refusal"
    PARTIAL_REFUSAL = "partial_refusal"


class RequestClass(enum.StrEnum):
    """How a refusal judge reads a request: one a helpful assistant answers fully, or
    one whose answer would do real harm."""

    BENIGN = "benign"
    HARMFUL = "harmful"


class RefusalCheckMode(enum.StrEnum):
    """What the correction stage does with a refusal judge's second look at each
    correction that passed re-judging.

    ``OFF`` takes no second look; ``RECORD`` keeps the refusal class on the attempt
    (and, for a full refusal, how the judge reads the request); ``REJECT`` also fails
    an attempt that fully refuses a request the judge reads as benign, or that the
    judge could not classify, and tells the corrector why.
    """

    OFF = "off"
    RECORD = "record"
    REJECT = "reject"


class JudgeTarget(enum.StrEnum):
    """Which part of a completion is judged."""

    FULL = "full"
    REASONING = "reasoning"
    ANSWER = "answer"


@dataclass(frozen=True, slots=True)
class JudgeIdentity:
    """Who gave a verdict: the configured name, the judge kind and its model."""

    name: str
    kind: str
    model: ModelRef | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """One judge's verdict on one part of one completion.

    Attributes:
        judge: Who judged.
        target: Which part was judged.
        label: Safe, unsafe or error.
        categories: Violated category codes, in the judge's order.
        score: How unsafe, in [0, 1], when the judge measures it: the probability
            of unsafe from log-probabilities, a rubric score or an ensemble's mean.
        raw_output: The judge's output exactly as generated.
        error: Why the label is ``ERROR``; empty otherwise.
        refusal: How the response answered, for refusal judges; None for others.
    """

    judge: JudgeIdentity
    target: JudgeTarget
    label: VerdictLabel
    categories: tuple[str, ...] = ()
    score: float | None = None
    raw_output: str = ""
    error: str = ""
    refusal: RefusalClass | None = None


def combine_labels(verdicts: Sequence[Verdict]) -> VerdictLabel:
    """The label of a completion over several verdicts: unsafe if any says so; else
    error if any errored; else safe. No verdicts at all is an error."""
    labels = {verdict.label for verdict in verdicts}
    if VerdictLabel.UNSAFE in labels:
        return VerdictLabel.UNSAFE
    if VerdictLabel.ERROR in labels or not labels:
        return VerdictLabel.ERROR
    return VerdictLabel.SAFE


@dataclass(frozen=True, slots=True)
class SampledCompletion:
    """One of the K completions.

    Attributes:
        index: Position among the K samples, from 0.
        text: The text exactly as generated.
        split: The text split at its think tags.
        finish_reason: Why generation stopped, as the backend said.
    """

    index: int
    text: str
    split: ReasoningSplit
    finish_reason: str

    @property
    def truncated(self) -> bool:
        """Whether generation was cut off by the token limit: judged as it is, never a
        training row nor a side of a preference pair."""
        return self.finish_reason == TRUNCATED


@dataclass(frozen=True, slots=True)
class CompletionJudgment:
    """Every verdict on one completion and their combined label."""

    verdicts: tuple[Verdict, ...]
    label: VerdictLabel

    @property
    def categories(self) -> tuple[str, ...]:
        """Violated categories over all unsafe verdicts, first seen first."""
        seen: dict[str, None] = {}
        for verdict in self.verdicts:
            if verdict.label == VerdictLabel.UNSAFE:
                seen.update(dict.fromkeys(verdict.categories))
        return tuple(seen)


@dataclass(frozen=True, slots=True)
class RequestReading:
    """How a refusal judge read a request.

    Attributes:
        request: The class; None when the judge gave none (``error`` says why).
        raw_output: The judge's answer exactly as generated.
        error: Why there is no class; empty when there is one.
    """

    request: RequestClass | None
    raw_output: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class RefusalCheck:
    """A refusal judge's second look at a correction attempt that passed re-judging.

    Attributes:
        verdict: The judge's verdict on the attempt; ``verdict.refusal`` is the class,
            None when the judge gave none (``verdict.error`` says why).
        request: How the judge read the prompt; asked only when the attempt is a full
            refusal, None otherwise.
    """

    verdict: Verdict
    request: RequestReading | None = None

    @property
    def refusal(self) -> RefusalClass | None:
        """How the attempt answers its prompt; None when the judge could not say."""
        return self.verdict.refusal

    @property
    def refuses_benign_request(self) -> bool:
        """Whether the attempt fully refuses a request the judge reads as benign."""
        return (
            self.refusal == RefusalClass.FULL_REFUSAL
            and self.request is not None
            and self.request.request == RequestClass.BENIGN
        )

    @property
    def error(self) -> str:
        """Why the check could not decide whether the attempt over-refuses; empty when
        it could."""
        if self.refusal is None:
            return f"refusal class: {self.verdict.error or 'missing'}"
        if self.refusal == RefusalClass.FULL_REFUSAL and (
            self.request is None or self.request.request is None
        ):
            return f"request class: {self.request.error if self.request else 'not asked'}"
        return ""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at a correction.

    Attributes:
        number: 1-based.
        text: The corrector's output as generated (empty when the call failed).
        split: The output split at its think tags.
        verdicts: Verdicts from re-judging the attempt; empty when it was not judged.
        label: The combined re-judged label; ``ERROR`` when not judged.
        failure_reason: Why the attempt did not pass; empty when it passed.
        finished_at: When the attempt ended.
        refusal_check: The refusal judge's second look, taken at attempts that passed
            re-judging when the correction settings ask for one; None otherwise.
    """

    number: int
    text: str
    split: ReasoningSplit
    verdicts: tuple[Verdict, ...]
    label: VerdictLabel
    failure_reason: str
    finished_at: datetime
    refusal_check: RefusalCheck | None = None

    @property
    def passed(self) -> bool:
        """Whether the attempt is well-formed and re-judged safe."""
        return not self.failure_reason


@dataclass(frozen=True, slots=True)
class CorrectionOutcome:
    """Every attempt at one correction, and the one that passed if any."""

    attempts: tuple[Attempt, ...]

    @property
    def passed(self) -> Attempt | None:
        """The attempt that passed, or None."""
        return next((attempt for attempt in self.attempts if attempt.passed), None)

    @property
    def failure_reason(self) -> str:
        """Why no attempt passed; empty when one did."""
        if self.passed or not self.attempts:
            return ""
        return f"no attempt passed in {len(self.attempts)}: {self.attempts[-1].failure_reason}"


@dataclass(frozen=True, slots=True)
class CorrectorInfo:
    """What corrects, as provenance records it.

    Attributes:
        model: The corrector model.
        params: Its sampling settings for one attempt (``n`` is 1; the seed varies).
        max_attempts: Bound on tries per unsafe completion.
        judges: The judges that re-judge every attempt.
        refusal_check: What is done with a refusal judge's second look at attempts.
        refusal_judge: The judge that takes it; None when the check is off.
    """

    model: ModelRef
    params: SamplingParams
    max_attempts: int
    judges: tuple[JudgeIdentity, ...]
    refusal_check: RefusalCheckMode = RefusalCheckMode.OFF
    refusal_judge: JudgeIdentity | None = None
