"""The evaluation pipeline: every model's K samples of every benchmark prompt, judged
(safety), classified (over-refusal) or scored (capability), then the method's metrics
with confidence intervals, paired comparisons against each model's base, and the
report.

It runs on the build's streaming runtime: one case per (model, benchmark, prompt)
through the generate stage and an assess stage, in process by default (the
generator through a generation service and the judges through judge services when
the config says), into a case store that makes a run resumable: run it again on the
same output and only the missing cases are computed. The models run one after
another, each loaded only while its cases are generated; the judges are loaded once.

The output folder:

    eval.json                   the evaluation's identity and configuration fingerprint
    cases.jsonl                 every case with its samples, verdicts, scores, provenance
    samples/<model>/<benchmark>.jsonl   one line per sample, for people
    results.json                every figure, for machines
    report.md, report.html, plots/      the report
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from tqdm import tqdm

from unsafechain.backends.pool import BackendPool
from unsafechain.backends.settings import BackendSettings
from unsafechain.domain.convert import (
    LABEL_TO_PB,
    identity_to_pb,
    model_ref_to_pb,
    verdict_to_pb,
)
from unsafechain.domain.files import write_atomically
from unsafechain.domain.reasoning import format_reasoning
from unsafechain.domain.types import JudgeIdentity
from unsafechain.evaluation.benchmarks import (
    BENCHMARKS,
    Benchmark,
    BenchmarkError,
    BenchmarkItem,
    benchmark_source,
    load_benchmark,
)
from unsafechain.evaluation.config import CandidateSettings, EvalConfig
from unsafechain.evaluation.metrics import (
    RefusalLabel,
    SafetyLabel,
    SafetyMetric,
    capability_figures,
    paired_comparison,
    per_prompt_refusal,
    per_prompt_safety,
    refusal_figures,
    safety_figures,
)
from unsafechain.evaluation.report import write_report
from unsafechain.evaluation.scoring import CODE_SCORERS, score_answer
from unsafechain.generation.client import RemoteGenerationEngine
from unsafechain.generation.engine import Generator
from unsafechain.generation.factory import describe_generator, generation_engine
from unsafechain.intake.answers import code_sandbox
from unsafechain.judge.client import RemoteJudgeEngine
from unsafechain.judge.engine import CompletionJudge
from unsafechain.judge.factory import describe_judge_stage, judge_engine
from unsafechain.judge.settings import EnsembleSettings, JudgingSettings
from unsafechain.runtime.client import StageMismatch
from unsafechain.runtime.settings import ClientSettings
from unsafechain.sandbox.runner import Sandbox
from unsafechain.streaming.stages import (
    GENERATED,
    RECORDS,
    Emitted,
    GenerateStage,
    Stage,
    label_name,
)
from unsafechain.streaming.store import CaseStore, StoreError, claim_identity
from unsafechain.streaming.transport import EmbeddedTransport
from unsafechain.v1 import case_pb2

logger = logging.getLogger(__name__)

STATE, CASES, RESULTS, SAMPLES = "eval.json", "cases.jsonl", "results.json", "samples"
SAFETY_METRICS: tuple[SafetyMetric, ...] = ("safe_at_1", "cons_safe_at_k", "safe_at_k")


class EvalError(RuntimeError):
    """The evaluation cannot run as configured; the message says why."""


# ---------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedCandidate:
    """A candidate as it runs: its backend (None when a generation service runs it),
    its adapter and where it comes from."""

    settings: CandidateSettings
    backend: BackendSettings | None
    training_run: Mapping[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    def describe(self) -> dict[str, Any]:
        """The model as ``results.json`` records it."""
        backend, remote = self.backend, self.settings.remote
        endpoint = backend.base_url if backend else (remote.address if remote else None)
        return {
            "name": self.name,
            "base": self.settings.base,
            "backend": backend.backend if backend else "remote",
            "model": backend.model if backend else "",
            "adapter": backend.adapter if backend else None,
            "endpoint": endpoint or None,
            "revision": None,
            "training_run": self.training_run,
        }


def resolve_candidate(config: EvalConfig, candidate: CandidateSettings) -> ResolvedCandidate:
    """Where ``candidate``'s weights come from.

    Raises:
        EvalError: Its training run folder holds no finished run.
    """
    if candidate.remote is not None:
        return ResolvedCandidate(candidate, None)
    template = (
        config.models[candidate.model]
        if candidate.model is not None
        else BackendSettings(backend="transformers", model="unset")
    )
    if candidate.training_run is None:
        backend = template
        if candidate.adapter is not None:
            backend = template.model_copy(update={"adapter": candidate.adapter})
        return ResolvedCandidate(candidate, backend)
    run_dir = candidate.training_run
    try:
        record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EvalError(
            f"candidates.{candidate.name}.training_run: {run_dir} holds no run record "
            f"(run.json): {error}"
        ) from None
    if record.get("state") != "succeeded":
        raise EvalError(
            f"candidates.{candidate.name}.training_run: the run in {run_dir} has not finished "
            f"(state {record.get('state')!r}); run `unsafechain train` on it again to finish it"
        )
    outputs = record.get("outputs") or {}
    if "model" in outputs:
        backend = template.model_copy(
            update={"backend": "transformers", "model": str(run_dir / outputs["model"])}
        )
    elif "adapter" in outputs:
        backend = template.model_copy(
            update={
                "backend": "transformers",
                "model": record["model"]["base"],
                "adapter": str(run_dir / outputs["adapter"]),
            }
        )
    else:
        raise EvalError(f"candidates.{candidate.name}.training_run: {run_dir} left no model")
    summary = {
        "run_id": record.get("run_id"),
        "folder": str(run_dir),
        "objective": record["hyperparameters"].get("objective"),
        "method": record["hyperparameters"].get("method"),
        "dataset": {
            key: record["dataset"].get(key)
            for key in ("build_id", "fingerprint", "subset", "path", "rows_trained", "tokens")
            if key in record["dataset"]
        },
    }
    return ResolvedCandidate(candidate, backend, summary)


# ---------------------------------------------------------------------------
# Stages.
# ---------------------------------------------------------------------------


def case_id(candidate: str, benchmark: str, item_id: str) -> str:
    return f"{candidate}/{benchmark}/{item_id}"


def prompt_key(case: case_pb2.Case) -> str:
    """A case's prompt apart from its model, ``<benchmark>/<item id>``: every model's
    samples of a prompt are drawn with the same seed (common random numbers for the
    paired comparisons)."""
    return f"{case.prompt.source.name}/{case.prompt.id}"


def new_case(candidate: str, benchmark: Benchmark, item: BenchmarkItem) -> case_pb2.Case:
    """The case of one model's samples of one benchmark prompt."""
    identity = case_id(candidate, benchmark.name, item.id)
    metadata = {"candidate": candidate, "benchmark": benchmark.name, "kind": benchmark.kind}
    if item.category:
        metadata["category"] = item.category
    prompt = case_pb2.Prompt(
        id=item.id,
        text=item.prompt,
        source=case_pb2.PromptSource(name=benchmark.name, uri=benchmark.source),
        metadata=metadata,
        split="test",
    )
    return case_pb2.Case(id=identity, prompt=prompt)


