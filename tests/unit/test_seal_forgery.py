"""The seals hold against a forger who crafts their edit (hostile review of the objections seals).

DuckDB's ``hash`` is not keyed and can be inverted: a row's BIGINT column (``_row``,
``event_id``) can be chosen so the row keeps the hash of the row it replaces. A digest that
sums row hashes is then kept by any edit; the seals' digest is SHA-256 over the rows in order
(``safehaven.core.digests.sealed_rows_sql``), and the batch seals' MAC also covers what orders
a batch's statements. Each test is the attack that passed before, now refused.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest
import yaml

from safehaven.core import audit
from safehaven.core.days import haven_today
from safehaven.core.home import Home
from safehaven.intake import batch_seal
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import feed, register_seal
from safehaven.protect.objections import EVENTS, objectors_sql
from tests.governance_helpers import NHS
from tests.unit.feed_helpers import Haven, Template, open_haven, opt_out, refused

MASK = (1 << 64) - 1
#: the multiplier of DuckDB's MurmurHash64 finaliser, and its inverse modulo 2**64
K = 0xD6E8FEB86659FD93
K_INV = pow(K, -1, 1 << 64)
YESTERDAY = (haven_today() - timedelta(days=1)).isoformat()


def _unmurmur(h: int) -> int:
    """The BIGINT whose DuckDB hash is ``h`` (the finaliser inverted)."""
    x = h & MASK
    for _ in range(2):
        x ^= x >> 32
        x = (x * K_INV) & MASK
    x ^= x >> 32
    return x - (1 << 64) if x >= 1 << 63 else x


def forge_same_hash(con: duckdb.DuckDBPyConnection, table: str, batch: str, row: int, set_sql: str) -> None:
    """The insider's edit, SQL only: row ``row`` of ``batch`` changed by ``set_sql``, its ``_row``
    (the last column) chosen so that ``hash(t)`` of the row is unchanged."""
    where = "WHERE _batch = ? AND _row = ?"
    (target,) = con.execute(f"SELECT hash(t) FROM landing.{table} t {where}", [batch, row]).fetchone()
    con.execute(f"CREATE OR REPLACE TEMP TABLE forged AS SELECT * FROM landing.{table} {where}", [batch, row])
    con.execute(f"UPDATE forged SET {set_sql}, _row = 0")  # the hash of BIGINT 0 is 0
    (prefix,) = con.execute("SELECT hash(t) FROM forged t").fetchone()
    con.execute("UPDATE forged SET _row = ?", [_unmurmur(target ^ prefix)])
    assert con.execute("SELECT hash(t) FROM forged t").fetchone()[0] == target
    con.execute(f"DELETE FROM landing.{table} {where}", [batch, row])
    con.execute(f"INSERT INTO landing.{table} SELECT * FROM forged")


def _batch(haven: Haven, name: str) -> str:
    return haven.con.execute("SELECT batch_id FROM governance.batches WHERE file_name = ?", [name]).fetchone()[0]


def _in_force(haven: Haven, i: int) -> bool:
    found = haven.con.execute(f"SELECT count(*) FROM ({objectors_sql()}) WHERE pid = ?", [haven.pids[NHS[i]]])
    return found.fetchone()[0] == 1


def _unsound(haven: Haven) -> dict[str, str]:
    return batch_seal.sealer(haven.con, "objections", haven.home).unsound(haven.con)


def test_a_valid_row_crafted_to_keep_its_row_hash_still_breaks_the_batch_seal(haven: Haven) -> None:
    haven.drop("practice_a.csv", [opt_out(10), opt_out(11)])
    haven.run()
    batch = _batch(haven, "practice_a.csv")
    forge_same_hash(haven.con, "objections_valid", batch, 1, f"withdrawn_date = DATE '{YESTERDAY}'")
    assert "its valid rows differ from their seal" in _unsound(haven)[batch]
    haven.run()
    assert _in_force(haven, 10)
    assert "differ from their seal" in refused(haven)


def test_a_landed_row_crafted_to_keep_its_row_hash_is_not_validated(haven: Haven) -> None:
    haven.drop("practice_a.csv", [opt_out(10)])
    haven.land()
    batch = _batch(haven, "practice_a.csv")
    forge_same_hash(haven.con, "objections", batch, 1, f"withdrawn_date = '{YESTERDAY}'")
    haven.run()
    assert haven.con.execute(f"SELECT count(*) FROM {EVENTS}").fetchone()[0] == 3  # small_haven's three only
    assert "its landed rows differ from their seal" in refused(haven)


def test_an_event_changed_in_place_with_sql_breaks_the_register_seal(haven: Haven) -> None:
    """The register's digest is SHA-256 over its events in order: a withdrawal set on an event, its
    event number and time nudged (what kept the old sum of row hashes), is seen."""
    haven.drop("practice_a.csv", [opt_out(10), opt_out(11)])
    haven.run()
    pid = haven.pids[NHS[10]]
    haven.con.execute(
        f"UPDATE {EVENTS} SET withdrawn_date = DATE '{YESTERDAY}', registered_at = registered_at + INTERVAL 1 "
        "MICROSECOND, event_id = event_id + 1000 WHERE pid = ?",
        [pid],
    )
    assert register_seal.problem(haven.con, haven.home) is not None
    haven.run()
    assert "differs from its last seal" in refused(haven)


def test_a_seal_made_in_the_old_digest_form_is_checked_in_it_and_sealed_again_in_the_new_one(haven: Haven) -> None:
    haven.drop("practice_a.csv", [opt_out(10)])
    haven.run()
    old = register_seal.state(haven.con, form=register_seal.LEGACY_FORM)
    legacy = {"rows": old.rows, "last_event": old.last_event, "digest": old.digest}  # no digest_form: before it
    audit.append(haven.con, actor="x", role="pipeline", action=register_seal.SEALED, object=EVENTS, detail=legacy)
    assert register_seal.problem(haven.con, haven.home) is None
    haven.run()  # the register step seals it again, in the SHA-256 form
    assert register_seal.last_seal(haven.con, haven.home) == register_seal.state(haven.con)
    assert register_seal.last_seal(haven.con, haven.home).form == register_seal.DIGEST_FORM


def test_two_batches_whose_landing_order_was_swapped_break_their_seals(haven: Haven) -> None:
    """Events are numbered in landing order and the latest statement wins: swapping two batches'
    landing and arrival times would make an older withdrawal win. Both are in the seal's MAC."""
    haven.drop("optouts_d1.csv", [opt_out(21)])
    assert haven.run()
    haven.drop("z_0100.csv", [[NHS[21], "national_opt_out", "2024-03-01", "2024-06-01", ""]])
    time.sleep(0.05)
    haven.drop("a_0200.csv", [opt_out(21), opt_out(22)])
    haven.land()
    haven.validate()
    (first, l1, a1), (second, l2, a2) = haven.con.execute(
        "SELECT batch_id, landed_at, arrived_at FROM governance.batches "
        "WHERE file_name IN ('z_0100.csv', 'a_0200.csv') ORDER BY landed_at"
    ).fetchall()
    swap = "UPDATE governance.batches SET landed_at = ?, arrived_at = ? WHERE batch_id = ?"
    haven.con.execute(swap, [l2, a2, first])
    haven.con.execute(swap, [l1, a1, second])
    assert {first, second} <= set(_unsound(haven))
    haven.run()
    assert _in_force(haven, 21)
    assert "batch record was changed" in refused(haven)


