"""The intake's record spool: records in a temporary file, read back as they went in."""

import tracemalloc

import pytest

from unsafechain.intake import spool as spool_module
from unsafechain.intake.sources import PromptRecord
from unsafechain.intake.spool import RecordSpool, spooled


def _record(i: int) -> PromptRecord:
    return PromptRecord(
        id=f"id-{i}",
        text=f'prompt {i} — naïve «quoted» "text"\nwith a newline {"x" * (i % 37)}',
        source="red" if i % 3 else "blue",
        uri="/data/prompts.jsonl",
        line=i + 1,
        metadata={"category": f"S{i % 14 + 1}"} if i % 2 else {},
        split="test" if i % 5 == 0 else "train",
    )


@pytest.fixture
def small_blocks(monkeypatch):
    # Blocks of a few lines, so that flushing and block reads cross record boundaries.
    monkeypatch.setattr(spool_module, "_FLUSH_BYTES", 300)
    monkeypatch.setattr(spool_module, "_READ_BYTES", 200)


def test_records_read_back_equal_in_order_by_position_and_by_slice(small_blocks):
    records = [_record(i) for i in range(200)]
    spool = spooled(records)
    assert len(spool) == 200
    assert list(spool) == records
    assert spool[0] == records[0] and spool[137] == records[137] and spool[-1] == records[-1]
    assert spool[10:20:3] == records[10:20:3]
    assert list(spool.ids()) == [r.id for r in records]
    with pytest.raises(IndexError):
        spool[200]
    spool.close()


def test_appending_after_reading_keeps_every_record(small_blocks):
    spool = RecordSpool()
    for i in range(50):
        spool.append(_record(i))
    assert spool[49] == _record(49)  # flushes what was pending
    for i in range(50, 90):
        spool.append(_record(i))
    assert list(spool) == [_record(i) for i in range(90)]


def test_a_view_holds_the_kept_records_and_reads_independently_of_the_spool(small_blocks):
    records = [_record(i) for i in range(120)]
    spool = spooled(records)
    view = spool.where(lambda r: r.split == "test")
    wanted = [r for r in records if r.split == "test"]
    assert len(view) == len(wanted) and list(view) == wanted and view[3] == wanted[3]
    # Reading one while iterating the other: reads are positioned, not a shared cursor.
    pairs = [(r, spool[len(records) - 1 - n]) for n, r in enumerate(view)]
    assert pairs[0] == (wanted[0], records[-1])
    with pytest.raises(TypeError, match="cannot be appended"):
        view.append(records[0])
    assert not spool.where(lambda r: False)


def test_memory_holds_offsets_not_records():
    records = [_record(i) for i in range(20_000)]
    tracemalloc.start()
    spool = spooled(records)
    assert spool[19_999] == records[19_999]  # every pending line written
    size, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # 12 bytes a record once written, and at most a megabyte or two pending on the way;
    # the records themselves take about 30 times those 12 bytes.
    assert size < 20_000 * 12 + 64_000
    assert peak < 20_000 * 12 + (1 << 21) + 64_000
