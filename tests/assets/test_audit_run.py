"""The nightly run fails closed on a rolled-back audit trail (CoP 12, 23d; Govt response rec. 1).

The real Dagster job on a real encrypted store: an insider deletes the newest audit entries;
the next run must refuse before it touches data and keep refusing, until the governance lead
records the breach and the decision; then a clean run verifies and shows the break.
"""

from __future__ import annotations

import csv
import json

from click.testing import CliRunner

from assets.runner import run_nightly
from safehaven.cli.main import main
from safehaven.core import audit
from safehaven.core.audit import TABLE
from safehaven.core.home import Home
from safehaven.core.keys import VAULT, KeyRing
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.share import review
from safehaven.tools import synthetic
from tests.governance_helpers import adopt_project_agreements, approve_release

PATIENTS = 150


def _cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _last_seq(home: Home) -> int:
    with Store(home).connect(read_only=True) as con:
        return con.execute(f"SELECT max(seq) FROM {TABLE}").fetchone()[0]


def _runs_recorded(home: Home) -> int:
    with Store(home).connect(read_only=True) as con:
        return sum(1 for e in audit.entries_for(con) if e.action == audit.RUN_ACTION)


def _waiting(home: Home) -> int:
    return sum(1 for p in home.incoming.rglob("*") if p.is_file())


def test_a_rolled_back_trail_blocks_the_nightly_run_until_a_decision_is_recorded(home: Home, dagster_instance) -> None:
    synthetic.generate(home.incoming, patients=PATIENTS, seed=5)
    adopt_project_agreements(home)
    ok, stages = run_nightly(home, dagster_instance)
    assert ok, [s for s in stages if s.checks_failed]
    night = _runs_recorded(home)  # a night's runs: each collection's intake, then the nightly job
    assert night == 5

    # the head goes out with the publication and with every row of the public release register
    with Store(home).connect() as con:  # the prepared releases are reviewed and leave
        for request in review.requests(con, states=review.AWAITING_REVIEW):
            approve_release(con, request.release_id, home, registry=ContractRegistry())
    last = _last_seq(home)
    published = json.loads((home.published / "release.json").read_text())["audit_head"]
    assert 0 < published["seq"] <= last and len(published["entry_hash"]) == 64
    with open(home.registers / "data_release_register.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(int(r["audit_head_seq"]) > 0 and len(r["audit_head_hash"]) == 64 for r in rows)
    assert _cli("audit", "verify").exit_code == 0

    with Store(home).connect() as con:  # the insider deletes the newest three entries
        con.execute(f"DELETE FROM {TABLE} WHERE seq > ?", [last - 3])
    synthetic.generate(home.incoming, patients=PATIENTS, seed=6)
    waiting = _waiting(home)
    for _ in range(2):  # refused, and still refused the next night
        ok, _stages = run_nightly(home, dagster_instance)
        assert not ok
        assert _waiting(home) == waiting, "the refused run must not land anything"
        assert _last_seq(home) == last - 3, "the refused run must not append to the broken trail"
    result = _cli("audit", "verify")
    assert result.exit_code == 1 and f"first bad entry: seq {last - 2}" in result.output

    keyring = KeyRing(home.keys)
    if not keyring.exists(VAULT):
        keyring.create_keypair(VAULT)
    resolved = _cli("audit", "resolve", "--decision", "three entries deleted; SIRO informed; resume")
    assert resolved.exit_code == 0, resolved.output

    ok, stages = run_nightly(home, dagster_instance)
    assert ok, [s for s in stages if s.checks_failed]
    assert _waiting(home) == 0
    verified = _cli("audit", "verify")
    assert verified.exit_code == 0, verified.output
    assert f"chain broken at entries {last - 2}-" in verified.output
    assert _runs_recorded(home) == 2 * night  # the first night and the clean one; the refused runs recorded nothing
