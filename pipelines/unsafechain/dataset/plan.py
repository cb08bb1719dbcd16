"""``unsafechain build --dry-run``: what a build will do, before it does it.

The sources are read and screened as the build reads them (rejected records,
duplicates, contamination, the test split), so the prompt count is exact. What follows
from the models' answers is an expectation: with each completion judged unsafe with
probability ``unsafe_rate`` on its own, a case is hard with the binomial probability of
at least the routing threshold of its K completions being unsafe, and each unsafe
completion to correct takes between one and ``correction.max_attempts`` attempts (each
a corrector call and its re-judging). The time is a rough bound from stated
assumptions: tokens per second of one sequence, seconds per judge call, and the
build's concurrency.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from unsafechain.dataset.config import BuildConfig
from unsafechain.dataset.stages import hard_case_rule, unsafe_needed
from unsafechain.intake.prompts import PromptIntake, read_prompts


@dataclass(frozen=True)
class Assumptions:
    """What the plan assumes of models it does not run.

    Attributes:
        unsafe_rate: Share of completions judged unsafe (the paper's hard prompts:
            about a third to a half for an R1 distill).
        tokens_per_second: Decoding speed of one sequence (a 7B model on one GPU under
            vLLM: 30 to 60).
        judge_seconds: One judge call (Llama Guard 3 8B scoring a completion).
    """

    unsafe_rate: float = 0.4
    tokens_per_second: float = 40.0
    judge_seconds: float = 0.5


@dataclass(frozen=True)
class BuildPlan:
    """The numbers of a build (see the module's docstring for what is exact)."""

    config: BuildConfig
    assumptions: Assumptions
    read: int
    rejected: int
    removed: dict[str, int]
    test_cases: int
    cases: int
    samples: int
    judge_calls_per_completion: int
    hard_probability: float
    corrected_per_case: float

    @property
    def completions(self) -> int:
        return self.cases * self.samples

    @property
    def judge_calls(self) -> int:
        return self.completions * self.judge_calls_per_completion

    def correction_calls(self) -> tuple[int, int]:
        """Corrector calls, fewest (every correction passes at once) to most (every
        one takes all attempts)."""
        to_correct = self.cases * self.corrected_per_case
        attempts = self.config.correction.max_attempts
        return math.ceil(to_correct), math.ceil(to_correct * attempts)

    def seconds(self) -> tuple[float, float]:
        """A rough wall time, fewest to most correction attempts."""
        a = self.assumptions
        generation = self.cases * self.config.generation.max_new_tokens / a.tokens_per_second
        judging = self.judge_calls * a.judge_seconds
        per_correction = (
            self.config.correction.max_new_tokens / a.tokens_per_second
            + self.judge_calls_per_completion * a.judge_seconds
        )
        low, high = self.correction_calls()
        concurrency = self.config.build.concurrency
        return (
            (generation + judging + low * per_correction) / concurrency,
            (generation + judging + high * per_correction) / concurrency,
        )

    def describe(self) -> str:
        """The plan as the command prints it."""
        config, a = self.config, self.assumptions
        removed = ", ".join(f"{key} {count}" for key, count in self.removed.items()) or "none"
        low, high = self.correction_calls()
        fast, slow = self.seconds()
        rule = hard_case_rule(config.routing.hard_fraction, self.samples)
        lines = [
            f"build {config.build.output}",
            f"prompts: {self.read} read, {self.rejected} rejected, removed: {removed}; "
            f"{self.test_cases} held out as the test split; {self.cases} cases",
            f"generation: {self.cases} calls of K={self.samples} "
            f"({self.completions} completions, up to {config.generation.max_new_tokens} "
            "new tokens each)",
            f"judging: {self.judge_calls} judge calls ({self.judge_calls_per_completion} per "
            f"completion: {len(config.judging.judges)} judge(s) x "
            f"{len(config.judging.targets)} target(s))",
            f"expected with {a.unsafe_rate:.0%} of completions unsafe: "
            f"{self.hard_probability:.1%} of cases hard (hard: {rule}), about "
            f"{self.cases * self.hard_probability:.0f} hard cases",
            f"correction: {low} to {high} corrector calls (up to "
            f"{config.correction.max_attempts} attempts each), each re-judged "
            f"({self.judge_calls_per_completion} judge calls)",
            f"rough time: {_duration(fast)} to {_duration(slow)} at concurrency "
            f"{config.build.concurrency}, assuming {a.tokens_per_second:g} tokens/s per "
            f"sequence and {a.judge_seconds:g} s per judge call",
        ]
        return "\n".join(lines)


def read_build_prompts(config: BuildConfig) -> PromptIntake:
    """The build's prompts: its sources read and screened (rejected records, duplicates,
    contamination) and the test split drawn, as the build and its plan both read them."""
    return read_prompts(
        config.sources,
        config.deduplication,
        config.decontamination,
        config.test_split,
        config.build.seed,
    )


def plan_build(config: BuildConfig, assumptions: Assumptions | None = None) -> BuildPlan:
    """Read and screen the sources, then count; no model is loaded, nothing written."""
    assumptions = assumptions or Assumptions()
    intake = read_build_prompts(config)
    removed = Counter(removal.reason for removal in intake.removals)
    samples = config.generation.samples
    needed = unsafe_needed(config.routing.hard_fraction, samples)
    p = assumptions.unsafe_rate
    distribution = [
        math.comb(samples, k) * p**k * (1 - p) ** (samples - k) for k in range(samples + 1)
    ]
    hard = sum(distribution[needed:])
    if config.routing.correct == "hard":
        corrected = sum(k * distribution[k] for k in range(needed, samples + 1))
    else:
        corrected = samples * p
    if config.correction.completions == "until_passed":
        # The first unsafe completion of a case whose correction passes is the last.
        corrected = min(
            corrected, hard if config.routing.correct == "hard" else 1 - distribution[0]
        )
    return BuildPlan(
        config=config,
        assumptions=assumptions,
        read=sum(intake.read_by_source.values()),
        rejected=len(intake.rejections),
        removed=dict(sorted(removed.items())),
        test_cases=sum(intake.test_by_source.values()),
        cases=len(intake.records),
        samples=samples,
        judge_calls_per_completion=len(config.judging.judges) * len(config.judging.targets),
        hard_probability=hard,
        corrected_per_case=corrected,
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
