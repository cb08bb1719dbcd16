import json
from collections import Counter

import datasets
import pyarrow.parquet as pq
import pytest

from unsafechain.dataset import assembly
from unsafechain.dataset.assembly import (
    DatasetFiles,
    SelectedPicks,
    preference_pairs,
    primary_category,
    random_subset,
    release_row,
    selected_subset,
)
from unsafechain.dataset.card import rates_by
from unsafechain.dataset.config import AssemblySettings


def _completion(index, label, reasoning="r", answer="a"):
    return {"index": index, "label": label, "reasoning": reasoning, "answer": answer}


def _row(id, source, categories=(), *, corrected=False, corrections=()):
    """A training row as ``case_to_row`` makes it, with what assembly reads."""
    return {
        "id": id,
        "prompt": f"prompt {id}",
        "response": f"<think>\nr\n</think>\n\nresponse {id}",
        "source": source,
        "status": "corrected" if corrected else "safe_original",
        "hard": corrected,
        "harm_categories": list(categories),
        "provenance": {
            "completions": [
                _completion(0, "unsafe" if corrected else "safe", f"bad {id}", f"harm {id}"),
                _completion(1, "unsafe" if corrected else "safe"),
            ],
            "corrections": list(corrections),
        },
    }


def _correction(index, passed, attempts):
    return {
        "completion_index": index,
        "passed": passed,
        "attempts": [
            {"attempt": n, "text": text, "failure_reason": reason}
            for n, (text, reason) in enumerate(attempts, 1)
        ],
    }


def test_random_subset_is_seeded_and_capped_at_the_row_count():
    rows = [_row(f"r{i}", "a") for i in range(20)]
    sample = random_subset(rows, 5, seed=1)
    assert len(sample) == 5 and len({row["id"] for row in sample}) == 5
    assert random_subset(rows, 5, seed=1) == sample
    assert random_subset(rows, 5, seed=2) != sample
    assert random_subset(rows, 1000, seed=1) == rows


def test_selected_subset_puts_corrected_hard_cases_first():
    rows = [_row(f"s{i}", "benign") for i in range(10)]
    rows += [_row(f"c{i}", "redteam", ["S1"], corrected=True) for i in range(3)]
    selected = selected_subset(rows, 5)
    assert [row["status"] for row in selected] == ["corrected"] * 3 + ["safe_original"] * 2
    assert len(selected_subset(rows, 1000)) == len(rows)


def test_selected_subset_with_a_small_size_balances_sources_and_categories():
    rows = [_row(f"a{i:02}", "big", ["S1"]) for i in range(10)]
    rows += [_row(f"b{i:02}", "big", ["S2"]) for i in range(10)]
    rows += [_row(f"m{i}", "middle") for i in range(2)]
    rows += [_row("t0", "tiny", ["S10", "S1"])]
    # Every source gets a row before any gets a second; within a source, every category.
    selected = selected_subset(rows, 6)
    groups = Counter((row["source"], primary_category(row)) for row in selected)
    assert groups == {("big", "S1"): 2, ("big", "S2"): 1, ("middle", "none"): 2, ("tiny", "S10"): 1}
    assert Counter(row["source"] for row in selected_subset(rows, 3)) == {
        "big": 1,
        "middle": 1,
        "tiny": 1,
    }
    # Deterministic: the same rows in another order give the same subset.
    assert selected_subset(rows[::-1], 6) == selected


def _assemble(folder, training, *, test=(), failed=(), settings=None, seed=9):
    """Feed ``DatasetFiles`` one case at a time, as the build does; what it wrote."""
    settings = settings or AssemblySettings(random_size=4, selected_size=7)
    with DatasetFiles(folder, settings, seed) as files:
        for row in training:
            files.add([row])
        for row in test:
            files.add([row], test=True)
        for row in failed:
            files.add_failed(row)
        return files.finish()


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_streamed_subsets_are_the_subsets_of_the_whole_list(tmp_path, monkeypatch):
    # Chunks of 8 rows, each its own row group (a footer that costs nothing): the 30
    # rows cross several chunks, row groups and batches.
    monkeypatch.setattr(assembly, "CHUNK_ROWS", 8)
    monkeypatch.setattr(assembly, "_FOOTER_BYTES_PER_COLUMN_CHUNK", 0)
    rows = [_row(f"r{i:02}", "ab"[i % 2], ["S1"] if i % 3 else []) for i in range(30)]
    rows += [_row(f"c{i}", "b", ["S2"], corrected=True) for i in range(3)]
    done = _assemble(tmp_path, rows)
    expected = {
        "full": rows,
        "random": random_subset(rows, 4, seed=9),
        "selected": selected_subset(rows, 7),
    }
    assert done.subsets == {name: len(subset) for name, subset in expected.items()}
    splits = datasets.load_from_disk(str(tmp_path / "datasets"))
    for name, subset in expected.items():
        assert _lines(tmp_path / f"subsets/{name}.jsonl") == subset
        assert pq.read_table(tmp_path / f"subsets/{name}.parquet").to_pylist() == subset
        assert splits[name].to_list() == subset
        assert _lines(tmp_path / f"release/{name}.jsonl") == [release_row(r) for r in subset]
    assert pq.ParquetFile(tmp_path / "subsets/full.parquet").num_row_groups == 5
    assert _lines(tmp_path / "dataset.jsonl") == rows
    assert pq.read_table(tmp_path / "dataset.parquet").to_pylist() == rows
    # Nothing is left under a temporary name.
    assert not list(tmp_path.rglob("*.tmp"))


