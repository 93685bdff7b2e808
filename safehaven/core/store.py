"""The encrypted DuckDB store: one writer, short-lived connections, zones as schemas.

Rules:

* Encrypted at rest (CoP 27b-c; ``docs/rules.md`` "Pseudonymisation and encryption"): the store file is
  written with DuckDB 1.4's AES-GCM database encryption under the ``store`` key, and so are
  its temporary spill files (``temp_file_encryption``). Without the key the file cannot be
  opened, and no identifier stands in it as plain bytes.
* Writing an encrypted DuckDB file needs the crypto module of the ``httpfs`` extension. It
  ships on the package index as ``duckdb-ext-httpfs`` and is loaded from its installed path,
  signed, with no network (``docs/design.md`` "Encryption at rest").
* DuckDB allows one writer process: every connection is opened for one unit of work and
  closed (``docs/design.md`` "One writer, short-lived connections"); the Dagster jobs run in
  process with a concurrency limit. Closing detaches the store; the DuckDB instance, with its
  extension loaded, is kept for the next connection (``safehaven.core.instances``).
* Zones (``docs/design.md`` "Zones") are schemas of the one encrypted file: ``landing`` (as
  received, identifiable), ``haven`` (pseudonymised content), ``vault`` (encrypted identity
  vault), ``release`` (an anonymised agreement's counts), ``published`` (anonymised outputs, exported
  in the clear by the publication step only), ``governance`` (registers, audit, objections).
* Key material never reaches an error message: a failed attach is re-raised with the key
  removed from DuckDB's text.
* Physical disposal and store-key rotation rebuild the store (``Store.rebuild``): DuckDB's
  DELETE leaves bytes in the file (``docs/design.md`` "Deletion leaves bytes"), so the live
  tables are copied into a fresh file under a fresh key, which replaces the old file
  atomically (CoP 43d, 48-50). A journal
  (``store/rebuild.json``) makes the swap crash-safe: a half-built file is discarded, a
  half-done swap is completed, the next time the store is opened.
* Each connection remembers the ``Home`` that opened it (``opened_by``), so code that holds
  only the connection writes the audit trail with the home's configuration (its write-once
  anchor target, ``Home.audit_worm``), not a default (CoP 12, 23d).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import json
import logging
import os
import re
import secrets
import shutil
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import duckdb

from safehaven.core.files import replace_whole
from safehaven.core.home import Home
from safehaven.core.instances import POOL
from safehaven.core.keys import Key, KeyRing

#: the zones; ``counts`` holds the outputs' true counts per month (``safehaven.publish.counting``)
COUNTS_ZONE = "counts"
ZONES = ("landing", "haven", COUNTS_ZONE, "vault", "release", "published", "governance")
CATALOG = "store"
#: How long opening the store waits for another process before failing (seconds).
DEFAULT_LOCK_WAIT_SECONDS = 600.0
#: First and longest pause between two attempts to open a busy store (seconds).
LOCK_BACKOFF_FIRST = 0.05
LOCK_BACKOFF_MAX = 5.0
#: How often a wait is logged again while it lasts (seconds).
LOCK_LOG_EVERY = 30.0
#: DuckDB's text when another process holds the file lock.
DUCKDB_LOCK_HELD = "Could not set lock on file"
#: DuckDB's message for a key that is not the one the encrypted file was written with
DUCKDB_WRONG_KEY = "Wrong encryption key"

log = logging.getLogger(__name__)

#: each open connection -> the ``Home`` of the ``Store`` that opened it (module docstring)
_OPENED_BY: weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, Home] = weakref.WeakKeyDictionary()


def opened_by(con: duckdb.DuckDBPyConnection) -> Home | None:
    """The ``Home`` (with its configuration) whose ``Store.connect`` opened ``con``; None for any other."""
    return _OPENED_BY.get(con)


class StoreError(Exception):
    """The store cannot be opened as asked; the message says what to do."""


class StoreBusy(StoreError):
    """Another process held the store for longer than the configured wait."""


#: how to give the store more memory (:meth:`Store._out_of_memory`)
_RAISE_MEMORY = (
    "The limit is the haven resource's memory_limit for a pipeline run (run config "
    'resources.haven.config.memory_limit, e.g. "8GB") and $SAFEHAVEN_MEMORY_LIMIT for a command and for the '
    "code location `safehaven run` starts; by default a quarter of the machine's memory, at least 1 GiB."
)
#: DuckDB's words when its spill space, not its memory, ran out (``max_temp_directory_size``)
DUCKDB_SPILL_FULL = ("failed to offload", "max_temp_directory_size")


class MemoryLimitInvalid(StoreError):
    """The memory limit given for the store is not a size DuckDB reads."""


class StoreOutOfMemory(duckdb.OutOfMemoryException):
    """A statement needed more than the store's memory limit and DuckDB could not spill it; the
    message names the limit and how to raise it. Still a ``duckdb.OutOfMemoryException``, so code
    that handles DuckDB's errors handles it as before."""


