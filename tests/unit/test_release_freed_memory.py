"""release_freed_memory gives freed heap pages back to the operating system."""

from __future__ import annotations

import sys

import pytest

from unsafechain.domain.memory import release_freed_memory

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc and trims glibc's heap"
)


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_freed_chunks_pinned_below_live_ones_are_returned() -> None:
    # 200,000 malloc'd chunks of 1 kB, one in fifty kept: freeing the rest leaves
    # ~190 MiB of free chunks below live ones, which free() alone does not return.
    size, kept, freed = 1000, [], []
    for i in range(200_000):
        (kept if i % 50 == 0 else freed).append(bytes(size))
    del freed
    before = _rss_mib()
    release_freed_memory()
    after = _rss_mib()
    assert len(kept) == 4000
    assert before - after > 100, (before, after)
