"""A judge that combines the verdicts of several judges by a rule."""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Sequence

from unsafechain.domain.types import (
    JudgeIdentity,
    Verdict,
    VerdictLabel,
    combine_labels,
)
from unsafechain.judge.engine import Judge, JudgeItem


class EnsembleRule(enum.StrEnum):
    """How an ensemble decides.

    ``majority``: unsafe when at least half of the members that answered say unsafe
    (a tie counts as unsafe, so a split vote keeps the completion out of the safe
    set). ``any_unsafe``: unsafe when any member says unsafe; else an error when any
    member errored, as an unanswered member cannot vouch for safety. ``mean_score``:
    the mean of the answering members' scores against the threshold, members without
    a score counting 1 for unsafe and 0 for safe.
    """

    MAJORITY = "majority"
    ANY_UNSAFE = "any_unsafe"
    MEAN_SCORE = "mean_score"


class EnsembleJudge(Judge):
    """Several judges as one: each member judges every item, the rule combines.

    The verdict's ``raw_output`` is JSON naming the rule and every member's label,
    score and error, so provenance shows how the ensemble decided. Its ``score`` is the
    fraction of answering members that said unsafe (``majority``), their mean score
    (``mean_score``) or absent (``any_unsafe``). Whatever the rule, the verdict is
    ``ERROR`` when every member errored.

    Args:
        members: The judges combined.
        name: Configured name, recorded on verdicts.
        rule: How member verdicts are combined.
        threshold: For ``mean_score``, the mean at or above which the verdict is unsafe.
    """

    kind = "ensemble"

    def __init__(
        self,
        members: Sequence[Judge],
        *,
        name: str = "ensemble",
        rule: EnsembleRule = EnsembleRule.MAJORITY,
        threshold: float = 0.5,
    ):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self._members = tuple(members)
        self._rule = EnsembleRule(rule)
        self._threshold = threshold
        self._identity = JudgeIdentity(name=name, kind=self.kind)

    @property
    def identity(self) -> JudgeIdentity:
        return self._identity

    async def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        if not items:
            return []
        per_member = await asyncio.gather(*(member.judge(items) for member in self._members))
        return [
            self._combine(item, verdicts)
            for item, verdicts in zip(items, zip(*per_member, strict=True), strict=True)
        ]

    def _combine(self, item: JudgeItem, verdicts: Sequence[Verdict]) -> Verdict:
        raw = json.dumps(
            {
                "rule": self._rule.value,
                "members": [
                    {
                        "judge": verdict.judge.name,
                        "label": verdict.label.value,
                        "score": verdict.score,
                        "error": verdict.error,
                    }
                    for verdict in verdicts
                ],
            }
        )
        answered = [verdict for verdict in verdicts if verdict.label != VerdictLabel.ERROR]
        if not answered:
            return Verdict(
                self._identity,
                item.target,
                VerdictLabel.ERROR,
                raw_output=raw,
                error="every ensemble member errored",
            )
        score = None
        if self._rule == EnsembleRule.ANY_UNSAFE:
            label = combine_labels(verdicts)
        elif self._rule == EnsembleRule.MAJORITY:
            score = sum(_is_unsafe(verdict) for verdict in answered) / len(answered)
            label = VerdictLabel.UNSAFE if score >= 0.5 else VerdictLabel.SAFE
        else:
            score = sum(_score(verdict) for verdict in answered) / len(answered)
            label = VerdictLabel.UNSAFE if score >= self._threshold else VerdictLabel.SAFE
        categories: dict[str, None] = {}
        if label == VerdictLabel.UNSAFE:
            for verdict in answered:
                if _is_unsafe(verdict):
                    categories.update(dict.fromkeys(verdict.categories))
        error = "a member errored and none said unsafe" if label == VerdictLabel.ERROR else ""
        return Verdict(self._identity, item.target, label, tuple(categories), score, raw, error)

    async def check(self) -> None:
        for member in self._members:
            await member.check()


def _is_unsafe(verdict: Verdict) -> bool:
    return verdict.label == VerdictLabel.UNSAFE


def _score(verdict: Verdict) -> float:
    return verdict.score if verdict.score is not None else float(_is_unsafe(verdict))
