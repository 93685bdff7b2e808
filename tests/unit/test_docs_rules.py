"""``docs/rules.md`` names, for each rule, the one function that enforces it and the test that proves
it (issue 13): every name it gives must exist, so the table cannot rot as code moves."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RULES = (ROOT / "docs" / "rules.md").read_text()


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` is a module, or an attribute path under the longest importable module."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(found, name):
                return False
            found = getattr(found, name)
        return True
    return False


def test_every_test_the_rules_name_exists() -> None:
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)", RULES))
    assert len(named) > 20, "the rules name their tests as path::test_name"
    missing = [
        f"{path}::{name}"
        for path, name in sorted(named)
        if not (ROOT / path).is_file() or not re.search(rf"^def {name}\b", (ROOT / path).read_text(), re.M)
    ]
    assert missing == []


def test_every_function_the_rules_name_exists() -> None:
    named = set(re.findall(r"`((?:safehaven|assets|resources)(?:\.\w+)+)`", RULES))
    assert len(named) > 20, "the rules name their functions by dotted path"
    assert [dotted for dotted in sorted(named) if not _resolves(dotted)] == []
