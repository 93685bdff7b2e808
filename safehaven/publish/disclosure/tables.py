"""Statistical disclosure control (SDC) for published aggregate tables.

Sources: CoP 34b (have regard to the Anonymisation Standard for Publishing Health and
Social Care Data, ISB 1523) and CoP 35 (outputs made from confidential data are published
openly, so they must not identify anyone); the HES analysis guide's small-number rule
(1-7 suppressed, other counts rounded to the nearest 5); OpenSAFELY's output rules
(https://docs.opensafely.org/releasing-files/: redact counts <= 7, then round to the nearest
5, recompute totals from the redacted and rounded cells, redact rates built on <= 7 people,
"midpoint 6" rounding as the alternative) and ehrql's ``measures/disclosure_control.py``.
The rules, as this module applies them to one table of cells (one row per combination of
the dimension columns) held in DuckDB; every step is a SQL statement over the whole table:

1. **Small counts are suppressed** (primary suppression). A count of 1..``threshold``
   (default 7) people is published as NULL with ``suppressed = 'primary'``. Unlike ehrql,
   which writes 0, a suppressed cell is NULL plus a reason, so it never reads as a true zero.
2. **Zeros are true zeros by default** (``Policy.suppress_zeros = False``). A zero describes
   nobody, and OpenSAFELY's midpoint-6 guidance values "zero is zero". Its risk is group
   disclosure: "0 of them" or "all of them" (a 100% cell) states a fact about everyone in
   the group. So, where a denominator is given (``rate_cols``), the *complement*
   (denominator - count) is treated as a cell too: a complement of 1..threshold ("all but
   3 people") suppresses the count as primary. With ``suppress_zeros=True`` zero counts
   and zero complements (100% cells) are suppressed as well: use it when the output's
   dimensions are themselves sensitive. Structural zeros (impossible combinations) are
   not rows of the source table at all (an output's declared ``zeros.structural``, removed
   from its grid before protection: ``safehaven.publish.outputs``, "Zeros").
3. **Other counts are rounded** (``Policy.rounding``):

   * ``"nearest5"`` (default; HES, OpenSAFELY): ``5 * round(n / 5)``; a count is known to
     within +-2.
   * ``"midpoint6"`` (OpenSAFELY "Midpoint 6 rounding", R ``roundmid_any``:
     ``ceiling(x/6)*6 - floor(6/2)*(x != 0)``): 0 -> 0, 1-6 -> 3, 7-12 -> 9, 13-18 -> 15...
     i.e. ``6 * ceil(n / 6) - 3`` for n > 0 (not ``6 * floor(n / 6) + 3``, which differs at
     multiples of 6). Unbiased and zero-preserving; a published v means v-2..v+3.
     OpenSAFELY lets its "3" label stand for 1-6; here counts 1..threshold are still
     suppressed first, so the smallest published non-zero value is 9. OpenSAFELY asks that
     such columns be named with a ``_midpoint6`` suffix: the caller names its columns.
4. **Rates, percentages and means built on 1..threshold people are suppressed.** A rate
   (``rate_cols``: rate column -> denominator column) is recomputed from the *published*
   numerator and denominator (both protected by rules 1-3 and 5), and is NULL when either
   is suppressed or the denominator is 0. A mean (``mean_cols``: mean column -> column with
   the number of people it is built on) passes through only when that number is above the
   threshold and, if that column is itself published here, its cell is not suppressed.
5. **Secondary suppression.** Every *margin group* (the cells sharing the values of a
   subset of the dimensions; by default, for each dimension, the cells along it with every
   other dimension held fixed: each "row" and each "column") that holds exactly one
   suppressed cell gets a second one: its smallest unsuppressed non-zero cell by true count
   (a zero only if nothing else is left, since "x + 0 = margin" protects nothing), and
   never a cell the rest of the publication already shows to be 0 or small while another
   is left (``avoid_col``, set by the joint protection of :mod:`.joint`). This
   repeats over every margin until no group has exactly one suppressed cell (a fixed
   point). A group of one cell is its own margin and is left alone (its derived total is
   NULL).
6. **Totals are derived from published cells**, never from true counts: a total row holds
   the sum of the published cells of its group (NULL when all are suppressed), so it
   carries no information about a suppressed cell (OpenSAFELY: "column and row totals are
   the sum of the rounded counts").
7. **Formula-leading text is neutralised** on the way out (OWASP "CSV Injection"; CoP 35-36;
   ``docs/rules.md`` "Publication"): a text cell starting with ``=``, ``+``, ``-``, ``@``, tab or carriage
   return gets a leading single quote (:func:`neutralise_sql`).
8. **One public marker.** The reason column (``'primary'``/``'secondary'``) is for the
   haven's checks only: "secondary" would tell a reader that the cell is 0 or above the
   threshold. The public form (:func:`public_select_sql`) turns every reason column into a
   boolean (``suppressed`` true, the count NULL: the ONS "[c]" confidential marker), and
   :func:`check_invariants` proves the same rules on either form.

What this guarantees, and what it does not:

* Within one protected table: no published count is in 1..threshold; every published
  count is on the rounding grid; no margin group has exactly one suppressed cell; totals
  and rates are functions of published values only (:func:`check_invariants` proves these
  on the written table and backs a blocking asset check).
* Differencing between outputs of one release protected with the *same* policy (table A
  over all practices, table B excluding one practice): each published value is its true
  count +-2 (nearest 5; -3..+2 for midpoint 6), so ``A - B`` only bounds the excluded
  count to a window of 9 (11) integers, at least 5 (6) of them non-negative: a small count
  is never pinned (:func:`true_range` gives the window; the unit tests enumerate it).
* Across the tables of one publication, their declared relations and the previous
  publication: :mod:`.joint` chooses suppression knowing the other tables, and the audit
  (:mod:`.audit`, linear programming) proves that no suppressed cell can be narrowed to 0
  or a small count before anything is published.
* Not guaranteed: relations between outputs that are not declared; outputs of one
  population protected under *different* rounding schemes (their windows intersect), or
  exact margins published elsewhere (e.g. practice list sizes), any of which can narrow
  the window; dominance (p%) rules for magnitudes and means; k-anonymity of
  record-level extracts (a separate check). The ``suppressed`` reason column is for the
  haven's checks: a public file should show one marker, since "secondary" tells a reader
  the cell is 0 or above the threshold.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import duckdb

from safehaven.core.sql import INTEGER_TYPES, lit
from safehaven.publish.disclosure.policy import DEFAULT_POLICY, DisclosureError, Policy, true_range

__all__ = [
    "ColumnReport",
    "DisclosureError",
    "Policy",
    "ProtectionReport",
    "check_invariants",
    "default_margins",
    "neutralise_formula_cells",
    "neutralise_sql",
    "protect",
    "public_select_sql",
    "true_range",
]

PRIMARY = "primary"
SECONDARY = "secondary"
TOTAL_OVER = "total_over"
REASON = "suppressed"
FORMULA_LEADERS = ("=", "+", "-", "@", "\t", "\r")
#: :data:`FORMULA_LEADERS` as an RE2 pattern matching text that starts with one of them: one
#: ``regexp_matches`` per cell, where ``left(x, 1) IN (...)`` took DuckDB about 1.3 ms a column to
#: plan (a register's CSV export of 16 text columns: 23 ms against 4 ms, measured here)
FORMULA_LEADING = "^[" + "".join("\\" + ch if ch in "-]\\^" else ch for ch in FORMULA_LEADERS) + "]"
#: column types written as numbers, dates, times, booleans or UUIDs, whose cells are never
#: neutralised (a negative number is not a formula); the cells of every other type (VARCHAR, JSON,
#: an ENUM, a UNION, a BLOB, any type not named here) are text to a spreadsheet and are (found by
#: review: an ENUM column of a register export passed unneutralised when only VARCHAR and JSON were)
FORMULA_SAFE_TYPES = frozenset({"BOOLEAN", "FLOAT", "DOUBLE", "DATE", "UUID", *INTEGER_TYPES})
#: type names that begin so are of :data:`FORMULA_SAFE_TYPES` too (``DECIMAL(18,3)``, ``TIME``,
#: ``TIMESTAMP WITH TIME ZONE``)
FORMULA_SAFE_PREFIXES = ("DECIMAL(", "TIME")


@dataclass(frozen=True)
class ColumnReport:
    """Counts for one protected count column (never a value about an individual)."""

    column: str
    primary: int
    secondary: int
    published: int
    rounded: int
    """Published cells whose value was changed by rounding."""
    published_total: int
    total_difference: int
    """Sum of published cells minus sum of true cells (suppression and rounding)."""


@dataclass(frozen=True)
class ProtectionReport:
    """What :func:`protect` did to one table, as counts for asset metadata."""

    target: str
    cells: int
    iterations: int
    columns: tuple[ColumnReport, ...] = field(default_factory=tuple)

    @property
    def main(self) -> ColumnReport:
        """The report of the count column (the first column)."""
        return self.columns[0]

    @property
    def primary(self) -> int:
        return self.main.primary

    @property
    def secondary(self) -> int:
        return self.main.secondary

    @property
    def rounded(self) -> int:
        return self.main.rounded

    @property
    def total_difference(self) -> int:
        return self.main.total_difference

    def as_metadata(self) -> dict[str, int]:
        """Flat counts for ``MaterializeResult(metadata=...)``."""
        out: dict[str, int] = {"sdc_cells": self.cells, "sdc_iterations": self.iterations}
        for col in self.columns:
            for key in ("primary", "secondary", "published", "rounded", "total_difference"):
                out[f"sdc_{col.column}_{key}"] = getattr(col, key)
        return out


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _relation(name: str) -> str:
    """Quote a possibly schema-qualified relation name (``schema.table``)."""
    return ".".join(_ident(part) for part in name.split("."))


def _table_ddl(name: str) -> str:
    """``TABLE <name>``, or ``TEMP TABLE <rest>`` for a ``temp.<rest>`` name (connection-local)."""
    head, _, rest = name.partition(".")
    if head.lower() == "temp" and rest:
        return f"TEMP TABLE {_relation(rest)}"
    return f"TABLE {_relation(name)}"


def _columns(con: duckdb.DuckDBPyConnection, relation: str) -> list[str]:
    return [d[0] for d in con.execute(f"SELECT * FROM {_relation(relation)} LIMIT 0").description]


def _scalar(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    row = con.execute(sql).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def default_margins(dimensions: Sequence[str]) -> list[list[str]]:
    """Each dimension's complement: the groups are the "rows" along every dimension."""
    return [[d for d in dimensions if d != along] for along in dimensions]


