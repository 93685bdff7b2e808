"""Opening a busy store waits for it, with backoff, up to a limit (issue 17: "Waiting, not failing").

The holder is a real second process: DuckDB's file lock is per process. It holds the store until
the test lets it go (``_release``: its standard input closed), so no test waits longer than the
behaviour it proves needs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from resources.haven import SafeHavenResource
from safehaven.core.home import Home
from safehaven.core.store import Store, StoreBusy

HOLD = """
import sys
from pathlib import Path
from safehaven.core.home import Home
from safehaven.core.store import Store
with Store(Home(Path(sys.argv[1]))).connect(read_only=sys.argv[2] == "ro") as con:
    con.execute("SELECT count(*) FROM landing.t").fetchone()
    print("holding", flush=True)
    sys.stdin.read()
"""

HOLD_EMPTY = """
import sys
from pathlib import Path
from safehaven.core.home import Home
from safehaven.core.store import Store
with Store(Home(Path(sys.argv[1]))).connect() as con:
    print("holding", flush=True)
    sys.stdin.read()
"""

REBUILDING = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("holding", flush=True)
sys.stdin.read()
"""


#: How long a holder that a connection should outwait holds the store (``_release_after``).
HOLD_SECONDS = 1.0


#: The holders a test started (``_hold``), let go at its end whatever happened (``_let_go``).
_HOLDERS: list[subprocess.Popen] = []


