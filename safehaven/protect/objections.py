"""The objection register, the type 1 rule and the objection-rate monitor.

Rules (CoP 11-14, 25; confidentiality guide Rule 4; "rules for sharing" page; Government
response to the Caldicott review 7.15):

* **Register.** Objections arrive as ``objections`` drops and are validated like any
  collection (canonical NHS number, type, recorded date, withdrawn date, source practice).
  ``governance.objection_events`` is an append-only history: one event per statement a drop
  makes, numbered in the order the haven learnt it (``event_id``: batch landing time, then
  row), with the time it was registered. It is keyed by the haven pseudonym of the canonical
  NHS number, never the number itself; the number goes to the identity vault
  (``safehaven.protect.vault``) like every other direct identifier (CoP 14a: record objections).
* **Current state is derived, never stored.** A person's objection *episode* is identified
  by (pid, type, recorded date); the latest statement about an episode wins (so a later drop
  that restates it with a withdrawn date withdraws it). An objection is in force on day ``d``
  when some episode has ``recorded_date <= d`` and no ``withdrawn_date <= d``: it applies
  from its recorded date and stops applying on its withdrawn date. **A file sent again** (the
  bytes or records of a batch already landed) restates that batch's statements, registered in
  arrival order where they keep an objection in force, never where they would end one
  (:func:`register_restatements`). **A new file repeating an old withdrawal** (an old extract
  regenerated, one row differing, so a new batch) is judged too (:func:`_judge_batch`): a
  statement that would end or shorten an objection the register holds is *held*, not applied,
  when its withdrawn date is on or before the day the register learnt the statement it
  contradicts (:func:`learnt_sql`: the latest time the haven was told it, by that event, its
  batch's arrival, or a file sent again or same-records copy stating it, which adds no event; on
  the haven's UK calendar day; the same day is held). The sender knew of that withdrawal when it
  stated the objection in force, so repeating it later is stale; a withdrawal made since carries
  a later date and applies. A file listing an
  episode's history is judged by its last statement about it; held withdrawals are recorded in
  ``governance.objection_withdrawals_held`` (so they are neither pending nor registered again),
  the rest of the batch registers as ever, and a person applies them
  (``safehaven objections apply-held <batch>``, :func:`apply_held_batch`; audited), except one
  whose episode the register was told again since it was held (:data:`SUPERSEDED`: counted, not
  applied; a decision made on outdated information). Reading the register
  "as known at" an earlier time (``known_at``) uses only the events registered by then; the
  notices to recipients (``safehaven.protect.optouts``) compare these two views.
* **Formatting never lets an objector through.** Objections and records are matched on the
  pseudonym of the *canonical* NHS number (``safehaven.core.identifiers``): "943 476 5919",
  "9434765919" and "943-476-5919" are one person.
* **Type 1** (the patient's data must not leave the GP practice for purposes beyond direct
  care; guide Rule 4B, rules-for-sharing page): records in a GP-sourced collection (one whose
  contract names a ``practice_field``) about a person with a type 1 objection in force should
  never have been sent. They are dropped before the haven (``safehaven.protect.haven``), counted per
  sending practice, and recorded as an incident in ``governance.type1_incidents`` and in the
  breach register (``safehaven.core.registers.record_breach``).
* **Objection-rate monitor** (Govt response 7.15: "The HSCIC is monitoring the rate of
  objections. Where there appears to be an abnormal number of objections, the BMA and NHS
  England will explore with practices why"): see ``objection_rates``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import NamedTuple

import duckdb

from safehaven.core import days, schema
from safehaven.core.days import haven_today_sql
from safehaven.core.identifiers import canonical_nhs_sql
from safehaven.core.registers import record_breach
from safehaven.core.sql import haven_day_sql, lit, q
from safehaven.core.store import insert_values, transaction
from safehaven.intake.contracts import Contract
from safehaven.protect.pseudonymise import hmac_sql

EVENTS = schema.OBJECTION_EVENTS
RESTATEMENTS = schema.OBJECTION_RESTATEMENTS
HELD = schema.OBJECTION_WITHDRAWALS_HELD
TYPE1_INCIDENTS = schema.TYPE1_INCIDENTS
REGISTRATIONS = schema.PRACTICE_REGISTRATIONS
MEMBERS_SEEDED = schema.PRACTICE_MEMBERS_SEEDED
RATES = schema.OBJECTION_RATES
#: The tables :func:`ensure_tables` makes (the monitor's table is made whole by :func:`save_rates`).
TABLES = (EVENTS, TYPE1_INCIDENTS, REGISTRATIONS, MEMBERS_SEEDED, RESTATEMENTS, HELD)

TYPE1 = "type1"
NATIONAL_OPT_OUT = "national_opt_out"
TYPES = (TYPE1, NATIONAL_OPT_OUT)

#: Two-sided 99.8% funnel-plot control limit (Spiegelhalter 2005): mean +/- 3.09 SD ...
Z_998 = 3.090232306167813
#: ... whose upper limit leaves 0.1% of the binomial distribution above it.
ALPHA_UPPER = 0.001

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?([+-]\d{2}(:?\d{2})?|Z)?")


#: the word an as-of date may be given as for "the haven's day": kept as DuckDB's name, never
#: rendered as DuckDB's ``current_date`` (the host's day)
TODAY = "current_date"


def as_of_sql(as_of: str | date | datetime | None = None) -> str:
    """A safe SQL DATE expression for an as-of date: a date, ``YYYY-MM-DD``, or (``None`` or
    ``"current_date"``) the haven's day, ``safehaven.core.days.haven_today_sql``: the UK calendar
    day, whatever the host's zone, as the objection dates are UK dates (CoP 11-14; NDOP: an
    objection applies from its recorded date). DuckDB's ``current_date`` is the host's day: from
    00:00 to 01:00 BST on a UTC host it is yesterday, and an objection recorded today was not yet in
    force (fail open)."""
    if as_of is None:
        return haven_today_sql()
    if isinstance(as_of, datetime):
        return f"DATE '{as_of.date().isoformat()}'"
    if isinstance(as_of, date):
        return f"DATE '{as_of.isoformat()}'"
    text = as_of.strip()
    if text.lower() == TODAY:
        return haven_today_sql()
    if _DATE.fullmatch(text):
        return f"DATE '{text}'"
    raise ValueError(f"as_of must be 'current_date' or a YYYY-MM-DD date, not {as_of!r}")


def known_at_sql(known_at: str | datetime) -> str:
    """A safe SQL TIMESTAMPTZ literal for a 'known at' time."""
    text = known_at.isoformat() if isinstance(known_at, datetime) else known_at.strip()
    if not _TIMESTAMP.fullmatch(text):
        raise ValueError(f"known_at must be an ISO timestamp, not {known_at!r}")
    return f"TIMESTAMPTZ '{text}'"


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create the register, the type 1 incident log and the practice registrations."""
    schema.ensure(con, *TABLES)


