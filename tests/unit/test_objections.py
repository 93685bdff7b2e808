"""The objection register, the type 1 rule and the objection-rate monitor (safehaven.protect.objections)."""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from safehaven.core import audit, days, registers, schema
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.store import Store, table_exists
from safehaven.intake import landings
from safehaven.protect.objections import (
    EVENTS,
    MEMBERS_SEEDED,
    NATIONAL_OPT_OUT,
    REGISTRATIONS,
    TYPE1,
    TYPE1_INCIDENTS,
    binomial_upper,
    current_sql,
    ensure_tables,
    never_sent_sql,
    objection_rates,
    objection_rates_of,
    objectors_sql,
    seed_members,
    type1_objectors_sql,
)
from safehaven.protect.pseudonymise import hmac_sql, install_key
from tests.conftest import copy_haven
from tests.unit.populate import drop, populated, process

ROOT = Path(__file__).resolve().parents[2]


def _memory() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("CREATE SCHEMA governance")
    ensure_tables(con)
    return con


def _event(con, pid, kind, recorded, withdrawn=None, registered=None, practice=None) -> None:
    con.execute(
        f"INSERT INTO {EVENTS} SELECT coalesce(max(event_id), 0) + 1, ?, ?, ?, ?, ?, 't', 0, ?, 'k' FROM {EVENTS}",
        [pid, kind, recorded, withdrawn, practice, registered or datetime.now(UTC)],
    )


def _pids(con, sql) -> set[str]:
    return {r[0] for r in con.execute(sql).fetchall()}


def test_objection_after_a_withdrawal_is_in_force_again() -> None:
    con = _memory()
    _event(con, "p", "national_opt_out", date(2024, 1, 1), date(2024, 3, 1))
    _event(con, "p", "national_opt_out", date(2024, 6, 1))
    assert _pids(con, objectors_sql("2024-02-01")) == {"p"}
    assert _pids(con, objectors_sql("2024-04-01")) == set()
    assert _pids(con, objectors_sql("2024-06-01")) == {"p"}
    assert _pids(con, f"SELECT pid FROM ({current_sql('2024-04-01')}) WHERE in_force") == set()


def test_the_latest_statement_of_an_episode_wins_and_history_is_kept() -> None:
    con = _memory()
    _event(con, "p", "type1", date(2024, 1, 1))
    _event(con, "p", "type1", date(2024, 1, 1), date(2024, 2, 1))
    assert _pids(con, objectors_sql("2024-03-01", ("type1",))) == set()
    assert con.execute(f"SELECT count(*) FROM {EVENTS}").fetchone()[0] == 2, "append-only history"


def test_a_record_landed_just_after_uk_midnight_is_judged_on_the_uk_day_of_its_landing() -> None:
    """A type 1 objection recorded on 1 July applies from that day: a GP batch landed at 00:30 BST on
    2 July (23:30 UTC on 1 July) landed after it and should never have been sent. Judged on the UTC
    day, it was taken as sent the same day and kept; one landed at 23:30 BST on 1 July stays."""
    con = _memory()
    schema.ensure(con, schema.BATCHES)
    _event(con, "p", "type1", date(2024, 7, 1))
    for batch, landed in (("after", "2024-07-01 23:30:00+00"), ("same day", "2024-07-01 22:30:00+00")):
        con.execute(f"INSERT INTO {schema.BATCHES} (batch_id, collection, landed_at) VALUES (?, 'gp_events', ?)",
                    [batch, landed])  # fmt: skip
    con.execute(f"CREATE TEMP TABLE trail AS SELECT batch_id, landed_at FROM {schema.BATCHES}")  # as recorded
    rows = "SELECT * FROM (VALUES ('after', 'p'), ('same day', 'p')) AS t(_batch, pid)"
    assert {r[0] for r in con.execute(f"SELECT _batch FROM ({never_sent_sql(rows, 'trail')})").fetchall()} == {"after"}


#: a GP batch of the trail tests, and the day its person's type 1 objection was recorded (``trail``)
GP_BATCH, OBJECTED = "c" * 64, date(2024, 7, 1)
BEFORE_IT, AFTER_IT = datetime(2024, 6, 1, 9, tzinfo=UTC), datetime(2024, 7, 2, 9, tzinfo=UTC)


@pytest.fixture
def trail(home: Home) -> duckdb.DuckDBPyConnection:
    """A store with an audit trail, the register and a type 1 objection of ``p`` recorded on 1 July."""
    with Store(home).connect() as con:
        audit.append(con, actor="test", role="pipeline", action="test.start", object="haven", home=home)
        ensure_tables(con)
        schema.ensure(con, schema.BATCHES)
        _event(con, "p", "type1", OBJECTED)
        yield con


def _gp_batch(con: duckdb.DuckDBPyConnection, register: datetime, recorded: datetime | None) -> None:
    """``GP_BATCH`` of ``p`` in the register at ``register``, on the trail at ``recorded`` (or not)."""
    con.execute(
        f"INSERT INTO {schema.BATCHES} (batch_id, collection, landed_at, status) VALUES (?, ?, ?, 'accepted')",
        [GP_BATCH, "gp_events", register],
    )
    if recorded is not None:
        assert landings.record(con, "gp_events", GP_BATCH, recorded)


def _never_sent(con: duckdb.DuckDBPyConnection) -> bool:
    received = landings.load_received(con, ["gp_events"])
    rows = f"SELECT '{GP_BATCH}' AS _batch, 'p' AS pid"
    return con.execute(f"SELECT count(*) FROM ({never_sent_sql(rows, received)})").fetchone()[0] == 1


def test_a_gp_batch_with_no_landing_entry_on_the_trail_is_taken_as_landed_now(trail) -> None:
    """A landing the trail does not record (a run killed before its entry) is judged as landed now,
    the latest it can have (fail closed): its register time, dated back to before the objection,
    does not make its records sent before it."""
    _gp_batch(trail, register=BEFORE_IT, recorded=None)
    assert _never_sent(trail)


