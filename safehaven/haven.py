"""Bring validated records into the haven zone: pseudonymised, minus type 1 objectors.

Rules: see ``safehaven.pseudonymise`` (what a haven row holds, CoP 8a, 27b-c) and
``safehaven.objections`` (type 1, CoP 11-14). Batches enter the haven once: a batch already
present in ``haven.<collection>`` is not processed again, so reruns add nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb

from safehaven.contracts import Contract
from safehaven.ingest import BATCHES
from safehaven.keys import Key
from safehaven.objections import TYPE1_INCIDENTS, ensure_tables, type1_objectors_sql
from safehaven.pseudonymise import haven_select_sql, install_key
from safehaven.rules import q


@dataclass
class HavenReport:
    """Counts for one collection's move into the haven."""

    collection: str
    rows_in: int = 0
    rows_out: int = 0
    type1_dropped: int = 0
    type1_by_sender: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    key_id: str = ""


def build_haven(con: duckdb.DuckDBPyConnection, contract: Contract, haven_key: Key) -> HavenReport:
    """Pseudonymise accepted batches not yet in the haven; drop and count type 1 records."""
    ensure_tables(con)
    c = contract.collection
    install_key(con, "haven", haven_key.material)
    report = HavenReport(c, key_id=haven_key.key_id)
    source = f"landing.{c}_valid"
    select = haven_select_sql(contract, "_incoming")
    con.execute(f"CREATE TABLE IF NOT EXISTS haven.{c} AS {haven_select_sql(contract, source)} LIMIT 0")
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _new_batches AS SELECT batch_id FROM {BATCHES} "
        f"WHERE collection = ? AND status = 'accepted' "
        f"AND batch_id NOT IN (SELECT DISTINCT _batch FROM haven.{c})",
        [c],
    )
    report.batches = con.execute("SELECT count(*) FROM _new_batches").fetchone()[0]
    if report.batches == 0:
        return report
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _incoming AS SELECT * FROM {source} "
            "WHERE _batch IN (SELECT batch_id FROM _new_batches)"
        )
        con.execute(f"CREATE OR REPLACE TEMP TABLE _pseudo AS {select}")
        report.rows_in = con.execute("SELECT count(*) FROM _pseudo").fetchone()[0]
        if contract.practice_field:
            sender = q(contract.practice_field)
            rows = con.execute(
                f"SELECT {sender}, count(*) FROM _pseudo WHERE pid IN ({type1_objectors_sql()}) "
                "GROUP BY 1 ORDER BY 1"
            ).fetchall()
            report.type1_by_sender = {s: n for s, n in rows}
            report.type1_dropped = sum(report.type1_by_sender.values())
            if rows:
                con.execute(
                    f"INSERT INTO {TYPE1_INCIDENTS} SELECT now(), ?, {sender}, count(*), "
                    f"list(DISTINCT _batch) FROM _pseudo WHERE pid IN ({type1_objectors_sql()}) "
                    f"GROUP BY {sender}",
                    [c],
                )
                con.execute(f"DELETE FROM _pseudo WHERE pid IN ({type1_objectors_sql()})")
        con.execute(f"INSERT INTO haven.{c} SELECT * FROM _pseudo")
        report.rows_out = report.rows_in - report.type1_dropped
        con.execute("DROP TABLE _pseudo")
        con.execute("DROP TABLE _incoming")
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return report