def test_a_batch_held_back_holds_back_the_batches_that_arrived_after_it(haven: Haven) -> None:
    """An older withdrawal made unsound for a while, then restored: a newer list saying the person
    objects, landed meanwhile, waits for it, so the newer statement is still the latest one."""
    haven.drop("night0.csv", [opt_out(21)])
    assert haven.run()
    haven.drop("night1_withdrawal.csv", [[NHS[21], "national_opt_out", "2024-03-01", "2024-06-01", ""]])
    haven.run()
    older = _batch(haven, "night1_withdrawal.csv")
    haven.con.execute(  # an edit that sat there before the register step took the batch in
        "DELETE FROM governance.objection_events WHERE _batch = ?", [older]
    )
    haven.con.execute(
        "INSERT INTO landing.objections_valid SELECT * REPLACE (99 AS _row) FROM landing.objections_valid "
        "WHERE _batch = ?",
        [older],
    )
    register_seal.reseal(haven.con, haven.home, by="Dr G", reason="events restored as the batch was")
    time.sleep(0.05)
    haven.drop("night2_objections.csv", [opt_out(21), opt_out(22)])
    haven.run()
    assert (
        haven.con.execute(  # held back behind the unsound older batch
            f"SELECT count(*) FROM {EVENTS} WHERE _batch = ?", [_batch(haven, "night2_objections.csv")]
        ).fetchone()[0]
        == 0
    )
    haven.con.execute("DELETE FROM landing.objections_valid WHERE _batch = ? AND _row = 99", [older])  # restored
    haven.run()
    assert _in_force(haven, 21)  # the newer list's statement is registered after the older withdrawal
    assert haven.pids[NHS[21]] not in haven.members(haven.release().release_id)


