"""Joint protection: one table's suppression chosen knowing the rest of the publication.

Rule: the outputs of one publication are protected jointly (Hundepool et al., *Statistical
Disclosure Control*, Wiley 2012, section 4.2: linked tables), so that the audit of
:mod:`.audit` passes on the whole publication:

1. **Screen.** Before suppression, the audit is run with every cell of the new table unknown:
   a cell that the other tables, the declared relations and the previous publication
   already pin to 0 or a small count is *avoided* as a secondary suppression (a known zero
   protects nothing: "x + 0 = margin").
2. **Protect** (:func:`.tables.protect`) with that choice.
3. **Audit** the protected table with the rest of the publication. While it fails, the
   published cells of the new table that share a relation with a failing cell (the smallest
   true counts first, one per failing cell) are suppressed too, the failing secondary
   suppressions are avoided, and steps 2-3 repeat, at most ``MAX_ROUNDS`` times.

4. **Fallback** (fail closed, not by stopping). If the loop finds no further change and the
   audit still fails, every published non-zero cell of the new table in a failing block is
   suppressed: the failing cells, every cell sharing a margin group with one, and every
   published cell sharing a relation row with one (Hundepool et al. 2012, section 4.2:
   suppressing the whole block leaves no published value inside it to narrow a cell, so a
   suppressed non-zero cell keeps ``[0, upper]``). Protection and audit are re-run, the block
   growing with each new failing cell, at most ``MAX_ROUNDS`` times; the number of cells so
   suppressed is recorded (``fallback_block_suppression``). Zeros are never forced: a known
   zero protects nothing (ISB 1523 guards counts of 1..threshold people).

If the audit still fails, the report says so and the output's blocking check fails (fail
closed): the publication is not written. A cell the *other* tables already pin (a zero
whose related cells are published as 0, used as the only possible secondary of a pair)
cannot be freed by suppressing cells of the new table: such a publication still fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import duckdb

from safehaven.publish.disclosure.relations import Link
from safehaven.publish.disclosure.report import AuditReport, AuditTable
from safehaven.publish.disclosure.tables import ProtectionReport, default_margins, protect

__all__ = ["MAX_ROUNDS", "protect_jointly"]

#: Rounds of further suppression before the joint protection gives up (fails closed).
MAX_ROUNDS = 8
AVOID = "__sdc_joint_avoid"
FORCE = "__sdc_joint_force"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _mark(con: duckdb.DuckDBPyConnection, work: str, dims: Sequence[str], col: str, ids: set[int]) -> None:
    """Set boolean ``col`` of ``work`` true on the cells whose rank by ``dims`` is in ``ids``."""
    order = ", ".join(_q(d) for d in dims)
    con.execute(
        f"UPDATE {work} SET {col} = true FROM (SELECT {order}, row_number() OVER (ORDER BY {order}) - 1 AS i "
        f"FROM {work}) r WHERE r.i IN (SELECT unnest(?::BIGINT[])) AND "
        + " AND ".join(f"{work}.{_q(d)} IS NOT DISTINCT FROM r.{_q(d)}" for d in dims),
        [sorted(ids)],
    )


def _smallest(con: duckdb.DuckDBPyConnection, work: str, dims: Sequence[str], count_col: str, ids: set[int], k: int):
    order = ", ".join(_q(d) for d in dims)
    rows = con.execute(
        f"SELECT i FROM (SELECT row_number() OVER (ORDER BY {order}) - 1 AS i, {_q(count_col)} AS n, {AVOID} AS a "
        f"FROM {work}) WHERE i IN (SELECT unnest(?::BIGINT[])) ORDER BY a, n, i LIMIT {int(k)}",
        [sorted(ids)],
    ).fetchall()
    return {int(r[0]) for r in rows}


def _block_cells(
    con: duckdb.DuckDBPyConnection, work: str, dims: Sequence[str], count_col: str, ids: set[int], margins: Any
) -> set[int]:
    """Non-zero cells sharing a margin group with a cell in ``ids`` (and those cells): the block."""
    order = ", ".join(_q(d) for d in dims)
    groups = default_margins(dims) if margins is None else [list(m) for m in margins]
    same = [" AND ".join(f"r.{_q(d)} IS NOT DISTINCT FROM f.{_q(d)}" for d in key) or "TRUE" for key in groups]
    ranked = f"SELECT row_number() OVER (ORDER BY {order}) - 1 AS i, * FROM {work}"
    rows = con.execute(
        f"WITH r AS ({ranked}), f AS (SELECT * FROM r WHERE i IN (SELECT unnest(?::BIGINT[]))) "
        f"SELECT r.i FROM r WHERE r.{_q(count_col)} > 0 AND (r.i IN (SELECT i FROM f)"
        + "".join(f" OR EXISTS (SELECT 1 FROM f WHERE {cond})" for cond in same)
        + ")",
        [sorted(ids)],
    ).fetchall()
    return {int(r[0]) for r in rows}


def _fallback(
    con: duckdb.DuckDBPyConnection,
    run: Callable[[], tuple[ProtectionReport, AuditReport]],
    first: tuple[ProtectionReport, AuditReport],
    key: str,
    block: Callable[[set[int]], set[int]],
    force: Callable[[set[int]], None],
) -> tuple[ProtectionReport, AuditReport]:
    """Rule 4 of the module docstring: suppress whole failing blocks until the audit passes."""
    protection, report = first
    forced: set[int] = set()
    for _ in range(MAX_ROUNDS):
        grow = block(report.failing.get(key, set()) | report.neighbours.get(key, set())) - forced
        if report.passed or not grow:
            break
        forced |= grow
        force(forced)
        protection, report = run()
        report.fallback_block_suppression = len(forced)
    return protection, report


def protect_jointly(
    con: duckdb.DuckDBPyConnection,
    key: str,
    source: str,
    target: str,
    dimensions: Sequence[str],
    others: Sequence[AuditTable],
    links: Sequence[Link],
    protector: Callable[..., ProtectionReport] = protect,
    **options: Any,
) -> tuple[ProtectionReport, AuditReport]:
    """:func:`protect` ``source`` into ``target`` jointly with ``others`` (module docstring)."""
    # imported here: the audit needs numpy and scipy, which loading the outputs does not (issue 22)
    from safehaven.publish.disclosure.audit import audit

    dims = list(dimensions)
    policy = options["policy"]
    count_col = options.get("count_col", "people")
    work = f"__sdc_joint_{uuid.uuid4().hex}"
    con.execute(f"CREATE OR REPLACE TEMP TABLE {work} AS SELECT *, false AS {AVOID}, false AS {FORCE} FROM {source}")
    try:
        screen = audit(
            con, [AuditTable(key, work, tuple(dims), count_col, policy, unknown=True), *others], links, quick=True
        )
        avoided, forced = set(screen.failing.get(key, set())), set()
        _mark(con, work, dims, AVOID, avoided)
        report: AuditReport | None = None
        for rounds in range(1, MAX_ROUNDS + 1):
            protection = protector(con, work, target, dims, avoid_col=AVOID, force_col=FORCE, **options)
            table = AuditTable(key, target.removeprefix("temp."), tuple(dims), count_col, policy)
            report = audit(con, [table, *others], links)
            report.iterations = rounds
            failing, near = report.failing.get(key, set()), report.neighbours.get(key, set())
            force = _smallest(con, work, dims, count_col, near, max(len(failing), 1)) if near else set()
            if report.passed or not (failing - avoided or force - forced):
                break  # passed, or nothing left to change: fails closed
            avoided |= failing
            forced |= force
            _mark(con, work, dims, AVOID, avoided)
            _mark(con, work, dims, FORCE, forced)
        assert report is not None
        if report.passed:
            return protection, report

        def rerun() -> tuple[ProtectionReport, AuditReport]:
            done = protector(con, work, target, dims, avoid_col=AVOID, force_col=FORCE, **options)
            return done, audit(con, [table, *others], links)

        def block(ids: set[int]) -> set[int]:
            return _block_cells(con, work, dims, count_col, ids, options.get("margins"))

        return _fallback(con, rerun, (protection, report), key, block, lambda ids: _mark(con, work, dims, FORCE, ids))
    finally:
        con.execute(f"DROP TABLE IF EXISTS {work}")
