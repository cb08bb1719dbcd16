"""The dataset card: ``README.md`` and its plot ``unsafe_rate.png`` in the output folder.

The card is a Hugging Face Hub dataset card: YAML front matter (configurations for the
subsets with the test split, features, license, task categories, language, size
category) and a body with a stand-in disclaimer (when the models are the stand-ins),
a content warning, the counts, the rates, the models, the rules, the judges' targets,
decontamination, limitations and the method's citation. Every rate states its
denominator: the harm categories are the share of unsafe verdicts naming each.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Self

import datasets
import pyarrow.parquet as pq
from huggingface_hub import DatasetCardData
from matplotlib.ticker import PercentFormatter

from unsafechain.dataset.assembly import TEST_SPLIT
from unsafechain.dataset.config import BuildConfig
from unsafechain.dataset.rows import NO_CATEGORY, RowKind
from unsafechain.demo.marker import STANDS_IN_FOR
from unsafechain.domain.plots import new_figure, save_png
from unsafechain.judge.llama_guard import CATEGORY_BY_CODE
from unsafechain.judge.settings import EnsembleSettings

logger = logging.getLogger(__name__)

PLOT = "unsafe_rate.png"
PLOT_ALT = (
    "Unsafe and correction rates by source, and the share of unsafe verdicts naming each "
    "harm category"
)

CITATION = """@article{tomar2025unsafechain,
  title   = {UnsafeChain: Enhancing Reasoning Model Safety via Hard Cases},
  author  = {Tomar, Raj Vardhan and Nakov, Preslav and Wang, Yuxia},
  journal = {arXiv preprint arXiv:2507.21652},
  year    = {2025}
}"""
"""The method's citation, as the card gives it."""

_SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"))


def size_category(rows: int) -> str:
    """The Hub's size category for a dataset of ``rows`` rows."""
    for bound, name in _SIZE_CATEGORIES:
        if rows < bound:
            return name
    return "100K<n<1M" if rows < 1_000_000 else "n>1M"


@dataclass
class Rates:
    """What one source or harm category counts.

    Attributes:
        cases: Cases (prompts).
        generated: Completions generated.
        unsafe: Completions judged unsafe.
        hard: Hard cases.
        corrected: Hard cases with a correction that passed re-judging.
    """

    cases: int = 0
    generated: int = 0
    unsafe: int = 0
    hard: int = 0
    corrected: int = 0

    @property
    def unsafe_rate(self) -> float | None:
        """Completions judged unsafe per completion generated; ``None`` without any."""
        return self.unsafe / self.generated if self.generated else None

    @property
    def correction_rate(self) -> float | None:
        """Corrected per hard case; ``None`` without hard cases."""
        return self.corrected / self.hard if self.hard else None

    def add(self, row: dict) -> None:
        """Count the case ``row`` (a dataset or failed row) describes."""
        completions = row["provenance"]["completions"]
        self.cases += 1
        self.generated += len(completions)
        self.unsafe += sum(c["label"] == "unsafe" for c in completions)
        self.hard += row["hard"]
        self.corrected += row["status"] == "corrected"


@dataclass
class CategoryShares:
    """How often the unsafe verdicts on the generated completions name each harm
    category: the denominator is every unsafe verdict, so a share says what the judges
    flagged, not how unsafe a category's prompts are.

    Attributes:
        unsafe_verdicts: Unsafe verdicts on generated completions (corrections left out).
        naming: Unsafe verdicts naming each category code (``none``: naming none); a
            verdict naming two codes counts under both.
    """

    unsafe_verdicts: int = 0
    naming: dict[str, int] = field(default_factory=dict)

    def share(self, code: str) -> float | None:
        """Unsafe verdicts naming ``code`` per unsafe verdict; ``None`` without any."""
        return self.naming.get(code, 0) / self.unsafe_verdicts if self.unsafe_verdicts else None

    def add(self, row: dict) -> None:
        """Count the unsafe verdicts on the generated completions of ``row``'s case."""
        for completion in row["provenance"]["completions"]:
            for verdict in completion.get("verdicts", []):
                if verdict["label"] != "unsafe":
                    continue
                self.unsafe_verdicts += 1
                for code in dict.fromkeys(verdict["categories"] or [NO_CATEGORY]):
                    self.naming[code] = self.naming.get(code, 0) + 1

    def sorted(self) -> CategoryShares:
        """These shares with the categories in code order."""
        return CategoryShares(self.unsafe_verdicts, _sorted(self.naming))