def test_landed_now_is_read_from_the_havens_clock_as_its_as_of_day_is(trail, monkeypatch: pytest.MonkeyPatch) -> None:
    """ "Landed now" for a batch the trail does not record comes from the haven's one clock
    (``core.days``), as the day the objection is judged in force on does: on the objection's own
    day it is not after it, the next day it is (DuckDB's ``now()`` was another clock)."""
    _gp_batch(trail, register=BEFORE_IT, recorded=None)
    monkeypatch.setattr(days, "clock", lambda: datetime(2024, 7, 1, 12, tzinfo=UTC))
    assert not _never_sent(trail)
    monkeypatch.setattr(days, "clock", lambda: datetime(2024, 7, 2, 12, tzinfo=UTC))
    assert _never_sent(trail)


def test_a_register_time_later_than_the_trails_is_used(trail) -> None:
    """A batch lands at the later of the register's time and the trail's: never earlier than the
    register says, so a trail time before the objection does not keep records the register says
    came after it."""
    _gp_batch(trail, register=AFTER_IT, recorded=BEFORE_IT)
    assert _never_sent(trail)


def test_a_landing_entry_that_does_not_verify_lets_no_earlier_time_through(trail) -> None:
    """An insider who dates a GP batch back in the register and edits its landing entry to match
    gains nothing: the edited entry fails its hash and is not used, so the batch is taken as landed
    now and its records stay never sent."""
    _gp_batch(trail, register=AFTER_IT, recorded=AFTER_IT)
    trail.execute(f"UPDATE {schema.BATCHES} SET landed_at = ? WHERE batch_id = ?", [BEFORE_IT, GP_BATCH])
    edited = trail.execute(
        f"UPDATE {schema.AUDIT_LOG} SET detail = json_object('batch', ?, 'landed_at', ?) WHERE action = ?",
        [GP_BATCH, BEFORE_IT.isoformat(), landings.ACTION],
    ).fetchone()[0]
    assert edited == 1 and landings.received(trail, "gp_events") == {}
    assert _never_sent(trail)


def _haven_row(con: duckdb.DuckDBPyConnection) -> tuple[object, object]:
    """``p``'s one GP record of ``GP_BATCH`` in the haven; the gp_events contract and the purge."""
    from safehaven.intake.contracts import ContractRegistry
    from safehaven.protect.haven import purge_late_type1

    contract = ContractRegistry().contracts["gp_events"]
    con.execute("CREATE SCHEMA IF NOT EXISTS haven")
    con.execute(
        f"CREATE TABLE haven.gp_events AS SELECT '{GP_BATCH}' AS _batch, 0::BIGINT AS _row, 'p' AS pid, "
        f"'A81001' AS {contract.practice_field}"
    )
    return contract, purge_late_type1


def test_a_gp_batch_landed_before_the_landing_rule_is_adopted_by_the_haven_step_not_purged(trail) -> None:
    """A haven from before landings were audited: its GP batch has no landing entry, and none was
    ever started for the collection. The haven step adopts it with the register's time, as the next
    landing step would, so a record sent before its person's objection is kept, not purged for want
    of an entry the haven never wrote (an irreversible loss of lawfully held data)."""
    _gp_batch(trail, register=BEFORE_IT, recorded=None)
    contract, purge = _haven_row(trail)
    assert purge(trail, contract, [contract]) == (0, 0)
    assert set(landings.received(trail, "gp_events")) == {GP_BATCH}
    assert trail.execute("SELECT count(*) FROM haven.gp_events").fetchone()[0] == 1


def test_a_gp_batch_not_on_the_trail_once_the_rule_started_is_recorded_late_and_purged(trail) -> None:
    """Once the rule has started for the collection (a landing on record), a batch landed without its
    entry (a run killed between its commit and the entry) is recorded late by the haven step: landed
    now, after the objection, so its person's record is purged (fail closed)."""
    assert landings.record(trail, "gp_events", "d" * 64, BEFORE_IT)  # the rule has started
    _gp_batch(trail, register=BEFORE_IT, recorded=None)
    contract, purge = _haven_row(trail)
    assert purge(trail, contract, [contract])[0] == 1
    assert trail.execute("SELECT count(*) FROM haven.gp_events").fetchone()[0] == 0


def test_a_gp_batch_whose_register_row_was_deleted_is_still_judged_by_the_trail(trail) -> None:
    """An insider deletes the GP batch's register row: its records are judged by the trail's time
    (and landed now with no entry either), never dropped from the rule (found by review: an inner
    join on the register let them escape)."""
    _gp_batch(trail, register=AFTER_IT, recorded=AFTER_IT)
    trail.execute(f"DELETE FROM {schema.BATCHES} WHERE batch_id = ?", [GP_BATCH])
    assert _never_sent(trail)


def _break_trail(con: duckdb.DuckDBPyConnection) -> None:
    """The trail stops verifying, as after any edited row: it takes no more entries."""
    con.execute(f"UPDATE {schema.AUDIT_LOG} SET detail = '{{\"x\": 1}}' WHERE action = 'test.start'")
    assert not audit.append_if_sound(con, [{"actor": "t", "role": "pipeline", "action": "t.x", "object": "o"}])


def test_a_gp_batch_the_trail_cannot_record_is_not_purged_in_that_run(trail) -> None:
    """A batch with no landing entry while the trail does not verify (it refuses the entry): its day
    is unknown, and a purge cannot be undone, so the run does not judge it; a record sent before its
    person's objection on a haven from before the rule is kept (found by review: taken as landed now,
    it was purged for good)."""
    _gp_batch(trail, register=BEFORE_IT, recorded=None)
    contract, purge = _haven_row(trail)
    _break_trail(trail)
    assert purge(trail, contract, [contract]) == (0, 0)
    assert trail.execute("SELECT count(*) FROM haven.gp_events").fetchone()[0] == 1


