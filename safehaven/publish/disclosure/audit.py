"""The disclosure audit: an attack on the whole publication, run before anything is published.

Rule (the *protection interval*): for every suppressed cell, and for the change of every
cell suppressed in either of two publications of the same month, the feasible interval
``[lo, hi]`` that an intruder can derive from every published value of the publication (all
its tables, their declared relations, and the previous publication of the same months) must

* reach above the threshold: ``hi >= THRESHOLD + 1`` (the cell cannot be told apart from a
  count that would have been published), and
* contain 0 unless it lies wholly above the threshold: ``lo <= 0`` or ``lo >= THRESHOLD + 1``
  (the cell cannot be told apart from nobody; a reader who learns only "not small" learns
  nothing the rule protects).

So a cell whose true count is 1..THRESHOLD keeps an interval covering ``[0, THRESHOLD + 1]``,
and a secondary suppression can never be shown to be a zero or a small count. A change
between publications can be negative (people removed), so for a change the rule is read
symmetrically: it must be able to exceed the threshold in size (``hi >= THRESHOLD + 1`` or
``lo <= -(THRESHOLD + 1)``) and contain 0 unless it lies wholly beyond ``+-THRESHOLD``; for a
count (``lo >= 0``) this is the rule above. Sources:
Hundepool et al., *Statistical Disclosure Control* (Wiley 2012), section 4.2.2 (a sensitive
cell is protected when the feasible interval computed by linear programming covers its
upper and lower protection levels; the audit "computes for each suppressed cell its
feasibility interval"), the HES / ISB 1523 small-number rule (1-7 people must not be
revealed) and ONS guidance on disclosure control for tables (zeros and small counts
recovered by differencing linked tables are disclosures).

How (module docstring of :mod:`.relations` for the relations):

* Every published count ``v`` stands for the interval of true counts it can come from
  (:func:`safehaven.publish.disclosure.policy.true_range`: ``v-2..v+2`` under rounding to 5,
  less 1..threshold; a published 0 is a true 0), never an equality. A suppressed cell is
  ``[0, inf)``.
* Each relation is linear rows (``<=`` or ``=``) over the cells, built in DuckDB with joins.
* The linear programs are solved with HiGHS (``scipy.optimize.linprog``) in two batches for
  all cells at once: one maximising ``sum(min(cell, THRESHOLD + 1))`` proves every cell
  that reaches above the threshold in a single solution, one minimising
  ``sum(max(cell, 0))`` proves every cell that can be 0. A change between publications
  not proven to rise above the threshold is tried the other way by two more batches (it
  can fall below minus the threshold, and rise to 0): a revision of a long history has
  hundreds of such changes, each of which took two programs of its own (measured here at
  100,000 patients over two nights: 258 programs became 4, the audit 1.5 s became 0.5 s,
  with the same verdicts and the same published tables). Only the cells left unproven get
  their own min/max programs, restricted to their independent block (a connected
  component of the rows). A cell in no row keeps its own bounds: no program.
* Bounds are those of the LP relaxation (integer counts can only narrow them: the audit
  rounds ``hi`` down and ``lo`` up).
* Fail closed: a program with no solution (a declared relation contradicted by the
  published values) or that HiGHS cannot solve fails the audit.

The report carries counts, widths, iterations and time, never a value of a suppressed cell.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
from scipy import sparse
from scipy.optimize import linprog
from scipy.sparse.csgraph import connected_components

from safehaven.publish.disclosure.policy import Policy
from safehaven.publish.disclosure.relations import Link
from safehaven.publish.disclosure.report import AuditReport, AuditTable

__all__ = ["AuditReport", "AuditTable", "audit"]

#: Numerical slack when reading LP bounds as whole counts.
EPS = 1e-6
TOTAL_OVER = "total_over"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _rel(name: str) -> str:
    return ".".join(_q(p) for p in name.split("."))


@dataclass
class _Model:
    """The cells of every table as LP variables, the relation rows and the audited items."""

    lo: np.ndarray
    hi: np.ndarray
    offsets: dict[str, tuple[int, int]]
    work: dict[str, str]
    ub: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    eq: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    n_ub: int = 0
    n_eq: int = 0
    #: audited items, each ``x[a] - x[b]`` (``b`` = -1: the cell ``x[a]`` alone; else a change)
    item_a: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    item_b: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    item_t: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def add_items(self, a: np.ndarray, b: np.ndarray, threshold: int) -> None:
        self.item_a = np.concatenate([self.item_a, a.astype(np.int64)])
        self.item_b = np.concatenate([self.item_b, b.astype(np.int64)])
        self.item_t = np.concatenate([self.item_t, np.full(len(a), threshold, dtype=np.int64)])

    def key_of(self, var: int) -> tuple[str, int]:
        for key, (start, end) in self.offsets.items():
            if start <= var < end:
                return key, var - start
        raise IndexError(var)

    def add(self, sense: str, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> None:
        if not len(rows):
            return
        _, dense = np.unique(rows, return_inverse=True)
        if sense == "ub":
            self.ub.append((dense + self.n_ub, cols, vals))
            self.n_ub += int(dense.max()) + 1
        else:
            self.eq.append((dense + self.n_eq, cols, vals))
            self.n_eq += int(dense.max()) + 1

    def matrix(self, sense: str) -> sparse.csr_matrix:
        parts = self.ub if sense == "ub" else self.eq
        n_rows = self.n_ub if sense == "ub" else self.n_eq
        if not parts:
            return sparse.csr_matrix((0, len(self.lo)))
        r, c, v = (np.concatenate(x) for x in zip(*parts, strict=True))
        return sparse.csr_matrix((v, (r, c)), shape=(n_rows, len(self.lo)))


def _bounds(p: np.ndarray, policy: Policy) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`true_range`; NaN (suppressed) -> [0, inf)."""
    supp = np.isnan(p)
    v = np.nan_to_num(p)
    if policy.rounding == "nearest5":
        lo, hi = v - 2, v + 2
    else:
        lo, hi = np.where(v == 0, 0, v - 2), np.where(v == 0, 0, v + 3)
    lo = np.maximum(lo, 0)
    big = lo >= 1
    lo = np.where(big, np.maximum(lo, policy.threshold + 1), lo)
    hi = np.where(~big & (hi <= policy.threshold), 0, hi)
    return np.where(supp, 0.0, lo), np.where(supp, np.inf, hi)


