"""The evaluation report: ``report.md``, a self-contained ``report.html`` and the plots in
``plots/``, all drawn from the figures of ``results.json``.

The report leads with a summary (models by benchmarks, headline figures), then the plots
(Safe@1 by safety benchmark and model, safety against capability, over-refusal), then a
table per benchmark with the models as columns, every figure with its confidence
interval, and beside each fine-tuned model its difference from its base with the paired
test's significance mark. It ends with the settings and the provenance of every model and
benchmark, and links to the per-sample files. Both documents are rendered from one list
of blocks (``unsafechain.evaluation.document``), so they say the same thing; the HTML
embeds the plots as data URIs, styles itself inline and escapes every text it takes from
the results.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from matplotlib import colormaps
from matplotlib.ticker import PercentFormatter
from matplotlib.transforms import Bbox

from unsafechain.domain.files import write_atomically
from unsafechain.domain.plots import new_figure, save_png
from unsafechain.evaluation.document import (
    Block,
    Bullets,
    Code,
    Heading,
    Image,
    Inline,
    Link,
    Paragraph,
    Parts,
    Table,
    Toned,
    render_html,
    render_markdown,
)

logger = logging.getLogger(__name__)

MARKDOWN = "report.md"
HTML = "report.html"
PLOTS = "plots"
SAFETY_PLOT = "plots/safety.png"
SCATTER_PLOT = "plots/safety_vs_capability.png"
OVER_REFUSAL_PLOT = "plots/over_refusal.png"

KINDS = ("safety", "over_refusal", "capability")
SIGNIFICANT = 0.05
"""p below this gets ``*``."""
HIGHLY_SIGNIFICANT = 0.01
"""p below this gets ``**``."""

_KIND_TITLES = {"safety": "safety", "over_refusal": "over-refusal", "capability": "capability"}
# Figures whose direction does not follow their benchmark's headline.
_LOWER_IS_BETTER = {"error_rate", "full_refusal_rate", "partial_refusal_rate", "refusal_rate"}
_HIGHER_IS_BETTER = {
    "safe_at_1",
    "cons_safe_at_k",
    "safe_at_k",
    "compliance_rate",
    "accuracy",
    "pass@1",
}
_EXCLUDING_ERRORS = "_excluding_errors"
DASH = "–"
"""What a cell without a figure shows."""


class ReportError(ValueError):
    """The results cannot be reported: a key is missing or holds the wrong kind of value.
    The message names the key."""


def write_report(output_dir: Path, results: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the plots for ``results`` into ``output_dir``.

    Args:
        output_dir: The evaluation's output folder, which holds ``results.json`` and the
            per-sample files the report links to.
        results: The content of ``results.json``.

    Returns:
        What was written: ``markdown``, ``html`` and one entry per plot drawn (``safety``,
        ``safety_vs_capability``, ``over_refusal``); a plot without data to draw is left out.

    Raises:
        ReportError: A key of ``results`` is missing or malformed; the message names it.
    """
    report = _Results.read(results)
    (output_dir / PLOTS).mkdir(parents=True, exist_ok=True)
    plots = _draw_plots(output_dir, report)
    blocks = _document(report, plots, output_dir)
    written = {"markdown": output_dir / MARKDOWN, "html": output_dir / HTML}
    write_atomically(written["markdown"], render_markdown(blocks))
    images = {path: (output_dir / path).read_bytes() for path in plots.values()}
    write_atomically(written["html"], render_html(blocks, images, title=_title(report)))
    written.update({name: output_dir / path for name, path in plots.items()})
    logger.info("evaluation report written to %s", written["markdown"])
    return written


# Reading the results, with an error that names the key for anything malformed.


@dataclass(frozen=True)
class Interval:
    """A figure with its confidence interval (bounds may be unknown)."""

    value: float
    low: float | None
    high: float | None


@dataclass(frozen=True)
class Comparison:
    """A fine-tuned model's difference from its base on one figure."""

    method: str
    delta: Interval | None
    p_value: float | None


@dataclass(frozen=True)
class Entry:
    """One model on one benchmark."""

    kind: str
    headline: str
    higher_is_better: bool
    figures: dict[str, Interval | None]
    prompts: int
    samples: int
    error_samples: int
    samples_file: str
    against: str | None
    comparisons: dict[str, Comparison]


@dataclass(frozen=True)
class Benchmark:
    """A benchmark as the evaluation read it."""

    name: str
    kind: str
    prompts: int
    published_size: int | None
    source: str
    scorer: str | None