def _rate_names(row: dict, key: Literal["source", "category"]) -> list[str]:
    """The names ``row``'s case counts under: its source, or every harm category its
    unsafe verdicts name (``none`` when they name none; no category when no completion
    is unsafe)."""
    if key == "source":
        return [row["source"]]
    if any(c["label"] == "unsafe" for c in row["provenance"]["completions"]):
        return row["harm_categories"] or [NO_CATEGORY]
    return []


@dataclass
class CardCounts:
    """What the card counts of the build's rows, fed one row at a time.

    Attributes:
        by_source: Rates per source.
        by_category: Rates per harm category (:func:`rates_by`).
        shares: The unsafe verdicts by the categories they name.
        training_rows: Training rows per source.
        test_rows: Rows of the held-out test split per source.
    """

    by_source: dict[str, Rates] = field(default_factory=lambda: defaultdict(Rates))
    by_category: dict[str, Rates] = field(default_factory=lambda: defaultdict(Rates))
    shares: CategoryShares = field(default_factory=lambda: CategoryShares())
    training_rows: Counter[str] = field(default_factory=Counter)
    test_rows: Counter[str] = field(default_factory=Counter)

    def add(self, row: dict, kind: RowKind) -> None:
        """Count ``row``: a training row, a test row, or the row of a failed case."""
        for name in _rate_names(row, "source"):
            self.by_source[name].add(row)
        for name in _rate_names(row, "category"):
            self.by_category[name].add(row)
        self.shares.add(row)
        if kind == "training":
            self.training_rows[row["source"]] += 1
        elif kind == "test":
            self.test_rows[row["source"]] += 1

    def sorted(self) -> Self:
        """These counts with sources and categories in report order."""
        return dataclasses.replace(
            self,
            by_source=_sorted(self.by_source),
            by_category=_sorted(self.by_category),
            shares=self.shares.sorted(),
        )


def _sorted(values: dict) -> dict:
    """``values`` by name, numbers by value: S2 before S10, ``none`` last."""
    return dict(sorted(values.items(), key=lambda item: _natural_order(item[0])))


def rates_by(cases: list[dict], key: Literal["source", "category"]) -> dict[str, Rates]:
    """Rates per ``source`` or per ``category``, sorted by name, numbers by value.

    A case counts under every harm category its unsafe verdicts name, so category rows
    overlap; a case with unsafe completions whose verdicts name none counts under
    ``none``, last, and a case without unsafe completions under no category.
    """
    rates: dict[str, Rates] = defaultdict(Rates)
    for row in cases:
        for name in _rate_names(row, key):
            rates[name].add(row)
    return _sorted(rates)


def category_shares(cases: list[dict]) -> CategoryShares:
    """The unsafe verdicts of ``cases``' generated completions, by the categories they
    name, in code order (S2 before S10, ``none`` last)."""
    shares = CategoryShares()
    for row in cases:
        shares.add(row)
    return shares.sorted()


def _natural_order(name: str) -> tuple:
    # S2 before S10, and the catch-all category after the named ones.
    parts = tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))
    return (name == NO_CATEGORY, parts)


def category_label(code: str) -> str:
    """``S1 Violent Crimes`` for a Llama Guard code; other codes as they are."""
    category = CATEGORY_BY_CODE.get(code)
    return f"{code} {category.name}" if category else code


def write_card(
    output: Path,
    config: BuildConfig,
    manifest: dict,
    counts: CardCounts,
) -> None:
    """Write the dataset card and its plot into ``output``.

    Args:
        output: The build's output folder, its Parquet files written.
        config: The build's configuration (sources, models, settings).
        manifest: The manifest, for counts, subsets and rules.
        counts: The card's counts of every case's rows, with a response or not.
    """
    counts = counts.sorted()
    _plot(output / PLOT, counts.by_source, counts.shares)
    front = front_matter(output, config, manifest["subsets"], manifest["counts"]["test_rows"])
    body = _card_text(config, manifest, counts)
    (output / "README.md").write_text(f"---\n{front.to_yaml()}\n---\n\n{body}", encoding="utf-8")
    logger.info("dataset card written to %s", output / "README.md")


