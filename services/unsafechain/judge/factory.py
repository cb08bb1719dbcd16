"""The one place a judge stage is built from its settings: every judge kind in process
over models of the pool, or a client of a judge service."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from unsafechain.backends.pool import BackendPool
from unsafechain.backends.settings import BackendSettings
from unsafechain.domain.types import JudgeIdentity
from unsafechain.judge.client import RemoteJudgeEngine
from unsafechain.judge.engine import CompletionJudge, Judge, JudgeEngine, LlamaGuardJudge
from unsafechain.judge.ensemble import EnsembleJudge
from unsafechain.judge.refusal import RefusalJudge
from unsafechain.judge.rubric import RubricJudge
from unsafechain.judge.settings import (
    EnsembleSettings,
    JudgeSettings,
    JudgingSettings,
    RefusalSettings,
    RubricSettings,
)
from unsafechain.runtime.client import StageMismatch, describe_judges, same_judges
from unsafechain.runtime.settings import ClientSettings


def build_judge_engine(judging: JudgingSettings, pool: BackendPool) -> JudgeEngine:
    """The judges ``judging`` configures, in process; ensembles judge through their
    members, and only judges with ``report: true`` give verdicts of their own."""
    built: dict[str, Judge] = {}
    # Members first, so that an ensemble finds them built; members are never ensembles.
    for judge in sorted(judging.judges, key=lambda j: isinstance(j, EnsembleSettings)):
        built[judge.name] = _judge(judge, pool, built)
    return JudgeEngine([built[judge.name] for judge in judging.reported], judging.targets)


def _judge(judge: JudgeSettings, pool: BackendPool, built: Mapping[str, Judge]) -> Judge:
    match judge:
        case EnsembleSettings():
            return EnsembleJudge(
                [built[name] for name in judge.members],
                name=judge.name,
                rule=judge.rule,
                threshold=judge.threshold,
            )
        case RubricSettings():
            return RubricJudge(
                pool.get(judge.model),
                name=judge.name,
                threshold=judge.threshold,
                template=Path(judge.template) if judge.template else None,
            )
        case RefusalSettings():
            return refusal_judge(judge, pool)
    return LlamaGuardJudge(
        pool.get(judge.model),
        name=judge.name,
        prompt_format=judge.prompt_format,
        threshold=judge.threshold,
        top_logprobs=judge.top_logprobs,
    )


def refusal_judge(settings: RefusalSettings, pool: BackendPool) -> RefusalJudge:
    """The refusal judge ``settings`` describe, over a model of the pool."""
    return RefusalJudge(
        pool.get(settings.model),
        name=settings.name,
        compliance_is_unsafe=settings.compliance_is_unsafe,
        template=Path(settings.template) if settings.template else None,
        request_template=Path(settings.request_template) if settings.request_template else None,
    )


def judge_engine(
    judging: JudgingSettings, pool: BackendPool, remote: ClientSettings | None = None
) -> CompletionJudge:
    """The judges ``judging`` configures; through the service at ``remote`` if given
    (no model is loaded here then, and the configured targets go with every call)."""
    if remote is not None:
        return RemoteJudgeEngine(remote, judging.targets)
    return build_judge_engine(judging, pool)


def judge_identities(
    judging: JudgingSettings, models: Mapping[str, BackendSettings]
) -> tuple[JudgeIdentity, ...]:
    """The reporting judges as provenance records them, from the settings alone."""
    return tuple(
        JudgeIdentity(
            judge.name,
            judge.kind,
            None if isinstance(judge, EnsembleSettings) else models[judge.model].ref(),
        )
        for judge in judging.reported
    )


async def describe_judge_stage(
    judging: JudgingSettings,
    models: Mapping[str, BackendSettings],
    remote: ClientSettings | None = None,
) -> tuple[JudgeIdentity, ...]:
    """The judges for provenance: from the settings, or as the service at ``remote``
    reports them, checked against the settings.

    Raises:
        StageMismatch: The service runs other judges than the settings configure.
        BackendError: The service cannot be asked.
    """
    expected = judge_identities(judging, models)
    if remote is None:
        return expected
    async with RemoteJudgeEngine(remote) as client:
        reported = await client.describe()
    if not same_judges(reported, expected):
        raise StageMismatch(
            f"the judge service at {remote.address} runs {describe_judges(reported)}; "
            f"the configuration names {describe_judges(expected)}"
        )
    return reported