def test_a_disposal_puts_landings_on_record_first_so_its_vault_sets_agree_with_the_purge(home: Home) -> None:
    """On a haven from before the rule, a disposal run before any landing step, sweep or haven step
    judged a GP batch with no landing entry as landed now (its records supporting no vault entry)
    while the purge adopted it and kept them. A disposal now records unrecorded landings first,
    as the purge and the sweep do (``safehaven.dispose.run.record_landings``)."""
    from safehaven.context import Haven
    from safehaven.dispose import disposal
    from safehaven.intake.contracts import ContractRegistry

    with Store(home).connect() as con:
        audit.append(con, actor="test", role="pipeline", action="test.start", object="haven", home=home)
        schema.ensure(con, schema.BATCHES)
        _gp_batch(con, register=BEFORE_IT, recorded=None)
    haven = Haven.open(home, contracts=ContractRegistry())
    disposal.dispose(haven, disposal.Target.for_collection("hospital_episodes", date(2000, 1, 1)), authorised_by="x")
    with Store(home).connect(read_only=True) as con:
        assert landings.received(con, "gp_events") == {GP_BATCH: BEFORE_IT}


def test_an_objection_recorded_today_is_in_force_from_uk_midnight_not_the_hosts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 00:30 BST on 2 July (23:30 UTC on 1 July), objections recorded on 2 July are in force: the
    default as-of day is the haven's (UK) day (``safehaven.core.days``), not DuckDB's
    ``current_date`` (the host's: still 1 July on a host in UTC, which let them through for an hour;
    CoP 11-14, NDOP: an objection applies from its recorded date). At 23:30 BST on 1 July they are not."""
    con = _memory()
    con.execute("SET TimeZone = 'UTC'")  # a host in UTC
    _event(con, "opted out", "national_opt_out", date(2099, 7, 2))
    _event(con, "type 1", "type1", date(2099, 7, 2))
    monkeypatch.setattr(days, "clock", lambda: datetime(2099, 7, 1, 23, 30, tzinfo=UTC))
    assert _pids(con, objectors_sql()) == {"opted out"}
    assert _pids(con, type1_objectors_sql()) == {"type 1"}
    assert _pids(con, objectors_sql("current_date", ("type1", "national_opt_out"))) == {"opted out", "type 1"}
    assert _pids(con, f"SELECT pid FROM ({current_sql()}) WHERE in_force") == {"opted out", "type 1"}
    monkeypatch.setattr(days, "clock", lambda: datetime(2099, 7, 1, 22, 30, tzinfo=UTC))
    assert _pids(con, objectors_sql(types=("type1", "national_opt_out"))) == set()


def test_register_as_known_at_an_earlier_time() -> None:
    con = _memory()
    then = datetime(2024, 5, 1, tzinfo=UTC)
    _event(con, "late", "national_opt_out", date(2024, 1, 1), registered=then + timedelta(days=3))
    assert _pids(con, objectors_sql("2024-05-01", known_at=then)) == set()
    assert _pids(con, objectors_sql("2024-05-01")) == {"late"}


def test_type1_records_held_before_their_objection_arrived_are_dropped_with_the_incident(home: Home) -> None:
    """The objections file comes a night after the GP file: the GP records of people whose type 1
    objection was recorded before that GP file was sent are already in the haven. Once the
    objections are registered they are dropped as entry would have dropped them, with the
    incident per sender, so no output counts them (guide Rule 4B)."""
    import shutil

    from tests.unit.populate import drop, process

    drop(home)
    held_back = home.root.parent / "objections_later"
    shutil.move(str(home.incoming_for("objections")), held_back)
    first = process(home)["gp_events"]
    assert first.type1_dropped == 0  # nothing registered yet: every GP record entered
    shutil.move(str(held_back), home.incoming_for("objections"))
    second = process(home)["gp_events"]
    assert second.type1_purged > 0
    with Store(home).connect() as con:
        in_haven = con.execute(
            f"SELECT count(*) FROM haven.gp_events h JOIN governance.batches b ON b.batch_id = h._batch "
            f"WHERE h.pid IN ({objectors_sql('current_date', ('type1',))})"
        ).fetchone()[0]
        incidents = con.execute(f"SELECT sum(records_dropped) FROM {TYPE1_INCIDENTS}").fetchone()[0]
    assert in_haven == 0
    assert incidents == second.type1_purged


def test_a_gp_batch_dated_back_in_the_register_is_still_purged_and_its_identifiers_not_vaulted(home: Home) -> None:
    """The GP file comes before the objections file; an insider with the store key then moves the GP
    batch's register ``landed_at`` back to before every objection was recorded. The trail records
    it landing after them, so its type 1 objectors' records are still purged as never sent, and the
    identifiers only they gave leave the vault (guide Rule 4B): judged by the register alone, the
    objections silently lapsed and the records stayed (found by review)."""
    from safehaven.intake.contracts import ContractRegistry
    from safehaven.protect import vault
    from safehaven.protect.pseudonymise import install_key
    from tests.conftest import custodian_ring
    from tests.unit.populate import drop, process

    drop(home)
    held_back = home.root.parent / "objections_later"
    shutil.move(str(home.incoming_for("objections")), held_back)
    process(home)
    with Store(home).connect() as con:
        con.execute(f"UPDATE {schema.BATCHES} SET landed_at = '1971-01-01 09:00:00+00' WHERE collection = 'gp_events'")
    shutil.move(str(held_back), home.incoming_for("objections"))
    report = process(home)["gp_events"]
    assert report.type1_purged > 0 and report.type1_vault_removed > 0
    registry, objectors = ContractRegistry(), objectors_sql("current_date", ("type1",))
    with Store(home).connect() as con:
        install_key(con, "haven", KeyRing(home.keys).get("haven"))

        def values(collections: list[str]) -> set[tuple]:
            parts = [vault.unpivot_sql(registry.contracts[c], "true") for c in collections]
            pid = hmac_sql("nhs", "haven")
            sql = f"SELECT * FROM (SELECT {pid} AS pid, field, value FROM ({' UNION ALL '.join(parts)})) "
            return set(con.execute(f"{sql} WHERE pid IN ({objectors})").fetchall())

        assert con.execute(f"SELECT count(*) FROM haven.gp_events WHERE pid IN ({objectors})").fetchone()[0] == 0
        others = [c for c in registry.contracts if c != "gp_events" and table_exists(con, "landing", f"{c}_valid")]
        gp_only = values(["gp_events"]) - values(others)
        held = {t[:3] for t in vault.decrypt_rows(con, vault.private_key(custodian_ring(home)))}
    assert gp_only and not gp_only & held


# --- a late type 1 objection and the identity vault (guide Rule 4B) ----------------------------

#: when the early GP file of the late world is received: before any objection in the drop was recorded
EARLY = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)
#: the postcode the early file gives its type 1 objector (a kept value where the late file has another)
OLD_POSTCODE = "LS1 4AP"


@dataclass(frozen=True)
class LateWorld:
    """A haven whose objections file arrived after its GP file (``late_type1_world``)."""

    root: Path
    before: frozenset  # the vault (pid, field, value) before the objections were registered
    after: frozenset  # ... and after
    purged_only: frozenset  # the values of the purged records that no kept record has
    shared: frozenset  # the values of the purged records that a kept record also has
    early: str  # the pid of the objector with an early GP record (landed before the objection)
    early_nhs: str  # ... and NHS number
    early_elsewhere: frozenset  # that objector's (field, value) in the other collections and the objection
    late_postcode: str  # that objector's postcode in the purged records
    report: object  # the haven report of gp_events of the night the objections were registered


def _csv(path: Path) -> tuple[list[str], list[list[str]]]:
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def _digits(nhs: str) -> str:
    return "".join(ch for ch in nhs if ch.isdigit())


def _vault_values(folder: Path, registry, keep) -> set[tuple[str, str, str]]:
    """(nhs, field, value) of the vault fields of the files under ``folder`` whose rows ``keep(collection, row)``."""
    from safehaven.protect.vault import vault_fields

    out: set[tuple[str, str, str]] = set()
    for path in folder.rglob("*.csv"):
        contract = registry.contracts[path.parent.name]
        header, rows = _csv(path)
        for record in (dict(zip(header, r, strict=True)) for r in rows):
            if keep(contract.collection, record):
                nhs = _digits(record[contract.patient_key])
                out |= {(nhs, f, nhs if f == contract.patient_key else record[f]) for f in vault_fields(contract)}
    return {t for t in out if t[2]}


@pytest.fixture(scope="module")
def late_type1_world(tmp_path_factory: pytest.TempPathFactory) -> LateWorld:
    """Three nights: an early GP file holding one type 1 objector's records with an old postcode,
    received before any objection was recorded; the drop without its objections file; then the
    objections file, which purges the GP records of the drop's type 1 objectors."""
    from safehaven.cli.common import PASSPHRASE_ENV
    from safehaven.intake import landings
    from safehaven.intake.contracts import ContractRegistry
    from safehaven.protect import vault
    from safehaven.protect.pseudonymise import pseudonym
    from tests.conftest import TEST_PASSPHRASE, custodian_ring, with_vault_keys
    from tests.unit.populate import drop, process, write_csv

    base = tmp_path_factory.mktemp("late_type1")
    root, aside = base / "haven", base / "aside"
    registry = ContractRegistry()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEHAVEN_HOME", str(root))
        mp.setenv(PASSPHRASE_ENV, TEST_PASSPHRASE)
        home = with_vault_keys(Home(root).ensure())
        drop(home)
        shutil.move(str(home.incoming), aside)
        header, objections = _csv(next((aside / "objections").glob("*.csv")))
        type1 = {_digits(r[0]) for r in objections if r[1] == "type1" and not r[3]}  # in force today
        gp_header, gp_rows = _csv(next((aside / "gp_events").glob("*.csv")))
        nhs_i, pc_i = gp_header.index("nhs_number"), gp_header.index("postcode")
        elsewhere = _vault_values(aside, registry, lambda c, r: c != "gp_events")
        # an objector whose GP postcode no other collection has: it goes with the purged records
        early = next(
            n for r in gp_rows for n in [_digits(r[nhs_i])] if n in type1 and (n, "postcode", r[pc_i]) not in elsewhere
        )
        early_rows = [[*r[:pc_i], OLD_POSTCODE, *r[pc_i + 1 :]] for r in gp_rows if _digits(r[nhs_i]) == early]
        late_postcode = early_rows and next(r[pc_i] for r in gp_rows if _digits(r[nhs_i]) == early)
        assert late_postcode and late_postcode != OLD_POSTCODE
        write_csv(base / "early" / "gp_events" / "gp_events_20250531.csv", gp_header, early_rows)
        home.incoming.mkdir(parents=True, exist_ok=True)
        shutil.copytree(base / "early", home.incoming, dirs_exist_ok=True)
        with pytest.MonkeyPatch.context() as clock:
            clock.setattr(landings, "clock", lambda _: EARLY)
            process(home, registry)
        shutil.copytree(aside, home.incoming, dirs_exist_ok=True, ignore=shutil.ignore_patterns("objections*"))
        process(home, registry)
        keyring = custodian_ring(home)
        with Store(home).connect() as con:
            before = frozenset(t[:3] for t in vault.decrypt_rows(con, vault.private_key(keyring)))
        shutil.copytree(aside / "objections", home.incoming_for("objections"), dirs_exist_ok=True)
        report = process(home, registry)["gp_events"]
        with Store(home).connect() as con:
            after = frozenset(t[:3] for t in vault.decrypt_rows(con, vault.private_key(keyring)))
        key = keyring.get("haven").material

    def purged(collection: str, row: dict) -> bool:
        return collection == "gp_events" and _digits(row["nhs_number"]) in type1

    late = _vault_values(aside, registry, purged)
    kept = _vault_values(aside, registry, lambda c, r: not purged(c, r)) | _vault_values(
        base / "early", registry, lambda c, r: True
    )
    as_pids = lambda values: frozenset((pseudonym(key, n), f, v) for n, f, v in values)  # noqa: E731
    return LateWorld(
        root,
        before,
        after,
        as_pids(late - kept),
        as_pids(late & kept),
        pseudonym(key, early),
        early,
        frozenset((f, v) for n, f, v in elsewhere if n == early),
        late_postcode,
        report,
    )


