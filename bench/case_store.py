"""Benchmark: the case store's CPU per case written, and opening a stored build to resume.

Writes ``--cases`` synthetic cases (K completions with verdicts, corrections of the
hard ones, the build's provenance: the shape a build over the test servers stores) to a
fresh store, then reopens it as a resumed build does and checks every prompt's id
against it once, then reads every case back. It reports, per case: the CPU of
encoding, of writing and of fsync (each measured on its own), the store's open
seconds, the resume check's seconds (one ``in store.ids`` per record), and the read
back's seconds.

``--store FILE`` measures another version of ``unsafechain/streaming/store.py`` (e.g.
``git show <commit>:pipelines/unsafechain/streaming/store.py > /tmp/old.py``), for a
before/after on the same load.

Usage::

    .venv/bin/python bench/case_store.py --cases 10000
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path
from types import ModuleType

from machine import host_description

from unsafechain.v1 import case_pb2


def load_store(path: Path | None) -> ModuleType:
    """The store module: the installed one, or the version in ``path``."""
    if path is None:
        from unsafechain.streaming import store

        return store
    spec = importlib.util.spec_from_file_location("store_under_test", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--store: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_case(index: int, samples: int) -> case_pb2.Case:
    """A finished hard case: ``samples`` judged completions, each corrected."""
    case_id = f"synthetic-{index:08d}"
    case = case_pb2.Case(id=case_id, status=case_pb2.CASE_STATUS_CORRECTED, hard=True)
    case.prompt.id = case_id
    case.prompt.text = f"Request {index}: explain how to combine the parts, step by step."
    case.prompt.source.name = "synthetic"
    case.prompt.source.uri = "/data/prompts.jsonl"
    case.prompt.source.line = index + 1
    case.provenance.build_id = "build-20260101T000000Z-00000000"
    case.provenance.generator.model = "deepseek-r1-distill-test"
    case.provenance.judges.add(name="llama-guard-3", kind="llama_guard")
    reasoning = "The user wants the steps. I will think about the parts, the order. " * 4
    answer = "Here is how to do it: first gather the materials, then follow the steps. " * 4
    for k in range(samples):
        completion = case.completions.add(
            index=k,
            text=f"<think>\n{reasoning}\n</think>\n\n{answer}",
            reasoning=reasoning,
            answer=answer,
            has_think_open=True,
            has_think_close=True,
            finish_reason="stop",
            label=case_pb2.VERDICT_LABEL_UNSAFE,
        )
        completion.verdicts.add(label=case_pb2.VERDICT_LABEL_UNSAFE, raw_output="unsafe\nS1")
        correction = case.corrections.add(completion_index=k, passed=True)
        correction.attempts.add(
            attempt=1, text=f"<think>\n{reasoning}\n</think>\n\nI can't help with that."
        )
    case.unsafe_fraction = 1.0
    return case


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases stored")
    parser.add_argument("--samples", type=int, default=4, help="completions per case (K)")
    parser.add_argument("--store", type=Path, help="another version of store.py to measure")
    args = parser.parse_args()
    if args.cases < 1 or args.samples < 1:
        parser.error("--cases and --samples must be at least 1")
    module = load_store(args.store)
    print(f"machine: {host_description()}")
    cases = [synthetic_case(index, args.samples) for index in range(args.cases)]
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "cases.jsonl"
        store = module.CaseStore(path)
        started = _cpu()
        for case in cases:
            store.write(case)
        write_cpu = _cpu() - started
        store.close()
        line = path.stat().st_size / args.cases
        started = time.perf_counter()
        store = module.CaseStore(path)
        opened = time.perf_counter() - started
        started = time.perf_counter()
        todo = [case.id for case in cases if case.id not in store.ids]
        checked = time.perf_counter() - started
        started = time.perf_counter()
        read = sum(1 for _ in store.cases())
        read_seconds = time.perf_counter() - started
        store.close()
    assert not todo and read == args.cases, (len(todo), read)
    print(
        f"{args.cases} cases of {line / 1024:.1f} KiB: write {write_cpu * 1000 / args.cases:.2f} "
        f"ms CPU per case (encode + write + fsync); open {opened:.2f} s; resume check "
        f"{checked:.3f} s; read back {read_seconds:.2f} s "
        f"({read_seconds * 1000 / args.cases:.2f} ms per case); load "
        f"{os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
