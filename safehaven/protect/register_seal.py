"""The objection register is sealed in the audit trail: an edit made outside the haven stops
record-level releases until a person decides.

Rule (CoP 11-14 and 23d; guide Rule 4B; ``docs/rules.md`` "Objections"): a missing objection lets
a record out that must not leave, so the register must not lapse silently. It lives in the
encrypted store, which anyone holding the store key can edit (DuckDB has no triggers to forbid
it): deleting an objector's events, or appending a withdrawal, would let their records out while
every check carried on. So:

* **Seal.** Each change the haven makes to ``governance.objection_events`` (the register step,
  a haven key rotation) ends with an audit entry ``objections.sealed`` recording the register's
  row count, highest ``event_id`` and digest (:func:`state`). The audit trail is keyed,
  chained and anchored outside the store (``safehaven.core.audit``), so a seal cannot be
  removed, replaced by an older one, or forged by someone holding only the store key.
* **Check** (:func:`problem`): the register's current state must equal the last seal. The
  release guard (``safehaven.protect.feed.feed_problems``) refuses every record-level release,
  in this run and every later one, while it does not. The seal is read only through the verified
  trail (``audit.authentic_from``: its entry's hash and every link after it, the tail against
  its anchor), so a seal edited in the store is never trusted. A register that is not a plain
  table of numbered events (a view in its place, a function or macro stored in the store that
  could stand in for ``hash``, an event with no number or a repeated one) equals no seal.
* **A crash between a change and its seal is not a breach** (:func:`catch_up`): the register
  step first checks that the events up to the sealed ``event_id`` still equal the seal, and
  that every later event restates a landed, validated objections row exactly (its pseudonym,
  type and dates, recomputed from the row with the haven key), and repeats a row registered
  before the seal, or states a withdrawal held as stale and not yet applied, only without a
  withdrawn date (a restatement only repeats a row to keep an objection in force); then it
  seals. Anything else (an event deleted, changed, or added that no landed row states, an old
  withdrawal replayed, a stale one applied with SQL) is left unsealed. After a haven key rotation
  killed before its seal (every pseudonym changed), the register is accepted when it has the
  sealed numbers of events and each states its landed row exactly under the new key.
* **Clearing it** needs a person: ``safehaven objections seal --by <name> --reason <text>`` seals
  the register as it now stands (audited as ``objections.resealed``), once they have restored
  it (e.g. from a backup) or established that the change is right.
* A haven whose register was never sealed (made before this rule) is sealed by its next
  register step as it stands (audited): there is no earlier seal to compare with.

The digest is SHA-256 over the events in ``event_id`` order, each as typed JSON
(``safehaven.core.digests.sealed_rows_sql``): no edit, however crafted, keeps it (a sum of
DuckDB's 64-bit row hashes, the form of seals made before, can be matched by choosing one
column's value; such a seal is checked in its own form once and the next register step seals
again). Limits: someone holding the audit key as well can re-seal, which the audit trail's
external anchors show. The landed
objections rows the register is built from are sealed batch by batch where they are written
(``safehaven.intake.batch_seal``): the register step takes in rows of sound batches only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

import duckdb

from safehaven.core import audit, schema
from safehaven.core.digests import sealed_rows
from safehaven.core.home import Home
from safehaven.core.store import CATALOG, functions_stored, table_exists
from safehaven.intake import batch_seal
from safehaven.intake.contracts import Contract
from safehaven.protect.objections import (
    EVENTS,
    HELD,
    RESTATEMENTS,
    HeldApplied,
    apply_held,
    apply_held_batch,
    pid_sql,
    register_objections,
)

#: the audit action of a seal made by the haven, and of one a person records (:func:`reseal`)
SEALED = "objections.sealed"
RESEALED = "objections.resealed"
#: the audit action of a person applying withdrawals held from a file sent again, or from a new
#: batch whose statements were stale
HELD_APPLIED = "objections.held_applied"
#: the audit entries' object
OBJECT = EVENTS
#: the columns digested: every column (a change to any of them is an edit)
_COLUMNS = (
    "event_id, pid, objection_type, recorded_date, withdrawn_date, source_practice, _batch, _row, registered_at, key_id"
)


#: the digest a seal records: SHA-256 over the events in order (``core.digests.sealed_rows_sql``);
#: seals made before it (no ``digest_form``) hold the :data:`LEGACY_FORM`, a sum of DuckDB row
#: hashes that a crafted edit can match: such a seal is checked in its own form, once, and the
#: next register step seals again in this one
DIGEST_FORM, LEGACY_FORM = 2, 1


@dataclass(frozen=True)
class State:
    """The register's row count, highest event id and digest (hex), and the digest's form."""

    rows: int
    last_event: int
    digest: str
    form: int = DIGEST_FORM

    def as_detail(self) -> dict[str, object]:
        return {"rows": self.rows, "last_event": self.last_event, "digest": self.digest, "digest_form": self.form}


#: a seal that could not be verified, or a register that cannot be digested as it is (equal to nothing)
UNVERIFIED = State(-1, -1, "unverified", 0)
MALFORMED = State(-1, -1, "malformed", 0)


def state(con: duckdb.DuckDBPyConnection, up_to: int | None = None, form: int = DIGEST_FORM) -> State:
    """The register's state (with ``up_to``: of the events with ``event_id <= up_to``) in the
    digest ``form``; :data:`MALFORMED` when it cannot be trusted as the haven made it (:func:`_malformed`)."""
    if not table_exists(con, *EVENTS.split(".")):
        return State(0, 0, _digest(0, 0, 0) if form == LEGACY_FORM else _EMPTY, form)
    if _malformed(con):
        return MALFORMED
    where = "" if up_to is None else f"WHERE event_id <= {int(up_to)}"
    if form == LEGACY_FORM:
        return _legacy_state(con, where)
    rows, last = con.execute(f"SELECT count(*), coalesce(max(event_id), 0) FROM {EVENTS} {where}").fetchone()
    found = next(iter(sealed_rows(con, EVENTS, "t.event_id", where=where)), None)
    return State(int(rows), int(last), found[2] if found else _EMPTY, form)


#: the digest of a register with no events
_EMPTY = hashlib.sha256(b"").hexdigest()


def _legacy_state(con: duckdb.DuckDBPyConnection, where: str) -> State:
    """The register's state in the :data:`LEGACY_FORM` (two seeded row-hash sums with the count)."""
    rows, last, first, second = con.execute(
        f"SELECT count(*), coalesce(max(event_id), 0), coalesce(sum(hash({_COLUMNS})::HUGEINT), 0), "
        f"coalesce(sum(hash({_COLUMNS}, 'seal')::HUGEINT), 0) FROM {EVENTS} {where}"
    ).fetchone()
    return State(int(rows), int(last), _digest(rows, first, second), LEGACY_FORM)


