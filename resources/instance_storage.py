"""The Dagster instance's SQLite storage for a local haven, with its databases kept open.

Dagster's own SQLite storage (``DagsterSqliteStorage``, the default of a ``$DAGSTER_HOME``
without a ``storage:`` block) opens a new SQLAlchemy engine and connection for every event it
writes and closes it straight after. Each commit waits for an ``fsync`` of the write-ahead log
and each close of a database's last connection checkpoints it (two more), so every event costs
10-16 ms here, and a night writes about 550 of them: measured, a third of the wall time of a run
with nothing to do (issue 22, "Fixed overhead"). ``HavenSqliteStorage`` is the same storage,
same files, same layout and schema (a home written by either opens with the other), with two
changes:

* **One engine per database, kept open** (a bounded set for the run shards, one per run), so a
  write is an insert and a commit, with no engine built, no connection opened, no checkpoint.
* **``PRAGMA synchronous=NORMAL``** on each connection: in WAL mode a commit is durable
  against a crash of the process (``kill -9``: the crash matrix, ``tests/crash``) and the
  database stays consistent after a power loss, which may lose the last commits only
  (https://www.sqlite.org/pragma.html#pragma_synchronous). That is Dagster's run bookkeeping,
  never the haven's own record: the audit trail, the store and the releases keep their own
  durability, and recovery (``assets.runner.recover``) treats a run whose last events were lost
  as the dead run it was.

Dagster's webserver follows a live run by watching the run's database file for changes
(``SqliteEventLogStorageWatchdog``); with the connection kept open a commit writes only the WAL,
so after a write the database file's times are touched, which the watch reports as a change.

PostgreSQL (``deploy/production``) is the production instance storage; this is the
``$DAGSTER_HOME`` of ``make run``, ``make ui`` and the tests (``deploy/dagster.yaml``).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from dagster._core.errors import DagsterInvariantViolationError
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
)
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sqlite_storage import (
    DagsterSqliteStorage,
    _event_logs_directory,
    _runs_directory,
    _schedule_directory,
)
from dagster._serdes import ConfigurableClassData

if TYPE_CHECKING:
    from dagster import DagsterInstance

#: The SQLite durability of Dagster's bookkeeping (module docstring).
SYNCHRONOUS = "NORMAL"
#: Run shards kept open at once (one per run; the least recently used is closed first).
OPEN_RUN_SHARDS = 8
#: Connections a database's pool keeps open; more are opened (and closed after use) when threads
#: of one process (the webserver's) ask at once.
POOL_SIZE = 1
POOL_OVERFLOW = 8


def _engine(conn_string: str, **connect_args: Any) -> sa.Engine:
    """An engine on one SQLite database whose connections stay open, set to ``SYNCHRONOUS``."""
    engine = sa.create_engine(conn_string, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW, connect_args=connect_args)

    @sa.event.listens_for(engine, "connect")
    def _durability(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"PRAGMA synchronous={SYNCHRONOUS}")

    return engine


#: Engines a forked child inherited from its parent: never used, never closed (``_Engines``).
_INHERITED: list[sa.Engine] = []


class _Engines:
    """Open engines by connection string, at most ``limit`` (least recently used closed first).

    A SQLite connection must never cross a ``fork()`` (https://www.sqlite.org/howtocorrupt.html,
    2.6): a child process that inherited engines leaves them (and their connections) to its
    parent, untouched and referenced so they are never closed in the child, and opens its own.
    """

    def __init__(self, limit: int, **connect_args: Any) -> None:
        self._limit = limit
        self._connect_args = connect_args
        self._open: OrderedDict[str, sa.Engine] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _leave_inherited(self) -> None:
        """In a forked child, leave the parent's engines to it (class docstring); under ``_lock``."""
        if self._pid != os.getpid():
            _INHERITED.extend(self._open.values())
            self._open, self._pid = OrderedDict(), os.getpid()

    def get(self, conn_string: str) -> sa.Engine:
        with self._lock:
            self._leave_inherited()
            engine = self._open.pop(conn_string, None) or _engine(conn_string, **self._connect_args)
            self._open[conn_string] = engine
            while len(self._open) > self._limit:
                self._open.popitem(last=False)[1].dispose()
            return engine

    def dispose(self) -> None:
        with self._lock:
            self._leave_inherited()
            while self._open:
                self._open.popitem()[1].dispose()


