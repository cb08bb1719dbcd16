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
    events.json      the announcements of the finished build on Kafka (see ``events``)
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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from unsafechain.backends.base import BackendError
from unsafechain.backends.pool import BackendPool
from unsafechain.correction.engine import CORRECTOR_CALL_FAILED, Corrector
from unsafechain.correction.factory import correction_engine, describe_corrector
from unsafechain.correction.refusal_check import REFUSAL_CHECK_COUNTS, refusal_check_counts
from unsafechain.dataset.assembly import Assembled, DatasetFiles, write_jsonl
from unsafechain.dataset.card import PLOT, CardCounts, write_card
from unsafechain.dataset.config import BuildConfig
from unsafechain.dataset.events import Announcement, EventNotPublished, announce
from unsafechain.dataset.plan import read_build_prompts
from unsafechain.dataset.rows import ONE_PER_PROMPT, RowKind, case_rows, case_to_row, status_name
from unsafechain.dataset.stages import CorrectStage, RouteStage, hard_case_rule
from unsafechain.demo.marker import standin_role
from unsafechain.domain.convert import (
    attempt_from_pb,
    identity_to_pb,
    model_ref_to_pb,
    sampling_to_pb,
)
from unsafechain.domain.files import write_atomically
from unsafechain.domain.memory import release_freed_memory
from unsafechain.domain.settings import Interrupted
from unsafechain.generation.engine import Generator
from unsafechain.generation.factory import describe_generator, generation_engine
from unsafechain.intake.answers import CHECKERS, Checker, code_sandbox
from unsafechain.intake.dedup import CONTAMINATED, DUPLICATE_EXACT, DUPLICATE_NEAR
from unsafechain.intake.prompts import PromptIntake
from unsafechain.intake.sources import TEST, PromptRecord
from unsafechain.intake.spool import RecordSpool
from unsafechain.judge.engine import JUDGE_CALL_FAILED, CompletionJudge
from unsafechain.judge.factory import describe_judge_stage, judge_engine
from unsafechain.runtime.client import StageMismatch
from unsafechain.sandbox.runner import SandboxError
from unsafechain.streaming.stages import (
    GENERATED,
    JUDGED,
    PROMPTS,
    RECORDS,
    TO_CORRECT,
    GenerateStage,
    JudgeStage,
    Stage,
    label_name,
)
from unsafechain.streaming.store import CaseStore, StoreError, claim_identity
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


TOPICS = (PROMPTS, GENERATED, JUDGED, TO_CORRECT, RECORDS)
"""The build's topics, in the order a case passes them."""


class StageEngines:
    """The engines of one build's stages, each built by its stage's factory from the
    config: in process over models shared by key, or a service's client for each stage
    the config sends to one.

    Each engine is built on first use, so a process that runs one stage (a Kafka
    worker) loads only the models that stage calls. The correct stage re-judges with
    the judge stage's engine, remote when ``remote.judge`` is set.
    """

    def __init__(self, config: BuildConfig):
        self._config = config
        self._pool = BackendPool(config.models)
        self._built: list[Generator | CompletionJudge | Corrector] = []

    @property
    def pool(self) -> BackendPool:
        """The models of the stages run here, each built on first use."""
        return self._pool

    @cached_property
    def generation(self) -> Generator:
        """The generate stage's engine."""
        engine = generation_engine(
            self._config.generation, self._pool, self._config.remote.generation
        )
        self._built.append(engine)
        return engine

    @cached_property
    def judge(self) -> CompletionJudge:
        """The judge stage's engine; the correct stage re-judges with it too."""
        engine = judge_engine(self._config.judging, self._pool, self._config.remote.judge)
        self._built.append(engine)
        return engine

    @cached_property
    def correction(self) -> Corrector:
        """The correct stage's engine."""
        config = self._config
        remote = config.remote.correction
        # A correction service re-judges with its own judges (checked to be the
        # configured ones) on the targets sent: none is built here for it.
        judge = None if remote else self.judge
        engine = correction_engine(config.correction, config.judging, self._pool, judge, remote)
        self._built.append(engine)
        return engine

    async def aclose(self) -> None:
        """Release every engine, model and service connection."""
        for engine in self._built:
            await engine.aclose()
        self._built.clear()
        await self._pool.aclose()


