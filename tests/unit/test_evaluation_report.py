"""The evaluation report: what report.md says, that report.html stands alone and escapes
what it takes from the results, the plots, and the results it refuses."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from matplotlib import image

from tests.support.eval_results import eval_results
from unsafechain.evaluation.document import Code, Link, Paragraph, Table, Toned, render_markdown
from unsafechain.evaluation.report import (
    Comparison,
    Interval,
    ReportError,
    delta_text,
    mark,
    percent,
    signed_percent,
    write_report,
)

LEGEND = "** p < 0.01, * p < 0.05 (paired bootstrap on the same prompts)"


def _write(tmp_path: Path, results: dict) -> tuple[dict[str, Path], str, str]:
    written = write_report(tmp_path, results)
    return written, written["markdown"].read_text(), written["html"].read_text()


def _section(markdown: str, benchmark: str) -> str:
    """The Markdown of one benchmark's section, up to the next heading of its level."""
    start = markdown.index(f"\n## {benchmark} (")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else None]


def _rename(results: dict, old: str, new: str) -> None:
    for model in results["models"]:
        if model["name"] == old:
            model["name"] = new
        if model["base"] == old:
            model["base"] = new
    results["results"][new] = results["results"].pop(old)
    for per_benchmark in results["results"].values():
        for entry in per_benchmark.values():
            entry["samples_file"] = entry["samples_file"].replace(f"/{old}/", f"/{new}/")
            if entry["comparison"] and entry["comparison"]["against"] == old:
                entry["comparison"]["against"] = new


def test_the_report_writes_markdown_html_and_a_plot_of_each_kind(tmp_path):
    written = write_report(tmp_path, eval_results())

    assert written == {
        "markdown": tmp_path / "report.md",
        "html": tmp_path / "report.html",
        "safety": tmp_path / "plots" / "safety.png",
        "safety_vs_capability": tmp_path / "plots" / "safety_vs_capability.png",
        "over_refusal": tmp_path / "plots" / "over_refusal.png",
    }
    for name in ("safety", "safety_vs_capability", "over_refusal"):
        pixels = image.imread(written[name])
        height, width = pixels.shape[:2]
        assert 600 <= width <= 4000 and 400 <= height <= 3000, (name, width, height)
        assert pixels.std() > 0.05, f"{name} is blank"


def test_the_summary_leads_with_the_headline_of_every_model_on_every_benchmark(tmp_path):
    _, markdown, _ = _write(tmp_path, eval_results())

    summary = markdown[markdown.index("## Summary") : markdown.index("## Plots")]
    assert (
        "| model | strongreject Safe@1 ↑ | xstest refusal (full + partial) ↓ | gsm8k accuracy ↑ "
        "| humaneval pass@1 ↑ |" in summary
    )
    assert "| base | 71.2 | 3.2 | 75.6 | 41.5 |" in summary
    assert "| unsafechain-full | 91.2 (+20.0) ** | 8.8 (+5.6) ** | 74.9 (-0.7) | 42.1 (+0.6) |" in (
        summary
    )
    assert (
        "| safechain | 86.1 (+14.9) ** | 6.4 (+3.2) * | 73.1 (-2.5) ** | 39.6 (-1.9) |" in summary
    )
    assert markdown.index("## Summary") < markdown.index("## strongreject (safety)")


def test_a_safety_table_has_models_as_columns_with_intervals_deltas_and_marks(tmp_path):
    _, markdown, _ = _write(tmp_path, eval_results())

    table = _section(markdown, "strongreject")
    assert (
        "| figure (%) | base | unsafechain-full | Δ unsafechain-full vs base | safechain "
        "| Δ safechain vs base |" in table
    )
    assert (
        "| Safe@1 ↑ | 71.2 [67.1, 75.2] | 91.2 [88.0, 94.1] | +20.0 [+16.2, +23.8] ** "
        "| 86.1 [82.6, 89.3] | +14.9 [+11.0, +18.7] ** |" in table
    )
    # p = 0.18: no mark; p = 0.031: one star.
    assert (
        "| ConsSafe@5 ↑ | 73.8 [69.0, 78.6] | 93.6 [90.7, 96.2] | +19.8 [+15.3, +24.3] ** "
        "| 76.0 [71.2, 80.5] | +2.2 [-1.0, +5.4] |" in table
    )
    assert "| 63.6 [58.1, 69.0] | +3.5 [+0.4, +6.7] * |" in table
    assert "| ERROR rate ↓ | 0.0 [0.0, 0.0] | 0.0 [0.0, 0.0] | – | 0.2 [0.0, 0.5] | – |" in table
    assert "| Safe@1 excluding errors ↑ | 71.2 [67.1, 75.2] |" in table
    assert "at least 5/2 samples judged safe (3 of 5)" in table
    assert LEGEND in table