@dataclass(frozen=True)
class _Results:
    """The validated results: settings, models and benchmarks in order, and the entries."""

    raw: Mapping[str, Any]
    settings: Mapping[str, Any]
    models: list[Mapping[str, Any]]
    benchmarks: list[Benchmark]
    entries: dict[str, dict[str, Entry]] = field(default_factory=dict)

    @classmethod
    def read(cls, results: Mapping[str, Any]) -> _Results:
        for key in ("eval_id", "created_at", "settings", "models", "benchmarks", "results"):
            _need(results, key, "the top level")
        settings = _mapping(results["settings"], "settings")
        _need(settings, "samples_per_prompt", "settings")
        models = [
            _mapping(model, f"models[{i}]") for i, model in enumerate(_list(results, "models"))
        ]
        names = [_name(model, f"models[{i}]") for i, model in enumerate(models)]
        if not names:
            raise ReportError("results.json: 'models' is empty; there is nothing to report")
        if len(set(names)) != len(names):
            raise ReportError(f"results.json: 'models' names a model twice: {names}")
        for i, model in enumerate(models):
            base = model.get("base")
            if base is not None and base not in names:
                raise ReportError(
                    f"results.json: models[{i}].base is {base!r}, which is not a model here"
                )
        benchmarks = [
            _benchmark(_mapping(item, f"benchmarks[{i}]"), f"benchmarks[{i}]")
            for i, item in enumerate(_list(results, "benchmarks"))
        ]
        known = {b.name for b in benchmarks}
        by_model = _mapping(results["results"], "results")
        entries: dict[str, dict[str, Entry]] = {}
        for name, per_benchmark in by_model.items():
            if name not in names:
                raise ReportError(f"results.json: results.{name} is not one of 'models'")
            entries[name] = {}
            for benchmark, entry in _mapping(per_benchmark, f"results.{name}").items():
                where = f"results.{name}.{benchmark}"
                if benchmark not in known:
                    raise ReportError(f"results.json: {where} is not one of 'benchmarks'")
                entries[name][benchmark] = _entry(_mapping(entry, where), where)
        report = cls(results, settings, models, benchmarks, entries)
        report._check_comparisons()
        return report

    def _check_comparisons(self) -> None:
        for model in self.models:
            for benchmark, entry in self.entries.get(model["name"], {}).items():
                if entry.against is not None and entry.against != model.get("base"):
                    raise ReportError(
                        f"results.json: results.{model['name']}.{benchmark}.comparison.against "
                        f"is {entry.against!r}, but the model's base is {model.get('base')!r}"
                    )

    @property
    def names(self) -> list[str]:
        """The model names, in the results' order."""
        return [model["name"] for model in self.models]

    @property
    def samples_per_prompt(self) -> int:
        """K."""
        return int(self.settings["samples_per_prompt"])

    def entry(self, model: str, benchmark: str) -> Entry | None:
        """The model's results on the benchmark; ``None`` when it was not evaluated on it."""
        return self.entries.get(model, {}).get(benchmark)

    def of_kind(self, kind: str) -> list[Benchmark]:
        """The benchmarks of one kind, in order."""
        return [b for b in self.benchmarks if b.kind == kind]

    def base_of(self, model: str) -> str | None:
        """The model's base, or ``None`` for a base model."""
        return next(m.get("base") for m in self.models if m["name"] == model)

    def families(self) -> list[tuple[str, list[str]]]:
        """Each base model (a model without a base) with itself and every model fine-tuned
        from it, directly or through another fine-tuned model, in the results' order."""
        roots: dict[str, list[str]] = {}
        for model in self.names:
            root, seen = model, {model}
            while (base := self.base_of(root)) is not None:
                if base in seen:
                    raise ReportError(f"results.json: the bases of model {model!r} form a cycle")
                seen.add(base)
                root = base
            roots.setdefault(root, []).append(model)
        return [(root, sorted(members, key=lambda m: m != root)) for root, members in roots.items()]

    def headline(self, benchmark: str) -> tuple[str, bool]:
        """The benchmark's headline figure and whether higher is better, from any model."""
        for model in self.names:
            entry = self.entry(model, benchmark)
            if entry is not None:
                return entry.headline, entry.higher_is_better
        raise ReportError(f"results.json: no model has results for benchmark {benchmark!r}")


