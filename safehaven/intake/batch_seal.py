"""Objections batches are sealed where their rows are written: a landed objections row added,
changed or removed outside the haven is not taken into the register until a person decides.

Rule (CoP 11-14 and 23d; ``docs/rules.md`` "Objections"): the objection register is sealed in the
audit trail (``safehaven.protect.register_seal``), but it is built from the landed objections rows
(``landing.objections``, then ``landing.objections_valid``), which anyone holding the store key
can edit: a forged landed withdrawal would be registered, and sealed, as genuine by the next
register step. So:

* **Seal** (:meth:`Sealer.seal`): the landing transaction of an objections batch records a MAC of
  its landed rows (stage ``landed``: their count and digest), and the validation transaction one
  of its valid and rejected rows and its verdict (stage ``valid``: the rejected rows and a refusal
  are the feed's faults, ``safehaven.protect.feed``), in ``governance.objection_batch_seals``. The MAC key is
  derived (HKDF-SHA256) from the audit key (``safehaven.core.audit.derived_key``), which the store
  key does not open: someone holding only the store key cannot seal a row they wrote.
* **Check** (:meth:`Sealer.unsound`): a batch still landed is checked against its ``landed`` seal
  before it is validated; a validated batch, and any batch with valid rows, against its ``valid``
  seal before the register takes its rows in, registers a restatement of it, or accepts an event
  stating one of its rows as a run's leftover. A batch whose rows differ from its seal, that has
  no seal, or whose seal does not verify is *unsound*: it is not validated or registered, so it
  stays pending, and every record-level release is refused (``safehaven.protect.feed``, with the
  reason from :func:`problem`) in every run until a person decides. So is every batch while the
  store holds a function of its own (it could stand in for ``hash``) or a landing table is not a
  plain table.
* **Clearing it** needs a person: restore the rows (from a backup; the seal then matches again),
  or ``safehaven objections accept-batch <batch> --by <name> --reason <text>`` (:func:`accept`)
  seals the batch as it stands once they have checked it with its sender (audited first, as
  ``objections.batch_accepted``).
* **Starting** (:func:`sealer`): the first time a haven seals a collection's batches (a new haven,
  or one made before this rule), every batch it holds is sealed as it stands, after the whole
  audit trail verifies, and that is audited (``objections.batch_seals_started``); from then on a
  batch without a seal is unsound.

The digest is SHA-256 over the batch's rows in ``_row`` order, each as typed JSON
(``safehaven.core.digests.sealed_rows_sql``), so no crafted edit keeps it; the MAC also covers the
batch record's collection, landing and arrival times and drop (what orders its statements), and a
file sent again is sealed with its record (the batch it restates, its arrival: stage
``restated``). A batch deleted whole (its rows, its batch record and its seals) is still known:
each landing is audited (``objections.batch_landed``), and a batch the trail records that the
store no longer holds is unsound until the store is restored or a person accepts its loss
(:meth:`Sealer.missing`). A batch whose landing has no entry (a run killed between the landing's
commit and the entry, or a trail that did not verify then) is put on record by the next landing
step of the collection, whether or not it matches its seals then (:meth:`Sealer.record_unrecorded`:
the record says only that it must exist; its seals still decide whether it is trusted). Limits:
someone holding the audit key as well can seal; a batch landed without its entry and deleted
whole before the collection's next landing step is not known to the trail.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

import duckdb

from safehaven.core import audit, schema
from safehaven.core.digests import sealed_rows
from safehaven.core.home import Home
from safehaven.core.keys import KeyRingError
from safehaven.core.sql import lit, q
from safehaven.core.store import CATALOG, functions_stored, table_exists, transaction
from safehaven.intake.contracts import Contract
from safehaven.intake.landings import BATCH_ID

TABLE = schema.OBJECTION_BATCH_SEALS
BATCHES = schema.BATCHES
RESTATEMENTS = schema.OBJECTION_RESTATEMENTS
#: the audit actions: a collection's batches first sealed as they stood; a person's decision on one
STARTED = "objections.batch_seals_started"
ACCEPTED = "objections.batch_accepted"
#: the audit entry of each objections batch landed (after its landing commits), and the stage a
#: person's acceptance of a batch gone from the store records (its loss: nothing to seal)
LANDED_ACTION = "objections.batch_landed"
LOST = "lost"
#: the audit entry that makes the audit key on a trail with none yet, before a start seals (:func:`_start`)
KEYED = "objections.batch_seals_keyed"
#: the stages sealed: the rows landed from the file, the rows validation passed on, and the record
#: of a file sent again (its batch and arrival: ``governance.objection_restatements``)
LANDED, VALID, RESTATED = "landed", "valid", "restated"
#: batch statuses whose valid rows count (validated; a refused objections batch's valid rows are honoured)
VALIDATED = ("accepted", "refused")
#: what the MAC key is derived for (HKDF info)
_INFO = b"safehaven objections batch seal v1"
#: a batch's count and digest when it has no rows in a stage's table
_NO_ROWS = (0, "0:0")
#: how a row with no batch id is named in reasons
NO_BATCH = "(no batch)"


@dataclass(frozen=True)
class Sealer:
    """Seals and checks one objections collection's batches under the derived key."""

    collection: str
    key: bytes

    def table(self, stage: str) -> str:
        return self.collection if stage == LANDED else f"{self.collection}_valid"

    def digests(self, con: duckdb.DuckDBPyConnection, stage: str, batches: list[str] | None = None) -> dict:
        """Each batch's row count and digest at ``stage``: of its rows in the stage's table, and at
        the valid stage of its rejected rows too (what the feed's faults are made from: deleting
        them would clear a fault); with ``batches``, of those only."""
        found = self._table_digests(con, self.table(stage), batches)
        if stage != VALID:
            return found
        rejected = self._table_digests(con, f"{self.collection}_rejected", batches)
        return {
            b: (found.get(b, _NO_ROWS)[0], f"{found.get(b, _NO_ROWS)[1]}+{rejected.get(b, _NO_ROWS)[1]}")
            for b in set(found) | set(rejected)
        }

    def _table_digests(self, con: duckdb.DuckDBPyConnection, table: str, batches: list[str] | None) -> dict:
        """Each batch's row count and digest in ``landing.<table>`` (``core.digests.sealed_rows_sql``:
        every column, ``_row`` included, in ``_row`` order), one pass."""
        if not table_exists(con, "landing", table):
            return {}
        where = "" if batches is None else f"WHERE list_contains({_list(batches)}, t._batch)"
        found = sealed_rows(con, f"landing.{q(table)}", "t._row", group="t._batch", where=where)
        return {b: (n, d) for b, n, d in found}

    def records(self, con: duckdb.DuckDBPyConnection, batches: list[str]) -> dict[str, list]:
        """Each batch's record as it is sealed: what orders its statements (landed, arrived), where
        it came from (collection, drop) and its verdict (status, invalid rows: a refused batch is a
        fault of the feed); timestamps as epoch microseconds."""
        rows = con.execute(
            f"SELECT batch_id, collection, epoch_us(landed_at), epoch_us(arrived_at), drop_key, status, invalid_rows "
            f"FROM {BATCHES} "
            "WHERE list_contains(?::VARCHAR[], batch_id)",
            [batches],
        ).fetchall()
        return {r[0]: list(r[1:]) for r in rows}

    def mac(self, batch: str, stage: str, rows: int, digest: str, record: list | None) -> str:
        message = json.dumps([self.collection, batch, stage, rows, digest, record]).encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()

    def seal(self, con: duckdb.DuckDBPyConnection, stage: str, batches: list[str], by: str = "pipeline") -> None:
        """Seal ``batches`` at ``stage`` as their rows and batch records now stand, in the caller's transaction."""
        if not batches:
            return
        found, records = self.digests(con, stage, batches), self.records(con, batches)
        con.executemany(
            f"INSERT OR REPLACE INTO {TABLE} VALUES (?, ?, ?, ?, ?, ?, now(), ?)",
            [[b, stage, self.collection, *now, self.mac(b, stage, *now, records.get(b)), by] for b, now in
             ((b, found.get(b, _NO_ROWS)) for b in batches)],
        )  # fmt: skip

    def held(self, con: duckdb.DuckDBPyConnection) -> dict[str, list[str]]:
        """The collection's batches by the stage they are checked at: still landed, or validated."""
        return _held(con, self.collection)

    def unsound_by_stage(self, con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, str]]:
        """At each stage, the batches that differ from their seal there, each with why: the landed
        stage checks batches still landed; the valid stage checks validated batches and any batch
        with valid or rejected rows (module docstring, "Check")."""
        everything = _store_tampered(con, self)
        found: dict[str, dict[str, str]] = {}
        for stage, batches in self.held(con).items():
            current = self.digests(con, stage, None if stage == VALID else batches)
            wanted = sorted(set(batches) | set(current), key=str)
            seals, records = _seals(con, self.collection, stage), self.records(con, [b for b in wanted if b])
            reasons = {
                NO_BATCH if batch is None else batch: everything
                or self._why(batch, stage, current.get(batch, _NO_ROWS), seals.get(batch), records.get(batch))
                for batch in wanted
            }
            found[stage] = {batch: why for batch, why in reasons.items() if why}
        return found

    def unsound(self, con: duckdb.DuckDBPyConnection) -> dict[str, str]:
        """The batches (and files sent again) that must not be validated or registered, each with
        why: those of :meth:`unsound_by_stage`, restatements whose record differs from its seal,
        batches gone from the store (:meth:`missing`) and batches of a status no objections batch
        can have (:meth:`odd_status`)."""
        found: dict[str, list[str]] = {}
        for reasons in self.unsound_by_stage(con).values():
            for batch, why in reasons.items():
                found.setdefault(batch, []).append(why)
        joined = {batch: "; ".join(why) for batch, why in found.items()}
        return joined | self._unsound_restatements(con) | self.missing(con) | self.odd_status(con)

    def odd_status(self, con: duckdb.DuckDBPyConnection) -> dict[str, str]:
        """Batches whose status is none of landed, accepted or refused, each with why. Neither stage
        checks such a batch (the landed stage checks batches still landed; the valid stage validated
        ones and any with valid or rejected rows), and validation takes only landed ones: a landed
        batch set to ``disposed`` with SQL would never be validated or registered, its objections
        silently never in force. No objections batch is disposed of (objections are honoured for as
        long as the haven holds data: ``safehaven.dispose.planning``), so every other status is an edit."""
        rows = con.execute(
            f"SELECT batch_id FROM {BATCHES} WHERE collection = ? AND (status IS NULL OR status NOT IN (?, ?, ?))",
            [self.collection, LANDED, *VALIDATED],
        ).fetchall()
        why = (  # the stored status is not quoted: text written outside the haven never reaches a message
            f"its status was changed outside the haven to one no objections batch can have "
            f"(only {LANDED}, {' or '.join(VALIDATED)}): restore it"
        )
        return {str(batch): why for (batch,) in rows}

    def record_landed(self, con: duckdb.DuckDBPyConnection, batch: str, rows: int) -> bool:
        """Audit that ``batch`` landed (after its landing commits): a batch deleted whole from the
        store later (its rows, its record and its seals) is then still known (:meth:`missing`).
        False when the audit trail refuses the entry (it does not verify): the landing, committed,
        stands (a file never fails the stage), and every record-level flow is refused anyway while
        the trail does not verify (the register seal is read through it)."""
        try:
            audit.append_many(con, [_landed_entry(self.collection, {"batch": batch, "rows": rows})])
        except audit.AuditTrailBroken:
            return False
        return True

    def record_unrecorded(self, con: duckdb.DuckDBPyConnection) -> list[str]:
        """Audit the landing of each batch of the collection the trail does not record as landed,
        and return them: a run killed between a landing's commit and its entry, or a landing while
        the trail did not verify, left none, and a batch the trail does not know of could be deleted
        whole unseen (:meth:`missing`). Called by each landing step of the collection
        (``safehaven.intake.ingest.ingest_collection``), before it lands anything.

        Every batch named as the haven names one (a file's SHA-256) is recorded whether or not it
        matches its seals now: the entry says only that the batch must exist (its seals still decide
        whether it is trusted), so tampering with a batch before this step cannot keep it off the
        record. Its entry carries no row count (the store's is not sealed). All in one append; none
        when the trail does not verify (the landing stands: record-level flows are refused anyway),
        so this never fails the step."""
        recorded = self._on_record(con, LANDED_ACTION)
        held = con.execute(
            f"SELECT batch_id FROM {BATCHES} WHERE collection = ? ORDER BY landed_at, batch_id", [self.collection]
        ).fetchall()
        late = [b for (b,) in held if isinstance(b, str) and BATCH_ID.fullmatch(b) and b not in recorded]
        entries = [_landed_entry(self.collection, {"batch": b, "recorded": "late"}) for b in late]
        return late if entries and audit.append_if_sound(con, entries) else []

    def missing(self, con: duckdb.DuckDBPyConnection) -> dict[str, str]:
        """Batches the audit trail records as landed that the batch register no longer holds, but
        for those whose loss a person accepted (:func:`accept`); each with why."""
        landed = self._on_record(con, LANDED_ACTION)
        lost = self._on_record(con, ACCEPTED, stages=[LOST])
        held = {
            b
            for (b,) in con.execute(
                f"SELECT batch_id FROM {BATCHES} WHERE collection = ?", [self.collection]
            ).fetchall()
        }
        why = "it landed (the audit trail records it) and is gone from the store: restore the store from a backup"
        return {batch: why for batch in sorted(landed - held - lost)}

    def _on_record(self, con: duckdb.DuckDBPyConnection, action: str, **fields: object) -> set[str]:
        """The batches of this collection named by authentic ``action`` entries whose detail holds ``fields``."""
        return {
            batch
            for e in audit.authentic_entries(con, [action])
            if e.object == self.collection
            and isinstance(batch := e.fields.get("batch"), str)
            and all(e.fields.get(k) == v for k, v in fields.items())
        }

    def restatements(self, con: duckdb.DuckDBPyConnection) -> dict[str, list]:
        """Each file sent again (by drop key) as it is sealed: the batch it restates and its arrival."""
        rows = con.execute(
            f"SELECT r.drop_key, r.batch_id, epoch_us(r.arrived_at) FROM {RESTATEMENTS} r "
            f"LEFT JOIN {BATCHES} b ON b.batch_id = r.batch_id WHERE coalesce(b.collection, ?) = ?",
            [self.collection, self.collection],
        ).fetchall()
        return {drop: [batch, arrived] for drop, batch, arrived in rows}

    def seal_restatement(self, con: duckdb.DuckDBPyConnection, drop: str, by: str = "pipeline") -> None:
        """Seal a file sent again's record (what it restates, when it arrived: its order), in the
        caller's transaction."""
        record = self.restatements(con).get(drop)
        digest = json.dumps(record)
        con.execute(
            f"INSERT OR REPLACE INTO {TABLE} VALUES (?, ?, ?, 0, ?, ?, now(), ?)",
            [drop, RESTATED, self.collection, digest, self.mac(drop, RESTATED, 0, digest, None), by],
        )

    def _unsound_restatements(self, con: duckdb.DuckDBPyConnection) -> dict[str, str]:
        """Files sent again whose record differs from its seal (what it restates, its arrival), with why."""
        seals = _seals(con, self.collection, RESTATED)
        found = {}
        for drop, record in self.restatements(con).items():
            now, sealed = json.dumps(record), seals.get(drop)
            if sealed is None:
                found[drop] = "its record (the batch it restates, its arrival) has no seal"
            elif sealed[1] != now or not hmac.compare_digest(str(sealed[2]), self.mac(drop, RESTATED, 0, now, None)):
                found[drop] = "its record (the batch it restates, its arrival) differs from its seal"
        return found

    def _why(self, batch: str | None, stage: str, now: tuple, sealed: tuple | None, record: list | None) -> str | None:
        if batch is None:
            return f"{stage} rows with no batch id (delete them: no decision can accept them)"
        if sealed is None:
            return f"its {stage} rows have no seal"
        rows, digest, mac = sealed
        if (rows, digest) != now:
            return f"its {stage} rows differ from their seal ({now[0]} rows now, {rows} sealed)"
        if not hmac.compare_digest(str(mac), self.mac(batch, stage, rows, digest, record)):
            return f"its {stage} seal does not verify under the audit key (or its batch record was changed)"
        return None


