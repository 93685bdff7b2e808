"""Loaded DuckDB instances, kept for reuse by the store's short-lived connections.

Every store connection needs the ``httpfs`` extension loaded (``safehaven.core.store``:
writing an encrypted file needs its crypto module), and loading it costs about 60 ms per
DuckDB instance, against about 3 ms to attach the store. A nightly run opens some sixty
connections, the test suite thousands. So an instance, once loaded, is lent again:

* **One borrower at a time.** An instance is taken from the pool for one ``Store.connect``
  and given back when it ends; two connections never share an instance, so attaching,
  read-only mode and ``USE`` behave exactly as with a fresh instance.
* **Given back clean.** On return an open transaction is rolled back and every database the
  borrower attached is detached (the store's file and DuckDB's file lock are released then,
  as they were by closing the instance); its temporary tables and views are dropped, its
  registered frames unregistered, and DuckDB's cache of the files it read emptied. An
  instance that still holds anything of the borrower's (a table outside the store, a
  variable, a secret, a prepared statement, a sequence, a cached file), whose settings,
  schemas or types differ from when it was prepared (a ``SET`` that turned off spill
  encryption, logging that would write the next ATTACH's key), or that fails to reset or is
  interrupted resetting, is closed instead of kept; so is one the borrower closed itself
  (which released the store as before).
* **Used only inside its block.** A connection must not be kept past its ``with`` block: the
  instance may by then serve another borrower (before the pool such a handle raised
  "connection closed"). Temporary macros (the output SQL's helpers) are replaced by their
  next maker rather than dropped, and Python functions registered on an instance are not
  detected: the pipeline registers none.
* **Per process.** Instances are never shared across a fork: a child process starts its own.

Keyed by the instance configuration but for its spill directory (threads, memory limit), so a
pooled instance always has the configuration its borrower asked for. The spill directory
(``temp_directory``, the home's ``store/tmp``) is set for each borrower and read back: DuckDB
allows the change only while the instance has spilled nothing ("Cannot switch temporary
directory after the current one has been used"), so an instance that has spilled for one home
is closed rather than lent for another, and one home's spill files never go to another's folder.
(Given back, such an instance is closed already: DuckDB's ``max_temp_directory_size`` reads
differently once it has spilled, so it is not as prepared; ``take`` does not rely on that.)
A process serves one home in production; the test suite's thousands of homes each paid 60-300
ms to load ``httpfs`` into a new instance when the directory was part of the key.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import duckdb

from safehaven.core.sql import lit

#: How many idle instances are kept for one configuration.
MAX_IDLE_PER_CONFIG = 4
#: Databases every DuckDB instance has, which are never detached.
_BUILT_IN = ("memory", "system", "temp")
#: The setting given to each borrower rather than kept by an instance: where it spills.
SPILL = "temp_directory"

Config = tuple[tuple[str, str | int | bool], ...]


class InstancePool:
    """Idle, loaded DuckDB instances of this process (module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[Config, list[duckdb.DuckDBPyConnection]] = {}
        #: each lent or idle instance -> its state when it was prepared (``_state``)
        self._prepared: dict[int, tuple] = {}
        self._pid = os.getpid()

    def take(
        self, config: dict[str, str | int | bool], prepare: Callable[[duckdb.DuckDBPyConnection], None]
    ) -> tuple[duckdb.DuckDBPyConnection, Config]:
        """An idle instance with ``config`` (its spill directory set for this borrower), or a new
        one set up by ``prepare``."""
        key = _key(config)
        while (idle := self._idle_one(key)) is not None:
            try:
                if SPILL not in config or _spill_to(idle, str(config[SPILL])):
                    return idle, key
            except BaseException:  # interrupted: closed, so nothing is left half set
                self._discard(idle)
                raise
            self._discard(idle)
        import_before_duckdb()
        instance = duckdb.connect(":memory:", config=dict(config))
        try:
            prepare(instance)
            instance.execute("USE memory")  # as ``_reset`` leaves it, so the states compare
            state = _state(instance)  # None: cannot be read, so the instance is not lent again
        except BaseException:
            instance.close()
            raise
        if state is not None:
            with self._lock:
                self._prepared[id(instance)] = state
        return instance, key

    def _idle_one(self, key: Config) -> duckdb.DuckDBPyConnection | None:
        """An idle instance of ``key``, taken from the pool; None when there is none."""
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's instances are not ours
                self._idle, self._prepared, self._pid = {}, {}, os.getpid()
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def _discard(self, instance: duckdb.DuckDBPyConnection) -> None:
        """Close an instance taken from the pool that cannot serve its borrower."""
        with self._lock:
            self._prepared.pop(id(instance), None)
        instance.close()

    def give_back(self, instance: duckdb.DuckDBPyConnection, key: Config) -> None:
        """Reset ``instance`` and keep it, or close it if it is not as it was prepared.

        An interruption (Ctrl-C, a run being terminated) during the reset closes the instance,
        so the store is released, and is raised again.
        """
        with self._lock:
            prepared = self._prepared.pop(id(instance), None)
        try:
            clean = prepared is not None and _reset(instance) and _state(instance) == prepared
        except BaseException:
            instance.close()
            raise
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if clean and self._pid == os.getpid() and len(idle) < MAX_IDLE_PER_CONFIG:
                self._prepared[id(instance)] = prepared  # type: ignore[assignment]
                idle.append(instance)
                return
        instance.close()

    def clear(self) -> None:
        """Close every idle instance (tests; a process that wants its memory back)."""
        with self._lock:
            idle, self._idle = self._idle, {}
            for instances in idle.values():
                for instance in instances:
                    self._prepared.pop(id(instance), None)
        for instances in idle.values():
            for instance in instances:
                instance.close()


def _key(config: dict[str, str | int | bool]) -> Config:
    """The pool's key for ``config``: every setting but the spill directory, and whether one is set."""
    kept = sorted((name, value) for name, value in config.items() if name != SPILL)
    return (*kept, (SPILL, SPILL in config))


def _spill_to(instance: duckdb.DuckDBPyConnection, directory: str) -> bool:
    """Point ``instance``'s spill files at ``directory``; True when it reads back so. False when
    DuckDB refuses the change (the instance has spilled to its own directory) or fails."""
    try:
        if _spills_to(instance) != directory:
            instance.execute(f"SET {SPILL} = {lit(directory)}")
        return _spills_to(instance) == directory
    except duckdb.Error:
        return False


def _spills_to(instance: duckdb.DuckDBPyConnection) -> str:
    return str(instance.execute(f"SELECT current_setting('{SPILL}')").fetchone()[0])  # type: ignore[index]


def import_before_duckdb() -> None:
    """Import pandas here, in Python, before DuckDB's Python client would, so that an interrupt is
    never lost in that import.

    duckdb 1.4.4 imports pandas (when it is installed: Great Expectations installs it) inside a
    process's first query with a parameter, to compare each parameter with ``pandas.NaT``. A Ctrl-C,
    or the SIGINT with which a run is terminated, arriving during that import (about half a second)
    is swallowed there: the query goes on and so does the command (found by review: ``safehaven
    run`` interrupted then finished the whole night with exit 0; reproduced 3 times in 3). Imported
    here, the interrupt is raised as anywhere else. It costs a store user nothing: its first
    query with a parameter would import pandas anyway."""
    try:
        import pandas  # noqa: F401
    except ImportError:  # not installed: DuckDB will not import it either
        pass


def _state(instance: duckdb.DuckDBPyConnection) -> tuple | None:
    """What a borrower could change that outlives its connection: every setting (``SET``, a
    ``PRAGMA``, logging) but the spill directory, which ``take`` sets for each borrower, and the
    non-internal schemas and types; None when it cannot be read (then the instance is not lent
    again)."""
    try:
        return tuple(
            tuple(instance.execute(sql).fetchall())
            for sql in (
                f"SELECT name, value FROM duckdb_settings() WHERE name <> '{SPILL}' ORDER BY name",
                "SELECT database_name, schema_name FROM duckdb_schemas() WHERE NOT internal ORDER BY ALL",
                "SELECT database_name, type_name FROM duckdb_types() WHERE NOT internal ORDER BY ALL",
            )
        )
    except Exception:  # a DuckDB error, or an interrupted query (RuntimeError)
        return None


#: What a borrower can leave in an instance once its databases are detached, counted in one
#: statement: any database, table or view of its own, variable, secret, prepared statement,
#: sequence, cached file or log entry (a query log keeps each statement's text, values included,
#: after logging is switched off again: found by review). A UNION ALL of the counts: the same
#: counts as scalar subqueries added together, which DuckDB 1.4 runs three times slower (4 ms
#: against 13 ms a connection, measured here; the pool resets an instance for every store
#: connection).
_LEFT_BEHIND = (
    "SELECT sum(n) FROM ("
    + " UNION ALL ".join(
        f"SELECT count(*) AS n FROM {source}"
        for source in (
            f"duckdb_databases() WHERE database_name NOT IN ({', '.join(repr(n) for n in _BUILT_IN)})",
            "duckdb_tables() WHERE database_name = 'memory' OR temporary",
            "duckdb_views() WHERE (database_name = 'memory' OR temporary) AND NOT internal",
            "duckdb_variables()",
            "duckdb_secrets()",
            "duckdb_prepared_statements()",
            "duckdb_sequences()",
            "duckdb_external_file_cache()",
            "duckdb_logs()",
        )
    )
    + ")"
)


def _reset(instance: duckdb.DuckDBPyConnection) -> bool:
    """Detach every attached database and drop the borrower's temporary objects; True if nothing
    of the borrower's is left (``_state`` is compared by the caller). Most borrowers leave nothing
    once the store is detached and the file cache is emptied: one count (:data:`_LEFT_BEHIND`)
    says so, and the listings of what to drop (about 2 ms a connection) are skipped."""
    try:
        _rollback(instance)
        instance.execute("USE memory")
        attached = instance.execute(
            "SELECT database_name FROM duckdb_databases() WHERE NOT internal AND database_name <> 'memory'"
        ).fetchall()
        for (name,) in attached:
            instance.execute(f'DETACH "{name}"')
        _forget_files(instance)  # always: a file the cache holds without its bytes is not counted (found by review)
        if _nothing_left(instance):
            return True
        _drop_temporary(instance)
        return _nothing_left(instance)
    except Exception:  # a DuckDB error, or an interrupted query (RuntimeError): not clean
        return False


def _nothing_left(instance: duckdb.DuckDBPyConnection) -> bool:
    left = instance.execute(_LEFT_BEHIND).fetchone()
    return left is not None and left[0] == 0


def _forget_files(instance: duckdb.DuckDBPyConnection) -> None:
    """Empty DuckDB's cache of the files the borrower read (``duckdb_external_file_cache()``:
    each file's path and some of its bytes; an incoming file's name may hold an identifier).
    Turning the cache off drops its entries; it is then set back as it was."""
    setting = "enable_external_file_cache"
    was = instance.execute(f"SELECT current_setting('{setting}')").fetchone()[0]  # type: ignore[index]
    instance.execute(f"SET {setting} = false")
    instance.execute(f"SET {setting} = {'true' if was else 'false'}")


def _drop_temporary(instance: duckdb.DuckDBPyConnection) -> None:
    """Drop the borrower's temporary tables and views, and unregister its frames.

    Temporary macros are replaced, not dropped: the output SQL's helpers (``MACROS`` of
    ``safehaven.publish.outputs``) are made with ``CREATE OR REPLACE TEMP MACRO`` and hold no
    data; listing functions costs about 50 ms a connection, which is what the pool saves.
    """
    tables = instance.execute("SELECT schema_name, table_name FROM duckdb_tables() WHERE temporary").fetchall()
    for schema, name in tables:
        instance.execute(f'DROP TABLE IF EXISTS temp."{schema}"."{name}"')
    views = instance.execute(
        "SELECT schema_name, view_name FROM duckdb_views() WHERE temporary AND NOT internal"
    ).fetchall()
    for schema, name in views:
        instance.unregister(name)
        instance.execute(f'DROP VIEW IF EXISTS temp."{schema}"."{name}"')


def _rollback(instance: duckdb.DuckDBPyConnection) -> None:
    """End a transaction the borrower left open, as closing the instance would have."""
    try:
        instance.execute("ROLLBACK")
    except duckdb.TransactionException:
        pass  # none was open


#: The pool of this process.
POOL = InstancePool()