def _check_margins(dimensions: Sequence[str], margins: Iterable[Sequence[str]]) -> list[list[str]]:
    out: list[list[str]] = []
    for margin in margins:
        unknown = set(margin) - set(dimensions)
        if unknown:
            raise DisclosureError(f"margin names unknown dimensions {sorted(unknown)}")
        if set(margin) == set(dimensions):
            raise DisclosureError("a margin must sum over at least one dimension")
        key = [d for d in dimensions if d in margin]
        if key not in out:
            out.append(key)
    return out


def _counted_columns(count_col: str, rates: dict[str, str]) -> list[str]:
    """The count column, then each distinct rate denominator other than it."""
    return [count_col] + [d for d in dict.fromkeys(rates.values()) if d != count_col]


def _check_source_columns(
    con: duckdb.DuckDBPyConnection,
    source: str,
    dims: list[str],
    counted: list[str],
    means: dict[str, str],
    flag_cols: Sequence[str | None],
) -> None:
    """Refuse a source lacking a named column, or whose dimensions repeat or are counts."""
    needed = set(dims) | set(counted) | set(means) | set(means.values())
    needed |= {c for c in flag_cols if c}
    missing = needed - set(_columns(con, source))
    if missing:
        raise DisclosureError(f"source lacks columns {sorted(missing)}")
    if len(set(dims)) != len(dims) or set(dims) & (set(counted) | set(means)):
        raise DisclosureError("dimensions must be distinct from each other and from counts")