@pytest.fixture
def late_home(home: Home, late_type1_world: LateWorld) -> Home:
    return copy_haven(late_type1_world.root, home)


def test_a_late_type1_objection_removes_the_vault_entries_and_digests_of_the_purged_records(
    late_type1_world: LateWorld, late_home: Home
) -> None:
    """The identifiers of GP records that should never have been sent leave the vault with them,
    and their digests with them (guide Rule 4B; ``safehaven.dispose.vault_sets.purge_vault``)."""
    from tests.conftest import custodian_ring
    from tests.unit.test_vault import seen_matches_vault

    world = late_type1_world
    assert world.report.type1_purged > 0 and world.purged_only <= world.before
    assert world.before - world.after == world.purged_only != frozenset()
    assert world.after - world.before == frozenset()  # nothing new: only what the purge removed
    assert world.report.type1_vault_removed == len(world.purged_only)
    with Store(late_home).connect() as con:
        seen_matches_vault(con, custodian_ring(late_home))  # every remaining entry its digest, no other


def test_vault_entries_records_that_stay_also_support_are_kept_through_a_late_purge(
    late_type1_world: LateWorld,
) -> None:
    """An entry a kept record also supports stays: the objection's own NHS number, another
    collection's value, and the early GP record's (landed before the objection was recorded);
    where the purged and the kept records of a field differ, only the purged value goes."""
    world = late_type1_world
    assert world.shared and world.shared <= world.before and world.shared <= world.after
    assert {f for _, f, _ in world.shared} >= {"nhs_number"}
    early = {(f, v) for p, f, v in world.after if p == world.early}
    assert ("postcode", OLD_POSTCODE) in early  # kept: the early record's, encrypted again
    assert (world.early, "postcode", world.late_postcode) in world.purged_only & world.before
    assert ("postcode", world.late_postcode) not in early  # gone: the purged records' only
    assert {f for f, _ in early} == {"nhs_number", "date_of_birth", "postcode"}