def _landed_entry(collection: str, detail: dict) -> dict:
    """The audit entry of a batch's landing (:data:`LANDED_ACTION`)."""
    return {"actor": "safehaven", "role": "pipeline", "action": LANDED_ACTION, "object": collection, "detail": detail}


def _list(values: list[str]) -> str:
    """A SQL list literal of batch ids (quoted)."""
    return "[" + ", ".join(lit(v) for v in values) + "]::VARCHAR[]"


def _seals(con: duckdb.DuckDBPyConnection, collection: str, stage: str) -> dict[str, tuple]:
    rows = con.execute(
        f"SELECT batch_id, rows, digest, mac FROM {TABLE} WHERE collection = ? AND stage = ?", [collection, stage]
    ).fetchall()
    return {b: (int(n), str(d), m) for b, n, d, m in rows}


def _store_tampered(con: duckdb.DuckDBPyConnection, sealer: Sealer) -> str | None:
    """A reason that makes every batch unsound: a function stored in the store, or a landing table
    (or the seal table) that is not a plain table."""
    if functions_stored(con):
        return "the store holds a function of its own, which could stand in for the digest's hash"
    names = [sealer.table(LANDED), sealer.table(VALID), f"{sealer.collection}_rejected"]
    odd = con.execute(
        f"SELECT count(*) FROM information_schema.tables WHERE table_catalog = '{CATALOG}' "
        "AND table_type <> 'BASE TABLE' AND ((table_schema = 'landing' AND list_contains(?, table_name)) "
        "OR (table_schema || '.' || table_name = ?))",
        [names, TABLE],
    ).fetchone()[0]
    return "a landing table of the collection is not a plain table" if odd else None