def _malformed(con: duckdb.DuckDBPyConnection) -> bool:
    """The register is not a plain table of numbered events: a view in its place, a function or
    macro stored in the store (which could stand in for ``hash`` or ``sum``: the haven stores
    none, its macros are temporary), or an event with no number or a number used twice (invisible
    to an ``event_id`` range, yet taken as registered)."""
    schema, name = EVENTS.split(".")
    kind = con.execute(
        f"SELECT table_type FROM information_schema.tables WHERE table_catalog = '{CATALOG}' "
        "AND table_schema = ? AND table_name = ?",
        [schema, name],
    ).fetchone()
    unnumbered = con.execute(
        f"SELECT count(*) FILTER (WHERE event_id IS NULL) + count(event_id) - count(DISTINCT event_id) FROM {EVENTS}"
    ).fetchone()[0]
    return kind is None or kind[0] != "BASE TABLE" or functions_stored(con) or unnumbered > 0


def _digest(rows: int, first: int, second: int) -> str:
    return hashlib.sha256(f"{rows}:{first}:{second}".encode()).hexdigest()


def last_seal(con: duckdb.DuckDBPyConnection, home: Home | None = None) -> State | None:
    """The register's state as the latest seal in the audit trail recorded it (None: never sealed).

    The seal is trusted only when the trail from it to its anchored end verifies (its hash under
    the audit key and every link after it: ``audit.authentic_from``), so an entry edited in the
    store is never read as a seal; with no seal found, only when the whole trail verifies (a seal
    renamed away would otherwise pass for "never sealed"). Otherwise :data:`UNVERIFIED`, which no
    register equals (fails closed)."""
    if not table_exists(con, *audit.TABLE.split(".")):
        return None
    row = con.execute(
        f"SELECT seq, detail FROM {audit.TABLE} WHERE action IN (?, ?) AND object = ? ORDER BY seq DESC LIMIT 1",
        [SEALED, RESEALED, OBJECT],
    ).fetchone()
    if row is None:
        empty = con.execute(f"SELECT count(*) = 0 FROM {audit.TABLE}").fetchone()[0]
        return None if empty or audit.verify(con, home).ok else UNVERIFIED
    if not audit.authentic_from(con, int(row[0]), home):
        return UNVERIFIED
    detail = json.loads(row[1]) if row[1] else {}
    try:
        form = int(detail.get("digest_form", LEGACY_FORM))
        sealed = State(int(detail["rows"]), int(detail["last_event"]), str(detail["digest"]), form)
    except (AttributeError, KeyError, TypeError, ValueError):
        return UNVERIFIED
    return sealed if form in (DIGEST_FORM, LEGACY_FORM) else UNVERIFIED


