"""The store is encrypted at rest and cannot be opened without its key (CoP 27b-c)."""

from pathlib import Path

import duckdb
import pytest

from safehaven.core.home import Home
from safehaven.core.store import (
    ZONES,
    MemoryLimitInvalid,
    Store,
    StoreError,
    StoreOutOfMemory,
    table_columns,
    table_exists,
)
from tests.conftest import scan_for

SEEDED = "9990001236"


def _fill(store: Store) -> None:
    with store.connect() as con:
        con.execute(f"CREATE TABLE landing.t AS SELECT '{SEEDED}' AS nhs_number FROM range(5000)")


def test_zones_exist(store: Store) -> None:
    with store.connect() as con:
        schemas = {
            r[0]
            for r in con.execute(
                "SELECT schema_name FROM information_schema.schemata WHERE catalog_name = 'store'"
            ).fetchall()
        }
    assert set(ZONES) <= schemas


def test_table_exists_sees_tables_and_views_of_the_store_only(store: Store) -> None:
    """One catalog lookup (tables, then views) answers as information_schema.tables did."""
    with store.connect() as con:
        con.execute("CREATE TABLE landing.t (a INT)")
        con.execute("CREATE VIEW landing.v AS SELECT a FROM landing.t")
        con.execute("CREATE TEMP TABLE only_temp (a INT)")
        assert table_exists(con, "landing", "t") and table_exists(con, "landing", "v")
        assert not table_exists(con, "landing", "missing") and not table_exists(con, "haven", "t")
        assert not table_exists(con, "main", "only_temp")  # a temporary table is not the store's


def test_a_table_found_without_a_statement_answers_as_its_catalog_entry(store: Store, tmp_path: Path) -> None:
    """On a ``Store.connect`` connection a table is found through the relation API
    (``store._table``), anything else through its catalog entry (``store._entry``): the two agree
    on every kind of name; no view's query is bound (a view over a file now gone still exists,
    and a lookup of it leaves the caller's transaction whole); neither is fooled by a temporary
    table or by another database named as the schema."""
    from safehaven.core import store as store_module

    csv = tmp_path / "gone.csv"
    csv.write_text("a\n1\n")
    with store.connect() as con:
        con.execute("CREATE TABLE landing.t (a INT, b VARCHAR)")
        con.execute("CREATE VIEW landing.v AS SELECT a AS x, b FROM landing.t")
        con.execute("CREATE VIEW landing.twice AS SELECT * FROM landing.t l, landing.t r")
        con.execute("CREATE TABLE landing.gone (a INT)")
        con.execute("CREATE VIEW landing.stale AS SELECT * FROM landing.gone")
        con.execute("DROP TABLE landing.gone")
        con.execute(f"CREATE VIEW landing.file AS SELECT * FROM read_csv('{csv}')")
        csv.unlink()
        con.execute("CREATE TEMP TABLE only_temp (a INT)")
        con.execute("ATTACH ':memory:' AS elsewhere")
        con.execute("CREATE TABLE elsewhere.main.t (z INT)")
        cases = {
            ("landing", "t"): ["a", "b"],
            ("landing", "v"): ["x", "b"],
            ("landing", "twice"): ["a", "b", "a", "b"],
            ("landing", "stale"): ["a"],
            ("landing", "file"): ["a"],
            ("landing", "missing"): [],
            ("main", "only_temp"): [],
            ("elsewhere", "t"): [],
        }
        for (schema_name, table), columns in cases.items():
            assert store_module._entry(con, schema_name, table) == columns, (schema_name, table)
            assert table_columns(con, schema_name, table) == columns, (schema_name, table)
            assert table_exists(con, schema_name, table) == bool(columns), (schema_name, table)
        # a table is found with no statement; a view, or another connection, is left to the entry
        assert store_module._table(con, "landing", "t") == ["a", "b"]
        assert store_module._table(con, "landing", "v") is None
        con.execute("BEGIN")
        con.execute("INSERT INTO landing.t VALUES (1, 'kept')")
        assert not table_exists(con, "landing", "missing") and table_exists(con, "landing", "file")
        con.execute("COMMIT")
        assert con.execute("SELECT b FROM landing.t").fetchall() == [("kept",)]
    with duckdb.connect() as plain:  # another connection, with a database of the store's name beside its own
        plain.execute("CREATE TABLE t (a INT)")
        plain.execute("ATTACH ':memory:' AS store")
        plain.execute("CREATE TABLE store.main.t (q INT)")
        assert store_module._table(plain, "main", "t") is None and table_columns(plain, "main", "t") == ["a"]


def _layout(con: duckdb.DuckDBPyConnection, table: str) -> tuple[int, int]:
    """(row groups of ``table``, blocks the store's file uses)."""
    groups = con.execute(f"SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('{table}')").fetchone()[0]
    used = con.execute(
        "SELECT used_blocks FROM pragma_database_size() WHERE database_name = current_database()"
    ).fetchone()[0]
    return int(groups), int(used)


