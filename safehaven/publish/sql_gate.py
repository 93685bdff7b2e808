"""The gate on an output's SQL: one read-only SELECT over the output's haven tables, nothing else.

Output definitions (``data_contracts/outputs/*.yaml``) carry SQL that the aggregate stage runs
inside the store. The rule (CoP 28-29, 34b: only anonymised aggregates of pseudonymised content
leave the haven; CoP 22, 42b: a collection is read, or linked, only as declared; Caldicott
principle 3, the minimum necessary) is that such SQL *reads* the haven zone and does nothing
else. :func:`check_output_sql` refuses, when the definitions load, SQL that:

* is not exactly one statement (``SELECT 1; DROP TABLE x`` is two);
* is not a query (``SELECT``, ``WITH``, ``FROM``-first, set operations) or contains a write,
  DDL or command anywhere (INSERT, UPDATE, DELETE, CREATE, DROP, COPY, ATTACH, DETACH, PRAGMA,
  SET, INSTALL, LOAD, EXPORT, CALL ...);
* calls a function that reads files, the network, settings or the environment, or changes
  state (``read_csv``, ``read_parquet``, ``glob``, ``sniff_csv``, ``query``, ``getenv``,
  ``nextval`` ...: :func:`_forbidden_function`), or uses in ``FROM`` a table function outside
  the allow-list :data:`TABLE_FUNCTIONS`;
* calls a function that raises an error with a message of the caller's choosing (``error``): the
  message would carry record-level values out of the store into the step failure, Dagster's
  event log and ``safehaven run``'s output;
* reads ``counting_months`` other than as a joined table (a subquery reading it as a value, or a
  domain, would change with the months counted together: :func:`_refuse_counting_months_elsewhere`);
* reads a table outside the haven zone: every table must be ``haven.<collection>`` for one of
  the output's declared collections, the temporary ``reporting_months`` or ``counting_months``
  table, or a CTE of the
  query (a file name in ``FROM``, ``landing.x``, ``vault.x``, ``store.haven.x`` are refused);
* counts a people measure (the output's count column and every denominator, passed as
  ``counts``) as anything but ``count(DISTINCT <alias>.pid)`` of a haven table, read directly or
  through CTEs and derived tables that pass the pseudonym on unchanged (:func:`_refuse_other_count`).
  The threshold (suppress 1-7) is applied to whatever number the SQL returns, so ``count(*)`` would
  publish one person with twelve episodes as a cell of 10 people (CoP 34b; ISB 1523: small counts of
  *people*); and a denominator is published beside the count, so one written as any other
  expression (``max(admission_date)`` in days, say) would publish a per-record value under it.

The helper macros of ``safehaven.publish.outputs.MACROS`` (``codes``, ``age_band``,
``age_years``, ``sex_category``) are the haven's own and stay usable. The gate is the first
line; the second is that the SQL runs in a ``READ ONLY`` transaction
(:func:`read_only_transaction`), in which the store cannot be written whatever the SQL says.

**Run-time failures name the output and DuckDB's error class, never DuckDB's message.** A
message can quote the value that failed (``Could not convert string 'AB1' to INT32``), and a
step's failure reaches Dagster's event log and the console. Every place an output's SQL runs
(``counting._run_sql``, ``outputs.build_output``, which runs the domains' SQL) withholds it
(:func:`withholds_run_time_errors`), raising :class:`OutputSqlFailed` instead, which says how to see
the detail: run the SQL by hand on a copy of the store (README "metadata, logs and errors carry
counts, hashes and versions, never values").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache, wraps
from typing import ParamSpec, TypeVar

import duckdb
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.scope import Scope, build_scope, traverse_scope

#: The dialect output SQL is written in.
DIALECT = "duckdb"
#: The only zone (schema) output SQL may read.
HAVEN_ZONE = "haven"
#: Relations of the connection the SQL may name without a schema (``outputs.install_helpers``).
#: ``reporting_months``: every month of the period; ``counting_months``: those being counted now
#: (``safehaven.publish.counting``).
REPORTING_MONTHS = "reporting_months"
COUNTING_MONTHS = "counting_months"
HELPER_TABLES = frozenset({REPORTING_MONTHS, COUNTING_MONTHS})
#: Table-valued functions allowed in ``FROM``: the haven's code-list macro and pure generators.
TABLE_FUNCTIONS = frozenset({"codes", "generate_series", "range", "unnest"})
#: Function names refused anywhere: they read files, the network, settings or the environment,
#: run SQL text, change state, or raise an error with a message of the caller's choosing (``error``,
#: DuckDB's only one: its message would carry record-level values into the logs).
FORBIDDEN_FUNCTIONS = frozenset(
    {
        "glob",
        "query",
        "query_table",
        "getenv",
        "current_setting",
        "nextval",
        "currval",
        "setseed",
        "which_secret",
        "error",
    }
)
#: Prefixes and suffixes of function families that read files or other databases.
FORBIDDEN_PREFIXES = ("read_", "parquet_", "sniff_", "duckdb_", "pragma_", "http", "iceberg_", "delta_")
FORBIDDEN_SUFFIXES = ("_scan",)
#: Statement nodes that write, define, or change the session; refused at the root or nested.
STATEMENTS = (
    exp.DML,
    exp.DDL,
    exp.Drop,
    exp.Create,
    exp.Insert,
    exp.Update,
    exp.Delete,
    exp.Merge,
    exp.Copy,
    exp.Attach,
    exp.Detach,
    exp.Pragma,
    exp.Set,
    exp.Install,
    exp.Command,
    exp.Use,
    exp.Transaction,
    exp.Commit,
    exp.Rollback,
    exp.Summarize,
    exp.Describe,
)


#: The haven's pseudonym column: one value per person, in every haven table (``safehaven.protect.pseudonymise``).
PSEUDONYM = "pid"
#: The one form an output's people measure takes (:func:`_refuse_other_count`).
PEOPLE_COUNT = f"count(DISTINCT <alias>.{PSEUDONYM})"
#: What a run-time failure says: the output, what failed and DuckDB's error class, never its message.
RUN_TIME_FAILURE = (
    "{output}: {what} failed at run time ({error}); DuckDB's message is withheld, as it may quote "
    "record-level values: run the output's SQL by hand on a copy of the store to see it, then correct "
    "the output's definition"
)
#: What an error class alone says about a failure inside the read-only run (never read from its message).
RUN_TIME_HINTS = {"TransactionException": "usually a write, refused in read-only mode"}

P = ParamSpec("P")
R = TypeVar("R")


class OutputSqlRefused(ValueError):
    """An output's SQL is not one read-only SELECT over its haven tables."""


