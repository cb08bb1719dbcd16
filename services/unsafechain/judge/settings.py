"""The judge stage's settings: which judges, of which kind, on which parts; and the
judge service's, which serves any of them.

One schema for every place a judge is configured: the build's ``judging`` section, the
judge service, the correction service's re-judging and the Kafka judge worker.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from unsafechain.backends.settings import BackendSettings
from unsafechain.domain.settings import ConfigPathText, StrictModel
from unsafechain.domain.types import JudgeTarget
from unsafechain.judge.engine import PromptFormat
from unsafechain.judge.ensemble import EnsembleRule
from unsafechain.runtime.settings import (
    ServerSettings,
    add_backend_flags,
    add_server_arguments,
    flag,
    fold_model_shorthand,
)

# Key of the default judge's model in a service's model table.
GUARD = "guard"


class _JudgeBase(StrictModel):
    """What every judge has.

    Attributes:
        name: Recorded on every verdict; how ensembles refer to the judge.
        report: Whether the judge's own verdicts go into the dataset. ``false`` keeps
            a judge that serves only as an ensemble member from adding verdicts (and
            from deciding labels) beside the ensemble's.
    """

    name: Annotated[str, Field(min_length=1)]
    report: bool = True


class LlamaGuardSettings(_JudgeBase):
    """Llama Guard 3 (``kind: llama_guard``, the default kind).

    Attributes:
        kind: ``llama_guard``; may be left out.
        model: Key of the guard model in ``models``.
        prompt_format: How the Llama Guard prompt is rendered: ``chat_template`` sends
            the conversation and the model's chat template renders it (the tokenizer's
            for ``transformers``, the server's for ``openai`` and ``tgi``);
            ``published`` renders the published prompt here (byte for byte what that
            template renders) and sends it as raw text: to ``/v1/completions`` for
            ``openai`` (with ``add_special_tokens: false``), to ``/generate`` for
            ``tgi`` (without its BOS, which TGI adds). ``auto`` is ``chat_template``
            for ``transformers`` and ``openai`` (vLLM's Messages API), and
            ``published`` for ``tgi``, whose native route is ``/generate``; a custom
            taxonomy makes it ``published`` everywhere.
        threshold: Unsafe probability at or above which a verdict is unsafe.
        top_logprobs: Alternatives asked for per generated token, among which the
            score finds the probability of ``unsafe`` at the first word. 5 by default:
            the most a TGI server gives unless it is started with a larger
            ``--max-top-n-tokens`` (it refuses more with HTTP 422, on both routes);
            vLLM allows 20 (``--max-logprobs``), as OpenAI does. 0 asks for none, and
            the label alone decides.
    """

    kind: Literal["llama_guard"] = "llama_guard"
    model: str
    prompt_format: PromptFormat = PromptFormat.AUTO
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.5
    top_logprobs: Annotated[int, Field(ge=0, le=20)] = 5


class RubricSettings(_JudgeBase):
    """An LLM-as-judge grading with the StrongREJECT rubric (``kind: rubric``).

    Attributes:
        kind: ``rubric``.
        model: Key of the grading model in ``models``, usually an OpenAI-compatible API.
        threshold: StrongREJECT score at or above which a verdict is unsafe.
        template: Jinja file with the rubric prompt, receiving ``prompt`` and
            ``response``; default: the bundled StrongREJECT rubric.
    """

    kind: Literal["rubric"]
    model: str
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.5
    template: ConfigPathText | None = None


class RefusalSettings(_JudgeBase):
    """An XSTest-style refusal classifier (``kind: refusal``).

    Attributes:
        kind: ``refusal``.
        model: Key of the classifying model in ``models``.
        compliance_is_unsafe: Label full compliance unsafe; ``false`` labels every
            answer safe and keeps only the class, for over-refusal studies on benign
            prompts.
        template: Jinja file with the classifier prompt; default: bundled.
        request_template: Jinja file, receiving ``prompt``, that asks whether a request
            is benign or harmful, for the correction stage's refusal check; default:
            bundled.
    """

    kind: Literal["refusal"]
    model: str
    compliance_is_unsafe: bool = True
    template: ConfigPathText | None = None
    request_template: ConfigPathText | None = None


class EnsembleSettings(_JudgeBase):
    """Several judges combined into one verdict (``kind: ensemble``).

    Attributes:
        kind: ``ensemble``.
        members: Names of other judges in ``judging.judges``; not ensembles. Give
            members ``report: false`` when only the ensemble's verdict should count.
        rule: ``majority``, ``any_unsafe`` or ``mean_score`` (see :class:`EnsembleRule`).
        threshold: For ``mean_score``, the mean at or above which a verdict is unsafe.
    """

    kind: Literal["ensemble"]
    members: Annotated[list[str], Field(min_length=1)]
    rule: EnsembleRule = EnsembleRule.MAJORITY
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.5


def _judge_kind(value: object) -> str | None:
    # ``kind`` may be left out for Llama Guard, the judge configs had before there
    # were others.
    if isinstance(value, dict):
        return value.get("kind", "llama_guard")
    return getattr(value, "kind", None)


JudgeSettings = Annotated[
    Annotated[LlamaGuardSettings, Tag("llama_guard")]
    | Annotated[RubricSettings, Tag("rubric")]
    | Annotated[RefusalSettings, Tag("refusal")]
    | Annotated[EnsembleSettings, Tag("ensemble")],
    Discriminator(_judge_kind),
]
"""One judge; ``kind`` selects which and which fields it takes."""


def _default_judges() -> list[JudgeSettings]:
    return [LlamaGuardSettings(name="llama-guard", model=GUARD)]


class JudgingSettings(StrictModel):
    """The judges and the parts of a completion they judge.

    Every judge with ``report: true`` (the default) gives verdicts on every part; a
    completion is unsafe if any of them says so. An ensemble judges through its
    members, which may be left out of the dataset with ``report: false``.

    Attributes:
        judges: The judges, each selected by its ``kind`` (``llama_guard`` when left
            out); default: one Llama Guard judge named ``llama-guard`` on the ``guard``
            model.
        targets: The parts of a completion judged: ``full`` (the whole completion),
            ``reasoning`` (the ``<think>`` section), ``answer`` (what follows it).
    """

    judges: Annotated[list[JudgeSettings], Field(min_length=1)] = Field(
        default_factory=lambda: _default_judges()
    )
    targets: Annotated[tuple[JudgeTarget, ...], Field(min_length=1)] = (JudgeTarget.FULL,)

    @model_validator(mode="after")
    def _judges_resolve(self) -> JudgingSettings:
        by_name = {judge.name: judge for judge in self.judges}
        if len(by_name) != len(self.judges):
            raise ValueError("judges: judge names must be unique")
        for i, judge in enumerate(self.judges):
            if not isinstance(judge, EnsembleSettings):
                continue
            for j, member in enumerate(judge.members):
                key = f"judges.{i}.members.{j}"
                if member == judge.name:
                    raise ValueError(f"{key}: ensemble {member!r} cannot be its own member")
                if member not in by_name:
                    known = ", ".join(sorted(by_name))
                    raise ValueError(f"{key}: no judge named {member!r} (have: {known})")
                if isinstance(by_name[member], EnsembleSettings):
                    raise ValueError(f"{key}: {member!r} is an ensemble; members must not be")
        if not self.reported:
            raise ValueError("judges: at least one judge needs report: true")
        return self

    def model_references(self) -> list[tuple[str, str]]:
        """``(dotted key, model key)`` of every judge that runs a model, for checking
        them against a model table."""
        return [
            (f"judges.{i}.model", judge.model)
            for i, judge in enumerate(self.judges)
            if not isinstance(judge, EnsembleSettings)
        ]

    @property
    def reported(self) -> list[JudgeSettings]:
        """The judges whose verdicts go into the dataset, in order."""
        return [judge for judge in self.judges if judge.report]


def unknown_models(
    references: Iterable[tuple[str, str]], models: Mapping[str, object]
) -> str | None:
    """The first reference to a model the table lacks, as an error message; None if all
    resolve."""
    for key, name in references:
        if name not in models:
            known = ", ".join(sorted(models)) or "none"
            return f"{key}: no model named {name!r} in models (have: {known})"
    return None


class BatchingSettings(StrictModel):
    """How the judge service micro-batches concurrent requests.

    Attributes:
        max_size: Most (prompt, response) pairs sent to the models together.
        max_wait_ms: Longest a request waits for others to share its batch. Under
            steady load, about the clients' round trip (the callers a batch answers
            send again): shorter, and they split into half batches that alternate
            (the ``unsafechain_judge_batch_size`` histogram shows it).
    """

    max_size: Annotated[int, Field(ge=1)] = 32
    max_wait_ms: Annotated[float, Field(ge=0)] = 5.0


class JudgeServiceSettings(ServerSettings):
    """The judge service: the server, the model table, the judges (any kind the build
    can configure, ensembles included) and the batching.

    ``model`` is a shorthand (``--model …`` flags, ``UNSAFECHAIN_MODEL__*``) for the
    ``guard`` entry in ``models``, the model of the default Llama Guard judge; ``judge``
    one for that judge (``--judge-name``, ``--threshold`` …, ``UNSAFECHAIN_JUDGE__*``).

    Attributes:
        models: The model table: each judge's ``model`` is a key of it.
        judging: The judges served and the parts they judge, as in a build.
        batching: Micro-batching of concurrent requests.
        model: Shorthand for ``models.guard``.
        judge: Shorthand for one Llama Guard judge on ``guard``: ``name``,
            ``prompt_format``, ``threshold``, ``top_logprobs``, ``targets``,
            ``batch_max_size``, ``batch_max_wait_ms``.
    """

    service: ClassVar[str] = "judge"
    config_sections: ClassVar[tuple[str, ...]] = ("models", "judging")

    models: dict[str, BackendSettings] = Field(default_factory=dict)
    judging: JudgingSettings = JudgingSettings()
    batching: BatchingSettings = BatchingSettings()
    model: BackendSettings | None = None
    judge: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _fold_shorthands(cls, values: object) -> object:
        values = fold_model_shorthand(values, "model", "models", GUARD)
        return fold_judge_shorthand(values, batching=True)

    @model_validator(mode="after")
    def _models_known(self) -> JudgeServiceSettings:
        problem = unknown_models(
            [(f"judging.{key}", name) for key, name in self.judging.model_references()],
            self.models,
        )
        if problem:
            raise ValueError(f"{problem}; give it with --backend and --model, or in --config")
        return self

    def backends(self) -> Iterable[BackendSettings]:
        return self.models.values()


# The single-judge shorthand: keys of the ``judge`` section (``--judge-name`` …,
# ``UNSAFECHAIN_JUDGE__*``) and where each goes.
_JUDGE_SHORTHAND = {
    "name": "judges",
    "prompt_format": "judges",
    "threshold": "judges",
    "top_logprobs": "judges",
    "targets": "targets",
    "batch_max_size": "batching",
    "batch_max_wait_ms": "batching",
}


def fold_judge_shorthand(values: object, *, batching: bool) -> object:
    """Turn a service's ``judge`` shorthand (one Llama Guard judge on the ``guard``
    model: name, prompt format, threshold, top log-probabilities, targets and, for the
    judge service, the batching) into ``judging`` and ``batching``, for a
    ``mode="before"`` validator.

    Raises:
        ValueError: The shorthand has an unknown key, or ``judging.judges`` is given too.
    """
    if not isinstance(values, dict) or not values.get("judge"):
        return values
    values = dict(values)
    shorthand = dict(values.pop("judge"))
    allowed = {k for k, v in _JUDGE_SHORTHAND.items() if batching or v != "batching"}
    unknown = sorted(set(shorthand) - allowed)
    if unknown:
        raise ValueError(
            f"judge: unknown setting(s) {', '.join(unknown)} (have: {sorted(allowed)})"
        )
    judging = dict(values.get("judging") or {})
    guard = {k: v for k, v in shorthand.items() if _JUDGE_SHORTHAND[k] == "judges"}
    if guard:
        if "judges" in judging:
            raise ValueError(
                "judge: give one judge by flags or judging.judges in --config, not both"
            )
        judging["judges"] = [
            {"kind": "llama_guard", "name": "llama-guard", "model": GUARD, **guard}
        ]
    if "targets" in shorthand:
        judging["targets"] = shorthand["targets"]
    values["judging"] = judging
    if batching:
        batch = dict(values.get("batching") or {})
        for key in ("batch_max_size", "batch_max_wait_ms"):
            if key in shorthand:
                batch[key.removeprefix("batch_")] = shorthand[key]
        values["batching"] = batch
    return values


def add_guard_arguments(parser: argparse.ArgumentParser, *, batching: bool) -> None:
    """Flags for a single Llama Guard judge on the ``guard`` model (the default judge of
    a service), its targets and, for the judge service, the batching."""
    group = parser.add_argument_group("judge (one Llama Guard judge; any judges with --config)")
    flag(group, "--judge-name", "judge.name", "name recorded on every verdict")
    flag(
        group,
        "--prompt-format",
        "judge.prompt_format",
        "how the guard prompt is rendered",
        choices=[f.value for f in PromptFormat],
    )
    flag(group, "--threshold", "judge.threshold", "unsafe score threshold", type=float)
    flag(
        group,
        "--top-logprobs",
        "judge.top_logprobs",
        "alternatives asked for per token (at most the server's limit: 5 on TGI)",
        type=int,
    )
    flag(
        group,
        "--targets",
        "judge.targets",
        "parts judged when a request names none",
        nargs="+",
        choices=[t.value for t in JudgeTarget],
    )
    if batching:
        flag(
            group,
            "--batch-max-size",
            "judge.batch_max_size",
            "most pairs judged together",
            type=int,
        )
        flag(
            group,
            "--batch-max-wait-ms",
            "judge.batch_max_wait_ms",
            "longest a request waits to share a batch",
            type=float,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``unsafechain serve judge``."""
    add_server_arguments(parser)
    add_backend_flags(parser, "", "model", "guard")
    add_guard_arguments(parser, batching=True)


SETTINGS = JudgeServiceSettings
"""The service's settings class, for ``unsafechain serve judge``."""