def problem(con: duckdb.DuckDBPyConnection, home: Home | None = None) -> str | None:
    """Why record-level releases must not run because of the register's seal (None: it matches,
    or it was never sealed)."""
    sealed = last_seal(con, home)
    if sealed is None:
        return None
    now = state(con, form=sealed.form)
    if now == sealed:
        return None
    return (
        f"the objection register differs from its last seal in the audit trail ({_described(now)} now, "
        f"{_described(sealed)} sealed): events were deleted, changed or added outside the haven, or a run stopped "
        "after registering objections; run the objection register again (safehaven run), and if it still "
        "differs, restore the register and record a decision: safehaven objections seal --by <name> --reason <text>"
    )


def _described(at: State) -> str:
    if at == MALFORMED:
        return "not a plain table of numbered events"
    if at == UNVERIFIED:
        return "a seal that does not verify"
    return f"{at.rows} events up to event {at.last_event}, digest {at.digest[:12]}"


def _unstated_events(
    con: duckdb.DuckDBPyConnection, after: int, collection: str, pid_sql: str, excluded: Collection[str] = ()
) -> int:
    """Events after ``after`` that the haven could not have appended: one that no landed, validated
    objections row of a sound batch (not ``excluded``, ``safehaven.intake.batch_seal``) states
    exactly, or one that repeats a row registered by then (a restatement only ever repeats a row
    to keep an objection in force) or states a withdrawal held as stale and not applied (only a
    person's decision applies it, sealed with it) with a withdrawn date."""
    valid = f"landing.{collection}_valid"
    schema.ensure(con, HELD)  # a store made before withdrawals were held as stale has none yet
    if not table_exists(con, "landing", f"{collection}_valid"):
        return int(con.execute(f"SELECT count(*) FROM {EVENTS} WHERE event_id > ?", [after]).fetchone()[0])
    stated = (
        f"EXISTS (SELECT 1 FROM {valid} v WHERE v._batch = e._batch AND v._row = e._row AND {pid_sql} = e.pid "
        "AND NOT list_contains(?::VARCHAR[], v._batch) "
        "AND v.objection_type = e.objection_type AND CAST(v.recorded_date AS DATE) = e.recorded_date "
        "AND CAST(v.withdrawn_date AS DATE) IS NOT DISTINCT FROM e.withdrawn_date)"
    )
    repeated = f"EXISTS (SELECT 1 FROM {EVENTS} o WHERE o.event_id <= ? AND o._batch = e._batch AND o._row = e._row)"
    held = f"EXISTS (SELECT 1 FROM {HELD} h WHERE h.batch_id = e._batch AND h._row = e._row AND h.applied_at IS NULL)"
    return int(
        con.execute(
            f"SELECT count(*) FROM {EVENTS} e WHERE e.event_id > ? "
            f"AND (NOT {stated} OR (({repeated} OR {held}) AND e.withdrawn_date IS NOT NULL))",
            [after, list(excluded), after],
        ).fetchone()[0]
    )


