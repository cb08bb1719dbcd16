"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from unsafechain.demo.standins import StandinModels, build_standin_models
from unsafechain.runtime.logs import THIRD_PARTY_LOGGERS


@pytest.fixture(scope="session")
def standin_models(tmp_path_factory: pytest.TempPathFactory) -> StandinModels:
    """Tiny real generator, judge and corrector, trained once per test session (~30 s)."""
    return build_standin_models(tmp_path_factory.mktemp("standins"))


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo the command line's logging set-up (tests that call ``main`` in-process): it
    replaces the root handlers and quiets the libraries' loggers."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in THIRD_PARTY_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, previous in levels.items():
        logging.getLogger(name).setLevel(previous)
