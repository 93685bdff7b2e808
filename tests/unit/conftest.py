"""Fixtures of the objection feed's tests (``tests.unit.feed_helpers``): a small haven built once per
module and copied into each test's home. A module that needs another haven defines its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from safehaven.core.home import Home
from tests.unit.feed_helpers import Haven, Template, open_haven, small_haven_template


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """The small haven every test starts from, built once for the module (``open_haven`` copies it)."""
    return small_haven_template(tmp_path_factory.mktemp("small_haven"))


@pytest.fixture
def haven(home: Home, tmp_path: Path, template: Template) -> Iterator[Haven]:
    with open_haven(home, tmp_path, template) as opened:
        yield opened