def _check_whole_counts(con: duckdb.DuckDBPyConnection, src: str, columns: list[str]) -> None:
    """Refuse a count column holding a NULL, negative or fractional value."""
    for col in columns:
        bad = _scalar(
            con,
            f"SELECT count(*) FROM {src} WHERE {_ident(col)} IS NULL OR {_ident(col)} < 0 "
            f"OR {_ident(col)} <> floor({_ident(col)})",
        )
        if bad:
            raise DisclosureError(f"{col}: {bad} row(s) are not non-negative whole counts")


def _check_unique_cells(con: duckdb.DuckDBPyConnection, src: str, dims: list[str]) -> None:
    """Refuse a source with more than one row for a cell of ``dims``."""
    dim_list = ", ".join(_ident(d) for d in dims)
    dupes = _scalar(
        con,
        f"SELECT count(*) FROM (SELECT 1 FROM {src} GROUP BY {dim_list} HAVING count(*) > 1)",
    )
    if dupes:
        raise DisclosureError(f"{dupes} cell(s) appear more than once over {dims}")


def _check_denominators(con: duckdb.DuckDBPyConnection, src: str, count_col: str, denominators: list[str]) -> None:
    """Refuse a cell counting more people than one of its denominators."""
    for den in denominators:
        over = _scalar(con, f"SELECT count(*) FROM {src} WHERE {_ident(count_col)} > {_ident(den)}")
        if over:
            raise DisclosureError(f"{over} cell(s) count more people than denominator {den}")


@dataclass(frozen=True)
class _Work:
    """The temporary work table of one :func:`protect` call and its internal column names."""

    table: str
    counted: list[str]
    """The count column first, then the other denominators."""
    means: dict[str, str]
    n: dict[str, str]
    """True count column of each counted column."""
    s: dict[str, str]
    """Suppression reason column of each counted column."""
    mean_n: dict[str, str]
    """People each mean is built on."""
    mean_v: dict[str, str]
    """True value of each mean."""

    @classmethod
    def new(cls, counted: list[str], means: dict[str, str]) -> _Work:
        """A fresh work table name and the internal names of its columns."""
        return cls(
            table=f"__sdc_work_{uuid.uuid4().hex}",
            counted=counted,
            means=means,
            n={col: f"__sdc_n{i}" for i, col in enumerate(counted)},
            s={col: f"__sdc_s{i}" for i, col in enumerate(counted)},
            mean_n={m: f"__sdc_w{j}" for j, m in enumerate(means)},
            mean_v={m: f"__sdc_v{j}" for j, m in enumerate(means)},
        )