def test_a_restatement_whose_arrival_was_moved_is_not_registered(haven: Haven) -> None:
    haven.drop("practice_a.csv", [opt_out(10)])
    haven.run()
    haven.drop("practice_a.csv", [opt_out(10)])  # the same file sent again
    haven.land()
    haven.con.execute("UPDATE governance.objection_restatements SET arrived_at = arrived_at - INTERVAL 1 DAY")
    haven.validate()
    haven.run()
    assert haven.con.execute("SELECT count(*) FROM governance.objection_restatements WHERE registered_at IS NULL")
    message = refused(haven)
    assert "file sent again practice_a.csv@" in message and "its arrival) differs from its seal" in message


def test_accepting_a_batch_seals_every_stage_that_differs(haven: Haven) -> None:
    """A landed batch given valid rows with SQL differs at the valid stage, not the landed one: a
    person's acceptance seals that stage, and the batch is validated by the next run."""
    haven.drop("night0.csv", [opt_out(10)])
    haven.run()
    haven.drop("night1.csv", [opt_out(11)])
    haven.land()
    batch = _batch(haven, "night1.csv")
    haven.con.execute(
        "INSERT INTO landing.objections_valid SELECT * REPLACE (? AS _batch) FROM landing.objections_valid LIMIT 1",
        [batch],
    )
    assert _unsound(haven)[batch] == "its valid rows have no seal"
    done = batch_seal.accept(haven.con, "objections", batch, haven.home, by="Dr G", reason="checked with sender")
    assert done["stages"] == [batch_seal.VALID] and batch not in _unsound(haven)
    haven.run()
    status = haven.con.execute("SELECT status FROM governance.batches WHERE batch_id = ?", [batch]).fetchone()[0]
    assert status == "accepted"


def test_rows_with_no_batch_id_are_named_with_what_clears_them(haven: Haven) -> None:
    haven.drop("night0.csv", [opt_out(10)])
    haven.run()
    haven.con.execute(
        "INSERT INTO landing.objections_valid SELECT * REPLACE (NULL AS _batch) FROM landing.objections_valid"
    )
    assert "valid rows with no batch id (delete them: no decision can accept them)" in refused(haven)
    with pytest.raises(ValueError, match="no single unsound"):
        batch_seal.accept(haven.con, "objections", batch_seal.NO_BATCH, haven.home, by="Dr G", reason="x")


def test_the_faults_listing_says_when_the_seals_cannot_be_checked(
    home: Home, tmp_path: Path, template: Template
) -> None:
    from click.testing import CliRunner

    from safehaven.cli.main import main

    with open_haven(home, tmp_path, template) as haven:
        haven.drop("night0.csv", [opt_out(10)])
        haven.run()
    (home.keys / "audit.key").rename(tmp_path / "audit.key.away")  # not yet restored by its custodian
    listed = CliRunner().invoke(main, ["objections", "faults"])
    assert listed.exit_code == 0, listed.output
    assert "seals cannot be checked" in json.loads(listed.output)["batch_seal_problem"]


