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
* reads ``counting_months`` other than as a joined table (a subquery reading it as a value, or a
  domain, would change with the months counted together: :func:`_refuse_counting_months_elsewhere`);
* reads a table outside the haven zone: every table must be ``haven.<collection>`` for one of
  the output's declared collections, the temporary ``reporting_months`` or ``counting_months``
  table, or a CTE of the
  query (a file name in ``FROM``, ``landing.x``, ``vault.x``, ``store.haven.x`` are refused).

The helper macros of ``safehaven.publish.outputs.MACROS`` (``codes``, ``age_band``,
``age_years``, ``sex_category``) are the haven's own and stay usable. The gate is the first
line; the second is that the SQL runs in a ``READ ONLY`` transaction
(:func:`read_only_transaction`), in which the store cannot be written whatever the SQL says.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache

import duckdb
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.scope import traverse_scope

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
#: run SQL text, or change state.
FORBIDDEN_FUNCTIONS = frozenset(
    {"glob", "query", "query_table", "getenv", "current_setting", "nextval", "currval", "setseed", "which_secret"}
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


class OutputSqlRefused(ValueError):
    """An output's SQL is not one read-only SELECT over its haven tables."""


def check_output_sql(sql: str, collections: Iterable[str], *, what: str = "sql") -> None:
    """Refuse ``sql`` unless it is one read-only SELECT over ``haven.<collection>`` tables.

    ``what`` names the SQL in the message (``sql``, or a dimension's domain). Raises
    :class:`OutputSqlRefused` naming the problem; the loader adds the file (module docstring).

    The verdict depends on these arguments only, and a pass is kept for the process (issue 22:
    the outputs are loaded many times a run, each parse ~5 ms); a refusal is never kept, so
    refused SQL is parsed and refused again every time.
    """
    _passed(sql, frozenset(collections), what)


@lru_cache(maxsize=1024)
def _passed(sql: str, collections: frozenset[str], what: str) -> None:
    query = _single_query(sql, what)
    _refuse_statements(query, what)
    _refuse_functions(query, what)
    _refuse_tables(query, set(collections), what)
    _refuse_counting_months_elsewhere(query, what)


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
