"""The haven's tables rewritten whole when appends have left them in many more row groups than
their rows need.

DuckDB 1.4.4 gives the first append to a table after the database is attached a row group of
its own (duckdb/duckdb#18829: a checkpoint then need not rewrite the last one), and cuts a large
insert into row groups where its parallel batches end. At a checkpoint it could merge adjacent
part-filled row groups again, but the store turns those merges off (``store.MAX_VACUUM_TASKS``,
issue 22: they read, decompressed and wrote again every large insert), and for a table with a
primary key it never merged them (duckdb/duckdb#21316, fixed in DuckDB 1.4.5 and 1.5; the haven
cannot take those: writing an encrypted store needs the ``httpfs`` extension, and the package
index has it for 1.4.4 only, ``safehaven.core.store``).

The store is attached for each unit of work, so each small table (the audit log, the batch
register, the seals, the vault's batches, ...) gained a row group, in a block of its own, for
every connection that appended to it, and a first read of such a table on a connection reads
and decrypts every one of those blocks. Measured on a home after four nights of 30,000
patients: the audit log held 180 entries in 115 row groups and the first read of it on each
connection took 27 ms instead of 1 ms; rewriting the 22 tables with a primary key took a run
with nothing to do from 6.6 to 4.7-5.3 s. The haven's fixed cost grew night over night with it
(issue 22), and so would its file.

So each run, once its audit trail has verified (``resources.haven``; a collection's intake runs,
one per drop, leave it to the night's run: ``resources.haven.COMPACTION_TAG``), rewrites every table of
its own whose row groups exceed what its rows need by more than :data:`SLACK` and by more than
it needs (:func:`over`): a small table past ``SLACK``, a large one past twice its need, which a
night's landing never leaves it in (103 row groups for 56 needed, the largest measured), so a
large table is rewritten only once it holds many small appends. A storage change, not a
safeguard, and the rows are the same rows in the same order. Its own tables are those declared
in ``safehaven.core.schema`` and those its contracts make (``also``: a collection's landing,
valid, rejected and haven tables, ``resources.haven``). A table someone else made is not the
haven's to rewrite (found by review: one whose name held a dot stopped every run at its start).

* The table is rewritten from its own SQL in the catalog (``duckdb_tables().sql``: its
  columns, types, defaults and constraints as they are), with its comments, in a transaction of
  its own: all or nothing. The catalog's SQL does not carry a column's declared compression, so
  a declared table that sets one (``schema.RANDOM_BYTES``: the vault's nonces and ciphertexts) is
  made again from its declaration (:func:`remake_as_declared`, the vault's own copy of an older
  vault too) instead, and marked as declared (:data:`RANDOM_BYTES_MARK`), so the vault does not
  copy it once more (found by review), unless it carried a comment of its own, which is kept;
  one whose columns are no longer the declaration's is refused by the copy and stays as it was.
* The old table is moved aside under a name of its own (a random suffix) and dropped in the
  same transaction (:func:`replace_table`), so a rewrite leaves nothing behind and no other
  table stands in its way.
* It is never run inside a caller's transaction (refused): a ``BEGIN`` there would abort the
  caller's work, which its ``COMMIT`` would then drop without a word (found by review).
* A rewrite DuckDB refuses is rolled back and named with the kind of error (:class:`Compaction`;
  DuckDB's text may quote a row's values, so it is not kept); the run goes on, and the table's
  own checks decide as before.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import duckdb

from safehaven.core import schema
from safehaven.core.sql import lit, q
from safehaven.core.store import in_transaction, transaction

#: rows DuckDB puts in a row group (its default ``ROW_GROUP_SIZE``)
ROW_GROUP_ROWS = 122_880
#: row groups a table may have beyond what its rows need before it is rewritten, at the least: a
#: night adds about one to each table per store connection that appends to it (:func:`over`)
SLACK = 8
#: the comment a table with ``schema.RANDOM_BYTES`` columns carries once they are as declared (DuckDB
#: shows a column's declared compression nowhere): set by the vault when it copies its table into
#: the declared shape (``safehaven.protect.vault._random_bytes_as_declared``) and here when a rewrite
#: makes such a table again from its declaration (:func:`_rewrite`)
RANDOM_BYTES_MARK = "nonce and ciphertext stored uncompressed (safehaven.core.schema.RANDOM_BYTES)"
#: what a table's declaration says when it sets a column's compression (made again from it: :func:`_rewrite`)
_COMPRESSION = "USING COMPRESSION"


@dataclass
class Compaction:
    """What one pass did: the tables rewritten, and those DuckDB refused to rewrite (with why)."""

    rewritten: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    #: wall seconds the pass spent rewriting (the run's log says it: a large table takes seconds)
    seconds: float = field(default=0.0, compare=False)


def compact(con: duckdb.DuckDBPyConnection, also: Iterable[str] = ()) -> Compaction:
    """Rewrite each table of the database in use that :func:`fragmented` names (module docstring;
    ``also``: the contracts' tables), each in a transaction of its own; refused (``ValueError``)
    inside a transaction of the caller's."""
    if in_transaction(con):
        raise ValueError("the store's tables are rewritten outside any transaction: commit or roll back first")
    done = Compaction()
    began = time.perf_counter()
    for table in fragmented(con, also):
        try:
            with transaction(con):
                _rewrite(con, table)
        except duckdb.Error as exc:  # its kind only: DuckDB's text may quote a row's values
            done.refused[table] = f"DuckDB refused it ({type(exc).__name__}); the table is as it was"
        else:
            done.rewritten.append(table)
    done.seconds = time.perf_counter() - began
    return done


def over(groups: int, rows: int) -> bool:
    """Whether ``groups`` row groups holding ``rows`` rows are past the limit (module docstring):
    more than the rows need by more than :data:`SLACK` and by more than they need."""
    needed = _needed(rows)
    return groups > needed + max(SLACK, needed)


def fragmented(con: duckdb.DuckDBPyConnection, also: Iterable[str] = ()) -> list[str]:
    """The haven's tables (``zone.name``: declared in ``safehaven.core.schema``, or named in ``also``)
    in the database in use whose row groups are :func:`over` the limit. Two statements."""
    ours = {name for name, table in schema.TABLES.items() if not table.is_view} | set(also)
    tables = [
        f"{zone}.{name}"
        for zone, name in con.execute(
            "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "AND NOT temporary ORDER BY ALL"
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
    return [t for t, groups, rows in con.execute(counted).fetchall() if over(groups, rows)]


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


def remake_as_declared(con: duckdb.DuckDBPyConnection, table: str) -> None:
    """Replace the declared ``table`` by one made from its declaration (``schema.ensure``: a declared
    column compression kept) holding its rows, in the caller's transaction; one with random-byte
    columns (``schema.RANDOM_BYTES``) is marked so (:data:`RANDOM_BYTES_MARK`). The one place a table
    is remade as declared (a rewrite here; ``safehaven.protect.vault``'s copy of an older vault)."""
    replace_table(con, table, lambda: schema.ensure(con, table))
    if schema.RANDOM_BYTES in schema.TABLES[table].ddl:
        con.execute(f"COMMENT ON TABLE {_quoted(table)} IS {lit(RANDOM_BYTES_MARK)}")


def _needed(rows: int) -> int:
    return max(1, math.ceil(rows / ROW_GROUP_ROWS))


def _quoted(table: str) -> str:
    zone, name = table.split(".")
    return f"{q(zone)}.{q(name)}"


def _rewrite(con: duckdb.DuckDBPyConnection, table: str) -> None:
    """Replace ``table`` by a new table made by its own SQL (a declared compression: by its
    declaration) holding its rows in order, with its comments."""
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
    declared = schema.TABLES.get(table)
    if declared is not None and _COMPRESSION in declared.ddl:  # the catalog's SQL would drop it (module docstring)
        remake_as_declared(con, table)  # marked; a comment the table had is put back below
    else:
        replace_table(con, table, lambda: con.execute(sql))
    if comment is not None:
        con.execute(f"COMMENT ON TABLE {_quoted(table)} IS {lit(comment)}")
    for column, text in noted:
        con.execute(f"COMMENT ON COLUMN {_quoted(table)}.{q(column)} IS {lit(text)}")
