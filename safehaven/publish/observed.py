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
* **The counted row's own value.** When the declarations load (:func:`observed_problem`), an
  observed dimension's expression in the outer SELECT must read columns of the alias whose ``pid``
  the count counts, and nothing else: no column of another alias (a self-join would count the
  people of the *other* copy, everyone at the provider, as holding one person's exact date), no
  subquery (a scalar subquery can return one person's value on everyone's row), no aggregate or
  window function (a value of several rows), and never ``pid``. Through a CTE or subquery the
  same holds at every level: each column is traced to the column it projects, read from the row
  source that passes the ``pid`` on, down to a haven table; a column that cannot be traced (a
  ``SELECT *``, a column list, a name of the SELECT itself) is refused (fail closed). A month
  comes from ``reporting_months``, so a dimension read from it is declared ``reporting_months``,
  never observed.
* **A domain read from the data is held by enough people too.** A ``domain: {sql: ...}`` that
  reads a haven table publishes its values as rows of the grid whether or not anyone is in them,
  so each must be held by more than the threshold of distinct people in the rows its own SQL
  reads (:func:`domain_people_sql`, :func:`refuse_rare_domain_values`): one SELECT whose one
  column reads one haven row source under the same rules as above (DISTINCT allowed; no GROUP BY,
  HAVING, QUALIFY, LIMIT or OFFSET). A domain that reads no haven table (the reporting months, a
  generated series) holds no one's values and is not counted. The people are those of the
  domain's table, not of the output's cells: a provider with no one discharged to social care in
  a month is a true zero of the grid, protected like any cell, while a value held by a few people
  in the haven is a small group whatever the output counts.
"""

from __future__ import annotations

from functools import lru_cache

import duckdb
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.scope import Scope, build_scope

from safehaven.core.sql import q
from safehaven.publish.sql_gate import (
    DIALECT,
    HAVEN_ZONE,
    _branches,
    _helper_table,
    _pseudonym_of_haven,
    _shown,
    _source_of,
)

#: The haven's pseudonym column: what an output counts distinct values of, never what it publishes.
PID = "pid"
#: How a refusal says what clears it.
REMEDY = "declare a code list for it, or group rare values in the output's SQL"
#: How a refusal of a domain's values says what clears it.
DOMAIN_REMEDY = "declare its values (values: or a code list), or group rare values in the domain's SQL"
#: What a dimension read from ``pid`` is (:func:`observed_problem`).
FROM_PID = f"is computed from {PID}, the haven pseudonym, which is never published"
#: How deep CTEs and subqueries are traced before a column counts as untraceable (fail closed).
MAX_DEPTH = 16
#: Clauses of a domain's SELECT after which its rows are not the rows its values come from.
_DOMAIN_GROUPING = ("group", "having", "qualify", "limit", "offset")
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
    """The expression ``select`` gives column ``name`` (without its alias; names compared as DuckDB
    does, ignoring case); None when it gives none, or several (which one is read is not certain)."""
    found = [p for p in select.expressions if p.alias_or_name.lower() == name.lower()]
    return found[0].unalias() if len(found) == 1 else None


@lru_cache(maxsize=1024)
def observed_problem(sql: str, dimension: str, count_col: str) -> str | None:
    """What is wrong with observed ``dimension``'s expression in the outer SELECT (None: nothing),
    under the rule "the counted row's own value" (module docstring). Kept per process: the outputs
    load many times a run, as for the gate's passes. SQL that is not one SELECT counting
    ``count(DISTINCT <alias>.pid)`` is left to the gate and :func:`people_by_value_sql`."""
    select = _outer_select(sql)
    value = _projection(select, dimension) if select is not None else None
    pid = _counted_pid(_projection(select, count_col)) if select is not None else None
    if select is None or value is None or pid is None:
        return None
    return _expression_problem(value) or _row_problem(list(value.find_all(exp.Column)), pid, build_scope(select), 0)


def _expression_problem(value: exp.Expression) -> str | None:
    """Whether ``value`` computes over more than its own row: a subquery, an aggregate, a window."""
    if value.find(exp.Subquery, exp.Select, exp.Exists):
        return "contains a subquery, which can return another row's value (one person's) on this row"
    if value.find(exp.AggFunc, exp.Window):
        return "uses an aggregate or window function, a value of several rows rather than of the row counted"
    return None


def _computed_names(scope: Scope) -> set[str]:
    """Names the SELECT of ``scope`` gives to computed columns (a bare name may mean one of them)."""
    select = scope.expression
    if not isinstance(select, exp.Select):
        return set()
    return {
        p.alias.lower()
        for p in select.selects
        if isinstance(p, exp.Alias) and not (isinstance(p.this, exp.Column) and p.this.name.lower() == p.alias.lower())
    }


def _row_alias(column: exp.Column, scope: Scope) -> str | None:
    """The alias of the row source ``column`` reads in ``scope``: its qualifier, or the one source that
    is not a helper table; None when that is not certain (several sources, a name of the SELECT itself,
    a renamed or pivoted source)."""
    if _source_of(column, scope) is None:
        return None
    if column.table:
        return column.table
    if column.name.lower() in _computed_names(scope):
        return None
    return next(alias for alias, (_, source) in scope.selected_sources.items() if not _helper_table(source))


def _row_problem(columns: list[exp.Column], pid: exp.Column, scope: Scope, depth: int) -> str | None:
    """Whether ``columns``, read in ``scope``, are not all plain columns of the row source whose ``pid``
    is counted there, traced through CTEs and subqueries down to a haven table (module docstring)."""
    counted = _row_alias(pid, scope)
    for column in columns:
        alias = _row_alias(column, scope)
        if alias is None or depth > MAX_DEPTH:
            return f"reads {_shown(column)}, which cannot be traced to one column of the row counted (qualify it)"
        if alias != counted:
            return f"reads {_shown(column)}, a column of {alias}, not of {counted} whose {PID} is counted"
    source = _source_of(pid, scope)
    if isinstance(source, Scope):
        return _projected_problem(columns, pid, source, depth + 1)
    return FROM_PID if any(column.name.lower() == PID for column in columns) else None


def _projected_problem(columns: list[exp.Column], pid: exp.Column, scope: Scope, depth: int) -> str | None:
    """:func:`_row_problem` for the columns a CTE or subquery projects, in every branch of it."""
    for branch in _branches(scope):
        select = branch.expression
        inner_pid = _projection(select, pid.name) if isinstance(select, exp.Select) else None
        if not isinstance(inner_pid, exp.Column):
            return f"reads a column of a query that does not pass {PID} on as a plain column"
        inner: list[exp.Column] = []
        for column in columns:
            projected = _projection(select, column.name)
            if projected is None:
                return f"reads {_shown(column)}, which cannot be traced to a column its query names (no SELECT *)"
            problem = _expression_problem(projected)
            if problem:
                return f"reads {_shown(column)}, which {problem}"
            inner += list(projected.find_all(exp.Column))
        problem = _row_problem(inner, inner_pid, branch, depth)
        if problem:
            return problem
    return None


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


@lru_cache(maxsize=256)
def domain_people_sql(sql: str) -> str | None:
    """SQL of ``(v, people)`` for a domain's SQL: the distinct ``pid`` of the row source each of its values
    is read from (module docstring, "A domain read from the data"); None for a domain that reads no haven
    table. Raises :class:`ObservedError` when its shape does not allow the count (fail closed)."""
    try:
        query = sqlglot.parse_one(sql, read=DIALECT)
    except SqlglotError:
        return None  # the gate refuses SQL that does not parse
    if not any(table.db == HAVEN_ZONE for table in query.find_all(exp.Table)):
        return None
    select, pid = _domain_row_source(query)
    rows = select.copy()
    rows.set("expressions", [select.selects[0].unalias().copy().as_("v"), pid.as_(PID)])
    for clause in ("distinct", *_DROPPED):
        rows.set(clause, None)
    return f"SELECT v, count(DISTINCT {PID}) AS people FROM ({rows.sql(dialect=DIALECT)}) GROUP BY v"


def _domain_row_source(query: exp.Expression) -> tuple[exp.Select, exp.Column]:
    """The domain's SELECT and the ``pid`` of the one haven row source its value is read from."""
    shape = (
        "a domain read from the haven is one SELECT of one column, read from one haven table (or a CTE "
        f"passing its {PID} on), with no GROUP BY, HAVING, QUALIFY, LIMIT or OFFSET, so that the people "
        "holding each value can be counted"
    )
    if not isinstance(query, exp.Select) or len(query.selects) != 1 or any(query.args.get(k) for k in _DOMAIN_GROUPING):
        raise ObservedError(shape)
    scope = build_scope(query)
    value = query.selects[0].unalias()
    columns = list(value.find_all(exp.Column))
    aliases = {_row_alias(column, scope) for column in columns}
    if len(aliases) != 1 or None in aliases:
        raise ObservedError(shape)
    pid = exp.column(PID, table=str(aliases.pop()))
    if not _pseudonym_of_haven(pid, scope, frozenset()):
        raise ObservedError(shape)
    problem = _expression_problem(value) or _row_problem(columns, pid, scope, 0)
    if problem:
        raise ObservedError(f"its value {problem}")
    return query, pid


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


def refuse_rare_domain_values(
    con: duckdb.DuckDBPyConnection, output: str, dimension: str, sql: str, values: str, threshold: int
) -> None:
    """Refuse the build when a value of a domain read from the haven (``sql``) is held by ``threshold``
    people or fewer in the rows that SQL reads (module docstring). ``values``: a relation of the
    domain's values, in column ``dimension``."""
    try:
        people_sql = domain_people_sql(sql)
    except ObservedError as exc:
        raise ObservedError(f"{output}: the domain of dimension {dimension}: {exc}") from None
    if people_sql is None:
        return
    rare = rare_values(con, people_sql, values, dimension, threshold)
    if rare:
        raise ObservedError(
            f"{output}: the domain of dimension {dimension} has {rare} value(s) held by {threshold} people or fewer "
            f"in the rows its SQL reads, which would publish a small group as a row label: {DOMAIN_REMEDY}"
        )