def test_a_late_type1_purge_run_again_changes_nothing(late_type1_world: LateWorld, late_home: Home) -> None:
    """Run again, the purge finds nothing to do: the vault, its digests and the incidents stay."""
    from safehaven.protect import vault
    from tests.conftest import custodian_ring
    from tests.unit.populate import process

    world = late_type1_world
    assert world.before - world.after  # the first run removed entries
    keyring = custodian_ring(late_home)

    def state(con) -> tuple:
        return (
            frozenset(t[:3] for t in vault.decrypt_rows(con, vault.private_key(keyring))),
            con.execute(f"SELECT count(*), sum(lookup) FROM {vault.SEEN}").fetchone(),
            con.execute(f"SELECT count(*) FROM {TYPE1_INCIDENTS}").fetchone()[0],
            len(registers.breaches(con)),
        )

    with Store(late_home).connect() as con:
        first = state(con)
    again = process(late_home)["gp_events"]
    with Store(late_home).connect() as con:
        assert state(con) == first
    assert first[0] == world.after
    assert (again.type1_purged, again.type1_vault_removed) == (0, 0)


def test_a_late_type1_incident_counts_the_vault_entries_removed_and_names_no_one(
    late_type1_world: LateWorld, late_home: Home
) -> None:
    """The incident says how many vault entries went, in counts only: no pid, NHS number, date
    of birth or postcode of the purged records (``safehaven.protect.objections.record_type1_incident``)."""
    world = late_type1_world
    with Store(late_home).connect() as con:
        breaches = [b for b in registers.breaches(con) if b["kind"] == "type1_objection_disregarded"]
        incidents = con.execute(f"SELECT * FROM {TYPE1_INCIDENTS}").fetchall()
    late = [b for b in breaches if "vault_entries_removed" in str(b["detail"])]
    assert len(late) == 1
    detail = late[0]["detail"]
    detail = json.loads(detail) if isinstance(detail, str) else detail
    assert detail["vault_entries_removed"] == len(world.purged_only) > 0
    text = repr(breaches) + repr(incidents)
    named = {p for p, _, _ in world.purged_only} | {v for _, _, v in world.purged_only | world.shared}
    assert not [value for value in named if value in text]