class _Waiter:
    """Backoff between attempts to open a busy store, up to a limit (module docstring)."""

    def __init__(self, limit: float, logger: logging.Logger, path: Path):
        self.limit, self.logger, self.path = limit, logger, path
        self.started = time.monotonic()
        self.delay = LOCK_BACKOFF_FIRST
        self.logged_at: float | None = None

    def pause(self, why: str) -> None:
        """Sleep before the next attempt, or raise ``StoreBusy`` once the limit is passed."""
        now = time.monotonic()
        waited = now - self.started
        if waited >= self.limit:
            raise StoreBusy(
                f"the store {self.path} was busy for {waited:.0f}s ({why}), longer than the "
                f"{self.limit:.0f}s this connection may wait; the next run will try again "
                "(raise the wait, or find the process that holds the store)"
            )
        if self.logged_at is None or now - self.logged_at >= LOCK_LOG_EVERY:
            self.logger.warning(
                "the store %s is busy (%s); waiting for it (%.0fs so far, up to %.0fs)",
                self.path,
                why,
                waited,
                self.limit,
            )
            self.logged_at = now
        time.sleep(min(self.delay, max(self.limit - waited, 0.0)))
        self.delay = min(self.delay * 2, LOCK_BACKOFF_MAX)


class SimulatedCrash(RuntimeError):
    """Raised by a test hook (``_crash_after``) to stop a rebuild or a disposal between two steps."""


def httpfs_extension_path() -> Path:
    """The signed httpfs extension installed by the ``duckdb-ext-httpfs`` package."""
    try:
        import duckdb_ext  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - an install problem
        raise StoreError("package duckdb-ext-httpfs is not installed; run `make install`") from exc
    version = duckdb.__version__
    for base in duckdb_ext.__path__:
        hits = glob.glob(os.path.join(base, "extensions", f"v{version}", "*", "httpfs.duckdb_extension"))
        if hits:
            return Path(hits[0])
    raise StoreError(
        f"no httpfs extension for DuckDB {version} in duckdb-ext-httpfs; pin duckdb-ext-httpfs to the DuckDB version"
    )


def _ensure_zones(con: duckdb.DuckDBPyConnection) -> None:
    """Create the zones' schemas that the store does not have yet (one catalog query when all exist)."""
    present = {
        name
        for (name,) in con.execute(
            f"SELECT schema_name FROM duckdb_schemas() WHERE database_name = '{CATALOG}'"
        ).fetchall()
    }
    for zone in ZONES:
        if zone not in present:
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {zone}")


#: Row-group merges ("vacuum tasks") DuckDB may schedule at a checkpoint: none (issue 22). DuckDB 1.4
#: writes a large insert as it goes, in row groups cut where its parallel batches end (the 6.8M GP
#: records of the 909,091-patient night: 103 row groups where 56 would hold them), then merges
#: adjacent part-filled ones at each checkpoint by reading, decompressing and writing them again,
#: which doubles a landing's write work. Measured on that night's GP intake: landing 12.1-13.1 s and
#: validation 8.8 s with the merges, 9.4 s and 7.2 s without; the whole night, best of 3, 57.7 s
#: before and 50.4-54.9 s after (the benchmark's baseline is set the same way). Not a safeguard:
#: the store's physical disposal is a rebuild into a fresh file (``Store.rebuild``), never a
#: vacuum, which leaves bytes anyway (``docs/design.md`` "Deletion leaves bytes"). Without the
#: merges a wholly deleted row group of a table without an index is still freed (DuckDB 1.4.4
#: frees none of a table with one, merges or not), but a table's part-filled row groups stay as
#: written: ``safehaven.core.compaction`` rewrites the haven's tables that end up in many more
#: row groups than their rows need.
MAX_VACUUM_TASKS = 0