def _started(con: duckdb.DuckDBPyConnection, collection: str) -> bool:
    if not table_exists(con, *audit.TABLE.split(".")):
        return False
    return bool(
        con.execute(
            f"SELECT count(*) FROM {audit.TABLE} WHERE action = ? AND object = ?", [STARTED, collection]
        ).fetchone()[0]
    )


def sealer(con: duckdb.DuckDBPyConnection, collection: str, home: Home | None = None) -> Sealer:
    """The collection's sealer. The first time, every batch and restatement it holds is sealed as
    it stands, once the whole audit trail verifies, and that is audited (module docstring, "Starting")."""
    schema.ensure(con, BATCHES, RESTATEMENTS, TABLE)
    if not _started(con, collection):
        _start(con, collection, home)
    return Sealer(collection, audit.derived_key(con, _INFO, home))


def sealer_for(con: duckdb.DuckDBPyConnection, contract: Contract, home: Home | None) -> Sealer | None:
    """The sealer an intake step passes to landing and validation: for an objections contract
    (None for another kind)."""
    return sealer(con, contract.collection, home) if contract.kind == "objections" else None


def _start(con: duckdb.DuckDBPyConnection, collection: str, home: Home | None) -> None:
    """Seal what the collection holds as it stands, then audit that. A trail with no entry has no
    audit key, so one entry (``objections.batch_seals_keyed``) comes first to make it; a run killed
    after it and before the seal starts again (the start is audited last)."""
    holding = sum(len(batches) for batches in _held(con, collection).values())
    if holding and not _audit_key_exists(con, home):
        detail = {"batches_held": holding}
        audit.append(con, actor="safehaven", role="pipeline", action=KEYED, object=collection, detail=detail, home=home)
    if holding:
        _seal_held(con, collection, home)
    detail = {"batches_sealed_as_they_stood": holding}
    audit.append(con, actor="safehaven", role="pipeline", action=STARTED, object=collection, detail=detail, home=home)