def catch_up(
    con: duckdb.DuckDBPyConnection,
    collection: str,
    pid_sql: str,
    home: Home | None = None,
    excluded: Collection[str] = (),
) -> bool:
    """Before the register step changes the register: True when it matches its last seal, was
    never sealed, or differs only by events the haven appended after it (a run stopped between a
    change and its seal: each later event restates a landed row of a sound batch, not
    ``excluded``, exactly; module docstring). ``pid_sql``: the pseudonym of a landed row ``v``
    (the haven key installed)."""
    sealed = last_seal(con, home)
    now = state(con, form=sealed.form if sealed else DIGEST_FORM)
    if sealed is None or now == sealed:
        return True
    if now == MALFORMED or sealed == UNVERIFIED:
        return False
    if _rekeyed_since_seal(con) and (now.rows, now.last_event) == (sealed.rows, sealed.last_event):
        return _unstated_events(con, 0, collection, pid_sql, excluded) == 0  # every event, under the new key
    if state(con, up_to=sealed.last_event, form=sealed.form) != sealed:
        return False
    return _unstated_events(con, sealed.last_event, collection, pid_sql, excluded) == 0


def _rekeyed_since_seal(con: duckdb.DuckDBPyConnection) -> bool:
    """A haven key rotation is in the (verified) trail after the last seal: a rotation killed
    between its commit and its seal changed every pseudonym, so the next register step accepts
    the register if it has the sealed numbers of events and each states its landed row exactly."""
    return bool(
        con.execute(
            f"SELECT count(*) FROM {audit.TABLE} WHERE action = 'key.rotate' AND object = 'key:haven' AND seq > "
            f"(SELECT max(seq) FROM {audit.TABLE} WHERE action IN (?, ?) AND object = ?)",
            [SEALED, RESEALED, OBJECT],
        ).fetchone()[0]
    )


def seal(
    con: duckdb.DuckDBPyConnection, home: Home | None, *, actor: str, role: str = "pipeline", now: State | None = None
) -> State:
    """Record the register's state (``now``, else as it stands) in the audit trail
    (``objections.sealed``); returns it."""
    now = now or state(con)
    audit.append(con, actor=actor, role=role, action=SEALED, object=OBJECT, detail=now.as_detail(), home=home)
    return now


def reseal(con: duckdb.DuckDBPyConnection, home: Home | None, *, by: str, reason: str) -> State:
    """A person's decision: seal the register as it now stands (``objections.resealed``, with the
    state it replaces and their reason; module docstring, "Clearing it")."""
    if not by.strip() or not reason.strip():
        raise ValueError("a decision needs the person's name and a reason")
    before, now = last_seal(con, home), state(con)
    if now == MALFORMED:
        raise ValueError(
            "the register cannot be sealed as it is (a view in its place, a function stored in the store, or an "
            "event with no number or a repeated one): restore governance.objection_events from a backup first"
        )
    detail = {**now.as_detail(), "replaces": before.as_detail() if before else None, "reason": reason[:500]}
    audit.append(con, actor=by, role="governance", action=RESEALED, object=OBJECT, detail=detail, home=home)
    return now


def register_and_seal(
    con: duckdb.DuckDBPyConnection,
    contract: Contract,
    key_id: str,
    home: Home | None,
    *,
    actor: str,
    waiting_since: datetime | None = None,
) -> tuple[int, bool]:
    """The register step: check the register against its seal (:func:`catch_up`), register what
    arrived (``register_objections``) from sound batches only (``safehaven.intake.batch_seal``:
    a batch whose rows differ from their seal stays pending), and seal the result only if the
    check passed (a register edited outside the haven stays unsealed, so record-level releases
    stay refused). Needs the haven key installed as ``haven``. Returns the events added and
    whether the register is sealed."""
    unsound = batch_seal.sealer(con, contract.collection, home).unsound(con)
    intact = catch_up(con, contract.collection, pid_sql(contract), home, excluded=unsound)
    added = register_objections(con, contract, key_id, waiting_since=waiting_since, excluded=unsound)
    now = state(con)
    if intact and now != MALFORMED and now != last_seal(con, home):
        seal(con, home, actor=actor, now=now)
    return added, intact