async def build_provenance(config: BuildConfig, build_id: str) -> case_pb2.Provenance:
    """What every case of the build records about the models and settings that make it:
    from the config for stages run here (no model is loaded for it), and as each
    service reports it for remote stages.

    Raises:
        BuildError: A service runs something else than the config says, or cannot be
            asked what it runs.
    """
    remote = config.remote
    try:
        generator = await describe_generator(config.generation, config.models, remote.generation)
        judges = await describe_judge_stage(config.judging, config.models, remote.judge)
        corrector = await describe_corrector(
            config.correction, config.judging, config.models, remote.correction
        )
    except StageMismatch as error:
        raise BuildError(f"remote: {error}") from None
    except BackendError as error:
        raise BuildError(f"remote: cannot ask a service what it runs: {error}") from None
    return case_pb2.Provenance(
        build_id=build_id,
        generator=model_ref_to_pb(generator),
        sampling=sampling_to_pb(config.generation.params()),
        judges=[identity_to_pb(identity) for identity in judges],
        corrector=model_ref_to_pb(corrector.model),
        max_correction_attempts=corrector.max_attempts,
        platform_version=platform_version(),
        config_fingerprint=config.fingerprint(),
    )


@dataclass(frozen=True)
class BuildResult:
    """Where the build wrote and what it counted, and its announcement when it made
    one."""

    output: Path
    manifest: dict
    announcement: Announcement | None = None


@dataclass(frozen=True)
class ResumeOptions:
    """How a build treats what an earlier run of it left.

    Attributes:
        retry_failed: Recompute the cases that failed for a transient reason (see
            :func:`failed_transiently`); those that failed on their merits are kept.
        repair: Drop damaged lines of the case store (their cases are recomputed)
            instead of refusing to go on.
    """

    retry_failed: bool = False
    repair: bool = False


def failed_transiently(case: case_pb2.Case) -> bool:
    """Whether ``case`` failed because a model or service call failed (unreachable,
    timed out, 5xx), not on its merits.

    Transient: a stage that failed; an ERROR verdict that a failed judge call gave; a
    correction attempt whose corrector or re-judging call failed. On their merits: no
    completion judged safe by judges that answered, corrections that did not pass
    re-judging or broke the format.
    """
    if case.status == case_pb2.CASE_STATUS_STAGE_FAILED:
        return True
    if case.status not in (
        case_pb2.CASE_STATUS_NO_SAFE_COMPLETION,
        case_pb2.CASE_STATUS_CORRECTION_FAILED,
    ):
        return False
    verdicts = [v for c in case.completions for v in c.verdicts]
    if any(v.error.startswith(JUDGE_CALL_FAILED) for v in verdicts):
        return True
    reasons = [a.failure_reason for c in case.corrections for a in c.attempts]
    return any(r.startswith(CORRECTOR_CALL_FAILED) or JUDGE_CALL_FAILED in r for r in reasons)


def run_build(
    config: BuildConfig, *, progress: bool = True, resume: ResumeOptions | None = None
) -> BuildResult:
    """Build the dataset ``config`` describes, resuming a build interrupted earlier.

    Raises:
        BuildError: The output folder holds a build with a different configuration,
            or its case store is damaged (see ``resume.repair``).
        SourceError: A prompt source cannot be read at all.
    """
    start = start_build(config, resume)
    try:
        if start.todo:
            try:
                asyncio.run(_run_cases(config, start.build_id, start.todo, start.store, progress))
            except KeyboardInterrupt:
                stored = len(start.store.ids)
                raise Interrupted(f"{stored} cases stored; run again to resume") from None
        return finish_build(config, start)
    finally:
        start.close()


@dataclass(frozen=True)
class BuildStart:
    """A build ready to run, whatever the transport.

    Attributes:
        output: The output folder.
        build_id: The build's identity, kept across resumes.
        intake: The prompts read.
        store: The finished cases (open; the caller closes it).
        todo: The prompt records whose cases the store does not hold yet, or holds
            as failed for a transient reason when those are retried (a view of the
            intake's records).
        resumed: How many cases the store held already and keeps.
        retried: How many stored cases are recomputed because they failed
            transiently.
        started: When this run started.
    """

    output: Path
    build_id: str
    intake: PromptIntake
    store: CaseStore
    todo: RecordSpool
    resumed: int
    started: datetime
    retried: int = 0

    def close(self) -> None:
        """Close the case store and remove the spool of the intake's records."""
        self.store.close()
        self.intake.records.close()