class OutputSqlFailed(RuntimeError):
    """An output's SQL failed at run time; DuckDB's message, which may quote values, is withheld."""


def check_output_sql(sql: str, collections: Iterable[str], *, what: str = "sql", counts: Iterable[str] = ()) -> None:
    """Refuse ``sql`` unless it is one read-only SELECT over ``haven.<collection>`` tables.

    ``what`` names the SQL in the message (``sql``, or a dimension's domain); ``counts``, the
    output's people measures (its count column and its denominators), each of which must be
    ``count(DISTINCT <alias>.pid)`` of a haven table (a domain's SQL has none). Raises
    :class:`OutputSqlRefused` naming the problem; the loader adds the file (module docstring).

    The verdict depends on these arguments only, and a pass is kept for the process (issue 22:
    the outputs are loaded many times a run, each parse ~5 ms); a refusal is never kept, so
    refused SQL is parsed and refused again every time.
    """
    _passed(sql, frozenset(collections), what, tuple(counts))


@lru_cache(maxsize=1024)
def _passed(sql: str, collections: frozenset[str], what: str, counts: tuple[str, ...]) -> None:
    query = _single_query(sql, what)
    _refuse_statements(query, what)
    _refuse_functions(query, what)
    _refuse_tables(query, set(collections), what)
    _refuse_counting_months_elsewhere(query, what)
    for count in counts:
        _refuse_other_count(query, count, what)


def _single_query(sql: str, what: str) -> exp.Query:
    """The one statement of ``sql``, which must be a query."""
    try:
        statements = [s for s in sqlglot.parse(sql, read=DIALECT) if s is not None]
    except SqlglotError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OutputSqlRefused(f"{what} cannot be parsed as one DuckDB SELECT ({first})") from None
    if len(statements) != 1:
        raise OutputSqlRefused(f"{what} holds {len(statements)} statements; an output's SQL is one SELECT")
    statement = statements[0]
    if not isinstance(statement, exp.Query) or isinstance(statement, STATEMENTS):
        raise OutputSqlRefused(f"{what} runs {_kind(statement)}, not a SELECT; an output's SQL only reads")
    return statement


