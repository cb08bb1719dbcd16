"""Prompt templates read from files: bundled with a package or supplied by the user."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import jinja2

from unsafechain.domain.settings import SetupError

# StrictUndefined: a template naming a variable the caller does not pass is a bug to
# report, not a prompt to send with a silent gap in it.
_ENVIRONMENT = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def bundled_templates(package: str) -> Traversable:
    """The ``templates`` folder shipped inside ``package``."""
    return resources.files(package) / "templates"


def read_template(path: Path | Traversable) -> str:
    """The text of a template file.

    Raises:
        SetupError: The file does not exist or cannot be read.
    """
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise SetupError(f"template missing: {error.filename or path}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise SetupError(f"template {path} cannot be read: {error}") from error


def load_template(path: Path | Traversable) -> jinja2.Template:
    """A Jinja template compiled from a file; rendering fails on undefined variables.

    Raises:
        SetupError: The file does not exist or is not a valid template.
    """
    text = read_template(path)
    try:
        return _ENVIRONMENT.from_string(text)
    except jinja2.TemplateSyntaxError as error:
        raise SetupError(f"template {path} is not valid Jinja: {error}") from error
