"""What every settings model shares: strict, frozen pydantic models, sampling settings,
one way of naming what is wrong with a value, and one way of reading a YAML
configuration file."""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from unsafechain.domain.types import SamplingParams


class SetupError(ValueError):
    """What valid settings describe cannot be set up: a model that cannot be loaded, an
    API key variable that is not set, a template that is missing. The message names
    the setting."""


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid; the message names the key."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a command after it kept what it had; the message says what
    was kept and how to go on, and is the one line the command line prints."""


class StrictModel(BaseModel):
    """A settings model that rejects unknown keys, so a typo names itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingSettings(StrictModel):
    """Sampling K completions per prompt.

    Attributes:
        samples: Completions per prompt (K).
        temperature: 0 is greedy decoding.
        top_p: Nucleus sampling mass.
        top_k: Sample from the k most likely tokens only; 0 (the default) is off, as
            SafeChain and STAR-1 sample (transformers would otherwise apply 50).
        max_new_tokens: Upper bound on generated tokens per completion.
    """

    samples: Annotated[int, Field(ge=1)] = 1
    temperature: Annotated[float, Field(ge=0)] = 0.6
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    top_k: Annotated[int, Field(ge=0)] = 0
    max_new_tokens: Annotated[int, Field(ge=1)] = 4096

    def params(self) -> SamplingParams:
        """The sampling settings for one prompt's K samples."""
        return SamplingParams(
            n=self.samples,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
        )


class FileText(str):
    """A string read from a configuration file, which remembers the file's folder.

    Relative paths in a configuration file start from the file's folder, as in a
    Compose file or a kustomization; values given on the command line (``--set``,
    flags), by the environment or in a configuration sent to a service as text start
    from the working directory. :func:`from_file` marks every string of a file so; a
    path field (:data:`ConfigPath`, :data:`ConfigPathText`, :func:`path_or_hub_name`)
    resolves a marked string from its folder, and pydantic turns any other marked
    string into a plain ``str``, so nothing past validation sees the mark.
    """

    folder: Path

    def __new__(cls, value: str, folder: Path) -> FileText:
        text = super().__new__(cls, value)
        text.folder = folder
        return text


def from_file(value: object, folder: Path) -> object:
    """``value`` (a parsed YAML document) with every string in it, at any depth, marked as
    read from a file in ``folder``; mapping keys stay plain."""
    if isinstance(value, str):
        return FileText(value, folder)
    if isinstance(value, dict):
        return {key: from_file(item, folder) for key, item in value.items()}
    if isinstance(value, list):
        return [from_file(item, folder) for item in value]
    return value


def resolve_from_file(value: object) -> object:
    """A relative path read from a configuration file, joined to the file's folder (and
    normalised: ``configs/../data/x`` is ``data/x``); ``~`` is expanded; anything else
    is returned as it is."""
    if not isinstance(value, FileText) or not value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    return os.path.normpath(value.folder / path)


def path_or_hub_name(value: object, local_suffixes: Collection[str] = ()) -> object:
    """A value that is a local path or a hub name (``namespace/name``), resolved from its
    configuration file's folder when it is a path.

    It is a path when it starts with ``.``, ``/`` or ``~``, has more than one ``/``,
    ends in one of ``local_suffixes`` (``.jsonl`` …), or names something that exists
    in the file's folder; otherwise it is a hub name and kept as written.
    """
    if not isinstance(value, FileText):
        return value
    text = str(value)
    local = (
        text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or Path(text).suffix.lower() in local_suffixes
        or (value.folder / text).exists()
    )
    return resolve_from_file(value) if local else text


def where_paths_start() -> str:
    """Where a relative path starts, for a message about a path that is not there."""
    return (
        "a relative path in a config file starts from the file's folder, one given by a "
        f"flag or --set from {Path.cwd()}"
    )


ConfigPath = Annotated[Path, BeforeValidator(resolve_from_file)]
"""A file or folder; relative in a configuration file, it starts from the file's folder."""

ConfigPathText = Annotated[str, BeforeValidator(resolve_from_file)]
"""A file or folder kept as text; relative in a configuration file, it starts from the
file's folder."""


_RESOLVERS = (resolve_from_file, path_or_hub_name)


def _unwrap(annotation: Any) -> tuple[Any, set]:
    """``annotation`` without ``Annotated`` and ``None`` in a union, and the path
    resolvers its metadata names."""
    resolvers: set = set()
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *metadata = get_args(annotation)
            resolvers |= {getattr(item, "func", None) for item in metadata} & set(_RESOLVERS)
            continue
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
            annotation = args[0]
            continue
        return annotation, resolvers


