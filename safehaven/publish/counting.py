"""True counts per output and reporting month, kept in the store so a month can be counted alone.

The aggregate stage protects an output over its whole table (``safehaven.publish.disclosure``:
suppression is chosen jointly over every month and with related outputs), so protection cannot
be split by month without letting a month slice and the whole table differ (CoP 34b). The
*counting* can: it is where the month partitions of the Dagster assets ``counts/<output>_counts``
live (``docs/architecture.md`` "Partitions"). Rules:

* **Counted a set of months at a time.** The output SQL sees the months it is to count as the
  temporary table ``counting_months(month, month_end)`` (:data:`COUNTING_MONTHS`, a subset of
  ``reporting_months``) and joins it for the month a record is counted in; it may read
  ``reporting_months`` for the period as a whole (``discharge_to_social_care``'s 14-day
  follow-up ends within the period, whichever month is counted). Counting every month at once
  and one month at a time give the same rows (``tests/unit/test_counting.py``).
* **A count that yields a month it was not asked for is refused** (:class:`CountError`): its SQL
  does not join ``counting_months``, so one month counted alone would carry other months' rows.
  The whole period counted at once is unaffected, so such a declaration still builds every night.
  Whenever fewer months than the period are counted (a backfill, a month whose seal broke), the
  whole period is counted too and the months must agree with it, or nothing is kept.
* **Kept with what they were counted from.** ``counts.<output>`` holds the observed cells of
  every month of the period (true counts: never published as they are; the zone ``counts`` is
  inside the encrypted store, beside the haven it is counted from). ``governance.output_counts``
  keeps, per month, the fingerprint of the inputs (:func:`counting_fingerprint`: the code, the
  definition, the reporting period, every haven table read, the code lists, the authorising
  agreement). A month whose fingerprint is not the current one is *stale*.
* **Sealed.** Each month's fingerprint row also keeps its cell count and a seal of its rows (the
  table's column names and types, and the sum of the rows' hashes); a month whose rows no longer
  match (edited, deleted or renamed in the store since they were counted) is stale like a month
  counted from other inputs, and counted again. The seal is not keyed: it detects change, not a
  forger who holds the store key and rewrites the seal too (the audit trail is the record of who
  ran what).
* **Fail closed: a protection never reads a stale or missing month.** :func:`ensure_current`
  counts the stale months before :func:`read_counts` is allowed, and :func:`read_counts` refuses
  if any month of the period is still stale (an input changed in between). Months that left the
  period are deleted from the table. The counts and their fingerprints change in one transaction,
  so a killed process leaves the months as they were (stale or current, never half-counted).
* **The SQL runs read-only** (``safehaven.publish.sql_gate.read_only_transaction``); only the
  haven's own code writes its result to ``counts.<output>``. If it fails, the error names the
  output and DuckDB's error class, never DuckDB's message (``sql_gate``, "Run-time failures").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date

import duckdb

from safehaven.core import audit, schema
from safehaven.core.digests import code_sha, sha_of, table_sha
from safehaven.core.registers import current_actor
from safehaven.core.sql import q
from safehaven.core.store import COUNTS_ZONE, table_exists, transaction
from safehaven.publish.outputs import Output, OutputError, Period
from safehaven.publish.sql_gate import (
    COUNTING_MONTHS,
    REPORTING_MONTHS,
    read_only_transaction,
    withholds_run_time_errors,
)

#: per output and month, the fingerprint its counts were made from
OUTPUT_COUNTS = schema.OUTPUT_COUNTS
#: the dimension an output counts by month (every output has one: ``outputs.Output``)
MONTH = "month"
#: the temporary tables the SQL's result is written to before it is kept, and the whole period's
#: count a count of fewer months is checked against
_CELLS = "_counted_cells"
_WHOLE = "_counted_whole"


class CountError(OutputError):
    """An output that cannot be counted as asked (the message names it and what to change)."""


@dataclass
class CountReport:
    """What one count did: the months counted now, those already current, the cells counted."""

    output: str
    counted: list[date] = field(default_factory=list)
    current: list[date] = field(default_factory=list)
    cells: int = 0
    cells_by_month: dict[date, int] = field(default_factory=dict)
    #: haven records the count read (its collections' records in the haven; 0 when nothing was counted)
    records: int = 0
    #: months counted from current inputs whose kept rows no longer matched their seal (counted again)
    broken: list[date] = field(default_factory=list)


def counts_table(output: Output) -> str:
    """``counts.<output>``: the output's observed cells, every month of its period."""
    return f"{COUNTS_ZONE}.{q(output.name)}"