def test_a_disposal_counts_no_never_sent_landing_row_as_keeping_a_vault_entry(
    late_type1_world: LateWorld, late_home: Home
) -> None:
    """The purged records' landing rows stay until their batch is disposed of, but keep no vault
    entry: disposing of the early GP file (landed before the objection) removes the values its
    person's purged records also had, and keeps those another collection or the objection has
    (``safehaven.dispose.vault_sets.never_sent``)."""
    from datetime import date

    from safehaven.context import Haven
    from safehaven.dispose import disposal
    from safehaven.intake.contracts import ContractRegistry
    from safehaven.protect import vault
    from tests.conftest import custodian_ring

    world = late_type1_world
    keyring = custodian_ring(late_home)
    haven = Haven.open(late_home, contracts=ContractRegistry(), keyring=keyring)
    result = disposal.dispose(haven, disposal.Target.for_collection("gp_events", date(2025, 7, 1)), authorised_by="CG")
    assert result.certificate is not None
    with Store(late_home).connect() as con:
        left = {(f, v) for p, f, v, _ in vault.decrypt_rows(con, vault.private_key(keyring)) if p == world.early}
        landed = con.execute(
            "SELECT count(*) FROM landing.gp_events_valid l JOIN governance.batches b ON b.batch_id = l._batch "
            "WHERE b.landed_at > ?",
            [EARLY],
        ).fetchone()[0]
    early_before = {(f, v) for p, f, v in world.after if p == world.early}
    only_never_sent = early_before - world.early_elsewhere - {("postcode", OLD_POSTCODE)}
    assert landed > 0  # the purged records' landing rows are still there
    assert only_never_sent  # a value the early and the purged GP records alone had (a date of birth)
    assert left == set(world.early_elsewhere) and ("nhs_number", world.early_nhs) in left


def test_types_are_checked() -> None:
    with pytest.raises(ValueError):
        objectors_sql("current_date", ("type2",))


def test_type1_records_are_dropped_before_the_haven_and_counted_per_sender(home: Home) -> None:
    reports = populated(home)
    gp = reports["gp_events"]
    assert gp.type1_dropped > 0 and len(gp.type1_by_sender) >= 1
    assert gp.rows_out == gp.rows_in - gp.type1_dropped
    assert sum(gp.type1_by_sender.values()) == gp.type1_dropped
    with Store(home).connect() as con:
        in_haven = con.execute(
            f"SELECT count(*) FROM haven.gp_events WHERE pid IN ({objectors_sql('current_date', ('type1',))})"
        ).fetchone()[0]
        incidents = dict(
            con.execute(
                f"SELECT sender, records_dropped FROM {TYPE1_INCIDENTS} WHERE collection = 'gp_events'"
            ).fetchall()
        )
        breaches = [b for b in registers.breaches(con) if b["kind"] == "type1_objection_disregarded"]
        hospital_objectors = con.execute(
            f"SELECT count(*) FROM haven.hospital_episodes WHERE pid IN ({objectors_sql('current_date', ('type1',))})"
        ).fetchone()[0]
    assert in_haven == 0
    assert incidents == gp.type1_by_sender
    assert len(breaches) == 1 and str(gp.type1_dropped) in breaches[0]["what"]
    assert hospital_objectors > 0, "type 1 is about GP data: hospital records stay"
    assert reports["hospital_episodes"].type1_dropped == 0


def _monitor_population(con, sizes: list[int], rates: list[float], seed: int = 3) -> list[str]:
    rng = np.random.default_rng(seed)
    practices = [f"P{i:05d}" for i in range(len(sizes))]
    regs, events = [], []
    for practice, n, rate in zip(practices, sizes, rates, strict=True):
        for _ in range(n):
            pid = secrets.token_hex(16)
            regs.append([practice, pid])
            if rng.random() < rate:
                events.append([pid, practice])
    reg_rows = pa.table({"practice": [r[0] for r in regs], "pid": [r[1] for r in regs]})
    ev_rows = pa.table({"pid": [e[0] for e in events], "practice": [e[1] for e in events]})
    con.register("_regs", reg_rows)
    con.register("_evs", ev_rows)
    con.execute(f"INSERT INTO {REGISTRATIONS} SELECT practice, pid, now(), 'gp_events' FROM _regs")
    con.execute(
        f"INSERT INTO {EVENTS} SELECT 0, pid, 'type1', DATE '2024-01-01', NULL, practice, 't', 0, now(), 'k' FROM _evs"
    )
    return practices


def test_the_outlier_practice_is_flagged_and_ordinary_ones_are_not() -> None:
    con = _memory()
    rng = np.random.default_rng(11)
    sizes = [int(s) for s in rng.integers(400, 3000, 30)]
    rates = [0.02] * 30
    rates[17] = 0.25
    practices = _monitor_population(con, sizes, rates)
    result = {r.practice: r for r in objection_rates(con, "type1", "2024-06-01")}
    assert [p for p, r in result.items() if r.outlier] == [practices[17]]
    flagged = result[practices[17]]
    assert flagged.rate > 0.2 and 0.015 < flagged.baseline < 0.03
    assert flagged.upper_limit is not None and flagged.rate > flagged.upper_limit and flagged.z > 3.09
    assert flagged.p_value is not None and flagged.p_value < 0.001
    assert all(r.assessed for r in result.values())
    for r in result.values():
        if not r.outlier:
            assert r.upper_limit is not None and r.rate <= r.upper_limit


def test_a_small_practice_is_judged_exactly_not_by_the_normal_approximation() -> None:
    con = duckdb.connect()
    con.execute("CREATE SCHEMA governance")
    ensure_tables(con)
    regs = [[f"P{i}", f"p{i}-{j}"] for i in range(3) for j in range(2000)] + [["SMALL", f"s{j}"] for j in range(20)]
    objecting = [f"p{i}-{j}" for i in range(3) for j in range(40)] + ["s0", "s1", "s2"]  # 2%; 3 of 20 = 15%
    con.register("_r", pa.table({"practice": [r[0] for r in regs], "pid": [r[1] for r in regs]}))
    con.execute(f"INSERT INTO {REGISTRATIONS} SELECT practice, pid, now(), 'gp_events' FROM _r")
    con.register("_o", pa.table({"pid": objecting}))
    con.execute(
        f"INSERT INTO {EVENTS} SELECT 0, o.pid, 'type1', DATE '2024-01-01', NULL, r.practice, 't', 0, now(), "
        "'k' FROM _o o JOIN _r r USING (pid)"
    )
    small = {r.practice: r for r in objection_rates(con, "type1", "2024-06-01")}["SMALL"]
    assert small.z is not None and small.z > 3.09, "the normal approximation would raise a false alarm"
    assert small.p_value is not None and 0.001 < small.p_value < 0.05 and not small.outlier


