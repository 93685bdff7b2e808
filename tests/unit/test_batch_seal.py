"""Objections batches are sealed where their rows are written (``safehaven.intake.batch_seal``).

Someone holding the store key, not the audit key, edits the landed objections rows the register is
built from. Each test is one such edit on a small haven whose objections arrive as real files
through real ingest, validation and the register step (``tests.unit.feed_helpers``): the edited
rows never reach the register, every record-level release is refused with a reason naming the
batch, and the refusal stands until the rows are restored or a person decides (audited).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from safehaven.core import audit
from safehaven.core.days import haven_today
from safehaven.core.home import Home
from safehaven.intake import batch_seal
from safehaven.protect import feed, register_seal
from safehaven.protect.objections import EVENTS
from tests.governance_helpers import NHS
from tests.unit.feed_helpers import Haven, open_haven, opt_out, refused

COLLECTION = "objections"


@pytest.fixture
def haven(home: Home, tmp_path: Path) -> Iterator[Haven]:
    with open_haven(home, tmp_path) as opened:
        yield opened


def _batch(haven: Haven, name: str) -> str:
    return haven.con.execute(
        "SELECT batch_id FROM governance.batches WHERE collection = ? AND file_name = ?", [COLLECTION, name]
    ).fetchone()[0]


def _forge_withdrawal(haven: Haven, batch: str, row: int = 99) -> None:
    """The insider's edit: the batch's first valid row again, withdrawn on 1 April 2024."""
    haven.con.execute(
        "INSERT INTO landing.objections_valid SELECT nhs_number, objection_type, recorded_date, DATE '2024-04-01', "
        "source_practice, _batch, ? FROM landing.objections_valid WHERE _batch = ? AND _row = 1",
        [row, batch],
    )


def _withdrawals(haven: Haven) -> int:
    return haven.con.execute(f"SELECT count(*) FROM {EVENTS} WHERE withdrawn_date = DATE '2024-04-01'").fetchone()[0]


def _released(haven: Haven) -> str:
    return haven.release().status


def test_a_withdrawal_forged_into_a_landed_batch_is_never_registered_until_a_person_accepts_it(haven: Haven) -> None:
    haven.drop("practice_a.csv", [opt_out(10), opt_out(11)])
    haven.run()
    batch = _batch(haven, "practice_a.csv")
    _forge_withdrawal(haven, batch)
    for _ in range(2):  # the run after the edit, and a later one
        haven.run()
        assert _withdrawals(haven) == 0
        message = refused(haven)
        assert f"batch {batch[:12]} (practice_a.csv)" in message and "differ from their seal" in message
        assert "safehaven objections accept-batch" in message and NHS[10] not in message
    assert register_seal.problem(haven.con, haven.home) is None  # the register itself was not touched
    done = batch_seal.accept(haven.con, COLLECTION, batch[:16], haven.home, by="Dr Guardian", reason="sender confirmed")
    assert done["batch"] == batch and done["stages"] == [batch_seal.VALID]
    haven.run()
    # dated before the register learnt the objection it ends: stale, held for a second decision
    [held] = [h for h in register_seal.held_withdrawals(haven.con) if "batch" in h]
    assert held["batch"] == batch and _withdrawals(haven) == 0
    contract = haven.registry.objections()
    register_seal.apply_held_withdrawals(haven.con, contract, batch, "", haven.home, by="Dr Guardian", reason="ok")
    assert _withdrawals(haven) == 1  # the person's decisions, and only then
    assert _released(haven) == "released"
    [entry] = [e for e in audit.entries_for(haven.con) if e.action == batch_seal.ACCEPTED]
    assert entry.actor == "Dr Guardian" and entry.detail_value["batch"] == batch


def test_rows_edited_with_their_digest_recomputed_still_fail_the_seal_without_the_audit_key(haven: Haven) -> None:
    haven.drop("practice_a.csv", [opt_out(10)])
    haven.run()
    batch = _batch(haven, "practice_a.csv")
    _forge_withdrawal(haven, batch)
    rows, digest = batch_seal.Sealer(COLLECTION, b"not the key").digests(haven.con, batch_seal.VALID, [batch])[batch]
    haven.con.execute(
        f"UPDATE {batch_seal.TABLE} SET rows = ?, digest = ? WHERE batch_id = ? AND stage = ?",
        [rows, digest, batch, batch_seal.VALID],
    )
    haven.run()
    assert _withdrawals(haven) == 0
    assert "seal does not verify under the audit key" in refused(haven)


def test_a_batch_forged_with_its_own_batch_record_is_never_registered(haven: Haven) -> None:
    haven.drop("practice_a.csv", [opt_out(10)])
    haven.run()
    haven.con.execute(
        "INSERT INTO governance.batches (batch_id, collection, file_name, landed_at, status, validated_at) "
        "VALUES ('f0f0f0f0f0f0f0f0', 'objections', 'forged.csv', now(), 'accepted', now())"
    )
    haven.con.execute(
        "INSERT INTO landing.objections_valid SELECT nhs_number, objection_type, recorded_date, DATE '2024-04-01', "
        "source_practice, 'f0f0f0f0f0f0f0f0', 1 FROM landing.objections_valid LIMIT 1"
    )
    haven.run()
    assert _withdrawals(haven) == 0
    message = refused(haven)
    assert "batch f0f0f0f0f0f0 (forged.csv): its valid rows have no seal" in message


def test_a_landed_batch_edited_before_validation_waits_and_restoring_it_clears_the_refusal(haven: Haven) -> None:
    haven.drop("practice_a.csv", [opt_out(10)])
    haven.land()
    batch = _batch(haven, "practice_a.csv")
    haven.con.execute("UPDATE landing.objections SET withdrawn_date = '2024-04-01' WHERE _batch = ?", [batch])
    report = haven.validate()
    assert list(report.batches_unsound) == [batch] and "landed rows differ" in report.batches_unsound[batch]
    status = haven.con.execute("SELECT status FROM governance.batches WHERE batch_id = ?", [batch]).fetchone()[0]
    assert status == "landed"
    assert "differ from their seal" in refused(haven)
    haven.con.execute("UPDATE landing.objections SET withdrawn_date = NULL WHERE _batch = ?", [batch])  # restored
    haven.run()
    assert _withdrawals(haven) == 0
    assert not any(e.action == batch_seal.ACCEPTED for e in audit.entries_for(haven.con))
    assert _released(haven) == "released"


def test_an_event_stating_a_forged_row_is_not_sealed_as_a_runs_leftover(haven: Haven) -> None:
    haven.drop("practice_a.csv", [opt_out(10)])
    haven.run()
    batch = _batch(haven, "practice_a.csv")
    _forge_withdrawal(haven, batch)
    haven.con.execute(  # and the event the register step would have appended for it, as if a run stopped
        f"INSERT INTO {EVENTS} SELECT max(event_id) + 1, ?, 'national_opt_out', DATE '2024-03-01', "
        f"DATE '2024-04-01', NULL, ?, 99, now(), '' FROM {EVENTS}",
        [haven.pids[NHS[10]], batch],
    )
    haven.run()
    assert register_seal.problem(haven.con, haven.home) is not None  # not sealed over
    assert "differs from its last seal" in refused(haven)


def test_a_haven_made_before_batch_seals_seals_its_batches_once_as_they_stood(haven: Haven) -> None:
    assert feed.feed_problems(haven.con, haven.home, haven_today(), feed.DEFAULT_WINDOW_DAYS) == []
    [started] = [e for e in audit.entries_for(haven.con) if e.action == batch_seal.STARTED]
    assert started.detail_value == {"batches_sealed_as_they_stood": 1}
    haven.con.execute(f"DELETE FROM {batch_seal.TABLE}")  # the seals removed: never sealed again by themselves
    message = refused(haven)
    assert "(no batch)" not in message and "its valid rows have no seal" in message
    assert [e.action for e in audit.entries_for(haven.con)].count(batch_seal.STARTED) == 1


def test_a_function_stored_in_the_store_makes_every_batch_unsound(haven: Haven) -> None:
    haven.drop("practice_a.csv", [opt_out(10)])
    haven.run()
    haven.con.execute("CREATE MACRO store.main.weigh(x) AS x")
    haven.run()
    assert "the store holds a function of its own" in refused(haven)


def test_the_faults_listing_names_an_unsound_batch_and_accept_batch_records_the_decision(
    home: Home, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from safehaven.cli.main import main

    with open_haven(home, tmp_path) as haven:
        haven.drop("practice_a.csv", [opt_out(10)])
        haven.run()
        batch = _batch(haven, "practice_a.csv")
        _forge_withdrawal(haven, batch)
    runner = CliRunner()
    listed = json.loads(runner.invoke(main, ["objections", "faults"]).output)
    assert listed["batches_unsound"] == [
        {"batch": batch, "why": "its valid rows differ from their seal (2 rows now, 1 sealed)"}
    ]
    short = runner.invoke(main, ["objections", "accept-batch", batch[:8], "--by", "Dr G", "--reason", "checked"])
    assert short.exit_code != 0 and "no single unsound objections batch" in short.output
    done = runner.invoke(
        main, ["objections", "accept-batch", batch[:16], "--by", "Dr G", "--reason", "sender confirmed"]
    )
    assert done.exit_code == 0 and '"audited": true' in done.output, done.output
    listed = json.loads(runner.invoke(main, ["objections", "faults"]).output)
    assert listed["batches_unsound"] == [] and listed["batch_seal_problem"] is None
