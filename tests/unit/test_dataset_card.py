"""What the dataset card states: the stand-in disclaimer, the harm categories over a
real denominator, and the hardness rule in plain words."""

from __future__ import annotations

import json

import pytest

from unsafechain.dataset.card import category_shares, standin_lines
from unsafechain.dataset.stages import hard_case_rule, unsafe_needed
from unsafechain.demo.marker import STANDIN_KEY, standin_role


def _verdict(label, *categories):
    return {"label": label, "categories": list(categories)}


def _case(*completions):
    """A case row whose generated completions carry these verdict lists."""
    return {
        "provenance": {
            "completions": [
                {
                    "label": "unsafe" if any(v["label"] == "unsafe" for v in verdicts) else "safe",
                    "verdicts": list(verdicts),
                }
                for verdicts in completions
            ]
        }
    }


def test_category_shares_are_over_every_unsafe_verdict():
    cases = [
        _case([_verdict("unsafe", "S9")], [_verdict("unsafe", "S9", "S1")], [_verdict("safe")]),
        _case([_verdict("unsafe")], [_verdict("error")]),
        _case([_verdict("safe")]),
    ]
    shares = category_shares(cases)
    # Three unsafe verdicts: two name S9, one S1, one names none; safe and error
    # verdicts are not in the denominator.
    assert shares.unsafe_verdicts == 3
    assert shares.naming == {"S1": 1, "S9": 2, "none": 1}
    assert shares.share("S9") == pytest.approx(2 / 3)
    assert shares.share("S2") == 0
    assert category_shares([]).share("S9") is None


@pytest.mark.parametrize(
    ("fraction", "samples", "rule", "needed"),
    [
        (1.0, 3, "all 3 completions judged unsafe", 3),
        (0.5, 3, "at least 2 of 3 completions judged unsafe", 2),
        (0.01, 5, "at least 1 of 5 completions judged unsafe", 1),
        (1.0, 1, "the only completion judged unsafe", 1),
    ],
)
def test_hardness_rule_reads_in_plain_words(fraction, samples, rule, needed):
    assert hard_case_rule(fraction, samples) == rule
    assert unsafe_needed(fraction, samples) == needed
    assert "%" not in rule


def _manifest(**standins):
    return {
        "models": {
            key: {"backend": "transformers", "model": f"m/{key}", "standin": standins.get(key)}
            for key in ("generator", "guard", "corrector")
        }
    }


def test_card_disclaims_a_build_on_the_standins():
    [text, _] = standin_lines(_manifest(generator="generator", guard="judge"))
    assert text.startswith("> **Built with stand-in models.**")
    assert "`generator` stands in for deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" in text
    assert "`guard` stands in for meta-llama/Llama-Guard-3-8B" in text
    assert "say nothing about real safety" in text


def test_card_of_real_models_has_no_disclaimer():
    assert standin_lines(_manifest()) == []


def test_a_standin_is_known_by_its_config_key(tmp_path):
    standin, real = tmp_path / "standin", tmp_path / "real"
    standin.mkdir()
    real.mkdir()
    (standin / "config.json").write_text(json.dumps({"model_type": "qwen2", STANDIN_KEY: "judge"}))
    (real / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert standin_role(str(standin)) == "judge"
    assert standin_role(str(real)) is None
    assert standin_role("meta-llama/Llama-Guard-3-8B") is None
    assert standin_role(str(tmp_path / "missing")) is None
