from collections import Counter

from unsafechain.dataset.assembly import (
    make_subsets,
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


def test_make_subsets_defaults_to_the_build_seed():
    rows = [_row(f"r{i}", "a") for i in range(30)]
    subsets = make_subsets(rows, AssemblySettings(random_size=4, selected_size=7), seed=9)
    assert subsets["full"] == rows
    assert subsets["random"] == random_subset(rows, 4, seed=9)
    assert len(subsets["selected"]) == 7
    seeded = make_subsets(rows, AssemblySettings(random_size=4, seed=2), seed=9)
    assert seeded["random"] == random_subset(rows, 4, seed=2)


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
