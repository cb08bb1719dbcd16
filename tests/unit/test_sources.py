import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unsafechain.intake.settings import SourceSettings
from unsafechain.intake.sources import (
    PromptRecord,
    Rejection,
    SourceError,
    prompt_id,
    read_source,
)


def _read(tmp_path, name, content, **settings):
    path = tmp_path / name
    path.write_text(content)
    items = list(read_source(SourceSettings(name="src", path=str(path), **settings)))
    return [i for i in items if isinstance(i, PromptRecord)], [
        i for i in items if isinstance(i, Rejection)
    ]


def test_malformed_jsonl_lines_are_reported_with_line_and_reason_and_the_rest_is_read(tmp_path):
    lines = [
        json.dumps({"prompt": "first", "category": "x"}),
        "{not json",
        json.dumps({"text": "no prompt field"}),
        json.dumps({"prompt": 42}),
        json.dumps({"prompt": "   "}),
        json.dumps(["a", "list"]),
        "",
        json.dumps({"prompt": "last"}),
    ]
    records, rejections = _read(tmp_path, "p.jsonl", "\n".join(lines) + "\n")
    assert [r.text for r in records] == ["first", "last"]
    assert [r.line for r in records] == [1, 8]
    assert records[0].metadata == {"category": "x"}
    assert records[0].source == "src"
    reasons = {r.line: r.reason for r in rejections}
    assert set(reasons) == {2, 3, 4, 5, 6}
    assert reasons[2].startswith("invalid JSON")
    assert reasons[3] == "missing field 'prompt'"
    assert reasons[4] == "field 'prompt' is int, not a string"
    assert reasons[5] == "field 'prompt' is empty"
    assert "not an object" in reasons[6]
    assert all(r.uri.endswith("p.jsonl") and r.source == "src" for r in rejections)
    assert str(rejections[0]).endswith("p.jsonl:2: " + reasons[2])


def test_prompt_ids_are_stable_and_depend_on_source_and_text():
    assert prompt_id("a", "x") == prompt_id("a", "x")
    assert prompt_id("a", "x") != prompt_id("b", "x")
    assert prompt_id("a", "x") != prompt_id("a", "y")


def test_parquet_rows_are_read_and_validated(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["q1", None, "q3"], "id": [1, 2, 3]}), path)
    items = list(read_source(SourceSettings(name="pq", path=str(path), prompt_field="question")))
    assert [i.text for i in items if isinstance(i, PromptRecord)] == ["q1", "q3"]
    [rejection] = [i for i in items if isinstance(i, Rejection)]
    assert rejection.line == 2
    assert "NoneType" in rejection.reason


def test_csv_and_tsv_rows_are_read_with_their_line_numbers(tmp_path):
    # A quoted value may span lines; a row is numbered by the line it starts on.
    content = (
        "category,source,forbidden_prompt\r\n"
        'Violence,custom,"first, with a comma"\r\n'
        'Violence,custom,"second\nover two lines"\r\n'
        "Violence,too few fields\r\n"
        "\r\n"
        "Violence,custom,\r\n"
        "Violence,custom,last\r\n"
    )
    path = tmp_path / "strongreject_dataset.csv"
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())
    items = list(read_source(SourceSettings(name="sr", path=str(path), loader="strongreject")))
    records = [i for i in items if isinstance(i, PromptRecord)]
    assert [(r.line, r.text) for r in records] == [
        (2, "first, with a comma"),
        (3, "second\nover two lines"),
        (8, "last"),
    ]
    assert records[0].metadata == {"category": "Violence", "source": "custom"}
    reasons = {i.line: i.reason for i in items if isinstance(i, Rejection)}
    assert reasons == {
        5: "row has 2 fields, the header has 3",
        7: "field 'forbidden_prompt' is empty",
    }
    tsv = tmp_path / "eval.tsv"
    tsv.write_text("adversarial\tlabel\tdata_type\nplay a role, then ask\t1\tadversarial_harmful\n")
    items = list(read_source(SourceSettings(name="wj", path=str(tsv), loader="wildjailbreak")))
    assert [i.text for i in items if isinstance(i, PromptRecord)] == ["play a role, then ask"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"prompt\ncaf\xe9\n")
    with pytest.raises(SourceError, match=r"latin\.csv: not UTF-8"):
        list(read_source(SourceSettings(name="l", path=str(latin))))


def test_datasets_folder_split_is_read(tmp_path):
    folder = tmp_path / "ds"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"prompt": ["a", "b"]}),
            "test": datasets.Dataset.from_dict({"prompt": ["c"]}),
        }
    ).save_to_disk(str(folder))
    items = list(read_source(SourceSettings(name="ds", path=str(folder), split="test")))
    assert [i.text for i in items] == ["c"]
    with pytest.raises(SourceError, match="split 'dev' not in"):
        list(read_source(SourceSettings(name="ds", path=str(folder), split="dev")))


def test_limit_counts_valid_prompts_only(tmp_path):
    content = "\n".join(["{bad", *(json.dumps({"prompt": f"p{i}"}) for i in range(5))])
    records, rejections = _read(tmp_path, "p.jsonl", content, limit=2)
    assert [r.text for r in records] == ["p0", "p1"]
    assert len(rejections) == 1


def test_missing_source_file_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list(read_source(SourceSettings(name="x", path=str(tmp_path / "nope.jsonl"))))
    with pytest.raises(SourceError, match="cannot tell the format"):
        list(read_source(SourceSettings(name="x", path=str(tmp_path / "nope.txt"))))