def _held(con: duckdb.DuckDBPyConnection, collection: str) -> dict[str, list[str]]:
    """The collection's batches by the stage they are checked at: still landed, or validated."""
    rows = con.execute(
        f"SELECT batch_id, status FROM {BATCHES} WHERE collection = ? AND status IN (?, ?, ?) ORDER BY batch_id",
        [collection, LANDED, *VALIDATED],
    ).fetchall()
    return {LANDED: [b for b, s in rows if s == LANDED], VALID: [b for b, s in rows if s != LANDED]}


def _audit_key_exists(con: duckdb.DuckDBPyConnection, home: Home | None) -> bool:
    try:
        audit.derived_key(con, _INFO, home)
    except KeyRingError:
        return False
    return True


def _seal_held(con: duckdb.DuckDBPyConnection, collection: str, home: Home | None) -> None:
    """Seal every batch and restatement the collection holds as it stands, once the whole audit trail verifies."""
    verified = audit.verify(con, home)
    if not verified.ok:
        raise audit.AuditTrailBroken(verified)
    first = Sealer(collection, audit.derived_key(con, _INFO, home))
    with transaction(con):
        for stage, batches in first.held(con).items():
            first.seal(con, stage, batches)
        for drop in first.restatements(con):
            first.seal_restatement(con, drop)