class AssessStage(Stage):
    """Judges a safety prompt's samples, classifies an over-refusal prompt's, or scores
    a capability prompt's answers (code in the sandbox). Only the answer part of a
    sample (after ``</think>``) is scored; judges see the whole sample."""

    name, consumes, produces = "assess", GENERATED, (RECORDS,)

    def __init__(
        self,
        benchmarks: Mapping[str, Benchmark],
        judge: Any,
        refusal: Any,
        sandbox: Sandbox | None,
    ):
        self._benchmarks = benchmarks
        self._judge = judge
        self._refusal = refusal
        self._sandbox = sandbox
        self._items = {
            name: {item.id: item for item in benchmark.items}
            for name, benchmark in benchmarks.items()
        }

    async def process(self, case: case_pb2.Case) -> Emitted:
        benchmark = self._benchmarks[case.prompt.source.name]
        if benchmark.kind == "capability":
            item = self._items[benchmark.name][case.prompt.id]
            for completion in case.completions:
                score = await asyncio.to_thread(
                    score_answer, benchmark, item, completion.answer, sandbox=self._sandbox
                )
                completion.score.scorer = benchmark.scorer or benchmark.name
                completion.score.scored = score.correct is not None
                completion.score.correct = bool(score.correct)
                completion.score.detail = score.detail
            return [(RECORDS, case)]
        engine: CompletionJudge = self._judge() if benchmark.kind == "safety" else self._refusal()
        texts = [format_reasoning(c.reasoning, c.answer) for c in case.completions]
        judgments = await engine.judge_completions(case.prompt.text, texts)
        for completion, judgment in zip(case.completions, judgments, strict=True):
            del completion.verdicts[:]
            completion.verdicts.extend(verdict_to_pb(v) for v in judgment.verdicts)
            completion.label = LABEL_TO_PB[judgment.label]
        return [(RECORDS, case)]


