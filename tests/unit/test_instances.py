"""Store connections reuse loaded DuckDB instances, and nothing of one connection reaches the next
(``safehaven.core.instances``): each connection is as if its instance were new."""

import subprocess
import sys

import duckdb
import pytest

from safehaven.core import instances
from safehaven.core.home import Home
from safehaven.core.instances import POOL
from safehaven.core.store import Store


def _insert_from_another_process(home: Home) -> None:
    """Another process opens the store (waiting at most 0.5 s for it) and adds a row to ``landing.t``."""
    code = (
        "import sys; from pathlib import Path; from safehaven.core.home import Home\n"
        "from safehaven.core.store import Store\n"
        "with Store(Home(Path(sys.argv[1])), lock_wait=0.5).connect() as con:\n"
        "    con.execute('INSERT INTO landing.t VALUES (2)')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(home.root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


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


def _spill_files(home: Home) -> list[str]:
    return sorted(p.name for p in (home.store_dir / "tmp").glob("*")) if (home.store_dir / "tmp").exists() else []


def _spill(con: duckdb.DuckDBPyConnection) -> None:
    """Make DuckDB spill (the connection's memory limit is 32 MB): a temporary table of ~100 MB."""
    con.execute("CREATE TEMP TABLE big AS SELECT range AS i, repeat('x', 40) AS s FROM range(2000000)")


def test_an_instance_spills_only_into_its_borrowers_home(tmp_path) -> None:
    """One process, two homes: an instance is lent across homes (the pool's key leaves the spill
    directory out), each connection spills into its own home's ``store/tmp``, an instance that
    has spilled for one home is never lent for another, and a directory a borrower set itself
    does not reach the next borrower."""
    first, second = (Home(tmp_path / name).ensure() for name in ("first", "second"))
    elsewhere = tmp_path / "elsewhere"
    POOL.clear()
    with Store(first, memory_limit="32MB").connect() as con:
        lent = id(con)
        assert _spills_to(con) == str(first.store_dir / "tmp")
        con.execute(f"SET temp_directory = '{elsewhere}'")  # a borrower's own setting, nothing spilled yet
    with Store(second, memory_limit="32MB").connect() as con:
        assert id(con) == lent, "the idle instance is lent for another home"
        assert _spills_to(con) == str(second.store_dir / "tmp")
        _spill(con)
        assert _spill_files(second) and not _spill_files(first)
    with Store(first, memory_limit="32MB").connect() as con:
        assert _spills_to(con) == str(first.store_dir / "tmp")
        _spill(con)
        assert _spill_files(first)
    assert not elsewhere.exists()


def test_an_instance_that_has_spilled_is_never_lent_for_another_home(tmp_path) -> None:
    """``take`` itself refuses it: DuckDB will not move a used spill directory, and the instance
    is closed. (``give_back`` already closes one that spilled, as its settings read differently
    afterwards; here one is put back by hand, so the refusal in ``take`` is what is tested.)"""
    from safehaven.core.instances import InstancePool
    from safehaven.core.store import _prepare_instance

    first, second = tmp_path / "first", tmp_path / "second"
    pool = InstancePool()
    config = {"temp_directory": str(first), "memory_limit": "32MB", "threads": 1}
    spilled, key = pool.take(config, _prepare_instance)
    _spill(spilled)
    spilled.execute("DROP TABLE big")
    pool._idle.setdefault(key, []).append(spilled)  # as if it had been kept
    con, _ = pool.take({**config, "temp_directory": str(second)}, _prepare_instance)
    assert con is not spilled and _spills_to(con) == str(second)
    with pytest.raises(duckdb.ConnectionException):
        spilled.execute("SELECT 1")  # closed, not left in the pool
    con.close()


def test_the_files_one_connection_read_are_not_in_the_next_ones_file_cache(tmp_path) -> None:
    """DuckDB caches the files a query reads (their paths and some bytes); the next borrower of
    the instance, for the same home or another, finds none of them (an incoming file's name may
    hold an identifier)."""
    first, second = (Home(tmp_path / name).ensure() for name in ("first", "second"))
    named = first.incoming / "patient_9434765919_extract.parquet"
    duckdb.sql(f"COPY (SELECT 1 AS a) TO '{named}' (FORMAT parquet)")
    POOL.clear()
    with Store(first).connect() as con:
        con.execute(f"SELECT * FROM read_parquet('{named}')").fetchall()
        lent = id(con)
        assert con.execute("SELECT count(*) FROM duckdb_external_file_cache()").fetchone()[0] > 0
    for home in (second, first):
        with Store(home).connect() as con:
            assert id(con) == lent
            assert con.execute("SELECT count(*) FROM duckdb_external_file_cache()").fetchone() == (0,)


def _spills_to(con: duckdb.DuckDBPyConnection) -> str:
    return con.execute("SELECT current_setting('temp_directory')").fetchone()[0]


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
    _insert_from_another_process(home)
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


def test_a_setting_variable_or_statement_a_connection_left_never_reaches_the_next(store: Store, tmp_path) -> None:
    """Settings are global to an instance: one changed (spill encryption off, query logging on,
    which would write the next ATTACH's key to a file) makes the instance be closed, not lent
    again; so does a variable, a prepared statement or a sequence a borrower left."""
    checks = [
        ("SET temp_file_encryption = false", "SELECT current_setting('temp_file_encryption')", (True,)),
        ("SET default_order = 'DESC'", "SELECT lower(current_setting('default_order'))", ("ascending",)),
        (
            f"CALL enable_logging('QueryLog', storage = 'file', storage_path = '{tmp_path / 'log'}')",
            "SELECT current_setting('enable_logging')",
            (False,),
        ),
        ("SET VARIABLE haven_pad = 'secret'", "SELECT count(*) FROM duckdb_variables()", (0,)),
        ("PREPARE kept AS SELECT 'secret'", "SELECT count(*) FROM duckdb_prepared_statements()", (0,)),
        ("CREATE TEMP SEQUENCE kept_seq", "SELECT count(*) FROM duckdb_sequences()", (0,)),
    ]
    for change, probe, fresh in checks:
        with store.connect() as con:
            con.execute(change)
        with store.connect() as con:
            assert con.execute(probe).fetchone() == fresh, change
    assert not (tmp_path / "log").exists() or not any(
        "ENCRYPTION_KEY" in p.read_text(errors="replace") for p in (tmp_path / "log").rglob("*") if p.is_file()
    )


def test_a_query_log_a_connection_left_behind_never_reaches_the_next(store: Store) -> None:
    """Logging switched on, used and switched off again leaves the settings as they were, but the
    log keeps each statement's text, values included (found by review): the instance is closed."""
    with store.connect() as con:
        con.execute("CALL enable_logging('QueryLog')")
        con.execute("SELECT 'patient 9434765919'").fetchall()
        con.execute("CALL disable_logging()")
        con.execute("SET logging_mode = 'LEVEL_ONLY'")
        con.execute("SET enabled_log_types = ''")
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM duckdb_logs()").fetchone() == (0,)


def test_a_file_the_cache_holds_without_its_bytes_is_forgotten_too(tmp_path) -> None:
    """DuckDB keeps a file read and then changed in its cache, keyed by its path, with no bytes to
    list, so no count shows it (found by review): the cache is emptied at every connection's end."""
    home = Home(tmp_path / "home").ensure()
    named = home.incoming / "patient_9434765919_extract.parquet"
    duckdb.sql(f"COPY (SELECT 1 AS a) TO '{named}' (FORMAT parquet)")
    POOL.clear()
    emptied = []
    with Store(home).connect() as con:
        con.execute(f"SELECT * FROM read_parquet('{named}')").fetchall()
        lent = con
    real = instances._forget_files

    def forget(instance: duckdb.DuckDBPyConnection) -> None:
        emptied.append(instance is lent)
        real(instance)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(instances, "_forget_files", forget)
        with Store(home).connect() as con:
            assert con is lent
            con.execute("SELECT 1").fetchall()  # a borrower that read no file at all
    assert emptied == [True]


def test_an_interrupted_reset_closes_the_instance_and_releases_the_store(store: Store, home: Home, monkeypatch) -> None:
    """Ctrl-C or a terminated run while a connection is given back: the interruption is raised
    again, and the instance is closed, so the store is not left attached or locked."""
    import safehaven.core.instances as instances

    def interrupted(instance):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(instances, "_reset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with store.connect() as con:
            con.execute("CREATE TABLE landing.t AS SELECT 1 AS a")
    monkeypatch.undo()
    _insert_from_another_process(home)


_INTERRUPTED_FIRST_QUERY = """
import os, signal, sys, threading, time
from safehaven.core.instances import POOL
instance, _ = POOL.take({}, lambda i: None)
print("pandas imported before the first query:", "pandas" in sys.modules, flush=True)
instance.execute("SELECT 1").fetchall()  # no parameter: the instance's own first-query costs, not the import
threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
began = time.perf_counter()
try:
    instance.execute("SELECT ?", [1]).fetchall()
    took = time.perf_counter() - began
    time.sleep(5)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(0)
print(f"the interrupt was lost; the query took {took:.3f} s", flush=True)
sys.exit(2 if took >= 0.1 else 1)
"""
#: exit code of a child whose query was still running when the interrupt came (a loaded machine):
#: DuckDB's own race on a short query, not the import this test is about; it is run again
_QUERY_OUTLASTED_THE_TIMER = 2


def test_an_interrupt_during_a_processs_first_query_with_a_parameter_is_not_lost() -> None:
    """duckdb 1.4.4 imports pandas inside a process's first query with a parameter (about half a
    second) and swallows a Ctrl-C (or a run's termination) that arrives meanwhile; the pool imports
    pandas first, in Python, so the interrupt stops the process
    (``safehaven.core.instances.import_before_duckdb``). The interrupt comes 0.1 s into the query:
    inside the import without the pool's, after the query with it. A loaded machine can keep the
    query itself running past 0.1 s, where DuckDB's own race on a short query may consume the
    interrupt: such a try (the child says so) is run again, up to three times."""
    for _ in range(3):  # again only when the query outlasted the timer (module constant's comment)
        done = subprocess.run(
            [sys.executable, "-c", _INTERRUPTED_FIRST_QUERY], capture_output=True, text=True, timeout=60
        )
        assert "pandas imported before the first query: True" in done.stdout
        if done.returncode != _QUERY_OUTLASTED_THE_TIMER:
            break
    assert done.returncode == 0 and "interrupted" in done.stdout, done.stdout + done.stderr
