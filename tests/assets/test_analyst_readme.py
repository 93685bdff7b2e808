"""The README's analyst examples run as written, and published.duckdb documents itself."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from assets.runner import run_nightly
from safehaven.core.home import Home
from safehaven.tools import synthetic
from tests.conftest import with_vault_keys
from tests.governance_helpers import adopt_project_agreements

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def readme_commands(section: str) -> list[str]:
    """The shell commands of the first ``sh`` block under a README heading (indented lines continue one)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(rf"### {section}\n.*?```sh\n(.*?)```", text, re.S)
    assert block, f"README has no sh block under {section!r}"
    commands: list[str] = []
    for line in block.group(1).splitlines():
        if line.startswith(" ") and commands:
            commands[-1] += "\n" + line
        elif line.strip():
            commands.append(line)
    return commands


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Home:
    root = tmp_path_factory.mktemp("analyst")
    home = with_vault_keys(Home(root / "haven").ensure())  # set up by the key custodian
    synthetic.generate(home.incoming, patients=300, seed=11)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEHAVEN_HOME", str(home.root))
        adopt_project_agreements(home)
        ok, _ = run_nightly(home)
    assert ok
    return home


@pytest.mark.slow
def test_the_readme_query_examples_run_as_written(published: Home) -> None:
    commands = readme_commands("Query the outputs")
    assert any(c.startswith(".venv/bin/duckdb") for c in commands), "the DuckDB CLI example is in the README"
    env = {**os.environ, "SAFEHAVEN_HOME": str(published.root), "PYTHONPATH": str(ROOT)}
    for command in commands:
        argv = shlex.split(command.replace("data/", f"{published.root}/"))
        if argv[0] == "safehaven":
            argv = [sys.executable, "-m", "safehaven.cli.main", *argv[1:]]
        elif argv[0] == ".venv/bin/duckdb":
            argv[0] = str(BIN / "duckdb")
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command}: {done.stderr}"
        assert done.stdout.strip(), command


@pytest.mark.slow
def test_published_tables_and_columns_carry_their_dictionary_as_comments(published: Home) -> None:
    with duckdb.connect(str(published.published_db), read_only=True) as con:
        tables = dict(con.execute("SELECT table_name, comment FROM duckdb_tables()").fetchall())
        columns = con.execute(
            "SELECT column_name, comment FROM duckdb_columns() WHERE table_name = 'gp_activity'"
        ).fetchall()
    assert tables["gp_activity"] and "suppressed" in tables["gp_activity"]
    described = {name: comment for name, comment in columns if comment}
    assert "people" in described and "practice_code" in described
