"""When each content batch was received, as the audit trail records it: retention counts from there.

Rule (CoP 43d, 48-50; CoP 23d: a decision on the record; ``docs/rules.md`` "Retention and
disposal"): a collection's records are disposed of ``retention_days`` after the haven received
them (``safehaven.dispose``), and the daily sweep destroys what is due without a person. The
batch register's ``landed_at`` is a store column: whoever holds the store key could move it back
(the sweep would destroy a file received yesterday) or forward (retention would lapse). So:

* each content batch's landing is audited once its landing commits (:data:`ACTION`, detail
  ``{"batch", "landed_at"}``: :func:`record`); retention counts from the time so recorded, never
  later than the entry itself (:func:`received`);
* a landing the trail does not record (a run killed between the commit and the entry, a trail
  that did not verify then) is put on record by the collection's next landing step or the daily
  sweep (:func:`record_unrecorded`: ``recorded: late``), and retention counts from that entry's own
  time, never from the register's: whoever could keep the entry from being written (a kill, a row
  that stops the trail verifying for one landing) and then date the batch back would otherwise
  have the sweep destroy a fresh drop (found by review). Until then its records are not disposed of
  by date, and the sweep lists them for review (``safehaven.dispose.schedule``);
* the batches of a collection the rule has not started for (a haven from before this rule) are
  adopted once with the register's times (``recorded: adopted``), as the haven counted retention
  before, in the same append as the entry that starts the rule for the collection (:data:`STARTED`).
  The rule starts when the collection's first landing step (or the daily sweep) runs, before any
  landing of that step, so a collection's very first landing killed before its entry and dated
  back is recorded late, never adopted (found by review: before, "no landing entry yet" was how a
  haven from before the rule was told, and a new collection's first landing looked like one);
* a register time that differs from the recorded one is not acted on either way; the sweep names
  it in a review item.

The type 1 rule dates a GP batch's landing from here too (:func:`load_received`;
``safehaven.protect.objections.never_sent_sql``, guide Rule 4B): at the later of the register's
time and the recorded one, and now while none is recorded, so a register time moved back does not
lapse an objection.

Objections batches have their own landing entries and seals (``safehaven.intake.batch_seal``) and
are never disposed of by date. Limit: the adoption takes the register's times as they stand when
the rule first runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime

import duckdb

from safehaven.core import audit, schema
from safehaven.core.home import Home
from safehaven.core.store import table_exists

ACTION = "intake.batch_landed"
#: the entry that starts the rule for a collection (detail ``{"batches_adopted": n}``): from then on a
#: landing not on record is recorded late, never adopted
STARTED = "intake.landings_started"
#: how a landing was put on record: after a run that could not (its own time counts), or adopted
#: from the register when the collection had no landing entry at all (the register's time counts)
LATE, ADOPTED = "late", "adopted"
#: a batch id as the haven makes one: the SHA-256 of the file it landed from
BATCH_ID = re.compile(r"[0-9a-f]{64}")


def _now(collection: str) -> datetime:
    """The landing time of a batch of ``collection``: now (tests receive a drop in the past)."""
    return datetime.now(UTC)


#: the clock landings read (:func:`_now`; a test sets a drop's receipt back through it)
clock: Callable[[str], datetime] = _now


def _entry(collection: str, detail: dict) -> dict:
    return {"actor": "safehaven", "role": "pipeline", "action": ACTION, "object": collection, "detail": detail}


def record(con: duckdb.DuckDBPyConnection, collection: str, batch: str, landed_at: datetime) -> bool:
    """Audit that ``batch`` of ``collection`` landed at ``landed_at`` (after its landing commits).
    False when the trail refuses the entry (it does not verify): the landing stands, and the
    collection's next landing step records it late (:func:`record_unrecorded`)."""
    return audit.append_if_sound(con, [_entry(collection, {"batch": batch, "landed_at": landed_at.isoformat()})])


def _recorded_ids(con: duckdb.DuckDBPyConnection, collection: str) -> tuple[set[str], bool]:
    """The batches of ``collection`` named by a landing entry, and whether the rule has started for
    it (a :data:`STARTED` entry, or any landing entry: a haven that recorded landings before the start
    entry existed). Read as written: only to find the ones to record; :func:`received` verifies each
    entry it acts on, and a row written into the log stops the append that would rest on it."""
    if not table_exists(con, *schema.AUDIT_LOG.split(".")):
        return set(), False
    rows = con.execute(
        f"SELECT action, json_extract_string(detail, '$.batch') FROM {schema.AUDIT_LOG} "
        "WHERE list_contains(?::VARCHAR[], action) AND object = ?",
        [[ACTION, STARTED], collection],
    ).fetchall()
    return {b for a, b in rows if a == ACTION and b}, bool(rows)


