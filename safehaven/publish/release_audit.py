"""The disclosure audit of a whole publication: its outputs, their relations, the previous release.

Rules (``safehaven.publish.disclosure.audit`` states the protection interval and its sources;
``safehaven.publish.disclosure.relations`` the relations):

* **Blocking, before anything is written.** :func:`audit_release` runs the attack on every
  output of the release at once: each ``published.<name>`` table, the relations its
  definition declares, and the previous publication of the same months (the files of the
  last release, ``release.json`` and ``<name>.parquet``) for every output that declares a
  ``revision``. Any failure refuses the release with one-line reasons.
* **Fail closed.** A previous release whose manifest names a file that is missing or cannot
  be read refuses the release ("the previous publication is unreadable"): without it the
  audit cannot establish that the new figures do not difference against the old.
* **Revisions are listed.** For each output with a previous publication, the cells of the
  same months whose published value or suppression changed are counted and listed in its
  quality statement (``accuracy.revisions``; CoP 29i, say what changed; the ONS revisions
  policy): each revised cell's dimension values with its previous and new *published* value
  (``"suppressed"`` where suppressed). Both sides are public tables (``published.<name>`` and
  the previous release's file), so the list never holds a true count. At most
  :data:`REVISED_CELLS_LISTED` cells are listed, in dimension order; ``cells_not_listed``
  counts the rest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb

from safehaven.core.sql import file_lit, q
from safehaven.core.store import table_exists
from safehaven.publish.disclosure.relations import PREVIOUS, Link, links_of
from safehaven.publish.disclosure.report import AuditReport, AuditTable
from safehaven.publish.outputs import Output
from safehaven.publish.quality import load_statement, store_statement

__all__ = ["REVISED_CELLS_LISTED", "audit_release", "audit_tables", "load_previous", "revisions"]

MANIFEST = "release.json"
PREVIOUS_TABLE = "_sdc_previous_{}"
#: The most revised cells a quality statement lists (the rest are counted).
REVISED_CELLS_LISTED = 200
#: How a suppressed cell's value is shown in the list of revisions.
SUPPRESSED = "suppressed"


def _has_revision(output: Output) -> bool:
    return any(r.kind == "revision" for r in output.relations)


def load_previous(
    con: duckdb.DuckDBPyConnection, outputs: Sequence[Output], folder: Path | None
) -> tuple[dict[str, str], list[str]]:
    """Temp tables of the previous publication of each output declaring a revision; problems."""
    wanted = [o for o in outputs if _has_revision(o)]
    manifest = folder / MANIFEST if folder else None
    if not wanted or manifest is None or not manifest.exists():
        return {}, []
    try:
        files = set(json.loads(manifest.read_text()).get("files", {}))
    except (OSError, ValueError):
        return {}, ["the previous publication is unreadable (release.json)"]
    loaded: dict[str, str] = {}
    for output in wanted:
        name = f"{output.name}.parquet"
        if name not in files:
            continue  # not in the previous release: nothing to difference against
        table = PREVIOUS_TABLE.format(output.name)
        try:
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT * FROM read_parquet({file_lit(folder / name)})"
            )
        except duckdb.Error:
            return {}, [f"{output.name}: the previous publication is unreadable ({name})"]
        loaded[output.name] = table
    return loaded, []


def audit_tables(
    outputs: Mapping[str, Output], tables: Mapping[str, str], previous: Mapping[str, str]
) -> tuple[list[AuditTable], list[Link]]:
    """The audit's tables (``tables``: output -> relation, ``previous`` likewise) and links."""
    found: list[AuditTable] = []
    for key, rel in [*tables.items(), *((k + PREVIOUS, v) for k, v in previous.items())]:
        o = outputs[key.removesuffix(PREVIOUS)]
        audited = not key.endswith(PREVIOUS)  # the previous publication is evidence; its changes are audited
        found.append(AuditTable(key, rel, tuple(o.dimension_names), o.count_col, o.disclosure_policy, audited=audited))
    links: list[Link] = []
    for name in tables:
        o = outputs[name]
        links += links_of(name, o.dimension_names, list(o.relations), previous=name in previous)
    return found, links