def start_build(config: BuildConfig, resume: ResumeOptions | None = None) -> BuildStart:
    """Read the prompts, prepare the output folder, check or create the build identity,
    report the rejected prompts and open the case store.

    Raises:
        BuildError: The output folder holds a build with a different configuration,
            or its case store is damaged and ``resume.repair`` is off.
        SourceError: A prompt source cannot be read at all.
    """
    resume = resume or ResumeOptions()
    started = datetime.now(UTC)
    output = Path(config.build.output)
    if output.exists() and not output.is_dir():
        raise BuildError(f"build.output: {output} exists and is not a folder")
    # The sources are read before the folder is claimed, so a start that fails on them
    # (a typo in a path) leaves nothing behind that a corrected config would trip on.
    intake = read_build_prompts(config)
    # The deduplication index is gone with the intake: its pages go back before the
    # cases start, not kept as the build's for its whole run.
    release_freed_memory()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BuildError(f"build.output: cannot create {output}: {error.strerror}") from None
    build_id = _build_identity(output, config)
    write_jsonl(output / "rejected.jsonl", [dataclasses.asdict(r) for r in intake.rejections])
    write_jsonl(output / "removed.jsonl", [removal.to_row() for removal in intake.removals])
    try:
        store = CaseStore(output / "cases.jsonl", repair=resume.repair)
    except StoreError as error:
        raise BuildError(str(error)) from None
    retried = 0
    if resume.retry_failed:
        again = [c.id for c in store.cases(intake.records.ids()) if failed_transiently(c)]
        store.forget(again)
        retried = len(again)
        if retried:
            logger.info("retrying %d cases that failed for a transient reason", retried)
    todo = intake.records.where(lambda record: record.id not in store.ids)
    resumed = len(intake.records) - len(todo)
    if resumed:
        logger.info("resuming: %d of %d cases already built", resumed, len(intake.records))
    return BuildStart(output, build_id, intake, store, todo, resumed, started, retried)


def finish_build(
    config: BuildConfig,
    start: BuildStart,
    dead_letters: DeadLetters | None = None,
    *,
    on_kafka: bool = False,
) -> BuildResult:
    """Write the dataset, the failed cases, the subsets, the manifest and the card from
    the stored cases, then announce the dataset when ``events`` says so.

    Args:
        config: The build configuration.
        start: The build as it started.
        dead_letters: What a Kafka build's stages gave up on.
        on_kafka: Whether the build ran on Kafka (announced unless ``events.publish``
            is false; an embedded build only when it is true).

    Raises:
        BuildError: The dataset is written but its event could not be published; the
            message says where the dataset is and that running the build again
            announces it.
    """
    manifest = _finalize(config, start, dead_letters or DeadLetters())
    if not config.events.publishes(on_kafka):
        return BuildResult(start.output, manifest)
    try:
        announcement = announce(config.kafka, config.events, start.output, manifest)
    except EventNotPublished as error:
        raise BuildError(
            f"the dataset is written to {start.output.resolve()}, but its event was not "
            f"published: {error}. Run the same build command again to publish it (the "
            "finished build is finished again and announced, nothing is recomputed)"
        ) from None
    return BuildResult(start.output, manifest, announcement)


def _build_identity(output: Path, config: BuildConfig) -> str:
    try:
        return claim_identity(
            output / "build.json",
            kind="build",
            fingerprint=config.fingerprint(),
            new_id=lambda: f"build-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}",
            output_key="build.output",
        )
    except StoreError as error:
        raise BuildError(str(error)) from None


async def _run_cases(
    config: BuildConfig,
    build_id: str,
    todo: Sequence[PromptRecord],
    store: CaseStore,
    progress: bool,
) -> None:
    provenance = await build_provenance(config, build_id)
    # Built inside the event loop: gRPC channels bind to the loop that creates them.
    engines = StageEngines(config)
    try:
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


STAGE_NAMES = ("generate", "judge", "route", "correct")


def build_stage(name: str, config: BuildConfig, engines: StageEngines) -> Stage:
    """The build's stage called ``name``; only the engines it calls are built."""
    if name == "generate":
        return GenerateStage(engines.generation, config.build.seed)
    if name == "judge":
        return JudgeStage(engines.judge)
    if name == "route":
        checking = config.rows.check_answers
        return RouteStage(
            config.routing.hard_fraction,
            correct=config.routing.correct,
            checkers=answer_checkers(config) if checking != "off" else None,
            drop_wrong=checking == "drop",
        )
    if name == "correct":
        return CorrectStage(
            engines.correction,
            config.build.seed,
            until_passed=config.correction.completions == "until_passed",
        )
    raise ValueError(f"no stage named {name!r} (have: {', '.join(STAGE_NAMES)})")


