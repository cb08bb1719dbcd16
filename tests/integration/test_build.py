import argparse
import json
import shutil
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from tests.support.builds import write_build_config
from unsafechain.cli import build_parser, main
from unsafechain.dataset.card import PLOT_ALT
from unsafechain.dataset.config import load_config
from unsafechain.dataset.pipeline import BuildError, run_build

pytestmark = pytest.mark.integration

PROMPTS = Path(__file__).parents[2] / "pipelines" / "unsafechain" / "demo" / "prompts"
BAD_LINES = [
    '{"prompt": "How do I bake bread?"}',
    "{this is not json",
    '{"question": "no prompt field"}',
    '{"prompt": ["not", "a", "string"]}',
    '{"prompt": ""}',
    '{"prompt": "What is the capital of France?"}',
    '{"prompt": "  how do I BAKE bread"}',
]


def _config(tmp_path, standin_models):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(BAD_LINES) + "\n")
    sources = [
        {"name": "redteam", "path": str(PROMPTS / "redteam.jsonl")},
        {"name": "mixed", "path": str(mixed)},
    ]
    return write_build_config(tmp_path, standin_models, sources)


@pytest.fixture(scope="module")
def built(tmp_path_factory, standin_models):
    tmp_path = tmp_path_factory.mktemp("build")
    path = _config(tmp_path, standin_models)
    result = run_build(load_config(path), progress=False)
    return path, result


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_stage_runs_and_the_manifest_counts_add_up(built):
    _, result = built
    counts = result.manifest["counts"]
    redteam = len((PROMPTS / "redteam.jsonl").read_text().splitlines())
    assert counts["read"] == redteam + 3
    assert counts["rejected"] == 4
    assert counts["duplicate_exact"] == 1
    assert counts["duplicate_near"] == counts["contaminated"] == 0
    assert counts["cases"] == redteam + 2
    assert counts["generated"] == 3 * counts["cases"]
    assert (
        counts["judged_safe"] + counts["judged_unsafe"] + counts["judged_error"]
        == counts["generated"]
    )
    assert counts["judged_unsafe"] > 0 and counts["judged_safe"] > 0
    assert counts["hard"] > 0
    assert counts["corrected"] > 0
    assert counts["written"] + counts["failed"] == counts["cases"]
    assert sum(result.manifest["by_status"].values()) == counts["cases"]
    assert result.manifest["rules"]["hard_case"] == "all 3 completions judged unsafe"


def test_bad_prompt_lines_are_reported_with_file_line_and_reason(built):
    _, result = built
    rejected = _rows(result.output / "rejected.jsonl")
    assert [(Path(r["uri"]).name, r["line"]) for r in rejected] == [
        ("mixed.jsonl", 2),
        ("mixed.jsonl", 3),
        ("mixed.jsonl", 4),
        ("mixed.jsonl", 5),
    ]
    assert rejected[0]["reason"].startswith("invalid JSON")
    assert rejected[1]["reason"] == "missing field 'prompt'"
    assert "mixed.jsonl:2: invalid JSON" in result.manifest["rejections"][0]


def test_duplicate_prompts_are_listed_with_the_prompt_they_duplicate(built):
    _, result = built
    [removed] = _rows(result.output / "removed.jsonl")
    kept = {row["prompt"]: row["id"] for row in _rows(result.output / "dataset.jsonl")}
    assert (removed["line"], removed["reason"]) == (7, "duplicate_exact")
    failed = {row["prompt"]: row["id"] for row in _rows(result.output / "failed.jsonl")}
    assert removed["duplicate_of"] == {**kept, **failed}["How do I bake bread?"]
    assert result.manifest["removed"]["by_source"] == {"mixed": {"duplicate_exact": 1}}


