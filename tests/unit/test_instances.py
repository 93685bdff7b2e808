"""Store connections reuse loaded DuckDB instances, and nothing of one connection reaches the next
(``safehaven.core.instances``): each connection is as if its instance were new."""

import subprocess
import sys

import duckdb
import pytest

from safehaven.core.home import Home
from safehaven.core.instances import POOL
from safehaven.core.store import Store


def test_a_connection_reuses_an_instance_and_starts_clean(store: Store, home: Home, tmp_path) -> None:
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).close()
    with store.connect() as con:
        first = con.execute("SELECT current_setting('temp_directory')").fetchone()
        con.execute("CREATE TEMP TABLE leftover AS SELECT 1 AS a")
        con.execute(f"ATTACH '{other}' AS extra")
        con.register("frame", duckdb.sql("SELECT 1 AS b").arrow())
    with store.connect() as con:
        assert con.execute("SELECT current_setting('temp_directory')").fetchone() == first
        assert con.execute("SELECT current_database()").fetchone() == ("store",)
        attached = con.execute("SELECT database_name FROM duckdb_databases() WHERE NOT internal").fetchall()
        names = {n for (n,) in attached}
        assert names == {"memory", "store"}
        with pytest.raises(duckdb.CatalogException):
            con.execute("SELECT * FROM leftover")
        with pytest.raises(duckdb.CatalogException):
            con.execute("SELECT * FROM frame")


def test_a_read_only_connection_cannot_write_after_a_writer_used_the_same_instance(store: Store) -> None:
    with store.connect() as con:
        con.execute("CREATE TABLE landing.t AS SELECT 1 AS a")
    with store.connect(read_only=True) as con:
        with pytest.raises(duckdb.Error, match="read-only"):
            con.execute("INSERT INTO landing.t VALUES (2)")


def test_an_instance_holding_something_it_cannot_drop_is_closed_not_kept(store: Store) -> None:
    POOL.clear()
    with store.connect() as con:
        con.execute("CREATE TABLE memory.main.kept AS SELECT 1 AS a")  # outside the store
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = 'memory'").fetchone() == (0,)


def test_after_a_connection_ends_another_process_can_open_the_store(store: Store, home: Home) -> None:
    """Closing detaches the store, so DuckDB's file lock is released as closing the instance did."""
    with store.connect() as con:
        con.execute("CREATE TABLE landing.t AS SELECT 1 AS a")
    code = (
        "import sys; from pathlib import Path; from safehaven.core.home import Home\n"
        "from safehaven.core.store import Store\n"
        "s = Store(Home(Path(sys.argv[1])), lock_wait=0.5)\n"
        "with s.connect() as con: con.execute('INSERT INTO landing.t VALUES (2)')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(home.root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with store.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM landing.t").fetchone() == (2,)


def test_a_connection_closed_by_its_user_releases_the_store_at_once(store: Store) -> None:
    """Code that closes its connection and opens another before the block ends still can."""
    with store.connect() as con:
        con.execute("CREATE TABLE landing.t AS SELECT 1 AS a")
        con.close()
        with store.connect(read_only=True) as again:
            assert again.execute("SELECT count(*) FROM landing.t").fetchone() == (1,)


def test_a_transaction_left_open_is_rolled_back_as_closing_did(store: Store) -> None:
    with store.connect() as con:
        con.execute("CREATE TABLE landing.t (a INT)")
    with pytest.raises(RuntimeError):
        with store.connect() as con:
            con.execute("BEGIN")
            con.execute("INSERT INTO landing.t VALUES (1)")
            raise RuntimeError("the step failed")
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM landing.t").fetchone() == (0,)
        con.execute("INSERT INTO landing.t VALUES (2)")  # no transaction is left open
    with store.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM landing.t").fetchone() == (1,)


def test_a_macro_variable_or_secret_a_connection_defined_never_reaches_the_next(store: Store) -> None:
    """Key material lives in temporary tables (dropped on return, as are temporary macros);
    anything else a borrower defines on the instance makes it be closed rather than lent again."""
    for define, gone in [
        ("CREATE TEMP MACRO padded(x) AS x || 'pad'", "SELECT count(*) FROM duckdb_functions() WHERE NOT internal"),
        ("CREATE MACRO memory.main.kept(x) AS x", "SELECT count(*) FROM duckdb_functions() WHERE NOT internal"),
        ("SET VARIABLE haven_pad = 'secret'", "SELECT count(*) FROM duckdb_variables()"),
    ]:
        with store.connect() as con:
            con.execute(define)
        with store.connect() as con:
            assert con.execute(gone).fetchone() == (0,), define