def _load(con: duckdb.DuckDBPyConnection, tables: Sequence[AuditTable]) -> _Model:
    los, his, offsets, work, start = [], [], {}, {}, 0
    for i, t in enumerate(tables):
        cols = {d[0] for d in con.execute(f"SELECT * FROM {_rel(t.relation)} LIMIT 0").description}
        where = f" WHERE {TOTAL_OVER} IS NULL" if TOTAL_OVER in cols else ""
        dims = ", ".join(_q(d) for d in t.dimensions)
        name = f"_sdc_audit_{i}"
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT row_number() OVER (ORDER BY {dims}) - 1 + {start} AS v, "
            f"{dims}, CAST({_q(t.count_col)} AS DOUBLE) AS p FROM {_rel(t.relation)}{where}"
        )
        p = con.execute(f"SELECT p FROM {name} ORDER BY v").fetchnumpy()["p"]
        p = np.asarray(p.filled(np.nan) if hasattr(p, "filled") else p, dtype=float)
        if t.unknown:
            p = np.full(len(p), np.nan)
        lo, hi = _bounds(p, t.policy)
        los.append(lo)
        his.append(hi)
        offsets[t.key] = (start, start + len(p))
        work[t.key] = name
        start += len(p)
    empty = np.zeros(0)
    return _Model(np.concatenate(los or [empty]), np.concatenate(his or [empty]), offsets, work)


