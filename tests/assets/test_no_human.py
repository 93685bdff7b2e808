"""The nightly run needs nobody (issue 17): hostile files are quarantined with their rule ids
while the same run publishes the other collections, and a reader holding the store when the
run starts makes the run wait, not fail. Entries the haven cannot read may be objections files,
so record-level releases wait for a person's decision on them (review 57: fail closed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from assets import keys
from assets.runner import run_nightly
from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.protect import feed
from safehaven.tools import synthetic
from tests.governance_helpers import adopt_project_agreements

ROOT = Path(__file__).resolve().parents[2]
PATIENTS = 300
TEN_MB = 10 * 1024 * 1024

HOLD = """
import sys, time
from pathlib import Path
from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.core.store import Store
with Store(Home(Path(sys.argv[1]))).connect(read_only=True) as con:
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold_store(home: Home, seconds: float) -> subprocess.Popen:
    """A second process (e.g. ``safehaven audit verify``) holding the store read-only."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(home.root), str(seconds)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    return proc


def _hostile(home: Home, outside: Path) -> dict[str, str]:
    """Place each hostile entry of the issue; returns quarantined name -> expected rule."""
    gp = home.incoming_for("gp_events")
    (gp / "gp_one_line.csv").write_bytes(b"x" * TEN_MB)
    (gp / "passwd.csv").symlink_to("/etc/passwd")
    outside.mkdir()
    valid = next(home.incoming_for("hospital_episodes").glob("*.csv"))
    (outside / "hes_copy.csv").write_bytes(valid.read_bytes())
    (home.incoming_for("hospital_episodes") / "hes_link.csv").symlink_to(outside / "hes_copy.csv")
    return {
        "gp_events/gp_one_line.csv": "file.line_too_long",
        "gp_events/passwd.csv": "file.not_regular",
        "hospital_episodes/hes_link.csv": "file.not_regular",
    }


def test_hostile_files_are_quarantined_and_a_reader_is_waited_for_while_the_run_publishes(
    home: Home, dagster_instance, tmp_path: Path
) -> None:
    synthetic.generate(home.incoming, patients=PATIENTS, seed=11)
    adopt_project_agreements(home)
    expected = _hostile(home, tmp_path / "outside")
    outside = tmp_path / "outside" / "hes_copy.csv"
    outside_before = outside.read_bytes()
    with Store(home).connect():
        pass  # the store exists (as on any night after the first)
    holder = _hold_store(home, 8)  # e.g. `safehaven audit verify`, holding the store as the run starts

    ok, stages = run_nightly(home, dagster_instance)

    assert holder.wait(timeout=60) == 0
    # the entries the haven cannot read may be objections files: the objection feed's blocking check
    # fails on them (record-level releases wait for a person), and nothing else does (review 57)
    assert not ok
    assert {s.asset: s.checks_failed for s in stages if s.checks_failed} == {
        "governance/objection_feed": ["objections_feed_complete"],
        "governance__objection_feed (step)": ["step failed"],
    }
    with Store(home).connect(read_only=True) as con:
        assert sorted(f.file_name for f in feed.unresolved(con)) == ["gp_one_line.csv", "hes_link.csv", "passwd.csv"]
    for name, rule in expected.items():
        reason = json.loads((home.quarantine / f"{name}.reason.json").read_text())
        assert reason["rule"] == rule, name
    assert not [p for p in home.incoming.rglob("*") if os.path.lexists(p) and not p.is_dir()]
    assert outside.read_bytes() == outside_before, "a link's target outside the home is not shredded"
    for output in ("gp_activity", "hospital_admissions", "social_care_users", "discharge_to_social_care"):
        assert (home.published / f"{output}.csv").exists()
    rows = {s.asset: s.rows_in for s in stages}
    assert all(rows[keys.landing(c).to_user_string()] > 0 for c in ("gp_events", "hospital_episodes"))
