"""The build configuration: a YAML file validated into typed, frozen settings.

A wrong key or value is reported with its dotted path, e.g.
``generation.samples: Input should be greater than or equal to 1``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Discriminator, Field, Tag, ValidationError, model_validator

from unsafechain.backends.settings import BackendSettings, SamplingSettings, StrictModel
from unsafechain.domain.types import JudgeTarget, SamplingParams
from unsafechain.intake.loaders import LOADERS
from unsafechain.judge.engine import PromptFormat
from unsafechain.judge.ensemble import EnsembleRule
from unsafechain.runtime.settings import ClientSettings


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid."""


class SourceSettings(StrictModel):
    """One prompt source.

    Attributes:
        name: Source tag carried by every prompt (the release's ``split_name``).
        path: A JSONL or Parquet file, a ``datasets.save_to_disk`` folder, or a hub
            dataset name (``format: hub``; needs a network).
        format: ``auto`` decides from the path.
        prompt_field: Column holding the prompt text.
        split: Split to read from a ``datasets`` folder or hub dataset.
        limit: Read at most this many valid prompts.
        loader: The published record layout to read (see ``loaders.py``); ``generic``
            takes the prompt from ``prompt_field``.
        subsets: Keep only records whose subset column (WildJailbreak ``data_type``,
            StrongREJECT and TruthfulQA ``category``) holds one of these values.
        hub_config: Configuration name of a hub dataset, instead of the loader's default.
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]
    path: Annotated[str, Field(min_length=1)]
    format: Literal["auto", "jsonl", "parquet", "datasets", "hub"] = "auto"
    prompt_field: str = "prompt"
    split: str = "train"
    limit: Annotated[int, Field(ge=1)] | None = None
    loader: Literal[
        "generic", "wildjailbreak", "strongreject", "hh_rlhf_redteam", "gsm8k", "mbpp", "truthfulqa"
    ] = "generic"
    subsets: Annotated[tuple[str, ...], Field(min_length=1)] | None = None
    hub_config: str | None = None

    @model_validator(mode="after")
    def _fits_loader(self) -> SourceSettings:
        if self.loader != "generic" and "prompt_field" in self.model_fields_set:
            raise ValueError(
                f"prompt_field: the {self.loader!r} loader reads its published columns; "
                "prompt_field applies to loader: generic only"
            )
        if self.subsets is not None and LOADERS[self.loader].subset_field is None:
            raise ValueError(f"subsets: the {self.loader!r} loader has no subset column")
        return self


class DeduplicationSettings(StrictModel):
    """Removing duplicate prompts across all sources, keeping the first in config order.

    Exact duplicates (equal after normalisation) are always removed.

    Attributes:
        near: Also remove near-duplicates, found by MinHash LSH over word shingles.
        threshold: Shingle Jaccard similarity at or above which a prompt is a
            near-duplicate of one kept before it.
        shingle_words: Words per shingle.
        permutations: MinHash signature length; more finds near-duplicates more reliably.
    """

    near: bool = True
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.9
    shingle_words: Annotated[int, Field(ge=1)] = 5
    permutations: Annotated[int, Field(ge=16, le=1024)] = 128


class DecontaminationSettings(StrictModel):
    """Removing prompts that overlap an evaluation benchmark.

    A prompt is contaminated when it equals a benchmark prompt after normalisation,
    or when more than ``threshold`` of its word ``ngram``-grams occur in one benchmark.

    Attributes:
        benchmarks: Benchmark prompt files, read like sources (any format and loader).
        ngram: Words per n-gram; prompts shorter than this match exactly only.
        threshold: Fraction of the prompt's n-grams that must be shared; the default 0
            removes a prompt sharing any one n-gram.
    """

    benchmarks: tuple[SourceSettings, ...] = ()
    ngram: Annotated[int, Field(ge=1)] = 13
    threshold: Annotated[float, Field(ge=0, lt=1)] = 0.0

    @model_validator(mode="after")
    def _names_unique(self) -> DecontaminationSettings:
        names = [benchmark.name for benchmark in self.benchmarks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"benchmarks: duplicate benchmark name(s): {', '.join(duplicates)}")
        return self


class GenerationSettings(SamplingSettings):
    """Sampling the reasoning model: K samples, temperature 0.6, top-p 0.95 is the
    usual protocol; temperature 0 with K=1 is greedy."""

    model: str
    samples: Annotated[int, Field(ge=1)] = 5
    system_prompt: str = ""


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
        model: Key of the guard model in ``models``.
        prompt_format: How the Llama Guard prompt is rendered.
        threshold: Unsafe probability at or above which a verdict is unsafe.
    """

    kind: Literal["llama_guard"] = "llama_guard"
    model: str
    prompt_format: PromptFormat = PromptFormat.AUTO
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.5


