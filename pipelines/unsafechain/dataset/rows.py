"""Dataset rows: flat records of a case's training responses, each with the case's
provenance."""

from __future__ import annotations

from typing import Any, Literal

from google.protobuf.timestamp_pb2 import Timestamp

from unsafechain.domain.convert import unsafe_categories
from unsafechain.domain.reasoning import format_reasoning
from unsafechain.intake.sources import TRAIN
from unsafechain.streaming.stages import label_name
from unsafechain.v1 import case_pb2

NO_CATEGORY = "none"
"""The harm category reports use for a case whose unsafe verdicts name none."""


def status_name(status: int) -> str:
    """``corrected``, ``safe_original``, … for a protobuf case status."""
    return case_pb2.CaseStatus.Name(status).removeprefix("CASE_STATUS_").lower()


def has_response(case: case_pb2.Case) -> bool:
    """Whether the case has a response (its row under ``one_per_prompt``)."""
    return case.status in (case_pb2.CASE_STATUS_SAFE_ORIGINAL, case_pb2.CASE_STATUS_CORRECTED)


ONE_PER_PROMPT, EVERY_CORRECTION = "one_per_prompt", "every_correction"
"""The row policies (``rows.policy``)."""

RowKind = Literal["training", "test", "failed"]
"""What a case's rows are: training rows, rows of the held-out test split, or the one
row of a case without any (``failed.jsonl``)."""


def case_rows(case: case_pb2.Case, policy: str = ONE_PER_PROMPT) -> list[dict]:
    """The training rows of ``case``; empty when it has none.

    ``one_per_prompt``: the case's response. ``every_correction``: one row per
    correction that passed re-judging (id ``<case id>-c<completion index>``), and the
    response of a case that is not hard. Every row holds the case's whole provenance;
    a correction of a truncated completion is a row (the rewrite is whole).
    """
    if policy == ONE_PER_PROMPT:
        return [case_to_row(case)] if has_response(case) else []
    if policy != EVERY_CORRECTION:
        raise ValueError(f"unknown row policy {policy!r}")
    rows = []
    if case.status == case_pb2.CASE_STATUS_SAFE_ORIGINAL:
        rows.append(case_to_row(case))
    for correction in case.corrections:
        if correction.passed:
            response = correction_response(correction)
            rows.append(_row(case, response, f"{case.id}-c{correction.completion_index}"))
    return rows


def original_response(
    completion: case_pb2.Completion, answer_check: str = ""
) -> case_pb2.SelectedResponse:
    """The response an original completion gives, in the canonical format."""
    return case_pb2.SelectedResponse(
        text=format_reasoning(completion.reasoning, completion.answer),
        reasoning=completion.reasoning,
        answer=completion.answer,
        completion_index=completion.index,
        answer_check=answer_check,
    )


def correction_response(correction: case_pb2.Correction) -> case_pb2.SelectedResponse:
    """The response a correction that passed gives: its passing attempt (the earlier
    ones failed; the passing one has no failure reason)."""
    attempt = next(a for a in correction.attempts if not a.failure_reason)
    return case_pb2.SelectedResponse(
        text=format_reasoning(attempt.reasoning, attempt.answer),
        reasoning=attempt.reasoning,
        answer=attempt.answer,
        completion_index=correction.completion_index,
        correction_attempt=attempt.attempt,
    )


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
    """The row of ``case`` with its response (None fields when it has none): the
    training pair, its status and its provenance."""
    return _row(case, case.response if has_response(case) else None, case.id)


def _row(case: case_pb2.Case, response: case_pb2.SelectedResponse | None, row_id: str) -> dict:
    """A row of ``case`` with ``response``. Every row has the same keys and types, so
    JSONL and Parquet agree."""
    provenance = case.provenance
    sampling = provenance.sampling
    categories = dict.fromkeys(
        code for completion in case.completions for code in unsafe_categories(completion)
    )
    return {
        "id": row_id,
        "case_id": case.id,
        "split": case.prompt.split or TRAIN,
        "prompt": case.prompt.text,
        "source": case.prompt.source.name,
        "response": response.text if response else None,
        "reasoning": response.reasoning if response else None,
        "answer": response.answer if response else None,
        "status": status_name(case.status),
        "status_reason": case.status_reason,
        "hard": case.hard,
        "unsafe_fraction": case.unsafe_fraction,
        "harm_categories": list(categories),
        "response_completion_index": response.completion_index if response else None,
        "correction_attempt": response.correction_attempt if response else None,
        "answer_check": (response.answer_check or "unchecked") if response else None,
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
                    "truncated": c.truncated,
                    "think_opened_by_prompt": c.think_opened_by_prompt,
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