def register_objections(
    con: duckdb.DuckDBPyConnection,
    contract: Contract,
    key_id: str = "",
    waiting_since: datetime | None = None,
    excluded: Collection[str] = (),
) -> int:
    """Append newly validated objection rows, and the statements of objections files received
    again (:func:`register_restatements`), to the register, in the order they arrived
    (idempotent: by batch and row; by restatement).

    Needs the haven key installed as ``haven`` (``safehaven.protect.pseudonymise.install_key``). The
    NHS number is canonicalised again here, so the register never depends on a caller having
    done it. Events are numbered in landing order (batch landing time, then row); a restatement's
    after every batch that arrived before it. A restatement waits (pending: record-level releases
    stay blocked, ``safehaven.protect.feed``) while a file that arrived before it is not yet
    registered: one still in ``incoming/`` and not yet judged (``waiting_since``: the earliest
    arrival there, ``safehaven.protect.feed.waiting_since``; not an entry refused but left there,
    which is never registered) or landed and not yet validated, since a withdrawal registered
    after it would override it.
    The rows of the ``excluded`` batches (their rows differ from their seal,
    ``safehaven.intake.batch_seal``) are not registered: they stay pending.
    """
    ensure_tables(con)
    pid = pid_sql(contract)
    added = 0
    for drop, arrived_at, batch_id in due_restatements(con, contract, waiting_since, excluded):
        added += _register_batches(con, contract, pid, key_id, arrived_by=arrived_at, excluded=excluded)
        added += register_restatements(con, contract, pid, key_id, drop, batch_id)
    return added + _register_batches(con, contract, pid, key_id, excluded=excluded)


def pid_sql(contract: Contract) -> str:
    """SQL of a landed objections row's haven pseudonym (of its canonical NHS number; the haven key
    installed as ``haven``)."""
    return hmac_sql(canonical_nhs_sql(q(contract.patient_key)), "haven")


def due_restatements(
    con: duckdb.DuckDBPyConnection,
    contract: Contract,
    waiting_since: datetime | None = None,
    excluded: Collection[str] = (),
) -> list[tuple[str, datetime, str]]:
    """Restatements to register now, in arrival order: those of an objections batch of this
    collection that arrived before any file still waiting (in ``incoming/`` and not yet judged
    since ``waiting_since``, ``safehaven.protect.feed.waiting_since``; landed and not validated;
    or ``excluded``: its rows differ from their seal,
    ``safehaven.intake.batch_seal``). Any other row (a forged one naming no such batch, or one of
    an excluded batch) stays pending, and so blocks record-level releases."""
    unvalidated = held_back_since(con, contract, excluded)
    first_waiting = min((t for t in (unvalidated, waiting_since) if t is not None), default=None)
    return con.execute(
        f"SELECT r.drop_key, r.arrived_at, r.batch_id FROM {RESTATEMENTS} r JOIN governance.batches b "
        "ON b.batch_id = r.batch_id AND b.collection = ? WHERE r.registered_at IS NULL AND r.arrived_at IS NOT NULL "
        "AND NOT list_contains(?::VARCHAR[], r.batch_id) AND NOT list_contains(?::VARCHAR[], r.drop_key) "
        "AND (CAST(? AS TIMESTAMPTZ) IS NULL OR r.arrived_at < ?) ORDER BY r.arrived_at, r.drop_key",
        [contract.collection, list(excluded), list(excluded), first_waiting, first_waiting],
    ).fetchall()


def held_back_since(
    con: duckdb.DuckDBPyConnection, contract: Contract, excluded: Collection[str] = ()
) -> datetime | None:
    """When the earliest batch not yet registrable arrived: one landed and not validated, or
    ``excluded`` (its rows differ from their seal). Nothing that arrived after it is registered
    before it, so an older statement never lands on top of a newer one (CoP 11-14; fail closed:
    releases are refused meanwhile, ``safehaven.protect.feed``)."""
    return con.execute(
        "SELECT min(coalesce(arrived_at, landed_at)) FROM governance.batches "
        "WHERE collection = ? AND (status = 'landed' OR list_contains(?::VARCHAR[], batch_id))",
        [contract.collection, list(excluded)],
    ).fetchone()[0]


#: SQL predicate: the statement ``s`` would end or shorten the objection episode ``l`` (the
#: register's latest statement about it) holds: a withdrawal where it has none, or an earlier one
ENDS = "(s.withdrawn_date IS NOT NULL AND (l.withdrawn_date IS NULL OR s.withdrawn_date < l.withdrawn_date))"