def _resolve_paths(value: object, annotation: Any) -> object:
    """``value`` (marked by :func:`from_file`), read as ``annotation``, with its path
    fields resolved and every other mark dropped (plain ``str``)."""
    annotation, resolvers = _unwrap(annotation)
    if isinstance(value, FileText):
        if resolve_from_file in resolvers:
            return resolve_from_file(value)
        return path_or_hub_name(value) if resolvers else str(value)
    origin, args = get_origin(annotation), get_args(annotation)
    if isinstance(value, list):
        item = args[0] if origin in (list, tuple) and args else None
        return [_resolve_paths(entry, item) for entry in value]
    if not isinstance(value, dict):
        return value
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        fields = annotation.model_fields
        return {
            key: _resolve_paths(
                entry,
                Annotated[(fields[key].annotation, *fields[key].metadata)]
                if key in fields and fields[key].metadata
                else fields[key].annotation
                if key in fields
                else None,
            )
            for key, entry in value.items()
        }
    entry_type = args[1] if origin is dict and len(args) == 2 else None
    return {key: _resolve_paths(entry, entry_type) for key, entry in value.items()}


def text_for_service(path: Path, model: type[BaseModel]) -> str:
    """The configuration file ``path`` as YAML text for a service to read, its relative
    paths (the path fields of ``model``) rewritten to start from the working directory.

    A service reads a configuration sent as text from its own working directory, and
    has no file's folder: rewritten so, the text means there what the file means here
    when the service's working directory is this one (the same machine, or a pod with
    the same layout mounted). Comments are not kept; keys and values are.

    Raises:
        ConfigError: The file is missing, unreadable, or not a YAML mapping.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(f"config file not found: {path}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    resolved = _resolve_paths(from_file(raw, path.parent), model)
    return yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)


# A validator's message that names a key below the model it checks: "judges.3.members.1: …".
_NESTED_KEY = re.compile(r"^([A-Za-z_]\w*(?:\.\w+)*): (.+)$", re.DOTALL)


def describe_error(error: ValidationError) -> str:
    """Every problem of ``error`` as ``dotted.key: message``, joined by ``; ``.

    A model validator that names a key inside its model (``judges.3.members.1: …``)
    is reported under the full path (``judging.judges.3.members.1: …``).
    """
    problems = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        nested = _NESTED_KEY.match(message)
        if key and nested:
            key, message = f"{key}.{nested[1]}", nested[2]
        problems.append(f"{key}: {message}" if key else message)
    return "; ".join(problems)


_Config = TypeVar("_Config", bound=BaseModel)


def load_config_file(
    path: str | Path, model: type[_Config], overrides: dict[str, object] | None = None
) -> _Config:
    """Read a YAML configuration file and validate it into ``model``.

    Args:
        path: YAML file whose top level is a mapping of sections.
        model: The settings model the file holds.
        overrides: Dotted keys to set after reading, e.g. ``{"build.output": "x"}``.

    Raises:
        ConfigError: The file is missing, unreadable or invalid; the message names the key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise ConfigError(f"config file not found: {path}") from error
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a configuration file") from None
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start + 1})") from None
    return load_config_text(text, model, overrides, where=str(path), folder=path.parent)


def load_config_text(
    text: str,
    model: type[_Config],
    overrides: dict[str, object] | None = None,
    *,
    where: str,
    folder: Path | None = None,
) -> _Config:
    """Validate a YAML (or JSON) configuration into ``model``.

    Args:
        text: The configuration; its top level is a mapping of sections.
        model: The settings model it holds.
        overrides: Dotted keys to set after reading, e.g. ``{"build.output": "x"}``;
            their relative paths start from the working directory.
        where: Names the configuration in messages: its file, a request field.
        folder: The folder of the file ``text`` was read from: its relative paths
            start there. None (text sent to a service, ``--config-json``): from the
            working directory.

    Raises:
        ConfigError: The text is not YAML or invalid; the message names the key.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML: {error}") from error
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections")
    if folder is not None:
        raw = from_file(raw, folder)
        assert isinstance(raw, dict)
    set_dotted(raw, overrides or {}, where=where)
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{where}: {describe_error(error)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None


def set_dotted(raw: dict, values: Mapping[str, object], *, where: str) -> None:
    """Set each dotted key of ``values`` (``"build.output"``; a list item by its index,
    ``"sources.0.limit"``) in the mapping ``raw``.

    Raises:
        ConfigError: A parent of a key is there and is neither a mapping nor a list
            indexed by a number it has.
    """
    for dotted, value in values.items():
        node: dict | list = raw
        keys = dotted.split(".")
        for depth, key in enumerate(keys):
            at = ".".join(keys[:depth])
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit():
                    raise ConfigError(f"{where}: {at}: must be a mapping to set {dotted}")
                if int(key) >= len(node):
                    raise ConfigError(
                        f"{where}: {at}.{key}: no item {key} (the list has {len(node)})"
                    )
                if last:
                    node[int(key)] = value
                    break
                child = node[int(key)]
            elif last:
                node[key] = value
                break
            else:
                child = node.setdefault(key, {})
            if not isinstance(child, dict | list):
                where_key = ".".join(keys[: depth + 1])
                raise ConfigError(f"{where}: {where_key}: must be a mapping to set {dotted}")
            node = child
