"""Bring validated records into the haven zone: pseudonymised, minus type 1 objectors.

Rules: see ``safehaven.protect.pseudonymise`` (what a haven row holds, CoP 8a, 27b-c) and
``safehaven.protect.objections`` (type 1, CoP 11-14; guide Rule 4B).

* Batches enter the haven once: each is recorded in ``governance.haven_batches`` in the same
  transaction as its records, and a recorded batch is not processed again, so reruns add
  nothing and a night never scans the haven's history to tell new batches from old (a store
  made before that table has it filled once from ``haven.<collection>``). A batch whose every
  record was a type 1 objector's leaves no haven row; it too is recorded, so its incident and
  breach are recorded once, not again every night. The incident and the breach are written in
  that same transaction, so a kill cannot leave a batch entered without them (guide Rule 4B).
* The whole move is SQL in DuckDB: one HMAC per distinct NHS number into a small temporary
  table, then one INSERT joining it back, with the type 1 drop as an anti-join against the
  register. No Python touches a row, and the records are written once (no intermediate
  copy of the batch). Type 1 records are found by NHS number against the few objectors
  among the batch's people, so the drop costs a semi-join, not a second pass.
* **Records already held when their type 1 objection arrives** are purged each night before new
  batches enter (:func:`purge_late_type1`): from the haven, and their identifiers from the
  identity vault, in one transaction with the incident; their landing rows stay, as those of
  records dropped on entry do (the function's docstring says why).
* The (practice, pid) pairs of each GP batch, those of its dropped type 1 records included,
  are added to ``governance.practice_registrations`` as it enters: the objection-rate
  monitor's running list sizes (Govt response 7.15), so a night never re-reads the haven's
  history and a practice's objectors still count in its list.
* **One haven key per epoch** (CoP 27b-c): ``governance.key_epochs`` records the id of the
  key the haven's pseudonyms are made with. A key file that does not match it (lost and
  re-created, or swapped) is refused: pseudonyms made under another key would not match the
  objection register, and objectors would get through. A rotation of it installed with no
  ``key.rotate`` entry is refused until it is on record (``safehaven.core.pins.unrecorded_rotations``).
  The key is also the audit trail's (``safehaven.core.pins.check_haven_audited``): whoever holds the
  store key can rewrite its epoch and ``keyring.json`` together, but not the trail's entry naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import duckdb

from safehaven.core import schema
from safehaven.core.home import Home
from safehaven.core.keys import Key, KeyRing, KeyRingError
from safehaven.core.pins import (
    HAVEN_OBJECT,
    audited_key,
    check_haven_audited,
    check_rotations_recorded,
    epoch_key_id,
    haven_key_recordable,
    record_haven_key,
    start_epoch,
)
from safehaven.core.sql import q
from safehaven.dispose.vault_sets import purge_vault
from safehaven.intake import landings
from safehaven.intake.contracts import Contract
from safehaven.intake.ingest import BATCHES
from safehaven.protect import feed
from safehaven.protect.objections import (
    counted_whole,
    ensure_tables,
    never_sent_sql,
    record_type1_incident,
    register_practices,
    type1_objectors_sql,
)
from safehaven.protect.pseudonymise import haven_select_sql, ids_sql, install_key

HAVEN_BATCHES = schema.HAVEN_BATCHES


def haven_key(con: duckdb.DuckDBPyConnection, keyring: KeyRing, home: Home | None = None) -> Key:
    """The haven key, checked against the epoch recorded in the store (created on first use only) and
    against the audit trail's record of it (``safehaven.core.pins.check_haven_audited``; ``home``: the
    haven whose trail that is, when ``con`` was not opened by its store)."""
    recorded = epoch_key_id(con)
    if recorded is None:
        return _first_epoch(con, keyring, home)
    if not keyring.exists("haven"):
        raise KeyRingError(
            f"the haven key is missing ({keyring.path('haven')}) but the haven's pseudonyms were made "
            f"with key {recorded}; restore the key file from the key custodian's backup"
        )
    key = keyring.get("haven")
    if key.key_id != recorded:
        raise KeyRingError(
            f"the haven key file holds key {key.key_id}, but the haven's pseudonyms were made with key "
            f"{recorded}; restore the right key, or finish the pending rotation (safehaven keys rotate --resume)"
        )
    check_rotations_recorded(con, keyring, ("haven",))  # a rotation installed but not on record is refused
    check_haven_audited(con, key.key_id, str(keyring.path("haven")), home)
    return key


def _first_epoch(con: duckdb.DuckDBPyConnection, keyring: KeyRing, home: Home | None) -> Key:
    """The haven key when the store records no epoch of it: made for the haven's first pseudonyms,
    or a key from before epochs. Checked against the audit trail before anything is written, so a
    key the trail already records is never made again and a refused key starts no epoch (found by
    review: a refusal after the epoch had started left the backup key unable to be restored)."""
    path = str(keyring.path("haven"))
    if not keyring.exists("haven"):
        on_record = audited_key(con, HAVEN_OBJECT)
        if on_record is not None:
            raise KeyRingError(
                f"the haven key is missing ({path}) and the store records no epoch of it, but the audit trail "
                f"records haven key {on_record[1] or '-'}: restore the key file and the store from the key "
                "custodian's backup"
            )
        haven_key_recordable(con, f"the haven key {path} is to be made", home)  # before anything is written
        key = keyring.get_or_create("haven")
        start_epoch(con, "haven", key.key_id)
        record_haven_key(con, key.key_id, home, created=True)
        return key
    key = keyring.get("haven")
    check_haven_audited(con, key.key_id, path, home)
    start_epoch(con, "haven", key.key_id)
    return key


@dataclass
class HavenReport:
    """Counts for one collection's move into the haven."""

    collection: str
    rows_in: int = 0
    rows_out: int = 0
    type1_dropped: int = 0
    type1_by_sender: dict[str, int] = field(default_factory=dict)
    #: records already held that a type 1 objection registered since says were never to be sent
    type1_purged: int = 0
    #: identity-vault entries only those records supported, removed with them
    type1_vault_removed: int = 0
    batches: int = 0
    key_id: str = ""
    practice_registrations: int = 0