def test_a_contract_listing_its_fields_in_another_order_keeps_each_value_in_its_column(haven: Haven) -> None:
    """Validation writes the valid rows by column name: a contract version listing the withdrawn
    date before the recorded date does not swap them (an objection would never be in force)."""
    haven.drop("night0.csv", [opt_out(10)])
    haven.run()
    path = Path(haven.registry.root) / "collections" / "objections.yaml"
    data = yaml.safe_load(path.read_text())
    data["fields"][2], data["fields"][3] = data["fields"][3], data["fields"][2]
    data["version"] = "1.0.1"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    haven.registry = ContractRegistry(haven.registry.root)
    haven.drop("night1.csv", [opt_out(11)])
    haven.run()
    row = haven.con.execute(
        "SELECT recorded_date, withdrawn_date FROM landing.objections_valid WHERE nhs_number = ?", [NHS[11]]
    ).fetchone()
    assert str(row[0]) == "2024-03-01" and row[1] is None
    assert _in_force(haven, 11)


# --- the feed's own records: faults, their resolutions, refresh attestations ---------------


def test_a_fault_marked_resolved_with_sql_still_blocks_until_a_person_resolves_it(haven: Haven) -> None:
    folder = haven.home.incoming_for("objections")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "practice_b.csv").write_text("nhs number;objection type\n" + NHS[12] + ";national_opt_out\n")
    haven.run()
    feed.sync_faults(haven.con, haven.home)  # what every release does first
    haven.con.execute("UPDATE governance.objection_feed_faults SET resolved_at = now(), resolved_by = 'x'")
    assert "practice_b.csv" in refused(haven)  # a resolution not on record is no resolution

    assert feed.resolve(haven.con, haven.home, "practice_b.csv", by="Dr Guardian", reason="sent again by post") == 1
    assert haven.release().status == "released"


def test_a_refresh_attested_with_sql_does_not_freshen_the_register(haven: Haven) -> None:
    haven.drop("practice_a.csv", [opt_out(10)])
    haven.run()
    haven.age(40)
    feed.ensure_tables(haven.con)
    haven.con.execute("INSERT INTO governance.objection_refreshes VALUES (current_date, now(), 'x', 'forged')")
    assert "was last refreshed on" in refused(haven)
    feed.attest_refresh(
        haven.con, haven_today(), by="Dr Guardian", reason="checked against the list", today=haven_today()
    )
    assert haven.release().status == "released"


def test_rejected_rows_deleted_or_a_verdict_changed_with_sql_break_the_batch_seal(haven: Haven) -> None:
    """A batch's rejected rows are what its fault is made from, and its verdict is a fault too:
    deleting them (and the fault) or turning a refused batch into an accepted one is seen."""
    haven.drop("rows.csv", [opt_out(30), ["123", "national_opt_out", "2024-03-01", "", ""]])
    haven.run()
    batch = _batch(haven, "rows.csv")
    feed.sync_faults(haven.con, haven.home)
    haven.con.execute("DELETE FROM landing.objections_rejected WHERE _batch = ?", [batch])
    haven.con.execute("DELETE FROM governance.objection_feed_faults WHERE sha256 = ?", [batch])
    haven.con.execute("UPDATE governance.batches SET status = 'accepted', invalid_rows = 0 WHERE batch_id = ?", [batch])
    assert "its valid rows differ from their seal" in _unsound(haven)[batch]
    assert "rows.csv" in refused(haven)