def _kind(node: exp.Expression) -> str:
    """The statement's keyword (``DROP``, ``ATTACH``, ``LOAD`` for a command)."""
    if isinstance(node, exp.Command):
        return str(node.this).upper()
    return node.key.upper()


def _refuse_statements(query: exp.Query, what: str) -> None:
    """No write, DDL or command nested anywhere in the query."""
    for node in query.walk():
        if node is not query and isinstance(node, STATEMENTS):
            raise OutputSqlRefused(f"{what} contains {_kind(node)}; an output's SQL only reads")


def _function_name(node: exp.Func) -> str:
    """A function's name as written (lower case)."""
    if isinstance(node, exp.Anonymous):
        return str(node.name).lower()
    return node.sql_name().lower()


def _forbidden_function(name: str) -> bool:
    """Whether ``name`` reads files, the network, settings or the environment, or changes state."""
    return name in FORBIDDEN_FUNCTIONS or name.startswith(FORBIDDEN_PREFIXES) or name.endswith(FORBIDDEN_SUFFIXES)


def _refuse_functions(query: exp.Query, what: str) -> None:
    """No file- or network-reading function anywhere; only allow-listed table functions in FROM."""
    for node in query.find_all(exp.Func):
        name = _function_name(node)
        if _forbidden_function(name):
            raise OutputSqlRefused(f"{what} calls {name}(), which reads outside the haven or changes state")
    for table in query.find_all(exp.Table):
        if isinstance(table.this, exp.Func):
            name = _function_name(table.this)
            if name not in TABLE_FUNCTIONS:
                allowed = ", ".join(sorted(TABLE_FUNCTIONS))
                raise OutputSqlRefused(f"{what} reads from {name}(); the table functions allowed are {allowed}")


def _cte_references(query: exp.Query, what: str) -> set[int]:
    """Ids of the table nodes that name a CTE visible where they stand."""
    try:
        scopes = traverse_scope(query)
    except SqlglotError as exc:
        raise OutputSqlRefused(f"{what}: its tables cannot be resolved ({exc})") from None
    return {
        id(table)
        for scope in scopes
        for table in scope.tables
        if not table.db and not table.catalog and table.name in scope.cte_sources
    }


def _refuse_tables(query: exp.Query, collections: set[str], what: str) -> None:
    """Every table is a CTE, a helper table, or ``haven.<collection>`` of the output."""
    ctes = _cte_references(query, what)
    for table in query.find_all(exp.Table):
        if isinstance(table.this, exp.Func) or id(table) in ctes:
            continue
        name = ".".join(part for part in (table.catalog, table.db, table.name) if part)
        if not table.catalog and not table.db and table.name in HELPER_TABLES:
            continue
        if table.catalog or table.db != HAVEN_ZONE:
            raise OutputSqlRefused(
                f"{what} reads {name}, outside the haven zone; name tables as {HAVEN_ZONE}.<collection>"
            )
        if table.name not in collections:
            raise OutputSqlRefused(
                f"{what} reads {name}, which is not one of the output's collections {sorted(collections)}"
            )


def _refuse_counting_months_elsewhere(query: exp.Query, what: str) -> None:
    """``counting_months`` is only a joined table (in a FROM or JOIN), never read as a value, and only
    by the count itself.

    It holds the months being counted (``safehaven.publish.counting``), so SQL that reads it as a
    value (a scalar subquery such as the period's last month, ``IN``, ``EXISTS``) or a dimension's
    domain would change with the months counted together: a month counted alone would lose cells.
    Those read ``reporting_months``, the whole period. This is the first line; the count itself
    checks any count of fewer months against the whole period (``counting._same_as_whole``).
    """
    for table in query.find_all(exp.Table):
        if table.db or table.catalog or table.name != COUNTING_MONTHS:
            continue
        joined = isinstance(table.parent, (exp.From, exp.Join))
        if what != "sql" or not joined or _read_as_value(table, query):
            raise OutputSqlRefused(
                f"{what} reads {COUNTING_MONTHS} {'in a domain' if what != 'sql' else 'as a value'}: it holds "
                f"only the months being counted; join it for the month a record is counted in, and read "
                f"{REPORTING_MONTHS} for the whole period"
            )


