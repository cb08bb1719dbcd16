"""The embedded build: read prompts, run every stage in this process, write the dataset.

Output folder:
    cases.jsonl      every finished case, appended as it completes (resume state)
    dataset.jsonl    one training row per prompt that has a response, with provenance
    dataset.parquet  the same rows
    failed.jsonl     cases kept without a response, each with its reason
    rejected.jsonl   prompt records that could not be used, with file, line and reason
    removed.jsonl    prompts removed as duplicates or benchmark contamination, each with
                     the id it matches and the reason
    manifest.json    counts per stage, models, settings, build id, subsets, files
    README.md        the dataset card, with its plot unsafe_rate.png
    subsets/, datasets/, release/, pairs.jsonl
                     the subsets and their exports (see ``assembly``)
    build.json       build id and config fingerprint, checked on resume
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from unsafechain.backends.base import ModelBackend
from unsafechain.backends.settings import create_backend
from unsafechain.correction.engine import CorrectionEngine, CorrectionTemplates
from unsafechain.dataset.assembly import assemble, write_jsonl
from unsafechain.dataset.config import (
    BuildConfig,
    EnsembleSettings,
    JudgeSettings,
    RefusalSettings,
    RubricSettings,
)
from unsafechain.dataset.rows import case_to_row, has_response, status_name
from unsafechain.domain.convert import identity_to_pb, model_ref_to_pb, sampling_to_pb
from unsafechain.domain.types import JudgeIdentity
from unsafechain.generation.engine import GenerationEngine
from unsafechain.intake.decontamination import Decontaminator
from unsafechain.intake.dedup import (
    CONTAMINATED,
    DUPLICATE_EXACT,
    DUPLICATE_NEAR,
    Deduplicator,
    Removal,
)
from unsafechain.intake.sources import PromptRecord, Rejection, read_source
from unsafechain.judge.engine import Judge, JudgeEngine, LlamaGuardJudge
from unsafechain.judge.ensemble import EnsembleJudge
from unsafechain.judge.refusal import RefusalJudge
from unsafechain.judge.rubric import RubricJudge
from unsafechain.runtime.client import (
    RemoteCorrectionEngine,
    RemoteJudgeEngine,
    remote_generation_engine,
)
from unsafechain.streaming.stages import (
    CorrectStage,
    GenerateStage,
    JudgeStage,
    RouteStage,
    Stage,
    label_name,
)
from unsafechain.streaming.store import CaseStore
from unsafechain.streaming.transport import EmbeddedTransport
from unsafechain.v1 import case_pb2

logger = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """The build cannot start or go on (e.g. the output folder holds another build)."""


def platform_version() -> str:
    """The installed version of the platform."""
    try:
        return metadata.version("unsafechain")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class PromptIntake:
    """What reading the sources gave.

    Attributes:
        records: The prompts to build cases for.
        rejections: Records that could not be used.
        removals: Prompts removed as duplicates or benchmark contamination.
        read_by_source: Valid prompts read, per source.
        benchmarks: Benchmark prompts indexed for decontamination, per benchmark.
    """

    records: list[PromptRecord] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    removals: list[Removal] = field(default_factory=list)
    read_by_source: Counter = field(default_factory=Counter)
    benchmarks: Counter = field(default_factory=Counter)

    def removed_summary(self) -> dict:
        """The removals counted by reason, by benchmark and by source, for the manifest."""
        by_reason = Counter({DUPLICATE_EXACT: 0, DUPLICATE_NEAR: 0, CONTAMINATED: 0})
        by_benchmark = Counter(dict.fromkeys(self.benchmarks, 0))
        by_source: dict[str, Counter] = {}
        for removal in self.removals:
            by_reason[removal.reason] += 1
            by_source.setdefault(removal.record.source, Counter())[removal.reason] += 1
            if removal.benchmark is not None:
                by_benchmark[removal.benchmark] += 1
        return {
            "by_reason": dict(by_reason),
            "contaminated_by_benchmark": dict(by_benchmark),
            "by_source": {source: dict(counts) for source, counts in by_source.items()},
            "benchmark_prompts": dict(self.benchmarks),
        }


def read_prompts(config: BuildConfig) -> PromptIntake:
    """Read every source in config order; drop prompts that overlap a benchmark, then
    duplicates of a prompt kept before them (exact after normalisation, or near).

    Raises:
        SourceError: A source or benchmark cannot be read at all.
    """
    intake = PromptIntake()
    decontaminator = Decontaminator(config.decontamination)
    intake.benchmarks.update(decontaminator.prompts_by_benchmark)
    deduplicator = Deduplicator(config.deduplication)
    for source in config.sources:
        for item in read_source(source):
            if isinstance(item, Rejection):
                logger.warning("rejected %s", item)
                intake.rejections.append(item)
                continue
            intake.read_by_source[source.name] += 1
            # Contamination first: a contaminated prompt must not be kept as the
            # original that later duplicates are compared with.
            removal = decontaminator.check(item) or deduplicator.check(item)
            if removal is not None:
                intake.removals.append(removal)
                continue
            intake.records.append(item)
    summary = intake.removed_summary()["by_reason"]
    logger.info("prompts: %d kept, removed %s", len(intake.records), summary)
    return intake


class Engines:
    """The engines of one build: in process over backends shared by model key, or a
    remote service's client for each stage the config sends to one.

    Each engine is built on first use, so a process that runs one stage (a Kafka
    worker) loads only the models that stage calls.
    """

    def __init__(self, config: BuildConfig):
        self._config = config
        self._backends: dict[str, ModelBackend] = {}
        self._remote: list = []

    @cached_property
    def generation(self) -> GenerationEngine:
        """The generation engine."""
        config, generation = self._config, self._config.generation
        if config.remote.generation:
            engine = remote_generation_engine(
                config.remote.generation,
                generation.params(),
                system_prompt=generation.system_prompt,
                ref=config.models[generation.model].ref(),
            )
            self._remote.append(engine.backend)
            return engine
        return GenerationEngine(
            self._backend(config, generation.model),
            generation.params(),
            system_prompt=generation.system_prompt,
        )

    @cached_property
    def judge(self) -> JudgeEngine | RemoteJudgeEngine:
        """The judge engine."""
        config = self._config
        if config.remote.judge:
            identities = [
                JudgeIdentity(
                    judge.name,
                    judge.kind,
                    None
                    if isinstance(judge, EnsembleSettings)
                    else config.models[judge.model].ref(),
                )
                for judge in config.judging.reported
            ]
            engine = RemoteJudgeEngine(config.remote.judge, identities)
            self._remote.append(engine)
            return engine
        return self._local_judge(config)

    @cached_property
    def correction(self) -> CorrectionEngine | RemoteCorrectionEngine:
        """The correction engine."""
        config, correction = self._config, self._config.correction
        if config.remote.correction:
            engine = RemoteCorrectionEngine(
                config.remote.correction,
                ref=config.models[correction.model].ref(),
                max_attempts=correction.max_attempts,
            )
            self._remote.append(engine)
            return engine
        templates = correction.templates
        return CorrectionEngine(
            self._backend(config, correction.model),
            self.judge if not config.remote.judge else self._local_judge(config),
            params=correction.params(),
            max_attempts=correction.max_attempts,
            templates=CorrectionTemplates.load(Path(templates) if templates else None),
        )

    def _local_judge(self, config: BuildConfig) -> JudgeEngine:
        built: dict[str, Judge] = {}
        # Members first, so that an ensemble finds them built; members are never ensembles.
        for judge in sorted(config.judging.judges, key=lambda j: isinstance(j, EnsembleSettings)):
            built[judge.name] = self._judge(config, judge, built)
        reported = [built[judge.name] for judge in config.judging.reported]
        return JudgeEngine(reported, config.judging.targets)

    def _judge(self, config: BuildConfig, judge: JudgeSettings, built: dict[str, Judge]) -> Judge:
        """The judge ``judge`` configures; an ensemble takes its members from ``built``."""
        match judge:
            case EnsembleSettings():
                members = [built[name] for name in judge.members]
                return EnsembleJudge(
                    members, name=judge.name, rule=judge.rule, threshold=judge.threshold
                )
            case RubricSettings():
                return RubricJudge(
                    self._backend(config, judge.model),
                    name=judge.name,
                    threshold=judge.threshold,
                    template=Path(judge.template) if judge.template else None,
                )
            case RefusalSettings():
                return RefusalJudge(
                    self._backend(config, judge.model),
                    name=judge.name,
                    compliance_is_unsafe=judge.compliance_is_unsafe,
                    template=Path(judge.template) if judge.template else None,
                )
        return LlamaGuardJudge(
            self._backend(config, judge.model),
            name=judge.name,
            prompt_format=judge.prompt_format,
            threshold=judge.threshold,
        )

    def _backend(self, config: BuildConfig, key: str) -> ModelBackend:
        if key not in self._backends:
            logger.info("starting model %r (%s)", key, config.models[key].model)
            self._backends[key] = create_backend(config.models[key])
        return self._backends[key]

    async def aclose(self) -> None:
        """Release every backend and service connection."""
        for closable in [*self._backends.values(), *self._remote]:
            await closable.aclose()
        self._backends.clear()
        self._remote.clear()


@dataclass(frozen=True)
class BuildResult:
    """Where the build wrote and what it counted."""

    output: Path
    manifest: dict


def run_build(config: BuildConfig, *, progress: bool = True) -> BuildResult:
    """Build the dataset ``config`` describes, resuming a build interrupted earlier.

    Raises:
        BuildError: The output folder holds a build with a different configuration.
        SourceError: A prompt source cannot be read at all.
    """
    start = start_build(config)
    try:
        if start.todo:
            try:
                asyncio.run(_run_cases(config, start.build_id, start.todo, start.store, progress))
            except KeyboardInterrupt:
                stored = len(start.store.ids)
                logger.warning("interrupted: %d cases stored; run again to resume", stored)
                raise
        return finish_build(config, start)
    finally:
        start.store.close()


@dataclass(frozen=True)
class BuildStart:
    """A build ready to run, whatever the transport.

    Attributes:
        output: The output folder.
        build_id: The build's identity, kept across resumes.
        intake: The prompts read.
        store: The finished cases (open; the caller closes it).
        todo: The prompt records whose cases the store does not hold yet.
        resumed: How many cases the store held already.
        started: When this run started.
    """

    output: Path
    build_id: str
    intake: PromptIntake
    store: CaseStore
    todo: list[PromptRecord]
    resumed: int
    started: datetime


def start_build(config: BuildConfig) -> BuildStart:
    """Prepare the output folder, check or create the build identity, read the prompts,
    report the rejected ones and open the case store.

    Raises:
        BuildError: The output folder holds a build with a different configuration.
        SourceError: A prompt source cannot be read at all.
    """
    started = datetime.now(UTC)
    output = Path(config.build.output)
    output.mkdir(parents=True, exist_ok=True)
    build_id = _build_identity(output, config)
    intake = read_prompts(config)
    write_jsonl(output / "rejected.jsonl", [dataclasses.asdict(r) for r in intake.rejections])
    write_jsonl(output / "removed.jsonl", [removal.to_row() for removal in intake.removals])
    store = CaseStore(output / "cases.jsonl")
    todo = [record for record in intake.records if record.id not in store.ids]
    resumed = len(intake.records) - len(todo)
    if resumed:
        logger.info("resuming: %d of %d cases already built", resumed, len(intake.records))
    return BuildStart(output, build_id, intake, store, todo, resumed, started)


def finish_build(config: BuildConfig, start: BuildStart) -> BuildResult:
    """Write the dataset, the failed cases and the manifest from the stored cases."""
    return BuildResult(start.output, _finalize(config, start))


def _build_identity(output: Path, config: BuildConfig) -> str:
    state_path = output / "build.json"
    fingerprint = config.fingerprint()
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state["config_fingerprint"] != fingerprint:
            raise BuildError(
                f"{output} holds build {state['build_id']} made with a different configuration "
                f"(fingerprint {state['config_fingerprint']}, now {fingerprint}); "
                "choose another build.output or remove the folder"
            )
        return state["build_id"]
    build_id = f"build-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    state_path.write_text(
        json.dumps({"build_id": build_id, "config_fingerprint": fingerprint}, indent=2) + "\n"
    )
    return build_id


async def _run_cases(
    config: BuildConfig,
    build_id: str,
    todo: list[PromptRecord],
    store: CaseStore,
    progress: bool,
) -> None:
    # Built inside the event loop: gRPC channels bind to the loop that creates them.
    engines = Engines(config)
    try:
        provenance = build_provenance(build_id, engines)
        stages = build_stages(config, engines)
        transport = EmbeddedTransport(
            stages, concurrency=config.build.concurrency, queue_size=config.build.queue_size
        )
        counts: Counter = Counter()
        with tqdm(total=len(todo), desc="build", unit="case", disable=not progress) as bar:

            async def sink(case: case_pb2.Case) -> None:
                store.write(case)
                counts[status_name(case.status)] += 1
                bar.set_postfix(counts, refresh=False)
                bar.update()

            await transport.run((new_case(record, provenance) for record in todo), sink)
    finally:
        await engines.aclose()


def build_provenance(build_id: str, engines: Engines) -> case_pb2.Provenance:
    """What every case of the build records about the models and settings that made it."""
    return case_pb2.Provenance(
        build_id=build_id,
        generator=model_ref_to_pb(engines.generation.backend.ref),
        sampling=sampling_to_pb(engines.generation.params),
        judges=[identity_to_pb(identity) for identity in engines.judge.identities],
        corrector=model_ref_to_pb(engines.correction.ref),
        max_correction_attempts=engines.correction.max_attempts,
        platform_version=platform_version(),
    )


STAGE_NAMES = ("generate", "judge", "route", "correct")


def build_stage(name: str, config: BuildConfig, engines: Engines) -> Stage:
    """The build's stage called ``name``; only the engines it calls are built."""
    if name == "generate":
        return GenerateStage(engines.generation, config.build.seed)
    if name == "judge":
        return JudgeStage(engines.judge)
    if name == "route":
        return RouteStage(config.routing.hard_fraction)
    if name == "correct":
        return CorrectStage(
            engines.correction,
            config.build.seed,
            until_passed=config.correction.completions == "until_passed",
        )
    raise ValueError(f"no stage named {name!r} (have: {', '.join(STAGE_NAMES)})")


