"""Tables with a primary key rewritten whole when appends have left them in many row groups.

DuckDB 1.4.4 gives the first append to a table after the database is attached a row group of
its own (duckdb/duckdb#18829: a checkpoint then need not rewrite the last one), and merges
small row groups at a checkpoint only for a table with no index. A table with a primary key
keeps every one (duckdb/duckdb#21316, fixed in DuckDB 1.4.5 and 1.5). The haven cannot take
those: writing an encrypted store needs the ``httpfs`` extension, and the package index has
it for 1.4.4 only (``safehaven.core.store``).

The store is attached for each unit of work, so each governance table with a primary key (the
audit log, the batch register, the seals, ...) gained a row group, in a block of its own, for
every connection that appended to it, and a first read of such a table on a connection reads
and decrypts every one of those blocks. Measured on a home after four nights of 30,000
patients: the audit log held 180 entries in 115 row groups and the first read of it on each
connection took 27 ms instead of 1 ms; rewriting the 22 tables with a primary key took a run
with nothing to do from 6.6 to 4.7-5.3 s. The haven's fixed cost grew night over night with it
(issue 22).

So each run, once its audit trail has verified (``resources.haven``), rewrites every table of
its own (declared in ``safehaven.core.schema``) with an index whose row groups exceed what its
rows need by more than :data:`SLACK`: a storage change, not a safeguard, and the rows are the
same rows in the same order. A table someone else made is not the haven's to rewrite (found by
review: one whose name held a dot stopped every run at its start).

* The table is rewritten from its own SQL in the catalog (``duckdb_tables().sql``: its
  columns, types, defaults and constraints as they are, not as ``safehaven.core.schema``
  declares them), with its comments, in a transaction of its own: all or nothing.
* The old table is moved aside under a name of its own (a random suffix) and dropped in the
  same transaction (:func:`replace_table`), so a rewrite leaves nothing behind and no other
  table stands in its way.
* A table whose declaration sets a column's compression is left alone: the catalog's SQL does
  not carry it (none has an index today).
* It is never run inside a caller's transaction (refused): a ``BEGIN`` there would abort the
  caller's work, which its ``COMMIT`` would then drop without a word (found by review).
* A rewrite DuckDB refuses is rolled back and named with the kind of error (:class:`Compaction`;
  DuckDB's text may quote a row's values, so it is not kept); the run goes on, and the table's
  own checks decide as before.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import duckdb

from safehaven.core import schema
from safehaven.core.sql import lit, q
from safehaven.core.store import in_transaction, transaction

#: rows DuckDB puts in a row group (its default ``ROW_GROUP_SIZE``)
ROW_GROUP_ROWS = 122_880
#: row groups a table may have beyond what its rows need before it is rewritten: a night adds
#: about one to each table per store connection that appends to it
SLACK = 8
#: what a table's declaration says when it sets a column's compression
_COMPRESSION = "USING COMPRESSION"


@dataclass
class Compaction:
    """What one pass did: the tables rewritten, and those DuckDB refused to rewrite (with why)."""

    rewritten: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def compact(con: duckdb.DuckDBPyConnection) -> Compaction:
    """Rewrite each table of the database in use that :func:`fragmented` names (module docstring),
    each in a transaction of its own; refused (``ValueError``) inside a transaction of the caller's."""
    if in_transaction(con):
        raise ValueError("the store's tables are rewritten outside any transaction: commit or roll back first")
    done = Compaction()
    for table in fragmented(con):
        try:
            with transaction(con):
                _rewrite(con, table)
        except duckdb.Error as exc:  # its kind only: DuckDB's text may quote a row's values
            done.refused[table] = f"DuckDB refused it ({type(exc).__name__}); the table is as it was"
        else:
            done.rewritten.append(table)
    return done


def fragmented(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The declared tables (``zone.name``) with an index whose row groups exceed
    ``ceil(rows / ROW_GROUP_ROWS) + SLACK``, but for those whose declaration sets a compression.
    Two statements."""
    ours = {name for name, table in schema.TABLES.items() if not table.is_view and _COMPRESSION not in table.ddl}
    tables = [
        f"{zone}.{name}"
        for zone, name in con.execute(
            "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "AND index_count > 0 AND NOT temporary ORDER BY ALL"
        ).fetchall()
        if f"{zone}.{name}" in ours
    ]
    if not tables:
        return []
    counted = " UNION ALL ".join(
        f"SELECT {lit(t)} AS t, (SELECT count(DISTINCT row_group_id) FROM pragma_storage_info({lit(_quoted(t))})) "
        f"AS g, (SELECT count(*) FROM {_quoted(t)}) AS n"
        for t in tables
    )
    return [t for t, groups, rows in con.execute(counted).fetchall() if groups > _needed(rows) + SLACK]


def replace_table(con: duckdb.DuckDBPyConnection, table: str, create: Callable[[], object]) -> None:
    """Replace ``table`` (``zone.name``) by the one ``create`` makes under its name, holding its rows
    in order, copied by column name; in the caller's transaction. The one place a table is copied
    into a new one (here; ``safehaven.protect.vault``'s columns of random bytes).

    The old table is moved aside under a name of its own (a random suffix) and dropped, so the copy
    leaves nothing behind and no table anyone else left in the zone stands in its way (found by
    review: under a fixed name, one would have stopped every vault write)."""
    zone, name = table.split(".")
    aside = f"{name}_replaced_{secrets.token_hex(8)}"
    con.execute(f"ALTER TABLE {_quoted(table)} RENAME TO {q(aside)}")
    moved = f"{q(zone)}.{q(aside)}"
    create()
    con.execute(f"INSERT INTO {_quoted(table)} BY NAME SELECT * FROM {moved}")
    con.execute(f"DROP TABLE {moved}")


def _needed(rows: int) -> int:
    return max(1, math.ceil(rows / ROW_GROUP_ROWS))


def _quoted(table: str) -> str:
    zone, name = table.split(".")
    return f"{q(zone)}.{q(name)}"


def _rewrite(con: duckdb.DuckDBPyConnection, table: str) -> None:
    """Replace ``table`` by a new table made by its own SQL holding its rows in order, with its comments."""
    zone, name = table.split(".")
    sql, comment = con.execute(
        "SELECT sql, comment FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = ? AND table_name = ?",
        [zone, name],
    ).fetchone()  # type: ignore[misc]
    noted = con.execute(
        "SELECT column_name, comment FROM duckdb_columns() WHERE database_name = current_database() "
        "AND schema_name = ? AND table_name = ? AND comment IS NOT NULL",
        [zone, name],
    ).fetchall()
    replace_table(con, table, lambda: con.execute(sql))
    if comment is not None:
        con.execute(f"COMMENT ON TABLE {_quoted(table)} IS {lit(comment)}")
    for column, text in noted:
        con.execute(f"COMMENT ON COLUMN {_quoted(table)}.{q(column)} IS {lit(text)}")
