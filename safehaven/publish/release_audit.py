"""The disclosure audit of a whole publication: its outputs, their relations, the previous release.

Rules (``safehaven.publish.disclosure.audit`` states the protection interval and its sources;
``safehaven.publish.disclosure.relations`` the relations):

* **Blocking, before anything is written.** :func:`audit_release` runs the attack on every
  output of the release at once: each ``published.<name>`` table, the relations its
  definition declares, and the previous publication of the same months for every output that
  declares a ``revision``. Any failure refuses the release with one-line reasons.
* **The previous publication is the store's record** (``governance.publication_contents``:
  each publication's release id and its files' SHA-256), not what sits in ``published/``,
  which anyone with file access can delete, edit or swap (CoP 23d). An output's previous
  publication is the last recorded one that contained it, also when later ones left it out;
  never published, it has none. A publication is recorded as pending before its first file
  moves into ``published/`` (``reuse.record_pending``): after a crash part way, its manifest is
  accepted in place of the last recorded one's, and an output whose Parquet there is the pending
  one's (analysts may hold it) is compared with that, so the next run needs no person. With no
  publication recorded at all, the manifest in ``published/`` (if any) stands in, its files
  checked against it.
* **Fail closed.** The release is refused, naming the file, the release it belongs to and how
  to put it back (from a backup of ``published/`` or any copy of that release: it is open
  data, the SHA-256 must match), and refused again on every run until a person has, when
  ``published/release.json`` is missing or does not list the files the store records for the
  last publication, or an output's previous ``<name>.parquet`` is missing, is not the file
  recorded (another SHA-256), or cannot be read: without it the audit cannot establish that
  the new figures do not difference against what analysts hold.
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

from safehaven.core.files import sha256_file
from safehaven.core.home import PUBLISHED_MANIFEST
from safehaven.core.sql import file_lit, q
from safehaven.core.store import table_exists
from safehaven.publish import reuse
from safehaven.publish.disclosure.relations import PREVIOUS, Link, links_of
from safehaven.publish.disclosure.report import AuditReport, AuditTable
from safehaven.publish.outputs import Output
from safehaven.publish.quality import load_statement, store_statement

__all__ = ["REVISED_CELLS_LISTED", "audit_release", "audit_tables", "load_previous", "revisions"]

MANIFEST = PUBLISHED_MANIFEST
PREVIOUS_TABLE = "_sdc_previous_{}"
#: The most revised cells a quality statement lists (the rest are counted).
REVISED_CELLS_LISTED = 200
#: How a suppressed cell's value is shown in the list of revisions.
SUPPRESSED = "suppressed"


def _has_revision(output: Output) -> bool:
    return any(r.kind == "revision" for r in output.relations)


def load_previous(
    con: duckdb.DuckDBPyConnection,
    outputs: Sequence[Output],
    folder: Path | None,
) -> tuple[dict[str, str], list[str]]:
    """Temp tables of the previous publication of each output declaring a revision; problems.

    The previous publication is the store's record (``safehaven.publish.reuse.publications``),
    not whatever sits in ``folder``: its manifest and each file read are checked against that
    record (module docstring, "Fail closed"; CoP 23d).
    """
    wanted = [o for o in outputs if _has_revision(o)]
    if not wanted or folder is None:
        return {}, []
    records, pending = reuse.publications(con), reuse.pending_publications(con)
    if not records and not pending:  # a first publication, or a haven from before the pending record
        return _unrecorded(con, wanted, folder)
    problem = _manifest_problem(folder, records[0]) if records else None
    if problem and not any(_is_manifest_of(folder, p) for p in pending):
        return {}, [problem]
    bases = {o.name: _base(folder, o.name, records, pending) for o in wanted}
    return _load_bases(con, bases, folder, records[0].release_id if records else None)


def _base(
    folder: Path, name: str, records: Sequence[reuse.Publication], pending: Sequence[reuse.Publication]
) -> reuse.Publication | None:
    """The publication ``<name>.parquet`` in ``folder`` is compared with: one a crash left part way
    into ``published/`` (``reuse.pending_publications``) when the file there is that one's (analysts
    may hold it), else the last recorded publication that contained ``name``."""
    file = f"{name}.parquet"
    path = folder / file
    found = sha256_file(path) if path.is_file() else None
    in_place = [p for p in pending if found is not None and p.files.get(file) == found]
    return in_place[0] if in_place else _last_with(records, name)


#: the release a base comes from, and each file's SHA-256 (None: nothing to difference against)
Base = reuse.Publication | None


def _unrecorded(
    con: duckdb.DuckDBPyConnection, outputs: Sequence[Output], folder: Path
) -> tuple[dict[str, str], list[str]]:
    """No publication recorded: the one whose manifest is in ``folder`` if any (a crash between
    putting a first release in place and recording it), each file checked against that manifest."""
    path = folder / MANIFEST
    if not path.exists():
        return {}, []  # the first publication
    try:
        manifest = json.loads(path.read_text())
        base = reuse.Publication(str(manifest["release_id"]), "", dict(manifest["files"]))
    except (OSError, ValueError, TypeError, KeyError):
        return {}, [f"the previous publication is unreadable ({MANIFEST})"]
    return _load_bases(con, {o.name: _last_with([base], o.name) for o in outputs}, folder)


def _last_with(records: Sequence[reuse.Publication], name: str) -> Base:
    """The latest recorded publication that contained output ``name`` (None: never published)."""
    return next((r for r in records if f"{name}.parquet" in r.files), None)


def _is_manifest_of(folder: Path, publication: reuse.Publication) -> bool:
    """Whether ``release.json`` in ``folder`` is ``publication``'s: its release id and files as the
    store records them (the audit head in it is rewritten nightly)."""
    expected = {k: v for k, v in publication.files.items() if k != MANIFEST}
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return manifest.get("release_id") == publication.release_id and manifest.get("files") == expected
    except (OSError, ValueError, AttributeError):
        return False


def _manifest_problem(folder: Path, last: reuse.Publication) -> str | None:
    """Why ``release.json`` in ``folder`` is not the manifest of ``last``, or None."""
    path = folder / MANIFEST
    if _is_manifest_of(folder, last):
        return None
    state = "missing" if not path.exists() else "not its manifest as the store records it (edited or replaced)"
    return (
        f"published/{MANIFEST} of release {last.release_id}, the last publication the store records, is {state}: "
        "the changes since cannot be audited against what analysts hold. Put that release's "
        f"{MANIFEST} back in published/ from a backup of published/ (its files must be those "
        "governance.publication_contents records), then publish again"
    )


def _load_bases(
    con: duckdb.DuckDBPyConnection, bases: Mapping[str, Base], folder: Path, last: str | None = None
) -> tuple[dict[str, str], list[str]]:
    """Load each output's previous file, checked against its recorded SHA-256; any problem refuses.
    ``last``: the release id of the last publication (an output's base may be an earlier one)."""
    loaded: dict[str, str] = {}
    for name, base in bases.items():
        if base is None:
            continue  # never published: nothing to difference against
        problem = _file_problem(folder, name, base, dropped=base.release_id != (last or base.release_id))
        if problem is None:
            loaded[name] = PREVIOUS_TABLE.format(name)
            try:
                con.execute(
                    f"CREATE OR REPLACE TEMP TABLE {loaded[name]} AS "
                    f"SELECT * FROM read_parquet({file_lit(folder / f'{name}.parquet')})"
                )
            except duckdb.Error:
                problem = f"{name}: the previous publication is unreadable ({name}.parquet)"
        if problem:
            for table in loaded.values():
                con.execute(f"DROP TABLE IF EXISTS {table}")
            return {}, [problem]
    return loaded, []


def _file_problem(folder: Path, name: str, base: reuse.Publication, *, dropped: bool) -> str | None:
    """Why ``<name>.parquet`` in ``folder`` is not the file release ``base`` published, or None.
    ``dropped``: a later publication left ``name`` out (and removed its files from ``published/``)."""
    file = f"{name}.parquet"
    path = folder / file
    recorded = base.files[file]
    if path.is_file() and sha256_file(path) == recorded:
        return None
    state = (
        "missing" if not path.is_file() else f"not the file that release published (SHA-256 {str(recorded)[:12]}...)"
    )
    if dropped:
        state += " (a later publication left the output out and removed its files)"
    return (
        f"{name}: published/{file} of release {base.release_id}, the last publication of {name}, is {state}: "
        "the changes since cannot be audited against what analysts hold. Put that release's "
        f"{file} back in published/ from a backup of published/ or any copy of that release (it is open data; "
        "its SHA-256 must match), then publish again"
    )


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
    con: duckdb.DuckDBPyConnection,
    outputs: Sequence[Output],
    previous_folder: Path | None,
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