def _seed_haven_batches(con: duckdb.DuckDBPyConnection, collection: str) -> None:
    """Record the batches already in ``haven.<collection>`` when none is recorded for it (a store
    made before ``governance.haven_batches``, or a table emptied): once, so a night does not scan
    the haven's history to tell new batches from old."""
    schema.ensure(con, HAVEN_BATCHES)
    recorded = con.execute(f"SELECT count(*) FROM {HAVEN_BATCHES} WHERE collection = ?", [collection]).fetchone()[0]
    if not recorded:
        con.execute(
            f"INSERT INTO {HAVEN_BATCHES} SELECT DISTINCT _batch, ?, now() FROM haven.{collection}", [collection]
        )


def purge_late_type1(
    con: duckdb.DuckDBPyConnection,
    contract: Contract,
    contracts: Iterable[Contract],
    vault_public: Callable[[], Key] | None = None,
) -> tuple[int, int]:
    """Drop the records a type 1 objection in force says should never have been sent, when the
    objection reached the haven after them (its file came after the GP file): records of batches
    landed after the day the objection was recorded, as entry drops them (guide Rule 4B;
    ``safehaven.protect.objections.never_sent_sql``: landed as the audit trail records it, never
    earlier than the register says), with the incident per sender. Records landed by the day it
    was recorded were sent before it and stay (withheld from record-level releases by the opt-out
    rules). Returns (records dropped, identity-vault entries removed). A landing the trail does not
    record yet is put on record first (``landings.record_unrecorded``), as the collection's next
    landing step would: recorded late (landed now) once the rule has started for the collection,
    adopted with the register's time on a haven from before it, whose GP records sent before an
    objection must not be purged for want of an entry the haven never wrote then. A batch the trail
    still does not record (it refused the entry: it does not verify) is not judged in this run:
    a purge cannot be undone and the batch's day is unknown; the next run records it (late) and
    judges it (found by review). Its person's records are withheld from record-level releases by
    the opt-out rules meanwhile, and a trail that does not verify stops every run at its start.

    What the haven keeps of them, all in one transaction:

    * **the vault**: nothing. The entries and ``vault.seen`` digests that only these records
      supported go with them (``safehaven.dispose.vault_sets.purge_vault``, disposal's entry sets:
      an entry a kept record of any collection also supports stays, the objection's own NHS
      number included). ``vault_public`` gives the vault public key, asked for only when a
      person's field has both a purged and a kept value (an old postcode) and the kept one must
      be encrypted again; without it such a purge is refused and nothing changes.
    * **the landing zone**: their rows stay, as those of type 1 records dropped on entry do. The
      landing zone is the record of what was received: each batch is sealed whole
      (``safehaven.intake.batch_seal``) and disposed of whole at the end of its retention, with
      its certificate (``safehaven.dispose``). Never-sent landing rows feed nothing onward: the
      haven never takes a batch twice (``governance.haven_batches``), the vault never vaults one
      twice and counts no never-sent row as supporting an entry (``safehaven.dispose.vault_sets``),
      and a lost digest is rebuilt without them (``safehaven.protect.vault._backfill_seen``). The
      vault's rule that landing rows live as long as their vault entries still holds: here the
      entries and digests go first and the rows later.
    * **the incident**: counts only (records per sender, batches, vault entries removed).
    """
    c, sender = contract.collection, q(contract.practice_field or "")
    landings.record_unrecorded(con, c)  # a landing not on the trail yet: adopted or recorded late first
    received = landings.load_received(con, [c])  # when each batch landed, as the trail records it
    on_record = (
        f"SELECT _batch, _row, pid, {sender} AS sender FROM haven.{c} WHERE _batch IN (SELECT batch_id FROM {received})"
    )
    late = never_sent_sql(on_record, received)
    rows = con.execute(f"SELECT sender, count(*), list(DISTINCT _batch) FROM ({late}) GROUP BY 1").fetchall()
    if not rows:
        con.execute(f"DROP TABLE {received}")
        return 0, 0
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE _late AS SELECT _batch, _row FROM ({late})")
        removed = purge_vault(con, contract, contracts, "SELECT _batch, _row FROM _late", vault_public or _no_key)
        con.execute(f"DELETE FROM haven.{c} AS t USING _late AS l WHERE t._batch = l._batch AND t._row = l._row")
        con.execute(f"DROP TABLE _late; DROP TABLE IF EXISTS {received}")
        batches = sorted({b for *_, listed in rows for b in listed})
        record_type1_incident(con, c, {str(s): int(n) for s, n, _ in rows}, batches, vault_entries_removed=removed)
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return sum(int(n) for _, n, _ in rows), removed


