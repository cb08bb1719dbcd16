"""Reading a build's dataset for training, by its documented layout; never its test split."""

import json
from pathlib import Path

import datasets
import pytest

from unsafechain.training.data import DatasetError, read_training_data
from unsafechain.training.settings import DatasetSettings

RESPONSE = "<think>\nIt is safe.\n</think>\n\nHere is how."


def _row(i: int, split: str = "train", response: str = RESPONSE) -> dict:
    return {"id": f"r{i}", "prompt": f"prompt {i}", "response": response, "split": split}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _build(folder: Path) -> Path:
    """A build folder in the documented layout, with a held-out test split."""
    (folder / "manifest.json").parent.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(
        json.dumps({"build_id": "build-1", "config_fingerprint": "abc123"})
    )
    train = [_row(i) for i in range(4)]
    test = [_row(9, "test")]
    _jsonl(folder / "subsets" / "full.jsonl", train)
    _jsonl(folder / "subsets" / "selected.jsonl", train[:2])
    _jsonl(folder / "subsets" / "test.jsonl", test)
    for name, rows in (("full", train), ("test", test)):
        release = [
            {"prompt": r["prompt"], "response": r["response"], "split_name": "s"} for r in rows
        ]
        _jsonl(folder / "release" / f"{name}.jsonl", release)
    pairs = [
        {"id": "r0", "prompt": "p", "chosen": RESPONSE, "rejected": "<think>\nbad\n</think>\n\nx"}
    ]
    _jsonl(folder / "pairs.jsonl", pairs)
    datasets.DatasetDict(
        {"full": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    ).save_to_disk(str(folder / "datasets"))
    return folder


def _read(path: Path, subset: str | None = None, objective="sft"):
    return read_training_data(DatasetSettings(path=path, subset=subset), objective)


def test_a_build_folder_gives_the_chosen_subset_and_the_builds_identity(tmp_path):
    folder = _build(tmp_path / "out")
    data = _read(folder, "selected")
    assert (data.kind, data.subset, len(data)) == ("build", "selected", 2)
    assert (data.build_id, data.config_fingerprint) == ("build-1", "abc123")
    assert _read(folder).subset == "full"
    assert data.rows[0].messages() == [
        {"role": "user", "content": "prompt 0"},
        {"role": "assistant", "content": RESPONSE},
    ]


def test_a_missing_subset_names_the_ones_there_but_not_the_test_split(tmp_path):
    folder = _build(tmp_path / "out")
    with pytest.raises(DatasetError, match=r"no subset 'random'; it has full, selected$"):
        _read(folder, "random")


def test_the_datasets_export_gives_its_split_with_the_builds_identity(tmp_path):
    folder = _build(tmp_path / "out")
    data = _read(folder / "datasets")
    assert (data.kind, data.subset, len(data), data.build_id) == ("datasets", "full", 4, "build-1")


def test_a_release_file_is_its_own_subset(tmp_path):
    folder = _build(tmp_path / "out")
    data = _read(folder / "release" / "full.jsonl")
    assert (data.kind, data.subset, len(data), data.build_id) == ("jsonl", "full", 4, "build-1")
    with pytest.raises(DatasetError, match="is one file"):
        _read(folder / "release" / "full.jsonl", "selected")


@pytest.mark.parametrize("relative", ["release/test.jsonl", "subsets/test.jsonl", "datasets/test"])
def test_the_test_split_is_refused_by_name(tmp_path, relative):
    folder = _build(tmp_path / "out")
    with pytest.raises(DatasetError, match="held-out test split and is never trained on"):
        _read(folder / relative)


def test_rows_of_the_test_split_in_a_mixed_file_are_refused(tmp_path):
    mixed = _jsonl(tmp_path / "mixed.jsonl", [_row(0), _row(1, "test"), _row(2)])
    with pytest.raises(DatasetError, match="1 of its 3 rows are in the held-out test split"):
        _read(mixed)


def test_rows_of_the_test_split_in_a_datasets_split_are_refused(tmp_path):
    export = tmp_path / "datasets"
    datasets.DatasetDict(
        {"full": datasets.Dataset.from_list([_row(0), _row(1, "test")])}
    ).save_to_disk(str(export))
    with pytest.raises(DatasetError, match="held-out test split"):
        _read(export)


def test_responses_are_brought_to_the_canonical_think_format(tmp_path):
    rows = [
        _row(0, response="Reasoning only closed.\n</think>\n\nThe answer."),
        _row(1, response="No tags at all."),
    ]
    data = _read(_jsonl(tmp_path / "rows.jsonl", rows))
    assert [row.response for row in data.rows] == [
        "<think>\nReasoning only closed.\n</think>\n\nThe answer.",
        "<think>\n\n</think>\n\nNo tags at all.",
    ]


def test_dpo_reads_the_builds_pairs_and_sft_refuses_them(tmp_path):
    folder = _build(tmp_path / "out")
    data = _read(folder, objective="dpo")
    assert (data.kind, len(data), data.build_id) == ("pairs", 1, "build-1")
    assert data.pairs[0].chosen == RESPONSE
    with pytest.raises(DatasetError, match="a preference pair; SFT needs rows"):
        _read(folder / "pairs.jsonl")
    with pytest.raises(DatasetError, match="DPO needs pairs"):
        _read(folder / "release" / "full.jsonl", objective="dpo")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no rows"),
        ("{not json\n", ":1: not a JSON object"),
        ('{"prompt": "p", "response": ""}\n', ":1: 'response' must be a non-empty string"),
    ],
)
def test_bad_rows_are_reported_with_file_and_line(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        _read(path)


def test_the_content_fingerprint_changes_with_the_rows(tmp_path):
    a = _read(_jsonl(tmp_path / "a.jsonl", [_row(0), _row(1)]))
    b = _read(_jsonl(tmp_path / "b.jsonl", [_row(0), _row(2)]))
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == _read(tmp_path / "a.jsonl").fingerprint()


def test_a_safechain_release_is_read_by_its_columns_and_its_unsafe_rows_left_out(tmp_path):
    # SafeChain's label is True for an UNSAFE response: those rows are never trained on.
    rows = [
        {"instruction": "How do I bake bread?", "response": RESPONSE, "label": False},
        {"instruction": "How do I pick a lock?", "response": "<think>\nx\n</think>\n\nbad"},
        {"instruction": "Say hello", "response": "Hello.", "label": False},
    ]
    rows[1]["label"] = True
    path = _jsonl(tmp_path / "safechain" / "train.jsonl", rows)
    data = read_training_data(DatasetSettings(path=path, layout="safechain"), "sft")
    assert [row.prompt for row in data.rows] == ["How do I bake bread?", "Say hello"]
    # A response without think tags is brought to the canonical form.
    assert data.rows[1].response.startswith("<think>\n")
    assert data.kind == "release"


def test_a_star1_release_is_read_by_its_columns_from_parquet(tmp_path):
    path = tmp_path / "star1.parquet"
    datasets.Dataset.from_list(
        [{"question": f"question {i}", "response": RESPONSE, "category": "x"} for i in range(3)]
    ).to_parquet(str(path))
    data = read_training_data(DatasetSettings(path=path, layout="star1"), "sft")
    assert [row.prompt for row in data.rows] == ["question 0", "question 1", "question 2"]


@pytest.mark.parametrize(
    ("layout", "rows", "message"),
    [
        ("star1", [{"prompt": "p", "response": RESPONSE}], "missing 'question'"),
        ("safechain", [{"instruction": "p", "response": RESPONSE, "label": True}], "no row left"),
    ],
)
def test_a_release_in_the_wrong_layout_is_refused_naming_the_columns(
    tmp_path, layout, rows, message
):
    path = _jsonl(tmp_path / "release.jsonl", rows)
    with pytest.raises(DatasetError, match=message):
        read_training_data(DatasetSettings(path=path, layout=layout), "sft")


def test_a_release_has_no_preference_pairs(tmp_path):
    path = _jsonl(tmp_path / "train.jsonl", [{"instruction": "p", "response": RESPONSE}])
    with pytest.raises(DatasetError, match=r"DPO trains on a build's pairs\.jsonl"):
        read_training_data(DatasetSettings(path=path, layout="safechain"), "dpo")