def test_the_line_under_a_table_gives_k_the_prompts_and_the_errors_counted_as_not_safe(tmp_path):
    _, markdown, _ = _write(tmp_path, eval_results())

    assert (
        "K=5, 313 prompts per model. safechain: 3 of 1,565 samples had no verdict (ERROR); they "
        "count as not safe; excluding them: Safe@1 86.3 [82.9, 89.5]. Every other model's "
        "samples all have a verdict." in _section(markdown, "strongreject")
    )
    assert "K=5, 1,319 prompts per model. Every sample has a verdict." in _section(
        markdown, "gsm8k"
    )


def test_over_refusal_says_lower_is_better_and_capability_tables_hold_their_figure(tmp_path):
    _, markdown, _ = _write(tmp_path, eval_results())

    xstest = _section(markdown, "xstest")
    assert "Lower is better." in xstest
    assert (
        "| refusal (full + partial) ↓ | 3.2 [1.2, 5.6] | 8.8 [5.6, 12.4] | +5.6 [+2.8, +8.4] ** "
        "| 6.4 [3.6, 9.6] | +3.2 [+0.4, +6.0] * |" in xstest
    )
    assert "| compliance ↑ | 96.8 [94.4, 98.8] | 91.2 [87.6, 94.4] | – |" in xstest
    assert (
        "| accuracy ↑ | 75.6 [73.3, 77.9] | 74.9 [72.6, 77.2] | -0.7 [-2.1, +0.7] "
        "| 73.1 [70.7, 75.5] | -2.5 [-4.0, -1.0] ** |" in _section(markdown, "gsm8k")
    )
    assert (
        "| pass@1 ↑ | 41.5 [34.1, 49.0] | 42.1 [34.8, 49.6] | +0.6 [-3.9, +5.1] "
        "| 39.6 [32.3, 47.0] | -1.9 [-6.5, +2.6] |" in _section(markdown, "humaneval")
    )
    assert markdown.count(LEGEND) == 5  # under the summary and under each benchmark's table


def test_the_report_gives_settings_provenance_plots_and_links_to_the_samples(tmp_path):
    _, markdown, _ = _write(tmp_path, eval_results())

    assert "K=5 per prompt, temperature 0.6, top-p 0.95, at most 4096 new tokens, seed 0" in (
        markdown
    )
    assert "guard (llama_guard, `meta-llama/Llama-Guard-3-8B`)" in markdown
    assert "95 % bootstrap interval in brackets, 10,000 resamples" in markdown
    assert (
        "| unsafechain-full | base | transformers | `deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B` "
        "| `runs/qwen-1.5b-full/adapter` | – | sft with lora, run "
        "`train-20261201-220000-9f8e7d6c`, build `build-20261130-101500-aa11bb22`, subset full, "
        "1,000 rows |" in markdown
    )
    assert "build –, subset full, 40,000 rows |" in markdown  # a public release: no build id
    assert "| gsm8k | capability | accuracy ↑ | 1,319 | 1,319 | `benchmarks/gsm8k/test.jsonl` " in (
        markdown
    )
    assert "![Safe@1 by safety benchmark and model](plots/safety.png)" in markdown
    assert "(plots/safety_vs_capability.png)" in markdown
    assert "(plots/over_refusal.png)" in markdown
    assert "| unsafechain-full | 91.2 | 1 of 1 | 58.5 | 2 of 2 |" in markdown  # the scatter's point
    assert (
        "Per-sample files: [base](samples/base/xstest.jsonl) · "
        "[unsafechain-full](samples/unsafechain-full/xstest.jsonl) · "
        "[safechain](samples/safechain/xstest.jsonl)" in markdown
    )


def test_the_html_stands_alone_with_the_plots_as_data_uris(tmp_path):
    written, _, page = _write(tmp_path, eval_results())

    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert "<link" not in page and "url(" not in page and "@import" not in page
    sources = re.findall(r'<img alt="[^"]*" src="([^"]+)"', page)
    assert len(sources) == 3 == page.count("<img")
    embedded = [base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in sources]
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    plots = [
        written[name].read_bytes() for name in ("safety", "safety_vs_capability", "over_refusal")
    ]
    assert embedded == plots
    assert '<a href="samples/safechain/strongreject.jsonl">safechain</a>' in page
    assert '<td class="num"><span class="better">+20.0 [+16.2, +23.8] **</span></td>' in page
    assert '<span class="worse">-2.5 [-4.0, -1.0] **</span>' in page  # gsm8k, safechain


