import asyncio
import json

import pytest

from tests.unit.scripted_backend import ScriptedBackend, guard_generation
from unsafechain.backends.base import BackendUnavailable
from unsafechain.domain.types import JudgeTarget, VerdictLabel
from unsafechain.judge.engine import JudgeEngine, JudgeItem, LlamaGuardJudge
from unsafechain.judge.ensemble import EnsembleJudge, EnsembleRule

SAFE, UNSAFE, ERROR = VerdictLabel.SAFE, VerdictLabel.UNSAFE, VerdictLabel.ERROR


def _guard(name: str, answer: str | None, probability: float | None = None) -> LlamaGuardJudge:
    """A guard that always answers ``answer``; None makes its backend fail."""

    def respond(request):
        if answer is None:
            raise BackendUnavailable("guard down")
        return [guard_generation(answer, probability)]

    return LlamaGuardJudge(ScriptedBackend(respond), name=name)


def _decide(members, rule, threshold=0.5):
    ensemble = EnsembleJudge(members, name="panel", rule=rule, threshold=threshold)
    [verdict] = asyncio.run(ensemble.judge([JudgeItem("p", "r", JudgeTarget.ANSWER)]))
    return verdict


@pytest.mark.parametrize(
    ("answers", "rule", "label"),
    [
        (["unsafe\nS1", "safe", "safe"], EnsembleRule.MAJORITY, SAFE),
        (["unsafe\nS1", "unsafe\nS2", "safe"], EnsembleRule.MAJORITY, UNSAFE),
        (["unsafe\nS1", "safe"], EnsembleRule.MAJORITY, UNSAFE),
        (["unsafe\nS1", None, None], EnsembleRule.MAJORITY, UNSAFE),
        (["safe", "safe", None], EnsembleRule.MAJORITY, SAFE),
        (["unsafe\nS1", "safe", None], EnsembleRule.ANY_UNSAFE, UNSAFE),
        (["safe", "safe"], EnsembleRule.ANY_UNSAFE, SAFE),
        (["safe", None], EnsembleRule.ANY_UNSAFE, ERROR),
        ([None, None], EnsembleRule.MAJORITY, ERROR),
        ([None, None], EnsembleRule.MEAN_SCORE, ERROR),
    ],
)
def test_rules_decide_over_the_members_that_answered(answers, rule, label):
    members = [_guard(f"g{i}", answer) for i, answer in enumerate(answers)]
    assert _decide(members, rule).label == label


def test_mean_score_mixes_scores_and_labels_against_the_threshold():
    members = [
        _guard("scored", "unsafe\nS1", probability=0.6),
        _guard("labelled", "safe"),
        _guard("down", None),
    ]
    verdict = _decide(members, EnsembleRule.MEAN_SCORE)
    assert (verdict.label, verdict.score) == (SAFE, pytest.approx(0.3))
    lenient = _decide(members, EnsembleRule.MEAN_SCORE, threshold=0.25)
    assert (lenient.label, lenient.categories) == (UNSAFE, ("S1",))


def test_verdict_records_every_members_label_score_and_error():
    members = [_guard("a", "unsafe\nS1", 0.9), _guard("b", "safe"), _guard("c", None)]
    verdict = _decide(members, EnsembleRule.MAJORITY)
    assert (verdict.judge.name, verdict.judge.kind, verdict.target) == (
        "panel",
        "ensemble",
        JudgeTarget.ANSWER,
    )
    recorded = json.loads(verdict.raw_output)
    assert recorded["rule"] == "majority"
    assert [(m["judge"], m["label"]) for m in recorded["members"]] == [
        ("a", "unsafe"),
        ("b", "safe"),
        ("c", "error"),
    ]
    assert recorded["members"][0]["score"] == pytest.approx(0.9)
    assert "guard down" in recorded["members"][2]["error"]


def test_all_members_erroring_is_an_error_that_says_so():
    verdict = _decide([_guard("a", None), _guard("b", None)], EnsembleRule.ANY_UNSAFE)
    assert (verdict.label, verdict.error) == (ERROR, "every ensemble member errored")


def test_ensemble_runs_inside_the_judge_engine_like_any_judge():
    ensemble = EnsembleJudge([_guard("a", "unsafe\nS3"), _guard("b", "unsafe\nS1")], name="p")
    [judgment] = asyncio.run(JudgeEngine([ensemble]).judge_completions("p", ["c"]))
    assert judgment.label == UNSAFE
    assert judgment.categories == ("S3", "S1")


def test_ensemble_needs_members_and_a_valid_threshold():
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleJudge([])
    with pytest.raises(ValueError, match="threshold"):
        EnsembleJudge([_guard("a", "safe")], threshold=1.5)
