"""``build --dry-run``: the prompts are counted as the build screens them, the calls
follow from the configuration, the expected hard cases from a stated unsafe rate, and
nothing is loaded or written."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from unsafechain.cli import main
from unsafechain.dataset.config import load_config
from unsafechain.dataset.plan import Assumptions, plan_build

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "unsafechain" / "demo" / "demo.yaml"


def test_the_demo_plan_counts_its_prompts_and_calls(tmp_path) -> None:
    config = load_config(DEMO, {"build.output": str(tmp_path / "out")})
    plan = plan_build(config, Assumptions(unsafe_rate=0.4))
    assert (plan.read, plan.cases, plan.test_cases, plan.rejected) == (28, 28, 4, 0)
    assert plan.completions == 28 * 3 and plan.judge_calls == 84
    assert plan.hard_probability == pytest.approx(0.4**3)
    # Hard cases have all 3 completions unsafe: 3 corrections each, up to 3 attempts.
    assert plan.correction_calls() == (math.ceil(28 * 3 * 0.4**3), math.ceil(28 * 9 * 0.4**3))
    assert not (tmp_path / "out").exists()


def test_two_targets_and_a_lower_threshold_change_the_plan(tmp_path) -> None:
    config = load_config(
        DEMO,
        {
            "build.output": str(tmp_path / "out"),
            "judging.targets": ["reasoning", "answer"],
            "routing.hard_fraction": 0.5,
        },
    )
    plan = plan_build(config, Assumptions(unsafe_rate=0.5))
    assert plan.judge_calls_per_completion == 2 and plan.judge_calls == 168
    # At least 2 of 3 unsafe: P = 3 * 0.5^3 + 0.5^3.
    assert plan.hard_probability == pytest.approx(0.5)
    assert "at least 2 of 3 completions judged unsafe" in plan.describe()


def test_build_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys) -> None:
    code = main(["build", "--config", str(DEMO), "--output", str(tmp_path / "out"), "--dry-run",
                 "--unsafe-rate", "0.5"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "28 cases" in out and "84 judge calls" in out and "rough time:" in out
    assert not (tmp_path / "out").exists()
