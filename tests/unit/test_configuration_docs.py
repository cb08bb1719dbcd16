"""docs/configuration.md is what the generator writes from the settings models now."""

from __future__ import annotations

from pathlib import Path

import pytest

from unsafechain.docs import configuration
from unsafechain.docs.configuration import (
    SCHEMAS,
    UndocumentedKey,
    attribute_docs,
    describe,
    render,
)

ROOT = Path(__file__).parents[2]


def test_committed_reference_matches_the_settings_models():
    committed = (ROOT / configuration.DOCUMENT).read_text(encoding="utf-8")
    assert committed == render(), "docs/configuration.md is out of date: run `make docs`"


def test_reference_is_the_same_on_every_render():
    assert render() == render()


@pytest.mark.parametrize(
    "key",
    [
        "| `limit` |",
        "| `hub_config` |",
        '| `completions` | "all" \\| "until_passed" |',
        "| `random_size` | int (≥ 1) | `1000` |",
        "| `selected_size` |",
    ],
)
def test_options_documented_only_in_docstrings_are_listed(key: str):
    assert key in render()


def test_every_key_of_every_schema_has_a_meaning():
    text = render()
    for schema in SCHEMAS:
        assert f"`{schema.usage}`" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows)


def test_types_read_as_yaml_values():
    text = render()
    assert '| `format` | "auto" \\| "jsonl" \\|' in text  # a Literal
    assert "| `sources` | list[[SourceSettings](#sourcesettings)] (non-empty) | required |" in text
    assert "| `models` | dict[str, [BackendSettings](#backendsettings)] (non-empty) |" in text
    assert (
        '| `targets` | list["full" \\| "reasoning" \\| "answer"] (non-empty) | `["full"]` |' in text
    )


def test_attributes_sections_are_parsed_with_continuations_and_shared_entries():
    class Documented:
        """Summary.

        Attributes:
            first: One line
                continued.
            a, b: Shared.

        Example:
            not: an attribute
        """

    assert attribute_docs(Documented) == {
        "first": "One line continued.",
        "a": "Shared.",
        "b": "Shared.",
    }


def test_an_undocumented_key_is_an_error():
    from unsafechain.domain.settings import StrictModel

    class Bare(StrictModel):
        """No attributes."""

        size: int = 1

    with pytest.raises(UndocumentedKey, match=r"Bare\.size"):
        describe(Bare, "size", Bare.model_fields["size"])