def _no_key() -> Key:
    raise KeyRingError(
        "a late type 1 purge must encrypt again a kept value of a person whose purged records held another; "
        "it needs the vault public key, which was not given: nothing was purged"
    )


def refuse_while_objections_unregistered(
    con: duckdb.DuckDBPyConnection, collection: str, home: Home | None = None, objections: Contract | None = None
) -> None:
    """Refuse to take a collection sent by GP practices into the haven while an objections batch is
    landed but not yet in the objection register (``safehaven.protect.feed.pending_batches``): the
    records of its type 1 objectors would enter the haven, and whatever is counted from it, until
    the next register step purged them (NDOP type 1; guide Rule 4B: never sent, so never taken in;
    found by review: the haven step materialised alone in the UI after an intake run). The nightly
    job runs the register step first, so only a run out of that order is refused. The refusal
    names what waits, by kind, and the step that clears it (``safehaven.protect.feed.describe_pending``;
    with ``home``, an entry still in incoming/ by its shown name, and, with the ``objections``
    contract, an objections file waiting for its control file, ``feed.awaiting_control``): never a
    refusal no one can clear."""
    waiting = feed.describe_pending(con, home, objections)
    if waiting:
        raise feed.ObjectionFeedBlocked(
            f"{collection} is not taken into the haven while objections are not in the objection register: "
            f"{waiting}; then this step again"
        )