def _prepare_instance(instance: duckdb.DuckDBPyConnection) -> None:
    """Set up a new DuckDB instance for the store: the crypto module, encrypted spill files, and no
    row-group merges at checkpoints (:data:`MAX_VACUUM_TASKS`)."""
    instance.execute(f"LOAD '{httpfs_extension_path()}'")
    instance.execute("SET temp_file_encryption = true")
    instance.execute(f"SET max_vacuum_tasks = {MAX_VACUUM_TASKS}")


#: DuckDB threads of a store connection whose ``threads`` is not given (the haven resource's
#: ``threads: 0``). None: DuckDB's own default, one per core. The test suite sets 1
#: (``tests/conftest.py``): its workers already keep every core busy, and a DuckDB instance of
#: two threads per worker spent a third more CPU on the suite's small queries
#: (``tests/unit/test_review.py`` alone: 88 CPU seconds against 65).
DEFAULT_THREADS: int | None = None

#: The store's memory when the haven sets none (:func:`default_memory_limit`, issue 22): this share
#: of the memory the process may use, at least ``MEMORY_FLOOR``. DuckDB's own default is 80%
#: (``DUCKDB_DEFAULT_SHARE``), and it keeps what it has read up to its limit, so a night's peak grew
#: with the history its steps read (a release checked over every record the agreement covers,
#: outputs counted over their whole period): about 110 MiB a night at 1M rows a night, measured.
#: A quarter leaves the rest to the run's own Python (the vault's batches), the Dagster services
#: and PostgreSQL where they share the machine (``deploy/production``). Past the limit DuckDB
#: evicts what it can read again and spills sorts, joins and aggregates to ``store/tmp``
#: (encrypted); the results are the same. Not per thread: the k-anonymity check's per-person
#: lists (``safehaven.publish.disclosure.kanon``) cannot be spilled, and they grow with people, not
#: cores (found by review: 3M people with two signatures each failed at 1 GiB).
MEMORY_SHARE = 0.25
MEMORY_FLOOR = 2**30
DUCKDB_DEFAULT_SHARE = 0.8
#: DuckDB's text for a memory size (``current_setting('memory_limit')``: "18.8 GiB", "512.0 MiB")
_SIZE = re.compile(r"^\s*([0-9.]+)\s*(bytes|B|KiB|MiB|GiB|TiB|PiB|KB|MB|GB|TB|PB)\s*$")
_UNITS = {"bytes": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15}  # fmt: skip


def _size_bytes(text: str) -> int | None:
    """Bytes of a DuckDB memory size as DuckDB prints it; None when it does not read as one."""
    found = _SIZE.match(text)
    return int(float(found.group(1)) * _UNITS[found.group(2)]) if found else None


def memory_limit_bytes(con: duckdb.DuckDBPyConnection) -> int | None:
    """``con``'s memory limit in bytes (``current_setting('memory_limit')``); None when its text
    does not read as a size."""
    return _size_bytes(str(con.execute("SELECT current_setting('memory_limit')").fetchone()[0]))  # type: ignore[index]


@functools.cache
def _duckdbs_own_limit() -> int | None:
    """DuckDB's default memory limit in this process (80% of the memory it may use, a container's
    limit included), read once from a bare instance; None when it cannot be read."""
    probe = duckdb.connect()
    try:
        return memory_limit_bytes(probe)
    finally:
        probe.close()


@functools.cache
def _readable_memory_limit(value: str) -> str:
    """``value`` when DuckDB reads it as a memory limit; else :class:`MemoryLimitInvalid` naming it
    and where it is set (a mistyped limit is never ignored, nor left to DuckDB's bare words)."""
    probe = None
    try:
        probe = duckdb.connect(config={"memory_limit": value})
    except duckdb.Error as exc:
        raise MemoryLimitInvalid(
            f"the store's memory limit {value!r} is not a size DuckDB reads ({' '.join(str(exc).split())}): set "
            '$SAFEHAVEN_MEMORY_LIMIT or the haven resource\'s memory_limit to a size such as "8GB" or "1536MiB", '
            "or leave it empty for the default, and run it again"
        ) from None
    finally:
        if probe is not None:
            probe.close()
    return value


def default_memory_limit() -> str | None:
    """The memory limit of a store whose haven sets none: ``MEMORY_SHARE`` of the memory the process
    may use (DuckDB's own default over ``DUCKDB_DEFAULT_SHARE``), at least ``MEMORY_FLOOR``, at most
    DuckDB's own default. None (DuckDB's own) where that default cannot be read."""
    own = _duckdbs_own_limit()
    if own is None:
        return None
    budget = max(MEMORY_FLOOR, round(own / DUCKDB_DEFAULT_SHARE * MEMORY_SHARE))
    return f"{min(budget, own)}B"