def front_matter(
    output: Path, config: BuildConfig, subsets: dict[str, int], test_rows: int
) -> DatasetCardData:
    """The card's YAML metadata: one configuration per subset, each with the test split
    when there is one, and the features of the Parquet files they point to."""
    card = config.card
    schema = pq.read_schema(output / "subsets" / "full.parquet")
    # DatasetInfo writes features the way the Hub's YAML reads them.
    features = datasets.DatasetInfo(
        features=datasets.Features.from_arrow_schema(schema)
    )._to_yaml_dict()["features"]
    configs, infos = [], []
    for name, rows in subsets.items():
        files = [{"split": "train", "path": f"subsets/{name}.parquet"}]
        splits = [{"name": "train", "num_examples": rows}]
        if test_rows:
            files.append({"split": TEST_SPLIT, "path": f"subsets/{TEST_SPLIT}.parquet"})
            splits.append({"name": TEST_SPLIT, "num_examples": test_rows})
        entry: dict = {"config_name": name, "data_files": files}
        if name == "full":
            entry["default"] = True
        configs.append(entry)
        # A copy each: shared objects would be written as YAML anchors.
        infos.append({"config_name": name, "features": copy.deepcopy(features), "splits": splits})
    return DatasetCardData(
        pretty_name=card.pretty_name,
        license=card.license,
        language=list(card.language),
        task_categories=["text-generation"],
        tags=["safety", "alignment", "reasoning", "chain-of-thought", "red-teaming"],
        size_categories=[size_category(subsets["full"])],
        configs=configs,
        dataset_info=infos,
    )


def _percent(rate: float | None) -> str:
    return "–" if rate is None else f"{rate:.1%}"