def _read_as_value(node: exp.Expression, root: exp.Expression) -> bool:
    """Whether ``node`` stands in a subquery used as a value (scalar, ``IN``, ``EXISTS``, ``ANY``)."""
    parent = node.parent
    while parent is not None and parent is not root:
        if isinstance(parent, (exp.In, exp.Exists, exp.Any, exp.All)):
            return True
        if isinstance(parent, exp.Subquery) and not isinstance(parent.parent, (exp.From, exp.Join, exp.Lateral)):
            return True
        parent = parent.parent
    return False


def _refuse_other_count(query: exp.Query, count: str, what: str) -> None:
    """A people measure (the count column, or a denominator) is ``count(DISTINCT <alias>.pid)`` of a
    haven table, and nothing else.

    Every output counts distinct people (haven pseudonyms) per cell (``outputs`` module docstring,
    "People"), and the threshold (suppress 1-7; CoP 34b, ISB 1523) is applied to whatever number the
    SQL returns: ``count(*)`` counts records, so one person with twelve episodes would be published
    as 10 people. The count column is defined once, in the outer SELECT, as ``count(DISTINCT x.pid)``
    (or ``count(DISTINCT pid)`` where only one table of the SELECT can hold it), and ``x.pid`` is
    the ``pid`` of a haven table, read directly or through CTEs and derived tables that pass it on
    as a plain column (:func:`_pseudonym_of_haven`). A denominator likewise: it is published beside the
    count, and any other expression (``max(admission_date)`` in days, a pseudonym's digits) would
    publish a per-record value as a number no threshold touches.
    """
    measure = _count_expression(query, count, what)
    column = _distinct_column(measure)
    if column is None:
        raise OutputSqlRefused(
            f"{what} defines its count column {count} as {_shown(measure)}: an output counts people, "
            f"so write it {PEOPLE_COUNT} of a haven table (the threshold is applied to this number)"
        )
    if not _pseudonym_of_haven(column, build_scope(query), frozenset()):
        raise OutputSqlRefused(
            f"{what} counts its count column {count} over {column.sql(dialect=DIALECT)}, which is not the "
            f"{PSEUDONYM} of a haven table: "
            f"write {PEOPLE_COUNT} with <alias> a haven table, or a CTE or subquery passing its {PSEUDONYM} on "
            "unchanged and without a column list or PIVOT"
        )


def _count_expression(query: exp.Query, count: str, what: str) -> exp.Expression:
    """The expression of the count column in the outer SELECT (refused unless defined there once)."""
    if not isinstance(query, exp.Select):
        raise OutputSqlRefused(
            f"{what} is a {query.key.upper()}: its count column {count} is defined once, in one outer SELECT, "
            f"as {PEOPLE_COUNT}; put the set operation in a CTE"
        )
    found = [p for p in query.selects if p.alias_or_name.lower() == count.lower()]
    if len(found) != 1:
        raise OutputSqlRefused(
            f"{what} defines its count column {count} {len(found)} time(s) in its outer SELECT; "
            f"define it once there, as {PEOPLE_COUNT}"
        )
    return found[0].unalias()


def _distinct_column(measure: exp.Expression) -> exp.Column | None:
    """The column of ``count(DISTINCT <column>)``; None for any other expression."""
    if not isinstance(measure, exp.Count) or measure.args.get("expressions"):
        return None
    distinct = measure.this
    if not isinstance(distinct, exp.Distinct) or distinct.args.get("on") or len(distinct.expressions) != 1:
        return None
    column = distinct.expressions[0]
    return column if isinstance(column, exp.Column) and not isinstance(column.this, exp.Star) else None