def _arrays(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    got = con.execute(sql).fetchnumpy()
    return (np.asarray(got["r"], dtype=np.int64), np.asarray(got["v"], dtype=np.int64), np.asarray(got["c"], float))


def _on(link: Link) -> str:
    conds = [f"a.{_q(x)} = b.{_q(y)}" for x, y in link.on]
    if link.time:
        x, y = link.time
        conds.append(f"date_diff('month', a.{_q(x)}, b.{_q(y)}) BETWEEN {link.window[0]} AND {link.window[1]}")
    return " AND ".join(conds) or "TRUE"


def _subset_sql(a: str, b: str, link: Link) -> str:
    months = (
        f"count(DISTINCT date_diff('month', a.{_q(link.time[0])}, b.{_q(link.time[1])}))" if link.time else "count(*)"
    )
    need = link.window[1] - link.window[0] + 1 if link.time else 1
    return (
        f"WITH pairs AS (SELECT a.v AS r, b.v AS pv, {months} OVER (PARTITION BY a.v) AS m "
        f"FROM {a} a JOIN {b} b ON {_on(link)}), ok AS (SELECT DISTINCT r FROM pairs WHERE m >= {need}) "
        f"SELECT r, pv AS v, -1.0 AS c FROM pairs WHERE m >= {need} UNION ALL SELECT r, r AS v, 1.0 AS c FROM ok"
    )


def _same_population_sql(a: str, b: str, link: Link) -> str:
    ka = ", ".join(f"{_q(x)} AS k{i}" for i, (x, _) in enumerate(link.on)) or "1 AS k0"
    kb = ", ".join(f"{_q(y)} AS k{i}" for i, (_, y) in enumerate(link.on)) or "1 AS k0"
    keys = ", ".join(f"k{i}" for i in range(max(len(link.on), 1)))
    return (
        f"WITH u AS (SELECT {ka}, v, 1.0 AS c FROM {a} UNION ALL SELECT {kb}, v, -1.0 AS c FROM {b}), "
        f"g AS (SELECT {keys} FROM u GROUP BY {keys} HAVING min(c) < 0 AND max(c) > 0) "
        f"SELECT dense_rank() OVER (ORDER BY {keys}) AS r, v, c FROM u SEMI JOIN g USING ({keys})"
    )


def _revision(con: duckdb.DuckDBPyConnection, model: _Model, a: str, b: str, link: Link, threshold: int) -> None:
    pairs = con.execute(
        f"SELECT a.v AS n, b.v AS o, (a.p IS NULL OR b.p IS NULL) AS either FROM {a} a JOIN {b} b ON {_on(link)}"
    ).fetchnumpy()
    n, o = np.asarray(pairs["n"], dtype=np.int64), np.asarray(pairs["o"], dtype=np.int64)
    either = np.asarray(pairs["either"], dtype=bool)
    if link.added_only and len(n):
        rows = np.concatenate([n, n])
        model.add("ub", rows, np.concatenate([o, n]), np.concatenate([np.ones(len(n)), -np.ones(len(n))]))
    model.add_items(n[either], o[either], threshold)


def _relations(
    con: duckdb.DuckDBPyConnection, model: _Model, links: Sequence[Link], thresholds: dict[str, int]
) -> None:
    for link in links:
        if link.this not in model.work or link.other not in model.work:
            continue
        a, b = model.work[link.this], model.work[link.other]
        if link.kind == "subset":
            model.add("ub", *_arrays(con, _subset_sql(a, b, link)))
        elif link.kind == "same_population":
            model.add("eq", *_arrays(con, _same_population_sql(a, b, link)))
        else:
            _revision(con, model, a, b, link, thresholds[link.this])


def _cell_items(model: _Model, tables: Sequence[AuditTable]) -> None:
    for t in tables:
        if not t.audited:
            continue
        start, end = model.offsets[t.key]
        cells = np.flatnonzero(np.isinf(model.hi[start:end])) + start
        model.add_items(cells, np.full(len(cells), -1), t.policy.threshold)


def _lp(c: np.ndarray, a_ub: sparse.spmatrix, a_eq: sparse.spmatrix, bounds: np.ndarray) -> tuple[int, float, Any]:
    """min c.x (HiGHS): (status, objective, solution); status 0 optimal, 2 infeasible, 3 unbounded."""
    res = linprog(
        c,
        A_ub=a_ub if a_ub.shape[0] else None,
        b_ub=np.zeros(a_ub.shape[0]) if a_ub.shape[0] else None,
        A_eq=a_eq if a_eq.shape[0] else None,
        b_eq=np.zeros(a_eq.shape[0]) if a_eq.shape[0] else None,
        bounds=bounds,
        method="highs",
    )
    return int(res.status), float(res.fun) if res.fun is not None else float("nan"), res.x


@dataclass
class _Block:
    """An independent block: its variables and rows."""

    cols: np.ndarray
    ub: np.ndarray
    eq: np.ndarray


class _Solver:
    """The LPs of one audit over the rows of the model, counting solves."""

    def __init__(self, model: _Model) -> None:
        self.m = model
        self.a_ub = model.matrix("ub").tocsr()
        self.a_eq = model.matrix("eq").tocsr()
        self.solves = 0
        self.errors: list[str] = []
        n = len(model.lo)
        graph = sparse.vstack([self.a_ub, self.a_eq]).tocsr()
        graph.data[:] = 1
        adj = sparse.bmat([[None, graph.T], [graph, None]]).tocsr()
        _, labels = connected_components(adj, directed=False)
        self.var_label = labels[:n]
        self.ub_label = labels[n : n + self.a_ub.shape[0]]
        self.eq_label = labels[n + self.a_ub.shape[0] :]
        self.in_rows = np.asarray(graph.getnnz(axis=0)).ravel() > 0 if graph.shape[0] else np.zeros(n, bool)

    def block(self, labels: set[int]) -> _Block:
        lab = np.array(sorted(labels))
        return _Block(
            np.flatnonzero(np.isin(self.var_label, lab)),
            np.flatnonzero(np.isin(self.ub_label, lab)),
            np.flatnonzero(np.isin(self.eq_label, lab)),
        )

    def run(
        self, blk: _Block, c: np.ndarray, extra: tuple[sparse.spmatrix, np.ndarray] | None = None
    ) -> tuple[int, float, Any]:
        """min c.x over the block, with optional extra columns (their <= rows and bounds)."""
        a_ub = self.a_ub[blk.ub][:, blk.cols]
        a_eq = self.a_eq[blk.eq][:, blk.cols]
        bounds = np.column_stack([self.m.lo[blk.cols], self.m.hi[blk.cols]])
        if extra is not None:
            rows, more = extra
            k = more.shape[0]
            a_ub = sparse.vstack([sparse.hstack([a_ub, sparse.csr_matrix((a_ub.shape[0], k))]), rows])
            a_eq = sparse.hstack([a_eq, sparse.csr_matrix((a_eq.shape[0], k))])
            bounds = np.vstack([bounds, more])
        self.solves += 1
        status, fun, x = _lp(c, a_ub.tocsr(), a_eq.tocsr(), bounds)
        if status not in (0, 3):
            self.errors.append("infeasible" if status == 2 else f"HiGHS status {status}")
        return status, fun, x


def _item_vector(m: _Model, blk: _Block, i: int) -> np.ndarray:
    pos = np.searchsorted(blk.cols, m.item_a[i])
    f = np.zeros(len(blk.cols))
    f[pos] += 1.0
    if m.item_b[i] >= 0:
        f[np.searchsorted(blk.cols, m.item_b[i])] -= 1.0
    return f


def _batch(solver: _Solver, blk: _Block, items: np.ndarray, upper: bool, negate: bool = False) -> np.ndarray:
    """One LP for many items: which reach above their threshold (upper) or down to 0 (lower).

    ``negate`` asks it of each item's negation ``-f.x`` (a change read the other way): which
    can fall below minus their threshold (upper), or rise to 0 (lower)."""
    m, n, k = solver.m, len(blk.cols), len(items)
    sign = -1.0 if upper else 1.0  # upper: y - f.x <= 0; lower: f.x - z <= 0
    turn = -sign if negate else sign  # the item's own entries; negated, -f.x in place of f.x
    j = np.arange(k)
    has_b = m.item_b[items] >= 0
    rows = np.concatenate([j, j[has_b], j])
    cols = np.concatenate(
        [np.searchsorted(blk.cols, m.item_a[items]), np.searchsorted(blk.cols, m.item_b[items][has_b]), n + j]
    )
    vals = np.concatenate([np.full(k, turn), np.full(int(has_b.sum()), -turn), np.full(k, -sign)])
    extra = sparse.csr_matrix((vals, (rows, cols)), shape=(k, n + k))
    caps = m.item_t[items] + 1.0
    more = np.column_stack([np.full(k, -np.inf), caps]) if upper else np.column_stack([np.zeros(k), np.full(k, np.inf)])
    c = np.concatenate([np.zeros(n), -np.ones(k) if upper else np.ones(k)])
    status, _, x = solver.run(blk, c, (extra, more))
    if status != 0 or x is None:
        return np.zeros(k, dtype=bool)
    y = x[n:]
    return y >= caps - EPS if upper else y <= EPS


def _falls_far(
    solver: _Solver, blk: _Block, linked: np.ndarray, unproven: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """The changes not proven to rise above their threshold that two more batch programs prove
    protected the other way: able to fall below minus the threshold (``lo <= -(t + 1)``, so it
    can be a change of more than the threshold) and to rise to 0 (``hi >= 0``, so it can be
    nobody's change): both halves of the rule (``_record``), read downwards. Their ``lo`` and
    ``hi`` are set to those proven bounds; a change proven so needs no program of its own
    (2 programs in place of 2 per change: a revision of a long history has hundreds). Returns
    a mask over ``linked``."""
    m = solver.m
    cand = np.flatnonzero(unproven & (m.item_b[linked] >= 0))
    proven = np.zeros(len(linked), dtype=bool)
    if not len(cand):
        return proven
    below = _batch(solver, blk, linked[cand], upper=True, negate=True)
    rises = _batch(solver, blk, linked[cand], upper=False, negate=True)
    both = cand[below & rises]
    lo[linked[both]] = -(m.item_t[linked[both]] + 1.0)
    hi[linked[both]] = 0.0
    proven[both] = True
    return proven


def _single(solver: _Solver, blk: _Block, item: int, upper: bool) -> float:
    f = _item_vector(solver.m, blk, item)
    status, fun, _ = solver.run(blk, -f if upper else f)
    if status == 3:
        return np.inf if upper else -np.inf
    if status != 0:
        return np.nan
    return -fun if upper else fun


def _own_intervals(m: _Model, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The intervals of items touching no row: from their variables' bounds alone."""
    a, b = m.item_a[items], m.item_b[items]
    change = b >= 0
    bb = np.where(change, b, 0)
    lo = m.lo[a] - np.where(change, m.hi[bb], 0.0)
    hi = m.hi[a] - np.where(change, m.lo[bb], 0.0)
    return lo, hi


def _decide(m: _Model, report: AuditReport, solver: _Solver, quick: bool) -> None:
    """Every item's interval, batch first; failures into the report."""
    count = len(m.item_a)
    touches = solver.in_rows[m.item_a] | np.where(m.item_b >= 0, solver.in_rows[np.maximum(m.item_b, 0)], False)
    linked = np.flatnonzero(touches)
    report.in_relations = len(linked)
    lo, hi = np.full(count, np.nan), np.full(count, np.nan)
    bounded = linked  # the items whose hi is an upper bound the audit found (``_record``)
    own = np.flatnonzero(~touches)
    lo[own], hi[own] = _own_intervals(m, own)
    if len(linked):
        vars_ = np.concatenate([m.item_a[linked], m.item_b[linked][m.item_b[linked] >= 0]])
        everything = solver.block(set(solver.var_label[vars_].tolist()))
        report.blocks = len(set(solver.var_label[everything.cols].tolist()))
        up = _batch(solver, everything, linked, upper=True)
        # quick: only "known to be 0 or small" matters (hi); a cell that cannot be 0 is not avoided
        down = np.ones(len(linked), dtype=bool) if quick else _batch(solver, everything, linked, upper=False)
        lo[linked] = np.where(down, 0.0, np.nan)
        hi[linked] = np.where(up, m.item_t[linked] + 1.0, np.nan)
        settled = up & down
        if not quick:
            downward = _falls_far(solver, everything, linked, ~up, lo, hi)
            settled |= downward
            bounded = linked[~downward]
        for j in np.flatnonzero(~settled):
            i = linked[j]
            if quick:
                lo[i], hi[i] = 0.0, 0.0  # unproven counts as failing
                continue
            item_vars = [m.item_a[i]] + ([m.item_b[i]] if m.item_b[i] >= 0 else [])
            blk = solver.block(set(solver.var_label[item_vars].tolist()))
            hi[i] = _single(solver, blk, i, upper=True)
            lo[i] = _single(solver, blk, i, upper=False)
    _record(m, report, lo, hi, bounded)


def _record(m: _Model, report: AuditReport, lo: np.ndarray, hi: np.ndarray, bounded: np.ndarray) -> None:
    """Each item's verdict from its interval; ``narrowest_upper`` over ``bounded``, the items in
    relations whose ``hi`` is an upper bound the audit found (a change proven able to fall far,
    ``_falls_far``, has none: its ``hi`` of 0 says only that it can rise to 0)."""
    finite = hi[bounded][np.isfinite(hi[bounded])]
    report.upper_unbounded = int(np.sum(np.isinf(hi)))
    report.narrowest_upper = int(np.floor(finite.min() + EPS)) if len(finite) else None
    hi_i, lo_i, far = np.floor(hi + EPS), np.ceil(lo - EPS), m.item_t + 1
    reach = (hi_i >= far) | (lo_i <= -far)  # can be a change (or count) of more than the threshold
    zero = ((lo_i <= 0) & (hi_i >= 0)) | (lo_i >= far) | (hi_i <= -far)  # can be 0, or is wholly beyond it
    ok = reach & zero
    for i in np.flatnonzero(~ok):  # NaN (unsolved) compares false: fails
        key, local = m.key_of(int(m.item_a[i]))
        report.failing.setdefault(key, set()).add(local)


def _neighbours(m: _Model, solver: _Solver, report: AuditReport) -> None:
    """Published cells sharing a row with a failing cell: where further suppression helps."""
    failing = [m.offsets[k][0] + local for k, ids in report.failing.items() for local in ids]
    if not failing:
        return
    a = sparse.vstack([solver.a_ub, solver.a_eq]).tocsc()
    rows = np.unique(a[:, failing].nonzero()[0])
    touched = np.unique(a[rows].nonzero()[1]) if len(rows) else np.zeros(0, dtype=np.int64)
    for key, (start, end) in m.offsets.items():
        near = touched[(touched >= start) & (touched < end) & np.isfinite(m.hi[touched])]
        if len(near):
            report.neighbours[key] = {int(v) - start for v in near}


def audit(
    con: duckdb.DuckDBPyConnection, tables: Sequence[AuditTable], links: Sequence[Link] = (), *, quick: bool = False
) -> AuditReport:
    """Attack the publication made of ``tables`` and ``links`` (module docstring).

    An empty ``problems`` list passes. ``quick`` solves the upper batch program only and
    counts every cell it leaves unproven as failing: a fast, cautious screen for the cells
    known to be 0 or small, used to choose secondary suppressions. Work tables are temporary and dropped.
    """
    began = time.perf_counter()
    report = AuditReport()
    model = _load(con, tables)
    try:
        thresholds = {t.key: t.policy.threshold for t in tables}
        _relations(con, model, links, thresholds)
        _cell_items(model, tables)
        report.cells_audited = int(np.sum(model.item_b < 0))
        report.changes_audited = len(model.item_b) - report.cells_audited
        report.rows = model.n_ub + model.n_eq
        solver = _Solver(model)
        _decide(model, report, solver, quick)
        _neighbours(model, solver, report)
        report.lp_solves = solver.solves
        if solver.errors:
            report.problems.append(
                f"the disclosure audit's linear programs failed ({solver.errors[0]}): a declared relation "
                "is contradicted by the published values, or the program could not be solved"
            )
        for key, ids in sorted(report.failing.items()):
            report.problems.append(
                f"{key}: {len(ids)} suppressed cell(s) or change(s) whose feasible interval, from the whole "
                "publication, shows them to be 0 or a small count (protection interval not met)"
            )
    finally:
        for name in model.work.values():
            con.execute(f"DROP TABLE IF EXISTS {name}")
    report.seconds = time.perf_counter() - began
    return report