def build_stages(config: BuildConfig, engines: Engines) -> list[Stage]:
    """The build's stages, in order, over ``engines``."""
    return [build_stage(name, config, engines) for name in STAGE_NAMES]


def new_case(record: PromptRecord, provenance: case_pb2.Provenance) -> case_pb2.Case:
    """The case a prompt record starts as."""
    case = case_pb2.Case(
        id=record.id,
        prompt=case_pb2.Prompt(
            id=record.id,
            text=record.text,
            source=case_pb2.PromptSource(name=record.source, uri=record.uri, line=record.line),
            metadata=record.metadata,
        ),
    )
    case.provenance.CopyFrom(provenance)
    return case


def _finalize(config: BuildConfig, start: BuildStart) -> dict:
    intake, output, store = start.intake, start.output, start.store
    wanted = {record.id for record in intake.records}
    rows, failed = [], []
    judged: Counter = Counter()
    statuses: Counter = Counter()
    generated = hard = attempts = 0
    for case in store.cases():
        if case.id not in wanted:
            continue
        generated += len(case.completions)
        judged.update(label_name(c.label) for c in case.completions)
        statuses[status_name(case.status)] += 1
        hard += case.hard
        attempts += sum(len(c.attempts) for c in case.corrections)
        (rows if has_response(case) else failed).append(case_to_row(case))
    write_jsonl(output / "dataset.jsonl", rows)
    write_jsonl(output / "failed.jsonl", failed)
    pq.write_table(pa.Table.from_pylist(rows), output / "dataset.parquet")
    removed = intake.removed_summary()
    manifest = {
        "build_id": start.build_id,
        "platform_version": platform_version(),
        "config_fingerprint": config.fingerprint(),
        "finished_at": datetime.now(UTC).isoformat(),
        "seconds_this_run": round((datetime.now(UTC) - start.started).total_seconds(), 2),
        "counts": {
            "read": sum(intake.read_by_source.values()),
            "rejected": len(intake.rejections),
            "duplicates": removed["by_reason"][DUPLICATE_EXACT]
            + removed["by_reason"][DUPLICATE_NEAR],
            "duplicate_exact": removed["by_reason"][DUPLICATE_EXACT],
            "duplicate_near": removed["by_reason"][DUPLICATE_NEAR],
            "contaminated": removed["by_reason"][CONTAMINATED],
            "cases": len(intake.records),
            "resumed": start.resumed,
            "generated": generated,
            "judged_safe": judged["safe"],
            "judged_unsafe": judged["unsafe"],
            "judged_error": judged["error"],
            "hard": hard,
            "correction_attempts": attempts,
            "corrected": statuses["corrected"],
            "failed": len(failed),
            "written": len(rows),
        },
        "by_status": dict(sorted(statuses.items())),
        "rules": {
            "hard_case": (
                f"a prompt is hard when at least {config.routing.hard_fraction:.0%} of its "
                f"K={config.generation.samples} completions are judged unsafe"
            ),
            "training_row": (
                "one row per prompt: the first correction that passed re-judging for a hard "
                "prompt, the first completion judged safe for any other"
            ),
        },
        "read_by_source": dict(intake.read_by_source),
        "removed": removed,
        "models": {
            key: {"backend": m.backend, "model": m.model, "base_url": m.base_url}
            for key, m in config.models.items()
        },
        "settings": config.model_dump(mode="json", exclude={"models"}),
        "files": {
            "dataset": ["dataset.jsonl", "dataset.parquet"],
            "failed": "failed.jsonl",
            "rejected": "rejected.jsonl",
            "removed": "removed.jsonl",
        },
        "rejections": [str(r) for r in intake.rejections[:50]],
    }
    assembled = assemble(output, config, rows, failed, manifest)
    manifest["subsets"] = assembled["subsets"]
    manifest["files"].update(assembled["files"])
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
