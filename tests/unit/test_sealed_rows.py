"""A seal's digest, part by part (``safehaven.core.digests.sealed_rows``): the digests of the one
statement (``sealed_rows_sql``), holding one part's text at a time rather than every row's."""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safehaven.core import digests

_ROW = st.tuples(
    st.sampled_from(["b1", "b2", "b3", None]),
    st.one_of(st.none(), st.integers(-3, 9)),
    st.text(max_size=6),
    st.one_of(st.none(), st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1))),
)


@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(_ROW, max_size=25),
    part_rows=st.integers(1, 5),
    statement_rows=st.integers(1, 12),
    grouped=st.booleans(),
    ordered=st.booleans(),
)
def test_part_by_part_digests_are_the_one_statements_whatever_the_rows(
    rows: list[tuple[str | None, int | None, str, datetime | None]],
    part_rows: int,
    statement_rows: int,
    grouped: bool,
    ordered: bool,
) -> None:
    """Whatever the rows (NULL groups and order values, ties, Unicode text, timestamps) and however
    many rows a part holds, every group's row count and digest are those of ``sealed_rows_sql``:
    a seal recorded by either is checked by the other (found by review: the one statement held
    every row's JSON text at once, which DuckDB cannot spill)."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("CREATE TABLE r (_batch VARCHAR, _row INTEGER, text VARCHAR, seen_at TIMESTAMPTZ)")
    con.executemany(
        "INSERT INTO r VALUES (?, ?, ?, ?)",
        [(b, o, t, a.replace(tzinfo=UTC) if a else None) for b, o, t, a in rows],
    ) if rows else None
    group = "t._batch" if grouped else "NULL"
    order = "t._row" if ordered else "t.text"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(digests, "SEAL_PART_ROWS", part_rows)
        mp.setattr(digests, "SEAL_STATEMENT_ROWS", statement_rows)
        whole = con.execute(digests.sealed_rows_sql(con, "r", order, group=group)).fetchall()
        parted = digests.sealed_rows(con, "r", order, group=group)
    assert sorted(parted, key=str) == sorted(((g, int(n), str(d)) for g, n, d in whole), key=str)
    assert not con.execute(
        "SELECT * FROM duckdb_tables() WHERE table_name IN ('_seal_n', '_seal_parts', '_seal_p')"
    ).fetchall()


def test_a_where_clause_seals_only_its_rows_and_an_empty_relation_has_no_seal() -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE r AS SELECT 'b' || (i % 3) AS _batch, i AS _row FROM range(10) AS x(i)")
    where = "WHERE t._batch <> 'b0'"
    whole = con.execute(digests.sealed_rows_sql(con, "r", "t._row", group="t._batch", where=where)).fetchall()
    assert sorted(digests.sealed_rows(con, "r", "t._row", group="t._batch", where=where)) == sorted(whole)
    assert {g for g, _, _ in whole} == {"b1", "b2"}
    assert digests.sealed_rows(con, "r", "t._row", where="WHERE false") == []


def test_a_seal_that_fails_part_way_leaves_no_copy_of_the_rows_behind() -> None:
    """``_seal_n`` holds every sealed row's text: a seal stopped by an error drops it with the other
    working tables, and the next seal on the connection is whole (found by review)."""
    con = duckdb.connect()
    con.execute("CREATE TABLE r AS SELECT 'b' || (i % 3) AS _batch, i AS _row FROM range(10) AS x(i)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(digests, "SEAL_PART_ROWS", 2)
        mp.setattr(digests, "SEAL_STATEMENT_ROWS", 2)
        mp.setattr(digests, "_SEALS", "SELECT no_such_column FROM _p")
        with pytest.raises(duckdb.BinderException):
            digests.sealed_rows(con, "r", "t._row", group="t._batch")
        assert not con.execute("SELECT * FROM duckdb_tables() WHERE table_name LIKE '\\_seal%' ESCAPE '\\'").fetchall()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(digests, "SEAL_PART_ROWS", 2)
        mp.setattr(digests, "SEAL_STATEMENT_ROWS", 2)
        whole = con.execute(digests.sealed_rows_sql(con, "r", "t._row", group="t._batch")).fetchall()
        assert sorted(digests.sealed_rows(con, "r", "t._row", group="t._batch")) == sorted(whole)


class _Recording:
    """A connection that records the SQL of each statement it runs, and runs ``after_first`` (on
    the connection) once its first statement has run."""

    def __init__(self, con: duckdb.DuckDBPyConnection, after_first: str = "") -> None:
        self.con, self.statements, self.after_first = con, [], after_first

    def execute(self, sql: str, *args: object) -> duckdb.DuckDBPyConnection:
        self.statements.append(sql)
        result = self.con.execute(sql, *args)
        if len(self.statements) == 1 and self.after_first:
            rows = result.fetchall()
            self.con.execute(self.after_first)
            return _Fetched(rows)  # type: ignore[return-value]
        return result


class _Fetched:
    def __init__(self, rows: list) -> None:
        self.rows = rows

    def fetchone(self) -> tuple:
        return self.rows[0]


def test_no_more_rows_than_a_part_are_sealed_without_numbering_them() -> None:
    """At most a part's rows: every group is in part 0, and the digests are those of the numbered
    statement, computed without numbering the rows (a sort of their text); more rows than a part
    are numbered."""
    con = duckdb.connect()
    con.execute("CREATE TABLE r AS SELECT 'b' || (i % 3) AS _batch, i AS _row, 'é' || i AS v FROM range(12) AS x(i)")
    recording = _Recording(con)
    numbered = sorted(con.execute(digests.sealed_rows_sql(con, "r", "t._row", group="t._batch")).fetchall())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(digests, "SEAL_PART_ROWS", 12)
        assert sorted(digests.sealed_rows(recording, "r", "t._row", group="t._batch")) == numbered  # type: ignore[arg-type]
        assert not any("row_number" in sql for sql in recording.statements)
        mp.setattr(digests, "SEAL_PART_ROWS", 11)
        assert sorted(digests.sealed_rows(recording, "r", "t._row", group="t._batch")) == numbered  # type: ignore[arg-type]
        assert "row_number" in recording.statements[-1]


def test_a_group_grown_past_a_part_since_it_was_counted_is_sealed_part_by_part() -> None:
    """Rows added between the count and the digest (found by review): a group now holding more
    rows than a part is not digested as one part; the seal is the numbered statement's over the
    rows as they now are."""
    con = duckdb.connect()
    con.execute("CREATE TABLE r AS SELECT 'b' AS _batch, i AS _row FROM range(4) AS x(i)")
    recording = _Recording(con, after_first="INSERT INTO r VALUES ('b', 4), ('b', 5)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(digests, "SEAL_PART_ROWS", 4)
        sealed = digests.sealed_rows(recording, "r", "t._row", group="t._batch")  # type: ignore[arg-type]
        assert sealed == [
            (g, int(n), str(d))
            for g, n, d in con.execute(digests.sealed_rows_sql(con, "r", "t._row", group="t._batch")).fetchall()
        ]
    assert sealed[0][1] == 6