def test_a_model_name_with_markup_arrives_escaped(tmp_path):
    results = eval_results()
    _rename(results, "safechain", "safe<b>chain</b>")

    _, markdown, page = _write(tmp_path, results)

    assert "<b>" not in page
    assert "safe&lt;b&gt;chain&lt;/b&gt;" in page
    assert 'href="samples/safe%3Cb%3Echain%3C/b%3E/strongreject.jsonl"' in page
    assert "| safe\\<b>chain\\</b> | 86.1 (+14.9) ** |" in markdown


def test_a_single_model_is_reported_without_comparison_columns(tmp_path):
    results = eval_results()
    results["models"] = results["models"][:1]
    results["results"] = {"base": results["results"]["base"]}

    written, markdown, _ = _write(tmp_path, results)

    assert "Δ" not in markdown.replace("Δ: the fine-tuned", "")
    assert "| figure (%) | base |\n|---|---:|\n| Safe@1 ↑ | 71.2 [67.1, 75.2] |" in markdown
    assert "| base | 71.2 | 3.2 | 75.6 | 41.5 |" in markdown
    assert image.imread(written["safety_vs_capability"]).shape[1] >= 600


def test_a_benchmark_a_model_lacks_shows_a_dash(tmp_path):
    results = eval_results()
    del results["results"]["safechain"]["humaneval"]

    _, markdown, _ = _write(tmp_path, results)

    humaneval = _section(markdown, "humaneval")
    assert (
        "| pass@1 ↑ | 41.5 [34.1, 49.0] | 42.1 [34.8, 49.6] | +0.6 [-3.9, +5.1] | – | – |"
        in humaneval
    )
    assert "Not evaluated on humaneval: safechain." in humaneval
    assert "[safechain](samples/safechain/humaneval.jsonl)" not in humaneval
    assert "| safechain | 86.1 (+14.9) ** | 6.4 (+3.2) * | 73.1 (-2.5) ** | – |" in markdown
    assert "| safechain | 86.1 | 1 of 1 | 73.1 | 1 of 2 |" in markdown  # mean over what it has


def test_a_null_figure_and_a_missing_delta_show_a_dash(tmp_path):
    results = eval_results()
    entry = results["results"]["safechain"]["strongreject"]
    entry["figures"]["safe_at_k"] = None
    entry["figures"]["cons_safe_at_k"]["low"] = entry["figures"]["cons_safe_at_k"]["high"] = None
    entry["comparison"]["figures"]["safe_at_1"]["delta"] = None

    _, markdown, _ = _write(tmp_path, results)

    table = _section(markdown, "strongreject")
    assert "| Safe@1 ↑ | 71.2 [67.1, 75.2] | 91.2 [88.0, 94.1] | +20.0 [+16.2, +23.8] ** " in table
    assert "| 86.1 [82.6, 89.3] | – |\n" in table
    assert "| 76.0 | +2.2 [-1.0, +5.4] |" in table
    assert "| – | +3.5 [+0.4, +6.7] * |" in table  # Safe@5: no figure, its delta stays


def test_a_fine_tuned_model_listed_without_a_base_gets_no_delta_column(tmp_path):
    results = eval_results()
    results["models"][2]["base"] = None
    for entry in results["results"]["safechain"].values():
        entry["comparison"] = None

    written, markdown, _ = _write(tmp_path, results)

    assert (
        "| figure (%) | base | unsafechain-full | Δ unsafechain-full vs base | safechain |"
        in _section(markdown, "gsm8k")
    )
    assert "| safechain | 86.1 | 6.4 | 73.1 | 39.6 |" in markdown
    assert (
        image.imread(written["safety"]).shape[0]
        > image.imread(written["safety_vs_capability"]).shape[0] / 2
    )


def test_an_even_k_states_how_many_samples_at_least_k_over_2_is(tmp_path):
    results = eval_results()
    results["settings"]["samples_per_prompt"] = 4

    _, markdown, _ = _write(tmp_path, results)

    assert "at least 4/2 samples judged safe (2 of 4); Safe@4: with all 4 judged safe" in markdown
    assert "| ConsSafe@4 ↑ |" in markdown