def test_a_checkpoint_keeps_the_row_groups_inserts_wrote_and_frees_those_wholly_deleted(store: Store) -> None:
    """``store.MAX_VACUUM_TASKS`` (issue 22): DuckDB merges no part-filled row groups at the store's
    checkpoints, so a large insert is not read and written a second time; a row group whose rows
    are all deleted is still given back to the file. (With DuckDB's default the six part-filled
    row groups below are merged into three.)"""
    with store.connect() as con:
        con.execute("CREATE TABLE landing.appended (id BIGINT, v VARCHAR)")
    for start in range(0, 300_000, 50_000):  # six connections: six row groups of 50,000 rows
        with store.connect() as con:
            con.execute(
                "INSERT INTO landing.appended SELECT range, md5(range::VARCHAR) FROM range(?, ?)",
                [start, start + 50_000],
            )
    with store.connect() as con:
        con.execute("CHECKPOINT")
        groups, used = _layout(con, "landing.appended")
        assert groups == 6
        con.execute("DELETE FROM landing.appended WHERE id < 150000")  # the first three, whole
        con.execute("CHECKPOINT")
        left, used_after = _layout(con, "landing.appended")
        assert left == 3 and used_after < used
        assert con.execute("SELECT count(*), min(id) FROM landing.appended").fetchone() == (150_000, 150_000)


def test_store_file_holds_no_plain_identifier(store: Store, home: Home) -> None:
    _fill(store)
    assert scan_for(home.root, [SEEDED.encode()]) == {}
    with store.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM landing.t").fetchone()[0] == 5000


def test_store_cannot_be_opened_without_key(store: Store, home: Home) -> None:
    _fill(store)
    with pytest.raises(duckdb.Error):
        duckdb.connect(str(home.store_file))


def test_store_cannot_be_opened_with_wrong_key(store: Store, home: Home) -> None:
    _fill(store)
    ring = store.keyring
    real = ring.get("store")
    ring.write("store", bytes(32), replace=True)
    with pytest.raises(StoreError, match="cannot open") as err:
        with store.connect():
            pass
    assert real.hex not in str(err.value) and bytes(32).hex() not in str(err.value)


def _memory_limit(store: Store) -> str:
    with store.connect() as con:
        return str(con.execute("SELECT current_setting('memory_limit')").fetchone()[0])


def test_a_memory_limit_given_bounds_every_connection_before_the_homes_and_the_default(home: Home) -> None:
    """``Store(memory_limit=...)`` (the haven resource's ``memory_limit``) reaches DuckDB on each
    connection, pooled or not; else the home's (``$SAFEHAVEN_MEMORY_LIMIT``); else the haven's default."""
    limited = Store(home, memory_limit="1536MiB")
    for _ in range(2):  # a fresh instance, then one from the pool
        assert _memory_limit(limited) == "1.5 GiB"
    configured = Home(home.root, memory_limit="1280MiB")
    assert _memory_limit(Store(configured)) == "1.2 GiB"
    assert _memory_limit(Store(configured, memory_limit="1536MiB")) == "1.5 GiB"


