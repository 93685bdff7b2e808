"""Great Expectations 1.x on the store's DuckDB connection, with SQL pushdown and counts only.

The one place that runs GX, and the one place that knows its DuckDB workarounds. Rules:

* **Same connection.** DuckDB lets one process hold the encrypted store file, so GX runs on
  the caller's ``duckdb.DuckDBPyConnection`` (from ``Store.connect``) and never opens its
  own. GX gets a SQLAlchemy engine whose ``StaticPool`` hands out that one connection,
  wrapped so that GX can neither close it nor begin, commit or roll back on it: the caller
  owns the connection and its transaction state; GX only reads.
* **Why the wrapper (upstream bug).** GX's ``SqlAlchemyExecutionEngine.execute_query`` runs
  a query inside ``with engine.connect()`` and calls ``fetchall()`` *after* the block has
  closed the connection. Closing ends the transaction SQLAlchemy began (duckdb-engine sends
  ``BEGIN``) with a ``ROLLBACK``, and the pool's reset-on-return would send another;
  duckdb-engine's DB-API cursor is the DuckDB connection itself, so that statement replaces
  the pending result and every metric comes back empty: ``IndexError: list index out of
  range`` in ``resolve_metric_bundle``. Upstream:
  great_expectations issue #11579, "SqlAlchemyExecutionEngine.resolve_metric_bundle raises
  IndexError with duckdb-engine (empty results)",
  https://github.com/fivetran/great_expectations/issues/11579 (the GX repository; the same
  traceback was first reported in #10738, "Enable Duckdb sqlalchemy data source"). GX keeps
  a persisted connection only for the dialects in ``_PERSISTED_CONNECTION_DIALECTS``
  (sqlite, mssql, bigquery, databricks). Here DuckDB is made a persisted-connection dialect
  from the outside: one static connection, no reset on return, no-op ``begin``,
  ``rollback`` and ``close``, so the result survives until GX reads it.
* **Counts, never values** (``docs/design.md`` "Keep confidential data inside the store"). Failing
  values are NHS numbers, dates and postcodes. The result format is ``BASIC`` with
  ``partial_unexpected_count = 0`` and ``include_unexpected_rows = False``: GX then asks
  DuckDB for failing values with ``LIMIT 0`` and holds none. The document is scrubbed
  anyway: every value-bearing key (``SCRUBBED_KEYS``), column-level ``observed_value`` (a
  maximum or a list of distinct values is data), and exception messages and tracebacks (a
  DuckDB error can quote a value: "Could not convert string '...'"); the exception type
  stays. GX's log records are kept from the application's handlers for the same reason:
  its error log repeats the database message. Errors reach the caller through the result.
* **Ephemeral.** ``gx.get_context(mode="ephemeral")`` holds the datasource in memory, and
  the suite is validated on the batch directly (``Batch.validate``, GX's public API): neither
  the suite nor its result is stored in the context, and nothing is written to disk (no data
  docs are built). Going through a stored ``ValidationDefinition`` did the same validation
  and also serialised the suite, the definition and the result into the context's in-memory
  stores: 13% of a 23-expectation suite's CPU on a small batch (0.31 s against 0.27 s, medians
  of 20 here), paid by every intake run and most tests. Progress bars are off (no
  tqdm on stderr). ``GX_ANALYTICS_ENABLED=False`` is set before GX is imported and
  ``analytics_enabled`` is off in the context (GX 1.24 ships no analytics client anyway).
* **Whole table, read through a query.** The batch is the whole table, as a query asset
  ``SELECT * FROM "schema"."table"``. A table asset fails for a non-default schema: SQLAlchemy
  2.1's PostgreSQL reflection, inherited by duckdb-engine, reads ``pg_catalog.pg_collation``,
  which DuckDB lacks, and GX's fallback then drops the schema (``SELECT * FROM t``). DuckDB
  folds the subquery, so the query asset costs nothing.
* **Regex.** GX builds no regex condition for DuckDB ("Regex is not supported for dialect
  duckdb"). The regex expectations compile to DuckDB's
  ``regexp_matches(column, regex)``: a partial match (like GX's pandas ``str.contains`` and
  PostgreSQL's ``~``), RE2 syntax. DuckDB's own ``~`` would be a *full* match, so it is not
  used. Anchor patterns (``^...$``) to test whole values. The pattern is rendered into the
  statement as a literal (SQLAlchemy ``literal_execute``), not bound as a parameter: DuckDB
  compiles a constant pattern once per query but a parameter once per row (three times
  slower on 5M rows).
* **Value sets.** For a set of text values on DuckDB, ``expect_column_values_to_be_in_set``
  compiles to ``list_contains([...], column)`` instead of ``column IN (...)``: the same test
  for a non-NULL text value (GX leaves NULL rows out first), about four times faster in
  DuckDB 1.4 for a code list of tens of values. Other sets keep GX's ``IN``.
* **Cost.** GX bundles the metrics of one domain into one query (the null, set, regex and
  range counts of a table in one ``SELECT sum(CASE ...)``) and adds separate queries for the
  row count, column pairs (two), uniqueness (a window over the column), one ``LIMIT 0``
  probe per expectation, and a column listing: 12 queries for 6 expectations. On 5M rows
  (2 shared cores, medians of 5) that matched one hand-written DuckDB statement computing
  the same counts: 1.9 s against 1.9 s, and 3.5 s against 4.2 s on a busier run; the
  uniqueness window dominates both. Without the uniqueness check GX took 1.3 times the hand
  pass (0.74 s against 0.56 s). GX's fixed cost is 0.1 to 0.2 s a suite. About a tenth of it
  went on rebuilding each expectation's configuration once per key whenever GX asks for its
  kwargs; :func:`_domain_kwargs` and :func:`_success_kwargs` build it once per call (a
  19-expectation suite on a small table: 0.17 s against 0.15 s here, medians of 25).
"""