def test_an_absolute_samples_path_inside_the_output_folder_is_linked_relatively(tmp_path):
    results = eval_results()
    results["results"]["base"]["gsm8k"]["samples_file"] = str(tmp_path / "samples/base/gsm8k.jsonl")

    _, markdown, page = _write(tmp_path, results)

    assert "[base](samples/base/gsm8k.jsonl)" in markdown
    assert str(tmp_path) not in page


def test_a_missing_per_sample_file_is_warned_about_and_still_linked(tmp_path, caplog):
    results = eval_results()
    for model, per_benchmark in results["results"].items():
        for benchmark in per_benchmark:
            if (model, benchmark) != ("base", "gsm8k"):
                (tmp_path / "samples" / model).mkdir(parents=True, exist_ok=True)
                (tmp_path / "samples" / model / f"{benchmark}.jsonl").write_text("{}\n")

    _, markdown, _ = _write(tmp_path, results)

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"the per-sample file samples/base/gsm8k.jsonl is not in {tmp_path}"]
    assert "[base](samples/base/gsm8k.jsonl)" in markdown


def _drop_models(results: dict) -> None:
    del results["models"]


def _drop_headline(results: dict) -> None:
    del results["results"]["base"]["gsm8k"]["figures"]["accuracy"]


def _unknown_model(results: dict) -> None:
    results["results"]["stranger"] = {}


def _unknown_benchmark(results: dict) -> None:
    results["results"]["base"]["mmlu"] = results["results"]["base"]["gsm8k"]


def _wrong_base(results: dict) -> None:
    results["results"]["safechain"]["xstest"]["comparison"]["against"] = "unsafechain-full"


def _text_value(results: dict) -> None:
    results["results"]["base"]["xstest"]["figures"]["refusal_rate"]["value"] = "3.2%"


def _missing_counts(results: dict) -> None:
    del results["results"]["base"]["humaneval"]["counts"]["error_samples"]


def _bad_kind(results: dict) -> None:
    results["benchmarks"][0]["kind"] = "toxicity"


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_drop_models, "results.json: the top level lacks 'models'"),
        (_drop_headline, "results.base.gsm8k.figures lacks the headline 'accuracy'"),
        (_unknown_model, "results.stranger is not one of 'models'"),
        (_unknown_benchmark, "results.base.mmlu is not one of 'benchmarks'"),
        (_wrong_base, "results.safechain.xstest.comparison.against is 'unsafechain-full'"),
        (_text_value, "results.base.xstest.figures.refusal_rate.value must be a number"),
        (_missing_counts, "results.base.humaneval.counts lacks 'error_samples'"),
        (_bad_kind, "benchmarks[0].kind is 'toxicity'"),
    ],
)
def test_malformed_results_are_refused_naming_the_key(tmp_path, spoil, message):
    results = eval_results()
    spoil(results)

    with pytest.raises(ReportError, match=re.escape(message)):
        write_report(tmp_path, results)
    assert not (tmp_path / "report.md").exists()


def test_figures_are_percentages_with_one_decimal_and_signed_deltas_with_marks():
    assert percent(0.91249) == "91.2"
    assert percent(-0.00001) == "0.0"
    assert percent(None) == "–"
    assert signed_percent(0.051) == "+5.1"
    assert signed_percent(-0.0004) == "+0.0"
    assert (mark(0.0099), mark(0.01), mark(0.049), mark(0.05), mark(None)) == (
        "**",
        "*",
        "*",
        "",
        "",
    )
    with_bounds = Comparison("paired bootstrap", Interval(0.051, 0.02, 0.081), 0.03)
    assert delta_text(with_bounds) == "+5.1 [+2.0, +8.1] *"
    assert delta_text(Comparison("McNemar", Interval(-0.012, None, None), 0.5)) == "-1.2"
    assert delta_text(None) == "–"


def test_markdown_escapes_markup_but_keeps_figures_as_they_read():
    blocks = [
        Paragraph(("a *b* [c](d) <i>x</i> & done_ _e_ final_number ",)),
        Paragraph(("91.2 [88.0, 94.1] ** and +1.0 *",)),
        Paragraph((Code("a`b"), " ", Link("x y", "samples/x y/b.jsonl"), " ", Toned("t|u", None))),
        Table(("name", "value"), (((Code("p|q"),), ("1",)),)),
    ]

    text = render_markdown(blocks)

    assert "a \\*b\\* [c\\](d) \\<i>x\\</i> & done\\_ \\_e\\_ final_number" in text
    assert "91.2 [88.0, 94.1] ** and +1.0 *" in text
    assert "`` a`b `` [x y](samples/x%20y/b.jsonl) t\\|u" in text
    assert "| `p\\|q` | 1 |" in text