def test_row_groups_are_whole_chunks_sized_to_hold_least_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(assembly, "CHUNK_ROWS", 8)
    rows = [_row(f"r{i:03}", "ab"[i % 2], ["S1"]) for i in range(200)]
    _assemble(tmp_path, rows)
    parquet = pq.ParquetFile(tmp_path / "subsets/full.parquet")
    schema = parquet.schema_arrow
    # One Parquet column per primitive value, nested ones included.
    assert assembly._leaf_columns(schema.types) == parquet.metadata.num_columns
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
    assert sum(sizes) == 200 and 1 < len(sizes) < 25
    assert all(size % 8 == 0 for size in sizes[:-1])
    assert parquet.read().to_pylist() == rows
    # Four times the data, twice the row group: the footer and the held rows grow alike.
    assert assembly.row_group_bytes(4 << 30, schema) == 2 * assembly.row_group_bytes(
        1 << 30, schema
    )


def test_subsets_default_to_the_build_seed(tmp_path):
    rows = [_row(f"r{i}", "a") for i in range(30)]
    _assemble(tmp_path / "default", rows)
    assert _lines(tmp_path / "default/subsets/random.jsonl") == random_subset(rows, 4, seed=9)
    _assemble(tmp_path / "seeded", rows, settings=AssemblySettings(random_size=4, seed=2))
    assert _lines(tmp_path / "seeded/subsets/random.jsonl") == random_subset(rows, 4, seed=2)


def test_every_split_has_one_schema_and_the_test_split_its_own_files(tmp_path, monkeypatch):
    # Only a test row, in a chunk of its own, has a value in `extra`: every split still
    # has the column as a string, not as the null type the training rows alone give.
    monkeypatch.setattr(assembly, "CHUNK_ROWS", 2)
    training = [{**_row(f"r{i}", "a"), "split": "train", "extra": None} for i in range(3)]
    test = [{**_row("t", "a"), "split": "test", "extra": "only here"}]
    done = _assemble(tmp_path, training, test=test)
    assert done.test_rows == 1 and done.subsets["full"] == 3
    schemas = {pq.read_schema(path) for path in (tmp_path / "subsets").glob("*.parquet")}
    assert len(schemas) == 1 and str(schemas.pop().field("extra").type) == "string"
    assert datasets.load_from_disk(str(tmp_path / "datasets"))["test"].to_list() == test
    assert _lines(tmp_path / "subsets/test.jsonl") == test


def test_without_a_test_split_no_test_files(tmp_path):
    done = _assemble(tmp_path, [_row("r", "a")])
    assert done.test_rows == 0
    assert not (tmp_path / "subsets/test.jsonl").exists()
    assert list(datasets.load_from_disk(str(tmp_path / "datasets"))) == list(assembly.SUBSETS)


def test_pairs_of_failed_cases_come_after_every_training_row(tmp_path):
    corrections = [_correction(0, True, [("<think>careful</think>No.", "")])]
    training = [_row(f"c{i}", "a", corrected=True, corrections=corrections) for i in range(2)]
    failed = [{**_row("f", "a", corrected=True, corrections=corrections), "response": None}]
    test = [{**_row("t", "a", corrected=True, corrections=corrections), "split": "test"}]
    # Cases arrive interleaved; the pairs keep the order the list-based pairs have.
    with DatasetFiles(tmp_path, AssemblySettings(), 0) as files:
        files.add([training[0]])
        files.add_failed(failed[0])
        files.add([test[0]], test=True)
        files.add([training[1]])
        done = files.finish()
    pairs = _lines(tmp_path / "pairs.jsonl")
    assert [pair["id"] for pair in pairs] == ["c0", "c1", "f"]
    assert pairs == preference_pairs([*training, *failed]) and done.pairs == 3
    assert _lines(tmp_path / "failed.jsonl") == failed