def _shown(node: exp.Expression, limit: int = 60) -> str:
    """The expression as written in the declaration (not data), cut to ``limit`` characters."""
    text = " ".join(node.sql(dialect=DIALECT).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pseudonym_of_haven(column: exp.Column, scope: Scope, seen: frozenset[tuple[int, str]]) -> bool:
    """Whether ``column``, read in ``scope``, is the ``pid`` of a haven table, passed on unchanged."""
    source = _source_of(column, scope)
    if isinstance(source, exp.Table):
        haven = source.db == HAVEN_ZONE and not source.catalog and not isinstance(source.this, exp.Func)
        return haven and column.name.lower() == PSEUDONYM
    if isinstance(source, Scope):
        return _projects_pseudonym(source, column.name.lower(), seen)
    return False


def _source_of(column: exp.Column, scope: Scope) -> exp.Table | Scope | None:
    """The table or query ``column`` reads in ``scope``: by its qualifier, else the one source that
    is not a helper table; None when there is none, several, or it renames or pivots its columns."""
    sources = scope.selected_sources
    if column.table:
        found = [sources[column.table]] if column.table in sources else []
    else:
        found = [(node, source) for node, source in sources.values() if not _helper_table(source)]
    if len(found) != 1:
        return None
    node, source = found[0]
    defined = source.expression.parent if isinstance(source, Scope) else None
    if _reshaped(node) or (defined is not None and _reshaped(defined)):
        return None
    return source


def _helper_table(source: exp.Table | Scope) -> bool:
    """Whether ``source`` is ``reporting_months`` or ``counting_months`` (they hold months only)."""
    return isinstance(source, exp.Table) and not source.db and not source.catalog and source.name in HELPER_TABLES


def _reshaped(node: exp.Expression) -> bool:
    """Whether ``node`` renames its columns (``AS x(a, b)``) or pivots them: a name no longer says which column."""
    alias = node.args.get("alias")
    return bool(node.args.get("pivots")) or bool(isinstance(alias, exp.TableAlias) and alias.columns)


def _projects_pseudonym(scope: Scope, name: str, seen: frozenset[tuple[int, str]]) -> bool:
    """Whether column ``name`` of the CTE or subquery ``scope`` is, in every branch of it, a haven ``pid``."""
    if (id(scope), name) in seen:  # a recursive CTE: not passed on unchanged
        return False
    seen = seen | {(id(scope), name)}
    branches = _branches(scope)
    if not all(isinstance(b.expression, exp.Select) for b in branches):
        return False
    names = [p.alias_or_name.lower() for p in branches[0].expression.selects]
    if names.count(name) != 1:
        return False
    position = names.index(name)
    for branch in branches:
        selects = branch.expression.selects
        if position >= len(selects) or selects[position].alias_or_name.lower() != name:
            return False
        inner = selects[position].unalias()
        if not isinstance(inner, exp.Column) or not _pseudonym_of_haven(inner, branch, seen):
            return False
    return True


def _branches(scope: Scope) -> list[Scope]:
    """The SELECTs of ``scope``: itself, or every branch of its UNION, INTERSECT or EXCEPT."""
    if not scope.set_operation_scopes:
        return [scope]
    return [leaf for branch in scope.set_operation_scopes for leaf in _branches(branch)]


@contextmanager
def run_time_errors_withheld(output: str, what: str = "its SQL") -> Iterator[None]:
    """Re-raise a DuckDB error as :class:`OutputSqlFailed`: the output, ``what`` failed and the error's
    class, never its message (module docstring, "Run-time failures"). The DuckDB error is neither the
    new one's cause nor its shown context, so no traceback or event log carries its message."""
    try:
        yield
    except duckdb.Error as exc:
        raise OutputSqlFailed(run_time_failure(output, what, exc)) from None


def run_time_failure(output: str, what: str, error: duckdb.Error) -> str:
    """The one-line message of a run-time failure: :data:`RUN_TIME_FAILURE`, with a hint the class alone gives."""
    name = type(error).__name__
    hint = RUN_TIME_HINTS.get(name)
    return RUN_TIME_FAILURE.format(output=output, what=what, error=f"{name}: {hint}" if hint else name)


def withholds_run_time_errors(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function that runs an output's SQL (its ``output`` argument): a DuckDB error it
    raises is withheld as in :func:`run_time_errors_withheld`, naming the output and ``what``."""

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(func)

        @wraps(func)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            output = signature.bind_partial(*args, **kwargs).arguments["output"]
            with run_time_errors_withheld(output.name, what):
                return func(*args, **kwargs)

        return run

    return decorate


@contextmanager
def read_only_transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """A ``READ ONLY`` transaction: nothing in the store can be written; temporary tables can.

    Committed when the block ends, rolled back if it raises (module docstring).
    """
    con.execute("BEGIN TRANSACTION READ ONLY")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
