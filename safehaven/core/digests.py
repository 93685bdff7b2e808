"""Digests that tell whether work is needed: of the code, of a table's rows, of a value; and
the one digest a seal stands on (:func:`sealed_rows_sql`).

Used where a stage may skip work whose inputs did not change (``safehaven.publish.reuse``,
``safehaven.share.release_inputs``). Those detect change; they are not seals against a forger.
:func:`sealed_rows_sql` is: SHA-256 over an ordered, typed serialisation of every row, which
no crafted edit can match (a sum of 64-bit row hashes can be matched by choosing one column's
value: DuckDB's ``hash`` is not keyed and can be inverted).
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

import duckdb

from safehaven.core.sql import q
from safehaven.core.store import table_exists

#: The package whose code decides every result: a change of any module redoes everything.
PACKAGE = Path(__file__).resolve().parents[1]


@cache
def code_sha() -> str:
    """SHA-256 over the source of every module of the ``safehaven`` package (read once a process)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def table_sha(con: duckdb.DuckDBPyConnection, table: str) -> str:
    """A digest of a table's rows as a multiset: its row count and the sum of a hash of each whole row.

    Order-independent and computed in one DuckDB pass; not a cryptographic commitment (it
    detects change, it is not a seal against a forger: the audit trail is that).
    """
    schema, name = table.split(".", 1)
    if not table_exists(con, schema, name.strip('"')):
        return "absent"
    n, total = con.execute(f"SELECT count(*), coalesce(sum(hash(t)::HUGEINT), 0) FROM {table} AS t").fetchone()
    return f"{n}:{total}"


