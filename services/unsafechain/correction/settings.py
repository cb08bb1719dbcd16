"""The correction stage's settings, and the correction service's.

One schema for every place correction is configured: the build's ``correction``
section, the correction service and the Kafka correct worker. Re-judging uses the
judge stage's settings (``judging``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from unsafechain.backends.settings import BackendSettings, top_k_problem
from unsafechain.domain.settings import ConfigPathText, StrictModel
from unsafechain.domain.types import RefusalCheckMode, SamplingParams
from unsafechain.judge.settings import (
    GUARD,
    JudgingSettings,
    RefusalSettings,
    add_guard_arguments,
    fold_judge_shorthand,
    unknown_models,
)
from unsafechain.runtime.settings import (
    ServerSettings,
    add_backend_flags,
    add_sampling_flags,
    add_server_arguments,
    flag,
    fold_model_shorthand,
)

CORRECTOR = "corrector"


class RefusalCheckSettings(StrictModel):
    """A second look at every correction that passed re-judging, by a refusal judge,
    so that benign prompts do not become trained refusals.

    The judge classifies the correction (full compliance, full refusal, partial
    refusal); for a full refusal it is also asked whether the prompt is benign or
    harmful (once per corrected completion). ``record`` keeps what it said on the
    attempt; ``reject`` also fails an attempt that fully refuses a benign prompt, with
    feedback that has the next attempt answer it, and an attempt the judge could not
    classify (a safe refusal is then not kept unverified). A partial refusal and a
    refusal of a harmful prompt pass. The build's manifest counts the classes.

    Attributes:
        mode: ``off`` (the default), ``record`` or ``reject``.
        judge: Name of a ``kind: refusal`` judge in ``judging.judges``; give it
            ``report: false`` unless it should judge the generated completions too.
    """

    mode: RefusalCheckMode = RefusalCheckMode.OFF
    judge: str | None = None


def refusal_check_problem(correction: CorrectionSettings, judging: JudgingSettings) -> str | None:
    """Why the refusal check cannot run with these judges, as a message naming the key;
    None when it can or is off."""
    check = correction.refusal_check
    if check.mode == RefusalCheckMode.OFF:
        return None
    key = "correction.refusal_check.judge"
    if check.judge is None:
        return f"{key}: name the refusal judge (a kind: refusal judge in judging.judges)"
    judge = next((j for j in judging.judges if j.name == check.judge), None)
    if judge is None:
        known = ", ".join(j.name for j in judging.judges)
        return f"{key}: no judge named {check.judge!r} in judging.judges (have: {known})"
    if not isinstance(judge, RefusalSettings):
        return f"{key}: {check.judge!r} is a {judge.kind} judge; the check needs kind: refusal"
    return None


class CorrectionSettings(StrictModel):
    """Correcting unsafe completions of hard cases.

    Attributes:
        model: Key of the corrector in the model table (``models``).
        max_attempts: Tries per unsafe completion before giving up.
        temperature, top_p, top_k, max_new_tokens: The corrector's sampling per
            attempt; ``top_k`` 0 is off.
        completions: ``all`` corrects every unsafe completion of a hard case (the
            method); ``until_passed`` stops at the first correction that passes. The
            build's correct stage reads it; the service corrects one completion a call.
        templates: Folder with ``system.md`` and ``user.md.j2``; default: bundled.
        refusal_check: A refusal judge's second look at corrections (default: off).
    """

    model: Annotated[str, Field(min_length=1)] = CORRECTOR
    max_attempts: Annotated[int, Field(ge=1)] = 3
    temperature: Annotated[float, Field(ge=0)] = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    top_k: Annotated[int, Field(ge=0)] = 0
    max_new_tokens: Annotated[int, Field(ge=1)] = 2048
    completions: Literal["all", "until_passed"] = "all"
    templates: ConfigPathText | None = None
    refusal_check: RefusalCheckSettings = RefusalCheckSettings()

    def params(self) -> SamplingParams:
        """Sampling settings for one correction attempt."""
        return SamplingParams(
            n=1,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
        )


class CorrectionServiceSettings(ServerSettings):
    """The correction service: the server, the model table, the corrector's settings
    and the judges that re-judge every attempt.

    ``model`` and ``judge_model`` are shorthands (``--model …``, ``--judge-model …``,
    ``UNSAFECHAIN_MODEL__*``) for the ``corrector`` and ``guard`` entries in ``models``;
    ``judge`` one for the re-judging Llama Guard judge (``--judge-name`` …).

    Attributes:
        models: The model table: the corrector's and the judges' ``model`` are keys of it.
        correction: The corrector's settings, as in a build.
        judging: The judges that re-judge every attempt, as in a build.
        model: Shorthand for the corrector's entry in ``models``.
        judge_model: Shorthand for ``models.guard``, the re-judging guard.
        judge: Shorthand for the re-judging Llama Guard judge on ``guard``: ``name``,
            ``prompt_format``, ``threshold``, ``top_logprobs``, ``targets``.
    """

    service: ClassVar[str] = "correction"
    config_sections: ClassVar[tuple[str, ...]] = ("models", "correction", "judging")

    models: dict[str, BackendSettings] = Field(default_factory=dict)
    correction: CorrectionSettings = CorrectionSettings()
    judging: JudgingSettings = JudgingSettings()
    model: BackendSettings | None = None
    judge_model: BackendSettings | None = None
    judge: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _fold_models(cls, values: object) -> object:
        key = CORRECTOR
        if isinstance(values, dict) and isinstance(values.get("correction"), dict):
            key = values["correction"].get("model", CORRECTOR)
        values = fold_model_shorthand(values, "model", "models", key)
        values = fold_model_shorthand(values, "judge_model", "models", GUARD)
        return fold_judge_shorthand(values, batching=False)

    @model_validator(mode="after")
    def _models_known(self) -> CorrectionServiceSettings:
        references = [("correction.model", self.correction.model)]
        references += [(f"judging.{k}", name) for k, name in self.judging.model_references()]
        problem = unknown_models(references, self.models)
        if problem:
            raise ValueError(
                f"{problem}; give the corrector with --backend and --model, the re-judging "
                "guard with --judge-backend and --judge-model, or both in --config"
            )
        problem = top_k_problem(
            "correction", self.correction.params(), self.correction.model, self.models
        )
        problem = problem or refusal_check_problem(self.correction, self.judging)
        if problem:
            raise ValueError(problem)
        return self

    def backends(self) -> Iterable[BackendSettings]:
        return self.models.values()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``unsafechain serve correction``."""
    add_server_arguments(parser)
    add_backend_flags(parser, "", "model", "corrector")
    add_guard_arguments(parser, batching=False)
    add_backend_flags(parser, "judge-", "judge_model", "re-judging guard")
    group = parser.add_argument_group("correction")
    flag(group, "--max-attempts", "correction.max_attempts", "tries per completion", type=int)
    add_sampling_flags(group, "correction", "attempt")
    flag(group, "--templates", "correction.templates", "folder of prompt templates")


SETTINGS = CorrectionServiceSettings
"""The service's settings class, for ``unsafechain serve correction``."""