def answer_checkers(config: BuildConfig) -> dict[str, Checker]:
    """The gold-answer checker of each source whose loader has one, by source name.

    Raises:
        BuildError: An MBPP source is checked where the code sandbox cannot run.
    """
    if config.rows.check_answers != "off" and any(s.loader == "mbpp" for s in config.sources):
        try:
            code_sandbox()
        except SandboxError as error:
            raise BuildError(
                f"rows.check_answers: MBPP answers run in the sandbox, which cannot run "
                f"here ({error}); set rows.check_answers: off"
            ) from None
    return {
        source.name: CHECKERS[source.loader]
        for source in config.sources
        if source.loader in CHECKERS
    }


def build_stages(config: BuildConfig, engines: StageEngines) -> list[Stage]:
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
            split=record.split,
        ),
    )
    case.provenance.CopyFrom(provenance)
    return case


@dataclass
class DeadLetters:
    """Messages of a Kafka build given up on, by the stage that gave up, and messages
    no stage could decode (which name no build: counted when they arrived during the
    build's run).

    Attributes:
        by_stage: Dead-lettered cases of this build, per stage.
        undecodable: Undecodable messages seen during this run.
    """

    by_stage: Counter[str] = dataclasses.field(default_factory=Counter)
    undecodable: int = 0

    @property
    def total(self) -> int:
        """Every dead letter counted."""
        return sum(self.by_stage.values()) + self.undecodable


@dataclass
class CaseTally:
    """The counts of a build's stored cases, taken one case at a time.

    Attributes:
        policy: The row policy (``rows.policy``).
        written: Training rows of the training split.
        test_rows: Rows of the held-out test split (the same policy).
        failed: Cases without any row.
    """

    policy: str = ONE_PER_PROMPT
    written: int = 0
    test_rows: int = 0
    failed: int = 0
    judged: Counter[str] = dataclasses.field(default_factory=Counter)
    statuses: Counter[str] = dataclasses.field(default_factory=Counter)
    answer_checks: Counter[str] = dataclasses.field(default_factory=Counter)
    generated: int = 0
    truncated: int = 0
    hard: int = 0
    corrected_not_hard: int = 0
    correction_attempts: int = 0
    test_cases: int = 0
    refusal_checks: Counter[str] = dataclasses.field(default_factory=Counter)

    def add(self, case: case_pb2.Case) -> tuple[list[dict[str, Any]], RowKind]:
        """Count ``case``; its rows and what they are: ``training`` or ``test`` rows,
        or the one row of a ``failed`` case (a case without any row, with its reason)."""
        self.generated += len(case.completions)
        self.truncated += sum(c.truncated for c in case.completions)
        self.judged.update(label_name(c.label) for c in case.completions)
        self.statuses[status_name(case.status)] += 1
        self.hard += case.hard
        self.corrected_not_hard += bool(case.corrections) and not case.hard
        self.correction_attempts += sum(len(c.attempts) for c in case.corrections)
        attempts = [attempt_from_pb(a) for c in case.corrections for a in c.attempts]
        self.refusal_checks.update(refusal_check_counts(attempts))
        test = case.prompt.split == TEST
        self.test_cases += test
        rows = case_rows(case, self.policy)
        if not rows:
            self.failed += 1
            return [case_to_row(case)], "failed"
        if case.status == case_pb2.CASE_STATUS_SAFE_ORIGINAL and not test:
            self.answer_checks[case.response.answer_check or "unchecked"] += 1
        if test:
            self.test_rows += len(rows)
            return rows, "test"
        self.written += len(rows)
        return rows, "training"