from __future__ import annotations

from safehaven.intake import gx_quiet

gx_quiet.apply()  # before the first import of great_expectations (it reads the environment then)

import re  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import duckdb  # noqa: E402
import great_expectations as gx  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from duckdb_engine import ConnectionWrapper  # noqa: E402
from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: E402
from great_expectations.datasource.fluent.interfaces import GxDatasourceWarning  # noqa: E402
from great_expectations.expectations.metrics.column_map_metrics import (  # noqa: E402
    column_values_match_regex,
    column_values_match_regex_list,
    column_values_not_match_regex,
    column_values_not_match_regex_list,
)
from great_expectations.expectations.metrics.column_map_metrics.column_values_in_set import (  # noqa: E402
    ColumnValuesInSet,
)
from sqlalchemy.pool import StaticPool  # noqa: E402

GX_VERSION: str = gx.__version__

#: Counts only: GX's BASIC format without the sample of failing values it carries by default.
RESULT_FORMAT: dict[str, Any] = {
    "result_format": "BASIC",
    "partial_unexpected_count": 0,
    "include_unexpected_rows": False,
    "return_unexpected_index_query": False,
}

#: Keys of a GX result that can hold row values or row locators; removed wherever they occur.
SCRUBBED_KEYS: frozenset[str] = frozenset(
    {
        "partial_unexpected_list",
        "partial_unexpected_counts",
        "partial_unexpected_index_list",
        "unexpected_list",
        "unexpected_index_list",
        "unexpected_index_query",
        "unexpected_index_column_names",
        "unexpected_rows",
        "details",
    }
)

WITHHELD = "<withheld>"
_SAME_BUT_META = "two expectations differ only in meta or notes, and GX would keep only one of them"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DB_ERROR_CLASS = re.compile(r"^\(([A-Za-z_][\w.]*)\)")
_RAISED_LINE = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)):", re.MULTILINE)


# --- the borrowed connection -------------------------------------------------------------