def _opens(path: Path, key: Key) -> bool:
    """Whether ``key`` opens the encrypted store file at ``path`` (read-only, in a DuckDB of its own)."""
    probe = duckdb.connect()
    try:
        _prepare_instance(probe)
        probe.execute(f"ATTACH '{path}' AS _probe (ENCRYPTION_KEY '{key.hex}', READ_ONLY)")
        return True
    except duckdb.Error:
        return False
    finally:
        probe.close()


def _attach_failed(path: Path, key: Key, message: str) -> str:
    """Why ``key`` did not open the store at ``path``: the wrong key, the store in use, or another
    fault, each said as such (a store busy or damaged is not blamed on its key: found by review)."""
    if DUCKDB_WRONG_KEY in message:
        return f"key {key.key_id} does not open the encrypted store {path}: it is not the store's key"
    if DUCKDB_LOCK_HELD in message:
        return f"the encrypted store {path} is in use by another process; run this again when it has finished"
    return f"the encrypted store {path} could not be opened ({message}); the key was not judged"


class Store:
    """Opens the encrypted store; the only place that attaches it.

    ``keyring`` omitted is the key ring of ``home``'s ``keys/`` without a custodian. That default
    is kept on purpose (issue 13): the store key is never sealed, so a custodian's ring reads the
    same key from the same directory, and no contracts are involved. Code holding the context
    opens the store with its key ring (``safehaven.context.Haven.store``).
    """

    def __init__(
        self,
        home: Home,
        keyring: KeyRing | None = None,
        threads: int | None = None,
        *,
        lock_wait: float = DEFAULT_LOCK_WAIT_SECONDS,
        logger: logging.Logger | None = None,
        memory_limit: str | None = None,
    ):
        self.home = home
        self.keyring = keyring or KeyRing(home.keys)
        self.threads = threads
        #: DuckDB's ``memory_limit`` for this store's connections (e.g. ``"1.5GB"``); None: the
        #: home's (``Home.memory_limit``), else the haven's default (:func:`default_memory_limit`).
        #: Past it DuckDB spills to ``store/tmp``.
        self.memory_limit = memory_limit or home.memory_limit
        self.lock_wait = lock_wait
        self.logger = logger or log
        #: set while this object holds the rebuild lock exclusively (its own connections skip it)
        self._exclusive_held = False

    @property
    def path(self) -> Path:
        return self.home.store_file

    @property
    def journal(self) -> Path:
        return self.home.store_dir / "rebuild.json"

    @property
    def _next_file(self) -> Path:
        return self.home.store_dir / "haven.duckdb.next"

    @property
    def lock_file(self) -> Path:
        """Held shared by every connection and exclusively by a rebuild (module docstring)."""
        return self.home.store_dir / "store.lock"

    def check(self) -> None:
        """Refuse to start on unsafe keys (see ``safehaven.core.keys``) or a store without its key."""
        self.recover()
        self._check_key()

    def _check_key(self) -> None:
        if self.path.exists() and not self.keyring.exists("store"):
            raise StoreError(
                f"the encrypted store {self.path} exists but its key "
                f"{self.keyring.path('store')} is missing; restore the key file "
                "(a new key cannot open the existing store)"
            )
        if self.keyring.exists("store"):
            self.keyring.get("store")

    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection with the store attached as ``store`` and in use.

        Unqualified names resolve in the store; zones are schemas (``landing.gp_events``).
        Waits for another process holding the store (module docstring, "Waiting, not failing").
        """
        con, pool_key = POOL.take(self._config(), _prepare_instance)
        lock_fd: int | None = None
        try:
            waiter = _Waiter(self.lock_wait, self.logger, self.path)
            while True:
                lock_fd, busy = self._try_attach(con, read_only)
                if busy is None:
                    break
                waiter.pause(busy)
            con.execute(f"USE {CATALOG}")
            if not read_only:
                _ensure_zones(con)
            _OPENED_BY[con] = self.home
            try:
                yield con
            except StoreOutOfMemory:
                raise  # a connection opened inside this one said it already, with its own limit
            except duckdb.OutOfMemoryException as exc:
                raise StoreOutOfMemory(self._out_of_memory(con, exc)) from exc
        finally:
            _OPENED_BY.pop(con, None)
            try:
                POOL.give_back(con, pool_key)
            finally:  # even when the reset is interrupted: the store's rebuild lock is never kept
                if lock_fd is not None:
                    os.close(lock_fd)

    def _out_of_memory(self, con: duckdb.DuckDBPyConnection, exc: duckdb.OutOfMemoryException) -> str:
        """Why a statement failed for memory or spill space, and what to give the store (DuckDB's
        own text kept: it names sizes and settings only, never a value)."""
        try:
            limit = str(con.execute("SELECT current_setting('memory_limit')").fetchone()[0])  # type: ignore[index]
        except duckdb.Error:  # e.g. an aborted transaction: the limit the connection was given
            limit = self.memory_limit or default_memory_limit() or "DuckDB's default"
        said = " ".join(str(exc).split()) or type(exc).__name__
        spill = self.home.store_dir / "tmp"
        if any(m in said for m in DUCKDB_SPILL_FULL):
            return (
                f"DuckDB ran out of room to spill the store's work to {spill} (the store's memory limit is {limit}): "
                f"free space on the disk that holds {spill}, or give the store more memory (below), and run it "
                f"again. {_RAISE_MEMORY} DuckDB said: {said}"
            )
        return (
            f"the store's work needed more than its memory limit of {limit} and DuckDB could not spill it to "
            f"{spill}: give the store more memory and run it again. {_RAISE_MEMORY} DuckDB said: {said}"
        )

    def _config(self) -> dict[str, str | int | bool]:
        """The DuckDB configuration of this store's connections (spill directory, threads, memory)."""
        self.home.ensure()
        tmp = self.home.store_dir / "tmp"
        tmp.mkdir(exist_ok=True)
        config: dict[str, str | int | bool] = {"temp_directory": str(tmp)}
        threads = self.threads or DEFAULT_THREADS
        if threads:
            config["threads"] = threads
        memory = _readable_memory_limit(self.memory_limit) if self.memory_limit else default_memory_limit()
        if memory:
            config["memory_limit"] = memory
        return config

    @contextmanager
    def opened_with(self, key: Key) -> Iterator[duckdb.DuckDBPyConnection]:
        """The store attached read-only with ``key``, a store key file the key ring has no note of.

        The key custodian's check before recording it again (``safehaven.protect.key_record``):
        the store's encryption is authenticated (AES-GCM), so no other key opens it. Refused
        (:class:`StoreError`, the key's hex never shown) when it does not open, or while the store is
        being rebuilt or held by another process."""
        con, pool_key = POOL.take(self._config(), _prepare_instance)
        lock_fd = self._share_lock()
        try:
            if lock_fd is None:
                raise StoreError("another process is rebuilding the store (disposal or store-key rotation)")
            try:
                con.execute(f"ATTACH '{self.path}' AS {CATALOG} (ENCRYPTION_KEY '{key.hex}', READ_ONLY)")
            except duckdb.Error as exc:
                raise StoreError(_attach_failed(self.path, key, str(exc).replace(key.hex, "<key>"))) from None
            con.execute(f"USE {CATALOG}")
            yield con
        finally:
            try:
                POOL.give_back(con, pool_key)
            finally:
                if lock_fd is not None:
                    os.close(lock_fd)

    def _try_attach(self, con: duckdb.DuckDBPyConnection, read_only: bool) -> tuple[int | None, str | None]:
        """One attempt to attach: (the shared lock's descriptor, None) or (None, why it is busy)."""
        lock_fd = None if self._exclusive_held else self._share_lock()
        if lock_fd is None and not self._exclusive_held:
            return None, "another process is rebuilding it (disposal or store-key rotation)"
        try:
            self._check_key()
            key = self.keyring.get_or_create("store", allow_create=not self.path.exists())
            options = f"ENCRYPTION_KEY '{key.hex}'" + (", READ_ONLY" if read_only else "")
            try:
                con.execute(f"ATTACH '{self.path}' AS {CATALOG} ({options})")
            except duckdb.Error as exc:
                message = str(exc).replace(key.hex, "<key>")
                if DUCKDB_LOCK_HELD not in message:
                    raise StoreError(f"cannot open the encrypted store {self.path}: {message}") from None
                if lock_fd is not None:
                    os.close(lock_fd)
                return None, "another process holds its file lock"
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return lock_fd, None

    def _share_lock(self) -> int | None:
        """Take the rebuild lock shared, finishing an interrupted rebuild first; None if one is live."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if self.journal.exists():
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._recover_held()
                fcntl.flock(fd, fcntl.LOCK_SH)
            else:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the rebuild lock exclusively (waiting for open connections, as ``connect`` waits)."""
        if self._exclusive_held:
            yield
            return
        self.home.ensure()
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            waiter = _Waiter(self.lock_wait, self.logger, self.path)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waiter.pause("another process has it open")
            self._exclusive_held = True
            yield
        finally:
            self._exclusive_held = False
            os.close(fd)

    def recover(self) -> str | None:
        """Finish or undo an interrupted rebuild; returns what was done, if anything.

        Done under the exclusive rebuild lock (waiting for it), so a rebuild that is still
        running in another process is never mistaken for an interrupted one. Journal state
        ``building``: the new file may be partial, so it and its key are removed (the old
        store is intact). State ``swapping``: the new file is complete, so the swap is
        finished: file first, then key, each an atomic rename, each skipped if already done.
        """
        if not self.journal.exists():
            return None
        with self._exclusive():
            return self._recover_held()

    def _recover_held(self) -> str | None:
        """:meth:`recover` under the lock. A swap is finished only with the key the journal names,
        proven to open the file being swapped in; the old key is shredded only after (a forged or
        stale journal, or a new file someone removed, shredded the only key that opened the store:
        found by review). Otherwise refused, every file and the journal kept."""
        if not self.journal.exists():
            return None
        state = self._journal_state()
        next_key = self.keyring.path("store-next")
        if state.get("state") == "building":
            self._next_file.unlink(missing_ok=True)
            self._next_file.with_name(self._next_file.name + ".wal").unlink(missing_ok=True)
            self.keyring.discard("store-next")
            self.journal.unlink()
            return "discarded a half-built store"
        key = self.keyring.get("store-next") if next_key.exists() else self.keyring.file_key("store")
        target = self._next_file if self._next_file.exists() else self.path
        if key is None or key.key_id != state.get("new_key_id") or not _opens(target, key):
            raise StoreError(
                f"{self.journal} says a store swap to key {state.get('new_key_id')} was interrupted, but no key file "
                f"holding that key opens {target}; nothing was changed. If no store-key rotation or disposal was "
                "running, the journal is not the haven's: the key custodian moves it (and keys/store-next.key) aside"
            )
        if self._next_file.exists():
            os.replace(self._next_file, self.path)
        self.path.with_name(self.path.name + ".wal").unlink(missing_ok=True)
        if next_key.exists():
            installed = self.keyring.file_key("store")  # replaced unless it is the new key: no pin needed
            if installed is None or installed.key_id != key.key_id:
                self.keyring.write("store", key.material, replace=True)  # shreds the old key
            self.keyring.discard("store-next")
        shutil.rmtree(self.home.store_dir / "tmp", ignore_errors=True)
        self.journal.unlink()
        return "completed an interrupted store swap"

    def _journal_state(self) -> dict[str, str]:
        """The rebuild journal's state; refused, naming the file, when it cannot be read as one."""
        try:
            state = json.loads(self.journal.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"the store rebuild journal {self.journal} cannot be read ({type(exc).__name__}); nothing was "
                "changed. If no store-key rotation or disposal was running, the key custodian moves it aside"
            ) from None
        if not isinstance(state, dict):
            raise StoreError(f"the store rebuild journal {self.journal} is not a journal; the key custodian judges it")
        return state

    def rebuild(self, *, rekey: bool = True, _crash_after: str | None = None) -> dict[str, str]:
        """Copy the live store into a fresh file (under a fresh key) and swap it in atomically.

        Afterwards no deleted row's bytes remain in the store file, its WAL or temp files, and
        with ``rekey`` the old file's key is gone too. Returns the old and new key ids.
        ``_crash_after`` (tests only) stops at a named step to simulate a crash.
        """
        with self._exclusive():
            return self._rebuild_held(rekey, _crash_after)

    def _rebuild_held(self, rekey: bool, _crash_after: str | None) -> dict[str, str]:
        self.check()
        old = self.keyring.get("store")
        new_material = secrets.token_bytes(32) if rekey else old.material
        self._next_file.unlink(missing_ok=True)
        with self.connect() as con:  # opening runs recovery, so the journal starts after it
            self._write_journal({"state": "building"})
            new_key = self.keyring.write("store-next", new_material, replace=True, record=False)
            con.execute("CHECKPOINT")
            con.execute(f"ATTACH '{self._next_file}' AS _next (ENCRYPTION_KEY '{new_key.hex}')")
            con.execute(f"COPY FROM DATABASE {CATALOG} TO _next")
            con.execute("DETACH _next")
        fd = os.open(self._next_file, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        if _crash_after == "build":
            raise SimulatedCrash("simulated crash after build")
        self._write_journal({"state": "swapping", "new_key_id": new_key.key_id})
        if _crash_after == "journal":
            raise SimulatedCrash("simulated crash before swap")
        self._recover_held()
        return {"old_key_id": old.key_id, "new_key_id": new_key.key_id}

    def _write_journal(self, state: dict[str, str]) -> None:
        replace_whole(self.journal, json.dumps(state))

    def table_exists(self, con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
        return table_exists(con, schema, table)


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """One transaction on ``con``: committed when the block ends, rolled back if it raises (all or nothing)."""
    con.execute("BEGIN TRANSACTION")
    with _ended(con):
        yield


@contextlib.contextmanager
def atomic(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """The block all or nothing: inside the caller's transaction when one is open (its commit or
    rollback then covers the block), else in one of its own (:func:`transaction`). For work whose
    parts must never be stored alone, whoever calls it."""
    if in_transaction(con):
        yield
        return
    con.execute("BEGIN TRANSACTION")
    with _ended(con):
        yield


def in_transaction(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether ``con`` has a transaction open: two statements share a transaction id only inside
    one (each autocommitted statement has its own). A ``BEGIN`` tried to find out would abort the
    caller's transaction when it fails."""
    first = con.execute("SELECT txid_current()").fetchone()[0]  # type: ignore[index]
    return first == con.execute("SELECT txid_current()").fetchone()[0]  # type: ignore[index]


@contextlib.contextmanager
def _ended(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Commit the transaction just begun when the block ends; roll it back if the block raises."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(duckdb.Error):  # DuckDB may have rolled back already
            con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


#: rows per statement of :func:`insert_values`
INSERT_VALUES_CHUNK = 500


def insert_values(con: duckdb.DuckDBPyConnection, into: str, row: str, rows: Sequence[Sequence[object]]) -> None:
    """``INSERT INTO <into> VALUES <row>, <row>, ...`` with ``rows`` bound in order: what
    ``executemany`` of ``INSERT INTO <into> VALUES <row>`` does, in one statement per
    :data:`INSERT_VALUES_CHUNK` rows.

    DuckDB runs ``executemany`` as one statement per row (about 0.25 ms each); a VALUES list
    casts each bound value to its column's type as the one-row statement does, so the rows
    stored are the same. ``row`` is the parenthesised row of placeholders (it may hold SQL such
    as ``now()``, which inside the caller's transaction is the same for every row either way).
    For a bounded number of rows (a contract's rules, an output's columns), not for data rows.
    No rows: ``executemany``'s own error, as before.
    """
    if not rows:
        con.executemany(f"INSERT INTO {into} VALUES {row}", rows)
        return
    for start in range(0, len(rows), INSERT_VALUES_CHUNK):
        chunk = rows[start : start + INSERT_VALUES_CHUNK]
        con.execute(f"INSERT INTO {into} VALUES " + ", ".join([row] * len(chunk)), [v for r in chunk for v in r])


#: what DuckDB's Python client raises when a signal (Ctrl-C, a run's termination) stops a query
#: while it runs: a ``RuntimeError`` of this text, the ``KeyboardInterrupt`` itself consumed
#: (duckdb 1.4.4; ``duckdb.InterruptException`` where it raises that)
QUERY_INTERRUPTED = "Query interrupted"


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is DuckDB stopping a query on a signal (:data:`QUERY_INTERRUPTED`): code that
    contains a failure (a file refused rather than a failed stage) raises ``KeyboardInterrupt``
    for it instead, so a Ctrl-C or a terminated run stops the run and refuses nothing."""
    return isinstance(exc, duckdb.InterruptException) or (type(exc) is RuntimeError and str(exc) == QUERY_INTERRUPTED)


def functions_stored(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the store holds a function or macro of its own: the haven stores none (its macros
    are temporary), and one stored by someone else could stand in for ``hash`` or ``sum`` in a
    seal's digest (``safehaven.protect.register_seal``, ``safehaven.intake.batch_seal``)."""
    return bool(
        con.execute(
            f"SELECT count(*) FROM duckdb_functions() WHERE NOT internal AND database_name = '{CATALOG}'"
        ).fetchone()[0]
    )


#: a name the catalog lookup of :func:`table_exists` is asked directly: lower case, no quoting needed
_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def table_exists(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    """Whether ``schema.table`` exists in the database in use (the one place that asks).

    On a ``Store.connect`` connection that is the store (``USE store``); on any other
    connection (a test's in-memory database, the analysts' published file) it is that one.

    A table or view of a plain lower-case name is looked up in the catalog directly
    (:func:`_looked_up`: a small part of the cost of the ``duckdb_tables()`` scan; a night asks
    some 300 times, nearly always for a table that exists). The lookup is DuckDB's own, case
    blind as SQL is; every table and schema the haven makes has a lower-case name
    (``safehaven.core.schema``, the contracts' ``NAME``), so for them it answers as the scan
    does. The name is qualified with the database in use, so no temporary table, other
    database or replacement scan of a Python variable answers for it, and a failed lookup
    leaves a transaction open. Any other name, or any other error, is answered by the scan
    (:func:`_listed`).
    """
    columns = _looked_up(con, schema, table)
    return bool(columns) if columns is not None else _listed(con, schema, table)


def table_columns(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> list[str]:
    """The column names of table or view ``schema.table`` in the database in use, in order; none
    when there is no such table or view. Looked up as :func:`table_exists` looks (a plain
    lower-case name in the catalog directly), else by the ``duckdb_columns()`` listing."""
    columns = _looked_up(con, schema, table)
    if columns is not None:
        return columns
    listed = con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
        "AND schema_name = ? AND table_name = ? ORDER BY column_index",
        [schema, table],
    ).fetchall()
    return [name for (name,) in listed]


def _looked_up(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> list[str] | None:
    """The columns of ``schema.table`` by the catalog lookup (none: no table or view of that name,
    in any case, in that schema); None when the lookup cannot tell (a name that is not plain
    lower case, or any other error), for the listings to answer.

    A table of the store, on a connection ``Store.connect`` opened, is found by :func:`_table`
    (no statement: 2 microseconds against 0.18 ms for :func:`_entry`; the suite asks some
    100,000 times, a night some 300); anything else (a view, a name not there, another
    connection) by :func:`_entry`. Neither binds a view's query or aborts a caller's transaction.
    """
    if not (_PLAIN_NAME.fullmatch(schema) and _PLAIN_NAME.fullmatch(table)):
        return None
    columns = _table(con, schema, table)
    return columns if columns is not None else _entry(con, schema, table)


def _table(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> list[str] | None:
    """The columns of the store's table ``schema.table``, read from its catalog entry through
    DuckDB's relation API (``con.table``: nothing parsed, bound or run), on a connection
    ``Store.connect`` opened; None for a view (whose query it would not bind), a name that is
    not a table, or any other connection. The store is taken to be the database in use, as
    ``connect`` leaves it (``USE store``): nothing in the haven selects another on such a
    connection, and one that did would be answered for the store here."""
    if con not in _OPENED_BY:
        return None
    try:
        return con.table(f"{CATALOG}.{schema}.{table}").columns
    except duckdb.Error:
        return None


def _entry(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> list[str] | None:
    """The columns of the catalog entry ``schema.table`` (``pragma_table_info``: a view's as
    made, without binding its query); none when there is no such entry, None on another error."""
    try:
        rows = con.execute(
            f"SELECT name FROM pragma_table_info('\"' || current_database() || '\".{schema}.{table}')"
        ).fetchall()
    except duckdb.CatalogException:
        return []
    except duckdb.Error:
        return None
    return [name for (name,) in rows]


def _listed(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    """:func:`table_exists` by the catalog's listings, exact names compared (any name)."""
    # duckdb_tables() first: information_schema.tables is a view over it and over every view
    # (DuckDB's internal ones included, each rendered as SQL), so it costs ~3x as much; views,
    # which information_schema.tables also lists, are looked up only when no table matched.
    for catalog, name_col in (("duckdb_tables()", "table_name"), ("duckdb_views()", "view_name")):
        row = con.execute(
            f"SELECT count(*) FROM {catalog} "
            f"WHERE database_name = current_database() AND schema_name = ? AND {name_col} = ?",
            [schema, table],
        ).fetchone()
        if row and row[0]:
            return True
    return False
