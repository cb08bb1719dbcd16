"""The case store: opening reads ids without parsing cases, ``ids`` is one set behind a
view, each case is parsed once when read back, in the order asked; damage is found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unsafechain.streaming import store as store_module
from unsafechain.streaming.store import CaseStore, StoreError, line_id
from unsafechain.v1 import case_pb2


def _case(case_id: str, text: str = "t") -> case_pb2.Case:
    case = case_pb2.Case(id=case_id, status=case_pb2.CASE_STATUS_CORRECTED)
    case.prompt.id = case_id
    case.prompt.text = text
    return case


def _filled(path: Path, count: int) -> list[str]:
    store = CaseStore(path)
    ids = [f"case-{i}" for i in range(count)]
    for case_id in ids:
        store.write(_case(case_id))
    store.close()
    return ids


@pytest.fixture
def parses(monkeypatch) -> list[str]:
    """The ids of the lines the store parses whole, in order."""
    seen: list[str] = []
    parse = store_module._parse

    def counted(line: bytes) -> case_pb2.Case:
        case = parse(line)
        seen.append(case.id)
        return case

    monkeypatch.setattr(store_module, "_parse", counted)
    return seen


def test_opening_reads_the_ids_without_parsing_a_case(tmp_path, parses):
    ids = _filled(tmp_path / "cases.jsonl", 50)
    parses.clear()
    store = CaseStore(tmp_path / "cases.jsonl")
    assert parses == []
    assert set(store.ids) == set(ids) and len(store.ids) == 50
    store.close()


def test_ids_is_one_view_that_follows_writes_and_forgets(tmp_path):
    _filled(tmp_path / "cases.jsonl", 3)
    store = CaseStore(tmp_path / "cases.jsonl")
    view = store.ids
    assert store.ids is view
    assert store.write(_case("new")) and "new" in view
    assert not store.write(_case("new"))
    store.forget(["case-0"])
    assert "case-0" not in view and len(view) == 3
    assert not hasattr(view, "add") and not hasattr(view, "discard")
    # Set operators work both ways and give frozensets (Kafka mode's progress counts).
    assert {"case-1", "x"} - view == {"x"}
    assert isinstance(view | {"x"}, frozenset) and {"case-1"} <= view
    store.close()


def test_read_back_parses_each_case_once_in_the_order_asked(tmp_path, parses):
    ids = _filled(tmp_path / "cases.jsonl", 20)
    store = CaseStore(tmp_path / "cases.jsonl")
    parses.clear()
    wanted = [*reversed(ids[5:]), "never-stored"]
    assert [case.id for case in store.cases(wanted)] == wanted[:-1]
    assert parses == wanted[:-1]
    parses.clear()
    assert [case.id for case in store.cases()] == ids
    assert parses == ids
    store.close()


def test_a_recomputed_case_reads_back_as_its_newest_line_after_a_reopen(tmp_path):
    path = tmp_path / "cases.jsonl"
    _filled(path, 3)
    store = CaseStore(path)
    store.forget(["case-1"])
    store.write(_case("case-1", text="again"))
    assert [case.prompt.text for case in store.cases(["case-1"])] == ["again"]
    store.close()
    reopened = CaseStore(path)
    assert [case.prompt.text for case in reopened.cases()] == ["t", "t", "again"]
    assert [case.id for case in reopened.cases()] == ["case-0", "case-2", "case-1"]
    reopened.close()


def test_a_line_not_starting_with_its_id_is_parsed_whole(tmp_path, parses):
    path = tmp_path / "cases.jsonl"
    _filled(path, 1)
    with path.open("a") as handle:
        handle.write(json.dumps({"prompt": {"text": "x"}, "id": "by-hand"}) + "\n")
    parses.clear()
    store = CaseStore(path)
    assert parses == ["by-hand"] and "by-hand" in store.ids
    store.close()


def test_an_escaped_id_is_read_from_the_line_start():
    line = json.dumps({"id": 'a "quoted" \\ id', "prompt": {}}).encode()
    assert line_id(line) == 'a "quoted" \\ id'


def test_damage_inside_a_line_is_found_on_read_back_and_by_repair(tmp_path):
    path = tmp_path / "cases.jsonl"
    _filled(path, 3)
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"prompt"', '"prom\x00pt"', 1)
    path.write_text("\n".join(lines) + "\n")
    store = CaseStore(path)
    with pytest.raises(StoreError, match=r"damaged line at byte \d+ .*--repair"):
        list(store.cases())
    store.close()
    repaired = CaseStore(path, repair=True)
    assert [case.id for case in repaired.cases()] == ["case-0", "case-2"]
    assert "case-1" not in repaired.ids
    repaired.close()


def test_opening_reads_the_file_line_by_line_not_whole(tmp_path):
    """A store of gigabytes opens in memory for its ids, not for its bytes: the open's
    peak allocation is a small share of the file's size (reading it whole and
    splitting it took twice the file)."""
    import tracemalloc

    path = tmp_path / "cases.jsonl"
    store = CaseStore(path)
    for i in range(300):
        store.write(_case(f"case-{i}", "x" * 20_000))
    store.close()
    tracemalloc.start()
    try:
        CaseStore(path).close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.stat().st_size > 6_000_000
    assert peak < path.stat().st_size / 10