def unregistered_sql(v: str = "v") -> str:
    """SQL predicate over a valid objections row ``v``: not yet in the register, neither as an event
    nor as a withdrawal held as stale (:func:`_register_batch`; ``governance.objection_withdrawals_held``).
    Only a withdrawal is ever taken as held: an entry there naming a row that keeps an objection in
    force (forged) never keeps that row out of the register."""
    return (
        f"(NOT EXISTS (SELECT 1 FROM {EVENTS} e WHERE e._batch = {v}._batch AND e._row = {v}._row) "
        f"AND NOT ({v}.withdrawn_date IS NOT NULL AND EXISTS (SELECT 1 FROM {HELD} h "
        f"WHERE h.batch_id = {v}._batch AND h._row = {v}._row)))"
    )


def _register_batches(
    con: duckdb.DuckDBPyConnection,
    contract: Contract,
    pid: str,
    key_id: str,
    arrived_by: datetime | None = None,
    excluded: Collection[str] = (),
) -> int:
    """Register the valid rows of batches not yet registered that arrived by ``arrived_by`` and
    before any batch held back (:func:`held_back_since`), except rows of the ``excluded`` batches
    and rows with no batch id: batch by batch in landing order (:func:`_register_batch`), so each
    is judged against the register as the batches before it left it."""
    before = held_back_since(con, contract, excluded)
    by = "" if arrived_by is None else "AND coalesce(b.arrived_at, b.landed_at) <= ? "
    by += "" if before is None else "AND coalesce(b.arrived_at, b.landed_at) < ? "
    batches = con.execute(
        f"SELECT v._batch FROM landing.{contract.collection}_valid v LEFT JOIN governance.batches b "
        f"ON b.batch_id = v._batch WHERE v._batch IS NOT NULL AND NOT list_contains(?::VARCHAR[], v._batch) "
        f"AND {unregistered_sql()} {by}GROUP BY v._batch ORDER BY min(b.landed_at) NULLS LAST, v._batch",
        [list(excluded), *(t for t in (arrived_by, before) if t is not None)],
    ).fetchall()
    return sum(_register_batch(con, contract, pid, key_id, batch) for (batch,) in batches)


def _register_batch(con: duckdb.DuckDBPyConnection, contract: Contract, pid: str, key_id: str, batch: str) -> int:
    """Register one new batch's rows not yet registered, except the withdrawals of a stale statement
    (:func:`_judge_batch`): those are recorded in ``governance.objection_withdrawals_held`` (one row
    each, ``statement`` marking the episode's last), not applied, and the objection stays in force
    until a person applies them (:func:`apply_held_batch`). The rest of the batch registers as
    ever. In one transaction."""
    with transaction(con):
        _judge_batch(con, contract, pid, batch)
        con.execute(f"INSERT INTO {HELD} SELECT _batch, _row, is_last, now(), NULL FROM _judged WHERE held")
        (added,) = con.execute(
            f"INSERT INTO {EVENTS} SELECT (SELECT coalesce(max(event_id), 0) FROM {EVENTS}) "
            "+ row_number() OVER (ORDER BY _row), pid, objection_type, recorded_date, withdrawn_date, "
            "source_practice, _batch, _row, now(), ? FROM _judged WHERE NOT held",
            [key_id],
        ).fetchone()
        con.execute("DROP TABLE _judged")
    return int(added)


def _judge_batch(con: duckdb.DuckDBPyConnection, contract: Contract, pid: str, batch: str) -> None:
    """``_judged``: the batch's rows not yet registered, each marked ``held`` when it is a withdrawal
    about an episode whose last statement in the batch (a file may list an episode's history) is
    *stale*: it would end or shorten the objection the register holds (:data:`ENDS`) and its
    withdrawn date is on or before the day the register learnt the statement it contradicts
    (:func:`learnt_sql`). The sender knew of that withdrawal when it stated the objection in force,
    so a later file repeating it is an old extract regenerated, not news (CoP 11-14; fail closed:
    the same day, or a day unknown, is held). ``is_last`` marks each episode's last row."""
    stated = (
        f"SELECT {pid} AS pid, objection_type, recorded_date, withdrawn_date, source_practice, _batch, _row "
        f"FROM landing.{contract.collection}_valid v WHERE v._batch = {lit(batch)} AND {unregistered_sql()}"
    )
    rows = (
        "SELECT *, row_number() OVER (PARTITION BY pid, objection_type, recorded_date ORDER BY _row DESC) = 1 "
        f"AS is_last FROM ({stated})"
    )
    stale = (
        f"SELECT s.pid, s.objection_type, s.recorded_date FROM _rows s JOIN ({learnt_sql(contract, pid)}) l "
        f"USING (pid, objection_type, recorded_date) WHERE s.is_last AND {ENDS} "
        "AND coalesce(s.withdrawn_date <= l.learnt_on, true)"
    )
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _judged AS WITH _rows AS ({rows}), stale AS ({stale}) "
        "SELECT r.*, (r.withdrawn_date IS NOT NULL AND t.pid IS NOT NULL) AS held "
        "FROM _rows r LEFT JOIN stale t USING (pid, objection_type, recorded_date)"
    )


