"""Reading a dataset a build wrote, by its documented layout, for training.

A build's output folder holds (see the dataset pipeline's assembly):

    manifest.json                      build id, config fingerprint, counts, files
    subsets/<name>.jsonl               the rows of each subset (full, random, selected)
                                       and of the held-out ``test`` split; each row
                                       has ``prompt``, ``response`` and ``split``
    datasets/                          a ``datasets.DatasetDict``, one split per subset
    release/<name>.jsonl               ``prompt``, ``response``, ``split_name``
    pairs.jsonl                        ``prompt``, ``chosen``, ``rejected`` (training
                                       prompts only)

Training never reads the held-out split: a subset or file named ``test`` is refused,
and so is a row whose ``split`` is ``test`` in a file that mixes them. Responses are
brought to the canonical ``<think>\\n…\\n</think>\\n\\n…`` form (released data sometimes
lacks a tag).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets

from unsafechain.domain.reasoning import split_reasoning
from unsafechain.domain.settings import SetupError
from unsafechain.training.settings import (
    RELEASE_COLUMNS,
    TEST_SPLIT,
    DatasetSettings,
    Objective,
)

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DATASETS_EXPORT = "datasets"
PAIRS = "pairs.jsonl"
DEFAULT_SUBSET = "full"

DatasetKind = Literal["build", "datasets", "jsonl", "pairs", "release"]
"""How the dataset was given: a build folder, its ``datasets/`` export, a JSONL file of
rows, or a file of preference pairs."""


class DatasetError(SetupError):
    """The dataset cannot be trained on as configured; the message says why."""


@dataclass(frozen=True, slots=True)
class SftRow:
    """One training conversation: a prompt and the response trained on."""

    prompt: str
    response: str

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat-template messages (no system prompt, as R1-distill
        models are used)."""
        return [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.response},
        ]


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """One DPO pair: the corrected response is preferred over the unsafe original."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True, slots=True)
class TrainingData:
    """The rows of one run and where they came from.

    Attributes:
        path: The dataset as configured.
        kind: How it was given.
        subset: The subset read (a file's name without its extension for a file).
        build_id: The build that wrote it, from its manifest (None when not found).
        config_fingerprint: That build's configuration fingerprint.
        rows: Conversations, for SFT.
        pairs: Preference pairs, for DPO.
    """

    path: Path
    kind: DatasetKind
    subset: str
    build_id: str | None
    config_fingerprint: str | None
    rows: tuple[SftRow, ...] = ()
    pairs: tuple[PreferencePair, ...] = ()

    def __len__(self) -> int:
        return len(self.rows) or len(self.pairs)

    def fingerprint(self) -> str:
        """Identifies the rows' content: a run resumes only on the same data."""
        digest = hashlib.sha256()
        for item in self.rows or self.pairs:
            digest.update(json.dumps(list(_fields(item)), ensure_ascii=False).encode())
        return digest.hexdigest()[:16]

    def provenance(self) -> dict:
        """What the run record says about the data."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "subset": self.subset,
            "build_id": self.build_id,
            "config_fingerprint": self.config_fingerprint,
            "rows": len(self),
            "content_fingerprint": self.fingerprint(),
        }


def _fields(item: SftRow | PreferencePair) -> tuple[str, ...]:
    if isinstance(item, SftRow):
        return (item.prompt, item.response)
    return (item.prompt, item.chosen, item.rejected)


def canonical_response(text: str) -> str:
    """``text`` in the canonical think format, both tags present (a text without tags
    is an answer with empty reasoning)."""
    return split_reasoning(text).render()


def read_training_data(settings: DatasetSettings, objective: Objective) -> TrainingData:
    """Read the rows (SFT) or pairs (DPO) of the configured dataset.

    Raises:
        DatasetError: The dataset is missing, is the held-out split, holds test rows,
            or does not suit the objective.
    """
    path = settings.path
    if not path.exists():
        raise DatasetError(f"dataset.path: {path} does not exist")
    if path.is_dir() and path.name == TEST_SPLIT:
        raise DatasetError(
            f"dataset.path: {path} is the build's held-out test split and is never trained on"
        )
    if settings.layout != "unsafechain":
        if objective == "dpo":
            raise DatasetError(
                f"dataset.layout: a {settings.layout} release has one response per prompt; "
                "DPO trains on a build's pairs.jsonl"
            )
        return _read_release(settings)
    if objective == "dpo":
        return _read_pairs(settings)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        return _read_datasets_export(settings)
    if path.is_dir():
        return _read_build_folder(settings)
    return _read_jsonl(settings, path, kind="jsonl", subset=_file_subset(settings, path))


def _file_subset(settings: DatasetSettings, path: Path) -> str:
    """The subset a file is: its name; refused when it is the test split."""
    name = path.name.removesuffix(".jsonl")
    if name == TEST_SPLIT:
        raise DatasetError(
            f"dataset.path: {path} is the build's held-out test split and is never trained on"
        )
    if settings.subset is not None and settings.subset != name:
        raise DatasetError(
            f"dataset.subset: {settings.subset!r} selects a subset of a build folder or its "
            f"datasets/ export; {path} is one file (subset {name!r})"
        )
    return name


def _read_build_folder(settings: DatasetSettings) -> TrainingData:
    folder = settings.path
    subset = settings.subset or DEFAULT_SUBSET
    file = folder / "subsets" / f"{subset}.jsonl"
    if not file.is_file():
        available = sorted(
            p.name.removesuffix(".jsonl")
            for p in (folder / "subsets").glob("*.jsonl")
            if p.name != f"{TEST_SPLIT}.jsonl"
        )
        if not (folder / MANIFEST).is_file() and not available:
            raise DatasetError(
                f"dataset.path: {folder} is not a build's output folder (no {MANIFEST}, no "
                "subsets/), nor a datasets/ export"
            )
        raise DatasetError(
            f"dataset.subset: {folder} has no subset {subset!r}; it has "
            f"{', '.join(available) or 'none'}"
        )
    return _read_jsonl(settings, file, kind="build", subset=subset, origin=folder)


def _read_jsonl(
    settings: DatasetSettings,
    file: Path,
    *,
    kind: DatasetKind,
    subset: str,
    origin: Path | None = None,
) -> TrainingData:
    records = _jsonl_records(file)
    rows = tuple(_sft_row(record, f"{file}:{line}") for line, record in records)
    _refuse_test_rows(file, [record for _, record in records])
    build_id, fingerprint = _build_identity(origin or file)
    logger.info("dataset: %d rows of subset %s from %s", len(rows), subset, file)
    return TrainingData(settings.path, kind, subset, build_id, fingerprint, rows=rows)


def _read_datasets_export(settings: DatasetSettings) -> TrainingData:
    subset = settings.subset or DEFAULT_SUBSET
    export = datasets.load_from_disk(str(settings.path))
    if subset not in export:
        names = ", ".join(name for name in export if name != TEST_SPLIT)
        raise DatasetError(
            f"dataset.subset: {settings.path} has no split {subset!r}; it has {names}"
        )
    split = export[subset]
    records = split.to_list()
    _refuse_test_rows(settings.path / subset, records)
    where = f"{settings.path}[{subset}]"
    rows = tuple(_sft_row(record, f"{where} row {i + 1}") for i, record in enumerate(records))
    build_id, fingerprint = _build_identity(settings.path)
    if build_id is None and records:
        build_id = (records[0].get("provenance") or {}).get("build_id")
    logger.info("dataset: %d rows of split %s from %s", len(rows), subset, settings.path)
    return TrainingData(settings.path, "datasets", subset, build_id, fingerprint, rows=rows)


def _read_pairs(settings: DatasetSettings) -> TrainingData:
    path = settings.path
    file = path / PAIRS if path.is_dir() else path
    if not file.is_file():
        raise DatasetError(
            f"dataset.path: DPO trains on a build's {PAIRS}; {path} has none (give the build "
            f"folder or its {PAIRS})"
        )
    if settings.subset is not None:
        raise DatasetError(
            f"dataset.subset: DPO trains on every pair of {PAIRS}; a subset cannot be chosen"
        )
    records = _jsonl_records(file)
    _refuse_test_rows(file, [record for _, record in records])
    pairs = tuple(_pair(record, f"{file}:{line}") for line, record in records)
    build_id, fingerprint = _build_identity(file)
    logger.info("dataset: %d preference pairs from %s", len(pairs), file)
    return TrainingData(path, "pairs", "pairs", build_id, fingerprint, pairs=pairs)


def _read_release(settings: DatasetSettings) -> TrainingData:
    """A public release in its own columns (SafeChain, STAR-1): JSONL, JSON or Parquet."""
    path = settings.path
    if path.is_dir():
        raise DatasetError(
            f"dataset.path: a {settings.layout} release is read from its file (JSONL, JSON or "
            f"Parquet); {path} is a folder"
        )
    if settings.subset is not None:
        raise DatasetError(f"dataset.subset: a {settings.layout} release is one set of rows")
    formats = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    if path.suffix not in formats:
        raise DatasetError(f"dataset.path: {path}: expected a .jsonl, .json or .parquet file")
    try:
        table = datasets.load_dataset(formats[path.suffix], data_files=str(path), split="train")
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as error:
        raise DatasetError(f"dataset.path: cannot read {path}: {error}") from None
    prompt_key, response_key = RELEASE_COLUMNS[settings.layout]
    missing = [key for key in (prompt_key, response_key) if key not in table.column_names]
    if missing:
        raise DatasetError(
            f"{path}: a {settings.layout} release has columns {prompt_key!r} and "
            f"{response_key!r}; missing {', '.join(map(repr, missing))} (it has "
            f"{', '.join(table.column_names)})"
        )
    records = table.to_list()
    _refuse_test_rows(path, records)
    rows, unsafe = [], 0
    for number, record in enumerate(records, start=1):
        # SafeChain's label is True for an UNSAFE response (its judge's verdict).
        if settings.layout == "safechain" and record.get("label") is True:
            unsafe += 1
            continue
        where = f"{path} row {number}"
        rows.append(
            SftRow(
                _text(record, prompt_key, where),
                canonical_response(_text(record, response_key, where)),
            )
        )
    if unsafe:
        logger.warning(
            "dataset: %d of %d SafeChain rows are labelled unsafe (label true) and are left out",
            unsafe,
            len(records),
        )
    if not rows:
        raise DatasetError(f"{path}: no row left to train on")
    logger.info("dataset: %d rows of the %s release %s", len(rows), settings.layout, path)
    subset = path.name.removesuffix(path.suffix)
    return TrainingData(path, "release", subset, None, None, rows=tuple(rows))


def _jsonl_records(file: Path) -> list[tuple[int, dict]]:
    records = []
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise DatasetError(f"{file}:{number}: not a JSON object: {error}") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{file}:{number}: not a JSON object")
            records.append((number, record))
    if not records:
        raise DatasetError(f"{file}: no rows")
    return records


def _refuse_test_rows(where: Path, records: list[dict]) -> None:
    held_out = sum(1 for record in records if record.get("split") == TEST_SPLIT)
    if held_out:
        raise DatasetError(
            f"{where}: {held_out} of its {len(records)} rows are in the held-out test split "
            f'("split": "{TEST_SPLIT}") and are never trained on; train on a subset '
            "(full, random, selected) instead"
        )


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: {key!r} must be a non-empty string")
    return value


def _sft_row(record: dict, where: str) -> SftRow:
    if "response" not in record and "chosen" in record:
        raise DatasetError(f"{where}: a preference pair; SFT needs rows with a response")
    return SftRow(
        _text(record, "prompt", where), canonical_response(_text(record, "response", where))
    )


def _pair(record: dict, where: str) -> PreferencePair:
    if "chosen" not in record and "response" in record:
        raise DatasetError(f"{where}: a row with one response; DPO needs pairs ({PAIRS})")
    return PreferencePair(
        _text(record, "prompt", where),
        canonical_response(_text(record, "chosen", where)),
        canonical_response(_text(record, "rejected", where)),
    )


def _build_identity(start: Path) -> tuple[str | None, str | None]:
    """The build id and config fingerprint in the manifest of the build that holds
    ``start`` (the folder itself, or up to two levels above a file in it)."""
    folder = start if start.is_dir() else start.parent
    for candidate in (folder, folder.parent, folder.parent.parent):
        manifest = candidate / MANIFEST
        if manifest.is_file():
            try:
                content = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                logger.warning("cannot read %s; the run records no build id", manifest)
                return None, None
            return content.get("build_id"), content.get("config_fingerprint")
    return None, None
