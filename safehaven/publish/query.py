"""Analysts' SQL over the published outputs, and nothing else.

Rules (``docs/rules.md`` "Users": analysts query only the anonymised outputs; Caldicott principle 4,
need to know; ``docs/design.md`` "Zones": access control by key separation, not by a flag):

* The query runs against ``published/published.duckdb`` only: the separate, unencrypted file
  the publication step writes with the published tables, their dictionary and quality
  statements. It is opened ``read_only``; the store and its key are never touched, so an
  analyst's account needs no access to either.
* **Only the release's own file** (fail closed): before it is opened, the database's SHA-256
  must be the one ``release.json`` beside it records for it (:func:`check_release`), and no
  write-ahead log (``published.duckdb.wal``) may lie beside it, since DuckDB would replay one over
  the checked bytes. Otherwise the query is refused: the file was altered after it was
  published (e.g. suppressed cells rewritten as small counts). The analyst holds no key, so
  this is a *consistency* check, not a proof: someone who rewrites the database and its
  manifest together passes it; the next publication compares every file in ``published/``
  with the store's record, keeps what was altered as evidence and records a breach
  (``safehaven.publish.integrity``), and publishes afresh.
* Once the file is open, the connection is hardened before the analyst's SQL runs:
  extension auto-install and auto-load off, ``enable_external_access = false`` (no reading
  or writing other files, no ``ATTACH`` of the store, no ``COPY``, no extension loading),
  then ``lock_configuration = true`` so the SQL cannot switch any of it back (``docs/design.md`` "Hardened connections":
  "harden a connection once the files it needs are attached").
* Exactly one statement, and it must be a query (``SELECT``, ``WITH``, ``FROM``-first,
  ``VALUES``, ``SHOW``, ``DESCRIBE``, ``SUMMARIZE``, read-only pragmas such as
  ``PRAGMA database_list``: what DuckDB's parser types as SELECT). Several statements, DDL,
  DML, ``SET`` (and setting pragmas), ``CALL``, ``EXPLAIN``, ``ATTACH``, ``COPY``,
  ``INSTALL``/``LOAD``, ``PIVOT`` statements (which create a type first) are refused with a
  clear message, before anything runs.
* Bounded: at most ``max_rows`` rows are fetched (the output says when it was cut), and a
  query running longer than ``timeout`` seconds is interrupted.

Analysts who prefer their own tools can open the same file with DuckDB directly
(``duckdb.connect("published.duckdb", read_only=True)``) or read the CSV/Parquet files:
everything in ``published/`` is already anonymised and open.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

from safehaven.core.files import sha256_file
from safehaven.core.home import PUBLISHED_DB, PUBLISHED_MANIFEST

HARDENING = (
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)


#: What a database that is not its release's file is told (never a value or a hash).
ALTERED = (
    f"{PUBLISHED_DB} differs from the release it belongs to (its SHA-256 is not the one {PUBLISHED_MANIFEST} "
    "records): do not use it; the governance lead is told at the next run, which publishes it afresh. "
    "If a publication is running now, try again once it has finished"
)


class QueryRefused(ValueError):
    """The SQL is not one read-only query, or the published database is missing or not its release's."""


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool


def _recorded_sha(path: Path) -> str:
    """The SHA-256 the manifest beside ``path`` records for the database, or :class:`QueryRefused`."""
    manifest = path.parent / PUBLISHED_MANIFEST
    unusable = (
        f"{PUBLISHED_DB} cannot be checked against the release it belongs to: {PUBLISHED_MANIFEST} beside it is "
        "{}; do not use it. Ask the haven's operator to publish again (safehaven run)"
    )
    try:
        recorded = json.loads(manifest.read_text())["files"][PUBLISHED_DB]
    except FileNotFoundError:
        raise QueryRefused(unusable.format("missing")) from None
    except (OSError, ValueError, TypeError, KeyError):
        raise QueryRefused(unusable.format(f"unreadable or does not list {PUBLISHED_DB}")) from None
    if not isinstance(recorded, str):
        raise QueryRefused(unusable.format(f"unreadable or does not list {PUBLISHED_DB}"))
    return recorded


def check_release(path: Path) -> None:
    """Refuse (:class:`QueryRefused`) the database at ``path`` unless it is its release's file: its
    SHA-256 the one ``release.json`` beside it records, and no write-ahead log beside it (module
    docstring, "Only the release's own file"). A consistency check: the analyst holds no key."""
    recorded = _recorded_sha(path)
    if os.path.lexists(path.with_name(path.name + ".wal")):
        raise QueryRefused(
            f"a write-ahead log ({PUBLISHED_DB}.wal) lies beside {PUBLISHED_DB}: it would change what is read, "
            "and the haven never writes one. Do not use the database; the governance lead is told at the next "
            "run, which moves the log out of published/ and publishes afresh"
        )
    if sha256_file(path) != recorded:
        raise QueryRefused(ALTERED)


def open_published(path: Path) -> duckdb.DuckDBPyConnection:
    """The published database, once it is its release's file (:func:`check_release`), read-only,
    with external access disabled and locked."""
    if not path.is_file():
        raise QueryRefused(f"no published database at {path}; run the pipeline (safehaven run) first")
    check_release(path)
    con = duckdb.connect(str(path), read_only=True)
    try:
        for statement in HARDENING:
            con.execute(statement)
    except Exception:
        con.close()
        raise
    return con


def single_select(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The one query in ``sql``, or :class:`QueryRefused` saying why not."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRefused(f"the SQL does not parse: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise QueryRefused(f"exactly one statement is allowed, found {len(statements)}")
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        kind = statement.type.name
        raise QueryRefused(f"only queries (SELECT) are allowed over the published outputs, not {kind}")
    return statement.query


def run_query(path: Path, sql: str, *, max_rows: int = 1000, timeout: float = 60.0) -> QueryResult:
    """Run one read-only query against the published database (see the module docstring)."""
    con = open_published(path)
    timer = threading.Timer(timeout, con.interrupt)
    try:
        query = single_select(con, sql)
        timer.start()
        try:
            cursor = con.execute(query)
            rows = cursor.fetchmany(max_rows + 1)
        except duckdb.InterruptException:
            raise QueryRefused(f"the query ran longer than {timeout:g} s and was stopped") from None
        except duckdb.Error as exc:
            raise QueryRefused(f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        columns = [d[0] for d in cursor.description or []]
        return QueryResult(columns, rows[:max_rows], len(rows) > max_rows)
    finally:
        timer.cancel()
        con.close()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, date | datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def format_result(result: QueryResult, fmt: str = "table") -> str:
    """The result as an aligned text table, CSV, a JSON array of row objects, or JSON Lines."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows([[_cell(v) for v in row] for row in result.rows])
        return buf.getvalue()
    objects = [{c: _jsonable(v) for c, v in zip(result.columns, row, strict=True)} for row in result.rows]
    if fmt == "json":
        return json.dumps(objects, default=str, indent=1) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(o, default=str) + "\n" for o in objects)
    cells = [[_cell(v) for v in row] for row in result.rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(result.columns)]
    numeric = [
        all(isinstance(r[i], int | float | Decimal) or r[i] is None for r in result.rows)
        for i in range(len(result.columns))
    ]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [line(result.columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    out.append(
        f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''}"
        + (", truncated: raise --max-rows to see more)" if result.truncated else ")")
    )
    return "\n".join(out) + "\n"