def learnt_sql(contract: Contract, pid: str) -> str:
    """SQL relation of objection episodes (pid, objection_type, recorded_date, withdrawn_date,
    learnt_at, learnt_on): the register's latest statement about each, and the latest time the haven
    was told it (CoP 11-14; fail closed: the later holds more), and that time's day in the haven's
    calendar (``safehaven.core.sql.haven_day_sql``). Told by: the latest event (the later of its
    registration and its batch's arrival), and every registered restatement (a file sent again, or
    a copy with the same records, ``safehaven.intake.ingest._note_restatement``) whose last
    statement about the episode equals it (:func:`restated_sql`; the later of its arrival and its
    registration): an unchanged daily list adds no event, yet the sender stated the episode again."""
    told = "greatest(e.registered_at, coalesce(b.arrived_at, b.landed_at, e.registered_at))"
    latest = (
        f"SELECT e.pid, e.objection_type, e.recorded_date, e.withdrawn_date, {told} AS told_at FROM {EVENTS} e "
        "LEFT JOIN governance.batches b ON b.batch_id = e._batch "
        "QUALIFY row_number() OVER (PARTITION BY e.pid, e.objection_type, e.recorded_date "
        "ORDER BY e.event_id DESC) = 1"
    )
    learnt_at = "greatest(l.told_at, max(r.told_at))"
    return (
        f"SELECT l.pid, l.objection_type, l.recorded_date, l.withdrawn_date, {learnt_at} AS learnt_at, "
        f"{haven_day_sql(learnt_at)} AS learnt_on FROM ({latest}) l LEFT JOIN ({restated_sql(contract, pid)}) r "
        "ON r.pid = l.pid AND r.objection_type = l.objection_type AND r.recorded_date = l.recorded_date "
        "AND r.withdrawn_date IS NOT DISTINCT FROM l.withdrawn_date GROUP BY l.pid, l.objection_type, l.recorded_date, "
        "l.withdrawn_date, l.told_at"
    )


def restated_sql(contract: Contract, pid: str) -> str:
    """SQL relation (pid, objection_type, recorded_date, withdrawn_date, told_at): each registered
    restatement's last statement about each episode (:func:`last_statements_sql`), told at the later
    of the restatement's arrival and its registration."""
    registered = f"SELECT * FROM {RESTATEMENTS} WHERE registered_at IS NOT NULL"
    stated = last_statements_sql(contract, pid, f"_batch IN (SELECT batch_id FROM ({registered}))")
    return (
        "SELECT s.pid, s.objection_type, s.recorded_date, s.withdrawn_date, "
        f"greatest(r.arrived_at, r.registered_at) AS told_at FROM ({registered}) r JOIN ({stated}) s "
        "ON s._batch = r.batch_id"
    )


def last_statements_sql(contract: Contract, pid: str, where: str) -> str:
    """SQL relation of the valid objections rows matching ``where``: each batch's last statement
    about each episode (a file may list an episode's history; its last row about it is what it
    states), with its pseudonym ``pid``."""
    return (
        f"SELECT {pid} AS pid, objection_type, CAST(recorded_date AS DATE) AS recorded_date, "
        f"CAST(withdrawn_date AS DATE) AS withdrawn_date, source_practice, _batch, _row "
        f"FROM landing.{contract.collection}_valid WHERE {where} "
        "QUALIFY row_number() OVER (PARTITION BY _batch, pid, objection_type, recorded_date ORDER BY _row DESC) = 1"
    )


def register_restatements(
    con: duckdb.DuckDBPyConnection, contract: Contract, pid: str, key_id: str, drop: str, batch_id: str
) -> int:
    """Register one restatement (``safehaven.intake.ingest._note_restatement``): the batch's
    statements, received again, as new events, where they differ from the register's latest
    statement about the episode and do not lift an objection (CoP 11-14; fail closed).

    A restated statement that keeps an objection in force longer (no withdrawn date where the
    register has one, or a later one) is appended, so re-sending a file undoes a withdrawal sent
    by mistake. One that would withdraw an objection the register holds, or bring its withdrawal
    forward, is *held*, not applied (counted in ``withdrawals_held``): a withdrawal takes effect
    from a file the haven has not seen, never from an old file sent again by accident. A
    statement equal to the register's latest adds nothing (an unchanged daily list); a file that
    lists an episode's history restates its last statement about it. In one transaction with the
    restatement's record; rows already registered are never changed."""
    with transaction(con):
        _compare_restated(con, contract, pid, batch_id)
        added = _append_restated(con, key_id, "appended")
        con.execute(
            f"UPDATE {RESTATEMENTS} SET registered_at = now(), statements = (SELECT count(*) FROM _restated), "
            "added = ?, withdrawals_held = (SELECT count(*) FILTER (WHERE held) FROM _restated) WHERE drop_key = ?",
            [added, drop],
        )
        con.execute("DROP TABLE _restated")
    return added


def _compare_restated(con: duckdb.DuckDBPyConnection, contract: Contract, pid: str, batch_id: str) -> None:
    """``_restated``: the batch's last statement about each episode (a file may list an episode's
    history), each marked ``appended`` (it keeps an objection in force longer, or is new) or
    ``held`` (it would end or shorten one the register holds), against the register's latest."""
    stated = last_statements_sql(contract, pid, f"_batch = {lit(batch_id)}")
    later = "(s.withdrawn_date IS NULL OR s.withdrawn_date > l.withdrawn_date)"
    appended = f"(l.pid IS NULL OR (l.withdrawn_date IS NOT NULL AND {later}))"
    held = f"(l.pid IS NOT NULL AND {ENDS})"
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _restated AS SELECT s.*, {appended} AS appended, {held} AS held "
        f"FROM ({stated}) s LEFT JOIN ({episodes_sql()}) l USING (pid, objection_type, recorded_date)"
    )


#: SQL predicate over a held statement ``s`` (``s.held_at``: when it was held) and the episode's
#: :func:`learnt_sql` row ``l``: the register was told the episode again after the hold (a registered
#: event, a file sent again or a copy stating it), so a decision on the hold is made on outdated
#: information and the withdrawal is not applied (CoP 11-14; fail closed: a time unknown supersedes)
SUPERSEDED = "coalesce(l.learnt_at > s.held_at, true)"


