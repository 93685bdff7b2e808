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
  as they were by closing the instance); its temporary tables, views and macros are dropped
  and its registered frames unregistered. An instance that still holds anything (a table of its
  own, a macro, a variable, a secret: nothing a borrower defined may reach the next), or
  fails to reset, is closed instead of kept; so is one the borrower closed itself (which
  released the store as before).
* **Per process.** Instances are never shared across a fork: a child process starts its own.

Keyed by the instance configuration (spill directory, threads), so a pooled instance always
has the configuration its borrower asked for.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import duckdb

#: How many idle instances are kept for one configuration.
MAX_IDLE_PER_CONFIG = 4
#: Databases every DuckDB instance has, which are never detached.
_BUILT_IN = ("memory", "system", "temp")

Config = tuple[tuple[str, str | int | bool], ...]


class InstancePool:
    """Idle, loaded DuckDB instances of this process (module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[Config, list[duckdb.DuckDBPyConnection]] = {}
        self._pid = os.getpid()

    def take(
        self, config: dict[str, str | int | bool], prepare: Callable[[duckdb.DuckDBPyConnection], None]
    ) -> tuple[duckdb.DuckDBPyConnection, Config]:
        """An idle instance with ``config``, or a new one set up by ``prepare``."""
        key: Config = tuple(sorted(config.items()))
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's instances are not ours
                self._idle, self._pid = {}, os.getpid()
            idle = self._idle.get(key)
            if idle:
                return idle.pop(), key
        instance = duckdb.connect(":memory:", config=dict(config))
        try:
            prepare(instance)
        except BaseException:
            instance.close()
            raise
        return instance, key

    def give_back(self, instance: duckdb.DuckDBPyConnection, key: Config) -> None:
        """Detach what the borrower attached and keep ``instance``, or close it if it is not clean."""
        if not _reset(instance):
            instance.close()
            return
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if self._pid == os.getpid() and len(idle) < MAX_IDLE_PER_CONFIG:
                idle.append(instance)
                return
        instance.close()

    def clear(self) -> None:
        """Close every idle instance (tests; a process that wants its memory back)."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for instances in idle.values():
            for instance in instances:
                instance.close()


def _reset(instance: duckdb.DuckDBPyConnection) -> bool:
    """Detach every attached database; True if the instance is then as it was when prepared."""
    try:
        _rollback(instance)
        instance.execute("USE memory")
        attached = instance.execute(
            "SELECT database_name FROM duckdb_databases() WHERE NOT internal AND database_name <> 'memory'"
        ).fetchall()
        for (name,) in attached:
            instance.execute(f'DETACH "{name}"')
        _drop_temporary(instance)
        left = instance.execute(
            "SELECT (SELECT count(*) FROM duckdb_databases() WHERE database_name NOT IN "
            f"({', '.join(repr(n) for n in _BUILT_IN)})) + (SELECT count(*) FROM duckdb_tables() "
            "WHERE database_name = 'memory') + (SELECT count(*) FROM duckdb_views() "
            "WHERE database_name = 'memory' AND NOT internal) + (SELECT count(*) FROM duckdb_tables() "
            "WHERE temporary) + (SELECT count(*) FROM duckdb_views() WHERE temporary AND NOT internal) "
            "+ (SELECT count(*) FROM duckdb_functions() WHERE NOT internal) "
            "+ (SELECT count(*) FROM duckdb_variables()) + (SELECT count(*) FROM duckdb_secrets())"
        ).fetchone()
    except duckdb.Error:
        return False
    return left is not None and left[0] == 0


def _drop_temporary(instance: duckdb.DuckDBPyConnection) -> None:
    """Drop the borrower's temporary tables, views and macros, and unregister its frames."""
    tables = instance.execute("SELECT schema_name, table_name FROM duckdb_tables() WHERE temporary").fetchall()
    for schema, name in tables:
        instance.execute(f'DROP TABLE IF EXISTS temp."{schema}"."{name}"')
    views = instance.execute(
        "SELECT schema_name, view_name FROM duckdb_views() WHERE temporary AND NOT internal"
    ).fetchall()
    for schema, name in views:
        instance.unregister(name)
        instance.execute(f'DROP VIEW IF EXISTS temp."{schema}"."{name}"')
    macros = instance.execute(
        "SELECT DISTINCT schema_name, function_name, function_type FROM duckdb_functions() "
        "WHERE database_name = 'temp' AND NOT internal"
    ).fetchall()
    for schema, name, kind in macros:
        table = " TABLE" if kind == "table_macro" else ""
        instance.execute(f'DROP MACRO{table} IF EXISTS temp."{schema}"."{name}"')


def _rollback(instance: duckdb.DuckDBPyConnection) -> None:
    """End a transaction the borrower left open, as closing the instance would have."""
    try:
        instance.execute("ROLLBACK")
    except duckdb.TransactionException:
        pass  # none was open


#: The pool of this process.
POOL = InstancePool()
