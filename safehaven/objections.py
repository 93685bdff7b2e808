"""The objection register and the type 1 rule.

Rules (CoP 11-14, 25; confidentiality guide Rule 4; "rules for sharing" page):

* Objections arrive as ``objections`` drops and are validated like any collection. The
  register ``governance.objection_events`` is an append-only history keyed by the haven
  pseudonym (never the NHS number itself): one event per objection as each drop states it.
  The current state is derived, never stored: the latest statement of each (person, type)
  wins, and an objection is in force on day ``d`` when it was recorded on or before ``d``
  and not withdrawn on or before ``d``.
* Formatting never lets an objector through: objections and records are matched on the
  pseudonym of the canonical NHS number (``safehaven.identifiers``).
* Type 1 (the patient's data must not leave the GP practice for purposes beyond direct
  care): records about a type 1 objector in a GP-sourced collection (one whose contract names
  a ``practice_field``) should never have been sent. They are dropped before the haven,
  counted per sending practice, and recorded as an incident.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb

from safehaven.contracts import Contract
from safehaven.pseudonymise import hmac_sql
from safehaven.rules import q

EVENTS = "governance.objection_events"
TYPE1_INCIDENTS = "governance.type1_incidents"


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {EVENTS} (pid VARCHAR, objection_type VARCHAR, "
        "recorded_date DATE, withdrawn_date DATE, source_practice VARCHAR, _batch VARCHAR, "
        "_row BIGINT, registered_at TIMESTAMPTZ)"
    )
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {TYPE1_INCIDENTS} (detected_at TIMESTAMPTZ, collection VARCHAR, "
        "sender VARCHAR, records_dropped BIGINT, batches VARCHAR[])"
    )


def register_objections(con: duckdb.DuckDBPyConnection, contract: Contract) -> int:
    """Append newly validated objection rows to the register (idempotent by batch and row)."""
    ensure_tables(con)
    before = con.execute(f"SELECT count(*) FROM {EVENTS}").fetchone()[0]
    con.execute(
        f"INSERT INTO {EVENTS} SELECT {hmac_sql(q(contract.patient_key), 'haven')}, objection_type, "
        f"recorded_date, withdrawn_date, source_practice, v._batch, v._row, now() "
        f"FROM landing.{contract.collection}_valid v "
        f"WHERE NOT EXISTS (SELECT 1 FROM {EVENTS} e WHERE e._batch = v._batch AND e._row = v._row)"
    )
    return con.execute(f"SELECT count(*) FROM {EVENTS}").fetchone()[0] - before


def current_sql(as_of: str = "current_date") -> str:
    """SQL relation (pid, objection_type, recorded_date, withdrawn_date, in_force) as of a date.

    The latest statement of each (pid, type) wins: latest recorded date, then the most
    recently registered batch, then the later row.
    """
    return (
        f"SELECT pid, objection_type, recorded_date, withdrawn_date, "
        f"(recorded_date <= {as_of} AND (withdrawn_date IS NULL OR withdrawn_date > {as_of})) AS in_force "
        f"FROM {EVENTS} QUALIFY row_number() OVER (PARTITION BY pid, objection_type "
        "ORDER BY recorded_date DESC, registered_at DESC, _batch DESC, _row DESC) = 1"
    )


@dataclass
class Type1Report:
    collection: str
    dropped: int = 0
    by_sender: dict[str, int] = field(default_factory=dict)


def type1_objectors_sql(as_of: str = "current_date") -> str:
    """SQL relation of pids with a type 1 objection in force."""
    return f"SELECT pid FROM ({current_sql(as_of)}) WHERE objection_type = 'type1' AND in_force"