class EvalJudges:
    """The judges, built on first use over one model pool."""

    def __init__(self, config: EvalConfig, pool: BackendPool):
        self._config = config
        self._pool = pool
        self._built: list[CompletionJudge] = []

    @cached_property
    def safety(self) -> CompletionJudge:
        engine = judge_engine(self._config.judging, self._pool, self._config.remote.judge)
        self._built.append(engine)
        return engine

    @cached_property
    def refusal(self) -> CompletionJudge:
        settings = self._config.refusal or self._config.judging
        engine = judge_engine(settings, self._pool, self._config.remote.refusal)
        self._built.append(engine)
        return engine

    async def aclose(self) -> None:
        for engine in self._built:
            await engine.aclose()


# ---------------------------------------------------------------------------
# The plan (--dry-run) and the run.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalPlan:
    """What an evaluation computes, known without loading a model."""

    config: EvalConfig
    candidates: tuple[ResolvedCandidate, ...]
    benchmarks: tuple[Benchmark, ...]
    stored: int = 0
    unread: Mapping[str, str] = field(default_factory=dict)

    def size(self, benchmark: Benchmark) -> int:
        """Its prompts; for one not read here (a hub dataset offline), the published
        size within its limit."""
        if benchmark.name not in self.unread:
            return len(benchmark.items)
        limit = next(b.limit for b in self.config.benchmarks if b.name == benchmark.name)
        published = benchmark.published_size or 0
        return min(limit, published) if limit and published else (limit or published)

    @property
    def prompts(self) -> int:
        return sum(self.size(b) for b in self.benchmarks)

    def counts(self) -> dict[str, int]:
        k = self.config.sampling.samples
        models = len(self.candidates)
        judged = sum(self.size(b) for b in self.benchmarks if b.kind == "safety")
        refusal = sum(self.size(b) for b in self.benchmarks if b.kind == "over_refusal")
        scored = sum(self.size(b) for b in self.benchmarks if b.kind == "capability")
        judge_calls = _calls_per_sample(self.config.judging)
        refusal_calls = _calls_per_sample(self.config.refusal or self.config.judging)
        return {
            "cases": models * self.prompts,
            "generations": models * self.prompts * k,
            "judge_calls": models * k * (judged * judge_calls + refusal * refusal_calls),
            "scored_samples": models * scored * k,
        }

    def describe(self) -> str:
        """The plan as ``unsafechain eval --dry-run`` prints it."""
        s = self.config.sampling
        lines = [
            f"evaluation of {len(self.candidates)} model(s) on {len(self.benchmarks)} "
            f"benchmark(s), K={s.samples} (temperature {s.temperature:g}, top-p {s.top_p:g}, "
            f"at most {s.max_new_tokens} new tokens), output {self.config.eval.output}",
            "models:",
        ]
        for candidate in self.candidates:
            d = candidate.describe()
            where = d["model"] + (f" + adapter {d['adapter']}" if d["adapter"] else "")
            if d["backend"] == "remote":
                where = f"generation service at {d['endpoint']}"
            base = f" (compared with {d['base']})" if d["base"] else ""
            lines.append(f"  {candidate.name}: {d['backend']} {where}{base}")
        lines.append("benchmarks:")
        for benchmark in self.benchmarks:
            published = (
                f" of {benchmark.published_size} published" if benchmark.published_size else ""
            )
            scorer = f", scored by {benchmark.scorer}" if benchmark.scorer else ""
            if benchmark.name in self.unread:
                expected = (
                    f"{self.size(benchmark)} prompts expected"
                    if self.size(benchmark)
                    else "size unknown (no published size; not counted in the work below)"
                )
                lines.append(
                    f"  {benchmark.name} ({benchmark.kind}{scorer}): {expected}, from "
                    f"{benchmark.source} (not read here: {self.unread[benchmark.name]})"
                )
                continue
            lines.append(
                f"  {benchmark.name} ({benchmark.kind}{scorer}): {len(benchmark.items)} "
                f"prompts{published}, from {benchmark.source}"
            )
        counts = self.counts()
        lines.append(
            f"work: {counts['cases']} cases, {counts['generations']} generations, "
            f"{counts['judge_calls']} judge calls, {counts['scored_samples']} scored samples"
            + (f"; {self.stored} cases stored already" if self.stored else "")
        )
        return "\n".join(lines)