def period_months(period: Period) -> list[date]:
    """The first days of the period's months, in order (none when the period is empty)."""
    if period.start is None or period.end is None:
        return []
    months, month = [], period.start.replace(day=1)
    while month <= period.end:
        months.append(month)
        month = date(month.year + month.month // 12, month.month % 12 + 1, 1)
    return months


def counting_fingerprint(
    con: duckdb.DuckDBPyConnection, output: Output, period: Period, agreement_id: str | None, *, codes: str
) -> str:
    """SHA-256 over everything a count reads: code, definition, period, haven tables, code lists, agreement."""
    return sha_of(
        {
            "code": code_sha(),
            "definition": output.definition_sha256(),
            "period": period.as_dict(),
            "haven": {c: table_sha(con, f"haven.{q(c)}") for c in output.collections},
            "codes": table_sha(con, codes),
            "agreement": agreement_id,
        }
    )


def _seals(con: duckdb.DuckDBPyConnection, table: str, alias: str) -> tuple[str, str]:
    """Per month of ``table``: its cells and the seal of its rows, and the seal of a month without rows.

    A seal is the table's column names and types (a row's hash ignores names, so renamed columns
    would keep it) and the sum of the month's row hashes.
    """
    layout = sha_of(_columns(con, table))[:16]
    return (
        f"SELECT {MONTH}, count(*) AS cells, '{layout}:' || sum(hash({alias})::HUGEINT)::VARCHAR AS seal "
        f"FROM {table} AS {alias} GROUP BY {MONTH}",
        f"{layout}:0",
    )


def stale_months(con: duckdb.DuckDBPyConnection, output: Output, period: Period, fingerprint: str) -> list[date]:
    """The period's months whose counts are missing, were made from other inputs, or no longer match
    their seal (rows edited, deleted or renamed since they were counted)."""
    return _month_states(con, output, period, fingerprint)[0]


def _month_states(
    con: duckdb.DuckDBPyConnection, output: Output, period: Period, fingerprint: str
) -> tuple[list[date], list[date]]:
    """(stale months, the stale ones whose fingerprint is current but whose rows broke their seal)."""
    schema.ensure(con, OUTPUT_COUNTS)
    sealed: dict[date, bool] = {}
    if table_exists(con, COUNTS_ZONE, output.name):
        seals, empty = _seals(con, counts_table(output), "t")
        sealed = dict(
            con.execute(
                f"SELECT g.month, g.cells = coalesce(s.cells, 0) AND g.seal IS NOT DISTINCT FROM coalesce(s.seal, ?) "
                f"FROM {OUTPUT_COUNTS} g LEFT JOIN ({seals}) s ON s.month = g.month "
                "WHERE g.output = ? AND g.fingerprint = ?",
                [empty, output.name, fingerprint],
            ).fetchall()
        )
    months = period_months(period)
    return [m for m in months if not sealed.get(m)], [m for m in months if sealed.get(m) is False]


@withholds_run_time_errors("its SQL")
def _run_sql(con: duckdb.DuckDBPyConnection, output: Output, months: list[date], target: str) -> int:
    """Temp table ``target``: the output's SQL over ``months``; checks its columns, NULLs and months.

    A DuckDB error names the output and its class, never its message, which may quote a value
    (``sql_gate.withholds_run_time_errors``)."""
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {COUNTING_MONTHS} AS "
        f"SELECT * FROM {REPORTING_MONTHS} WHERE list_contains(?::DATE[], month)",
        [months],
    )
    try:
        with read_only_transaction(con):
            con.execute(f"CREATE OR REPLACE TEMP TABLE {target} AS {output.sql}")
    finally:  # every later reader (a domain's SQL, the next output) sees the whole period again
        con.execute(f"CREATE OR REPLACE TEMP TABLE {COUNTING_MONTHS} AS SELECT * FROM {REPORTING_MONTHS}")
    have = {d[0] for d in con.execute(f"SELECT * FROM {target} LIMIT 0").description}
    missing = ({MONTH, *output.dimension_names, output.count_col, *output.denominators}) - have
    if missing:
        raise CountError(f"{output.name}: the query lacks columns {sorted(missing)}")
    dims = [q(d) for d in output.dimension_names]
    nulls = con.execute(f"SELECT count(*) FROM {target} WHERE {' OR '.join(f'{d} IS NULL' for d in dims)}").fetchone()
    if nulls[0]:
        raise CountError(f"{output.name}: {nulls[0]} cell(s) with a NULL dimension value; map them to a category")
    strays = con.execute(
        f"SELECT count(*) FROM {target} WHERE NOT list_contains(?::DATE[], {MONTH})", [months]
    ).fetchone()[0]
    if strays:
        raise CountError(
            f"{output.name}: asked to count {len(months)} month(s), its SQL counted {strays} cell(s) of other "
            f"months: join {COUNTING_MONTHS} (not reporting_months) for the month a record is counted in"
        )
    return int(con.execute(f"SELECT count(*) FROM {target}").fetchone()[0])