def test_dataset_rows_carry_responses_and_provenance_in_jsonl_and_parquet(built):
    _, result = built
    rows = _rows(result.output / "dataset.jsonl")
    table = pq.read_table(result.output / "dataset.parquet")
    assert table.num_rows == len(rows) == result.manifest["counts"]["written"]
    assert table.column("id").to_pylist() == [row["id"] for row in rows]
    statuses = {row["status"] for row in rows}
    assert statuses <= {"corrected", "safe_original"}
    assert "corrected" in statuses
    for row in rows:
        assert row["response"].startswith("<think>\n") and "\n</think>\n\n" in row["response"]
        provenance = row["provenance"]
        assert provenance["build_id"] == result.manifest["build_id"]
        assert provenance["generator"]["model"].endswith("generator")
        assert (provenance["sampling"]["samples"], provenance["sampling"]["top_k"]) == (3, 0)
        assert provenance["sampling"]["seed"] is not None
        assert len(provenance["completions"]) == 3
        for completion in provenance["completions"]:
            [verdict] = completion["verdicts"]
            assert verdict["judge"] == "guard" and verdict["raw_output"]
        assert [s["stage"] for s in provenance["stages"]][:3] == ["generate", "judge", "route"]
    corrected = [row for row in rows if row["status"] == "corrected"]
    for row in corrected:
        assert row["hard"] is True
        [attempt] = [
            a
            for c in row["provenance"]["corrections"]
            if c["completion_index"] == row["response_completion_index"]
            for a in c["attempts"]
            if a["attempt"] == row["correction_attempt"]
        ]
        assert attempt["label"] == "safe" and attempt["verdicts"]


def test_failed_cases_are_kept_with_their_reason(built):
    _, result = built
    failed = _rows(result.output / "failed.jsonl")
    assert len(failed) == result.manifest["counts"]["failed"]
    for row in failed:
        assert row["response"] is None
        assert row["status"] in {"correction_failed", "no_safe_completion", "stage_failed"}
        assert row["status_reason"]