def held_withdrawals(con: duckdb.DuckDBPyConnection) -> list[dict[str, object]]:
    """Withdrawals held and not yet applied (shown name and count): those of files sent again (by
    drop key), then those of new batches whose statements were stale (by ``batch`` id;
    ``safehaven.protect.objections._register_batch``), each in arrival order."""
    found: list[dict[str, object]] = []
    if table_exists(con, *RESTATEMENTS.split(".")):
        rows = con.execute(
            f"SELECT drop_key, file_name, withdrawals_held FROM {RESTATEMENTS} WHERE withdrawals_held > 0 "
            "AND held_applied_at IS NULL ORDER BY arrived_at"
        ).fetchall()
        found += [{"drop": d, "file": f, "withdrawals_held": int(n)} for d, f, n in rows]
    if table_exists(con, *HELD.split(".")):
        rows = con.execute(
            f"SELECT h.batch_id, any_value(b.file_name), count(*) FROM {HELD} h LEFT JOIN {batch_seal.BATCHES} b "
            "USING (batch_id) WHERE h.statement AND h.applied_at IS NULL GROUP BY h.batch_id "
            "ORDER BY min(coalesce(b.arrived_at, b.landed_at)), h.batch_id"
        ).fetchall()
        found += [{"batch": d, "file": f, "withdrawals_held": int(n), "stale": True} for d, f, n in rows]
    return found


def apply_held_withdrawals(
    con: duckdb.DuckDBPyConnection,
    contract: Contract,
    drop: str,
    key_id: str,
    home: Home | None,
    *,
    by: str,
    reason: str,
) -> HeldApplied:
    """A person's decision that the withdrawals held from a file sent again (``drop``, its drop key)
    or from a new batch whose statements were stale (``drop``, its batch id) are genuine (e.g. the
    sender confirmed a new withdrawal whose records equal an old file's, or a withdrawal dated
    before the objection it ends was last stated): applied (``objections.apply_held``,
    ``objections.apply_held_batch``), audited (``objections.held_applied``, with their reason) and
    sealed. Refused while the register differs from its seal (that comes first). The haven key
    must be installed as ``haven``. A held withdrawal whose episode the register was told again
    since the hold is not applied (``objections.SUPERSEDED``): counted as ``superseded`` in the
    result and the audit entry (a count, never a value). Returns the events added and that count."""
    if not by.strip() or not reason.strip():
        raise ValueError("a decision needs the person's name and a reason")
    tampered = problem(con, home)
    if tampered:
        raise ValueError(f"record a decision on the register's seal first: {tampered}")
    unsound = batch_seal.sealer(con, contract.collection, home).unsound(con)
    restated = con.execute(f"SELECT batch_id FROM {RESTATEMENTS} WHERE drop_key = ?", [drop]).fetchone()
    for key in (drop, restated[0] if restated else None):
        if key in unsound:
            raise ValueError(f"{key} differs from its seal ({unsound[key]}): decide that first")
    stale = restated is None and _holds_stale(con, drop)
    if restated is None and not stale:
        raise ValueError(
            f"no file sent again with withdrawals held has the drop key {drop!r}, and no objections batch with "
            "withdrawals held not yet applied has that id: safehaven objections faults lists them"
        )
    applied = (apply_held_batch if stale else apply_held)(con, contract, drop, key_id)
    detail = {
        "batch" if stale else "drop": drop,
        "events_added": applied.added,
        "superseded": applied.superseded,
        "reason": reason[:500],
    }
    audit.append(con, actor=by, role="governance", action=HELD_APPLIED, object=OBJECT, detail=detail, home=home)
    seal(con, home, actor=by, role="governance")
    return applied


def _holds_stale(con: duckdb.DuckDBPyConnection, batch: str) -> bool:
    """``batch`` names a new objections batch with withdrawals held as stale, not yet applied."""
    schema.ensure(con, HELD)
    found = con.execute(
        f"SELECT count(*) FROM {HELD} WHERE batch_id = ? AND statement AND applied_at IS NULL", [batch]
    ).fetchone()[0]
    return bool(found)