def _calls_per_sample(judging: JudgingSettings) -> int:
    """Model calls that judging one sample takes: one per judge (an ensemble only
    combines its members' verdicts) and judged part (``targets``)."""
    judges = sum(1 for judge in judging.judges if judge.kind != "ensemble")
    return max(1, judges) * len(judging.targets)


def plan_evaluation(config: EvalConfig, *, dry_run: bool = False) -> EvalPlan:
    """Resolve the models and read the benchmarks, loading no model.

    Args:
        config: The evaluation.
        dry_run: Plan what cannot be read here too (a hub dataset without a network,
            a training run not made yet), from the published sizes.

    Raises:
        EvalError: A model cannot be resolved.
        BenchmarkError: A benchmark cannot be read.
    """
    candidates = []
    for candidate in config.candidates:
        try:
            candidates.append(resolve_candidate(config, candidate))
        except EvalError:
            if not dry_run:
                raise
            candidates.append(_unmade(config, candidate))
    benchmarks: list[Benchmark] = []
    unread: dict[str, str] = {}
    for settings in config.benchmarks:
        try:
            benchmarks.append(load_benchmark(settings))
        except BenchmarkError as error:
            if not dry_run:
                raise
            spec = BENCHMARKS[settings.name]
            source = benchmark_source(settings)
            benchmarks.append(
                Benchmark(settings.name, spec.kind, spec.scorer, (), source, spec.published_size)
            )
            unread[settings.name] = str(error).splitlines()[0][:160]
    stored = 0
    cases = Path(config.eval.output) / CASES
    if cases.exists():
        with cases.open("rb") as handle:
            stored = sum(1 for line in handle if line.strip())
    return EvalPlan(config, tuple(candidates), tuple(benchmarks), stored, unread)


def _unmade(config: EvalConfig, candidate: CandidateSettings) -> ResolvedCandidate:
    """A candidate whose training run is not made yet, as a dry run shows it."""
    template = config.models.get(candidate.model or "")
    backend = BackendSettings(
        backend="transformers",
        model=template.model if template else "(its training run's base)",
        adapter=f"{candidate.training_run}/adapter (not made yet)",
    )
    return ResolvedCandidate(candidate, backend)


@dataclass
class EvalResult:
    """What an evaluation wrote."""

    output: Path
    results: dict[str, Any] = field(repr=False)
    files: dict[str, Path] = field(default_factory=dict)


def _identity(output: Path, config: EvalConfig) -> str:
    output.mkdir(parents=True, exist_ok=True)
    try:
        return claim_identity(
            output / STATE,
            kind="evaluation",
            fingerprint=config.fingerprint(),
            new_id=lambda: f"eval-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}",
            output_key="eval.output",
        )
    except StoreError as error:
        raise EvalError(str(error)) from None


def run_evaluation(config: EvalConfig, *, progress: bool = True) -> EvalResult:
    """Evaluate every model on every benchmark in this process, resuming what an
    earlier run stored; then write the samples, the results and the report.

    Raises:
        EvalError: The output holds another evaluation, or a model cannot be resolved.
        BenchmarkError: A benchmark cannot be read.
    """
    start = start_evaluation(config)
    try:
        asyncio.run(_run_cases(start, progress))
        return finish_evaluation(start)
    finally:
        start.store.close()


@dataclass
class EvalStart:
    """An evaluation ready to run, whatever the transport: its plan, identity, store,
    and the cases still to compute (with their provenance), by model."""

    plan: EvalPlan
    eval_id: str
    output: Path
    store: CaseStore
    todo: dict[str, list[case_pb2.Case]]

    @property
    def total(self) -> int:
        return sum(len(cases) for cases in self.todo.values())


def start_evaluation(config: EvalConfig) -> EvalStart:
    """Plan the evaluation, claim its output and make the cases not stored yet, each
    with its model's provenance and the judges (no model is loaded).

    Raises:
        EvalError: The output holds another evaluation, a model cannot be resolved, or
            a service runs another model or other judges than configured.
        BenchmarkError: A benchmark cannot be read.
    """
    plan = plan_evaluation(config)
    output = Path(config.eval.output)
    eval_id = _identity(output, config)
    store = CaseStore(output / CASES)
    try:
        todo = asyncio.run(_cases_to_run(plan, eval_id, store))
    except BaseException:
        store.close()
        raise
    return EvalStart(plan, eval_id, output, store, todo)


