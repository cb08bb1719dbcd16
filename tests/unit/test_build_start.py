"""Starting a build: a failed start leaves the output folder unclaimed, state files are
written whole, a damaged or misplaced one is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from unsafechain.dataset.config import load_config
from unsafechain.dataset.pipeline import BuildError, ResumeOptions, start_build
from unsafechain.domain.files import write_atomically
from unsafechain.intake.sources import SourceError
from unsafechain.v1 import case_pb2


def _config(tmp_path: Path, source: Path, output: Path | None = None):
    model = {"backend": "transformers", "model": "never-loaded"}
    raw = {
        "build": {"output": str(output or tmp_path / "out")},
        "sources": [{"name": "s", "path": str(source)}],
        "models": {"m": model},
        "generation": {"model": "m"},
        "judging": {"judges": [{"name": "guard", "model": "m"}]},
        "correction": {"model": "m"},
    }
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def test_a_start_that_fails_on_a_source_leaves_nothing_a_fixed_config_trips_on(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    with pytest.raises(SourceError):
        start_build(_config(tmp_path, tmp_path / "promts.jsonl"))
    assert not (tmp_path / "out" / "build.json").exists()
    start = start_build(_config(tmp_path, prompts))
    start.store.close()
    assert [record.text for record in start.todo] == ["hi"]


def test_a_damaged_build_identity_is_a_clear_error(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "build.json").write_text("")
    with pytest.raises(BuildError, match=r"build\.json is not a build identity"):
        start_build(_config(tmp_path, prompts))


def test_an_output_that_is_a_file_is_a_clear_error(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    (tmp_path / "taken").write_text("x")
    with pytest.raises(BuildError, match="exists and is not a folder"):
        start_build(_config(tmp_path, prompts, tmp_path / "taken"))


def test_state_files_are_replaced_whole(tmp_path):
    path = tmp_path / "build.json"
    write_atomically(path, json.dumps({"a": 1}))
    write_atomically(path, json.dumps({"a": 2}))
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["build.json"]


def _stored(tmp_path: Path, texts: list[str]):
    """A started build over ``texts`` whose store is open."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return _config(tmp_path, prompts)


def _case(record, status, *, verdict_error: str = "", attempt_reason: str = "") -> case_pb2.Case:
    case = case_pb2.Case(id=record.id, prompt=case_pb2.Prompt(id=record.id, text=record.text))
    case.status = status
    completion = case.completions.add(index=0, label=case_pb2.VERDICT_LABEL_ERROR)
    if verdict_error:
        completion.verdicts.add(label=case_pb2.VERDICT_LABEL_ERROR, error=verdict_error)
    if attempt_reason:
        case.corrections.add(completion_index=0).attempts.add(
            attempt=1, failure_reason=attempt_reason
        )
    return case


def test_retry_failed_recomputes_transient_failures_and_keeps_failures_on_merit(tmp_path):
    config = _stored(tmp_path, ["a", "b", "c", "d", "e"])
    start = start_build(config)
    a, b, c, d, e = start.todo
    start.store.write(_case(a, case_pb2.CASE_STATUS_STAGE_FAILED))
    start.store.write(
        _case(b, case_pb2.CASE_STATUS_NO_SAFE_COMPLETION, verdict_error="judge backend failed: 503")
    )
    start.store.write(
        _case(c, case_pb2.CASE_STATUS_CORRECTION_FAILED, attempt_reason="corrector call failed: x")
    )
    start.store.write(
        _case(d, case_pb2.CASE_STATUS_CORRECTION_FAILED, attempt_reason="re-judged unsafe (S9)")
    )
    start.store.write(
        _case(e, case_pb2.CASE_STATUS_NO_SAFE_COMPLETION, verdict_error="unparseable: maybe")
    )
    start.store.close()
    again = start_build(config, ResumeOptions(retry_failed=True))
    again.store.close()
    assert [record.text for record in again.todo] == ["a", "b", "c"]
    assert (again.retried, again.resumed) == (3, 2)
    plain = start_build(config)
    plain.store.close()
    assert list(plain.todo) == []


def test_a_damaged_line_in_the_store_stops_the_build_until_repair_recomputes_it(tmp_path):
    config = _stored(tmp_path, ["a", "b", "c"])
    start = start_build(config)
    for record in start.todo:
        start.store.write(_case(record, case_pb2.CASE_STATUS_STAGE_FAILED))
    start.store.close()
    cases = tmp_path / "out" / "cases.jsonl"
    lines = cases.read_text().splitlines()
    cases.write_text("\n".join([lines[0], '{"id": "b", "prompt": {"te', lines[2]]) + "\n")
    with pytest.raises(BuildError, match=r"cases\.jsonl: 1 damaged line\(s\): line 2 .* --repair"):
        start_build(config)
    repaired = start_build(config, ResumeOptions(repair=True))
    repaired.store.close()
    assert [record.text for record in repaired.todo] == ["b"]
    assert len(cases.read_text().splitlines()) == 2