def test_with_three_practices_the_outlier_does_not_hide_in_its_own_baseline() -> None:
    con = _memory()
    practices = _monitor_population(con, [600, 700, 650], [0.02, 0.25, 0.02])
    result = {r.practice: r for r in objection_rates(con, "type1", "2024-06-01")}
    assert [p for p, r in result.items() if r.outlier] == [practices[1]]
    assert result[practices[1]].baseline < 0.05, "leave-one-out: the baseline excludes the practice itself"


def test_exact_binomial_tail() -> None:
    from math import comb

    n, p0 = 40, 0.05
    for x in (0, 2, 5, 9):
        exact = sum(comb(n, k) * p0**k * (1 - p0) ** (n - k) for k in range(x, n + 1))
        assert binomial_upper(n, p0, x)[0] == pytest.approx(exact, rel=1e-9)
    _, limit = binomial_upper(n, p0, 0)
    k = round(limit * n)
    assert sum(comb(n, j) * p0**j * (1 - p0) ** (n - j) for j in range(k, n + 1)) < 0.001
    assert sum(comb(n, j) * p0**j * (1 - p0) ** (n - j) for j in range(k - 1, n + 1)) >= 0.001


def _type1_only_gp_file(home: Home) -> int:
    """Write a GP file holding one record of a type 1 objector (sent by a practice that should
    have withheld it); returns how many type 1 incidents the store held before."""
    from tests.unit.populate import write_csv

    with Store(home).connect() as con:
        install_key(con, "haven", KeyRing(home.keys).get("haven"))
        nhs, practice = con.execute(
            f"SELECT nhs_number, source_practice FROM landing.objections_valid "
            f"WHERE {hmac_sql('nhs_number', 'haven')} IN ({objectors_sql('current_date', ('type1',))}) "
            "AND source_practice IS NOT NULL ORDER BY 1 LIMIT 1"
        ).fetchone()
        before = con.execute(f"SELECT count(*) FROM {TYPE1_INCIDENTS}").fetchone()[0]
    header = ["practice_code", "nhs_number", "date_of_birth", "sex", "postcode", "event_date", "diagnosis_code"]
    write_csv(
        home.incoming_for("gp_events") / "gp_events_20260101.csv",
        header,
        [[practice, nhs, "1950-01-01", "1", "LE6 7US", "2025-03-01", "58214004"]],
    )
    return before


def _incidents_and_breaches(home: Home) -> tuple[int, int]:
    with Store(home).connect() as con:
        incidents = con.execute(f"SELECT count(*) FROM {TYPE1_INCIDENTS}").fetchone()[0]
        breaches = [b for b in registers.breaches(con) if b["kind"] == "type1_objection_disregarded"]
    return incidents, len(breaches)


def test_a_batch_of_type1_records_only_is_recorded_once_not_every_night(home: Home, populated_haven) -> None:
    """A GP file holding only a type 1 objector's records leaves no haven row; it still enters
    the haven once (``governance.haven_batches``), so its incident is recorded once, not nightly."""
    from tests.unit.populate import process

    copy_haven(populated_haven, home)
    before = _type1_only_gp_file(home)
    nights = [process(home)["gp_events"] for _ in range(3)]
    assert [(n.batches, n.type1_dropped) for n in nights] == [(1, 1), (0, 0), (0, 0)]
    assert _incidents_and_breaches(home)[0] == before + 1