def _create_work(
    con: duckdb.DuckDBPyConnection, work: _Work, src: str, dim_list: str, avoid_col: str | None, force_col: str | None
) -> None:
    """Copy the source's cells, true counts, means and joint-protection flags into the work table."""
    select = [f"row_number() OVER (ORDER BY {dim_list}) AS __sdc_cell", dim_list]
    select += [f"CAST({_ident(c)} AS BIGINT) AS {work.n[c]}" for c in work.counted]
    select += [f"{_ident(m)} AS {work.mean_v[m]}" for m in work.means]
    select += [f"CAST({_ident(w)} AS BIGINT) AS {work.mean_n[m]}" for m, w in work.means.items()]
    select += [_flag_sql(avoid_col, "__sdc_avoid"), _flag_sql(force_col, "__sdc_force")]
    con.execute(f"CREATE TEMP TABLE {work.table} AS SELECT {', '.join(select)} FROM {src}")


def _primary_sql(work: _Work, col: str, policy: Policy) -> str:
    """Rules 1-2: the primary reason for a small count (or, for the count column, a small complement)."""
    n = work.n
    conds = [policy.small_sql(n[col])]
    if col == work.counted[0]:
        conds += [policy.small_sql(f"{n[den]} - {n[col]}") for den in work.counted[1:]]
    return f"CASE WHEN {' OR '.join(conds)} THEN '{PRIMARY}' END"


def _mark_primary(con: duckdb.DuckDBPyConnection, work: _Work, policy: Policy) -> None:
    """Add each counted column's reason column with its primary suppressions, then the forced secondaries."""
    for col in work.counted:
        con.execute(
            f"ALTER TABLE {work.table} ADD COLUMN {work.s[col]} VARCHAR; "
            f"UPDATE {work.table} SET {work.s[col]} = {_primary_sql(work, col, policy)}"
        )
    reason = work.s[work.counted[0]]
    con.execute(f"UPDATE {work.table} SET {reason} = '{SECONDARY}' WHERE {reason} IS NULL AND __sdc_force")


def _mean_sql(work: _Work, mean: str, people: str, policy: Policy) -> str:
    """Rule 4: a mean published only when built on more than threshold people, themselves published."""
    ok = f"{work.mean_n[mean]} > {policy.threshold}"
    if people in work.s:
        ok += f" AND {work.s[people]} IS NULL"
    return f"CASE WHEN {ok} THEN {work.mean_v[mean]} END AS {_ident(mean)}"


def _published_cells_sql(work: _Work, dim_list: str, rates: dict[str, str], policy: Policy) -> str:
    """SQL for the published cells: rounded or NULL counts, their reasons, rates and means (rules 3-4)."""
    s, count_col = work.s, work.counted[0]
    published = {c: f"CASE WHEN {s[c]} IS NULL THEN {policy.round_sql(work.n[c])} END" for c in work.counted}
    out = [dim_list, f"{published[count_col]} AS {_ident(count_col)}", f"{s[count_col]} AS {REASON}"]
    for den in work.counted[1:]:
        out += [f"{published[den]} AS {_ident(den)}", f"{s[den]} AS {_ident(den + '_' + REASON)}"]
    out += [
        f"CASE WHEN {published[den]} > 0 THEN "
        f"CAST({published[count_col]} AS DOUBLE) / {published[den]} END AS {_ident(rate)}"
        for rate, den in rates.items()
    ]
    out += [_mean_sql(work, mean, people, policy) for mean, people in work.means.items()]
    return f"SELECT {', '.join(out)} FROM {work.table}"


def _column_report(con: duckdb.DuckDBPyConnection, work: _Work, col: str, policy: Policy) -> ColumnReport:
    """What protection did to one counted column, as counts."""
    n, s = work.n[col], work.s[col]
    pub = policy.round_sql(n)
    row = con.execute(
        f"SELECT count(*) FILTER (WHERE {s} = '{PRIMARY}'), "
        f"count(*) FILTER (WHERE {s} = '{SECONDARY}'), "
        f"count(*) FILTER (WHERE {s} IS NULL), "
        f"count(*) FILTER (WHERE {s} IS NULL AND {pub} <> {n}), "
        f"coalesce(sum({pub}) FILTER (WHERE {s} IS NULL), 0), "
        f"coalesce(sum({n}), 0) FROM {work.table}"
    ).fetchone()
    assert row is not None
    return ColumnReport(
        column=col,
        primary=int(row[0]),
        secondary=int(row[1]),
        published=int(row[2]),
        rounded=int(row[3]),
        published_total=int(row[4]),
        total_difference=int(row[4]) - int(row[5]),
    )