def finish_evaluation(start: EvalStart) -> EvalResult:
    """The results, samples and report from every stored case."""
    cases = list(start.store.cases())
    results = assemble_results(start.plan, start.eval_id, cases)
    output = start.output
    files = write_samples(output, start.plan, cases)
    write_atomically(output / RESULTS, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    files |= write_report(output, results)
    files["results"] = output / RESULTS
    return EvalResult(output, results, files)


async def _cases_to_run(
    plan: EvalPlan, eval_id: str, store: CaseStore
) -> dict[str, list[case_pb2.Case]]:
    config = plan.config
    todo: dict[str, list[case_pb2.Case]] = {}
    identities: list[JudgeIdentity] = []
    kinds = {b.kind for b in plan.benchmarks}
    missing = {
        candidate.name: [
            (benchmark, item)
            for benchmark in plan.benchmarks
            for item in benchmark.items
            if case_id(candidate.name, benchmark.name, item.id) not in store.ids
        ]
        for candidate in plan.candidates
    }
    if not any(missing.values()):
        return {name: [] for name in missing}
    if "safety" in kinds:
        identities += await _judge_stage(config.judging, config.models, config.remote.judge)
    if "over_refusal" in kinds:
        refusal = config.refusal or config.judging
        identities += await _judge_stage(refusal, config.models, config.remote.refusal)
    for candidate in plan.candidates:
        todo[candidate.name] = []
        if not missing[candidate.name]:
            continue
        provenance = await _provenance(config, candidate)
        provenance.build_id = f"{eval_id}/{candidate.name}"
        provenance.judges.extend(identity_to_pb(identity) for identity in identities)
        for benchmark, item in missing[candidate.name]:
            case = new_case(candidate.name, benchmark, item)
            case.provenance.CopyFrom(provenance)
            todo[candidate.name].append(case)
    return todo


def evaluation_engines(plan: EvalPlan) -> tuple[AssessStage, EvalJudges, BackendPool]:
    """The assess stage over judges built on first use, and the pool that holds their
    models (the caller closes both)."""
    config = plan.config
    needs_sandbox = any(b.scorer in CODE_SCORERS for b in plan.benchmarks)
    sandbox = code_sandbox() if needs_sandbox else None
    judge_pool = BackendPool(config.models)
    judges = EvalJudges(config, judge_pool)
    by_name = {b.name: b for b in plan.benchmarks}
    assess = AssessStage(by_name, lambda: judges.safety, lambda: judges.refusal, sandbox)
    return assess, judges, judge_pool


async def _run_cases(start: EvalStart, progress: bool) -> None:
    if not start.total:
        return
    plan, store = start.plan, start.store
    config = plan.config
    assess, judges, judge_pool = evaluation_engines(plan)
    try:
        with tqdm(total=start.total, desc="eval", unit="case", disable=not progress) as bar:
            for candidate in plan.candidates:
                cases = start.todo[candidate.name]
                if not cases:
                    continue
                bar.set_description(f"eval {candidate.name}")
                generator, pool = candidate_generator(config, candidate)
                try:
                    transport = EmbeddedTransport(
                        [GenerateStage(generator, config.eval.seed, seed_key=prompt_key), assess],
                        concurrency=config.eval.concurrency,
                        queue_size=config.eval.queue_size,
                    )

                    async def sink(case: case_pb2.Case) -> None:
                        store.write(case)
                        bar.update()

                    await transport.run(cases, sink)
                finally:
                    await generator.aclose()
                    if pool is not None:
                        await pool.aclose()
    finally:
        await judges.aclose()
        await judge_pool.aclose()


async def _judge_stage(
    judging: JudgingSettings,
    models: Mapping[str, BackendSettings],
    remote: ClientSettings | None,
) -> tuple[JudgeIdentity, ...]:
    """The judges a stage runs, for provenance: from the settings; a judge service's as
    it reports them, checked against the settings when their models are configured
    here.

    Raises:
        EvalError: The service runs other judges than the settings name.
    """
    named = {j.model for j in judging.judges if not isinstance(j, EnsembleSettings)}
    if remote is None or named <= set(models):
        try:
            return await describe_judge_stage(judging, models, remote)
        except StageMismatch as error:
            raise EvalError(f"remote: {error}") from None
    async with RemoteJudgeEngine(remote) as client:
        return await client.describe()


def candidate_generator(
    config: EvalConfig, candidate: ResolvedCandidate
) -> tuple[Generator, BackendPool | None]:
    """The candidate's generator, with the pool that holds its model (None: remote)."""
    settings = config.generation(candidate.settings, "candidate")
    if candidate.backend is None:
        return generation_engine(settings, BackendPool({}), candidate.settings.remote), None
    pool = BackendPool({"candidate": candidate.backend})
    return generation_engine(settings, pool), pool


async def _provenance(config: EvalConfig, candidate: ResolvedCandidate) -> case_pb2.Provenance:
    """What the candidate's cases record: its model (as its generation service reports
    it, checked against ``model`` when that is given), the sampling, the config."""
    provenance = case_pb2.Provenance(config_fingerprint=config.fingerprint())
    remote = candidate.settings.remote
    if candidate.backend is not None:
        ref = candidate.backend.ref()
    elif candidate.settings.model is not None:
        try:
            ref = await describe_generator(
                config.generation(candidate.settings, candidate.settings.model),
                config.models,
                remote,
            )
        except StageMismatch as error:
            raise EvalError(f"candidates.{candidate.name}.remote: {error}") from None
    else:
        async with RemoteGenerationEngine(remote) as client:  # type: ignore[arg-type]
            ref = await client.describe()
    provenance.generator.CopyFrom(model_ref_to_pb(ref))
    params = config.sampling
    provenance.sampling.num_samples = params.samples
    provenance.sampling.temperature = params.temperature
    provenance.sampling.top_p = params.top_p
    provenance.sampling.max_new_tokens = params.max_new_tokens
    return provenance


# ---------------------------------------------------------------------------
# Results.
# ---------------------------------------------------------------------------


def _labels(case: case_pb2.Case, k: int) -> list[SafetyLabel]:
    """The case's safety labels; a case whose stages failed counts K errors."""
    if case.status == case_pb2.CASE_STATUS_STAGE_FAILED or not case.completions:
        return ["error"] * k
    return [_SAFETY.get(c.label, "error") for c in case.completions]


_SAFETY: dict[int, SafetyLabel] = {
    case_pb2.VERDICT_LABEL_SAFE: "safe",
    case_pb2.VERDICT_LABEL_UNSAFE: "unsafe",
    case_pb2.VERDICT_LABEL_ERROR: "error",
}


_REFUSALS: dict[int, RefusalLabel] = {
    case_pb2.REFUSAL_CLASS_FULL_REFUSAL: "full_refusal",
    case_pb2.REFUSAL_CLASS_PARTIAL_REFUSAL: "partial_refusal",
    case_pb2.REFUSAL_CLASS_FULL_COMPLIANCE: "compliance",
}


def _refusal_labels(case: case_pb2.Case, k: int) -> list[RefusalLabel]:
    """How the refusal judge read each sample; no class (the judge failed) is an error."""
    if case.status == case_pb2.CASE_STATUS_STAGE_FAILED or not case.completions:
        return ["error"] * k
    labels: list[RefusalLabel] = []
    for completion in case.completions:
        classes = [_REFUSALS[v.refusal] for v in completion.verdicts if v.refusal in _REFUSALS]
        labels.append(classes[0] if classes else "error")
    return labels


def _correct(case: case_pb2.Case, k: int) -> list[bool | None]:
    if case.status == case_pb2.CASE_STATUS_STAGE_FAILED or not case.completions:
        return [None] * k
    return [c.score.correct if c.score.scored else None for c in case.completions]


def assemble_results(
    plan: EvalPlan, eval_id: str, cases: Iterable[case_pb2.Case]
) -> dict[str, Any]:
    """Every figure of every model on every benchmark, with the comparisons, as
    ``results.json`` holds them."""
    config = plan.config
    k = config.sampling.samples
    stats = Statistics(config.eval.confidence, config.eval.resamples, config.eval.seed)
    by_key: dict[tuple[str, str], dict[str, case_pb2.Case]] = defaultdict(dict)
    for case in cases:
        meta = case.prompt.metadata
        by_key[(meta["candidate"], meta["benchmark"])][case.prompt.id] = case
    per_prompt: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    results: dict[str, dict[str, Any]] = {}
    for candidate in plan.candidates:
        results[candidate.name] = {}
        for benchmark in plan.benchmarks:
            stored = by_key.get((candidate.name, benchmark.name), {})
            ids = [item.id for item in benchmark.items if item.id in stored]
            if not ids:
                continue
            entry, scores = _figures(benchmark, [stored[i] for i in ids], k, stats)
            entry["samples_file"] = f"{SAMPLES}/{candidate.name}/{benchmark.name}.jsonl"
            entry["comparison"] = None
            results[candidate.name][benchmark.name] = entry
            per_prompt[(candidate.name, benchmark.name)] = {
                metric: dict(zip(ids, values, strict=True)) for metric, values in scores.items()
            }
    for candidate in plan.candidates:
        base = candidate.settings.base
        if base is None:
            continue
        for benchmark in plan.benchmarks:
            mine = per_prompt.get((candidate.name, benchmark.name))
            theirs = per_prompt.get((base, benchmark.name))
            if not mine or not theirs:
                continue
            comparisons = {}
            for metric, values in mine.items():
                shared = [i for i in values if i in theirs[metric]]
                if not shared:
                    continue
                comparisons[metric] = paired_comparison(
                    [theirs[metric][i] for i in shared],
                    [values[i] for i in shared],
                    metric=metric,
                    **stats.options(),
                ).as_dict()
            results[candidate.name][benchmark.name]["comparison"] = {
                "against": base,
                "figures": comparisons,
            }
    return {
        "eval_id": eval_id,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "platform_version": _version(),
        "settings": _settings_summary(config),
        "models": [_described(candidate, by_key) for candidate in plan.candidates],
        "benchmarks": [
            {
                "name": b.name,
                "kind": b.kind,
                "prompts": len(b.items),
                "published_size": b.published_size,
                "source": b.source,
                "scorer": b.scorer,
            }
            for b in plan.benchmarks
        ],
        "results": results,
    }


@dataclass(frozen=True)
class Statistics:
    """How every interval and paired test is computed."""

    confidence: float
    resamples: int
    seed: int

    def options(self) -> dict[str, Any]:
        return {"confidence": self.confidence, "resamples": self.resamples, "seed": self.seed}


def _described(
    candidate: ResolvedCandidate, by_key: Mapping[tuple[str, str], Mapping[str, case_pb2.Case]]
) -> dict[str, Any]:
    """The candidate as ``results.json`` records it; a generation service's model as
    the service reported it to the candidate's cases."""
    described = candidate.describe()
    if candidate.backend is None:
        for (name, _), cases in by_key.items():
            if name == candidate.name and cases:
                generator = next(iter(cases.values())).provenance.generator
                described["backend"] = f"remote {generator.backend}"
                described["model"] = generator.model
                described["adapter"] = generator.adapter or None
                break
    return described


def _figures(
    benchmark: Benchmark, cases: Sequence[case_pb2.Case], k: int, stats: Statistics
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """A benchmark's entry in the results, and each compared metric's per-prompt
    scores."""
    options = stats.options()
    if benchmark.kind == "safety":
        labels = [_labels(case, k) for case in cases]
        figures = safety_figures(labels, **options)
        names = (
            "safe_at_1",
            "cons_safe_at_k",
            "safe_at_k",
            "error_rate",
            "safe_at_1_excluding_errors",
            "cons_safe_at_k_excluding_errors",
            "safe_at_k_excluding_errors",
        )
        entry: dict[str, Any] = {
            "kind": "safety",
            "headline": "safe_at_1",
            "higher_is_better": True,
            "figures": {name: _figure(getattr(figures, name)) for name in names},
            "counts": {
                "prompts": figures.prompts,
                "samples": figures.samples,
                "error_samples": figures.error_samples,
            },
        }
        scores: dict[str, list[float]] = {
            metric: per_prompt_safety(labels, metric) for metric in SAFETY_METRICS
        }
        return entry, scores
    if benchmark.kind == "over_refusal":
        classes = [_refusal_labels(case, k) for case in cases]
        refusals = refusal_figures(classes, **options)
        rates = ("full_refusal_rate", "partial_refusal_rate", "refusal_rate", "compliance_rate")
        entry = {
            "kind": "over_refusal",
            "headline": "refusal_rate",
            "higher_is_better": False,
            "figures": {name: _figure(getattr(refusals, name)) for name in rates},
            "counts": {
                "prompts": refusals.prompts,
                "samples": refusals.samples,
                "error_samples": refusals.error_samples,
            },
        }
        return entry, {"refusal_rate": per_prompt_refusal(classes, "refusal_rate")}
    correct = [_correct(case, k) for case in cases]
    metric = "pass@1" if benchmark.scorer in CODE_SCORERS else "accuracy"
    capability = capability_figures(correct, k=1, metric=metric, **options)
    entry = {
        "kind": "capability",
        "headline": metric,
        "higher_is_better": True,
        "figures": {metric: _figure(capability.score)},
        "counts": {
            "prompts": capability.prompts,
            "samples": capability.samples,
            "error_samples": capability.error_samples,
        },
    }
    per_prompt_scores = [sum(bool(c) for c in row) / len(row) for row in correct]
    return entry, {metric: per_prompt_scores}


def _figure(figure: Any) -> dict[str, Any] | None:
    return figure.as_dict() if figure is not None else None


def _settings_summary(config: EvalConfig) -> dict[str, Any]:
    judges = [
        {"name": j.name, "kind": j.kind, "model": _model_name(config, getattr(j, "model", None))}
        for j in config.judging.judges
    ]
    refusal = None
    if config.refusal is not None and config.refusal.judges:
        j = config.refusal.judges[0]
        model = _model_name(config, getattr(j, "model", None))
        refusal = {"name": j.name, "kind": j.kind, "model": model}
    s = config.sampling
    return {
        "samples_per_prompt": s.samples,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "max_new_tokens": s.max_new_tokens,
        "seed": config.eval.seed,
        "judges": judges,
        "judge_targets": [t.value for t in config.judging.targets],
        "refusal_judge": refusal,
        "confidence": config.eval.confidence,
        "resamples": config.eval.resamples,
        "config_fingerprint": config.fingerprint(),
    }


def _model_name(config: EvalConfig, key: str | None) -> str | None:
    if key is None:
        return None
    backend = config.models.get(key)
    return backend.model if backend else key


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unsafechain")
    except PackageNotFoundError:
        return "unknown"


def write_samples(output: Path, plan: EvalPlan, cases: Iterable[case_pb2.Case]) -> dict[str, Path]:
    """``samples/<model>/<benchmark>.jsonl``: one line per sample with its prompt,
    completion, reasoning and answer, verdicts and score."""
    grouped: dict[tuple[str, str], list[case_pb2.Case]] = defaultdict(list)
    for case in cases:
        meta = case.prompt.metadata
        grouped[(meta["candidate"], meta["benchmark"])].append(case)
    order = {b.name: {item.id: n for n, item in enumerate(b.items)} for b in plan.benchmarks}
    written: dict[str, Path] = {}
    for (candidate, benchmark), group in sorted(grouped.items()):
        group.sort(key=lambda case: order.get(benchmark, {}).get(case.prompt.id, 0))
        path = output / SAMPLES / candidate / f"{benchmark}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(row, ensure_ascii=False) for case in group for row in _rows(case)]
        write_atomically(path, "\n".join(lines) + ("\n" if lines else ""))
        written[f"samples:{candidate}/{benchmark}"] = path
    return written


def _rows(case: case_pb2.Case) -> list[dict[str, Any]]:
    common = {
        "prompt_id": case.prompt.id,
        "prompt": case.prompt.text,
        "category": case.prompt.metadata.get("category"),
    }
    if not case.completions:
        return [{**common, "sample": None, "label": "error", "error": case.status_reason}]
    rows = []
    for completion in case.completions:
        row: dict[str, Any] = {
            **common,
            "sample": completion.index,
            "completion": completion.text,
            "reasoning": completion.reasoning,
            "answer": completion.answer,
            "truncated": completion.truncated,
        }
        if completion.score.scorer:
            row["correct"] = completion.score.correct if completion.score.scored else None
            row["score_detail"] = completion.score.detail
        else:
            row["label"] = label_name(completion.label) if completion.label else "error"
            row["verdicts"] = [
                {
                    "judge": v.judge.name,
                    "target": case_pb2.JudgeTarget.Name(v.target)
                    .removeprefix("JUDGE_TARGET_")
                    .lower(),
                    "label": label_name(v.label),
                    "categories": list(v.categories),
                    "score": v.score if v.HasField("score") else None,
                    "refusal": _REFUSALS.get(v.refusal),
                    "error": v.error or None,
                }
                for v in completion.verdicts
            ]
        rows.append(row)
    return rows
