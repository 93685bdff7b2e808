"""Observed dimensions: a value read from the data is published only when enough people hold it.

An ``observed`` dimension (``safehaven.publish.outputs.Domain``) takes its values from the rows
the output's SQL counts, so its expression decides what becomes a published row label: a
practice code, but equally a pseudonym rewritten, an exact date as text or a full postcode under
a harmless column name. Disclosure control protects the counts, not the labels of the grid, so
a label held by one person is a published record even where its count is suppressed (CoP 28-29,
34b, 35: only anonymised aggregates leave the haven; ISB 1523: no small group singled out).
Rules, data-driven so that renaming a column cannot dodge them:

* **Enough people per value.** Each value of an observed dimension must be held by more distinct
  people (haven pseudonyms, ``pid``) over the whole reporting period than the output's
  disclosure threshold (``Policy.threshold``: counts of 1 to the threshold are suppressed, so a
  value held by that few is a small group). If any value is held by fewer, the build is refused,
  naming the output, the dimension and how many values are too rare, never a value
  (:func:`refuse_rare_values`). The people are counted in DuckDB by the output's own SQL with its
  projection replaced by the dimension's expression and the counted ``pid``
  (:func:`people_by_value_sql`); SQL whose shape does not allow that is refused (fail closed).
* **Never the pseudonym.** An observed dimension whose expression reads a ``pid`` column is
  refused when the declarations load (:func:`dimension_reads_pid`): it can only publish people.
"""

from __future__ import annotations

from functools import lru_cache

import duckdb
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from safehaven.core.sql import q
from safehaven.publish.sql_gate import DIALECT

#: The haven's pseudonym column: what an output counts distinct values of, never what it publishes.
PID = "pid"
#: How a refusal says what clears it.
REMEDY = "declare a code list for it, or group rare values in the output's SQL"
#: Clauses of the outer SELECT that drop or reorder rows after grouping: with them the people
#: holding a value cannot be counted from the rows the output reads.
_AFTER_GROUPING = ("having", "qualify", "limit", "offset", "distinct")
#: Clauses removed when the outer SELECT is rewritten to list (value, pid) per row.
_DROPPED = ("group", "order")


class ObservedError(ValueError):
    """An observed dimension that cannot be published as declared (the message says what clears it)."""


def _outer_select(sql: str) -> exp.Select | None:
    """The outer SELECT of ``sql`` (None if it is another kind of query or cannot be parsed)."""
    try:
        query = sqlglot.parse_one(sql, read=DIALECT)
    except SqlglotError:
        return None  # the gate refuses SQL that does not parse
    return query if isinstance(query, exp.Select) else None


def _projection(select: exp.Select, name: str) -> exp.Expression | None:
    """The expression the outer SELECT gives column ``name`` (without its alias)."""
    for projection in select.expressions:
        if projection.alias_or_name == name:
            return projection.unalias()
    return None


@lru_cache(maxsize=1024)
def dimension_reads_pid(sql: str, dimension: str) -> bool:
    """Whether the outer SELECT's expression for ``dimension`` reads a ``pid`` column (kept per
    process: the outputs load many times a run, as for the gate's passes)."""
    select = _outer_select(sql)
    value = _projection(select, dimension) if select is not None else None
    return value is not None and any(column.name.lower() == PID for column in value.find_all(exp.Column))


def _counted_pid(count: exp.Expression | None) -> exp.Column | None:
    """The column of a ``count(DISTINCT <alias>.pid)`` measure (None for any other expression)."""
    if not isinstance(count, exp.Count) or not isinstance(count.this, exp.Distinct):
        return None
    counted = count.this.expressions
    if len(counted) != 1 or not isinstance(counted[0], exp.Column) or counted[0].name.lower() != PID:
        return None
    return counted[0]


def people_by_value_sql(sql: str, dimension: str, count_col: str) -> str:
    """SQL of ``(v, people)``: the distinct ``pid`` holding each value of ``dimension`` in the rows ``sql``
    counts (its FROM, joins and WHERE kept; its grouping dropped). Raises :class:`ObservedError` when
    the outer SELECT is not one grouping SELECT whose count is ``count(DISTINCT <alias>.pid)``."""
    select = _outer_select(sql)
    value = _projection(select, dimension) if select is not None else None
    pid = _counted_pid(_projection(select, count_col)) if select is not None else None
    if select is None or value is None or pid is None or any(select.args.get(k) for k in _AFTER_GROUPING):
        raise ObservedError(
            f"the people holding each value of observed dimension {dimension} cannot be counted from the SQL: "
            f"write it as one SELECT naming {dimension} and counting {count_col} as count(DISTINCT <alias>.{PID}) "
            f"(no HAVING, QUALIFY, LIMIT or DISTINCT), or {REMEDY}"
        )
    rows = select.copy()
    rows.set("expressions", [value.copy().as_("v"), pid.copy().as_(PID)])
    for clause in _DROPPED:
        rows.set(clause, None)
    return f"SELECT v, count(DISTINCT {PID}) AS people FROM ({rows.sql(dialect=DIALECT)}) GROUP BY v"


def rare_values(con: duckdb.DuckDBPyConnection, people_sql: str, cells: str, dimension: str, threshold: int) -> int:
    """How many values of ``dimension`` in ``cells`` are held by ``threshold`` distinct people or fewer.

    A value in the cells that ``people_sql`` does not find counts as held by no one (fail closed).
    """
    d = q(dimension)
    row = con.execute(
        f"SELECT count(*) FROM (SELECT DISTINCT {d} AS v FROM {cells}) o "
        f"LEFT JOIN ({people_sql}) p ON p.v = o.v WHERE coalesce(p.people, 0) <= ?",
        [threshold],
    ).fetchone()
    return int(row[0]) if row else 0


def refuse_rare_values(
    con: duckdb.DuckDBPyConnection,
    output: str,
    sql: str,
    observed: list[str],
    count_col: str,
    cells: str,
    threshold: int,
) -> None:
    """Refuse the build when a value of an ``observed`` dimension is held by ``threshold`` people or fewer
    over the reporting period (module docstring). ``cells``: the counted cells of the whole period;
    the caller runs this where ``counting_months`` holds every month of the period, read-only."""
    for dimension in observed:
        try:
            people_sql = people_by_value_sql(sql, dimension, count_col)
        except ObservedError as exc:
            raise ObservedError(f"{output}: {exc}") from None
        rare = rare_values(con, people_sql, cells, dimension, threshold)
        if rare:
            raise ObservedError(
                f"{output}: observed dimension {dimension} has {rare} value(s) held by {threshold} people or fewer "
                f"over the reporting period, which would publish a small group as a row label: {REMEDY}"
            )
