"""Hostile input files: no prompt file or configuration file makes the readers raise
anything but the project's own errors; every bad line is reported with its file, line
and a readable reason, and every good line survives."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unsafechain.dataset.config import ConfigError, load_config
from unsafechain.intake.settings import SourceSettings
from unsafechain.intake.sources import PromptRecord, Rejection, SourceError, read_source

SEPARATORS = st.sampled_from([b"\n", b"\r\n", b"\r"])
GARBAGE = st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" "))
GOOD_TEXT = st.text(min_size=1, max_size=30).filter(lambda s: s.strip() and "\x00" not in s)


def _read(path: Path) -> list[PromptRecord | Rejection]:
    return list(read_source(SourceSettings(name="fuzz", path=str(path))))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(
        st.one_of(GOOD_TEXT.map(lambda t: ("good", t)), GARBAGE.map(lambda g: ("bad", g)))
    ),
    separator=SEPARATORS,
)
def test_no_prompt_file_crashes_the_reader_and_every_good_line_survives(lines, separator):
    good, raw = [], []
    for index, (kind, value) in enumerate(lines):
        if kind == "good":
            prompt = f"good {index}: {value}"
            good.append(prompt)
            raw.append(json.dumps({"prompt": prompt}).encode())
        else:
            raw.append(value)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.jsonl"
        path.write_bytes(separator.join(raw))
        results = _read(path)
    texts = {r.text for r in results if isinstance(r, PromptRecord)}
    assert set(good) <= texts
    for result in results:
        if isinstance(result, Rejection):
            assert 1 <= result.line <= len(raw)
            assert result.reason and "at at" not in result.reason
            assert str(result).startswith(f"{path}:{result.line}: ")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(value=JSON_VALUES)
def test_any_json_value_on_a_line_is_a_record_or_a_rejection(value):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.jsonl"
        path.write_text(json.dumps(value) + "\n" + json.dumps({"prompt": "kept"}) + "\n")
        results = _read(path)
    assert isinstance(results[-1], PromptRecord) and results[-1].text == "kept"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"prompt": "\\ud800 lone"}', "prompt: holds a lone surrogate '\\ud800'"),
        (b'{"prompt": "\xed\xa0\x80"}', "not UTF-8: byte 0xed at position 13"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid JSON: nested too deeply"),
        (b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}", "invalid JSON: Exceeds the limit"),
        (b'{"prompt": "a\x00b"}', "holds a NUL byte at position 14"),
        (
            b'{"prompt": "cut sho',
            "invalid JSON: the line ends inside a string that starts at column 12",
        ),
        (b'{"prompt": ', "invalid JSON: the line ends early"),
        (b'{"prompt" "x"}', "invalid JSON: Expecting ':' delimiter (column 11)"),
    ],
)
def test_each_known_bad_line_is_rejected_with_a_readable_reason(tmp_path, line, reason):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(line + b"\n" + b'{"prompt": "after"}\n')
    rejection, after = _read(path)
    assert isinstance(rejection, Rejection) and rejection.line == 1
    assert rejection.reason.startswith(reason), rejection.reason
    assert isinstance(after, PromptRecord) and after.line == 2


def test_carriage_return_line_endings_are_lines(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "one"}\r{"prompt": "two"}\r\r{"prompt": "three"}\r')
    results = _read(path)
    assert [(r.line, r.text) for r in results if isinstance(r, PromptRecord)] == [
        (1, "one"),
        (2, "two"),
        (4, "three"),
    ]


@settings(max_examples=150, deadline=None)
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_no_configuration_file_makes_the_loader_raise_anything_but_a_config_error(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "build.yaml"
        path.write_bytes(content)
        with pytest.raises(ConfigError):
            load_config(path, {"build.output": str(Path(folder) / "out")})


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\xff\xfe build: {}", "not UTF-8 text"),
        (b"[" * 10_000 + b"]" * 10_000, "nested too deeply"),
        (b"build: [1, 2]", "build: must be a mapping"),
    ],
)
def test_known_bad_configuration_files_are_config_errors(tmp_path, content, reason):
    path = tmp_path / "build.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=reason):
        load_config(path, {"build.output": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_a_source_that_is_missing_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        _read(tmp_path / "missing.jsonl")


def test_a_prompt_over_the_sources_bound_is_a_rejected_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "x" * 1_000_000}) + "\n" + '{"prompt": "short"}\n')
    rejection, kept = read_source(SourceSettings(name="s", path=str(path)))
    assert isinstance(rejection, Rejection)
    assert rejection.reason == "prompt: 1000000 characters, over max_prompt_chars (50000)"
    assert isinstance(kept, PromptRecord)