def _same_as_whole(con: duckdb.DuckDBPyConnection, output: Output, months: list[date], every: list[date]) -> None:
    """Refuse a count of some of the period's ``months`` that differs from counting ``every`` month.

    A month counted alone must give the rows it has when the whole period is counted: SQL whose
    result depends on which months are counted together (the period's end or a window read from
    ``counting_months``) would otherwise keep a wrong month. The gate refuses the common forms when
    the declaration loads; this check, run on every count of fewer months than the period (a
    backfill, a month whose seal broke), refuses any form. Nothing is kept from a refused count.
    """
    if len(months) == len(every):
        return
    _run_sql(con, output, every, _WHOLE)
    part = f"(SELECT * FROM {_WHOLE} WHERE list_contains(?::DATE[], {MONTH}))"
    differ = con.execute(
        f"SELECT (SELECT count(*) FROM (FROM {_CELLS} EXCEPT ALL {part})) "
        f"+ (SELECT count(*) FROM ({part} EXCEPT ALL FROM {_CELLS}))",
        [months, months],
    ).fetchone()[0]
    con.execute(f"DROP TABLE {_WHOLE}")
    if differ:
        raise CountError(
            f"{output.name}: counting {', '.join(m.isoformat() for m in months)} alone gave {differ} cell(s) other "
            "than counting the whole period: its SQL depends on the months counted together; read "
            f"reporting_months for the period and join {COUNTING_MONTHS} only for the month a record is counted in"
        )


def _keep(
    con: duckdb.DuckDBPyConnection, output: Output, months: list[date], keep: list[date], fingerprint: str
) -> None:
    """Replace the counted months' rows and fingerprints, and drop months outside ``keep``, in one transaction."""
    table = counts_table(output)
    with transaction(con):
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {COUNTS_ZONE}")  # a store has it (ZONES); a bare connection not
        if not table_exists(con, COUNTS_ZONE, output.name) or _columns(con, table) != _columns(con, _CELLS):
            con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM {_CELLS} LIMIT 0")
            con.execute(f"DELETE FROM {OUTPUT_COUNTS} WHERE output = ?", [output.name])
        con.execute(
            f"DELETE FROM {table} WHERE list_contains(?::DATE[], {MONTH}) OR NOT list_contains(?::DATE[], {MONTH})",
            [months, keep],
        )
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {_CELLS}")
        con.execute(
            f"DELETE FROM {OUTPUT_COUNTS} WHERE output = ? AND (list_contains(?::DATE[], month) "
            "OR NOT list_contains(?::DATE[], month))",
            [output.name, months, keep],
        )
        seals, empty = _seals(con, _CELLS, "c")
        con.execute(
            f"INSERT INTO {OUTPUT_COUNTS} SELECT ?, u.m, ?, now(), coalesce(s.cells, 0), coalesce(s.seal, ?) "
            f"FROM unnest(?::DATE[]) u(m) LEFT JOIN ({seals}) s ON s.{MONTH} = u.m",
            [output.name, fingerprint, empty, months],
        )


