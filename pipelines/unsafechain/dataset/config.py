"""The build configuration: a YAML file validated into typed, frozen settings.

A wrong key or value is reported with its dotted path, e.g.
``generation.samples: Input should be greater than or equal to 1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from unsafechain.backends.settings import BackendSettings, content_fingerprint, top_k_problem
from unsafechain.correction.settings import CorrectionSettings, refusal_check_problem
from unsafechain.domain.settings import ConfigError, ConfigPathText, StrictModel, load_config_file
from unsafechain.generation.settings import GenerationSettings
from unsafechain.intake.settings import (
    DecontaminationSettings,
    DeduplicationSettings,
    HeldOutSettings,
    SourceSettings,
)
from unsafechain.judge.settings import JudgingSettings, unknown_models
from unsafechain.runtime.settings import ClientSettings
from unsafechain.streaming.kafka import KafkaSettings

# ConfigError lives in the domain layer, which reads every configuration file.
__all__ = ["BuildConfig", "ConfigError", "load_config"]


class RoutingSettings(StrictModel):
    """When a prompt is a hard case, and which unsafe completions are corrected.

    Attributes:
        hard_fraction: Fraction of the K completions that must be judged unsafe
            (default: all of them).
        correct: ``hard`` corrects the unsafe completions of hard prompts only (their
            rows need them); ``unsafe`` corrects every unsafe completion of any prompt,
            as the paper does: a prompt that is not hard keeps a completion judged
            safe as its row, and its corrections become preference pairs (and rows
            with ``rows.policy: every_correction``).
    """

    hard_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    correct: Literal["hard", "unsafe"] = "hard"


class RowSettings(StrictModel):
    """What becomes a training row.

    Attributes:
        policy: ``one_per_prompt``: the first correction that passed for a hard
            prompt, the first completion judged safe (and complete) for any other.
            ``every_correction``: every correction that passed is a row of its own,
            beside the completion judged safe of a prompt that is not hard.
        check_answers: For a benign prompt whose source keeps a gold answer with a
            checker (GSM8K's final number): ``flag`` prefers a correct completion
            among those judged safe and records the check on the row; ``drop`` also
            keeps a prompt none of whose safe completions is correct out of the rows,
            with the reason; ``off`` checks nothing.
    """

    policy: Literal["one_per_prompt", "every_correction"] = "one_per_prompt"
    check_answers: Literal["off", "flag", "drop"] = "flag"


class RunSettings(StrictModel):
    """How the build runs.

    Attributes:
        output: Folder the dataset, the manifest and the resume state go to.
        seed: Seed from which every case's sampling seed is derived.
        concurrency: Cases in flight per stage.
        queue_size: Capacity of each queue between stages (backpressure).
    """

    output: Annotated[ConfigPathText, Field(min_length=1)]
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


class CardSettings(StrictModel):
    """What the dataset card says that the build cannot know.

    Attributes:
        pretty_name: The dataset's name on the Hub.
        license: A Hub license id (``apache-2.0``, ``cc-by-4.0``, ...); ``other`` until
            whoever publishes it decides (the prompts keep their sources' licenses).
        language: Language codes of the prompts.
    """

    pretty_name: Annotated[str, Field(min_length=1)] = "UnsafeChain dataset"
    license: Annotated[str, Field(min_length=1)] = "other"
    language: Annotated[tuple[str, ...], Field(min_length=1)] = ("en",)


class RemoteStages(StrictModel):
    """Stages sent to gRPC services instead of the in-process engines.

    A stage named here calls the service at its address and loads no model of its
    own; the build asks the service what it runs (its ``Info`` RPC), records that in
    provenance, and stops with an error naming the stage when it is not what this
    configuration's section for the stage says. A correct stage run here re-judges
    through ``remote.judge`` when that is set.

    Attributes:
        generation: The generation service that runs the generate stage.
        judge: The judge service that runs the judge stage (and the re-judging).
        correction: The correction service that runs the correct stage.
    """

    generation: ClientSettings | None = None
    judge: ClientSettings | None = None
    correction: ClientSettings | None = None


DATASETS = "datasets"
"""The topic a finished build announces its dataset on (``<prefix>.<version>.datasets``)."""


class EventSettings(StrictModel):
    """What a finished build announces: one ``DatasetEvent`` on a Kafka topic, keyed by
    build id, for the training service (or ``unsafechain worker train``) to follow.

    Attributes:
        publish: ``null``: announce when the build runs on Kafka (``--bus kafka``);
            ``true``: also from an embedded build, through the brokers of the ``kafka``
            section; ``false``: never.
        topic: The topic's short name; the topic is
            ``<kafka.topic_prefix>.<kafka.version>.<topic>``.
        timeout_seconds: Bound on reaching the brokers and on the event's delivery
            (acknowledged by every in-sync replica).
    """

    publish: bool | None = None
    topic: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")] = DATASETS
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0

    def publishes(self, on_kafka: bool) -> bool:
        """Whether a build that ran on Kafka (``on_kafka``) or embedded announces."""
        return on_kafka if self.publish is None else self.publish


class BuildConfig(StrictModel):
    """The whole build.

    Attributes:
        build: The output folder, the seed and the concurrency.
        sources: The prompt sources, read in order; a later duplicate of an earlier
            prompt is removed.
        deduplication: Removing duplicate and near-duplicate prompts.
        decontamination: Removing prompts that overlap an evaluation benchmark.
        test_split: The held-out test split drawn per source.
        models: The model table: every ``model`` key of the stages names an entry.
        generation: Sampling K completions per prompt from the reasoning model.
        judging: The judges and the parts of a completion they judge.
        routing: When a prompt is hard, and which unsafe completions are corrected.
        rows: What becomes a training row.
        correction: Correcting unsafe completions, re-judged, with bounded retries.
        remote: Stages run by gRPC services instead of this process.
        kafka: The Kafka transport of ``--bus kafka`` and the workers.
        events: The announcement of the finished dataset on Kafka.
        assembly: Sizes and seed of the ``random`` and ``selected`` subsets.
        card: What the dataset card says that the build cannot know.
    """

    build: RunSettings
    sources: Annotated[list[SourceSettings], Field(min_length=1)]
    deduplication: DeduplicationSettings = DeduplicationSettings()
    decontamination: DecontaminationSettings = DecontaminationSettings()
    test_split: HeldOutSettings = HeldOutSettings()
    models: Annotated[dict[str, BackendSettings], Field(min_length=1)]
    generation: GenerationSettings
    judging: JudgingSettings
    routing: RoutingSettings = RoutingSettings()
    rows: RowSettings = RowSettings()
    correction: CorrectionSettings
    remote: RemoteStages = RemoteStages()
    kafka: KafkaSettings = KafkaSettings()
    events: EventSettings = EventSettings()
    assembly: AssemblySettings = AssemblySettings()
    card: CardSettings = CardSettings()

    @model_validator(mode="after")
    def _references_resolve(self) -> BuildConfig:
        references = [("generation.model", self.generation.model)]
        references += [(f"judging.{key}", name) for key, name in self.judging.model_references()]
        references.append(("correction.model", self.correction.model))
        problem = unknown_models(references, self.models)
        problem = problem or top_k_problem(
            "generation", self.generation.params(), self.generation.model, self.models
        )
        problem = problem or top_k_problem(
            "correction", self.correction.params(), self.correction.model, self.models
        )
        problem = problem or refusal_check_problem(self.correction, self.judging)
        if problem:
            raise ValueError(problem)
        names = [source.name for source in self.sources]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"sources: duplicate source name(s): {', '.join(duplicates)}")
        return self

    def fingerprint(self) -> str:
        """A hash of everything that decides the content of cases: a resumed build
        must have the same one. Output folder, concurrency, transport, the
        announcement, the subsets assembled from the cases and the card do not count."""
        content = self.model_dump(
            mode="json",
            exclude={
                "build": {"output", "concurrency", "queue_size"},
                "kafka": True,
                "events": True,
                "assembly": True,
                "card": True,
            },
        )
        return content_fingerprint(content)


def load_config(path: str | Path, overrides: dict[str, object] | None = None) -> BuildConfig:
    """Read and validate a build configuration.

    Args:
        path: YAML file.
        overrides: Dotted keys to set after reading, e.g. ``{"build.output": "x"}``.

    Raises:
        ConfigError: The file is missing or invalid; the message names the key.
    """
    return load_config_file(path, BuildConfig, overrides)
