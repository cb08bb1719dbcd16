"""The settings of prompt intake: the sources, deduplication and decontamination.

The build reads them from its ``sources``, ``deduplication`` and ``decontamination``
sections; an evaluation reads its benchmarks with the same source settings.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from unsafechain.domain.settings import StrictModel, path_or_hub_name
from unsafechain.intake.loaders import LOADERS

FILE_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
}
"""The format a local file's suffix says."""


class SourceSettings(StrictModel):
    """One prompt source.

    Attributes:
        name: Source tag carried by every prompt (the release's ``split_name``).
        path: A JSONL, CSV, TSV or Parquet file, a ``datasets.save_to_disk`` folder,
            or a hub dataset name (``format: hub``; needs a network).
        format: ``auto`` decides from the path.
        prompt_field: Column holding the prompt text.
        split: Split to read from a ``datasets`` folder or hub dataset.
        limit: Read at most this many valid prompts.
        loader: The published record layout to read (see ``loaders.py``); ``generic``
            takes the prompt from ``prompt_field``.
        subsets: Keep only records whose subset column (WildJailbreak ``data_type``,
            StrongREJECT and TruthfulQA ``category``) holds one of these values.
        hub_config: Configuration name of a hub dataset, instead of the loader's default.
        max_prompt_chars: A longer prompt is a rejected record, with the reason; nothing
            that long is sent to a model.
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]
    path: Annotated[str, Field(min_length=1)]
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet", "datasets", "hub"] = "auto"
    prompt_field: str = "prompt"
    split: str = "train"
    limit: Annotated[int, Field(ge=1)] | None = None
    loader: Literal[
        "generic", "wildjailbreak", "strongreject", "hh_rlhf_redteam", "gsm8k", "mbpp", "truthfulqa"
    ] = "generic"
    subsets: Annotated[tuple[str, ...], Field(min_length=1)] | None = None
    hub_config: str | None = None
    max_prompt_chars: Annotated[int, Field(ge=1)] = 50_000

    @model_validator(mode="before")
    @classmethod
    def _local_path_from_config_folder(cls, values: object) -> object:
        # A hub dataset's name is no path; a file or folder starts from the config's folder.
        if isinstance(values, dict) and values.get("format") != "hub":
            values = {**values, "path": path_or_hub_name(values.get("path"), FILE_FORMATS)}
        return values

    @model_validator(mode="after")
    def _fits_loader(self) -> SourceSettings:
        if self.loader != "generic" and "prompt_field" in self.model_fields_set:
            raise ValueError(
                f"prompt_field: the {self.loader!r} loader reads its published columns; "
                "prompt_field applies to loader: generic only"
            )
        if self.subsets is not None and LOADERS[self.loader].subset_field is None:
            raise ValueError(f"subsets: the {self.loader!r} loader has no subset column")
        return self


class DeduplicationSettings(StrictModel):
    """Removing duplicate prompts across all sources, keeping the first in config order.

    Exact duplicates (equal after normalisation) are always removed.

    Attributes:
        near: Also remove near-duplicates, found by MinHash LSH over word shingles.
        threshold: Shingle Jaccard similarity at or above which a prompt is a
            near-duplicate of one kept before it.
        shingle_words: Words per shingle.
        permutations: MinHash signature length; more finds near-duplicates more reliably.
    """

    near: bool = True
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.9
    shingle_words: Annotated[int, Field(ge=1)] = 5
    permutations: Annotated[int, Field(ge=16, le=1024)] = 128


class HeldOutSettings(StrictModel):
    """A seeded held-out test split, drawn per source from the prompts kept.

    Test prompts are built like the others (their rows go to the ``test`` split of
    every export, never to a training subset), and they are added to decontamination:
    a training prompt that matches one (exactly, by n-grams or by TF-IDF, as against a
    benchmark) is removed.

    Attributes:
        fraction: Share of each source's prompts held out, rounded; 0 holds none.
        size: Prompts held out per source instead (fewer when it has fewer).
        seed: Seed of the draw; default: ``build.seed``.
    """

    fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    size: Annotated[int, Field(ge=0)] | None = None
    seed: int | None = None

    @model_validator(mode="after")
    def _one_size(self) -> HeldOutSettings:
        if self.size is not None and self.fraction:
            raise ValueError("give fraction or size, not both")
        return self

    def count(self, available: int) -> int:
        """How many of ``available`` prompts of a source are held out."""
        if self.size is not None:
            return min(self.size, available)
        return min(round(self.fraction * available), available)


class DecontaminationSettings(StrictModel):
    """Removing prompts that overlap an evaluation benchmark.

    A prompt is contaminated when it equals a benchmark prompt after normalisation
    (``exact``), when more than ``threshold`` of its word ``ngram``-grams occur in one
    benchmark (``ngram``), or when the TF-IDF cosine similarity of its words to one
    benchmark prompt reaches ``tfidf_threshold`` (``tfidf``, as STAR-1 decontaminates:
    this is what catches short prompts reworded, which share no 13-gram).

    Attributes:
        benchmarks: Benchmark prompt files, read like sources (any format and loader).
        ngram: Words per n-gram; prompts shorter than this match exactly only.
        threshold: Fraction of the prompt's n-grams that must be shared; the default 0
            removes a prompt sharing any one n-gram.
        tfidf_threshold: Cosine similarity (word unigrams and bigrams, TF-IDF weighted
            by the benchmarks' document frequencies) at or above which a prompt is
            contaminated; None turns the pass off.
    """

    benchmarks: tuple[SourceSettings, ...] = ()
    ngram: Annotated[int, Field(ge=1)] = 13
    threshold: Annotated[float, Field(ge=0, lt=1)] = 0.0
    tfidf_threshold: Annotated[float, Field(gt=0, le=1)] | None = 0.6

    @model_validator(mode="after")
    def _names_unique(self) -> DecontaminationSettings:
        names = [benchmark.name for benchmark in self.benchmarks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"benchmarks: duplicate benchmark name(s): {', '.join(duplicates)}")
        return self