def protect(
    con: duckdb.DuckDBPyConnection,
    source: str,
    target: str,
    dimensions: Sequence[str],
    count_col: str = "people",
    margins: Sequence[Sequence[str]] | None = None,
    rate_cols: dict[str, str] | None = None,
    policy: Policy = DEFAULT_POLICY,
    *,
    mean_cols: dict[str, str] | None = None,
    totals: bool = False,
    avoid_col: str | None = None,
    force_col: str | None = None,
) -> ProtectionReport:
    """Write ``target``: the cells of ``source`` under statistical disclosure control.

    ``source`` holds true counts, one row per cell of ``dimensions``. ``target`` gets the
    dimensions, ``count_col`` (rounded, or NULL) and ``suppressed`` ('primary',
    'secondary' or NULL); for each ``rate_cols`` item (rate column -> denominator column)
    the protected denominator, its ``<denominator>_suppressed`` reason and the rate
    recomputed from published values; each ``mean_cols`` column (mean -> column of the
    number of people it is built on) where it may be published. Other source columns are
    not copied; a ``target`` named ``temp.<name>`` is a temporary table of the connection.
    ``margins`` lists the dimension subsets held fixed by each margin group
    (default :func:`default_margins`; ``[]`` for none, when no margin of the table is
    published anywhere). Secondary suppression runs on the count column and on each
    denominator separately. With ``totals=True`` the table also holds one total
    row per margin group and a grand total, marked by ``total_over`` (the dimensions
    summed over, comma separated; NULL on cells) with those dimensions NULL.
    Joint protection (:mod:`.joint`): ``avoid_col`` names a boolean source column of cells
    that the rest of the publication already shows to be 0 or small, chosen last as
    secondary suppressions (rule 5: never a known zero while another cell is left);
    ``force_col`` names a boolean column of cells to suppress as secondary from the start.
    """
    dims = list(dimensions)
    if not dims:
        raise DisclosureError("at least one dimension is needed")
    rates = dict(rate_cols or {})
    means = dict(mean_cols or {})
    groups = _check_margins(dims, default_margins(dims) if margins is None else margins)
    counted = _counted_columns(count_col, rates)
    _check_source_columns(con, source, dims, counted, means, (avoid_col, force_col))
    src = _relation(source)
    _check_whole_counts(con, src, counted + sorted(set(means.values()) - set(counted)))
    _check_unique_cells(con, src, dims)
    _check_denominators(con, src, count_col, counted[1:])

    work = _Work.new(counted, means)
    dim_list = ", ".join(_ident(d) for d in dims)
    _create_work(con, work, src, dim_list, avoid_col, force_col)
    try:
        _mark_primary(con, work, policy)
        iterations = _secondary(con, work.table, groups, [(work.n[c], work.s[c]) for c in counted])
        cells_sql = _published_cells_sql(work, dim_list, rates, policy)
        if totals:
            body = _with_totals(cells_sql, dims, groups, counted, count_col)
        else:
            body = f"{cells_sql} ORDER BY __sdc_cell"
        con.execute(f"CREATE OR REPLACE {_table_ddl(target)} AS {body}")
        reports = tuple(_column_report(con, work, col, policy) for col in counted)
        cells = _scalar(con, f"SELECT count(*) FROM {work.table}")
    finally:
        con.execute(f"DROP TABLE IF EXISTS {work.table}")
    return ProtectionReport(target=target, cells=cells, iterations=iterations, columns=reports)


def _flag_sql(col: str | None, alias: str) -> str:
    return f"coalesce(CAST({_ident(col)} AS BOOLEAN), false) AS {alias}" if col else f"false AS {alias}"


def _secondary(
    con: duckdb.DuckDBPyConnection,
    work: str,
    groups: list[list[str]],
    columns: list[tuple[str, str]],
) -> int:
    """Secondary suppression to a fixed point; returns the number of passes made.

    One UPDATE per (column, margin) per pass: in every group holding exactly one
    suppressed cell, mark the smallest unsuppressed cell (non-zero first, ties by cell
    order). Each pass that changes nothing ends the loop; each pass that changes something
    suppresses at least one more cell, so the loop ends within (number of cells) passes.
    """
    limit = _scalar(con, f"SELECT count(*) FROM {work}") + 1
    for passes in range(1, limit + 1):
        changed = 0
        for n_col, s_col in columns:
            for key in groups:
                partners = _lonely_partners(work, key, n_col, s_col)
                row = con.execute(
                    f"UPDATE {work} SET {s_col} = '{SECONDARY}' WHERE __sdc_cell IN ({partners})"
                ).fetchone()
                changed += int(row[0]) if row else 0
        if not changed:
            return passes
    raise AssertionError("secondary suppression did not reach a fixed point")  # unreachable