class HeldApplied(NamedTuple):
    """A person's decision on held withdrawals: the events appended, and the held withdrawals not
    applied because the register was told their episode again since they were held (:data:`SUPERSEDED`)."""

    added: int
    superseded: int


def _append_restated(con: duckdb.DuckDBPyConnection, key_id: str, which: str) -> int:
    """Append the statements of ``_restated`` matching ``which`` (a predicate over it), numbered after the last."""
    (added,) = con.execute(
        f"INSERT INTO {EVENTS} SELECT (SELECT coalesce(max(event_id), 0) FROM {EVENTS}) "
        "+ row_number() OVER (ORDER BY _row), pid, objection_type, recorded_date, withdrawn_date, "
        f"source_practice, _batch, _row, now(), ? FROM _restated WHERE {which}",
        [key_id],
    ).fetchone()
    return int(added)


def apply_held(con: duckdb.DuckDBPyConnection, contract: Contract, drop: str, key_id: str = "") -> HeldApplied:
    """A person's decision (``safehaven objections apply-held``): the withdrawals a file sent again
    held (:func:`register_restatements`) are genuine; append them now, compared with the register
    as it now stands (a statement no longer ending an objection is not appended), except those whose
    episode the register was told again since they were held (:data:`SUPERSEDED`; counted). Raises
    ValueError when ``drop`` names no registered restatement holding any."""
    row = con.execute(
        f"SELECT batch_id, registered_at FROM {RESTATEMENTS} WHERE drop_key = ? AND registered_at IS NOT NULL "
        "AND withdrawals_held > 0 AND held_applied_at IS NULL",
        [drop],
    ).fetchone()
    if row is None:
        raise ValueError(f"no file sent again with withdrawals held has the drop key {drop!r}")
    pid = pid_sql(contract)
    with transaction(con):
        _compare_restated(con, contract, pid, row[0])
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _restated AS SELECT s.*, s.held AND {SUPERSEDED} AS superseded "
            f"FROM (SELECT *, ?::TIMESTAMPTZ AS held_at FROM _restated) s LEFT JOIN ({learnt_sql(contract, pid)}) l "
            "USING (pid, objection_type, recorded_date)",
            [row[1]],
        )
        (superseded,) = con.execute("SELECT count(*) FILTER (WHERE superseded) FROM _restated").fetchone()
        added = _append_restated(con, key_id, "held AND NOT superseded")
        con.execute(f"UPDATE {RESTATEMENTS} SET held_applied_at = now() WHERE drop_key = ?", [drop])
        con.execute("DROP TABLE _restated")
    return HeldApplied(added, int(superseded))


def apply_held_batch(con: duckdb.DuckDBPyConnection, contract: Contract, batch: str, key_id: str = "") -> HeldApplied:
    """A person's decision (``safehaven objections apply-held``): the withdrawals a new batch's stale
    statements held (:func:`_register_batch`) are genuine; append each episode's last one now where
    it still ends or shortens the objection as the register now stands (:data:`ENDS`) and the
    register was not told the episode again since it was held (:data:`SUPERSEDED`; counted, not
    applied). Raises ValueError when ``batch`` names no batch holding any."""
    held = f"SELECT _row FROM {HELD} WHERE batch_id = ? AND statement AND applied_at IS NULL"
    if not con.execute(held, [batch]).fetchall():
        raise ValueError(f"no objections batch with withdrawals held has the id {batch!r}")
    pid = pid_sql(contract)
    stated = (
        f"SELECT {pid} AS pid, v.objection_type, v.recorded_date, v.withdrawn_date, v.source_practice, v._batch, "
        f"v._row, h.held_at FROM landing.{contract.collection}_valid v JOIN {HELD} h "
        "ON h.batch_id = v._batch AND h._row = v._row WHERE v._batch = ? AND h.statement AND h.applied_at IS NULL"
    )
    judged = f"FROM ({stated}) s JOIN ({learnt_sql(contract, pid)}) l USING (pid, objection_type, recorded_date)"
    with transaction(con):
        (superseded,) = con.execute(f"SELECT count(*) {judged} WHERE {SUPERSEDED}", [batch]).fetchone()
        (added,) = con.execute(
            f"INSERT INTO {EVENTS} SELECT (SELECT coalesce(max(event_id), 0) FROM {EVENTS}) "
            "+ row_number() OVER (ORDER BY s._row), s.pid, s.objection_type, s.recorded_date, s.withdrawn_date, "
            f"s.source_practice, s._batch, s._row, now(), ? {judged} WHERE {ENDS} AND NOT {SUPERSEDED}",
            [key_id, batch],
        ).fetchone()
        con.execute(f"UPDATE {HELD} SET applied_at = now() WHERE batch_id = ? AND applied_at IS NULL", [batch])
    return HeldApplied(int(added), int(superseded))


def episodes_sql(known_at: str | datetime | None = None) -> str:
    """SQL relation of objection episodes (pid, objection_type, recorded_date, withdrawn_date,
    source_practice).

    One row per (pid, type, recorded date): the latest statement about it wins (its source
    practice too). With ``known_at``, only events registered by then count (the register as
    it stood).
    """
    where = f"WHERE registered_at <= {known_at_sql(known_at)} " if known_at is not None else ""
    return (
        f"SELECT pid, objection_type, recorded_date, withdrawn_date, source_practice FROM {EVENTS} {where}"
        "QUALIFY row_number() OVER (PARTITION BY pid, objection_type, recorded_date "
        "ORDER BY event_id DESC) = 1"
    )