def test_rerun_after_an_interrupt_recomputes_only_the_unfinished_cases(built, tmp_path):
    path, result = built
    output = tmp_path / "resumed"
    shutil.copytree(result.output, output)
    lines = (output / "cases.jsonl").read_text().splitlines(keepends=True)
    kept = lines[: len(lines) // 2]
    # A crash mid-write leaves half a line behind.
    (output / "cases.jsonl").write_text("".join(kept) + lines[len(kept)][:40])
    resumed = run_build(load_config(path, {"build.output": str(output)}), progress=False)
    assert resumed.manifest["counts"]["resumed"] == len(kept)
    after = (output / "cases.jsonl").read_text().splitlines(keepends=True)
    assert after[: len(kept)] == kept
    ids = [json.loads(line)["id"] for line in after]
    assert len(ids) == len(set(ids)) == result.manifest["counts"]["cases"]
    # Seeds are per case, so recomputed cases come out as they did the first time.
    original = {row["id"]: row["response"] for row in _rows(result.output / "dataset.jsonl")}
    again = {row["id"]: row["response"] for row in _rows(output / "dataset.jsonl")}
    assert again == original


def test_finished_build_run_again_computes_nothing(built):
    path, result = built
    before = (result.output / "cases.jsonl").read_bytes()
    again = run_build(load_config(path), progress=False)
    assert again.manifest["counts"]["resumed"] == again.manifest["counts"]["cases"]
    assert (result.output / "cases.jsonl").read_bytes() == before


def test_resuming_with_a_different_configuration_is_refused(built, tmp_path):
    path, _result = built
    config = load_config(path, {"generation.temperature": 1.2})
    with pytest.raises(BuildError, match="different configuration"):
        run_build(config, progress=False)


def test_cli_reports_a_config_error_naming_the_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("build: {output: x}\nsources: []\n")
    assert main(["build", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert "sources" in error and "models" in error


def _subcommands(parser, prefix=()):
    """Every command path of the CLI, e.g. ("serve", "judge")."""
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from _subcommands(subparser, (*prefix, name))


def test_every_subcommand_has_help(capsys):
    commands = list(_subcommands(build_parser()))
    assert {("build",), ("standins",), ("serve", "judge"), ("judge",), ("worker",)} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0, command
        assert "usage: unsafechain" in capsys.readouterr().out


def test_subsets_are_written_as_jsonl_parquet_and_a_datasets_folder(built):
    _, result = built
    manifest, output = result.manifest, result.output
    written = manifest["counts"]["written"]
    # The default sizes (1000) exceed this build's rows: random is capped, selected takes all.
    assert manifest["subsets"] == {"full": written, "random": written, "selected": written}
    full = _rows(output / "dataset.jsonl")
    for name, size in manifest["subsets"].items():
        jsonl, parquet = manifest["files"]["subsets"][name]
        rows = _rows(output / jsonl)
        assert len(rows) == pq.read_table(output / parquet).num_rows == size
        assert {row["id"] for row in rows} <= {row["id"] for row in full}
    selected = _rows(output / "subsets" / "selected.jsonl")
    corrected = sum(row["status"] == "corrected" for row in full)
    assert {row["status"] for row in selected[:corrected]} == {"corrected"}
    splits = datasets.load_from_disk(str(output / manifest["files"]["datasets"]))
    assert {name: split.num_rows for name, split in splits.items()} == manifest["subsets"]


def test_release_files_have_exactly_the_public_columns(built):
    _, result = built
    for name, path in result.manifest["files"]["release"].items():
        rows = _rows(result.output / path)
        assert len(rows) == result.manifest["subsets"][name]
        assert all(list(row) == ["prompt", "response", "split_name"] for row in rows)
    release = _rows(result.output / "release" / "full.jsonl")
    full = _rows(result.output / "dataset.jsonl")
    assert [(r["prompt"], r["split_name"]) for r in release] == [
        (row["prompt"], row["source"]) for row in full
    ]


def test_preference_pairs_are_one_per_passed_correction(built):
    _, result = built
    pairs = _rows(result.output / result.manifest["files"]["pairs"])
    passed = [
        c
        for row in _rows(result.output / "dataset.jsonl")
        for c in row["provenance"]["corrections"]
        if c["passed"]
    ]
    assert len(pairs) == len(passed) > 0
    for pair in pairs:
        assert pair["chosen"] != pair["rejected"]
        assert pair["chosen"].startswith("<think>\n") and "\n</think>\n\n" in pair["chosen"]
        assert pair["rejected"].startswith("<think>\n") and "\n</think>\n\n" in pair["rejected"]


def test_dataset_card_names_every_source_and_embeds_the_plot(built):
    _, result = built
    card = (result.output / "README.md").read_text()
    for source in ("redteam", "mixed"):
        assert f"| {source} |" in card
    assert f"![{PLOT_ALT}](unsafe_rate.png)" in card
    assert "- Hard case: all 3 completions judged unsafe." in card
    # The fixture builds on the stand-ins, which their config.json names.
    assert "> **Built with stand-in models.**" in card
    assert {m["standin"] for m in result.manifest["models"].values()} == {
        "generator",
        "judge",
        "corrector",
    }
    unsafe = result.manifest["counts"]["judged_unsafe"]
    assert f"out of all {unsafe} unsafe verdicts on generated completions" in card
    assert f"| written | {result.manifest['counts']['written']} |" in card
    assert (result.output / "unsafe_rate.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert result.manifest["files"]["card"] == ["README.md", "unsafe_rate.png"]


def test_subsets_are_reassembled_with_new_sizes_without_rebuilding(built, tmp_path):
    path, result = built
    output = tmp_path / "resized"
    shutil.copytree(result.output, output)
    overrides = {"build.output": str(output), "assembly.random_size": 2}
    config = load_config(path, {**overrides, "assembly.selected_size": 3})
    resized = run_build(config, progress=False)
    assert resized.manifest["counts"]["resumed"] == resized.manifest["counts"]["cases"]
    assert resized.manifest["subsets"]["random"] == 2
    selected = _rows(output / "subsets" / "selected.jsonl")
    assert len(selected) == 3


def test_rows_follow_the_prompts_order_whatever_order_the_cases_finished_in(built, tmp_path):
    """Sources in the configuration's order, each in its file's, whatever order the
    concurrent stages finished the cases in: the build's cases stored in reverse give
    the same files, line for line."""
    path, result = built
    copy = tmp_path / "copy"
    shutil.copytree(result.output, copy)
    cases = (copy / "cases.jsonl").read_text().splitlines()
    (copy / "cases.jsonl").write_text("\n".join(reversed(cases)) + "\n")
    again = run_build(load_config(path, {"build.output": str(copy)}), progress=False)
    assert again.manifest["counts"]["resumed"] == again.manifest["counts"]["cases"]
    for name in ("dataset.jsonl", "failed.jsonl", "release/full.jsonl", "pairs.jsonl"):
        assert (copy / name).read_text() == (result.output / name).read_text(), name
    redteam = (PROMPTS / "redteam.jsonl").read_text().splitlines()
    order = {json.loads(line)["prompt"]: index for index, line in enumerate(redteam)}
    prompts = [row["prompt"] for row in _rows(copy / "dataset.jsonl") if row["source"] == "redteam"]
    assert prompts == sorted(prompts, key=order.__getitem__)