def _lonely_partners(work: str, key: list[str], n_col: str, s_col: str) -> str:
    """The cells one secondary-suppression UPDATE marks: in every group of ``key`` holding
    exactly one suppressed cell among two or more, its smallest unsuppressed cell (``__sdc_avoid``
    cells last, then non-zero first, then by count, ties by cell).

    The groups are found by one GROUP BY and the cell by one window over the unsuppressed cells
    of those groups only, instead of three windows over every cell (two to four times faster on
    a night's tables). Groups are matched with ``IS NOT DISTINCT FROM``, so a NULL dimension
    value is one group, as PARTITION BY makes it. The margin over no dimension (the whole table)
    keeps the windows: there is nothing to group by.
    """
    order = f"ORDER BY __sdc_avoid, ({n_col} = 0), {n_col}, __sdc_cell"
    if not key:
        return (
            f"SELECT __sdc_cell FROM ("
            f" SELECT __sdc_cell, {s_col}, count({s_col}) OVER () AS n_supp, count(*) OVER () AS n_cells,"
            f" row_number() OVER (PARTITION BY ({s_col} IS NULL) {order}) AS rk FROM {work})"
            f" WHERE {s_col} IS NULL AND n_supp = 1 AND n_cells > 1 AND rk = 1"
        )
    dims = [_ident(d) for d in key]
    same = " AND ".join(f"w.{d} IS NOT DISTINCT FROM g.{d}" for d in dims)
    return (
        f"SELECT w.__sdc_cell FROM {work} AS w SEMI JOIN ("
        f" SELECT {', '.join(dims)} FROM {work} GROUP BY {', '.join(dims)}"
        f" HAVING count({s_col}) = 1 AND count(*) > 1) AS g ON {same}"
        f" WHERE w.{s_col} IS NULL"
        f" QUALIFY row_number() OVER (PARTITION BY {', '.join('w.' + d for d in dims)} {order}) = 1"
    )


def _with_totals(cells_sql: str, dims: list[str], groups: list[list[str]], counted: list[str], count_col: str) -> str:
    """Cells plus total rows summed from the *published* cells of each margin group."""
    parts = [f"SELECT *, CAST(NULL AS VARCHAR) AS {TOTAL_OVER} FROM cells"]
    keys = groups if [] in groups else [*groups, []]
    for key in keys:
        summed = [d for d in dims if d not in key]
        sums = []
        for col in counted:
            reason = REASON if col == count_col else col + "_" + REASON
            sums += [
                f"sum({_ident(col)}) AS {_ident(col)}",
                f"CASE WHEN sum({_ident(col)}) IS NULL THEN '{SECONDARY}' END AS {_ident(reason)}",
            ]
        head = [_ident(d) for d in key] + sums + [f"'{','.join(summed)}' AS {TOTAL_OVER}"]
        group_by = f" GROUP BY {', '.join(_ident(d) for d in key)}" if key else ""
        parts.append(f"SELECT {', '.join(head)} FROM cells{group_by}")
    order = ", ".join(_ident(d) for d in dims)
    return (
        f"WITH cells AS ({cells_sql}) SELECT * FROM ("
        + " UNION ALL BY NAME ".join(f"({p})" for p in parts)
        + f") ORDER BY {TOTAL_OVER} NULLS FIRST, {order} NULLS LAST"
    )


def _published_value_problems(
    con: duckdb.DuckDBPyConnection, rel: str, cells: str, col: str, policy: Policy
) -> list[str]:
    """Rules 1-3 on one column: no published small count (nor zero under suppress_zeros), all on the grid."""
    c = _ident(col)
    checks = [
        (
            f"SELECT count(*) FROM {rel} WHERE {c} BETWEEN 1 AND {policy.threshold}",
            f"published count(s) in 1..{policy.threshold}",
        )
    ]
    if policy.suppress_zeros:
        checks.append((f"SELECT count(*) FROM {cells} WHERE {c} = 0", "published zero cell(s) under suppress_zeros"))
    checks.append(
        (
            f"SELECT count(*) FROM {cells} WHERE NOT {policy.on_grid_sql(c)}",
            f"published cell(s) off the {policy.rounding} grid",
        )
    )
    problems: list[str] = []
    for sql, what in checks:
        found = _scalar(con, sql)
        if found:
            problems.append(f"{col}: {found} {what}")
    return problems


