"""Shared fixtures: every test gets its own haven home, store and Dagster instance."""

from __future__ import annotations

from pathlib import Path

import pytest

from safehaven.home import Home
from safehaven.store import Store


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    """An empty haven home in a temporary directory, set as $SAFEHAVEN_HOME."""
    root = tmp_path / "haven"
    monkeypatch.setenv("SAFEHAVEN_HOME", str(root))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    return Home(root).ensure()


@pytest.fixture
def store(home: Home) -> Store:
    return Store(home)


def scan_for(root: Path, needles: list[bytes]) -> dict[str, list[str]]:
    """Every file under ``root`` that holds any needle in its plain bytes (path -> needles)."""
    hits: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found = [n.decode() for n in needles if n in data]
            if found:
                hits[str(path)] = found
    return hits
