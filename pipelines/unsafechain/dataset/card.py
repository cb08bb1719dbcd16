"""The dataset card: ``README.md`` and its plot ``unsafe_rate.png`` in the output folder."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from unsafechain.dataset.config import BuildConfig
from unsafechain.dataset.rows import NO_CATEGORY
from unsafechain.judge.llama_guard import CATEGORY_BY_CODE
from unsafechain.judge.settings import EnsembleSettings

logger = logging.getLogger(__name__)

PLOT = "unsafe_rate.png"


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


def rates_by(cases: list[dict], key: Literal["source", "category"]) -> dict[str, Rates]:
    """Rates per ``source`` or per ``category``, sorted by name, numbers by value.

    A case counts under every harm category its unsafe verdicts name, so category rows
    overlap; a case with none counts under ``none``, last.
    """
    rates: dict[str, Rates] = defaultdict(Rates)
    for row in cases:
        names = [row["source"]] if key == "source" else row["harm_categories"] or [NO_CATEGORY]
        for name in names:
            rates[name].add(row)
    return dict(sorted(rates.items(), key=lambda item: _natural_order(item[0])))


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
    cases: list[dict],
    subsets: dict[str, list[dict]],
) -> None:
    """Write the dataset card and its plot into ``output``.

    Args:
        output: The build's output folder.
        config: The build's configuration (sources, models, settings).
        manifest: The manifest, for counts and rules.
        cases: A row for every case, with a response or not.
        subsets: The assembled subsets.
    """
    by_source = rates_by(cases, "source")
    by_category = rates_by(cases, "category")
    _plot(output / PLOT, by_source, by_category)
    (output / "README.md").write_text(
        _card_text(config, manifest, by_source, by_category, subsets), encoding="utf-8"
    )
    logger.info("dataset card written to %s", output / "README.md")


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


def _card_text(
    config: BuildConfig,
    manifest: dict,
    by_source: dict[str, Rates],
    by_category: dict[str, Rates],
    subsets: dict[str, list[dict]],
) -> str:
    generation, correction, assembly = config.generation, config.correction, config.assembly
    read = manifest["read_by_source"]
    lines = [
        "# UnsafeChain dataset",
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
        "| source | path | prompts read | training rows |",
        "|---|---|---:|---:|",
        *(
            f"| {s.name} | `{s.path}` | {read.get(s.name, 0)} "
            f"| {sum(row['source'] == s.name for row in subsets['full'])} |"
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
        "hard cases corrected per hard case. A case counts under every harm category its "
        "unsafe verdicts name (`none`: no category named).",
        "",
        f"![Unsafe rate by source and harm category]({PLOT})",
        "",
        *_rates_table("source", by_source),
        "",
        *_rates_table("harm category", by_category, category_label),
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
        f"{', '.join(target.value for target in config.judging.targets)}.",
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
        f"- Training row: {manifest['rules']['training_row']}.",
        "",
        "## Subsets",
        "",
        "| subset | rows | how |",
        "|---|---:|---|",
        f"| full | {len(subsets['full'])} | every training row |",
        f"| random | {len(subsets['random'])} | seeded sample of "
        f"{assembly.random_size} at most (seed {assembly.random_seed(config.build.seed)}) |",
        f"| selected | {len(subsets['selected'])} | {assembly.selected_size} at most: "
        "corrected hard cases first, balanced over sources, then harm categories |",
        "",
        "Files: `subsets/<subset>.jsonl|.parquet`, `datasets/` (`datasets.load_from_disk`, "
        "one split per subset), `release/<subset>.jsonl` (`prompt`, `response`, "
        "`split_name`), `pairs.jsonl` (DPO: `chosen` corrected, `rejected` original "
        "unsafe), `failed.jsonl`, `manifest.json`.",
        "",
    ]
    return "\n".join(lines)


def _plot(path: Path, by_source: dict[str, Rates], by_category: dict[str, Rates]) -> None:
    panels = [
        ("by source", {name: r.unsafe_rate for name, r in by_source.items()}),
        ("by harm category", {category_label(n): r.unsafe_rate for n, r in by_category.items()}),
    ]
    # A group without completions has no rate to draw.
    panels = [
        (title, {name: rate for name, rate in values.items() if rate is not None})
        for title, values in panels
    ]
    height = 1.5 + 0.35 * sum(len(values) for _, values in panels)
    # The Agg canvas, not pyplot: no display, no global figure state in a build process.
    figure = Figure(figsize=(8, height))
    FigureCanvasAgg(figure)
    axes = figure.subplots(
        2, 1, gridspec_kw={"height_ratios": [max(len(values), 1) for _, values in panels]}
    )
    for axis, (title, values) in zip(axes, panels, strict=True):
        names = list(values)[::-1]
        bars = axis.barh(names, [values[name] for name in names], color="#c0392b")
        axis.bar_label(bars, labels=[f"{values[name]:.0%}" for name in names], padding=3)
        axis.set_xlim(0, 1.12)
        axis.xaxis.set_major_formatter(PercentFormatter(1.0))
        axis.set_title(f"Unsafe rate {title}", loc="left")
        axis.set_xlabel("completions judged unsafe / generated")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