@contextmanager
def _transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn


class HavenSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's run-sharded SQLite event log, each shard's connection kept open."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        self._engines = _Engines(OPEN_RUN_SHARDS + 1, timeout=SQLITE_BUSY_TIMEOUT_SECONDS)
        super().__init__(base_dir, inst_data)

    @contextmanager
    def _connect(self, shard: str) -> Iterator[sa.Connection]:
        with self._db_lock:
            engine = self._engines.get(self.conn_string_for_shard(shard))
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with _transaction(engine) as conn:
                raw = conn.connection.dbapi_connection
                before = raw.total_changes
                yield conn
                wrote = raw.total_changes != before
            if wrote:
                _touch(self.path_for_shard(shard))

    def register_instance(self, instance: DagsterInstance) -> None:
        """Refuse to serve an instance whose home is not its own home's ``history/runs``: ``deploy/dagster.yaml`` places
        the storage in ``$DAGSTER_HOME``, so an instance opened from another directory while the
        variable names a different home would read and write that home's runs."""
        expected = _event_logs_directory(instance.root_directory)
        if os.path.realpath(expected) != os.path.realpath(self._base_dir):
            raise DagsterInvariantViolationError(
                f"the Dagster instance at {instance.root_directory} has its storage configured in "
                f"{self._base_dir} ($DAGSTER_HOME); set DAGSTER_HOME to the instance's directory"
            )
        super().register_instance(instance)

    def wipe(self) -> None:
        """Close every shard before Dagster deletes the files (a connection kept open to a deleted
        file would take later writes into it, never to be read again)."""
        with self._db_lock:
            self._engines.dispose()
        super().wipe()

    def dispose(self) -> None:
        super().dispose()
        self._engines.dispose()


def _touch(path: str) -> None:
    """Report a commit to the run's watchers (module docstring): the WAL holds it, not the file."""
    try:
        os.utime(path)
    except FileNotFoundError:  # wiped meanwhile
        pass


class _KeptOpen:
    """Dagster's one-database SQLite storage (runs, schedules) with its connection kept open."""

    _conn_string: str

    def __init__(self, conn_string: str, inst_data: ConfigurableClassData | None = None) -> None:
        self._engines = _Engines(1)
        super().__init__(conn_string, inst_data)  # type: ignore[call-arg]

    @contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        with _transaction(self._engines.get(self._conn_string)) as conn:
            yield conn

    def dispose(self) -> None:
        super().dispose()  # type: ignore[misc]
        self._engines.dispose()


class HavenSqliteRunStorage(_KeptOpen, SqliteRunStorage):
    """Dagster's SQLite run storage, its connection kept open."""


class HavenSqliteScheduleStorage(_KeptOpen, SqliteScheduleStorage):
    """Dagster's SQLite schedule storage, its connection kept open."""


class HavenSqliteStorage(DagsterSqliteStorage):
    """The instance storage of ``deploy/dagster.yaml``: Dagster's SQLite storage under
    ``base_dir`` (``$DAGSTER_HOME``), laid out as Dagster lays it out, its databases kept open.

    ``storage: {custom: {module: resources.instance_storage, class: HavenSqliteStorage,
    config: {base_dir: {env: DAGSTER_HOME}}}}``.
    """

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        self.base_dir = base_dir
        self._run_storage = HavenSqliteRunStorage.from_local(_runs_directory(base_dir))
        self._event_log_storage = HavenSqliteEventLogStorage(_event_logs_directory(base_dir))
        self._schedule_storage = HavenSqliteScheduleStorage.from_local(_schedule_directory(base_dir))
        self._inst_data = inst_data
        super(DagsterSqliteStorage, self).__init__()

    @classmethod
    def from_config_value(  # type: ignore[override]
        cls, inst_data: ConfigurableClassData, config_value: dict[str, str]
    ) -> HavenSqliteStorage:
        return cls.from_local(inst_data=inst_data, **config_value)
