"""The Dagster instance's SQLite storage (``resources.instance_storage``): Dagster's own files and
schema, its databases kept open, and a live run still followed by the webserver's watch."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.errors import DagsterInvariantViolationError
from dagster._core.storage.event_log.base import EventLogCursor

from resources.instance_storage import (
    OPEN_RUN_SHARDS,
    SYNCHRONOUS,
    HavenSqliteEventLogStorage,
    HavenSqliteRunStorage,
    HavenSqliteScheduleStorage,
)
from tests.conftest import DAGSTER_YAML, instance_settings

#: SQLite's code of each ``PRAGMA synchronous`` level
SYNCHRONOUS_LEVELS = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}


@dg.op
def say(context) -> None:  # noqa: ANN001 (Dagster reads the annotation)
    context.log.info("a line of the run's log")


@dg.job
def small() -> None:
    say()


def _instance(dagster_home: Path):
    return dg.instance_for_test(**instance_settings(dagster_home))


def test_the_project_instance_settings_name_this_storage_under_dagster_home() -> None:
    storage = yaml.safe_load(DAGSTER_YAML.read_text())["storage"]["custom"]
    assert (storage["module"], storage["class"]) == ("resources.instance_storage", "HavenSqliteStorage")
    assert storage["config"] == {"base_dir": {"env": "DAGSTER_HOME"}}


def test_a_run_is_stored_in_dagsters_own_layout_and_reads_back_with_dagsters_own_storage(tmp_path: Path) -> None:
    with _instance(tmp_path) as instance:
        assert isinstance(instance.event_log_storage, HavenSqliteEventLogStorage)
        assert isinstance(instance.run_storage, HavenSqliteRunStorage)
        run_id = small.execute_in_process(instance=instance).run_id
        written = [e.dagster_event_type for e in instance.all_logs(run_id) if e.is_dagster_event]
    assert (tmp_path / "history" / "runs.db").exists()
    assert (tmp_path / "history" / "runs" / f"{run_id}.db").exists()
    with dg.instance_for_test(temp_dir=str(tmp_path)) as plain:  # Dagster's default SQLite storage
        assert type(plain.event_log_storage).__name__ == "SqliteEventLogStorage"
        assert plain.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
        assert [e.dagster_event_type for e in plain.all_logs(run_id) if e.is_dagster_event] == written


def test_connections_commit_in_wal_mode_with_normal_sync(tmp_path: Path) -> None:
    with _instance(tmp_path) as instance:
        run_id = small.execute_in_process(instance=instance).run_id
        storage = instance.event_log_storage
        for shard in (run_id, "index"):
            with storage._connect(shard) as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == SYNCHRONOUS_LEVELS[SYNCHRONOUS]
        with instance.run_storage.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == SYNCHRONOUS_LEVELS[SYNCHRONOUS]


def test_a_run_worker_rebuilds_the_same_storage_from_the_instance_ref(tmp_path: Path) -> None:
    with _instance(tmp_path) as instance:
        with dg.DagsterInstance.from_ref(instance.get_ref()) as worker:
            assert isinstance(worker.event_log_storage, HavenSqliteEventLogStorage)
            assert isinstance(worker.run_storage, HavenSqliteRunStorage)
            assert isinstance(worker.schedule_storage, HavenSqliteScheduleStorage)
            assert Path(worker.run_storage._conn_string.removeprefix("sqlite:///")).parent == tmp_path / "history"


def test_a_watcher_sees_each_event_while_the_writers_connection_stays_open(tmp_path: Path) -> None:
    """The webserver follows a live run by watching its database file; a commit with the
    connection kept open writes only the WAL, so the storage touches the file after a write."""
    with _instance(tmp_path) as writer, dg.DagsterInstance.from_ref(writer.get_ref()) as reader:
        run_id = small.execute_in_process(instance=writer).run_id  # the shard exists and is open
        seen: list[str] = []
        arrived = threading.Event()

        def on_event(entry, _cursor) -> None:
            seen.append(entry.message)
            if entry.message == "written after the watch began":
                arrived.set()

        cursor = str(
            EventLogCursor.from_storage_id(max(r.storage_id for r in writer.get_records_for_run(run_id).records))
        )
        reader.watch_event_logs(run_id, cursor, on_event)
        try:
            writer.report_engine_event("written after the watch began", writer.get_run_by_id(run_id))
            assert arrived.wait(timeout=10), f"the watcher saw {seen}"
        finally:
            reader.end_watch_event_logs(run_id, on_event)


def test_more_runs_than_open_shards_still_write_and_read(tmp_path: Path) -> None:
    with _instance(tmp_path) as instance:
        ids = [small.execute_in_process(instance=instance).run_id for _ in range(OPEN_RUN_SHARDS + 3)]
        assert all(instance.get_run_by_id(i).status == dg.DagsterRunStatus.SUCCESS for i in ids)
        assert all(any(e.user_message == "a line of the run's log" for e in instance.all_logs(i)) for i in ids)


def _messages(instance, run_id: str) -> list[str]:
    return [e.message for e in instance.all_logs(run_id)]


def test_a_forked_childs_writes_survive_its_parent_closing_the_instance(tmp_path: Path) -> None:
    """A SQLite connection must not cross a fork: a child that inherited the open storage opens
    its own connections, so what it writes after its parent closed the instance is kept (found
    by review: the parent's close deleted the WAL the child was still writing to)."""
    with _instance(tmp_path) as instance:
        run = instance.get_run_by_id(small.execute_in_process(instance=instance).run_id)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: wait for the parent to close, then write
            os.close(read)
            time.sleep(1.0)
            written = 0
            with contextlib.suppress(BaseException):
                for i in range(5):
                    instance.report_engine_event(f"child {i}", run)
                    written += 1
            os.write(write, str(written).encode())
            os._exit(0)
        os.close(write)
    os.waitpid(pid, 0)
    written = int(os.read(read, 16).decode() or 0)
    os.close(read)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as plain:
        kept = [m for m in _messages(plain, run.run_id) if m.startswith("child ")]
    assert written == 5 and len(kept) == 5


def test_what_is_written_after_a_wipe_is_kept(tmp_path: Path) -> None:
    """``wipe`` deletes the shards' files: the storage closes them first, so a later write makes a
    new file rather than going into a deleted one (found by review)."""
    with _instance(tmp_path) as instance:
        run = instance.get_run_by_id(small.execute_in_process(instance=instance).run_id)
        instance.wipe()
        instance.report_engine_event("after the wipe", run)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as plain:
        assert "after the wipe" in _messages(plain, run.run_id)


def test_an_instance_opened_from_another_home_than_dagster_home_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``deploy/dagster.yaml`` places the storage in $DAGSTER_HOME: an instance opened from another
    directory would read and write that home's runs, so it is refused, saying what to set."""
    named, opened = tmp_path / "named", tmp_path / "opened"
    named.mkdir()
    opened.mkdir()
    shutil.copy(DAGSTER_YAML, opened / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(named))
    with pytest.raises(DagsterInvariantViolationError, match="set DAGSTER_HOME to the instance's directory"):
        dg.DagsterInstance.from_config(str(opened))
    assert {p.name for p in (named / "history" / "runs").glob("*.db")} <= {"index.db"}, "no run went there"
