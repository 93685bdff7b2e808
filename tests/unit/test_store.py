"""The store is encrypted at rest and cannot be opened without its key (CoP 27b-c)."""

import duckdb
import pytest

from safehaven.core.home import Home
from safehaven.core.store import ZONES, Store, StoreError, table_exists
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


def test_a_memory_limit_bounds_every_connection_and_none_keeps_duckdbs_default(home: Home) -> None:
    """``Store(memory_limit=...)`` (the haven resource's ``memory_limit``) reaches DuckDB on each
    connection, pooled or not; without it DuckDB's own default applies (issue 22: peak memory)."""
    limited = Store(home, memory_limit="1GiB")
    for _ in range(2):  # a fresh instance, then one from the pool
        with limited.connect() as con:
            assert con.execute("SELECT current_setting('memory_limit')").fetchone()[0] in ("1.0 GiB", "1024.0 MiB")
    with Store(home).connect() as con:
        default = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    assert default not in ("1.0 GiB", "1024.0 MiB")


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


def test_a_memory_limit_duckdb_cannot_read_refuses_the_connection(home: Home) -> None:
    """A mistyped limit is not ignored: no connection opens (the run fails, saying why)."""
    with pytest.raises(duckdb.Error, match="memory"), Store(home, memory_limit="lots").connect():
        pass
