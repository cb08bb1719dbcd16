"""The evaluation configuration (``unsafechain eval --config FILE``): the models to
compare, the benchmarks, the sampling and the judges, validated into typed, frozen
settings. A wrong key or value is reported with its dotted path."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, model_validator

from unsafechain.backends.settings import BackendSettings, content_fingerprint, top_k_problem
from unsafechain.domain.settings import (
    ConfigError,
    ConfigPath,
    ConfigPathText,
    SamplingSettings,
    StrictModel,
    load_config_file,
)
from unsafechain.evaluation.benchmarks import BENCHMARKS, BenchmarkSettings
from unsafechain.generation.settings import GenerationSettings
from unsafechain.judge.settings import JudgingSettings, unknown_models
from unsafechain.runtime.settings import ClientSettings
from unsafechain.streaming.kafka import KafkaSettings

__all__ = ["CandidateSettings", "ConfigError", "EvalConfig", "load_eval_config"]

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class EvalRunSettings(StrictModel):
    """How the evaluation runs.

    Attributes:
        output: Folder the samples, results and report go to; run again on it to resume.
        seed: Seed from which every prompt's sampling seed is derived.
        concurrency: Prompts in flight per stage.
        queue_size: Capacity of each queue between stages.
        confidence: Level of every confidence interval.
        resamples: Bootstrap resamples per interval and paired test.
    """

    output: Annotated[ConfigPathText, Field(min_length=1)]
    seed: int = 0
    concurrency: Annotated[int, Field(ge=1)] = 4
    queue_size: Annotated[int, Field(ge=1)] = 16
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    resamples: Annotated[int, Field(ge=100)] = 10_000


class CandidateSettings(StrictModel):
    """One model evaluated.

    Give ``model`` (an entry of the ``models`` table: a local path or hub name on
    transformers, or a served model on an OpenAI-compatible or TGI server), optionally
    with ``adapter`` (a LoRA adapter folder over a transformers model); or
    ``training_run``, the output folder of ``unsafechain train``, which gives its base
    model and adapter (or its fully fine-tuned model) and its provenance (``model``
    then names the entry whose device and dtype apply).

    Attributes:
        name: The model's name in the results, tables and sample folders.
        model: Key in the ``models`` table.
        adapter: A LoRA adapter folder applied over ``model``.
        training_run: A training run's output folder.
        base: The candidate this one is compared with (its base model), prompt by
            prompt, with a paired test.
        remote: A generation service that runs this model instead of this process.
        system_prompt: A system turn before each prompt; R1-distill models take none.
        prompt_opens_think: See ``generation.prompt_opens_think`` of a build.
    """

    name: Annotated[str, Field(pattern=NAME, max_length=80)]
    model: str | None = None
    adapter: ConfigPathText | None = None
    training_run: ConfigPath | None = None
    base: str | None = None
    remote: ClientSettings | None = None
    system_prompt: str = ""
    prompt_opens_think: bool | None = None

    @model_validator(mode="after")
    def _one_source(self) -> CandidateSettings:
        if self.model is None and self.training_run is None and self.remote is None:
            raise ValueError(
                "give model (a models entry), training_run (a run folder) or remote (a "
                "generation service)"
            )
        if self.adapter is not None and self.training_run is not None:
            raise ValueError("adapter: a training_run brings its own adapter")
        if self.remote is not None and (self.adapter or self.training_run):
            raise ValueError("remote: a generation service runs its own model; drop adapter")
        return self


class RemoteJudging(StrictModel):
    """Judging sent to a judge service instead of this process.

    Attributes:
        judge: The judge service of the safety benchmarks.
        refusal: The judge service of the over-refusal benchmarks.
    """

    judge: ClientSettings | None = None
    refusal: ClientSettings | None = None


class EvalConfig(StrictModel):
    """The whole evaluation.

    Attributes:
        eval: The output folder, the seed, the concurrency and the statistics.
        models: The model table: a candidate's and a judge's ``model`` name an entry.
        candidates: The models evaluated, side by side.
        benchmarks: The benchmarks every candidate is evaluated on.
        sampling: Sampling per prompt, the same for every candidate; default: one
            greedy sample.
        judging: The judges of the safety benchmarks.
        refusal: The judges of the over-refusal benchmarks (a ``kind: refusal`` judge);
            needed when one (``xstest``) is listed.
        remote: Judging sent to judge services instead of this process.
        kafka: The Kafka transport of ``eval --bus kafka`` and its workers.
    """

    eval: EvalRunSettings
    models: dict[str, BackendSettings] = Field(default_factory=dict)
    candidates: Annotated[list[CandidateSettings], Field(min_length=1)]
    benchmarks: Annotated[list[BenchmarkSettings], Field(min_length=1)]
    sampling: SamplingSettings = SamplingSettings(samples=1, temperature=0.0)
    judging: JudgingSettings
    refusal: JudgingSettings | None = None
    remote: RemoteJudging = RemoteJudging()
    kafka: KafkaSettings = KafkaSettings()

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        names = [c.name for c in self.candidates]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"candidates: duplicate name(s): {', '.join(duplicates)}")
        for position, candidate in enumerate(self.candidates):
            where = f"candidates.{position}"
            if candidate.model is not None and candidate.model not in self.models:
                raise ValueError(f"{where}.model: {candidate.model!r} is not in models")
            if candidate.base is not None and candidate.base not in names:
                raise ValueError(f"{where}.base: no candidate is named {candidate.base!r}")
            if candidate.base == candidate.name:
                raise ValueError(f"{where}.base: a model is not compared with itself")
            if candidate.adapter and self.models[candidate.model or ""].backend != "transformers":
                raise ValueError(f"{where}.adapter: adapters load on the transformers backend")
            if candidate.model is not None:
                problem = top_k_problem(where, self.sampling.params(), candidate.model, self.models)
                if problem:
                    raise ValueError(problem)
        benchmark_names = [b.name for b in self.benchmarks]
        repeated = sorted({n for n in benchmark_names if benchmark_names.count(n) > 1})
        if repeated:
            raise ValueError(f"benchmarks: listed more than once: {', '.join(repeated)}")
        references = [(f"judging.{k}", n) for k, n in self.judging.model_references()]
        if self.refusal is not None:
            references += [(f"refusal.{k}", n) for k, n in self.refusal.model_references()]
        problem = unknown_models(references, self.models)
        if problem and self.remote.judge is None:
            raise ValueError(problem)
        kinds = {BENCHMARKS[name].kind for name in benchmark_names}
        if "over_refusal" in kinds and self.refusal is None and self.remote.refusal is None:
            raise ValueError(
                "refusal: an over-refusal benchmark (xstest) is scored by a refusal judge; "
                "configure one (a judge of kind refusal)"
            )
        return self

    def generation(self, candidate: CandidateSettings, model_key: str) -> GenerationSettings:
        """The generation settings of ``candidate`` (its model under ``model_key``)."""
        return GenerationSettings(
            model=model_key,
            system_prompt=candidate.system_prompt,
            prompt_opens_think=candidate.prompt_opens_think,
            **self.sampling.model_dump(),
        )

    def fingerprint(self) -> str:
        """A hash of everything that decides the samples and verdicts: a resumed
        evaluation must have the same one. The output folder, concurrency and the
        statistics (recomputed from the samples every time) do not count."""
        content: dict[str, Any] = self.model_dump(
            mode="json",
            exclude={
                "eval": {"output", "concurrency", "queue_size", "confidence", "resamples"},
                "kafka": True,
            },
        )
        return content_fingerprint(content)


def load_eval_config(path: str | Path, overrides: dict[str, object] | None = None) -> EvalConfig:
    """Read and validate an evaluation configuration.

    Raises:
        ConfigError: The file is missing or invalid; the message names the key.
    """
    return load_config_file(path, EvalConfig, overrides)