def _lonely_suppression_problems(
    con: duckdb.DuckDBPyConnection, cells: str, col: str, groups: list[list[str]]
) -> list[str]:
    """Rule 5 on one column: no margin group of two or more cells with exactly one suppressed."""
    c = _ident(col)
    problems: list[str] = []
    for key in groups:
        group_by = f" GROUP BY {', '.join(_ident(d) for d in key)}" if key else ""
        lonely = _scalar(
            con,
            f"SELECT count(*) FROM (SELECT 1 FROM {cells}{group_by} HAVING count(*) > 1 "
            f"AND count(*) FILTER (WHERE {c} IS NULL) = 1)",
        )
        if lonely:
            problems.append(
                f"{col}: {lonely} group(s) over ({', '.join(key) or 'all'}) with exactly one suppressed cell"
            )
    return problems


def _reason_problems(
    con: duckdb.DuckDBPyConnection, cells: str, col: str, reason: str, types: dict[str, str]
) -> list[str]:
    """Rule 8 on one column: a reason (text or boolean) on every suppressed cell and on no published one."""
    if reason not in types:
        return []
    r = _ident(reason)
    marked = f"coalesce({r}, false)" if types.get(reason) == "BOOLEAN" else f"({r} IS NOT NULL)"
    mismatch = _scalar(con, f"SELECT count(*) FROM {cells} WHERE ({_ident(col)} IS NULL) <> {marked}")
    return [f"{col}: {mismatch} cell(s) whose suppression reason disagrees"] if mismatch else []


def _rate_problems(con: duckdb.DuckDBPyConnection, cells: str, count_col: str, rates: dict[str, str]) -> list[str]:
    """Rule 4: every rate NULL unless numerator and denominator are published, and equal to their ratio."""
    problems: list[str] = []
    for rate, den in rates.items():
        r, num, d = _ident(rate), _ident(count_col), _ident(den)
        bad = _scalar(
            con,
            f"SELECT count(*) FROM {cells} WHERE {r} IS NOT NULL AND ({num} IS NULL OR {d} IS NULL "
            f"OR {d} = 0 OR abs({r} - CAST({num} AS DOUBLE) / {d}) > 1e-9)",
        )
        if bad:
            problems.append(f"{rate}: {bad} rate(s) not derived from published {count_col}/{den}")
    return problems


def check_invariants(
    con: duckdb.DuckDBPyConnection,
    table: str,
    dimensions: Sequence[str],
    count_col: str = "people",
    policy: Policy = DEFAULT_POLICY,
    margins: Sequence[Sequence[str]] | None = None,
    rate_cols: dict[str, str] | None = None,
) -> list[str]:
    """Violations of the published-table rules, as messages carrying counts only.

    Checked for the count column and every rate denominator: no published count in
    1..threshold (nor 0 when zeros are suppressed); every published cell on the rounding
    grid; no margin group of two or more cells with exactly one suppressed cell; a reason
    on every suppressed cell and none on published ones (when the reason column exists);
    every total row (``total_over``) equal to the sum of the published cells of its group;
    every rate NULL unless numerator and denominator are published, and equal to their
    ratio. An empty list means the table passes.
    """
    dims = list(dimensions)
    rel = _relation(table)
    types = {d[0]: str(d[1]) for d in con.execute(f"SELECT * FROM {rel} LIMIT 0").description}
    cols = set(types)
    rates = dict(rate_cols or {})
    counted = _counted_columns(count_col, rates)
    missing = (set(dims) | set(counted) | set(rates)) - cols
    if missing:
        return [f"table lacks columns {sorted(missing)}"]
    groups = _check_margins(dims, default_margins(dims) if margins is None else margins)
    has_totals = TOTAL_OVER in cols
    cells = f"(SELECT * FROM {rel}{f' WHERE {TOTAL_OVER} IS NULL' if has_totals else ''})"
    problems: list[str] = []
    for col in counted:
        reason = REASON if col == count_col else f"{col}_{REASON}"
        problems += _published_value_problems(con, rel, cells, col, policy)
        problems += _lonely_suppression_problems(con, cells, col, groups)
        problems += _reason_problems(con, cells, col, reason, types)
    if has_totals:
        problems += _check_totals(con, rel, cells, dims, counted)
    return problems + _rate_problems(con, cells, count_col, rates)