def record_unrecorded(con: duckdb.DuckDBPyConnection, collection: str) -> list[str]:
    """Audit, in one append, the landing of every batch of ``collection`` the trail does not record,
    with the register's time as it stands now (module docstring); returns them. Never fails the step:
    nothing is recorded while the trail does not verify."""
    recorded, started = _recorded_ids(con, collection)
    held = (
        con.execute(
            f"SELECT batch_id, {_REGISTER_TIME} FROM {schema.BATCHES} WHERE collection = ? "
            "ORDER BY landed_at, batch_id",
            [collection],
        ).fetchall()
        if table_exists(con, *schema.BATCHES.split("."))
        else []
    )
    late = [(b, us) for b, us in held if isinstance(b, str) and BATCH_ID.fullmatch(b) and b not in recorded]
    how = LATE if started else ADOPTED  # the rule not started for the collection: before this rule
    entries = [_entry(collection, {"batch": b, "recorded": how, **_named(us, how)}) for b, us in late]
    start = [] if started else [{**_entry(collection, {"batches_adopted": len(late)}), "action": STARTED}]
    if not (entries or start) or not audit.append_if_sound(con, start + entries):
        return []
    return [b for b, _ in late]


#: the register's landing time as epoch microseconds, NULL when it is not an ordinary time
#: (infinity, a year past 9999, NULL): such a value is never read as a date
_REGISTER_TIME = "CASE WHEN isfinite(landed_at) AND year(landed_at) BETWEEN 1 AND 9999 THEN epoch_us(landed_at) END"


def _named(epoch_us: int | None, how: str) -> dict[str, str]:
    """The register's time to name in an adopted entry (module docstring); none for a late one."""
    if how != ADOPTED or epoch_us is None:
        return {}
    return {"landed_at": datetime.fromtimestamp(epoch_us / 1e6, UTC).isoformat()}


def _time(entry: audit.Entry) -> datetime:
    """An entry's landing time: the one it names, never later than the entry itself; a late
    entry's own time (module docstring)."""
    if entry.fields.get("recorded") == LATE:
        return entry.at
    try:
        named = datetime.fromisoformat(str(entry.fields.get("landed_at")))
    except ValueError:
        return entry.at
    if named.tzinfo is None:
        return entry.at
    return min(named, entry.at)


def _received_by(
    con: duckdb.DuckDBPyConnection, collections: list[str], home: Home | None = None
) -> dict[str, dict[str, datetime]]:
    """:func:`received` for each of ``collections``, in one read of the landing entries (the audit
    log's other entries are not read: ``audit.authentic_entries`` selects by action)."""
    out: dict[str, dict[str, datetime]] = {c: {} for c in collections}
    for entry in audit.authentic_entries(con, [ACTION], home):
        batch, times = entry.fields.get("batch"), out.get(entry.object)
        if times is not None and isinstance(batch, str):
            times[batch] = min(times.get(batch, _time(entry)), _time(entry))
    return out


def received(con: duckdb.DuckDBPyConnection, collection: str) -> dict[str, datetime]:
    """Each batch of ``collection`` with the time the audit trail records it landing (authentic
    entries only: each verifies under the audit key); a batch with none is not in it."""
    return _received_by(con, [collection])[collection]


#: the temporary table :func:`load_received` makes: (batch_id, landed_at), one row per batch on record
RECEIVED = "_received"


def load_received(con: duckdb.DuckDBPyConnection, collections: list[str], home: Home | None = None) -> str:
    """Temp table :data:`RECEIVED` (batch_id, landed_at): each batch of ``collections`` with the time
    the audit trail records it landing (:func:`received`: authentic entries only, so an entry that
    does not verify puts no time in it); returns its name. For the type 1 rule
    (``safehaven.protect.objections.never_sent_sql``), which judges a GP batch's landing by it,
    never by the register's time alone. ``home``: the audit key's, when ``con`` was not opened by it."""
    rows = [(b, at) for times in _received_by(con, collections, home).values() for b, at in times.items()]
    con.execute(f"CREATE OR REPLACE TEMP TABLE {RECEIVED} (batch_id VARCHAR, landed_at TIMESTAMPTZ)")
    con.execute(
        f"INSERT INTO {RECEIVED} SELECT unnest(?::VARCHAR[]), unnest(?::TIMESTAMPTZ[])",
        [[b for b, _ in rows], [at for _, at in rows]],
    )
    return RECEIVED