def in_force_sql(as_of: str | date | None = None) -> str:
    """SQL predicate over an episode: in force on ``as_of`` (recorded by it, not withdrawn by it);
    by default on the haven's (UK) day (:func:`as_of_sql`)."""
    d = as_of_sql(as_of)
    return f"(recorded_date <= {d} AND (withdrawn_date IS NULL OR withdrawn_date > {d}))"


def objectors_sql(
    as_of: str | date | None = None,
    types: tuple[str, ...] = (NATIONAL_OPT_OUT,),
    known_at: str | datetime | None = None,
) -> str:
    """SQL relation ``(pid)``: distinct people with an objection of ``types`` in force on ``as_of``."""
    unknown = set(types) - set(TYPES)
    if unknown or not types:
        raise ValueError(f"objection types must be among {TYPES}, not {sorted(unknown) or types}")
    listed = ", ".join(f"'{t}'" for t in types)
    return (
        f"SELECT DISTINCT pid FROM ({episodes_sql(known_at)}) "
        f"WHERE objection_type IN ({listed}) AND {in_force_sql(as_of)}"
    )


def current_sql(as_of: str | date | None = None) -> str:
    """SQL relation (pid, objection_type, in_force): each person's state per type on ``as_of``."""
    return (
        f"SELECT pid, objection_type, bool_or({in_force_sql(as_of)}) AS in_force "
        f"FROM ({episodes_sql()}) GROUP BY pid, objection_type"
    )


def type1_objectors_sql(as_of: str | date | None = None) -> str:
    """SQL relation of pids with a type 1 objection in force."""
    return objectors_sql(as_of, (TYPE1,))


def never_sent_sql(rows: str, received: str) -> str:
    """SQL relation: the distinct rows of ``rows`` (a relation of a GP-sourced collection's records
    with ``_batch`` and ``pid``) that a type 1 objection in force says should never have been sent.

    The rule (guide Rule 4B; ``docs/rules.md`` "Objections"; NDOP practice: an objection applies
    from its recorded date): a record is never-sent when its person has a type 1 objection in
    force and its batch landed after the day that objection was recorded. Records landed by that
    day were sent before it and stay. Days are the haven's (UK) calendar days
    (``safehaven.core.sql.haven_day_sql``), as the recorded date is: a batch landed at 00:30 BST is
    on the next day, not the UTC day before (which kept such records as sent before the objection:
    found by review). The one statement of the rule: the haven's late purge
    (``safehaven.protect.haven.purge_late_type1``) finds its records with it, and the vault's
    entry sets (``safehaven.dispose.vault_sets``) leave such records out of those that support a
    vault entry.

    When a batch landed is a decision on the record (CoP 23d), so it is never the register's
    ``landed_at`` alone: that is a store column whoever holds the store key can move, and moving a
    GP batch's back to before an objection's recorded date kept records that should never have been
    sent, the objection silently lapsing (found by review). A batch landed at the later of the
    register's time and the time the audit trail records (``received``: a table (batch_id,
    landed_at), ``safehaven.intake.landings.load_received``, authentic entries only); a batch the
    trail does not record (a run killed before its entry, an entry that does not verify, a register
    row removed) landed now, the latest it can have. Later is fail closed: more records are taken
    as never sent, the objection honoured.
    """
    now = days.clock()  # one reading: "landed now", and the day of the pre-filter and of the rule
    day = days.haven_day(now)
    landed = f"greatest(b.landed_at, coalesce(t.landed_at, {days.haven_now_sql(now)}))"
    # the type 1 episodes in force, once: they narrow the records before the joins (a night with
    # nothing new scanned every GP record through them: 0.8 s at six nights of 100,000 patients
    # against 0.1 s, issue 22; the same rows), then give each record its recorded date
    in_force = f"SELECT * FROM ({episodes_sql()}) WHERE objection_type = '{TYPE1}' AND {in_force_sql(day)}"
    return (
        f"WITH _type1 AS ({in_force}) SELECT DISTINCT r.* FROM (SELECT * FROM ({rows}) "
        "WHERE pid IN (SELECT pid FROM _type1)) r "
        f"LEFT JOIN {schema.BATCHES} b ON b.batch_id = r._batch LEFT JOIN {received} t ON t.batch_id = r._batch "
        f"JOIN _type1 e ON e.pid = r.pid WHERE {haven_day_sql(landed)} > e.recorded_date"
    )


def ever_type1_objectors_sql() -> str:
    """SQL relation ``(pid)``: people with a type 1 objection ever recorded, in force or not."""
    return f"SELECT DISTINCT pid FROM ({episodes_sql()}) WHERE objection_type = '{TYPE1}'"


# --- type 1 incidents -------------------------------------------------------------------


@dataclass
class Type1Report:
    collection: str
    dropped: int = 0
    by_sender: dict[str, int] = field(default_factory=dict)


def record_type1_incident(
    con: duckdb.DuckDBPyConnection,
    collection: str,
    by_sender: dict[str, int],
    batches: list[str],
    vault_entries_removed: int | None = None,
) -> None:
    """Record type 1 records that should never have been sent: one incident row per sender.

    Also recorded in the breach register (``safehaven.core.registers.record_breach``) as kind
    ``type1_objection_disregarded`` at that kind's usual severity (contained): the records were
    dropped before the haven used them, so no onward disclosure happened, but the sending
    practice disregarded its patients' objections (guide Rule 4B). A late purge (records already
    held) also gives the number of identity-vault entries it removed with them
    (``vault_entries_removed``, in the breach's detail).
    Counts and practice codes only; never a pseudonym or a value.
    """
    if not by_sender:
        return
    con.executemany(
        f"INSERT INTO {TYPE1_INCIDENTS} VALUES (now(), ?, ?, ?, ?)",
        [[collection, sender, n, batches] for sender, n in sorted(by_sender.items())],
    )
    record_breach(
        con,
        kind="type1_objection_disregarded",
        severity=None,
        what=f"{sum(by_sender.values())} {collection} records about patients with a type 1 objection "
        f"in force were sent by {len(by_sender)} practice(s)",
        remedial_action=(
            "records dropped before the haven"
            if vault_entries_removed is None
            else f"records removed from the haven, with the {vault_entries_removed} identity-vault entries only they "
            "supported"
        )
        + "; the sending practices are to be told to apply type 1 objections to their extracts",
        detail={
            "collection": collection,
            "records_by_sender": dict(sorted(by_sender.items())),
            "batches": len(batches),
            **({} if vault_entries_removed is None else {"vault_entries_removed": vault_entries_removed}),
        },
    )