def sha_of(value: Any) -> str:
    """SHA-256 of a JSON-able value (keys sorted; dates and other values as text)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


#: rows per part of a sealed digest: each part's rows are joined and hashed on their own, so a
#: large table is never held as one string
SEAL_PART_ROWS = 100_000


def _row_json(con: duckdb.DuckDBPyConnection, relation: str) -> str:
    """SQL of the JSON text of a row ``t`` of ``relation``: every column by name, timestamps as
    epoch microseconds (their text would depend on the session's time zone)."""
    columns = con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()
    fields = [
        f"{q(name)} := " + (f"epoch_us(t.{q(name)})" if str(kind).startswith("TIMESTAMP") else f"t.{q(name)}")
        for name, kind, *_ in columns
    ]
    return f"to_json(struct_pack({', '.join(fields)}))::VARCHAR"


def sealed_rows_sql(
    con: duckdb.DuckDBPyConnection, relation: str, order: str, *, group: str = "NULL", where: str = ""
) -> str:
    """SQL of ``(group value, row count, digest)`` for each ``group`` of ``relation``'s rows ``t``:
    SHA-256 over its parts' SHA-256s in order, each part (``SEAL_PART_ROWS`` rows) over its rows'
    JSON text (:func:`_row_json`) in ``order`` and then by the text itself. Any change to a row,
    its order column included, changes it; collision resistant (a seal's digest:
    ``safehaven.protect.register_seal``, ``safehaven.intake.batch_seal``, a release request's members).

    One statement: it holds every row's text at once (DuckDB cannot spill text being joined), so
    a seal over a whole history uses :func:`sealed_rows`, which gives the same digests."""
    return f"WITH {_parts_sql(con, relation, order, group, where)}, _p AS ({_PART_DIGESTS}) {_SEALS}"


#: the order of a part's rows (:func:`sealed_rows_sql`)
_ORDERED = "ORDER BY _o NULLS FIRST, _j"
#: SQL of each part's (group, part, rows, digest) over ``_n`` (:func:`sealed_rows_sql`)
_PART_DIGESTS = (
    f"SELECT _g, _part, count(*) AS _n, sha256(string_agg(_j, chr(10) {_ORDERED})) AS _h FROM _n GROUP BY _g, _part"
)
#: SQL of each group's (group, rows, digest) over its parts' digests ``_p``
_SEALS = (
    "SELECT _g, sum(_n)::BIGINT, sha256(string_agg(coalesce(_part::VARCHAR, '-') || ':' || _h, chr(10) "
    "ORDER BY _part NULLS FIRST)) FROM _p GROUP BY _g"
)


def _rows_sql(con: duckdb.DuckDBPyConnection, relation: str, order: str, group: str, where: str) -> str:
    """The common table expression ``_r``: each row's group, order and JSON text."""
    return f"_r AS (SELECT {group} AS _g, {order} AS _o, {_row_json(con, relation)} AS _j FROM {relation} t {where})"


def _parts_sql(con: duckdb.DuckDBPyConnection, relation: str, order: str, group: str, where: str) -> str:
    """The common table expressions ``_r`` and ``_n``: each row's group, order, JSON text and part."""
    return (
        f"{_rows_sql(con, relation, order, group, where)}, "
        f"_n AS (SELECT *, (row_number() OVER (PARTITION BY _g {_ORDERED}) - 1) // {SEAL_PART_ROWS} AS _part FROM _r)"
    )


#: rows whose text one statement of :func:`sealed_rows` joins at most (whole parts; a part is
#: never split): few statements for a history, and memory held to about 200 MB of text
SEAL_STATEMENT_ROWS = 1_000_000


def sealed_rows(
    con: duckdb.DuckDBPyConnection, relation: str, order: str, *, group: str = "NULL", where: str = ""
) -> list[tuple[Any, int, str]]:
    """The rows :func:`sealed_rows_sql` gives (group value, row count, digest), with the parts'
    text joined ``SEAL_STATEMENT_ROWS`` rows at a time, so memory holds that much text, not every
    row's (found by review: a seal over 3M rows failed under a 300 MB limit). The rows are laid
    out once, sorted by group and part, in a temporary table DuckDB can spill; the digests are the
    same. No more rows than one statement joins: that one statement (fewer statements per seal),
    and no more than a part's: :func:`_one_part_each`.
    """
    rows = con.execute(f"SELECT count(*) FROM {relation} t {where}").fetchone()[0]  # type: ignore[index]
    if rows <= SEAL_PART_ROWS:
        sealed = _one_part_each(con, relation, order, group, where)
        if sealed is not None:
            return sealed
    if rows <= SEAL_STATEMENT_ROWS:
        found = con.execute(sealed_rows_sql(con, relation, order, group=group, where=where)).fetchall()
        return [(g, int(n), str(d)) for g, n, d in found]
    try:
        _seal_in_chunks(con, relation, order, group, where)
        found = con.execute(f"WITH _p AS (SELECT * FROM _seal_p) {_SEALS}").fetchall()
    finally:
        _drop_seal_tables(con)
    return [(g, int(n), str(d)) for g, n, d in found]


def _one_part_each(
    con: duckdb.DuckDBPyConnection, relation: str, order: str, group: str, where: str
) -> list[tuple[Any, int, str]] | None:
    """The rows of :func:`sealed_rows_sql` for at most ``SEAL_PART_ROWS`` rows (:func:`sealed_rows`
    counted them): every group is its one part, ``0``, so its digest is SHA-256 over ``0:`` and the
    hex SHA-256 of its rows' text in order (``_SEALS`` over ``_PART_DIGESTS``). The rows are not
    numbered (a sort of their text), and the SHA-256s are Python's ``hashlib`` (OpenSSL: about 1.6
    times DuckDB's ``sha256`` here), the text of at most a part's rows fetched (a few tens of MB): a
    seal of the register of six nights at 30,000 patients (24,000 events) 55 -> 33 ms here, of its
    six objections batches 30 -> 17 ms. None when a group holds more rows than a part after all
    (rows added since they were counted, or a ``where`` that is not the same twice): the caller
    seals them part by part, so the digest is always the one :func:`sealed_rows_sql` gives (found
    by review)."""
    found = con.execute(
        f"WITH {_rows_sql(con, relation, order, group, where)} "
        f"SELECT _g, count(*), encode(string_agg(_j, chr(10) {_ORDERED})) FROM _r GROUP BY _g"
    ).fetchall()
    if any(n > SEAL_PART_ROWS for _, n, _ in found):
        return None
    return [
        (g, int(n), hashlib.sha256(f"0:{hashlib.sha256(text).hexdigest()}".encode()).hexdigest())
        for g, n, text in found
    ]


def _seal_in_chunks(con: duckdb.DuckDBPyConnection, relation: str, order: str, group: str, where: str) -> None:
    """Temp table ``_seal_p``: each part's (group, part, rows, digest) as ``_PART_DIGESTS`` makes it,
    ``SEAL_STATEMENT_ROWS`` rows of parts at a time (whole parts: a part is never split)."""
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _seal_n AS WITH {_parts_sql(con, relation, order, group, where)} "
        "SELECT * FROM _n ORDER BY _g NULLS FIRST, _part"
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _seal_parts AS SELECT _g, _part, (sum(_rows) OVER (ORDER BY _g NULLS FIRST, "
        f"_part ROWS UNBOUNDED PRECEDING) - 1) // {SEAL_STATEMENT_ROWS} AS _chunk "
        "FROM (SELECT _g, _part, count(*) AS _rows FROM _seal_n GROUP BY _g, _part)"
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _seal_p AS SELECT _g, _part, 0::BIGINT AS _n, ''::VARCHAR AS _h "
        "FROM _seal_n WHERE false"
    )
    chunks = con.execute("SELECT coalesce(max(_chunk), -1) FROM _seal_parts").fetchone()[0]  # type: ignore[index]
    for chunk in range(int(chunks) + 1):
        con.execute(
            "INSERT INTO _seal_p WITH _n AS (SELECT n.* FROM _seal_n n JOIN _seal_parts p "
            f"ON p._g IS NOT DISTINCT FROM n._g AND p._part = n._part WHERE p._chunk = ?) {_PART_DIGESTS}",
            [chunk],
        )


def _drop_seal_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Drop :func:`sealed_rows`' temp tables (``_seal_n`` holds every sealed row's text), best effort:
    in an aborted transaction they go with the connection's reset (``safehaven.core.instances``)."""
    for table in ("_seal_n", "_seal_parts", "_seal_p"):
        try:
            con.execute(f"DROP TABLE IF EXISTS {table}")
        except duckdb.Error:
            return
