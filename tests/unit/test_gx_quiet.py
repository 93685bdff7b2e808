"""Great Expectations is imported quiet (``safehaven.intake.gx_quiet``): analytics off and its
records kept from every handler, whichever of the haven's modules a process imports first."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from safehaven.intake import gx_quiet

ROOT = Path(__file__).resolve().parents[2]


def _in_a_new_process(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing of Great Expectations imported yet); its output."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_gx_is_made_quiet_without_writing_the_environment_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second call (each module that imports GX makes one) finds the variable set and writes
    nothing: the environment is written once."""
    writes: list[str] = []

    class Environ(dict):
        def __setitem__(self, key: str, value: str) -> None:
            writes.append(key)
            super().__setitem__(key, value)

    monkeypatch.setattr(gx_quiet.os, "environ", Environ())
    gx_quiet.apply()
    gx_quiet.apply()
    assert writes == ["GX_ANALYTICS_ENABLED"]
    assert gx_quiet.os.environ["GX_ANALYTICS_ENABLED"] == "False"


def _importing_gx() -> list[str]:
    """The haven's modules that import Great Expectations at their top."""
    found = []
    for path in sorted((ROOT / "safehaven").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        if any(line.startswith(("import great_expectations", "from great_expectations")) for line in lines):
            found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


@pytest.mark.parametrize("module", _importing_gx())
def test_every_module_that_imports_gx_makes_it_quiet_first(module: str) -> None:
    """Whichever of them a process imports first (validation imports ``expectations`` before
    ``gx_duckdb``: found by re-reading), Great Expectations is imported with analytics off and its
    records kept from every handler (``safehaven.intake.gx_quiet``)."""
    out = _in_a_new_process(
        "import logging, os, sys\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'great_expectations':\n"
        "            logger = logging.getLogger('great_expectations')\n"
        "            print(os.environ.get('GX_ANALYTICS_ENABLED'), logger.propagate, logger.level)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Watch())\n"
        f"import {module}\n"
    )
    assert out == f"False False {logging.CRITICAL}"