# --- the practice register and the objection-rate monitor -----------------------------


def register_practices(con: duckdb.DuckDBPyConnection, source: str, practice_col: str, collection: str) -> int:
    """Add the (practice, pid) pairs of a pseudonymised GP relation not yet known.

    Called on the type 1 records dropped before the haven: the haven's GP tables give every
    other (practice, person) pair, so a practice's list size still counts its objectors.
    """
    ensure_tables(con)
    (added,) = con.execute(
        f"INSERT INTO {REGISTRATIONS} SELECT DISTINCT {q(practice_col)}, pid, now(), ? FROM {source} s "
        f"WHERE pid IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {REGISTRATIONS} r "
        f"WHERE r.practice = s.{q(practice_col)} AND r.pid = s.pid)",
        [collection],
    ).fetchone()
    return int(added)


def seed_members(
    con: duckdb.DuckDBPyConnection, gp_sources: list[tuple[str, str]] | tuple[tuple[str, str], ...]
) -> int:
    """Count a GP haven table's (practice, pid) pairs into the registrations once, whole.

    The monitor's list sizes are running counts: each new haven batch adds its own pairs
    (``safehaven.protect.haven.build_haven``), so a night reads the registrations, not the
    history. A haven table made before that (or a table given here for the first time) is
    counted in whole once, and its collection recorded in ``governance.practice_members_seeded``.
    """
    schema.ensure(con, *TABLES)
    seeded = {c for (c,) in con.execute(f"SELECT collection FROM {MEMBERS_SEEDED}").fetchall()}
    added = 0
    for table, practice_col in gp_sources:
        collection = table.split(".", 1)[-1].strip('"')
        if collection in seeded:
            continue
        added += register_practices(con, f"(SELECT {q(practice_col)}, pid FROM {table})", practice_col, collection)
        con.execute(f"INSERT INTO {MEMBERS_SEEDED} VALUES (?, now())", [collection])
    return added


def counted_whole(con: duckdb.DuckDBPyConnection, collection: str) -> None:
    """Record ``collection``'s GP haven table as counted whole (:func:`seed_members`) when its first
    batch entered it empty: each of its rows then came with a batch whose pairs were added as it
    entered (``safehaven.protect.haven.build_haven``), so counting the table whole would add none,
    and a first night's monitor would read every record for nothing (0.8 s at 909,091 patients).
    Called in the batch's transaction; a collection already recorded keeps its record."""
    con.execute(
        f"INSERT INTO {MEMBERS_SEEDED} SELECT ?, now() WHERE NOT EXISTS "
        f"(SELECT 1 FROM {MEMBERS_SEEDED} WHERE collection = ?)",
        [collection, collection],
    )


@dataclass(frozen=True)
class PracticeRate:
    """One practice's objection rate against the baseline it was compared with."""

    practice: str
    objection_type: str
    list_size: int
    objectors: int
    rate: float
    baseline: float
    upper_limit: float | None
    p_value: float | None
    z: float | None
    assessed: bool
    outlier: bool


def binomial_upper(n: int, p0: float, x: int, alpha: float = ALPHA_UPPER) -> tuple[float, float]:
    """Exact binomial upper tail ``P(X >= x)`` for ``X ~ Bin(n, p0)``, and the exact upper
    control limit as a rate: the smallest ``k / n`` with ``P(X >= k) < alpha``.

    Vectorised over ``k = 0..n`` in log space with numpy (one call per practice, not per person).
    """
    import numpy as np  # here: only the objection-rate check needs it, not loading the code location

    k = np.arange(n + 1, dtype=np.float64)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log(n - k[1:] + 1) - np.log(k[1:]))])
    log_pmf = log_choose + k * math.log(p0) + (n - k) * math.log1p(-p0)
    log_tail = np.logaddexp.accumulate(log_pmf[::-1])[::-1]  # log P(X >= k)
    below = np.flatnonzero(log_tail < math.log(alpha))
    limit = (below[0] / n) if below.size else 1.0
    return float(min(1.0, math.exp(log_tail[x]))), float(limit)