def _hold(args: list[str]) -> subprocess.Popen:
    """A second process holding the store (or the rebuild lock) until ``_release``."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    _HOLDERS.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    return proc


def _release(holder: subprocess.Popen) -> subprocess.Popen:
    """Let the holder go: it closes the store and exits."""
    assert holder.stdin is not None
    if not holder.stdin.closed:
        holder.stdin.close()
    return holder


@pytest.fixture(autouse=True)
def _let_go() -> Iterator[None]:
    """Every holder a test started is let go and reaped when the test ends, even a failed one."""
    yield
    while _HOLDERS:
        holder = _HOLDERS.pop()
        _release(holder).wait(timeout=30)
        if holder.stdout is not None:
            holder.stdout.close()


def _release_after(holder: subprocess.Popen, seconds: float = HOLD_SECONDS) -> threading.Timer:
    """Let the holder go ``seconds`` from now, while the test waits for the store."""
    timer = threading.Timer(seconds, _release, [holder])
    timer.start()
    return timer


@pytest.fixture
def filled(store: Store) -> Store:
    with store.connect() as con:
        con.execute("CREATE TABLE landing.t AS SELECT range AS n FROM range(10)")
    return store


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_a_writer_waits_for_a_reader_or_writer_in_another_process_and_succeeds(
    filled: Store, home: Home, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    holder = _hold([HOLD, str(home.root), mode])
    started = time.monotonic()
    _release_after(holder, 2.0)  # held twice as long as asserted: a store giving up early fails
    with caplog.at_level(logging.WARNING, logger="safehaven.core.store"):
        with filled.connect() as con:
            con.execute("INSERT INTO landing.t VALUES (10)")
            assert con.execute("SELECT count(*) FROM landing.t").fetchone()[0] == 11
    assert time.monotonic() - started >= 1.0, "it waited for the holder rather than failing"
    assert holder.wait(timeout=30) == 0
    assert any("busy" in r.getMessage() and "waiting" in r.getMessage() for r in caplog.records)


def test_a_reader_waits_for_a_writer_in_another_process(filled: Store, home: Home) -> None:
    holder = _hold([HOLD, str(home.root), "rw"])
    started = time.monotonic()
    _release_after(holder)
    with filled.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM landing.t").fetchone()[0] == 10
    assert time.monotonic() - started >= 1.0
    assert holder.wait(timeout=30) == 0


def test_past_the_limit_the_connection_fails_with_store_busy_and_then_recovers(filled: Store, home: Home) -> None:
    holder = _hold([HOLD, str(home.root), "rw"])
    impatient = Store(home, lock_wait=0.5)
    with pytest.raises(StoreBusy, match="busy for"):
        with impatient.connect():
            pass
    assert _release(holder).wait(timeout=30) == 0
    with impatient.connect() as con:  # the holder has gone: the next attempt succeeds
        assert con.execute("SELECT count(*) FROM landing.t").fetchone()[0] == 10


def test_a_connection_waits_while_another_process_rebuilds_the_store(filled: Store, home: Home) -> None:
    holder = _hold([REBUILDING, str(filled.lock_file)])
    started = time.monotonic()
    _release_after(holder)
    with filled.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM landing.t").fetchone()[0] == 10
    assert time.monotonic() - started >= 1.0
    assert holder.wait(timeout=30) == 0


def test_a_half_done_rebuild_is_not_touched_while_its_process_is_alive(filled: Store, home: Home) -> None:
    filled.journal.write_text('{"state": "building"}')
    next_file = home.store_dir / "haven.duckdb.next"
    next_file.write_bytes(b"partial")
    holder = _hold([REBUILDING, str(filled.lock_file)])
    with pytest.raises(StoreBusy):
        with Store(home, lock_wait=0.3).connect():
            pass
    assert next_file.exists() and filled.journal.exists(), "a live rebuild's files are left alone"
    assert _release(holder).wait(timeout=30) == 0
    with filled.connect(read_only=True) as con:  # its process has gone: now it is recovered
        assert con.execute("SELECT count(*) FROM landing.t").fetchone()[0] == 10
    assert not next_file.exists() and not filled.journal.exists()


def test_a_step_that_finds_the_store_busy_past_its_wait_is_retried_by_dagster(store: Store, home: Home) -> None:
    """Past ``lock_wait_seconds`` the step is not failed: it asks Dagster to retry it later
    (``resources.haven.SafeHavenResource.connect``, ``dg.RetryRequested``), and the retry succeeds."""
    with store.connect():
        pass  # a new, empty store (its audit trail has nothing to verify)
    holders: list[subprocess.Popen] = []
    first: list[float] = []

    @dg.asset
    def busy_store(context, haven: SafeHavenResource) -> int:  # noqa: ANN001 (Dagster reads the name)
        if context.retry_number == 0:  # another process takes the store during the first attempt
            holders.append(_hold([HOLD_EMPTY, str(home.root)]))
            first.append(time.monotonic())
        else:  # the retry came only after busy_retry_seconds; the holder has let it go by then
            assert time.monotonic() - first[0] >= 0.3 + 0.5, "Dagster was asked to retry later, not at once"
            _release(holders[0]).wait(timeout=30)
        with haven.connect(read_only=True) as con:
            return con.execute("SELECT 10").fetchone()[0]

    haven = SafeHavenResource(home=str(home.root), lock_wait_seconds=0.3, busy_retries=3, busy_retry_seconds=0.5)
    result = dg.materialize([busy_store], resources={"haven": haven}, raise_on_error=False)
    assert result.success
    assert [e.event_type_value for e in result.all_events].count("STEP_UP_FOR_RETRY") == 1
    assert result.output_for_node("busy_store") == 10
    assert holders and holders[0].wait(timeout=30) == 0


def test_a_store_busy_past_every_retry_fails_the_step_saying_why_and_the_next_run_goes_through(
    store: Store, home: Home
) -> None:
    """When the store stays busy through every retry the step fails, naming the store, the wait
    and what to do, having written nothing; once the holder has gone the same asset succeeds."""
    with store.connect():
        pass  # a new, empty store (its audit trail has nothing to verify)
    holders: list[subprocess.Popen] = []
    attempts: list[int] = []

    @dg.asset
    def busy_store(context, haven: SafeHavenResource) -> int:  # noqa: ANN001 (Dagster reads the name)
        attempts.append(context.retry_number)
        if context.retry_number == 0 and not holders:  # taken after the run has started, held throughout
            holders.append(_hold([HOLD_EMPTY, str(home.root)]))
        with haven.connect() as con:
            con.execute("CREATE TABLE landing.written AS SELECT 1 AS a")
            return 1

    haven = SafeHavenResource(home=str(home.root), lock_wait_seconds=0.3, busy_retries=2, busy_retry_seconds=0.5)
    result = dg.materialize([busy_store], resources={"haven": haven}, raise_on_error=False)
    assert not result.success and attempts == [0, 1, 2]
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    text = str(failure.event_specific_data.error)
    assert "was busy" in text and "the next run will try again" in text
    assert _release(holders[0]).wait(timeout=30) == 0
    with store.connect(read_only=True) as con:
        assert not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'written'").fetchone()[0]
    again = dg.materialize([busy_store], resources={"haven": haven})
    assert again.success and again.output_for_node("busy_store") == 1


def test_a_store_busy_when_the_run_starts_fails_the_run_with_the_reason(store: Store, home: Home) -> None:
    """Dagster retries steps, not resources: at run start the run fails with StoreBusy's words."""
    with store.connect():
        pass
    holder = _hold([HOLD_EMPTY, str(home.root)])

    @dg.asset
    def never_reached(haven: SafeHavenResource) -> int:
        with haven.connect(read_only=True) as con:
            return con.execute("SELECT 1").fetchone()[0]

    haven = SafeHavenResource(home=str(home.root), lock_wait_seconds=0.3)
    result = dg.materialize([never_reached], resources={"haven": haven}, raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "RESOURCE_INIT_FAILURE"]
    text = str(failure.event_specific_data.error)
    assert "StoreBusy" in text and "was busy" in text and "RetryRequested" not in text
    assert _release(holder).wait(timeout=30) == 0
