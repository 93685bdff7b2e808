"""The domain reads no environment: the CLI and the Dagster resource read the variables and pass
the home and the contracts in (issue 13; ``docs/architecture.md`` "The rooms")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from resources.haven import SafeHavenResource
from safehaven.cli.common import home_from_env, home_root_from_env
from safehaven.core.home import DEFAULT_HOME, Home

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = ["core", "intake", "protect", "share", "publish", "dispose"]
READS = re.compile(r"os\.environ|getenv|environ\.get|os\.putenv")
#: the GX analytics switch: GX reads it at import time and the haven turns it off (not a setting)
GX_SWITCH = {
    ("safehaven/intake/gx_quiet.py", line)
    for line in (
        'if os.environ.get("GX_ANALYTICS_ENABLED") != "False":  # written once: each module importing GX calls this',
        'os.environ["GX_ANALYTICS_ENABLED"] = "False"',
    )
}
#: the SQL gate names DuckDB's getenv() among the functions refused in output SQL (not a read)
SQL_GATE = "safehaven/publish/sql_gate.py"


def _reads(rel: str, line: str) -> bool:
    """A line that could read the environment (the SQL gate's quoted function names are not)."""
    if rel == SQL_GATE:
        line = line.replace('"getenv"', "").replace("``getenv``", "")
    return bool(READS.search(line))


def test_the_domain_packages_read_no_environment_variable() -> None:
    found = {
        (rel, line.strip())
        for package in DOMAIN
        for path in sorted((ROOT / "safehaven" / package).rglob("*.py"))
        for rel in [path.relative_to(ROOT).as_posix()]
        for line in path.read_text(encoding="utf-8").splitlines()
        if _reads(rel, line)
    }
    assert found == GX_SWITCH
    assert not hasattr(Home, "from_env")


def test_the_home_is_named_at_the_edges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEHAVEN_HOME", str(tmp_path / "haven"))
    assert home_root_from_env() == (tmp_path / "haven").resolve() == home_from_env().root
    assert SafeHavenResource().home_dir().root == (tmp_path / "haven").resolve()
    assert SafeHavenResource(home=str(tmp_path / "other")).home_dir().root == (tmp_path / "other").resolve()
    monkeypatch.delenv("SAFEHAVEN_HOME")
    monkeypatch.chdir(tmp_path)
    assert home_root_from_env() == (tmp_path / DEFAULT_HOME).resolve() == SafeHavenResource().home_dir().root