def objection_rates(
    con: duckdb.DuckDBPyConnection,
    objection_type: str = TYPE1,
    as_of: str | date | None = None,
    alpha: float = ALPHA_UPPER,
    gp_sources: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
) -> list[PracticeRate]:
    """Each practice's objection rate, compared with the pooled rate of all *other* practices.

    Method (Govt response 7.15; a funnel plot, Spiegelhalter, Stat Med 2005;24:1185-1202):

    * The list size ``n`` of a practice is the people it sent records about, kept as running
      counts in ``governance.practice_registrations``: the people of every GP haven batch
      (added as the batch enters the haven; ``gp_sources``, pairs of table and practice
      column, are counted in whole once by ``seed_members``), those whose type 1 records were
      dropped on arrival, and the type 1 objectors recorded at it (``source_practice``), so a
      practice that rightly withholds its objectors' records still counts them. Objectors
      ``x`` are the list's people with an objection of this type in force on ``as_of``; for
      type 1 the objection must also have been recorded at that practice.
    * The baseline ``p0`` is the pooled rate of every other practice (leave-one-out), so an
      outlier does not raise its own baseline; with few practices it would otherwise hide.
    * Under ``p0`` the count is binomial. A practice is an outlier when its count lies above
      the 99.8% funnel-plot limit, i.e. the exact one-sided tail ``P(X >= x) < 0.001``
      (about one false alarm per thousand practices from chance alone). The limit is exact
      (``binomial_upper``), not the normal approximation ``p0 + 3.09 sqrt(p0 (1 - p0) / n)``,
      which raises false alarms at small practices; ``z`` on that scale is reported too.
      Only *high* rates are flagged: 7.15 asks about an abnormal number of objections.
    * No over-dispersion correction is applied: the synthetic data is binomial by
      construction. With real data, inflate the variance by the estimated dispersion factor
      (Spiegelhalter's multiplicative or additive random-effects model) before relying on it.
    """
    return objection_rates_of(con, (objection_type,), as_of, alpha, gp_sources)


def objection_rates_of(
    con: duckdb.DuckDBPyConnection,
    objection_types: Sequence[str],
    as_of: str | date | None = None,
    alpha: float = ALPHA_UPPER,
    gp_sources: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
) -> list[PracticeRate]:
    """:func:`objection_rates` of each of ``objection_types`` in turn (each type's practices in
    order), counted in one pass over the practices' people: the lists are the same for every
    type, and reading them is most of the cost (0.5 s a type at 909,091 patients, issue 22)."""
    if isinstance(objection_types, str):  # a type alone would be taken letter by letter (found by review)
        raise TypeError(f"objection_types is a sequence of types, e.g. ({objection_types!r},)")
    ensure_tables(con)
    unknown = [t for t in objection_types if t not in TYPES]
    if unknown:
        raise ValueError(f"unknown objection type {unknown[0]!r}")
    seed_members(con, gp_sources)
    rows = con.execute(_rates_sql(objection_types, as_of)).fetchall()
    return [
        _practice_rate(practice, kind, int(n), int(counts[2 * i]), counts[2 * i + 1], alpha)
        for i, kind in enumerate(objection_types)
        for practice, n, *counts in rows  # one row per practice, not per person
    ]


def _rates_sql(objection_types: Sequence[str], as_of: str | date | None) -> str:
    """SQL: per practice, its list size ``n`` and, for each type in order, its objectors and the
    pooled rate of every other practice (:func:`objection_rates`)."""
    objects = ", ".join(
        f"bool_or(e.objection_type = {lit(kind)} "
        f"{'AND e.source_practice = m.practice' if kind == TYPE1 else ''} AND {in_force_sql(as_of)}) AS o{i}"
        for i, kind in enumerate(objection_types)
    )
    counts = ", ".join(f"count(*) FILTER (WHERE o{i}) AS x{i}" for i in range(len(objection_types)))
    totals = ", ".join(f"sum(x{i}) AS big_x{i}" for i in range(len(objection_types)))
    rates = ", ".join(
        f"x{i}, CASE WHEN big_n - n > 0 THEN (big_x{i} - x{i}) / (big_n - n) END" for i in range(len(objection_types))
    )
    return f"""
        WITH members AS (
            SELECT practice, pid FROM {REGISTRATIONS}
            UNION
            SELECT source_practice, pid FROM {EVENTS}
            WHERE objection_type = '{TYPE1}' AND source_practice IS NOT NULL
        ),
        latest AS ({episodes_sql()}),
        objecting AS (
            SELECT m.practice, m.pid, {objects}
            FROM members m LEFT JOIN latest e ON e.pid = m.pid
            GROUP BY m.practice, m.pid
        ),
        per AS (SELECT practice, count(*) AS n, {counts} FROM objecting GROUP BY practice),
        tot AS (SELECT sum(n) AS big_n, {totals} FROM per)
        SELECT practice, n, {rates}
        FROM per, tot ORDER BY practice
        """


def _practice_rate(practice: str, kind: str, n: int, x: int, p0: float | None, alpha: float) -> PracticeRate:
    """One practice's rate against its baseline ``p0``, with the exact upper control limit (:func:`objection_rates`)."""
    rate = x / n if n else 0.0
    assessed = n > 0 and p0 is not None and 0.0 < p0 < 1.0
    upper = p_value = z = None
    if assessed:
        p_value, upper = binomial_upper(n, p0, x, alpha)
        z = (rate - p0) / math.sqrt(p0 * (1 - p0) / n)
    return PracticeRate(
        practice=practice,
        objection_type=kind,
        list_size=n,
        objectors=x,
        rate=rate,
        baseline=float(p0 or 0.0),
        upper_limit=upper,
        p_value=p_value,
        z=z,
        assessed=assessed,
        outlier=bool(assessed and p_value is not None and p_value < alpha),
    )


def save_rates(con: duckdb.DuckDBPyConnection, rates: list[PracticeRate]) -> None:
    """Replace the monitor's table ``governance.objection_rates`` with the latest assessment."""
    schema.recreate(con, RATES)
    if not rates:
        return
    insert_values(  # one statement per 500 practices, not one per practice (issue 22)
        con,
        RATES,
        "(now(), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            [
                r.practice,
                r.objection_type,
                r.list_size,
                r.objectors,
                r.rate,
                r.baseline,
                r.upper_limit,
                r.p_value,
                r.z,
                r.assessed,
                r.outlier,
            ]
            for r in rates
        ],
    )