class _BorrowedConnection(ConnectionWrapper):
    """The caller's DuckDB connection lent to SQLAlchemy: usable, but not GX's to manage.

    ``close`` is a no-op so that GX's ``engine.dispose()`` (also run from ``__del__``) leaves
    the store connection open; ``begin``, ``commit`` and ``rollback`` are no-ops so that GX
    opens no transaction on the caller's connection and a pool reset cannot discard a
    pending result (the upstream bug in the module docstring).
    """

    def close(self) -> None:
        pass

    def begin(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass


def _engine_kwargs(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """``create_engine`` arguments for an engine over ``con`` alone.

    GX's SQL datasource passes them on to ``create_engine("duckdb://", ...)`` for both of
    the engines it builds (the datasource's and the execution engine's).
    """
    borrowed = _BorrowedConnection(con)
    return {
        "creator": lambda: borrowed,
        "poolclass": StaticPool,
        "pool_reset_on_return": None,
    }


# --- regex on DuckDB -----------------------------------------------------------------------

_REGEX_MODULES = (
    column_values_match_regex,
    column_values_not_match_regex,
    column_values_match_regex_list,
    column_values_not_match_regex_list,
)


def _with_duckdb_regex(original: Callable[..., Any]) -> Callable[..., Any]:
    """GX's regex builder, plus DuckDB: ``regexp_matches(column, regex)``.

    For DuckDB GX hands the builder the engine's dialect instance (its ``dialect_module`` is
    ``None``), which none of GX's branches recognise. Every other dialect is passed through
    unchanged.
    """
    if getattr(original, "_safehaven_duckdb", False):
        return original

    def build(column: Any, regex: str, dialect: Any, positive: bool = True) -> sa.ColumnElement[Any] | None:
        if getattr(dialect, "name", None) == "duckdb":
            # Rendered into the statement, not bound: DuckDB compiles a constant pattern once
            # per query, a bound parameter once per row (three times slower on 5M rows).
            match = sa.func.regexp_matches(column, sa.literal(regex, literal_execute=True))
            return match if positive else sa.not_(match)
        return original(column, regex, dialect, positive)

    build._safehaven_duckdb = True  # type: ignore[attr-defined]
    return build


for _module in _REGEX_MODULES:
    _module.get_dialect_regex_expression = _with_duckdb_regex(  # type: ignore[attr-defined]
        _module.get_dialect_regex_expression
    )


# --- value sets on DuckDB ------------------------------------------------------------------


def _with_duckdb_list_contains(original: Callable[..., Any]) -> Callable[..., Any]:
    """GX's in-set condition, as ``list_contains([...], column)`` on DuckDB for sets of text.

    ``column IN ('a', 'b', ...)`` with tens of values runs about four times slower in DuckDB
    1.4 than ``list_contains`` over a constant list (6.7M rows, 52 codes: 2.2 s against
    0.6 s). For a non-NULL text value the two are the same test; GX excludes NULL rows before
    the condition runs. Other value sets (numbers, dates, a set holding NULL) and other
    dialects keep GX's ``IN``.
    """
    if getattr(original, "_safehaven_duckdb", False):
        return original

    def build(column: Any, value_set: Any, **kwargs: Any) -> Any:
        dialect = kwargs.get("_dialect")
        if getattr(dialect, "name", None) == "duckdb" and value_set and all(isinstance(v, str) for v in value_set):
            values = sa.func.list_value(*(sa.literal(v, literal_execute=True) for v in value_set))
            return sa.func.list_contains(values, column)
        return original(column, value_set, **kwargs)

    build._safehaven_duckdb = True  # type: ignore[attr-defined]
    return build


ColumnValuesInSet._sqlalchemy_impl = staticmethod(  # type: ignore[method-assign]
    _with_duckdb_list_contains(ColumnValuesInSet._sqlalchemy_impl)
)


# --- an expectation's kwargs, its configuration built once --------------------------------

#: GX's own methods (kept for the test that holds the replacements to them, tests/unit/test_gx_duckdb.py;
#: a second import of this module finds them on the replacements, as the other patches here do)
GX_DOMAIN_KWARGS = getattr(
    gx.expectations.Expectation._get_domain_kwargs, "_gx_own", gx.expectations.Expectation._get_domain_kwargs
)
GX_SUCCESS_KWARGS = getattr(
    gx.expectations.Expectation._get_success_kwargs, "_gx_own", gx.expectations.Expectation._get_success_kwargs
)


def _domain_kwargs(self: gx.expectations.Expectation) -> dict[str, Any]:
    """GX's ``Expectation._get_domain_kwargs``: each domain key's value, or its field's default.

    GX builds the expectation's whole ``configuration`` (a pydantic ``dict()`` and a new
    ``ExpectationConfiguration``) once per key, and validation asks for these kwargs many times
    per expectation: about a tenth of GX's time on a small batch (module docstring, "Cost").
    Here it is built once per call: the same values, read from the same configuration. (GX's
    check for missing keys cannot fail: the dictionary is built from those keys.)
    """
    kwargs = self.configuration.kwargs
    return {key: kwargs.get(key, self._get_default_value(key)) for key in self.domain_keys}


def _success_kwargs(self: gx.expectations.Expectation) -> dict[str, Any]:
    """GX's ``Expectation._get_success_kwargs``: the success keys' values from one configuration,
    then the domain kwargs (``_get_domain_kwargs``, as GX asks them: a key in both takes the
    domain value)."""
    kwargs = self.configuration.kwargs
    success = {key: kwargs.get(key, self._get_default_value(key)) for key in self.success_keys}
    success.update(self._get_domain_kwargs())
    return success


_domain_kwargs._gx_own = GX_DOMAIN_KWARGS  # type: ignore[attr-defined]
_success_kwargs._gx_own = GX_SUCCESS_KWARGS  # type: ignore[attr-defined]
gx.expectations.Expectation._get_domain_kwargs = _domain_kwargs  # type: ignore[method-assign]
gx.expectations.Expectation._get_success_kwargs = _success_kwargs  # type: ignore[method-assign]


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's outcome, as counts. ``error`` is the exception type if GX raised."""

    expectation_type: str
    columns: tuple[str, ...]
    meta_id: str | None
    success: bool
    element_count: int | None
    unexpected_count: int | None
    unexpected_percent: float | None
    missing_count: int | None
    error: str | None = None


@dataclass(frozen=True)
class SuiteResult:
    """The outcome of one suite on one table: counts, the scrubbed GX document, versions.

    ``outcomes`` follow the order of the expectations given to ``run_suite``.
    """

    suite_name: str
    table: str
    success: bool
    outcomes: list[ExpectationOutcome]
    gx_version: str
    seconds: float
    _document: dict[str, Any] = field(repr=False)

    def document(self) -> dict[str, Any]:
        """The scrubbed GX validation result: JSON-able, with no failing value in it."""
        return self._document

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]


def run_suite(
    con: duckdb.DuckDBPyConnection,
    schema: str,
    table: str,
    expectations: Sequence[gx.expectations.Expectation],
    suite_name: str,
) -> SuiteResult:
    """Validate the whole of ``schema.table`` against ``expectations``, inside DuckDB.

    Every metric is a query on ``con`` (SQL pushdown); no row reaches Python. The caller's
    expectation objects are copied, so they can be reused for the next run. ``con`` is left
    open and in the transaction state it came in; it must not be used from another thread
    meanwhile. An expectation GX cannot compute (a type mismatch, say) fails with its
    exception type in ``ExpectationOutcome.error``; the others still run. Raises
    ``ValueError`` for a name that is not a plain identifier, an empty suite, or two
    expectations that differ only in ``meta`` (GX's suite is a set and would keep one).
    """
    for name in (schema, table):
        if not _IDENTIFIER.match(name):
            raise ValueError(f"not a plain SQL identifier: {name!r}")
    if not expectations:
        raise ValueError("a suite needs at least one expectation")
    started = time.perf_counter()

    context = gx.get_context(mode="ephemeral")
    context.config.analytics_enabled = False
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    with warnings.catch_warnings():
        # "a more specific datasource may be more appropriate": GX 1.x has none for DuckDB.
        warnings.simplefilter("ignore", GxDatasourceWarning)
        datasource = context.data_sources.add_sql(
            name="store", connection_string="duckdb://", kwargs=_engine_kwargs(con)
        )
    asset = datasource.add_query_asset(name=f"{schema}.{table}", query=f'SELECT * FROM "{schema}"."{table}"')
    batch_definition = asset.add_batch_definition_whole_table("whole table")

    suite = gx.ExpectationSuite(name=suite_name, expectations=_copies(expectations, suite_name))
    for expectation in suite.expectations:  # as storing the suite would: the results are put back in order by it
        expectation.id = str(uuid.uuid4())
    order = {str(expectation.id): position for position, expectation in enumerate(suite.expectations)}
    try:
        result = batch_definition.get_batch().validate(suite, result_format=RESULT_FORMAT)
    finally:
        datasource.get_execution_engine().close()

    document = scrub(result.to_json_dict())
    document["results"].sort(key=lambda r: order.get(str(r["expectation_config"].get("id")), len(order)))
    return SuiteResult(
        suite_name=suite_name,
        table=f"{schema}.{table}",
        success=bool(document["success"]),
        outcomes=[_outcome(r) for r in document["results"]],
        gx_version=GX_VERSION,
        seconds=round(time.perf_counter() - started, 3),
        _document=document,
    )


def _copies(expectations: Sequence[gx.expectations.Expectation], suite_name: str) -> list[gx.expectations.Expectation]:
    """Fresh copies of ``expectations``, in order, without ids (GX refuses a suite of
    expectations that carry one: they would belong to another suite).

    The suite is built with all of them at once. GX's suite is a set and keeps one of two
    expectations it deems the same (``ExpectationSuite._expectations_are_equalish``: they differ
    only in id, meta or notes), so such a pair is refused here, with the same rule, as adding
    them one by one refused it.
    """
    copies = []
    for expectation in expectations:
        copy = expectation.copy(deep=True)
        copy.id = None
        if any(gx.ExpectationSuite._expectations_are_equalish(copy, kept) for kept in copies):
            raise ValueError(f"suite {suite_name!r}: {_SAME_BUT_META}")
        copies.append(copy)
    return copies


def _outcome(result: dict[str, Any]) -> ExpectationOutcome:
    config = result["expectation_config"]
    kwargs = config.get("kwargs") or {}
    columns = [kwargs[key] for key in ("column", "column_A", "column_B") if kwargs.get(key)]
    columns.extend(kwargs.get("column_list") or [])
    counts = result.get("result") or {}
    return ExpectationOutcome(
        expectation_type=config["type"],
        columns=tuple(columns),
        meta_id=(config.get("meta") or {}).get("id"),
        success=bool(result["success"]),
        element_count=counts.get("element_count"),
        unexpected_count=counts.get("unexpected_count"),
        unexpected_percent=counts.get("unexpected_percent"),
        missing_count=counts.get("missing_count"),
        error=(result.get("exception_info") or {}).get("exception_type"),
    )


# --- scrubbing -----------------------------------------------------------------------------


def scrub(document: dict[str, Any]) -> dict[str, Any]:
    """Remove every value-bearing part of a GX validation result (a JSON dict), in place.

    * ``SCRUBBED_KEYS`` anywhere in the tree;
    * ``observed_value``, unless it is a number from a table-level expectation (a row or
      column count); a column-level observed value (max, mean, distinct values) is data;
    * exception messages and tracebacks, which can quote a value; the exception type stays.
    """
    for result in document.get("results", []):
        expectation_type = str((result.get("expectation_config") or {}).get("type", ""))
        counts = result.get("result")
        if isinstance(counts, dict) and "observed_value" in counts:
            value = counts["observed_value"]
            is_count = isinstance(value, int | float) and not isinstance(value, bool)
            if not (expectation_type.startswith("expect_table_") and is_count):
                counts["observed_value"] = WITHHELD
        result["exception_info"] = _scrub_exception(result.get("exception_info"))
    return _drop_keys(document)


def _scrub_exception(info: Any) -> dict[str, Any]:
    """Whether GX raised and the exception type(s); message and traceback are dropped."""
    if not isinstance(info, dict):
        return {"raised_exception": False}
    entries = [info] if "raised_exception" in info else list(info.values())
    raised = [e for e in entries if isinstance(e, dict) and e.get("raised_exception")]
    if not raised:
        return {"raised_exception": False}
    types = sorted({_exception_type(e) for e in raised})
    return {"raised_exception": True, "exception_type": ", ".join(types)}


def _exception_type(entry: dict[str, Any]) -> str:
    """``GXClass`` or ``GXClass(database.Class)``, read from the traceback and message heads."""
    raised = _RAISED_LINE.findall(str(entry.get("exception_traceback") or ""))
    name = raised[-1].rsplit(".", 1)[-1] if raised else "Exception"
    database = _DB_ERROR_CLASS.match(str(entry.get("exception_message") or ""))
    return f"{name}({database.group(1)})" if database else name


def _drop_keys(node: Any) -> Any:
    if isinstance(node, dict):
        for key in list(node):
            if key in SCRUBBED_KEYS:
                del node[key]
            else:
                node[key] = _drop_keys(node[key])
    elif isinstance(node, list):
        return [_drop_keys(item) for item in node]
    return node
