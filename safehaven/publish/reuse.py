"""Work a night does not need to repeat: an output, or a publication, whose inputs are unchanged.

A haven lives for years; a night's cost should be set by what changed, not by the whole
history (issue 22). The rule here is narrow, and it fails towards rebuilding:

* **An output is rebuilt unless every input it reads is unchanged** since its last build that
  passed its checks. Its *fingerprint* covers: the code of the ``safehaven`` package, the
  output definition, the related outputs' definitions and protected tables (joint protection),
  the reporting period (so a new month rebuilds), the content of every haven table it reads
  (a row hash over every column: inserts, deletions, re-pseudonymisation and edits all
  change it), the store's code lists, the collections' contract versions and quality figures
  (the quality statement's inputs), and the agreement that authorised a linkage. The output
  SQL reads nothing else: ``safehaven.publish.sql_gate`` refuses any other table. What the
  counts read (code, definition, period, haven tables, code lists, agreement) enters as one
  value, the counts' own fingerprint (``safehaven.publish.counting.counting_fingerprint``),
  computed once per build.
* A reused output's protected table must still be the one that build wrote (its own row hash
  is kept with the fingerprint), and its disclosure invariants and publication guard are
  checked again on every run (cheap: the table is small). Only the counting, the protection
  and the linear-programming attack, which depend on nothing but the inputs, are not redone.
* **A publication is not re-issued** when the protected tables, their quality statements and
  dictionaries, the methods and the licence are those of the last publication and every file
  it wrote is still in ``published/`` with its recorded hash. Nothing changed, so nothing is
  re-released and no register row is added; a missing or altered file is written again, except
  ``release.json`` and the Parquet of an output declaring a revision, the base of the release's
  disclosure audit: those refuse it until put back (``safehaven.publish.release_audit``). Its
  manifest alone is rewritten with tonight's audit head, so the head published to others
  stays as fresh as the run (``safehaven.core.anchors``).

The previous publication is deliberately not an input of an output: when the inputs are
unchanged, the table equals the one last published, and publishing it again reveals no
difference (CoP 34b).

Skipping is never a way around a safeguard: linkage authorisation, the audit-trail head and
the publication checks run as before; only recomputation is saved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from safehaven.core import schema
from safehaven.core.digests import code_sha, sha_of, table_sha
from safehaven.core.files import sha256_file
from safehaven.core.home import Home
from safehaven.core.sql import q
from safehaven.core.store import table_exists
from safehaven.intake.contracts import ContractRegistry
from safehaven.publish.outputs import Output, Period, code_lists_of
from safehaven.publish.quality import collection_figures

OUTPUT_BUILDS = schema.OUTPUT_BUILDS
PUBLICATIONS = schema.PUBLICATION_CONTENTS
PENDING = schema.PUBLICATION_PENDING


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    schema.ensure(con, OUTPUT_BUILDS, PUBLICATIONS, PENDING)


# --- outputs -------------------------------------------------------------------------------


def output_fingerprint(
    con: duckdb.DuckDBPyConnection,
    output: Output,
    registry: ContractRegistry,
    home: Home,
    *,
    period: Period,
    publication: dict[str, Output],
    agreement_id: str | None,
    counted: str,
) -> str:
    """SHA-256 over every input of ``output`` (the module docstring lists them). ``counted`` is the
    fingerprint of what its counts read (``counting.counting_fingerprint``: the code, the definition,
    the period, the haven tables, the code lists, the agreement), computed once by the caller."""
    related = sorted({r.of for r in output.relations if r.of})
    inputs = {
        "code": code_sha(),
        "definition": output.definition_sha256(),
        "related": {
            name: [
                publication[name].definition_sha256() if name in publication else None,
                table_sha(con, f"published.{q(name)}"),
            ]
            for name in related
        },  # fmt: skip
        "period": period.as_dict(),
        "counted": counted,
        "code_lists": {n: registry.code_list(n).version for n in code_lists_of(output)},
        "contracts": {c: registry.contracts[c].version for c in output.collections},
        "figures": {c: collection_figures(con, registry.contracts[c], home) for c in output.collections},
        "agreement": agreement_id,
    }
    return sha_of(inputs)


def reusable_build(con: duckdb.DuckDBPyConnection, output: str, fingerprint: str) -> dict[str, Any] | None:
    """The recorded metadata of ``output``'s last passing build, if its fingerprint is ``fingerprint``
    and ``published.<output>`` still holds the rows that build wrote; else None (rebuild)."""
    ensure_tables(con)
    row = con.execute(
        f"SELECT fingerprint, table_sha, built_at, metadata FROM {OUTPUT_BUILDS} WHERE output = ?", [output]
    ).fetchone()
    if row is None or row[0] != fingerprint:
        return None
    if table_sha(con, f"published.{q(output)}") != row[1]:
        return None
    return {**json.loads(row[3]), "built_at": row[2].isoformat(timespec="seconds")}


def record_build(
    con: duckdb.DuckDBPyConnection, output: str, fingerprint: str | None, metadata: dict[str, Any]
) -> None:
    """Keep the fingerprint of a passing build (``fingerprint`` None: forget it, the build failed)."""
    ensure_tables(con)
    con.execute(f"DELETE FROM {OUTPUT_BUILDS} WHERE output = ?", [output])
    if fingerprint is not None:
        con.execute(
            f"INSERT INTO {OUTPUT_BUILDS} VALUES (?, ?, ?, now(), ?)",
            [output, fingerprint, table_sha(con, f"published.{q(output)}"), json.dumps(metadata, default=str)],
        )


# --- publications --------------------------------------------------------------------------


def unchanged_publication(con: duckdb.DuckDBPyConnection, content_sha: str, folder: Path) -> tuple[str, int] | None:
    """(release id, rows) of the last publication when its content was ``content_sha`` and every
    file it wrote is still in ``folder`` with its hash; else None (publish again)."""
    ensure_tables(con)
    row = con.execute(
        f"SELECT release_id, content_sha, files, rows FROM {PUBLICATIONS} ORDER BY published_at DESC LIMIT 1"
    ).fetchone()
    files = _files(row[2]) if row is not None else {}
    if row is None or row[1] != content_sha or not files:  # no files on record: never "unchanged"
        return None
    for name, sha in files.items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != sha:
            return None
    return row[0], int(row[3])


def _files(text: str | None) -> dict[str, str]:
    """A publication's recorded files (name -> SHA-256) as stored; an empty record when the stored
    value is not such a mapping (edited in the store): no file then matches it, so the release
    audit refuses, naming the manifest, rather than failing on the shape."""
    try:
        files = json.loads(text or "null")
    except ValueError:
        return {}
    if not isinstance(files, dict):
        return {}
    return {str(k): v for k, v in files.items() if isinstance(v, str)}


@dataclass(frozen=True)
class Publication:
    """One publication as the store records it: its release id, content digest and files (name -> SHA-256)."""

    release_id: str
    content_sha: str
    files: dict[str, str]


def publications(con: duckdb.DuckDBPyConnection) -> list[Publication]:
    """Every publication the store records, newest first (none: nothing was ever published).

    This record, not the files in ``published/`` (which anyone with file access can delete,
    edit or swap), says what analysts hold (``safehaven.publish.release_audit``; CoP 23d)."""
    if not table_exists(con, *PUBLICATIONS.split(".")):
        return []
    sql = f"SELECT release_id, content_sha, files FROM {PUBLICATIONS} ORDER BY published_at DESC"
    rows = con.execute(sql).fetchall()
    return [Publication(r[0], r[1], _files(r[2])) for r in rows]


def record_pending(con: duckdb.DuckDBPyConnection, release_id: str, files: dict[str, str]) -> None:
    """Record a publication about to be put in place (committed before the first file moves): a
    crash part way leaves its files in ``published/`` known (:func:`pending_publications`). Every
    pending one is kept until a publication is recorded: two stopped in a row may each have left
    files there (found by review). A manifest rewritten for a newer audit head is recorded so too,
    under the release it belongs to, until :func:`record_manifest` keeps its hash."""
    ensure_tables(con)
    con.execute(f"INSERT INTO {PENDING} VALUES (?, ?, now())", [release_id, json.dumps(files)])


def pending_publications(con: duckdb.DuckDBPyConnection) -> list[Publication]:
    """The publications crashes left part way into ``published/`` since the last one recorded,
    newest first: analysts may hold any of their files, so the next release is audited against
    those in place (``safehaven.publish.release_audit``)."""
    if not table_exists(con, *PENDING.split(".")):
        return []
    rows = con.execute(f"SELECT release_id, files FROM {PENDING} ORDER BY started_at DESC").fetchall()
    return [Publication(r[0], "", _files(r[1])) for r in rows]


def record_publication(
    con: duckdb.DuckDBPyConnection, release_id: str, content_sha: str, files: dict[str, str], rows: int
) -> None:
    """Record a publication put in place; it is no longer pending (:func:`record_pending`)."""
    ensure_tables(con)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            f"INSERT INTO {PUBLICATIONS} VALUES (?, ?, ?, ?, now())", [release_id, content_sha, json.dumps(files), rows]
        )
        con.execute(f"DELETE FROM {PENDING}")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def record_manifest(con: duckdb.DuckDBPyConnection, release_id: str, name: str, sha: str) -> None:
    """The publication's manifest was rewritten (a newer audit head): keep its new hash. The rewrite
    was recorded as pending before it (:func:`record_pending`), so a crash between the two leaves
    the new manifest known, never taken for an altered one (``safehaven.publish.integrity``); that
    pending record is done with here."""
    ensure_tables(con)
    files = json.loads(
        con.execute(f"SELECT files FROM {PUBLICATIONS} WHERE release_id = ?", [release_id]).fetchone()[0]
    )
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            f"UPDATE {PUBLICATIONS} SET files = ? WHERE release_id = ?", [json.dumps({**files, name: sha}), release_id]
        )
        con.execute(f"DELETE FROM {PENDING} WHERE release_id = ?", [release_id])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
