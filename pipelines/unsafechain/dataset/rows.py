"""Dataset rows: one flat record per case with its provenance."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from unsafechain.domain.convert import unsafe_categories
from unsafechain.streaming.stages import label_name
from unsafechain.v1 import case_pb2

NO_CATEGORY = "none"
"""The harm category reports use for a case whose unsafe verdicts name none."""


def status_name(status: int) -> str:
    """``corrected``, ``safe_original``, … for a protobuf case status."""
    return case_pb2.CaseStatus.Name(status).removeprefix("CASE_STATUS_").lower()


def has_response(case: case_pb2.Case) -> bool:
    """Whether the case yields a training row."""
    return case.status in (case_pb2.CASE_STATUS_SAFE_ORIGINAL, case_pb2.CASE_STATUS_CORRECTED)


def _verdict(verdict: case_pb2.Verdict) -> dict:
    return {
        "judge": verdict.judge.name,
        "judge_kind": verdict.judge.kind,
        "judge_model": verdict.judge.model.model,
        "target": case_pb2.JudgeTarget.Name(verdict.target).removeprefix("JUDGE_TARGET_").lower(),
        "label": label_name(verdict.label),
        "categories": list(verdict.categories),
        "score": verdict.score if verdict.HasField("score") else None,
        "raw_output": verdict.raw_output,
        "error": verdict.error,
    }


def _refusal_check(attempt: case_pb2.CorrectionAttempt) -> dict[str, str]:
    """The refusal check's classes of an attempt; empty where it took none or found none."""
    check = attempt.refusal_check
    refusal, request = check.verdict.refusal, check.request
    return {
        "refusal": _enum_name(case_pb2.RefusalClass, refusal, "REFUSAL_CLASS_") if refusal else "",
        "request": _enum_name(case_pb2.RequestClass, request, "REQUEST_CLASS_") if request else "",
    }


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()


def _timestamp(stamp: Timestamp) -> str:
    """A timestamp as RFC 3339 text, as protobuf's JSON mapping writes it."""
    return stamp.ToJsonString()


def _model(ref: case_pb2.ModelRef) -> dict:
    return {"backend": ref.backend, "model": ref.model, "endpoint": ref.endpoint}


def case_to_row(case: case_pb2.Case) -> dict:
    """The dataset row of ``case``: the training pair, its status and its provenance.

    Every row has the same keys and types, so JSONL and Parquet agree.
    """
    provenance = case.provenance
    sampling = provenance.sampling
    categories = dict.fromkeys(
        code for completion in case.completions for code in unsafe_categories(completion)
    )
    usable = has_response(case)
    return {
        "id": case.id,
        "prompt": case.prompt.text,
        "source": case.prompt.source.name,
        "response": case.response.text if usable else None,
        "reasoning": case.response.reasoning if usable else None,
        "answer": case.response.answer if usable else None,
        "status": status_name(case.status),
        "status_reason": case.status_reason,
        "hard": case.hard,
        "unsafe_fraction": case.unsafe_fraction,
        "harm_categories": list(categories),
        "response_completion_index": case.response.completion_index if usable else None,
        "correction_attempt": case.response.correction_attempt if usable else None,
        "provenance": {
            "build_id": provenance.build_id,
            "platform_version": provenance.platform_version,
            "source_uri": case.prompt.source.uri,
            "source_line": case.prompt.source.line,
            "generator": _model(provenance.generator),
            "sampling": {
                "samples": sampling.num_samples,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k,
                "max_new_tokens": sampling.max_new_tokens,
                "seed": sampling.seed,
            },
            "judges": [
                {"name": j.name, "kind": j.kind, **_model(j.model)} for j in provenance.judges
            ],
            "corrector": _model(provenance.corrector),
            "max_correction_attempts": provenance.max_correction_attempts,
            "completions": [
                {
                    "index": c.index,
                    "text": c.text,
                    "reasoning": c.reasoning,
                    "answer": c.answer,
                    "has_think_open": c.has_think_open,
                    "has_think_close": c.has_think_close,
                    "finish_reason": c.finish_reason,
                    "label": label_name(c.label),
                    "verdicts": [_verdict(v) for v in c.verdicts],
                }
                for c in case.completions
            ],
            "corrections": [
                {
                    "completion_index": c.completion_index,
                    "passed": c.passed,
                    "failure_reason": c.failure_reason,
                    "attempts": [
                        {
                            "attempt": a.attempt,
                            "text": a.text,
                            "label": label_name(a.label),
                            "failure_reason": a.failure_reason,
                            "verdicts": [_verdict(v) for v in a.verdicts],
                            **_refusal_check(a),
                            "finished_at": _timestamp(a.finished_at),
                        }
                        for a in c.attempts
                    ],
                }
                for c in case.corrections
            ],
            "stages": [
                {
                    "stage": s.stage,
                    "started_at": _timestamp(s.started_at),
                    "finished_at": _timestamp(s.finished_at),
                    "error": s.error,
                }
                for s in provenance.stages
            ],
        },
    }
