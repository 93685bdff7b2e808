"""The store is encrypted at rest and cannot be opened without its key (CoP 27b-c)."""

from pathlib import Path

import duckdb
import pytest

from safehaven.core.home import Home
from safehaven.core.store import ZONES, Store, StoreError, StoreOutOfMemory, table_exists
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


def test_unset_the_store_holds_duckdb_to_half_a_gib_a_thread_at_least_a_gib_never_above_duckdbs_own(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 22: under DuckDB's own limit (80% of the machine) a night's peak grew with the history
    it read. Unset, the limit is ``MEMORY_PER_THREAD`` per DuckDB thread, at least ``MEMORY_FLOOR``
    (this suite runs one thread: ``tests/conftest.py``), and never above DuckDB's own default."""
    from safehaven.core import store as store_module

    assert store_module.DEFAULT_THREADS == 1
    assert _memory_limit(Store(home)) == "1.0 GiB"  # the floor: 512 MiB x 1 thread is below it
    assert _memory_limit(Store(home, threads=4)) == "2.0 GiB"  # 4 x 512 MiB
    assert store_module.default_memory_limit(4) == f"{4 * 512 * 2**20}B"
    monkeypatch.setattr(store_module, "_duckdbs_own_limit", lambda: 700 * 2**20)  # a small machine
    assert store_module.default_memory_limit(4) == f"{700 * 2**20}B"
    monkeypatch.setattr(store_module, "_duckdbs_own_limit", lambda: None)  # unreadable: DuckDB's own
    assert store_module.default_memory_limit(4) is None


def test_work_past_the_limit_that_cannot_spill_is_refused_naming_the_limit_and_how_to_raise_it(home: Home) -> None:
    """DuckDB spills sorts, joins and aggregates past the limit; what it cannot spill fails the
    statement, and the error says which limit and where to raise it. It stays a DuckDB
    out-of-memory error, so code handling DuckDB's errors handles it as before."""
    with pytest.raises(StoreOutOfMemory) as err, Store(home, memory_limit="32MB").connect() as con:
        con.execute("CREATE TEMP TABLE t AS SELECT list(i) AS l FROM range(20000000) AS r(i)")  # one list: no spill
    message = str(err.value)
    assert "memory limit of 30.5 MiB" in message
    assert "resources.haven.config.memory_limit" in message and "$SAFEHAVEN_MEMORY_LIMIT" in message
    assert isinstance(err.value, duckdb.OutOfMemoryException)


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
    monkeypatch.setenv(MEMORY_LIMIT_ENV, " ")
    assert home_from_env().memory_limit is None and SafeHavenResource.from_environment().memory_limit == ""