def _need(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in mapping:
        raise ReportError(f"results.json: {where} lacks {key!r}")
    return mapping[key]


def _name(model: Mapping[str, Any], where: str) -> str:
    name = _need(model, "name", where)
    if not isinstance(name, str) or not name:
        raise ReportError(f"results.json: {where}.name must be a non-empty string, not {name!r}")
    return name


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ReportError(f"results.json: {where} must be an object, not {type(value).__name__}")
    return value


def _list(mapping: Mapping[str, Any], key: str) -> list[Any]:
    value = mapping[key]
    if not isinstance(value, list):
        raise ReportError(f"results.json: {key!r} must be a list, not {type(value).__name__}")
    return value


def _number(value: Any, where: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ReportError(f"results.json: {where} must be a number, not {value!r}")
    return float(value)


def _count(mapping: Mapping[str, Any], key: str, where: str) -> int:
    value = _need(mapping, key, where)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReportError(f"results.json: {where}.{key} must be a count, not {value!r}")
    return value


def _benchmark(item: Mapping[str, Any], where: str) -> Benchmark:
    kind = _need(item, "kind", where)
    if kind not in KINDS:
        raise ReportError(f"results.json: {where}.kind is {kind!r}, not one of {KINDS}")
    published = item.get("published_size")
    return Benchmark(
        name=str(_need(item, "name", where)),
        kind=kind,
        prompts=_count(item, "prompts", where),
        published_size=None if published is None else _count(item, "published_size", where),
        source=str(item.get("source") or ""),
        scorer=item.get("scorer"),
    )


def _interval(value: Any, where: str) -> Interval | None:
    if value is None:
        return None
    figure = _mapping(value, where)
    number = _number(_need(figure, "value", where), f"{where}.value", optional=True)
    if number is None:
        return None
    return Interval(
        number,
        _number(figure.get("low"), f"{where}.low", optional=True),
        _number(figure.get("high"), f"{where}.high", optional=True),
    )


def _entry(entry: Mapping[str, Any], where: str) -> Entry:
    kind = _need(entry, "kind", where)
    if kind not in KINDS:
        raise ReportError(f"results.json: {where}.kind is {kind!r}, not one of {KINDS}")
    headline = str(_need(entry, "headline", where))
    raw_figures = _mapping(_need(entry, "figures", where), f"{where}.figures")
    if headline not in raw_figures:
        raise ReportError(f"results.json: {where}.figures lacks the headline {headline!r}")
    figures = {
        name: _interval(value, f"{where}.figures.{name}") for name, value in raw_figures.items()
    }
    counts = _mapping(_need(entry, "counts", where), f"{where}.counts")
    comparison = entry.get("comparison")
    against, comparisons = None, {}
    if comparison is not None:
        comparison = _mapping(comparison, f"{where}.comparison")
        against = str(_need(comparison, "against", f"{where}.comparison"))
        compared = _mapping(
            _need(comparison, "figures", f"{where}.comparison"), f"{where}.comparison.figures"
        )
        for name, test in compared.items():
            at = f"{where}.comparison.figures.{name}"
            test = _mapping(test, at)
            comparisons[name] = Comparison(
                method=str(test.get("method") or "paired test"),
                delta=_interval(_need(test, "delta", at), f"{at}.delta"),
                p_value=_number(test.get("p_value"), f"{at}.p_value", optional=True),
            )
    higher = _need(entry, "higher_is_better", where)
    if not isinstance(higher, bool):
        raise ReportError(f"results.json: {where}.higher_is_better must be true or false")
    return Entry(
        kind=kind,
        headline=headline,
        higher_is_better=higher,
        figures=figures,
        prompts=_count(counts, "prompts", f"{where}.counts"),
        samples=_count(counts, "samples", f"{where}.counts"),
        error_samples=_count(counts, "error_samples", f"{where}.counts"),
        samples_file=str(_need(entry, "samples_file", where)),
        against=against,
        comparisons=comparisons,
    )


# Numbers as the report writes them.


def percent(value: float | None) -> str:
    """A proportion as a percentage with one decimal (``0.9124`` → ``91.2``); a dash for none."""
    if value is None:
        return DASH
    text = f"{value * 100:.1f}"
    return "0.0" if text == "-0.0" else text


def signed_percent(value: float) -> str:
    """A difference of proportions in percentage points, always signed (``+5.1``)."""
    text = f"{value * 100:+.1f}"
    return "+0.0" if text == "-0.0" else text


def with_interval(figure: Interval | None) -> str:
    """``91.2 [88.0, 94.1]``; the value alone without bounds; a dash without a figure."""
    if figure is None:
        return DASH
    if figure.low is None or figure.high is None:
        return percent(figure.value)
    return f"{percent(figure.value)} [{percent(figure.low)}, {percent(figure.high)}]"


def mark(p_value: float | None) -> str:
    """``**`` for p < 0.01, ``*`` for p < 0.05, nothing otherwise."""
    if p_value is None:
        return ""
    if p_value < HIGHLY_SIGNIFICANT:
        return "**"
    return "*" if p_value < SIGNIFICANT else ""


def delta_text(comparison: Comparison | None) -> str:
    """``+5.1 [+2.0, +8.1] *``: the difference, its interval and its significance mark."""
    if comparison is None or comparison.delta is None:
        return DASH
    delta = comparison.delta
    text = signed_percent(delta.value)
    if delta.low is not None and delta.high is not None:
        text += f" [{signed_percent(delta.low)}, {signed_percent(delta.high)}]"
    return f"{text} {mark(comparison.p_value)}".rstrip()


def _count_text(number: int) -> str:
    return f"{number:,}"


def _direction(name: str, entry: Entry) -> bool | None:
    """Whether higher is better for the figure; ``None`` when the report does not know."""
    core = name.removesuffix(_EXCLUDING_ERRORS)
    if core == entry.headline:
        return entry.higher_is_better
    if core in _LOWER_IS_BETTER:
        return False
    return True if core in _HIGHER_IS_BETTER else None


def figure_label(name: str, k: int) -> str:
    """The reader's name of a figure: ``Safe@1``, ``ConsSafe@5``, ``ERROR rate`` …"""
    core = name.removesuffix(_EXCLUDING_ERRORS)
    labels = {
        "safe_at_1": "Safe@1",
        "cons_safe_at_k": f"ConsSafe@{k}",
        "safe_at_k": f"Safe@{k}",
        "error_rate": "ERROR rate",
        "full_refusal_rate": "full refusal",
        "partial_refusal_rate": "partial refusal",
        "refusal_rate": "refusal (full + partial)",
        "compliance_rate": "compliance",
    }
    label = labels.get(core, core)
    return f"{label} excluding errors" if name.endswith(_EXCLUDING_ERRORS) else label


def _arrow(higher_is_better: bool | None) -> str:
    return {True: " ↑", False: " ↓", None: ""}[higher_is_better]


# The document.


def _title(report: _Results) -> str:
    return f"Evaluation {report.raw['eval_id']}"


def _document(report: _Results, plots: dict[str, str], output_dir: Path) -> list[Block]:
    k = report.samples_per_prompt
    blocks: list[Block] = [
        Heading(1, _title(report)),
        Paragraph(
            (
                f"Created {report.raw['created_at']} by UnsafeChain platform "
                f"{report.raw.get('platform_version', 'of unknown version')}. "
                f"{len(report.models)} model(s) on {len(report.benchmarks)} benchmark(s), "
                f"K={k} sample(s) per prompt. Every figure is a percentage with its "
                f"{_confidence_text(report.settings)}; every figure is in ",
                Link("results.json", "results.json"),
                ", and every sample with its verdicts in the per-sample files linked under "
                "each table.",
            )
        ),
        *_sample_run_note(report),
        Heading(2, "Summary"),
        *_summary(report),
    ]
    figures = [
        ("safety", "Safe@1 by safety benchmark and model"),
        ("safety_vs_capability", "Safety against capability, one point per model"),
        ("over_refusal", "Over-refusal by benchmark and model"),
    ]
    if plots:
        blocks.append(Heading(2, "Plots"))
    for name, alt in figures:
        if name in plots:
            blocks.append(Image(alt, plots[name]))
            if name == "safety_vs_capability":
                blocks.extend(_scatter_table(report))
    for kind in KINDS:
        for benchmark in report.of_kind(kind):
            blocks.extend(_benchmark_section(report, benchmark, output_dir))
    blocks.extend(_settings_section(report))
    blocks.extend(_models_section(report))
    blocks.extend(_benchmarks_section(report))
    return blocks


def _confidence_level(settings: Mapping[str, Any]) -> str:
    confidence = settings.get("confidence")
    return f"{confidence * 100:g} %" if isinstance(confidence, int | float) else "confidence"


def _confidence_text(settings: Mapping[str, Any]) -> str:
    resamples = settings.get("resamples")
    level = _confidence_level(settings)
    how = f", {_count_text(resamples)} resamples" if isinstance(resamples, int) else ""
    return f"{level} bootstrap interval in brackets{how}"


def _sample_run_note(report: _Results) -> list[Block]:
    short = [
        b
        for b in report.benchmarks
        if b.published_size is not None and b.prompts < b.published_size
    ]
    if not short:
        return []
    listed = ", ".join(
        f"{b.name} {_count_text(b.prompts)} of {_count_text(b.published_size or 0)}" for b in short
    )
    return [
        Paragraph(
            (
                f"Fewer prompts than the published benchmarks ({listed}): these figures "
                "are not comparable with published ones.",
            )
        )
    ]


def _legend_for_marks(report: _Results) -> Paragraph:
    methods = sorted(
        {
            comparison.method
            for per_model in report.entries.values()
            for entry in per_model.values()
            for comparison in entry.comparisons.values()
        }
    )
    how = f" ({', '.join(methods)} on the same prompts)" if methods else ""
    return Paragraph(
        (
            "Δ: the fine-tuned model minus its base, in percentage points, with its interval; "
            f"** p < {HIGHLY_SIGNIFICANT}, * p < {SIGNIFICANT}{how}. ↑ higher is better, "
            f"↓ lower is better; {DASH}: not evaluated or no figure.",
        )
    )


def _summary(report: _Results) -> list[Block]:
    header = ["model"]
    benchmarks = [b for kind in KINDS for b in report.of_kind(kind)]
    for benchmark in benchmarks:
        headline, higher = report.headline(benchmark.name)
        label = figure_label(headline, report.samples_per_prompt)
        header.append(f"{benchmark.name} {label}{_arrow(higher)}")
    rows = []
    for model in report.names:
        cells: list[Parts] = [(model,)]
        for benchmark in benchmarks:
            entry = report.entry(model, benchmark.name)
            if entry is None:
                cells.append((DASH,))
                continue
            value = percent(_value(entry.figures.get(entry.headline)))
            comparison = entry.comparisons.get(entry.headline)
            if comparison is None or comparison.delta is None:
                cells.append((value,))
                continue
            change = f"({signed_percent(comparison.delta.value)}) {mark(comparison.p_value)}"
            tone = _tone(comparison, entry.higher_is_better)
            cells.append((f"{value} ", Toned(change.rstrip(), tone)))
        rows.append(tuple(cells))
    return [
        Paragraph(
            (
                "Headline figures, in %: Safe@1 on the safety benchmarks, the refusal rate on "
                "the over-refusal benchmarks, accuracy or pass@1 on the capability "
                "benchmarks. In parentheses: the difference from the model's base, then its "
                "significance mark.",
            )
        ),
        Table(tuple(header), tuple(rows)),
        _legend_for_marks(report),
    ]


def _value(figure: Interval | None) -> float | None:
    return None if figure is None else figure.value


def _tone(
    comparison: Comparison, higher_is_better: bool | None
) -> Literal["better", "worse"] | None:
    if comparison.delta is None or higher_is_better is None or not mark(comparison.p_value):
        return None
    if comparison.delta.value == 0:
        return None
    return "better" if (comparison.delta.value > 0) == higher_is_better else "worse"


def _benchmark_section(report: _Results, benchmark: Benchmark, output_dir: Path) -> list[Block]:
    k = report.samples_per_prompt
    headline, higher = report.headline(benchmark.name)
    present = [report.entry(model, benchmark.name) for model in report.names]
    # Every figure any model has, in the first order seen; excluding-errors variants last.
    names: list[str] = []
    for entry in present:
        for name in entry.figures if entry else ():
            if name not in names:
                names.append(name)
    names.sort(key=lambda name: name.endswith(_EXCLUDING_ERRORS))
    header = ["figure (%)"]
    columns: list[tuple[str, bool]] = []
    for model in report.names:
        header.append(model)
        columns.append((model, False))
        if report.base_of(model) is not None:
            header.append(f"Δ {model} vs {report.base_of(model)}")
            columns.append((model, True))
    rows = []
    for name in names:
        reference = next(entry for entry in present if entry and name in entry.figures)
        cells: list[Parts] = [(f"{figure_label(name, k)}{_arrow(_direction(name, reference))}",)]
        for model, is_delta in columns:
            entry = report.entry(model, benchmark.name)
            if entry is None:
                cells.append((DASH,))
            elif is_delta:
                comparison = entry.comparisons.get(name)
                tone = None if comparison is None else _tone(comparison, _direction(name, entry))
                cells.append((Toned(delta_text(comparison), tone),))
            else:
                cells.append((with_interval(entry.figures.get(name)),))
        rows.append(tuple(cells))
    blocks: list[Block] = [
        Heading(2, f"{benchmark.name} ({_KIND_TITLES[benchmark.kind]})"),
        Paragraph((_benchmark_intro(benchmark, headline, higher, k),)),
        Table(tuple(header), tuple(rows)),
        Paragraph((_counts_line(report, benchmark, headline, k),)),
        _legend_for_marks(report),
    ]
    links: list[Inline] = ["Per-sample files: "]
    for model in report.names:
        entry = report.entry(model, benchmark.name)
        if entry is None:
            continue
        if len(links) > 1:
            links.append(" · ")
        links.append(Link(model, _relative(entry.samples_file, output_dir)))
    if len(links) > 1:
        blocks.append(Paragraph(tuple(links)))
    return blocks


def _benchmark_intro(benchmark: Benchmark, headline: str, higher: bool, k: int) -> str:
    label = figure_label(headline, k)
    if benchmark.kind == "safety":
        what = (
            f"Headline: {label}, the mean over prompts of the share of each prompt's samples "
            f"judged safe. ConsSafe@{k}: the share of prompts with at least {k}/2 samples "
            f"judged safe ({math.ceil(k / 2)} of {k}); Safe@{k}: with all {k} judged safe."
        )
    elif benchmark.kind == "over_refusal":
        what = (
            f"Headline: {label}, the share of samples that the refusal judge classed as a "
            "full or a partial refusal of these safe prompts."
        )
    else:
        what = f"Headline: {label}."
    direction = "Higher is better." if higher else "Lower is better."
    return f"{what} {direction}"


def _counts_line(report: _Results, benchmark: Benchmark, headline: str, k: int) -> str:
    evaluated = [
        (model, entry)
        for model in report.names
        if (entry := report.entry(model, benchmark.name)) is not None
    ]
    prompts = {entry.prompts for _, entry in evaluated}
    if len(prompts) == 1:
        size = f"{_count_text(prompts.pop())} prompts per model"
    else:
        size = "prompts: " + ", ".join(f"{m} {_count_text(e.prompts)}" for m, e in evaluated)
    parts = [f"K={k}, {size}."]
    for model, entry in evaluated:
        if not entry.error_samples:
            continue
        text = (
            f"{model}: {_count_text(entry.error_samples)} of {_count_text(entry.samples)} "
            "samples had no verdict (ERROR)"
        )
        if benchmark.kind == "safety":
            text += "; they count as not safe"
        excluded = entry.figures.get(f"{headline}{_EXCLUDING_ERRORS}")
        if f"{headline}{_EXCLUDING_ERRORS}" in entry.figures:
            text += f"; excluding them: {figure_label(headline, k)} {with_interval(excluded)}"
        parts.append(text + ".")
    erring = [model for model, entry in evaluated if entry.error_samples]
    if not erring:
        parts.append("Every sample has a verdict.")
    elif len(erring) < len(evaluated):
        parts.append("Every other model's samples all have a verdict.")
    missing = [model for model in report.names if report.entry(model, benchmark.name) is None]
    if missing:
        parts.append(f"Not evaluated on {benchmark.name}: {', '.join(missing)}.")
    return " ".join(parts)


def _relative(path: str, output_dir: Path) -> str:
    """A per-sample file's path relative to the report, with forward slashes."""
    candidate = Path(path)
    if candidate.is_absolute():
        candidate = Path(os.path.relpath(candidate, output_dir))
    if not (output_dir / candidate).exists():
        logger.warning("the per-sample file %s is not in %s", candidate, output_dir)
    return PurePosixPath(*candidate.parts).as_posix()


def _settings_section(report: _Results) -> list[Block]:
    settings = report.settings
    judges = [
        _judge_parts(_mapping(judge, f"settings.judges[{i}]"))
        for i, judge in enumerate(settings.get("judges") or [])
    ]
    refusal = settings.get("refusal_judge")
    items: list[Parts] = [
        (
            f"Sampling: K={report.samples_per_prompt} per prompt, temperature "
            f"{_setting(settings, 'temperature')}, top-p {_setting(settings, 'top_p')}, at "
            f"most {_setting(settings, 'max_new_tokens')} new tokens, seed "
            f"{_setting(settings, 'seed')}.",
        ),
        ("Safety judges: ", *_joined(judges), "." if judges else "none."),
        (
            "Refusal judge: ",
            *(_judge_parts(_mapping(refusal, "settings.refusal_judge")) if refusal else ("none",)),
            ".",
        ),
        (f"Intervals: {_confidence_text(settings)}.",),
    ]
    return [Heading(2, "Settings"), Bullets(tuple(items))]


def _setting(settings: Mapping[str, Any], key: str) -> str:
    value = settings.get(key)
    return DASH if value is None else str(value)


def _judge_parts(judge: Mapping[str, Any]) -> Parts:
    return (
        f"{judge.get('name', DASH)} ({judge.get('kind', DASH)}, ",
        Code(str(judge.get("model", DASH))),
        ")",
    )


def _joined(parts: Sequence[Parts]) -> Parts:
    joined: list[Inline] = []
    for i, part in enumerate(parts):
        if i:
            joined.append(", ")
        joined.extend(part)
    return tuple(joined)


def _code_or_dash(value: Any) -> Parts:
    return (DASH,) if value is None else (Code(str(value)),)


def _models_section(report: _Results) -> list[Block]:
    rows = []
    for model in report.models:
        rows.append(
            (
                (str(model["name"]),),
                (str(model.get("base") or DASH),),
                (str(model.get("backend") or DASH),),
                _code_or_dash(model.get("model")),
                _code_or_dash(model.get("adapter")),
                _code_or_dash(model.get("revision")),
                _training_parts(model.get("training_run"), str(model["name"])),
            )
        )
    return [
        Heading(2, "Models"),
        Table(
            ("model", "base", "backend", "weights", "adapter", "revision", "training run"),
            tuple(rows),
            numeric=False,
        ),
    ]


def _training_parts(run: Any, model: str) -> Parts:
    if run is None:
        return (DASH,)
    run = _mapping(run, f"models.{model}.training_run")
    dataset = _mapping(run.get("dataset") or {}, f"models.{model}.training_run.dataset")
    rows = dataset.get("rows_trained")
    parts: list[Inline] = [
        f"{run.get('objective') or DASH} with {run.get('method') or DASH}, run ",
        *_code_or_dash(run.get("run_id")),
        ", build ",
        *_code_or_dash(dataset.get("build_id")),
        f", subset {dataset.get('subset') or DASH}",
    ]
    if isinstance(rows, int):
        parts.append(f", {_count_text(rows)} rows")
    return tuple(parts)


def _benchmarks_section(report: _Results) -> list[Block]:
    rows = []
    for benchmark in report.benchmarks:
        headline, higher = report.headline(benchmark.name)
        published = benchmark.published_size
        rows.append(
            (
                (benchmark.name,),
                (_KIND_TITLES[benchmark.kind],),
                (f"{figure_label(headline, report.samples_per_prompt)}{_arrow(higher)}",),
                (_count_text(benchmark.prompts),),
                (DASH if published is None else _count_text(published),),
                _code_or_dash(benchmark.source or None),
                (benchmark.scorer or DASH,),
            )
        )
    return [
        Heading(2, "Benchmarks"),
        Table(
            ("benchmark", "kind", "headline", "prompts", "published", "source", "scorer"),
            tuple(rows),
            numeric=False,
        ),
    ]


# Plots.


@dataclass(frozen=True)
class _Point:
    model: str
    capability: float
    safety: float
    capability_over: int
    safety_over: int


def _points(report: _Results) -> list[_Point]:
    """Each model's mean capability headline and mean Safe@1, over the benchmarks it has."""
    points = []
    for model in report.names:
        capability = _headlines(report, model, "capability")
        safety = _headlines(report, model, "safety")
        if capability and safety:
            points.append(
                _Point(
                    model,
                    sum(capability) / len(capability),
                    sum(safety) / len(safety),
                    len(capability),
                    len(safety),
                )
            )
    return points


def _headlines(report: _Results, model: str, kind: str) -> list[float]:
    values = []
    for benchmark in report.of_kind(kind):
        entry = report.entry(model, benchmark.name)
        if entry is not None and (figure := entry.figures.get(entry.headline)) is not None:
            values.append(figure.value)
    return values


def _scatter_table(report: _Results) -> list[Block]:
    points = _points(report)
    capability, safety = len(report.of_kind("capability")), len(report.of_kind("safety"))
    rows = tuple(
        (
            (p.model,),
            (percent(p.safety),),
            (f"{p.safety_over} of {safety}",),
            (percent(p.capability),),
            (f"{p.capability_over} of {capability}",),
        )
        for p in points
    )
    left_out = [m for m in report.names if m not in {p.model for p in points}]
    blocks: list[Block] = [
        Paragraph(
            (
                "The scatter's points: plain means of the headline figures over the benchmarks "
                "a model has (no interval; see each benchmark's table). Arrows go from a base "
                "to its fine-tuned models.",
            )
        ),
        Table(
            (
                "model",
                "mean Safe@1 (%)",
                "safety benchmarks",
                "mean capability (%)",
                "capability benchmarks",
            ),
            rows,
        ),
    ]
    if left_out:
        blocks.append(
            Paragraph(
                (f"Not on the scatter (no safety or no capability figure): {', '.join(left_out)}.",)
            )
        )
    return blocks


def _draw_plots(output_dir: Path, report: _Results) -> dict[str, str]:
    families = report.families()
    colors = _colors(families)
    level = _confidence_level(report.settings)
    plots = {}
    if _grouped_bars(
        output_dir / SAFETY_PLOT,
        report,
        families,
        report.of_kind("safety"),
        colors,
        title=f"Safe@1 by safety benchmark (higher is better; error bars: {level} interval)",
        ylabel="Safe@1 (samples judged safe)",
    ):
        plots["safety"] = SAFETY_PLOT
    if _scatter(output_dir / SCATTER_PLOT, report, families, colors):
        plots["safety_vs_capability"] = SCATTER_PLOT
    if _grouped_bars(
        output_dir / OVER_REFUSAL_PLOT,
        report,
        families,
        report.of_kind("over_refusal"),
        colors,
        title=f"Refusal of safe prompts (lower is better; error bars: {level} interval)",
        ylabel="refusal rate (full + partial)",
    ):
        plots["over_refusal"] = OVER_REFUSAL_PLOT
    return plots


def _colors(families: Sequence[tuple[str, list[str]]]) -> dict[str, Any]:
    """A colour per model, the same in every plot: grey for a base, and the n-th fine-tuned
    model of every base the same colour, so that rows trained alike match across bases."""
    palette = colormaps["tab10"]
    colors: dict[str, Any] = {}
    for root, members in families:
        colors[root] = "#5a5a5a"
        for i, model in enumerate(m for m in members if m != root):
            colors[model] = palette(i % palette.N)
    return colors


def _short(model: str, root: str) -> str:
    """The model's name without its base's as a prefix: ``safechain`` in the panel of
    ``r1-qwen-7b`` for ``r1-qwen-7b-safechain``."""
    for separator in ("-", "_", "/", "+", ":"):
        if model != root and model.startswith(root + separator):
            return model[len(root) + 1 :]
    return model


def _grouped_bars(
    path: Path,
    report: _Results,
    families: Sequence[tuple[str, list[str]]],
    benchmarks: Sequence[Benchmark],
    colors: Mapping[str, Any],
    *,
    title: str,
    ylabel: str,
) -> bool:
    """Draw the headline of ``benchmarks`` as grouped bars with their intervals, a panel per
    base model and its fine-tuned models.

    Returns:
        Whether anything was drawn (and written).
    """
    panels = [
        (root, [m for m in members if _has_any(report, m, benchmarks)])
        for root, members in families
    ]
    panels = [(root, members) for root, members in panels if members]
    if not panels:
        return False
    most = max(len(members) for _, members in panels)
    width = min(14.0, max(6.0, 1.5 + len(benchmarks) * (0.4 + 0.3 * most)))
    figure = new_figure(width + 2.2, 0.6 + 3.4 * len(panels), layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False, sharey=True)[:, 0]
    tops = [0.0]
    for axis, (root, members) in zip(axes, panels, strict=True):
        tops.extend(_bars(axis, report, root, members, benchmarks, colors))
        axis.set_xticks(range(len(benchmarks)), [b.name for b in benchmarks])
        if len(benchmarks) > 5:
            axis.tick_params(axis="x", labelrotation=20)
        axis.set_xlim(-0.5, len(benchmarks) - 0.5)
        axis.set_ylabel(ylabel, fontsize=9)
        if len(panels) > 1:
            axis.set_title(f"{root} and its fine-tuned models", loc="left", fontsize=10)
        axis.grid(axis="y", alpha=0.3)
        axis.set_axisbelow(True)
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    # Room above the tallest interval for its label; a low scale when every figure is low.
    top = max(tops)
    axes[0].set_ylim(0, max(top * 1.25, 0.05) if top < 0.5 else 1.14)
    for axis in axes:
        axis.set_yticks([tick for tick in axis.get_yticks() if 0 <= tick <= min(1.0, top * 1.2)])
        axis.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    figure.suptitle(title, x=0.01, ha="left", fontsize=11)
    save_png(figure, path)
    return True


def _has_any(report: _Results, model: str, benchmarks: Sequence[Benchmark]) -> bool:
    return any(_headline_of(report, model, b) is not None for b in benchmarks)


def _bars(
    axis: Any,
    report: _Results,
    root: str,
    members: Sequence[str],
    benchmarks: Sequence[Benchmark],
    colors: Mapping[str, Any],
) -> list[float]:
    """One panel's bars with their intervals and value labels; the intervals' tops."""
    count = len(members)
    width = 0.8 / count
    labelled = len(benchmarks) * count <= 42
    tops = []
    for i, model in enumerate(members):
        legend = _short(model, root)
        for j, benchmark in enumerate(benchmarks):
            value = _headline_of(report, model, benchmark)
            if value is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            low = value.value if value.low is None else value.low
            high = value.value if value.high is None else value.high
            axis.bar(
                x,
                value.value,
                width * 0.9,
                yerr=[[max(value.value - low, 0.0)], [max(high - value.value, 0.0)]],
                capsize=3 if count <= 6 else 1.5,
                error_kw={"elinewidth": 1, "ecolor": "#333333"},
                color=colors[model],
                label=legend,
            )
            legend = "_nolegend_"
            tops.append(high)
            if labelled:
                # Above the interval, where neither the bar nor its error bar is.
                axis.annotate(
                    f"{value.value:.1%}",
                    (x, high),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90 if count > 3 else 0,
                )
    return tops


def _headline_of(report: _Results, model: str, benchmark: Benchmark) -> Interval | None:
    entry = report.entry(model, benchmark.name)
    return None if entry is None else entry.figures.get(entry.headline)


def _scatter(
    path: Path,
    report: _Results,
    families: Sequence[tuple[str, list[str]]],
    colors: Mapping[str, Any],
) -> bool:
    """Draw mean Safe@1 against mean capability, one labelled point per model, with arrows
    from each base to its fine-tuned models; a panel per base, on shared scales.

    Returns:
        Whether it was drawn.
    """
    points = {point.model: point for point in _points(report)}
    panels = [(root, [points[m] for m in members if m in points]) for root, members in families]
    panels = [(root, members) for root, members in panels if members]
    if not panels:
        return False
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    figure = new_figure(max(7.0, 0.8 + 4.6 * columns), 0.9 + 4.2 * rows, layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    axes = list(grid.flat)
    for axis in axes[len(panels) :]:
        axis.set_visible(False)
    xs = [p.capability for p in points.values()]
    ys = [p.safety for p in points.values()]
    for axis, (root, members) in zip(axes, panels, strict=False):
        _panel_scatter(axis, report, root, members, points, colors)
        if len(panels) > 1:
            axis.set_title(root, loc="left", fontsize=10)
        axis.grid(alpha=0.3)
    _pad_limits(axes[0], xs, ys)
    for axis in axes:
        for scale in (axis.xaxis, axis.yaxis):
            low, high = scale.get_view_interval()
            decimals = 0 if high - low > 0.06 else 1
            scale.set_major_formatter(PercentFormatter(1.0, decimals=decimals))
    figure.supxlabel(
        "mean capability (accuracy, pass@1) over the capability benchmarks", fontsize=10
    )
    figure.supylabel("mean Safe@1 over the safety benchmarks", fontsize=10)
    figure.suptitle(
        "Safety against capability (up and right is better; squares: base models)",
        x=0.01,
        ha="left",
        fontsize=11,
    )
    # Labels are placed where the laid-out figure has room for them.
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    for axis, (root, members) in zip(axes, panels, strict=False):
        _label_points(axis, members, root, renderer)
    save_png(figure, path)
    return True


def _panel_scatter(
    axis: Any,
    report: _Results,
    root: str,
    members: Sequence[_Point],
    points: Mapping[str, _Point],
    colors: Mapping[str, Any],
) -> None:
    for point in members:
        base = report.base_of(point.model)
        if base is not None and base in points:
            start = points[base]
            axis.annotate(
                "",
                xy=(point.capability, point.safety),
                xytext=(start.capability, start.safety),
                arrowprops={
                    "arrowstyle": "-|>",
                    "color": colors[point.model],
                    "alpha": 0.6,
                    "shrinkA": 7,
                    "shrinkB": 7,
                    "linewidth": 1.2,
                },
            )
    for point in members:
        axis.scatter(
            point.capability,
            point.safety,
            s=70,
            color=colors[point.model],
            marker="s" if report.base_of(point.model) is None else "o",
            edgecolor="black",
            linewidth=0.6,
            zorder=3,
            # A model at 0 % (or 100 %) sits on the axis, drawn whole.
            clip_on=False,
        )


# Where a point's label may go, in points from the point: right, left, above, below.
_LABEL_PLACES = (
    ((8, 4), "left", "bottom"),
    ((8, -4), "left", "top"),
    ((-8, 4), "right", "bottom"),
    ((-8, -4), "right", "top"),
    ((0, 9), "center", "bottom"),
    ((0, -9), "center", "top"),
)


def _label_points(axis: Any, points: Sequence[_Point], root: str, renderer: Any) -> None:
    """Label each point at the first place where its text overlaps no other label and no
    marker and stays inside the axes, or else where it overlaps least."""
    to_pixels = axis.figure.dpi / 72
    markers = []
    for point in points:
        x, y = axis.transData.transform((point.capability, point.safety))
        half = 6 * to_pixels
        markers.append(Bbox.from_extents(x - half, y - half, x + half, y + half))
    frame = axis.get_window_extent(renderer)
    taken: list[Any] = []
    for point in sorted(points, key=lambda p: (-p.safety, p.capability)):
        label = axis.annotate(
            _short(point.model, root),
            (point.capability, point.safety),
            textcoords="offset points",
            xytext=_LABEL_PLACES[0][0],
            fontsize=8,
        )
        best: tuple[float, int] | None = None
        for i, (offset, ha, va) in enumerate(_LABEL_PLACES):
            label.xyann = offset
            label.set_ha(ha)
            label.set_va(va)
            box = label.get_window_extent(renderer)
            clash = sum(_overlap(box, other) for other in (*taken, *markers))
            clash += box.width * box.height - _overlap(box, frame)
            if best is None or clash < best[0]:
                best = (clash, i)
            if clash == 0:
                break
        assert best is not None
        offset, ha, va = _LABEL_PLACES[best[1]]
        label.xyann = offset
        label.set_ha(ha)
        label.set_va(va)
        taken.append(label.get_window_extent(renderer))


def _overlap(one: Any, other: Any) -> float:
    width = min(one.x1, other.x1) - max(one.x0, other.x0)
    height = min(one.y1, other.y1) - max(one.y0, other.y0)
    return max(width, 0.0) * max(height, 0.0)


def _pad_limits(axis: Any, xs: Sequence[float], ys: Sequence[float]) -> None:
    # Room around the points for their labels, without pretending to a 0–100 % scale.
    for values, setter, room in ((xs, axis.set_xlim, 0.5), (ys, axis.set_ylim, 0.2)):
        low, high = min(values), max(values)
        # At least ten points of percentage in view: a narrower axis has ticks too close
        # for whole percentages.
        span = max(high - low, 0.1)
        setter(max(0.0, low - span * 0.15), min(1.0 + span * room, high + span * room))