KILLED_AT_THE_INCIDENT = """
import sys
from pathlib import Path
from tests.crash.harness import arm
arm("safehaven.protect.haven:record_type1_incident", 1, sys.argv[2])
from safehaven.core.home import Home
from tests.unit.populate import process
process(Home(Path(sys.argv[1])))
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_kill_as_the_type1_incident_is_recorded_loses_neither_the_incident_nor_the_breach(
    home: Home, populated_haven, when: str
) -> None:
    """The incident and its breach are written in the transaction that enters the batch into
    the haven (``safehaven.protect.haven``): a ``kill -9`` just before or just after writing
    them leaves either nothing of the batch (the next night does it all) or all of it; never a
    batch entered whose incident is lost (it would never be new again). guide Rule 4B."""
    import os
    import subprocess
    import sys

    from tests.unit.populate import process

    copy_haven(populated_haven, home)
    before = _type1_only_gp_file(home)
    before_breaches = _incidents_and_breaches(home)[1]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AT_THE_INCIDENT, str(home.root), when],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    process(home)
    assert _incidents_and_breaches(home) == (before + 1, before_breaches + 1)


def test_a_store_without_the_haven_batch_record_has_it_filled_once_and_adds_nothing(
    home: Home, populated_haven
) -> None:
    """A store made before ``governance.haven_batches``: its haven's batches are recorded once
    from the haven table, and a rerun adds no record (batches enter the haven once)."""
    from tests.unit.populate import process

    copy_haven(populated_haven, home)
    with Store(home).connect() as con:
        recorded = con.execute("SELECT collection, count(*) FROM governance.haven_batches GROUP BY 1 ORDER BY 1")
        recorded = recorded.fetchall()
        con.execute("DELETE FROM governance.haven_batches")
        rows = con.execute("SELECT count(*) FROM haven.gp_events").fetchone()[0]
    reports = process(home)
    assert all(r.batches == 0 for r in reports.values())
    with Store(home).connect() as con:
        assert con.execute("SELECT count(*) FROM haven.gp_events").fetchone()[0] == rows
        again = con.execute("SELECT collection, count(*) FROM governance.haven_batches GROUP BY 1 ORDER BY 1")
        assert again.fetchall() == recorded


GP_SOURCES = [("haven.gp_events", "practice_code")]


def _registrations(con: duckdb.DuckDBPyConnection) -> tuple:
    return con.execute(f"SELECT count(*), sum(hash(practice, pid)) FROM {REGISTRATIONS}").fetchone()


def test_a_gp_haven_table_filled_batch_by_batch_is_never_counted_whole(home: Home, populated_haven: Path) -> None:
    """The first GP batch enters an empty haven table, so each of its rows is counted as it
    enters: the batch records the table as counted whole, and the monitor reads no haven record
    (a whole recount adds no pair: the running counts are already complete)."""
    copy_haven(populated_haven, home)  # as populated(home) leaves it
    with Store(home).connect() as con:
        assert con.execute(f"SELECT collection FROM {MEMBERS_SEEDED}").fetchall() == [("gp_events",)]
        before = _registrations(con)
        objection_rates(con, TYPE1, gp_sources=GP_SOURCES)
        assert _registrations(con) == before
        con.execute(f"DELETE FROM {MEMBERS_SEEDED}")
        assert seed_members(con, GP_SOURCES) == 0


def test_a_gp_haven_table_that_held_rows_before_running_counts_is_still_counted_whole(
    home: Home, populated_haven: Path
) -> None:
    """A table with rows and no record that they were counted (a haven made before the running
    counts) is not recorded by its next batch: the monitor counts it whole, once."""
    copy_haven(populated_haven, home)  # as populated(home) leaves it
    with Store(home).connect() as con:
        con.execute(f"DELETE FROM {MEMBERS_SEEDED}")
        con.execute(f"DELETE FROM {REGISTRATIONS}")
    drop(home, seed=8)
    process(home)
    with Store(home).connect() as con:
        assert con.execute(f"SELECT count(*) FROM {MEMBERS_SEEDED}").fetchone() == (0,)
        only_new = _registrations(con)[0]
        objection_rates(con, TYPE1, gp_sources=GP_SOURCES)
        assert con.execute(f"SELECT collection FROM {MEMBERS_SEEDED}").fetchall() == [("gp_events",)]
        assert _registrations(con)[0] > only_new


def test_the_rates_of_both_types_counted_in_one_pass_are_those_of_each_type_alone(
    home: Home, populated_haven: Path
) -> None:
    """The monitor reads the practices' people once for both types (issue 22): the same rates, in
    the same order, as one assessment per type."""
    copy_haven(populated_haven, home)  # as populated(home) leaves it
    with Store(home).connect() as con:
        each = objection_rates(con, TYPE1, gp_sources=GP_SOURCES) + objection_rates(
            con, NATIONAL_OPT_OUT, gp_sources=GP_SOURCES
        )
        both = objection_rates_of(con, (TYPE1, NATIONAL_OPT_OUT), gp_sources=GP_SOURCES)
        with pytest.raises(ValueError, match="unknown objection type 'type3'"):
            objection_rates_of(con, (TYPE1, "type3"))
        with pytest.raises(TypeError, match="a sequence of types"):
            objection_rates_of(con, TYPE1)
    assert both == each
    assert {r.objection_type for r in both if r.objectors} == {TYPE1, NATIONAL_OPT_OUT}


def test_a_practices_rate_counts_its_own_people_against_every_other_practices_pooled_rate() -> None:
    """The monitor's arithmetic, by hand (Govt response 7.15): three practices of 10, 20 and 30
    people. Type 1: 4 of A's people object at A; 1 of A's people objects at B, which puts them on
    B's list as one of B's objectors (a practice that rightly withholds its objectors' records
    still counts them) and not among A's; 2 of B's object at B. National opt-out: 3 of C's people,
    wherever recorded. Each practice's baseline is every other practice's pooled rate (61 people,
    7 type 1 objectors): A's type 1 baseline is 3/51."""
    con = duckdb.connect()
    con.execute("CREATE SCHEMA governance")
    ensure_tables(con)
    people = [("A", f"a{i}") for i in range(10)] + [("B", f"b{i}") for i in range(20)]
    people += [("C", f"c{i}") for i in range(30)]
    con.executemany(f"INSERT INTO {REGISTRATIONS} VALUES (?, ?, now(), 'gp_events')", people)
    objections = [("a0", TYPE1, "A"), ("a1", TYPE1, "A"), ("a2", TYPE1, "A"), ("a3", TYPE1, "A")]
    objections += [("a4", TYPE1, "B"), ("b0", TYPE1, "B"), ("b1", TYPE1, "B")]
    objections += [("c0", NATIONAL_OPT_OUT, None), ("c1", NATIONAL_OPT_OUT, "A"), ("c2", NATIONAL_OPT_OUT, "C")]
    con.executemany(
        f"INSERT INTO {EVENTS} VALUES (?, ?, ?, DATE '2026-01-05', NULL, ?, 'b', ?, now(), 'k')",
        [(n, pid, kind, practice, n) for n, (pid, kind, practice) in enumerate(objections, start=1)],
    )
    rates = objection_rates_of(con, (TYPE1, NATIONAL_OPT_OUT), as_of="2026-06-01")
    found = {(r.objection_type, r.practice): (r.list_size, r.objectors, round(r.baseline, 6)) for r in rates}
    assert found == {
        (TYPE1, "A"): (10, 4, round(3 / 51, 6)),
        (TYPE1, "B"): (21, 3, round(4 / 40, 6)),
        (TYPE1, "C"): (30, 0, round(7 / 31, 6)),
        (NATIONAL_OPT_OUT, "A"): (10, 0, round(3 / 51, 6)),
        (NATIONAL_OPT_OUT, "B"): (21, 0, round(3 / 40, 6)),
        (NATIONAL_OPT_OUT, "C"): (30, 3, 0.0),
    }
