"""The correction stage's refusal check: a refusal judge's second look at every
correction that passed re-judging, so that a benign prompt does not become a trained
refusal."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from unsafechain.domain.types import (
    Attempt,
    JudgeIdentity,
    RefusalCheck,
    RefusalCheckMode,
    RefusalClass,
    RequestReading,
)
from unsafechain.judge.engine import JudgeItem
from unsafechain.judge.refusal import RefusalJudge

# The failure reason of an attempt rejected for refusing a benign prompt. It is also the
# feedback the next attempt gets, so it says what to do instead.
REFUSED_BENIGN = (
    "refusal check: it fully refuses a request the refusal judge reads as benign; answer "
    "the request fully, declining only a part that is harmful, if any"
)
# How the failure reason of an attempt the judge could not classify begins; it holds
# the judge's error (a failed call's says so, which makes the failure transient).
REFUSAL_CHECK_FAILED = "refusal check failed"


class RefusalChecker:
    """Takes the refusal check the correction settings ask for.

    Args:
        judge: The refusal judge.
        mode: ``record`` or ``reject`` (see :class:`RefusalCheckMode`).
    """

    def __init__(self, judge: RefusalJudge, mode: RefusalCheckMode):
        if mode == RefusalCheckMode.OFF:
            raise ValueError("a refusal check that is off needs no checker")
        self._judge = judge
        self._mode = mode

    @property
    def mode(self) -> RefusalCheckMode:
        """Record only, or reject too."""
        return self._mode

    @property
    def judge(self) -> JudgeIdentity:
        """The refusal judge, as provenance records it."""
        return self._judge.identity

    async def check_backend(self) -> None:
        """Raise when the refusal judge cannot serve requests."""
        await self._judge.check()

    async def check(
        self, prompt: str, response: str, known: RequestReading | None = None
    ) -> RefusalCheck:
        """Classify ``response``; for a full refusal, read the request too, unless
        ``known`` already holds a class for it (an earlier attempt's)."""
        [verdict] = await self._judge.judge([JudgeItem(prompt, response)])
        reading = None
        if verdict.refusal == RefusalClass.FULL_REFUSAL:
            if known is not None and known.request is not None:
                reading = known
            else:
                [reading] = await self._judge.read_requests([prompt])
        return RefusalCheck(verdict, reading)

    def failure(self, check: RefusalCheck) -> str:
        """Why ``check`` fails its attempt; empty when it does not (always, to record)."""
        if self._mode != RefusalCheckMode.REJECT:
            return ""
        if check.error:
            return f"{REFUSAL_CHECK_FAILED}: {check.error}"
        return REFUSED_BENIGN if check.refuses_benign_request else ""


REFUSAL_CHECK_COUNTS = (
    "checked",
    *(refusal.value for refusal in RefusalClass),
    "unclassified",
    "full_refusal_of_benign",
    "full_refusal_of_harmful",
    "rejected",
)
"""The keys of :func:`refusal_check_counts`, in the manifest's order."""


def refusal_check_counts(attempts: Iterable[Attempt]) -> Counter[str]:
    """What the refusal check said of ``attempts``, as the manifest counts it.

    Keys (:data:`REFUSAL_CHECK_COUNTS`): ``checked`` attempts; one count per refusal
    class, and ``unclassified`` for those the judge gave none; among full refusals,
    those of requests the judge read as benign and as harmful; ``rejected``, the
    attempts the check failed (in ``reject`` mode; unclassified ones included).
    """
    counts: Counter[str] = Counter()
    for attempt in attempts:
        check = attempt.refusal_check
        if check is None:
            continue
        counts["checked"] += 1
        counts[check.refusal.value if check.refusal else "unclassified"] += 1
        request = check.request.request if check.request else None
        if check.refusal == RefusalClass.FULL_REFUSAL and request is not None:
            counts[f"full_refusal_of_{request.value}"] += 1
        reason = attempt.failure_reason
        counts["rejected"] += reason == REFUSED_BENIGN or reason.startswith(REFUSAL_CHECK_FAILED)
    return counts
