"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import pytest

from unsafechain.demo.standins import StandinModels, build_standin_models


@pytest.fixture(scope="session")
def standin_models(tmp_path_factory: pytest.TempPathFactory) -> StandinModels:
    """Tiny real generator, judge and corrector, trained once per test session (~30 s)."""
    return build_standin_models(tmp_path_factory.mktemp("standins"))