@pytest.mark.parametrize("edit", ["level", "members"])
def test_a_request_whose_level_or_members_were_edited_is_not_delivered(haven: Haven, edit: str) -> None:
    """Delivery re-checks objections against the request's members at its level (record level):
    making it anonymised, or deleting its members, with SQL would skip an opt-out since; both are
    audited at preparation and checked."""
    from safehaven.context import Haven as Context
    from safehaven.share import review
    from safehaven.share.releases import PREPARED, prepare
    from tests.governance_helpers import adopt, approve_release

    adopt(haven.con, haven.registry, haven.agreement)
    context = Context.open(haven.home, contracts=haven.registry, keyring=haven.keyring)
    result = prepare(haven.con, haven.agreement, haven=context)
    assert result.status == PREPARED
    if edit == "level":
        haven.con.execute(f"UPDATE {review.REQUESTS} SET identifiability = 'anonymised'")
    else:
        haven.con.execute(f"DELETE FROM {review.REQUEST_MEMBERS}")
    with pytest.raises(review.ReviewError, match=f"{'level' if edit == 'level' else 'members'} of"):
        approve_release(haven.con, result.release_id, haven.home, registry=haven.registry)


def test_a_batch_deleted_whole_before_it_was_registered_blocks_until_restored_or_its_loss_is_accepted(
    haven: Haven,
) -> None:
    """Its rows, its batch record and its seals deleted with SQL: nothing in the store is left to
    differ from a seal, but the audit trail records that it landed."""
    haven.drop("practice_a.csv", [opt_out(10)])
    haven.run()
    haven.drop("practice_b.csv", [opt_out(11)])
    haven.land()
    batch = _batch(haven, "practice_b.csv")
    _delete_whole(haven, batch)
    haven.run()
    assert not _in_force(haven, 11)
    assert "is gone from the store: restore the store from a backup" in refused(haven)
    done = batch_seal.accept(haven.con, "objections", batch, haven.home, by="Dr G", reason="re-sent in a later file")
    assert done["stages"] == [batch_seal.LOST]
    assert haven.release().status == "released"


def test_a_landing_a_crash_left_unaudited_is_audited_by_the_next_landing_step_so_its_deletion_is_refused(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed between a landing's commit and its ``objections.batch_landed`` entry leaves a
    batch the trail does not know of; deleted whole after that, nothing would say it existed. The
    next landing step of the collection audits it, so its loss is refused."""
    haven.drop("practice_a.csv", [opt_out(10)])
    haven.run()
    batch = _crash_landing(haven, monkeypatch, "practice_b.csv", 11)
    assert haven.land().landings_audited_late == 1  # the next intake run of the collection, nothing new
    assert haven.land().landings_audited_late == 0
    _delete_whole(haven, batch)
    haven.run()
    assert not _in_force(haven, 11)
    assert "is gone from the store: restore the store from a backup" in refused(haven)


def _delete_whole(haven: Haven, batch: str) -> None:
    """Delete ``batch`` from the store as an insider would: its rows, its batch record, its seals."""
    for table, column in (("landing.objections", "_batch"), ("governance.batches", "batch_id"),
                          (batch_seal.TABLE, "batch_id")):  # fmt: skip
        haven.con.execute(f"DELETE FROM {table} WHERE {column} = ?", [batch])


def _crash_landing(haven: Haven, monkeypatch: pytest.MonkeyPatch, name: str, i: int) -> str:
    """Land ``name`` as a run killed between the landing's commit and its audit entry leaves it."""
    haven.drop(name, [opt_out(i)])
    with monkeypatch.context() as killed:
        killed.setattr(batch_seal.Sealer, "record_landed", lambda *_: True)
        haven.land()
    return _batch(haven, name)


def _landed_entries(haven: Haven) -> dict[str, dict]:
    return {e.fields.get("batch"): e.fields for e in audit.authentic_entries(haven.con, [batch_seal.LANDED_ACTION])}


def test_a_batch_tampered_with_before_the_next_landing_step_is_still_put_on_record(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Making the unaudited batch unsound for a while (any stored macro makes every batch unsound)
    does not keep it off the record: deleted whole later, its loss is refused (found by review)."""
    haven.drop("practice_a.csv", [opt_out(10)])
    haven.run()
    batch = _crash_landing(haven, monkeypatch, "practice_b.csv", 11)
    haven.con.execute("CREATE MACRO store.main.nothing() AS 1")
    haven.land()
    assert batch in _landed_entries(haven)
    haven.con.execute("DROP MACRO store.main.nothing")
    _delete_whole(haven, batch)
    haven.run()
    assert "is gone from the store: restore the store from a backup" in refused(haven)


def test_a_late_entry_carries_no_count_from_the_unsealed_batch_record(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch register's ``rows`` is not sealed: the late entry does not repeat it (found by review)."""
    batch = _crash_landing(haven, monkeypatch, "practice_a.csv", 10)
    haven.con.execute("UPDATE governance.batches SET rows = 777777 WHERE batch_id = ?", [batch])
    haven.land()
    assert _landed_entries(haven)[batch] == {"batch": batch, "recorded": "late"}


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE governance.batches SET rows = 4000000000 WHERE file_name = 'practice_a.csv'",
        "INSERT INTO governance.batches (batch_id, collection, file_name, rows, landed_at, status) "
        "VALUES ('batch 1234567890', 'objections', 'x.csv', 1, now(), 'whatever')",
    ],
    ids=["ten-digit count", "ten-digit batch id"],
)
def test_an_odd_batch_record_never_fails_the_landing_step(
    haven: Haven, monkeypatch: pytest.MonkeyPatch, edit: str
) -> None:
    """A record the audit trail's identifier guard would refuse made the step raise before landing
    anything, in every run, with releases still going out (found by review): the next file lands."""
    _crash_landing(haven, monkeypatch, "practice_a.csv", 10)
    haven.con.execute(edit)
    haven.drop("practice_b.csv", [opt_out(11)])
    assert haven.land().files_landed == 1