def _finalize(config: BuildConfig, start: BuildStart, dead_letters: DeadLetters) -> dict:
    """Write the dataset's files from the stored cases of this build's prompts, in the
    prompts' order (the sources in the configuration's order, each in its file's),
    whatever order they finished in: two runs of a build write the same files, line for
    line. The cases stream from the store, one at a time, and no list of rows is held
    (what still grows with the prompts: the store's index of ids, and a few bytes a
    prompt in the intake's spool and the order of the store's lines)."""
    output = start.output
    order = start.intake.records.ids()
    tally = CaseTally(policy=config.rows.policy)
    counts = CardCounts()
    with DatasetFiles(output, config.assembly, config.build.seed) as files:
        try:
            for case in start.store.cases(order):
                rows, kind = tally.add(case)
                if kind == "failed":
                    files.add_failed(rows[0])
                else:
                    files.add(rows, test=kind == "test")
                for row in rows:
                    counts.add(row, kind)
        except StoreError as error:
            raise BuildError(str(error)) from None
        assembled = files.finish()
    manifest = _manifest(config, start, tally, dead_letters, assembled)
    # The card reads the finished manifest: every count, subset and file is in it.
    write_card(output, config, manifest, counts)
    write_atomically(output / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _row_rule(config: BuildConfig) -> str:
    """The manifest's sentence for what became a training row."""
    original = "the first completion judged safe and complete"
    if config.rows.check_answers != "off":
        original += " (a correct one first where a gold answer is checked"
        original += ", none when all are wrong)" if config.rows.check_answers == "drop" else ")"
    if config.rows.policy == ONE_PER_PROMPT:
        return (
            "one row per prompt: the first correction that passed re-judging for a hard "
            f"prompt, {original} for any other"
        )
    return (
        f"every correction that passed re-judging is a row; a prompt that is not hard also "
        f"gives {original}"
    )


def _manifest(
    config: BuildConfig,
    start: BuildStart,
    tally: CaseTally,
    dead_letters: DeadLetters,
    assembled: Assembled,
) -> dict[str, Any]:
    intake = start.intake
    removed = intake.removed_summary()
    by_reason = removed["by_reason"]
    return {
        "build_id": start.build_id,
        "platform_version": platform_version(),
        "config_fingerprint": config.fingerprint(),
        "finished_at": datetime.now(UTC).isoformat(),
        "seconds_this_run": round((datetime.now(UTC) - start.started).total_seconds(), 2),
        "counts": {
            "read": sum(intake.read_by_source.values()),
            "rejected": len(intake.rejections),
            "duplicates": by_reason[DUPLICATE_EXACT] + by_reason[DUPLICATE_NEAR],
            "duplicate_exact": by_reason[DUPLICATE_EXACT],
            "duplicate_near": by_reason[DUPLICATE_NEAR],
            "contaminated": by_reason[CONTAMINATED],
            "cases": len(intake.records),
            "resumed": start.resumed,
            "retried": start.retried,
            "test_cases": tally.test_cases,
            "generated": tally.generated,
            "truncated": tally.truncated,
            "judged_safe": tally.judged["safe"],
            "judged_unsafe": tally.judged["unsafe"],
            "judged_error": tally.judged["error"],
            "hard": tally.hard,
            "corrected_not_hard": tally.corrected_not_hard,
            "correction_attempts": tally.correction_attempts,
            "corrected": tally.statuses["corrected"],
            "wrong_answer": tally.statuses["wrong_answer"],
            "failed": tally.failed,
            "written": tally.written,
            "test_rows": tally.test_rows,
            "dead_lettered": dead_letters.total,
        },
        "by_status": dict(sorted(tally.statuses.items())),
        "answer_checks": {
            "mode": config.rows.check_answers,
            "checked_sources": sorted(answer_checkers(config)),
            "rows": dict(sorted(tally.answer_checks.items())),
        },
        "test_split": dict(intake.test_by_source),
        "refusal_check": {
            "mode": config.correction.refusal_check.mode.value,
            "judge": config.correction.refusal_check.judge,
            **{key: tally.refusal_checks[key] for key in REFUSAL_CHECK_COUNTS},
        },
        "dead_letters": {
            "by_stage": dict(sorted(dead_letters.by_stage.items())),
            "undecodable": dead_letters.undecodable,
        },
        "rules": {
            "hard_case": hard_case_rule(config.routing.hard_fraction, config.generation.samples),
            "training_row": _row_rule(config),
            "corrected": (
                "unsafe completions of hard prompts"
                if config.routing.correct == "hard"
                else "every unsafe completion, of any prompt"
            ),
            "truncated": (
                "a completion cut off by the token limit is judged as it is and counts "
                "toward hardness, but is never a row nor a side of a preference pair"
            ),
        },
        "read_by_source": dict(intake.read_by_source),
        "removed": removed,
        "models": {
            key: {
                "backend": m.backend,
                "model": m.model,
                "base_url": m.base_url,
                # A stand-in of `unsafechain standins` (its role), or None for a real model.
                "standin": standin_role(m.model) if m.backend == "transformers" else None,
            }
            for key, m in config.models.items()
        },
        "settings": config.model_dump(mode="json", exclude={"models"}),
        "subsets": assembled.subsets,
        "files": {
            "dataset": ["dataset.jsonl", "dataset.parquet"],
            "failed": "failed.jsonl",
            "rejected": "rejected.jsonl",
            "removed": "removed.jsonl",
            **assembled.files,
            "card": ["README.md", PLOT],
        },
        "rejections": [str(r) for r in intake.rejections[:50]],
    }