def _drop_outside(con: duckdb.DuckDBPyConnection, output: Output, keep: list[date]) -> None:
    """Delete the rows and fingerprints of months outside ``keep`` (the period shrank, or emptied);
    no write when there are none."""
    outside = f"NOT list_contains(?::DATE[], {MONTH})"
    left = con.execute(
        f"SELECT (SELECT count(*) FROM {counts_table(output)} WHERE {outside}) "
        f"+ (SELECT count(*) FROM {OUTPUT_COUNTS} WHERE output = ? AND {outside.replace(MONTH, 'month')})",
        [keep, output.name, keep],
    ).fetchone()[0]
    if left:
        with transaction(con):
            con.execute(f"DELETE FROM {counts_table(output)} WHERE {outside}", [keep])
            con.execute(f"DELETE FROM {OUTPUT_COUNTS} WHERE output = ? AND {outside}", [output.name, keep])


def _record_broken_seals(con: duckdb.DuckDBPyConnection, output: Output, months: list[date]) -> None:
    """Say, in the audit trail, that kept counts were changed in the store since they were counted.

    The count goes on (the months are counted again from the haven, so nothing wrong is read),
    but a change to ``counts.*`` outside the haven's code is someone's edit: it is recorded for
    the governance lead to look into, and ``safehaven audit`` shows it.
    """
    audit.append(
        con,
        actor=current_actor(),
        role="pipeline",
        action="counts.seal_broken",
        object=counts_table(output),
        outcome="changed outside the pipeline; counted again",
        detail={"months": [m.isoformat() for m in months]},
    )


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[str, str]]:
    return [(d[0], str(d[1])) for d in con.execute(f"SELECT * FROM {table} LIMIT 0").description]


def count_months(
    con: duckdb.DuckDBPyConnection,
    output: Output,
    period: Period,
    fingerprint: str,
    months: Iterable[date] | None = None,
) -> CountReport:
    """Count ``months`` (default: the stale ones) and every stale month with them; keep the result.

    The caller has installed the helpers for ``period`` (``outputs.install_helpers``). A month
    outside the period is refused, naming it. Months already current and not asked for are left.
    """
    all_months = period_months(period)
    asked = sorted(set(months or []))
    outside = [m for m in asked if m not in all_months]
    if outside:
        raise CountError(
            f"{output.name}: month(s) {', '.join(m.isoformat() for m in outside)} are outside its reporting period "
            f"({all_months[0].isoformat() + ' to ' + all_months[-1].isoformat() if all_months else 'empty'})"
        )
    stale, broken = _month_states(con, output, period, fingerprint)
    todo = sorted(set(asked) | set(stale))
    report = CountReport(output.name, counted=todo, current=[m for m in all_months if m not in todo], broken=broken)
    if broken:
        _record_broken_seals(con, output, broken)
    if not todo and table_exists(con, COUNTS_ZONE, output.name):
        _drop_outside(con, output, all_months)
        return report
    report.cells = _run_sql(con, output, todo, _CELLS)
    report.records = sum(period.records.values())
    _same_as_whole(con, output, todo, all_months)
    report.cells_by_month = dict(
        con.execute(f"SELECT {MONTH}, count(*) FROM {_CELLS} GROUP BY ALL").fetchall()  # months with a cell
    )
    _keep(con, output, todo, all_months, fingerprint)
    con.execute(f"DROP TABLE {_CELLS}")
    return report


def read_counts(con: duckdb.DuckDBPyConnection, output: Output, period: Period, fingerprint: str, target: str) -> int:
    """Temp table ``target``: the period's counts, refused while any month is stale; returns its rows."""
    stale = stale_months(con, output, period, fingerprint)
    if stale:
        raise CountError(
            f"{output.name}: the counts of {len(stale)} month(s) (first {stale[0].isoformat()}) are not from the "
            "current inputs; they are counted again by the next run of counts/ or published/"
        )
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {target} AS SELECT * FROM {counts_table(output)} "
        f"WHERE list_contains(?::DATE[], {MONTH})",
        [period_months(period)],
    )
    return int(con.execute(f"SELECT count(*) FROM {target}").fetchone()[0])