def check(con: duckdb.DuckDBPyConnection, collection: str, home: Home | None = None) -> tuple[str | None, dict]:
    """Why record-level releases must not run because of the collection's seals (None: every batch
    and restatement is sound), and the unsound ones with why. A haven that has not started sealing
    starts here (:func:`sealer`)."""
    if not table_exists(con, *BATCHES.split(".")):
        return None, {}
    try:
        bad = sealer(con, collection, home).unsound(con)
    except (KeyRingError, audit.AuditTrailBroken) as exc:
        return f"the objections batches' seals cannot be checked ({exc}): fix the audit trail or key first", {}
    if not bad:
        return None, {}
    named = "; ".join(f"{_shown(con, b)}: {why}" for b, why in list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return (
        f"{len(bad)} objections batch(es) or files sent again differ from their seal ({named}{more}): rows were "
        "added, changed or removed outside the haven, so the register does not take them in; restore the rows from "
        "a backup, or once a person has checked them with the sender: safehaven objections accept-batch <batch or "
        "drop> --by <name> --reason <text>"
    ), bad


def problem(con: duckdb.DuckDBPyConnection, collection: str, home: Home | None = None) -> str | None:
    """Why record-level releases must not run because of the collection's seals (:func:`check`)."""
    return check(con, collection, home)[0]


def _shown(con: duckdb.DuckDBPyConnection, key: str) -> str:
    row = con.execute(f"SELECT file_name FROM {BATCHES} WHERE batch_id = ?", [key]).fetchone()
    if row is None:
        row = con.execute(f"SELECT file_name FROM {RESTATEMENTS} WHERE drop_key = ?", [key]).fetchone()
        return f"file sent again {key}" if row is not None else f"batch {key[:12]}"
    return f"batch {key[:12]}" + (f" ({row[0]})" if row[0] else "")


def accept(
    con: duckdb.DuckDBPyConnection, collection: str, key: str, home: Home | None, *, by: str, reason: str
) -> dict[str, object]:
    """A person's decision that an unsound batch's rows (or a restatement's record), as they now
    stand, are right (checked with the sender, or restored): audited (``objections.batch_accepted``),
    then sealed at every stage that differs. ``key``: a batch id (or 12+ characters of it), or a
    drop key of a file sent again. Rows with no batch id cannot be accepted: they are deleted."""
    if not by.strip() or not reason.strip():
        raise ValueError("a decision needs the person's name and a reason")
    current = sealer(con, collection, home)
    bad = current.unsound(con)
    matches = [b for b in bad if b != NO_BATCH and (b == key or (len(key) >= 12 and b.startswith(key)))]
    if len(matches) != 1:
        raise ValueError(
            f"no single unsound objections batch or file sent again is {key!r} (safehaven objections faults)"
        )
    chosen = matches[0]
    if chosen in current.missing(con):
        stages = [LOST]  # its loss accepted: nothing is left to seal
    elif chosen in current.restatements(con):
        stages = [RESTATED]
    else:
        stages = [stage for stage, found in current.unsound_by_stage(con).items() if chosen in found]
    detail = {"batch": chosen, "stages": stages, "was": bad[chosen], "reason": reason[:500]}
    audit.append(con, actor=by, role="governance", action=ACCEPTED, object=collection, detail=detail, home=home)
    with transaction(con):
        for stage in (s for s in stages if s != LOST):
            if stage == RESTATED:
                current.seal_restatement(con, chosen, by=by)
            else:
                current.seal(con, stage, [chosen], by=by)
    return {"batch": chosen, "stages": stages}