def build_haven(
    con: duckdb.DuckDBPyConnection,
    contract: Contract,
    haven_key: Key,
    contracts: Iterable[Contract],
    vault_public: Callable[[], Key] | None = None,
    home: Home | None = None,
) -> HavenReport:
    """Pseudonymise accepted batches not yet in the haven; drop and count type 1 records.

    ``contracts`` are all collections (the vault is shared, :func:`purge_late_type1`), and
    ``vault_public`` gives the vault public key should the late purge need it, and ``home`` the
    folders a refusal names what it waits for from (:func:`refuse_while_objections_unregistered`)."""
    ensure_tables(con)
    c = contract.collection
    contracts = list(contracts)
    if contract.practice_field:
        objections = next((x for x in contracts if x.kind == "objections"), None)
        refuse_while_objections_unregistered(con, c, home, objections)
    install_key(con, "haven", haven_key.material)
    report = HavenReport(c, key_id=haven_key.key_id)
    source = f"landing.{c}_valid"
    con.execute(  # by shape from data: the contract's projection (safehaven.core.schema, "made elsewhere")
        f"CREATE TABLE IF NOT EXISTS haven.{c} AS {haven_select_sql(contract, f'(SELECT * FROM {source} LIMIT 0)')}"
    )
    _seed_haven_batches(con, c)
    if contract.practice_field:
        report.type1_purged, report.type1_vault_removed = purge_late_type1(con, contract, contracts, vault_public)
    con.execute(  # a batch whose every record was dropped leaves no row in haven.{c}: hence HAVEN_BATCHES
        f"CREATE OR REPLACE TEMP TABLE _new_batches AS SELECT batch_id FROM {BATCHES} "
        f"WHERE collection = ? AND status = 'accepted' "
        f"AND batch_id NOT IN (SELECT batch_id FROM {HAVEN_BATCHES} WHERE collection = ?)",
        [c, c],
    )
    report.batches = con.execute("SELECT count(*) FROM _new_batches").fetchone()[0]
    if report.batches == 0:
        return report
    batches = [r[0] for r in con.execute("SELECT batch_id FROM _new_batches ORDER BY 1").fetchall()]
    incoming = f"(SELECT * FROM {source} WHERE _batch IN (SELECT batch_id FROM _new_batches))"
    con.execute("BEGIN TRANSACTION")
    try:
        # one HMAC per distinct person (small), then one pass writing the records
        con.execute(f"CREATE OR REPLACE TEMP TABLE _ids AS {ids_sql(contract, incoming)}")
        report.rows_in = con.execute(f"SELECT count(*) FROM {incoming}").fetchone()[0]
        kept, first = incoming, False
        if contract.practice_field:
            sender, nhs = q(contract.practice_field), q(contract.patient_key)
            # the few type 1 objectors among these people: their records are found by NHS
            # number (a semi-join against a small table), never by pseudonymising every record
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE _type1 AS SELECT nhs, pid FROM _ids WHERE pid IN "
                f"({type1_objectors_sql()})"
            )
            dropped = f"(SELECT t.pid AS pid, s.{sender} FROM {incoming} s JOIN _type1 t ON t.nhs = s.{nhs})"
            rows = con.execute(f"SELECT {sender}, count(*) FROM {dropped} GROUP BY 1 ORDER BY 1").fetchall()
            report.type1_by_sender = {s: int(n) for s, n in rows}
            report.type1_dropped = sum(report.type1_by_sender.values())
            # the monitor's list sizes must still count the people whose records were dropped
            report.practice_registrations = register_practices(con, dropped, contract.practice_field, c)
            kept = f"(SELECT * FROM {incoming} WHERE {nhs} IS NULL OR {nhs} NOT IN (SELECT nhs FROM _type1))"
            first = con.execute(f"SELECT NOT EXISTS (SELECT 1 FROM haven.{c})").fetchone()[0]  # before the insert
        con.execute(f"INSERT INTO haven.{c} {haven_select_sql(contract, kept, ids='_ids')}")
        if contract.practice_field:  # the monitor's running list sizes (objections.seed_members)
            # the pairs of the records just written, from the source: each distinct (practice,
            # NHS number) once, joined to its pid (not a scan of the haven table's history)
            practice, nhs = q(contract.practice_field), q(contract.patient_key)
            new_rows = (
                f"(SELECT d.{practice}, i.pid FROM (SELECT DISTINCT {practice}, {nhs} FROM {kept}) d "
                f"JOIN _ids i ON i.nhs = d.{nhs})"
            )
            report.practice_registrations += register_practices(con, new_rows, contract.practice_field, c)
            if first:  # every row of the table was counted as it entered: nothing to count whole
                counted_whole(con, c)
        report.rows_out = report.rows_in - report.type1_dropped
        # in the same transaction as the batch's entry: a kill after the commit cannot lose the
        # incident of a batch that will never be new again (both registers are plain INSERTs)
        record_type1_incident(con, c, report.type1_by_sender, batches)
        con.execute(f"INSERT INTO {HAVEN_BATCHES} SELECT batch_id, ?, now() FROM _new_batches", [c])
        con.execute("DROP TABLE IF EXISTS _type1")
        con.execute("DROP TABLE _ids")
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return report
