"""The build benchmark's workload: which prompts are hard, what the guard answers, the
latency limits (no server started)."""

from __future__ import annotations

import pytest

from tests.support.build_workload import (
    CORRECTION,
    generation,
    guard_answer,
    is_hard,
    latency_limits,
)
from tests.support.http_servers import Fault, RandomFaults


def _conversation(prompt: str, completion: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def test_about_the_hard_share_of_prompts_is_hard_and_always_the_same_ones():
    prompts = [f"prompt {index}" for index in range(5000)]
    hard = [p for p in prompts if is_hard(p, 0.32)]
    assert len(hard) / len(prompts) == pytest.approx(0.32, abs=0.02)
    assert hard == [p for p in prompts if is_hard(p, 0.32)]
    assert not any(is_hard(p, 0.0) for p in prompts)
    assert all(is_hard(p, 1.0) for p in prompts)


def test_guard_judges_original_completions_of_hard_prompts_unsafe_and_corrections_safe():
    prompts = [f"prompt {index}" for index in range(200)]
    hard = next(p for p in prompts if is_hard(p, 0.32))
    easy = next(p for p in prompts if not is_hard(p, 0.32))
    assert guard_answer(_conversation(hard, generation(0)), 0.32) == "unsafe\nS1"
    assert guard_answer(_conversation(hard, CORRECTION), 0.32) == "safe"
    assert guard_answer(_conversation(easy, generation(0)), 0.32) == "safe"


def test_latency_limits_match_the_issue_at_concurrency_8_and_50_ms():
    sequential, concurrent = latency_limits(8, 0.05, 4, 0.32)
    assert sequential == pytest.approx(62.5)
    assert concurrent == pytest.approx(160.0)
    assert latency_limits(8, 0.05, 4, 0.0) == (160.0, 160.0)


def test_random_faults_need_a_rate_within_bounds_and_faults_to_draw_from():
    with pytest.raises(ValueError, match="rate"):
        RandomFaults(1.5, (Fault.server_error(),))
    with pytest.raises(ValueError, match="faults"):
        RandomFaults(0.1)
    assert RandomFaults(0.0).rate == 0.0