def _rates_table(title: str, rates: dict[str, Rates], label=str) -> list[str]:
    lines = [
        f"| {title} | cases | generated | judged unsafe | unsafe rate | hard | corrected "
        "| correction rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rates.items():
        lines.append(
            f"| {label(name)} | {r.cases} | {r.generated} | {r.unsafe} "
            f"| {_percent(r.unsafe_rate)} | {r.hard} | {r.corrected} "
            f"| {_percent(r.correction_rate)} |"
        )
    return lines


def _category_table(by_category: dict[str, Rates], shares: CategoryShares) -> list[str]:
    lines = [
        "| harm category | unsafe verdicts naming it | share of unsafe verdicts | cases | hard "
        "| corrected | correction rate |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    codes = sorted({*shares.naming, *by_category}, key=_natural_order)
    for code in codes:
        r = by_category.get(code, Rates())
        lines.append(
            f"| {category_label(code)} | {shares.naming.get(code, 0)} "
            f"| {_percent(shares.share(code))} | {r.cases} | {r.hard} | {r.corrected} "
            f"| {_percent(r.correction_rate)} |"
        )
    return lines


def standin_lines(manifest: dict) -> list[str]:
    """The card's disclaimer when the build ran on the stand-ins of ``unsafechain
    standins`` (as its manifest records them); nothing for real models."""
    standins = {key: m["standin"] for key, m in manifest["models"].items() if m.get("standin")}
    if not standins:
        return []
    roles = "; ".join(
        f"`{key}` stands in for {STANDS_IN_FOR.get(role, 'a real model')}"
        for key, role in standins.items()
    )
    return [
        "> **Built with stand-in models.** The models of this build are the tiny stand-ins "
        f"that `unsafechain standins` trains on a synthetic world ({roles}). Their "
        "completions, verdicts and corrections, and every count, rate and plot on this "
        "card, say nothing about real safety: this build shows what each stage writes, "
        "not data to train a model on.",
        "",
    ]


def _card_text(config: BuildConfig, manifest: dict, counts: CardCounts) -> str:
    generation, correction, assembly = config.generation, config.correction, config.assembly
    read = manifest["read_by_source"]
    targets = [target.value for target in config.judging.targets]
    by_source, by_category, shares = counts.by_source, counts.by_category, counts.shares
    subsets, test_rows = manifest["subsets"], manifest["counts"]["test_rows"]
    lines = [
        f"# {config.card.pretty_name}",
        "",
        *standin_lines(manifest),
        "> **Content warning.** This dataset holds prompts that ask for harmful content "
        "(violence, weapons, crime, self-harm, hate and more), and its provenance keeps "
        "the model completions that were judged unsafe, verbatim. It is meant for safety "
        "research and for training models to refuse or redirect; handle it accordingly.",
        "",
        f"Build `{manifest['build_id']}`, platform {manifest['platform_version']}, "
        f"finished {manifest['finished_at']}.",
        "",
        "Hard prompts (completions judged unsafe) with their unsafe completions corrected "
        "into safe ones in the same `<think>` format, and a judged-safe completion for every "
        "other prompt (UnsafeChain, arXiv 2507.21652).",
        "",
        "## Sources",
        "",
        "| source | path | prompts read | training rows | test rows |",
        "|---|---|---:|---:|---:|",
        *(
            f"| {s.name} | `{s.path}` | {read.get(s.name, 0)} "
            f"| {counts.training_rows[s.name]} | {counts.test_rows[s.name]} |"
            for s in config.sources
        ),
        "",
        "## Counts per stage",
        "",
        "| stage | count |",
        "|---|---:|",
        *(f"| {name} | {count} |" for name, count in manifest["counts"].items()),
        "",
        "## Unsafe and correction rates",
        "",
        "Unsafe rate: completions judged unsafe per completion generated. Correction rate: "
        "hard cases with a correction that passed re-judging per hard case.",
        "",
        f"Harm categories: the share of unsafe verdicts naming each category, out of all "
        f"{shares.unsafe_verdicts} unsafe verdicts on generated completions (`none`: naming "
        "no category). A verdict may name several categories, so the shares can add up to "
        "more than 100%. The case columns count the cases whose unsafe verdicts name the "
        "category.",
        "",
        f"![{PLOT_ALT}]({PLOT})",
        "",
        *_rates_table("source", by_source),
        "",
        *_category_table(by_category, shares),
        "",
        "## Models and settings",
        "",
        "| role | key | backend | model |",
        "|---|---|---|---|",
        f"| generator | {generation.model} | {config.models[generation.model].backend} "
        f"| `{config.models[generation.model].model}` |",
        *(
            f"| judge `{judge.name}` ({judge.kind}) | {judge.model} "
            f"| {config.models[judge.model].backend} | `{config.models[judge.model].model}` |"
            for judge in config.judging.judges
            if not isinstance(judge, EnsembleSettings)
        ),
        f"| corrector | {correction.model} | {config.models[correction.model].backend} "
        f"| `{config.models[correction.model].model}` |",
        "",
        f"- Generation: K={generation.samples} samples per prompt, temperature "
        f"{generation.temperature}, top-p {generation.top_p}, "
        f"top-k {generation.top_k or 'off'}, at most "
        f"{generation.max_new_tokens} new tokens, seed {config.build.seed}, "
        + (
            f"system prompt `{system}`"
            if (system := generation.system_prompt)
            else "no system prompt"
        )
        + ".",
        f"- Judging: {', '.join(judge.name for judge in config.judging.reported)} on "
        f"{', '.join(targets)}.",
        f"- Correction: at most {correction.max_attempts} attempts per unsafe completion "
        f"({correction.completions}), temperature {correction.temperature}, top-p "
        f"{correction.top_p}, top-k {correction.top_k or 'off'}, at most "
        f"{correction.max_new_tokens} new tokens; refusal check "
        + (
            f"`{check.mode.value}` by judge `{check.judge}`"
            if (check := correction.refusal_check).judge and check.mode != "off"
            else "off"
        )
        + ".",
        "",
        "## Rules",
        "",
        f"- Hard case: {manifest['rules']['hard_case']}.",
        f"- Corrected: {manifest['rules']['corrected']}.",
        f"- Training row: {manifest['rules']['training_row']}.",
        f"- Truncated completions: {manifest['rules']['truncated']} "
        f"({manifest['counts']['truncated']} of {manifest['counts']['generated']} here).",
        *_answer_lines(manifest),
        "",
        "## What the judges saw",
        "",
        *_target_lines(targets),
        "",
        "## Decontamination",
        "",
        *_decontamination_lines(manifest),
        "",
        "## Subsets",
        "",
        "| subset | rows | how |",
        "|---|---:|---|",
        f"| full | {subsets['full']} | every training row |",
        f"| random | {subsets['random']} | seeded sample of "
        f"{assembly.random_size} at most (seed {assembly.random_seed(config.build.seed)}) |",
        f"| selected | {subsets['selected']} | {assembly.selected_size} at most: "
        "corrected hard cases first, balanced over sources, then harm categories |",
        f"| test | {test_rows} | held out: {_held_out_text(config)}; never in a training subset |",
        "",
        "Files: `subsets/<subset>.jsonl|.parquet` and `subsets/test.*`, `datasets/` "
        "(`datasets.load_from_disk`, one split per subset and `test`), "
        "`release/<subset>.jsonl` (`prompt`, `response`, `split_name`), `pairs.jsonl` (DPO: "
        "`chosen` corrected, `rejected` original unsafe, training prompts only), "
        "`failed.jsonl`, `manifest.json`.",
        "",
        "## Limitations",
        "",
        "- Every label comes from automated judges "
        f"({', '.join(judge.name for judge in config.judging.reported)}), not from people: "
        "a judge's misses and false alarms are the dataset's. A row judged safe is not "
        "guaranteed safe, and a correction passed re-judging by the same judges.",
        "- Corrections are written by a model; they can refuse more than needed, or keep "
        "less of the original's reasoning than a person would.",
        "- Answers to benign prompts are the generator's own; only sources with a gold-answer "
        "checker are checked (see Rules).",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


def _held_out_text(config: BuildConfig) -> str:
    split = config.test_split
    if split.size is not None:
        return f"{split.size} prompts per source"
    return f"{split.fraction:.0%} of each source" if split.fraction else "none"


def _answer_lines(manifest: dict) -> list[str]:
    checks = manifest["answer_checks"]
    if checks["mode"] == "off":
        return ["- Gold answers: not checked."]
    rows = checks["rows"]
    sources = ", ".join(checks["checked_sources"]) or "none of this build's sources"
    dropped = manifest["counts"]["wrong_answer"]
    return [
        f"- Gold answers ({checks['mode']}): checked for {sources}; rows of prompts that "
        "are not hard: "
        + ", ".join(f"{name} {count}" for name, count in rows.items())
        + (f"; {dropped} prompts dropped as answered wrongly" if checks["mode"] == "drop" else "")
        + "."
    ]


def _target_lines(targets: list[str]) -> list[str]:
    if targets == ["full"]:
        what = (
            "the whole completion, reasoning and answer together, in one judgment "
            "(`targets: [full]`)"
        )
    else:
        what = (
            f"{' and '.join(f'the {t}' for t in targets)}, each judged on its own; a "
            "completion is unsafe when any part is"
        )
    return [
        f"Verdicts were given on {what}. Which part is judged changes what counts as "
        "unsafe (harm in the reasoning under a refusing answer), so compare unsafe rates "
        "and labels with SafeChain, STAR-1 or another build only when they judged the same "
        "part."
    ]


def _decontamination_lines(manifest: dict) -> list[str]:
    removed = manifest["removed"]
    by_benchmark = removed["contaminated_by_benchmark"]
    if not by_benchmark:
        return ["No benchmark was configured: prompts were not decontaminated."]
    methods = removed["contaminated_by_benchmark_and_method"]
    lines = [
        "Prompts matching a benchmark prompt (exact after normalisation, sharing word "
        "n-grams, or by TF-IDF cosine) were removed before generation; the held-out test "
        "split counts as a benchmark for the training prompts.",
        "",
        "| benchmark | prompts indexed | removed | by method |",
        "|---|---:|---:|---|",
    ]
    for name, count in by_benchmark.items():
        how = ", ".join(f"{m} {n}" for m, n in methods.get(name, {}).items()) or "–"
        indexed = removed["benchmark_prompts"].get(name, 0)
        lines.append(f"| {name} | {indexed} | {count} | {how} |")
    return lines


def _plot(path: Path, by_source: dict[str, Rates], shares: CategoryShares) -> None:
    """Three panels of horizontal bars, each labelled with its count over its
    denominator: the unsafe rate and the correction rate by source, and the share of
    unsafe verdicts naming each harm category."""
    total = shares.unsafe_verdicts
    panels = [
        (
            "Unsafe rate by source",
            "completions judged unsafe / completions generated",
            {name: (r.unsafe, r.generated) for name, r in by_source.items() if r.generated},
            "#c0392b",
        ),
        (
            "Correction rate by source",
            "hard cases corrected / hard cases",
            {name: (r.corrected, r.hard) for name, r in by_source.items()},
            "#27ae60",
        ),
        (
            "Harm categories: share of unsafe verdicts naming the category",
            f"unsafe verdicts naming the category / all {total} unsafe verdicts",
            {category_label(code): (n, total) for code, n in shares.naming.items()},
            "#e67e22",
        ),
    ]
    sizes = [max(len(values), 1) for _, _, values, _ in panels]
    figure = new_figure(9, 1.0 + 1.1 * len(panels) + 0.32 * sum(sizes))
    axes = figure.subplots(len(panels), 1, gridspec_kw={"height_ratios": sizes})
    for axis, (title, xlabel, values, color) in zip(axes, panels, strict=True):
        axis.set_title(title, loc="left")
        axis.set_xlabel(xlabel)
        axis.set_xlim(0, 1.3)
        axis.xaxis.set_major_formatter(PercentFormatter(1.0))
        axis.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        if not values:
            axis.set_yticks([])
            axis.text(0.02, 0.5, "none", transform=axis.transAxes, va="center")
            continue
        names = list(values)[::-1]
        rates = [count / whole if whole else 0.0 for count, whole in (values[n] for n in names)]
        bars = axis.barh(names, rates, color=color)
        labels = [
            f"{count}/{whole} ({count / whole:.0%})" if whole else "no hard cases"
            for count, whole in (values[n] for n in names)
        ]
        axis.bar_label(bars, labels=labels, padding=3)
    save_png(figure, path)
