"""The build's row rules end to end on the stand-in models: the held-out test split in
every export, every correction as a row, gold-answer checks, truncated completions, and
a dataset card the Hub can read."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml
from huggingface_hub import DatasetCard

from tests.support.builds import write_build_config
from unsafechain.dataset.config import load_config
from unsafechain.dataset.pipeline import run_build

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
PROMPTS = ROOT / "pipelines" / "unsafechain" / "demo" / "prompts"
SOURCES = ROOT / "tests" / "data" / "sources"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory, standin_models):
    tmp_path = tmp_path_factory.mktemp("rules")
    # Word problems unlike each other: alike ones would be removed as close to the ones
    # held out.
    problems = tmp_path / "gsm8k.jsonl"
    questions = [
        ("Sara has 4 apples and buys 7 more. How many apples does she have?", 11),
        ("A train travels 60 miles each hour for 3 hours. How far does it go?", 180),
        ("Tom reads 12 pages a day. How many pages does he read in a week?", 84),
        ("A baker makes 5 trays of 9 muffins. How many muffins are there?", 45),
        ("Lena saves 15 dollars a month for a year. What does she save?", 180),
        ("There are 30 students and 6 teams. How many students per team?", 5),
    ]
    problems.write_text(
        "".join(
            json.dumps({"question": question, "answer": f"Work.\n#### {answer}"}) + "\n"
            for question, answer in questions
        )
    )
    sources = [
        {"name": "redteam", "path": str(PROMPTS / "redteam.jsonl")},
        {"name": "gsm8k", "path": str(problems), "loader": "gsm8k"},
    ]
    path = write_build_config(tmp_path, standin_models, sources)
    config = yaml.safe_load(path.read_text())
    config["test_split"] = {"size": 2}
    config["rows"] = {"policy": "every_correction", "check_answers": "drop"}
    config["routing"] = {"correct": "unsafe"}
    config["decontamination"] = {
        "benchmarks": [
            {
                "name": "strongreject",
                "path": str(SOURCES / "strongreject.jsonl"),
                "loader": "strongreject",
            }
        ]
    }
    config["card"] = {"license": "apache-2.0", "pretty_name": "Rules test"}
    path.write_text(yaml.safe_dump(config))
    return run_build(load_config(path), progress=False)


def test_the_test_split_is_in_every_export_and_in_no_training_subset(built):
    output, counts = built.output, built.manifest["counts"]
    assert built.manifest["test_split"] == {"redteam": 2, "gsm8k": 2}
    assert counts["test_cases"] == 4
    test = _rows(output / "subsets" / "test.jsonl")
    assert test and {row["split"] for row in test} == {"test"}
    assert counts["test_rows"] == len(test)
    test_cases = {row["case_id"] for row in test}
    for name in ("full", "random", "selected"):
        rows = _rows(output / "subsets" / f"{name}.jsonl")
        assert not test_cases & {row["case_id"] for row in rows}, name
    assert not test_cases & {row["id"] for row in _rows(output / "pairs.jsonl")}
    assert not test_cases & {row["case_id"] for row in _rows(output / "dataset.jsonl")}
    release = _rows(output / "release" / "test.jsonl")
    assert [set(row) for row in release] == [{"prompt", "response", "split_name"}] * len(test)
    assert {row["split_name"] for row in release} <= {"redteam", "gsm8k"}
    splits = datasets.load_from_disk(str(output / "datasets"))
    assert set(splits) == {"full", "random", "selected", "test"}
    assert splits["test"].num_rows == len(test)
    assert pq.read_table(output / "subsets" / "test.parquet").num_rows == len(test)
    assert built.manifest["removed"]["benchmark_prompts"]["held-out test split"] == 4


def test_every_passed_correction_is_a_row_and_gold_answers_are_checked(built):
    output, manifest = built.output, built.manifest
    rows = _rows(output / "dataset.jsonl")
    corrected = [row for row in rows if row["correction_attempt"]]
    assert corrected and all(
        row["id"] == f"{row['case_id']}-c{row['response_completion_index']}" for row in corrected
    )
    passed = sum(
        correction["passed"]
        for row in {row["case_id"]: row for row in rows}.values()
        if row["split"] == "train"
        for correction in row["provenance"]["corrections"]
    )
    assert len(corrected) == passed
    # The stand-in generator answers word problems without a number: every GSM8K
    # prompt is answered wrongly and dropped, with its reason.
    assert manifest["answer_checks"]["checked_sources"] == ["gsm8k"]
    # No original answer of a GSM8K prompt is a row (a correction of an unsafe one may be).
    assert not [row for row in rows if row["source"] == "gsm8k" and not row["correction_attempt"]]
    failed = [row for row in _rows(output / "failed.jsonl") if row["source"] == "gsm8k"]
    wrong = [row for row in failed if row["status"] == "wrong_answer"]
    assert wrong and all("gold answer" in row["status_reason"] for row in wrong)
    # A dropped prompt's passed corrections are rows still (counted, not in failed).
    assert manifest["counts"]["wrong_answer"] >= len(wrong)


def test_the_dataset_card_is_a_hub_card_with_what_the_method_needs(built):
    output = built.output
    card = DatasetCard.load(output / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["pretty_name"] == "Rules test"
    assert data["task_categories"] == ["text-generation"] and data["language"] == ["en"]
    assert data["size_categories"] == ["n<1K"]
    configs = {entry["config_name"]: entry for entry in data["configs"]}
    assert set(configs) == {"full", "random", "selected"}
    for entry in configs.values():
        assert [f["split"] for f in entry["data_files"]] == ["train", "test"]
        for file in entry["data_files"]:
            assert (output / file["path"]).is_file()
    columns = pq.read_schema(output / "subsets" / "full.parquet").names
    for info in data["dataset_info"]:
        assert [feature["name"] for feature in info["features"]] == columns
    assert "&id" not in (output / "README.md").read_text()
    text = card.text
    assert "Content warning" in text
    assert "arXiv:2507.21652" in text
    assert "automated judges" in text
    assert "Verdicts were given on the whole completion" in text
    assert "| strongreject |" in text and "| held-out test split | 4 |" in text


def test_completions_cut_off_by_the_token_limit_are_judged_but_never_rows(tmp_path, standin_models):
    sources = [{"name": "benign", "path": str(PROMPTS / "benign.jsonl"), "limit": 4}]
    path = write_build_config(tmp_path, standin_models, sources)
    config = yaml.safe_load(path.read_text())
    config["generation"]["max_new_tokens"] = 4
    path.write_text(yaml.safe_dump(config))
    result = run_build(load_config(path), progress=False)
    counts = result.manifest["counts"]
    assert counts["truncated"] == counts["generated"] == 12
    assert counts["judged_safe"] + counts["judged_unsafe"] + counts["judged_error"] == 12
    assert counts["written"] == 0
    [case] = _rows(result.output / "failed.jsonl")[:1]
    completion = case["provenance"]["completions"][0]
    # The stand-in's R1 template opened the think section: a cut-off text is reasoning.
    assert completion["truncated"] and completion["think_opened_by_prompt"]
    assert completion["reasoning"] and completion["answer"] == ""
    assert "cut off by the token limit" in case["status_reason"]