def _check_totals(
    con: duckdb.DuckDBPyConnection, rel: str, cells: str, dims: list[str], counted: list[str]
) -> list[str]:
    problems: list[str] = []
    kinds = [
        r[0] for r in con.execute(f"SELECT DISTINCT {TOTAL_OVER} FROM {rel} WHERE {TOTAL_OVER} IS NOT NULL").fetchall()
    ]
    for kind in kinds:
        summed = [x for x in str(kind).split(",") if x]
        if not summed or set(summed) - set(dims):
            problems.append(f"total rows over unknown dimensions ({kind})")
            continue
        key = [d for d in dims if d not in summed]
        kind_sql = lit(str(kind))
        not_null = " OR ".join(f"{_ident(d)} IS NOT NULL" for d in summed)
        stray = _scalar(con, f"SELECT count(*) FROM {rel} WHERE {TOTAL_OVER} = {kind_sql} AND ({not_null})")
        if stray:
            problems.append(f"{stray} total row(s) over ({kind}) with a summed dimension set")
        on = " AND ".join(f"t.{_ident(d)} IS NOT DISTINCT FROM e.{_ident(d)}" for d in key) or "TRUE"
        group_by = f" GROUP BY {', '.join(_ident(d) for d in key)}" if key else ""
        for col in counted:
            c = _ident(col)
            bad = _scalar(
                con,
                f"SELECT count(*) FROM (SELECT * FROM {rel} WHERE {TOTAL_OVER} = {kind_sql}) t "
                f"LEFT JOIN (SELECT {', '.join([*map(_ident, key), f'sum({c}) AS __sdc_sum'])} "
                f"FROM {cells}{group_by}) e ON {on} "
                f"WHERE t.{c} IS DISTINCT FROM e.__sdc_sum",
            )
            if bad:
                problems.append(f"{col}: {bad} total(s) over ({kind}) differ from the sum of published cells")
    return problems


def neutralise_sql(expr: str) -> str:
    """SQL expression: ``expr`` (text) with formula-leading cells neutralised.

    OWASP "CSV Injection": a cell starting with ``=``, ``+``, ``-``, ``@``, tab or carriage
    return is read as a formula by spreadsheet software; prefixing a single quote makes it
    text. NULL stays NULL; other values are unchanged. Apply to text columns only (a
    negative number in a numeric column is not a formula).
    """
    return f"(CASE WHEN {formula_led_sql(expr)} THEN '''' || CAST(({expr}) AS VARCHAR) ELSE ({expr}) END)"


def formula_safe_type(dtype: str) -> bool:
    """Whether a column of DuckDB type ``dtype`` (as a relation describes it) is written as numbers,
    dates, times or booleans and so is not neutralised (:data:`FORMULA_SAFE_TYPES`); False for
    every other type, whose cells a CSV export neutralises as text."""
    return dtype in FORMULA_SAFE_TYPES or dtype.startswith(FORMULA_SAFE_PREFIXES)


def formula_led_sql(expr: str) -> str:
    """SQL condition: ``expr`` (text) starts with a formula leader (:data:`FORMULA_LEADERS`, OWASP
    "CSV Injection"); NULL for NULL. The one test of the rule, for neutralising and for checking."""
    return f"regexp_matches(CAST(({expr}) AS VARCHAR), {lit(FORMULA_LEADING)})"


def public_select_sql(con: duckdb.DuckDBPyConnection, table: str, order_by: Sequence[str] = ()) -> str:
    """SQL selecting ``table`` (a :func:`protect` target) in its public form (rule 8).

    Every reason column (``suppressed`` and ``<denominator>_suppressed``, text) becomes a
    boolean that is true exactly where the count is suppressed, so a reader sees one marker
    and not the kind of suppression; every other text column is neutralised (rule 7).
    Numeric columns pass unchanged. ``order_by`` names columns to sort by (NULLs last).
    """
    rel = _relation(table)
    parts = []
    for name, dtype in ((d[0], str(d[1])) for d in con.execute(f"SELECT * FROM {rel} LIMIT 0").description):
        col = _ident(name)
        if (name == REASON or name.endswith("_" + REASON)) and dtype == "VARCHAR":
            parts.append(f"({col} IS NOT NULL) AS {col}")
        elif dtype == "VARCHAR":
            parts.append(f"{neutralise_sql(col)} AS {col}")
        else:
            parts.append(col)
    order = f" ORDER BY {', '.join(_ident(c) + ' NULLS LAST' for c in order_by)}" if order_by else ""
    return f"SELECT {', '.join(parts)} FROM {rel}{order}"


def neutralise_formula_cells(con: duckdb.DuckDBPyConnection, table: str, columns: Sequence[str] | None = None) -> int:
    """Neutralise formula-leading cells in place; returns the number of cells changed.

    ``columns`` defaults to every VARCHAR column of ``table``. Run it on the published
    copy just before export (``docs/rules.md`` "Publication": no formula-leading cells).
    """
    rel = _relation(table)
    if columns is None:
        columns = [d[0] for d in con.execute(f"SELECT * FROM {rel} LIMIT 0").description if str(d[1]) == "VARCHAR"]
    changed = 0
    for col in columns:
        c = _ident(col)
        row = con.execute(f"UPDATE {rel} SET {c} = {neutralise_sql(c)} WHERE {formula_led_sql(c)}").fetchone()
        changed += int(row[0]) if row else 0
    return changed