def revisions(con: duckdb.DuckDBPyConnection, output: Output, current: str, previous: str) -> dict[str, Any]:
    """Cells of the same months revised since the previous publication: counted, and listed (capped).

    ``current`` and ``previous`` are public tables: the values listed are published values.
    """
    dims = output.dimension_names
    on = " AND ".join(f"n.{q(d)} = o.{q(d)}" for d in dims)
    c = q(output.count_col)
    joined = f"FROM {current} n JOIN {previous} o ON {on}"
    row = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE n.{c} IS DISTINCT FROM o.{c}), "
        f"count(*) FILTER (WHERE (n.{c} IS NULL) <> (o.{c} IS NULL)) {joined}"
    ).fetchone()
    assert row is not None
    listed = con.execute(
        f"SELECT {', '.join(f'CAST(n.{q(d)} AS VARCHAR)' for d in dims)}, o.{c}, n.{c} {joined} "
        f"WHERE n.{c} IS DISTINCT FROM o.{c} ORDER BY {', '.join(f'n.{q(d)}' for d in dims)} "
        f"LIMIT {REVISED_CELLS_LISTED}"
    ).fetchall()
    cells = [
        {"cell": dict(zip(dims, r[: len(dims)], strict=True)), "previous": _shown(r[-2]), "new": _shown(r[-1])}
        for r in listed
    ]
    return {
        "cells_compared": int(row[0]),
        "cells_revised": int(row[1]),
        "suppression_changed": int(row[2]),
        "cells": cells,
        "cells_not_listed": int(row[1]) - len(cells),
    }


def _shown(value: Any) -> int | str:
    """A published value as listed: the number, or ``"suppressed"`` (NULL in a public table)."""
    return SUPPRESSED if value is None else int(value)


def _note(
    con: duckdb.DuckDBPyConnection, outputs: Sequence[Output], previous: Mapping[str, str], report: AuditReport
) -> None:
    """Each statement gets the audit's figures and, against a previous publication, its revisions."""
    for output in outputs:
        statement = load_statement(con, output.name)
        if statement is None:
            continue
        accuracy = statement.setdefault("accuracy", {})
        accuracy["disclosure_audit"] = report.as_metadata()
        if output.name in previous:
            accuracy["revisions"] = revisions(con, output, f"published.{q(output.name)}", previous[output.name])
        store_statement(con, statement)


def audit_release(
    con: duckdb.DuckDBPyConnection, outputs: Sequence[Output], previous_folder: Path | None
) -> tuple[AuditReport, list[str]]:
    """Attack the release (module docstring): its report and one-line problems (empty: passes)."""
    # imported here: the audit needs numpy and scipy, which loading the outputs does not (issue 22)
    from safehaven.publish.disclosure.audit import audit

    previous, problems = load_previous(con, outputs, previous_folder)
    if problems:
        return AuditReport(problems=problems), problems
    try:
        by_name = {o.name: o for o in outputs}
        tables, links = audit_tables(by_name, {o.name: f"published.{o.name}" for o in outputs}, previous)
        report = audit(con, tables, links)
        if report.passed:
            _note(con, outputs, previous, report)
    finally:
        for table in previous.values():
            con.execute(f"DROP TABLE IF EXISTS {table}")
    return report, list(report.problems)


def build_context(
    con: duckdb.DuckDBPyConnection,
    output: Output,
    publication: Mapping[str, Output],
    previous_folder: Path | None,
) -> tuple[list[AuditTable], list[Link], dict[str, Any]]:
    """For building ``output``: the related published tables, previous ones, and links."""
    others = {
        r.of: f"published.{r.of}"
        for r in output.relations
        if r.of and r.of in publication and table_exists(con, "published", r.of)
    }
    previous, problems = load_previous(con, [output], previous_folder)
    outputs = {**publication, output.name: output}
    tables, links = audit_tables(outputs, {output.name: "", **others}, previous)
    return [t for t in tables if t.key != output.name], links, {"previous": previous, "problems": problems}