def test_a_trail_that_does_not_verify_is_tried_once_for_all_unrecorded_batches(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One append for every batch to record, so a trail that does not verify costs one check, not one
    per batch (found by review); nothing is recorded and the step goes on."""
    for i in range(3):
        _crash_landing(haven, monkeypatch, f"practice_{i}.csv", 10 + i)
    haven.con.execute(f"UPDATE {audit.TABLE} SET detail = '{{}}' WHERE seq = (SELECT max(seq) FROM {audit.TABLE})")
    calls: list[int] = []
    verify = audit.verify
    monkeypatch.setattr(audit, "verify", lambda *a, **k: calls.append(1) or verify(*a, **k))
    assert haven.land().landings_audited_late == 0
    assert len(calls) == 1


def test_a_landing_whose_audit_entry_the_trail_refuses_stands_and_is_counted(haven: Haven) -> None:
    """A file never fails the stage: the landing is committed before its entry; with a trail that
    does not verify, the entry is refused, the batch stays landed, and releases are refused anyway."""
    haven.drop("practice_a.csv", [opt_out(10)])
    haven.run()
    haven.con.execute(f"UPDATE {audit.TABLE} SET detail = '{{}}' WHERE seq = (SELECT max(seq) FROM {audit.TABLE})")
    haven.drop("practice_b.csv", [opt_out(11)])
    report = haven.land()
    assert report.files_landed == 1 and report.landings_unaudited == 1
    assert _batch(haven, "practice_b.csv")
    with pytest.raises(Exception, match="audit trail"):
        haven.release()


@pytest.mark.parametrize("status", ["disposed", "quarantined", "held 9990000115", None])
def test_a_landed_batch_given_another_status_is_refused_not_silently_never_validated(haven: Haven, status: str) -> None:
    """A landed objections batch set to a status neither stage checks (found while reviewing the
    late entries): validation takes only landed batches, so its objection would never be in force."""
    haven.drop("practice_a.csv", [opt_out(10)])
    haven.run()
    haven.drop("practice_b.csv", [opt_out(11)])
    haven.land()
    batch = _batch(haven, "practice_b.csv")
    haven.con.execute("UPDATE governance.batches SET status = ? WHERE batch_id = ?", [status, batch])
    haven.run()
    assert not _in_force(haven, 11)
    assert "its status was changed outside the haven to one no objections batch can have" in _unsound(haven)[batch]
    message = refused(haven)
    assert "no objections batch can have" in message and str(status) not in message
    haven.con.execute("UPDATE governance.batches SET status = 'landed' WHERE batch_id = ?", [batch])
    haven.run()
    assert _in_force(haven, 11)
    assert haven.release().status == "released"
