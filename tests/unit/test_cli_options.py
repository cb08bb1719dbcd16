"""Command-line conveniences: ``--set KEY=VALUE`` overrides checked like the file,
``--limit N`` prompts per source, and the global options either side of the command."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from unsafechain.cli import _limited, _set_values, build_parser
from unsafechain.dataset.config import load_config
from unsafechain.domain.settings import ConfigError, set_dotted

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "unsafechain" / "demo" / "demo.yaml"


def test_set_values_are_read_as_yaml() -> None:
    args = argparse.Namespace(set=["build.concurrency=8", "judging.unsafe_if=any", "a.b=[1, 2]"])
    assert _set_values(args) == {
        "build.concurrency": 8,
        "judging.unsafe_if": "any",
        "a.b": [1, 2],
    }


@pytest.mark.parametrize(
    "item", ["build.concurrency", "=3", "a={"], ids=["no-sign", "no-key", "bad-yaml"]
)
def test_a_malformed_set_is_refused_naming_it(item: str) -> None:
    with pytest.raises(ConfigError, match=f"--set {item}"):
        _set_values(argparse.Namespace(set=[item]))


def test_a_set_reaches_list_items_by_index_and_is_checked_like_the_file() -> None:
    config = load_config(DEMO, {"sources.1.limit": 3, "build.concurrency": 5})
    assert config.sources[1].limit == 3 and config.build.concurrency == 5
    with pytest.raises(ConfigError, match=r"build\.concurency: Extra inputs are not permitted"):
        load_config(DEMO, {"build.concurency": 5})
    with pytest.raises(ConfigError, match=r"sources.9: no item 9 \(the list has 2\)"):
        load_config(DEMO, {"sources.9.limit": 3})


def test_set_dotted_refuses_a_scalar_parent() -> None:
    raw = {"build": [1, 2], "seed": 3}
    with pytest.raises(ConfigError, match="build: must be a mapping"):
        set_dotted(raw, {"build.output": "x"}, where="f")
    with pytest.raises(ConfigError, match="seed: must be a mapping"):
        set_dotted(raw, {"seed.value": 1}, where="f")


def test_limit_caps_every_source_and_keeps_a_smaller_limit() -> None:
    config = load_config(DEMO, {"sources.0.limit": 2})
    limited = _limited(config, 5)
    assert [source.limit for source in limited.sources] == [2, 5]


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_limit_must_be_a_positive_number(value: str, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["build", "--config", str(DEMO), "--limit", value])
    assert "expected a whole number of at least 1" in capsys.readouterr().err


def test_global_options_before_and_after_the_command_agree() -> None:
    before = build_parser().parse_args(
        ["--log-level", "ERROR", "--no-progress", "build", "--config", "x"]
    )
    after = build_parser().parse_args(
        ["build", "--config", "x", "--log-level", "ERROR", "--no-progress"]
    )
    default = build_parser().parse_args(["build", "--config", "x"])
    for args in (before, after):
        assert (args.log_level, args.no_progress, args.verbose) == ("ERROR", True, False)
    assert (default.log_level, default.no_progress) == ("INFO", False)
    nested = build_parser().parse_args(["serve", "judge", "--verbose"])
    assert nested.verbose is True