def test_unset_the_store_holds_duckdb_to_a_quarter_of_the_machine_at_least_a_gib_never_above_duckdbs_own(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 22: under DuckDB's own limit (80% of the memory the process may use) a night's peak grew
    with the history it read. Unset, the limit is ``MEMORY_SHARE`` (a quarter) of that memory, at
    least ``MEMORY_FLOOR`` (1 GiB), never above DuckDB's own default."""
    from safehaven.core import store as store_module

    def limit_with(own: int | None) -> str | None:
        monkeypatch.setattr(store_module, "_duckdbs_own_limit", lambda: own)
        return store_module.default_memory_limit()

    assert limit_with(int(0.8 * 32 * 2**30)) == f"{8 * 2**30}B"  # a 32 GiB machine: 8 GiB
    assert limit_with(int(0.8 * 2 * 2**30)) == f"{2**30}B"  # a 2 GiB machine: the floor
    assert limit_with(700 * 2**20) == f"{700 * 2**20}B"  # less than a GiB to give: DuckDB's own
    assert limit_with(None) is None  # DuckDB's own default unreadable: left to DuckDB
    limit_with(int(0.8 * 16 * 2**30))
    assert _memory_limit(Store(home)) == "4.0 GiB"  # and the store's connections get it


def test_work_past_the_limit_that_cannot_spill_is_refused_naming_the_limit_and_how_to_raise_it(home: Home) -> None:
    """DuckDB spills sorts, joins and aggregates past the limit; what it cannot spill fails the
    statement, and the error says which limit and where to raise it, with DuckDB's own words. It
    stays a DuckDB out-of-memory error, so code handling DuckDB's errors handles it as before."""
    with pytest.raises(StoreOutOfMemory) as err, Store(home, memory_limit="32MB").connect() as con:
        con.execute("CREATE TEMP TABLE t AS SELECT list(i) AS l FROM range(20000000) AS r(i)")  # one list: no spill
    message = str(err.value)
    assert "memory limit of 30.5 MiB" in message and "DuckDB said: Out of Memory Error" in message
    assert "resources.haven.config.memory_limit" in message and "$SAFEHAVEN_MEMORY_LIMIT" in message
    assert isinstance(err.value, duckdb.OutOfMemoryException)


def test_a_store_opened_inside_another_reports_its_own_limit_once(home: Home, tmp_path: Path) -> None:
    """The inner connection's error passes through the outer one as it is (found by review: it was
    wrapped again, naming the outer limit first)."""
    other = Home(tmp_path / "other").ensure()
    with pytest.raises(StoreOutOfMemory) as err, Store(other, memory_limit="2GB").connect():
        with Store(home, memory_limit="32MB").connect() as inner:
            inner.execute("CREATE TEMP TABLE t AS SELECT list(i) AS l FROM range(20000000) AS r(i)")
    assert str(err.value).count("memory limit of") == 1 and "memory limit of 30.5 MiB" in str(err.value)


def test_spill_space_running_out_is_told_apart_from_memory(home: Home) -> None:
    """When the disk under ``store/tmp`` fills (DuckDB's ``max_temp_directory_size``), the error says
    so and names the folder, rather than asking only for more memory (found by review)."""
    with pytest.raises(StoreOutOfMemory) as err, Store(home, memory_limit="64MB").connect() as con:
        con.execute("SET max_temp_directory_size = '8MB'")  # stands for a full disk
        con.execute("SELECT i, md5(CAST(i AS VARCHAR)) AS h FROM range(5000000) AS r(i) ORDER BY h").fetchall()
    message = str(err.value)
    assert message.startswith("DuckDB ran out of room to spill the store's work to ")
    assert str(home.store_dir / "tmp") in message and "free space on the disk" in message


def test_threads_given_reach_duckdb_and_unset_follow_the_stores_default(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Store(threads=n)`` (the haven resource's ``threads``) reaches DuckDB on each connection;
    unset, ``store.DEFAULT_THREADS`` applies: DuckDB's own default in production (None), one
    thread in this suite (``tests/conftest.py``)."""
    from safehaven.core import store as store_module

    def threads(store: Store) -> int:
        with store.connect() as con:
            return int(con.execute("SELECT current_setting('threads')").fetchone()[0])

    assert threads(Store(home, threads=2)) == 2
    assert store_module.DEFAULT_THREADS == 1 and threads(Store(home)) == 1
    monkeypatch.setattr(store_module, "DEFAULT_THREADS", None)
    duckdbs_own = int(duckdb.connect().execute("SELECT current_setting('threads')").fetchone()[0])
    assert threads(Store(home)) == duckdbs_own


def test_a_memory_limit_duckdb_cannot_read_refuses_the_connection_naming_it(home: Home) -> None:
    """A mistyped limit is not ignored: no connection opens, and the refusal names the value and
    where it is set (the run or the command fails, saying why)."""
    with pytest.raises(MemoryLimitInvalid) as err, Store(home, memory_limit="4 gigs").connect():
        pass
    assert "'4 gigs' is not a size DuckDB reads" in str(err.value) and "$SAFEHAVEN_MEMORY_LIMIT" in str(err.value)


def test_the_memory_limit_from_the_environment_reaches_the_commands_and_the_pipelines_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``$SAFEHAVEN_MEMORY_LIMIT`` is read at the edges only: the command line's home
    (``home_from_env``) and the code location's resource (``from_environment``) carry it to
    every store they open; the domain reads no environment."""
    from assets.runner import haven_run_config
    from resources.haven import SafeHavenResource
    from safehaven.cli.common import MEMORY_LIMIT_ENV, home_from_env

    monkeypatch.setenv("SAFEHAVEN_HOME", str(tmp_path / "haven"))
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1280MiB")
    assert _memory_limit(Store(home_from_env().ensure())) == "1.2 GiB"
    assert _memory_limit(SafeHavenResource.from_environment().store()) == "1.2 GiB"
    # `safehaven run` names it in the run's configuration, as it does the home, for a code location started elsewhere
    assert haven_run_config(home_from_env())["resources"]["haven"]["config"]["memory_limit"] == "1280MiB"  # type: ignore[index]
    # the code location's steps open the store through the resource's context as well
    assert _memory_limit(SafeHavenResource.from_environment().context().store()) == "1.2 GiB"
    monkeypatch.setenv(MEMORY_LIMIT_ENV, " ")
    assert home_from_env().memory_limit is None and SafeHavenResource.from_environment().memory_limit == ""


def test_work_past_the_limit_inside_a_transaction_still_names_the_limit(home: Home) -> None:
    """Out of memory inside a transaction leaves it aborted, so DuckDB cannot be asked its limit: the
    message names the limit the store was given (found by review: it named none)."""
    with pytest.raises(StoreOutOfMemory) as err, Store(home, memory_limit="32MB").connect() as con:
        con.execute("BEGIN TRANSACTION")
        con.execute("CREATE TEMP TABLE t AS SELECT list(i) AS l FROM range(20000000) AS r(i)")
    assert "memory limit of 30.5 MiB" in str(err.value) or "memory limit of 32MB" in str(err.value)
