"""The configuration reference, ``docs/configuration.md``, generated from the settings
models: every key of every configuration file and service, with its type, default and
meaning.

A key's meaning is its ``Field(description=...)`` or, as the models document their
fields, its entry in the ``Attributes:`` section of the class docstring (the nearest
class in the model's bases that documents it). A key documented nowhere is an error,
so the reference has no blanks. ``make docs`` runs :func:`main`; a unit test compares
the committed file with :func:`render`.
"""

from __future__ import annotations

import argparse
import enum
import inspect
import json
import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python
from pydantic_settings import BaseSettings

from unsafechain.correction.settings import CorrectionServiceSettings
from unsafechain.dataset.config import BuildConfig
from unsafechain.domain.settings import path_or_hub_name, resolve_from_file
from unsafechain.evaluation.config import EvalConfig
from unsafechain.generation.settings import GenerationServiceSettings
from unsafechain.judge.settings import JudgeServiceSettings
from unsafechain.runtime.settings import ServerSettings
from unsafechain.training.settings import TrainingServiceSettings, TrainingSettings
from unsafechain.triggers.training import FollowSettings

DOCUMENT = Path("docs/configuration.md")
"""Where the reference goes, relative to the repository root."""


@dataclass(frozen=True)
class Schema:
    """One configuration file or service whose keys the reference lists.

    Attributes:
        title: The section's heading.
        usage: Where the schema is read, as a user types it.
        model: The settings model at its top level.
    """

    title: str
    usage: str
    model: type[BaseModel]


SCHEMAS: tuple[Schema, ...] = (
    Schema("Build configuration", "unsafechain build --config FILE", BuildConfig),
    Schema("Training run", "unsafechain train --config FILE", TrainingSettings),
    Schema("Evaluation", "unsafechain eval --config FILE", EvalConfig),
    Schema("Training follower", "unsafechain worker train --config FILE", FollowSettings),
    Schema("Generation service", "unsafechain serve generation", GenerationServiceSettings),
    Schema("Judge service", "unsafechain serve judge", JudgeServiceSettings),
    Schema("Correction service", "unsafechain serve correction", CorrectionServiceSettings),
    Schema("Training service", "unsafechain serve training", TrainingServiceSettings),
)
"""The schemas, in the order the reference lists them."""

SHARED: tuple[type[BaseModel], ...] = (ServerSettings,)
"""Bases whose keys every subclass has: listed once, in a section of their own."""


class UndocumentedKey(ValueError):
    """A settings model has a key that neither a Field description nor its class
    docstring explains."""


# An entry of a Google-style "Attributes:" section: "name: text" or "a, b, c: text".
_ENTRY = re.compile(r"^(\w+(?:, \w+)*): (.*)$")


def attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` entries of ``cls``'s docstring, each joined into one line."""
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    entries: dict[str, str] = {}
    lines = iter(doc.splitlines())
    for line in lines:
        if line.strip() == "Attributes:":
            break
    names: list[str] = []
    for line in lines:
        if line and not line.startswith(" "):
            break  # the next section
        text = line.strip()
        entry = _ENTRY.match(text) if line.startswith("    ") and line[4] != " " else None
        if entry:
            names = entry[1].split(", ")
            for name in names:
                entries[name] = entry[2]
        elif text and names:
            for name in names:
                entries[name] += " " + text
    return entries


def describe(model: type[BaseModel], key: str, field: FieldInfo) -> str:
    """The meaning of ``model``'s ``key``.

    Raises:
        UndocumentedKey: No description and no docstring entry for the key.
    """
    if field.description:
        return field.description
    for cls in model.__mro__:
        if key in attribute_docs(cls):
            return attribute_docs(cls)[key]
    raise UndocumentedKey(f"{model.__name__}.{key}: no description (Field or Attributes:)")


def anchor(model: type) -> str:
    """The reference's anchor of ``model``'s section."""
    return model.__name__.lower()


def _constraints(metadata: list[Any]) -> list[str]:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    found = []
    for item in metadata:
        if isinstance(item, FieldInfo):  # Field(...) inside a union: its own metadata
            found += _constraints(item.metadata)
            continue
        for name, sign in signs.items():
            value = getattr(item, name, None)
            if value is not None:
                found.append(f"{sign} {value:g}")
        if isinstance(item, annotated_types.MinLen):
            found.append("non-empty" if item.min_length == 1 else f"length ≥ {item.min_length}")
        if isinstance(item, annotated_types.MaxLen):
            found.append(f"length ≤ {item.max_length}")
        pattern = getattr(item, "pattern", None)
        if isinstance(pattern, str):
            found.append(f"matches `{pattern}`")
    return found


def type_name(annotation: Any) -> str:
    """``annotation`` as a reader of a YAML file sees it: ``int``, ``list[str]``,
    ``"a" | "b"``, a nested model as a link to its section."""
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *metadata = get_args(annotation)
        name = type_name(inner)
        resolvers = {getattr(item, "func", None) for item in metadata}
        if resolve_from_file in resolvers:
            name = "path"
        elif path_or_hub_name in resolvers:
            name = "path or hub name"
        constraints = _constraints(metadata)
        return f"{name} ({', '.join(constraints)})" if constraints else name
    if origin is Literal:
        return " \\| ".join(json.dumps(value) for value in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " \\| ".join(type_name(arg) for arg in get_args(annotation))
    if origin in (list, tuple, set, frozenset):
        args = [arg for arg in get_args(annotation) if arg is not Ellipsis]
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict:
        key, value = get_args(annotation)
        return f"dict[{type_name(key)}, {type_name(value)}]"
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return f"[{annotation.__name__}](#{anchor(annotation)})"
        if issubclass(annotation, enum.Enum):
            return " \\| ".join(json.dumps(member.value) for member in annotation)
        if issubclass(annotation, Path):
            return "path"
        if issubclass(annotation, SecretStr):
            return "secret str"
        return annotation.__name__
    return str(annotation)


def _annotation(field: FieldInfo) -> Any:
    # Pydantic keeps a field's constraints in its metadata, off the annotation.
    if field.metadata:
        return Annotated[(field.annotation, *field.metadata)]
    return field.annotation


def default_text(field: FieldInfo) -> str:
    """The field's default as a YAML value would be written, or ``required``."""
    if field.is_required():
        return "required"
    value = (
        field.default_factory()  # type: ignore[call-arg]
        if field.default_factory is not None
        else field.default
    )
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, tuple) and sys.executable in value:
        value = tuple("<this python>" if part == sys.executable else part for part in value)
    if isinstance(value, BaseModel):
        changed = value.model_dump(mode="json", include=value.model_fields_set)
        if not changed:
            return "its defaults"
        value = changed
    return f"`{json.dumps(to_jsonable_python(value), ensure_ascii=False)}`"


def nested_models(annotation: Any) -> Iterator[type[BaseModel]]:
    """The settings models inside ``annotation``, in the order they appear."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in get_args(annotation):
        yield from nested_models(arg)


# reStructuredText in the docstrings: ``literal`` and :role:`name`.
_RST_LITERAL = re.compile(r"``(.+?)``")
_RST_ROLE = re.compile(r":\w+:`~?([^`]+)`")


def markdown(text: str) -> str:
    """A docstring's text as Markdown: ``literal`` and :class:`Name` become `literal`."""
    return _RST_ROLE.sub(r"`\1`", _RST_LITERAL.sub(r"`\1`", text))


def _cell(text: str) -> str:
    return markdown(text).replace("|", "\\|").replace("\n", " ")


def _model_section(model: type[BaseModel], where: str) -> list[str]:
    summary = inspect.cleandoc(model.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    lines = [f'<a id="{anchor(model)}"></a>', "", f"### {model.__name__}", ""]
    lines += [f"At {where}. {markdown(summary)}", ""]
    if issubclass(model, BaseSettings):
        prefix = model.model_config.get("env_prefix", "")
        nested = model.model_config.get("env_nested_delimiter")
        text = f"Each key is also read from the environment as `{prefix}<KEY>`"
        if nested:
            text += f", nested keys joined by `{nested}` (`{prefix}LIMITS{nested}MAX_CHARS`)"
        lines += [text + ".", ""]
    shared = next((base for base in SHARED if issubclass(model, base) and model is not base), None)
    own = {
        k: f
        for k, f in model.model_fields.items()
        if shared is None or k not in shared.model_fields
    }
    if shared is not None:
        lines += [f"Every key of [{shared.__name__}](#{anchor(shared)}), and:", ""]
    lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, field in own.items():
        name = type_name(_annotation(field))
        meaning = _cell(describe(model, key, field))
        lines.append(f"| `{key}` | {name} | {_cell(default_text(field))} | {meaning} |")
    return [*lines, ""]


def _key_path(parent: str, key: str, annotation: Any) -> str:
    path = f"{parent}.{key}" if parent else key
    origin = get_origin(annotation)
    while origin is Annotated:
        annotation = get_args(annotation)[0]
        origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _key_path(parent, key, args[0])
    if origin in (list, tuple):
        return f"{path}[]"
    if origin is dict:
        return f"{path}.<name>"
    return path


def _walk(root: type[BaseModel], *, shared: bool = False) -> dict[type[BaseModel], list[str]]:
    """Every model below ``root`` (breadth first, in declaration order) with the key
    paths it is found at; with ``shared``, first the shared bases of ``root``."""
    found: dict[type[BaseModel], list[str]] = {}
    if shared:
        for base in SHARED:
            if issubclass(root, base) and root is not base:
                found[base] = ["the top level of every service"]
    queue: list[tuple[type[BaseModel], str]] = [(root, "")]
    while queue:
        model, prefix = queue.pop(0)
        for key, field in model.model_fields.items():
            path = _key_path(prefix, key, field.annotation)
            for nested in nested_models(field.annotation):
                if nested not in found:
                    queue.append((nested, path))
                found.setdefault(nested, []).append(f"`{path}`")
    return found


def _sources_note(model: type[BaseModel]) -> list[str]:
    """How a service's settings are given, and which keys its ``--config`` file gives."""
    sections = getattr(model, "config_sections", None)
    if not sections:
        return []
    keys = ", ".join(f"`{key}`" for key in sections)
    return [
        "Most keys are also flags (`--help` lists them). Flags win over the environment, "
        f"the environment over the file given with `--config`, of which the service reads "
        f"the top-level keys {keys} (a build configuration's, where it has them).",
        "",
    ]


def render() -> str:
    """The whole reference, as ``docs/configuration.md`` holds it."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from the settings models by `make docs` "
        "(python -m unsafechain.docs.configuration); do not edit by hand. -->",
        "",
        "Every key of every configuration file and service: its type, its default "
        "(`required` when it has none) and what it means. A nested model links to its "
        "section; `key[]` is an entry of a list, `key.<name>` one of a mapping. A "
        "section used in several places is listed once, where it first appears. A "
        "wrong key or value is reported with its dotted path. A relative path in a "
        "configuration file (a file, a folder, a local model or dataset that is not a "
        "hub name) starts from the file's folder; given with `--set`, a flag or an "
        "environment variable, from the working directory; in a configuration sent to "
        "a service as text (a training spec, a follower's run template), from the "
        "service's working directory.",
        "",
        "| schema | read by |",
        "| --- | --- |",
    ]
    lines += [f"| [{s.title}](#{anchor(s.model)}) | `{s.usage}` |" for s in SCHEMAS]
    lines.append("")
    listed: set[type[BaseModel]] = set()
    for schema in SCHEMAS:
        lines += [f"## {schema.title}", "", f"`{schema.usage}`", ""]
        lines += _sources_note(schema.model)
        if schema.model not in listed:
            lines += _model_section(schema.model, "the top level")
            listed.add(schema.model)
        for model, paths in _walk(schema.model, shared=True).items():
            if model not in listed:
                lines += _model_section(model, ", ".join(paths))
                listed.add(model)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> None:
    """Write the reference (``python -m unsafechain.docs.configuration [--out FILE]``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOCUMENT, help=f"default: {DOCUMENT}")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
