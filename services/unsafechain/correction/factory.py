"""The one place a correction stage is built from its settings: in process over a
model of the pool, re-judging with the judge stage's engine, or a client of a
correction service."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from unsafechain.backends.pool import BackendPool
from unsafechain.backends.settings import BackendSettings
from unsafechain.correction.client import RemoteCorrectionEngine
from unsafechain.correction.engine import CorrectionEngine, CorrectionTemplates, Corrector
from unsafechain.correction.refusal_check import RefusalChecker
from unsafechain.correction.settings import CorrectionSettings
from unsafechain.domain.types import CorrectorInfo, JudgeIdentity, RefusalCheckMode
from unsafechain.judge.engine import CompletionJudge
from unsafechain.judge.factory import judge_identities, refusal_judge
from unsafechain.judge.settings import JudgingSettings, RefusalSettings
from unsafechain.runtime.client import (
    StageMismatch,
    describe_judges,
    describe_model,
    same_judges,
    same_model,
)
from unsafechain.runtime.settings import ClientSettings


def correction_engine(
    settings: CorrectionSettings,
    judging: JudgingSettings,
    pool: BackendPool,
    judge: CompletionJudge | None,
    remote: ClientSettings | None = None,
) -> Corrector:
    """The corrector ``settings`` describe, re-judging with ``judge`` (the judge stage's
    engine, in process or remote) and taking the refusal check with its judge from
    ``judging``; through the service at ``remote`` if given, which re-judges with its
    own judges (checked against ``judging`` by :func:`describe_corrector`) on the
    targets of ``judging`` that every call sends (``judge`` is not used then).

    Raises:
        ValueError: Neither a judge nor a remote service is given.
    """
    if remote is not None:
        return RemoteCorrectionEngine(remote, judging.targets)
    if judge is None:
        raise ValueError("an in-process corrector needs a judge to re-judge its attempts")
    templates = settings.templates
    return CorrectionEngine(
        pool.get(settings.model),
        judge,
        params=settings.params(),
        max_attempts=settings.max_attempts,
        templates=CorrectionTemplates.load(Path(templates) if templates else None),
        refusal_check=_refusal_checker(settings, judging, pool),
    )


def _refusal_checker(
    settings: CorrectionSettings, judging: JudgingSettings, pool: BackendPool
) -> RefusalChecker | None:
    check = settings.refusal_check
    if check.mode == RefusalCheckMode.OFF:
        return None
    return RefusalChecker(refusal_judge(_refusal_settings(settings, judging), pool), check.mode)


def _refusal_settings(settings: CorrectionSettings, judging: JudgingSettings) -> RefusalSettings:
    # The settings validators made sure the check names a refusal judge.
    [judge] = [j for j in judging.judges if j.name == settings.refusal_check.judge]
    assert isinstance(judge, RefusalSettings)
    return judge


def corrector_info(
    settings: CorrectionSettings,
    judging: JudgingSettings,
    models: Mapping[str, BackendSettings],
) -> CorrectorInfo:
    """The corrector as provenance records it, from the settings alone."""
    mode = settings.refusal_check.mode
    refusal_judge = None
    if mode != RefusalCheckMode.OFF:
        judge = _refusal_settings(settings, judging)
        refusal_judge = JudgeIdentity(judge.name, judge.kind, models[judge.model].ref())
    return CorrectorInfo(
        models[settings.model].ref(),
        settings.params(),
        settings.max_attempts,
        judge_identities(judging, models),
        mode,
        refusal_judge,
    )


async def describe_corrector(
    settings: CorrectionSettings,
    judging: JudgingSettings,
    models: Mapping[str, BackendSettings],
    remote: ClientSettings | None = None,
) -> CorrectorInfo:
    """The corrector for provenance: from the settings, or as the service at ``remote``
    reports it, checked against the settings, so that what provenance records (the
    bound on attempts among it) is what runs.

    Raises:
        StageMismatch: The service runs another corrector, sampling, bound, judges or
            refusal check than the settings configure.
        BackendError: The service cannot be asked.
    """
    expected = corrector_info(settings, judging, models)
    if remote is None:
        return expected
    async with RemoteCorrectionEngine(remote) as client:
        reported = await client.describe()
    where = f"the correction service at {remote.address}"
    if not same_model(reported.model, expected.model):
        raise StageMismatch(
            f"{where} runs {describe_model(reported.model)}; the configuration names "
            f"{describe_model(expected.model)} (models.{settings.model})"
        )
    for name in ("temperature", "top_p", "top_k", "max_new_tokens"):
        ours, theirs = getattr(expected.params, name), getattr(reported.params, name)
        if abs(ours - theirs) > 1e-6:
            raise StageMismatch(f"{where} samples with {name} {theirs}; the configuration: {ours}")
    if reported.max_attempts != expected.max_attempts:
        raise StageMismatch(
            f"{where} allows {reported.max_attempts} attempts; the configuration "
            f"max_attempts is {expected.max_attempts}"
        )
    if not same_judges(reported.judges, expected.judges):
        raise StageMismatch(
            f"{where} re-judges with {describe_judges(reported.judges)}; the configuration "
            f"names {describe_judges(expected.judges)}"
        )
    if reported.refusal_check != expected.refusal_check or not same_judges(
        _listed(reported.refusal_judge), _listed(expected.refusal_judge)
    ):
        raise StageMismatch(
            f"{where} takes the refusal check {_describe_check(reported)}; the "
            f"configuration (correction.refusal_check): {_describe_check(expected)}"
        )
    return reported


def _listed(judge: JudgeIdentity | None) -> list[JudgeIdentity]:
    return [judge] if judge is not None else []


def _describe_check(info: CorrectorInfo) -> str:
    mode, judge = info.refusal_check.value, info.refusal_judge
    return mode if judge is None else f"{mode} with {describe_judges([judge])}"