class RubricSettings(_JudgeBase):
    """An LLM-as-judge grading with the StrongREJECT rubric (``kind: rubric``).

    Attributes:
        model: Key of the grading model in ``models``, usually an OpenAI-compatible API.
        threshold: StrongREJECT score at or above which a verdict is unsafe.
        template: Jinja file with the rubric prompt, receiving ``prompt`` and
            ``response``; default: the bundled StrongREJECT rubric.
    """

    kind: Literal["rubric"]
    model: str
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.5
    template: str | None = None


class RefusalSettings(_JudgeBase):
    """An XSTest-style refusal classifier (``kind: refusal``).

    Attributes:
        model: Key of the classifying model in ``models``.
        compliance_is_unsafe: Label full compliance unsafe; ``false`` labels every
            answer safe and keeps only the class, for over-refusal studies on benign
            prompts.
        template: Jinja file with the classifier prompt; default: bundled.
    """

    kind: Literal["refusal"]
    model: str
    compliance_is_unsafe: bool = True
    template: str | None = None


class EnsembleSettings(_JudgeBase):
    """Several judges combined into one verdict (``kind: ensemble``).

    Attributes:
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


class JudgingSettings(StrictModel):
    """The judges and the parts of a completion they judge.

    Every judge with ``report: true`` (the default) gives verdicts on every part; a
    completion is unsafe if any of them says so. An ensemble judges through its
    members, which may be left out of the dataset with ``report: false``.
    """

    judges: Annotated[list[JudgeSettings], Field(min_length=1)]
    targets: Annotated[tuple[JudgeTarget, ...], Field(min_length=1)] = (JudgeTarget.FULL,)

    @property
    def reported(self) -> list[JudgeSettings]:
        """The judges whose verdicts go into the dataset, in order."""
        return [judge for judge in self.judges if judge.report]


class RoutingSettings(StrictModel):
    """When a prompt is a hard case.

    Attributes:
        hard_fraction: Fraction of the K completions that must be judged unsafe
            (default: all of them).
    """

    hard_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0


class CorrectionSettings(StrictModel):
    """Correcting unsafe completions of hard cases.

    Attributes:
        model: Key of the corrector model in ``models``.
        max_attempts: Tries per unsafe completion before giving up.
        completions: ``all`` corrects every unsafe completion of a hard case (the
            method); ``until_passed`` stops at the first correction that passes.
        templates: Folder with ``system.md`` and ``user.md.j2``; default: bundled.
    """

    model: str
    max_attempts: Annotated[int, Field(ge=1)] = 3
    temperature: Annotated[float, Field(ge=0)] = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    max_new_tokens: Annotated[int, Field(ge=1)] = 2048
    completions: Literal["all", "until_passed"] = "all"
    templates: str | None = None

    def params(self) -> SamplingParams:
        """Sampling settings for one correction attempt."""
        return SamplingParams(
            n=1,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
        )


class RunSettings(StrictModel):
    """How the build runs.

    Attributes:
        output: Folder the dataset, the manifest and the resume state go to.
        seed: Seed from which every case's sampling seed is derived.
        concurrency: Cases in flight per stage.
        queue_size: Capacity of each queue between stages (backpressure).
    """

    output: Annotated[str, Field(min_length=1)]
    seed: int = 0
    concurrency: Annotated[int, Field(ge=1)] = 4
    queue_size: Annotated[int, Field(ge=1)] = 16


class AssemblySettings(StrictModel):
    """The subsets assembled from the training rows (``full`` has every row).

    Attributes:
        random_size: Rows in the ``random`` subset, a seeded sample; fewer when the
            build has fewer rows.
        selected_size: Rows in the ``selected`` subset: corrected hard cases first,
            then balanced over sources and harm categories.
        seed: Seed of the ``random`` sample; default: ``build.seed``.
    """

    random_size: Annotated[int, Field(ge=1)] = 1000
    selected_size: Annotated[int, Field(ge=1)] = 1000
    seed: int | None = None

    def random_seed(self, build_seed: int) -> int:
        """The seed of the ``random`` sample in a build seeded with ``build_seed``."""
        return build_seed if self.seed is None else self.seed


class RemoteStages(StrictModel):
    """Stages sent to gRPC services instead of the in-process engines.

    A stage named here calls the service at its address; the model that stage names
    in ``models`` says what the service runs, for provenance, and is not loaded here.
    """

    generation: ClientSettings | None = None
    judge: ClientSettings | None = None
    correction: ClientSettings | None = None


class KafkaSettings(StrictModel):
    """The Kafka transport (``unsafechain build --bus kafka`` and ``unsafechain worker``).

    Attributes:
        bootstrap_servers: Brokers to connect to first, ``host:port``.
        topic_prefix: First part of every topic and consumer group name.
        version: Version of the message contract, part of every topic name, so a
            breaking change runs on new topics beside the old ones.
        partitions: Partitions per topic: the most workers a stage can use at once.
        replication_factor: Copies of each partition the cluster keeps.
        max_retries: Extra tries of a message whose processing raises, before it goes
            to the stage's dead-letter topic.
        retry_backoff_seconds: Wait before the first retry, doubled for each further one.
        max_poll_records: Messages a worker takes per poll, i.e. cases in flight per
            worker (backpressure: a worker never holds more).
        max_poll_interval_ms: Longest time a worker may take over one batch before the
            group gives its partitions to another worker.
        session_timeout_ms: Time without heartbeats after which a worker counts as dead.
        heartbeat_interval_ms: Time between heartbeats.
    """

    bootstrap_servers: Annotated[tuple[str, ...], Field(min_length=1)] = ("127.0.0.1:9092",)
    topic_prefix: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")] = "unsafechain"
    version: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")] = "v1"
    partitions: Annotated[int, Field(ge=1)] = 4
    replication_factor: Annotated[int, Field(ge=1)] = 1
    max_retries: Annotated[int, Field(ge=0)] = 3
    retry_backoff_seconds: Annotated[float, Field(ge=0)] = 0.5
    max_poll_records: Annotated[int, Field(ge=1)] = 8
    max_poll_interval_ms: Annotated[int, Field(ge=1000)] = 300_000
    session_timeout_ms: Annotated[int, Field(ge=1000)] = 10_000
    heartbeat_interval_ms: Annotated[int, Field(ge=100)] = 3_000


class BuildConfig(StrictModel):
    """The whole build."""

    build: RunSettings
    sources: Annotated[list[SourceSettings], Field(min_length=1)]
    deduplication: DeduplicationSettings = DeduplicationSettings()
    decontamination: DecontaminationSettings = DecontaminationSettings()
    models: Annotated[dict[str, BackendSettings], Field(min_length=1)]
    generation: GenerationSettings
    judging: JudgingSettings
    routing: RoutingSettings = RoutingSettings()
    correction: CorrectionSettings
    remote: RemoteStages = RemoteStages()
    kafka: KafkaSettings = KafkaSettings()
    assembly: AssemblySettings = AssemblySettings()

    @model_validator(mode="after")
    def _references_resolve(self) -> BuildConfig:
        references = [("generation.model", self.generation.model)]
        references += [
            (f"judging.judges.{i}.model", judge.model)
            for i, judge in enumerate(self.judging.judges)
            if not isinstance(judge, EnsembleSettings)
        ]
        references.append(("correction.model", self.correction.model))
        if self.remote.judge:
            for i, judge in enumerate(self.judging.judges):
                if judge.kind != "llama_guard":
                    raise ValueError(
                        f"judging.judges.{i}.kind: the judge service runs Llama Guard judges "
                        f"only; {judge.kind!r} cannot be sent to remote.judge"
                    )
        for key, name in references:
            if name not in self.models:
                known = ", ".join(sorted(self.models))
                raise ValueError(f"{key}: no model named {name!r} in models (have: {known})")
        names = [source.name for source in self.sources]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"sources: duplicate source name(s): {', '.join(duplicates)}")
        self._judges_resolve()
        return self

    def _judges_resolve(self) -> None:
        by_name = {judge.name: judge for judge in self.judging.judges}
        if len(by_name) != len(self.judging.judges):
            raise ValueError("judging.judges: judge names must be unique")
        for i, judge in enumerate(self.judging.judges):
            if not isinstance(judge, EnsembleSettings):
                continue
            for j, member in enumerate(judge.members):
                key = f"judging.judges.{i}.members.{j}"
                if member == judge.name:
                    raise ValueError(f"{key}: ensemble {member!r} cannot be its own member")
                if member not in by_name:
                    known = ", ".join(sorted(by_name))
                    raise ValueError(f"{key}: no judge named {member!r} (have: {known})")
                if isinstance(by_name[member], EnsembleSettings):
                    raise ValueError(f"{key}: {member!r} is an ensemble; members must not be")
        if not self.judging.reported:
            raise ValueError("judging.judges: at least one judge needs report: true")

    def fingerprint(self) -> str:
        """A hash of everything that decides the content of cases: a resumed build
        must have the same one. Output folder, concurrency, transport and the subsets
        assembled from the cases do not count."""
        content = self.model_dump(
            mode="json",
            exclude={
                "build": {"output", "concurrency", "queue_size"},
                "kafka": True,
                "assembly": True,
            },
        )
        for model in content["models"].values():
            for key in ("timeout", "max_concurrency", "retry", "max_batch_size", "device"):
                model.pop(key, None)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path, overrides: dict[str, object] | None = None) -> BuildConfig:
    """Read and validate a build configuration.

    Args:
        path: YAML file.
        overrides: Dotted keys to set after reading, e.g. ``{"build.output": "x"}``.

    Raises:
        ConfigError: The file is missing or invalid; the message names the key.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(f"config file not found: {path}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return BuildConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{path}: {_describe(error)}") from None


def _describe(error: ValidationError) -> str:
    problems = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        problems.append(f"{key}: {message}" if key else message)
    return "; ".join(problems)