def test_an_error_leaves_no_half_written_file(tmp_path):
    rows = [_row(f"r{i}", "a") for i in range(3)]
    with pytest.raises(RuntimeError), DatasetFiles(tmp_path, AssemblySettings(), 0) as files:
        files.add(rows)
        raise RuntimeError("the store broke")
    assert not (tmp_path / "dataset.jsonl").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def _greedy_reference(rows, size):
    """STAR-1's greedy balancing over every row, as the list-based code did it."""
    picked, per_source, per_category = [], Counter(), Counter()
    corrected = [r for r in rows if r["hard"] and r["status"] == "corrected"]
    others = [r for r in rows if not (r["hard"] and r["status"] == "corrected")]
    for tier in (corrected, others):
        groups = {}
        for row in tier:
            groups.setdefault((row["source"], primary_category(row)), []).append(row)
        groups = {key: iter(sorted(m, key=lambda r: r["id"])) for key, m in groups.items()}
        while groups and len(picked) < size:
            key = min(groups, key=lambda g: (per_source[g[0]], per_category[g[1]], g))
            row = next(groups[key], None)
            if row is None:
                del groups[key]
                continue
            picked.append(row)
            per_source[key[0]] += 1
            per_category[key[1]] += 1
    return picked


def test_selected_picks_keep_few_rows_per_group_and_pick_as_from_every_row():
    rows = [_row(f"a{(i * 7919) % 500:03}", "big", ["S1"]) for i in range(500)]
    rows += [_row(f"b{i:03}", "small", ["S2"], corrected=i % 4 == 0) for i in range(40)]
    picks = SelectedPicks(5)
    for position, row in enumerate(rows):
        picks.add(position, row)
    # At most twice the size per group is ever held, whatever the group's rows.
    assert max(len(members) for members in picks._groups.values()) <= 10
    assert [rows[i] for i in picks.picks()] == _greedy_reference(rows, 5)
    assert selected_subset(rows, 60) == _greedy_reference(rows, 60)


def test_release_row_has_exactly_the_public_columns():
    assert release_row(_row("x", "wildjailbreak")) == {
        "prompt": "prompt x",
        "response": "<think>\nr\n</think>\n\nresponse x",
        "split_name": "wildjailbreak",
    }


def test_preference_pairs_are_one_per_passed_correction():
    corrections = [
        _correction(0, True, [("still bad", "judged unsafe"), ("<think>careful</think>No.", "")]),
        _correction(1, False, [("bad", "judged unsafe")]),
    ]
    rows = [
        _row("c", "redteam", ["S9"], corrected=True, corrections=corrections),
        _row("s", "benign"),
    ]
    [pair] = preference_pairs(rows)
    assert pair["id"] == "c" and pair["source"] == "redteam" and pair["harm_categories"] == ["S9"]
    assert pair["chosen"] == "<think>\ncareful\n</think>\n\nNo."
    assert pair["rejected"] == "<think>\nbad c\n</think>\n\nharm c"
    assert pair["correction_attempt"] == 2


def test_rates_count_unsafe_completions_and_corrected_hard_cases():
    rows = [
        _row("c", "redteam", ["S1"], corrected=True),
        _row("s", "redteam"),
        {**_row("f", "redteam", ["S10", "S2"], corrected=True), "status": "correction_failed"},
    ]
    by_source = rates_by(rows, "source")
    assert list(by_source) == ["redteam"]
    redteam = by_source["redteam"]
    assert (redteam.generated, redteam.unsafe, redteam.hard, redteam.corrected) == (6, 4, 2, 1)
    assert redteam.unsafe_rate == 4 / 6 and redteam.correction_rate == 0.5
    by_category = rates_by(rows, "category")
    # In code order, S2 before S10; the safe case "s" counts under no category.
    assert [(name, r.cases) for name, r in by_category.items()] == [
        ("S1", 1),
        ("S2", 1),
        ("S10", 1),
    ]
    unnamed = _row("u", "redteam", corrected=True)
    assert [(name, r.cases) for name, r in rates_by([unnamed], "category").items()] == [("none", 1)]


def test_a_build_without_any_row_still_writes_every_file(tmp_path):
    failed = [{**_row("f", "a", corrected=True), "response": None}]
    done = _assemble(tmp_path, [], failed=failed)
    assert done.subsets == {"full": 0, "random": 0, "selected": 0}
    # Without rows there are no columns: the splits are listed, with no shard to load.
    assert json.loads((tmp_path / "datasets/dataset_dict.json").read_text())["splits"] == [
        *assembly.SUBSETS
    ]
    assert pq.read_table(tmp_path / "dataset.parquet").num_rows == 0
    assert _lines(tmp_path / "failed.jsonl") == failed


def test_the_datasets_folder_is_laid_out_without_progress_bars(tmp_path, capfd):
    import pyarrow as pa
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    schema = pa.schema([("id", pa.string())])
    were_off = are_progress_bars_disabled()  # an earlier test may have turned them off
    enable_progress_bars()
    try:
        assembly._datasets_layout(tmp_path / "datasets", ["full", "random"], schema)
        _, err = capfd.readouterr()
        assert "Saving the dataset" not in err
        assert not are_progress_bars_disabled(), "the caller's setting is restored"
    finally:
        if were_off:
            disable_progress_bars()
    assert json.loads((tmp_path / "datasets/dataset_dict.json").read_text())["splits"] == [
        "full",
        "random",
    ]
