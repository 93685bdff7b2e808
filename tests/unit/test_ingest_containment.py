"""Every file is contained (issue 17): no file can fail the ingest stage or stay in incoming/.

Hostile entries: a 10 MB file with no line end, a 10 MB field inside a normal file, symbolic
links (to /etc/passwd, to a valid CSV outside the home), a symlinked collection folder, a
folder where a file should be, and an error nobody foresaw. Each is quarantined with its
rule id; the good file beside it is still landed; nothing outside the home is read or shred.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import duckdb
import pytest

from safehaven.core.files import sha256_file
from safehaven.core.home import Home
from safehaven.core.store import QUERY_INTERRUPTED, Store
from safehaven.intake import ingest
from safehaven.intake.contracts import CONTRACTS_DIR, ContractRegistry
from safehaven.intake.ingest import ingest_collection
from tests.unit.validation_helpers import gp_rows, write_csv

GP = ContractRegistry(CONTRACTS_DIR).contracts["gp_events"]
HEADER = ",".join(GP.field_names)
TEN_MB = 10 * 1024 * 1024


def _run(store: Store, home: Home) -> ingest.IngestReport:
    with store.connect() as con:
        return ingest_collection(con, GP, home.incoming_for("gp_events"), home.quarantine_for("gp_events"))


def _reason(home: Home, name: str) -> dict:
    return json.loads((home.quarantine_for("gp_events") / f"{name}.reason.json").read_text())


def _landed(store: Store) -> int:
    with store.connect(read_only=True) as con:
        return con.execute("SELECT count(*) FROM landing.gp_events").fetchone()[0]


@pytest.fixture
def folder(home: Home) -> Path:
    """The gp_events folder with one good file in it (which must land whatever sits beside it)."""
    path = home.incoming_for("gp_events")
    write_csv(path / "gp_good.csv", gp_rows(4), GP.field_names)
    return path


def test_a_10mb_file_with_no_line_end_is_quarantined_as_line_too_long(store: Store, home: Home, folder: Path) -> None:
    bad = folder / "gp_one_line.csv"
    bad.write_bytes(b"9990000018," * (TEN_MB // 11))
    report = _run(store, home)
    assert (report.files_landed, report.files_quarantined) == (1, 1)
    reason = _reason(home, "gp_one_line.csv")
    assert reason["rule"] == "file.line_too_long"
    assert "9990000018" not in json.dumps(reason)
    assert (home.quarantine_for("gp_events") / "gp_one_line.csv").stat().st_size > TEN_MB - 11
    assert not bad.exists() and _landed(store) == 4


def test_a_10mb_field_inside_a_normal_file_is_field_too_large_not_a_field_count(
    store: Store, home: Home, folder: Path
) -> None:
    rows = gp_rows(3, start=700)
    rows[1]["practice_code"] = "M" * TEN_MB
    write_csv(folder / "gp_big_field.csv", rows, GP.field_names)
    report = _run(store, home)
    assert (report.files_landed, report.files_quarantined) == (1, 1)
    reason = _reason(home, "gp_big_field.csv")
    assert reason["rule"] == "file.field_too_large"
    assert "number of fields" not in reason["reason"] and "line 3" in reason["reason"]
    assert "MMMMMMMM" not in json.dumps(reason)
    assert _landed(store) == 4


def test_a_symlink_to_a_system_file_is_quarantined_unread(store: Store, home: Home, folder: Path) -> None:
    (folder / "passwd.csv").symlink_to("/etc/passwd")
    passwd = sha256_file(Path("/etc/passwd"))
    report = _run(store, home)
    assert (report.files_landed, report.files_quarantined) == (1, 1)
    reason = _reason(home, "passwd.csv")
    assert reason["rule"] == "file.not_regular" and "symbolic link" in reason["reason"]
    assert passwd not in json.dumps(reason), "the link's target was not read"
    assert (home.quarantine_for("gp_events") / "passwd.csv").is_symlink()
    assert sha256_file(Path("/etc/passwd")) == passwd


def test_a_symlink_to_a_valid_csv_outside_the_home_is_neither_landed_nor_shredded(
    store: Store, home: Home, folder: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere" / "gp_valid.csv"
    write_csv(outside, gp_rows(6, start=900), GP.field_names)
    before = outside.read_bytes()
    (folder / "gp_link.csv").symlink_to(outside)
    report = _run(store, home)
    assert (report.files_landed, report.files_quarantined) == (1, 1)
    assert _reason(home, "gp_link.csv")["rule"] == "file.not_regular"
    assert outside.read_bytes() == before, "the target outside the home is untouched"
    assert _landed(store) == 4


def test_a_folder_inside_a_collection_folder_is_quarantined(store: Store, home: Home, folder: Path) -> None:
    (folder / "nested").mkdir()
    write_csv(folder / "nested" / "gp.csv", gp_rows(2, start=300), GP.field_names)
    report = _run(store, home)
    assert (report.files_landed, report.files_quarantined) == (1, 1)
    assert _reason(home, "nested")["rule"] == "file.not_regular"
    assert sorted(p.name for p in folder.iterdir()) == []


def test_a_symlinked_collection_folder_is_refused_and_its_target_not_listed(
    store: Store, home: Home, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    write_csv(outside / "gp_valid.csv", gp_rows(6, start=900), GP.field_names)
    before = sorted(os.listdir(outside))
    home.incoming_for("gp_events").symlink_to(outside, target_is_directory=True)
    report = _run(store, home)
    assert (report.files_landed, report.files_quarantined) == (0, 1)
    assert report.quarantined[0]["rule"] == "file.not_regular"
    assert _reason(home, "gp_events")["reason"].startswith("the collection folder incoming/gp_events is a symbolic")
    assert sorted(os.listdir(outside)) == before and (outside / "gp_valid.csv").exists()
    assert not os.path.lexists(home.incoming_for("gp_events"))


def test_an_unforeseen_error_reading_one_file_quarantines_that_file_only(
    store: Store, home: Home, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_csv(folder / "gp_odd.csv", gp_rows(2, start=100), GP.field_names)
    real = ingest.inspect_file

    def fails_on_odd(con, path, contract):  # fault injection: an error of a kind nobody foresaw
        if path.name == "gp_odd.csv":
            raise RuntimeError("value 9990000018 in a message")
        return real(con, path, contract)

    monkeypatch.setattr(ingest, "inspect_file", fails_on_odd)
    report = _run(store, home)
    assert (report.files_landed, report.files_quarantined) == (1, 1)
    reason = _reason(home, "gp_odd.csv")
    assert reason["rule"] == "file.unreadable" and "RuntimeError" in reason["reason"]
    assert "9990000018" not in json.dumps(reason), "the error's text may hold values: it is not repeated"
    assert _landed(store) == 4


@pytest.mark.parametrize(
    "name", ["*.csv", "gp_?.csv", "Q1 [final].csv", "gp_[!x]*.csv", "..\\..\\quarantine\\gp_events\\gp_link[1].csv"]
)
def test_a_name_duckdb_would_read_as_a_pattern_is_refused_unread(
    store: Store, home: Home, folder: Path, tmp_path: Path, name: str
) -> None:
    """DuckDB's readers take ``*``, ``?`` and ``[`` in a path as a glob, and split a pattern on
    ``\\`` too: a file so named would have been landed with its neighbours' rows, or with those of
    a quarantined link's target outside the home. It is quarantined unread (``file.name``); the
    good file beside it lands, and the link's target is never read (``ingest.bad_name``)."""
    outside = tmp_path / "outside.csv"
    write_csv(outside, gp_rows(5, start=500), GP.field_names)
    (folder / "gp_link[1].csv").symlink_to(outside)
    _run(store, home)  # the link is quarantined (file.not_regular) under its own name
    assert (home.quarantine_for("gp_events") / "gp_link[1].csv").is_symlink()
    write_csv(folder / name, gp_rows(1, start=900), GP.field_names)
    report = _run(store, home)
    assert report.files_landed == 0 and [r["rule"] for r in report.quarantined] == ["file.name"]
    assert _landed(store) == 4


def test_a_refused_file_that_cannot_be_moved_stays_named_by_its_shown_name_and_the_stage_goes_on(
    store: Store, home: Home, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The haven's user may lack the right to move a sender's file out of incoming/ (a sticky or
    read-only folder): the move fails with an OSError whose message is the raw path. The file is
    left where it is, named by its shown name only, any half-made copy is removed, nothing of it
    is landed, and the good file beside it still lands (CoP 8a; no file fails a stage)."""
    bad = folder / "referral 999 000 0018.csv"
    bad.write_text("not,the,header\n1,2,3\n")

    def refused_move(path: Path, dest: Path) -> None:
        dest.write_bytes(path.read_bytes()[:5])  # a copy begun, then the source cannot be unlinked
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ingest, "_move_whole", refused_move)
    report = _run(store, home)
    assert report.files_landed == 1 and report.files_quarantined == 0
    assert report.not_moved == [
        {"file": "referral [number withheld].csv", "rule": "file.header.missing", "error": "PermissionError"}
    ]
    held = [p.name for p in home.quarantine_for("gp_events").iterdir()]
    assert bad.exists() and len(held) == 1 and held[0].startswith("referral [number withheld].csv.")
    assert held[0].endswith(".not-moved.reason.json")
    reason = json.loads((home.quarantine_for("gp_events") / held[0]).read_text())
    assert reason["left_in"] == "incoming/gp_events/" and reason["quarantined_as"] is None
    assert "0018" not in repr(report) + json.dumps(reason)


def test_a_folder_that_cannot_be_renamed_into_quarantine_is_left_whole(
    store: Store, home: Home, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder (or link, or pipe) moves to quarantine by a rename or not at all: when the rename
    fails (quarantine on another file system), it is never copied and half-deleted, which could
    leave its only whole copy in a quarantine the clean-up removes; it stays in incoming/, whole,
    reported by its shown name."""
    sent = folder / "batch 7"
    sent.mkdir()
    write_csv(sent / "inner.csv", gp_rows(3, start=700), GP.field_names)

    def cross_device(src, dst) -> None:
        raise OSError(18, "Invalid cross-device link", str(src))

    monkeypatch.setattr(ingest.os, "rename", cross_device)
    report = _run(store, home)
    assert report.not_moved == [{"file": "batch 7", "rule": "file.not_regular", "error": "OSError"}]
    assert (sent / "inner.csv").read_text().count("\n") == 4
    assert [p.name.endswith(".not-moved.reason.json") for p in home.quarantine_for("gp_events").iterdir()] == [True]


#: a query far longer than the test waits: the signal always arrives while DuckDB runs it
ENDLESS = "SELECT count(*) FROM range(100000000000) t(i) WHERE hash(i) % 7 = 3"


@pytest.mark.parametrize("where", ["inside the landing transaction", "before it"])
def test_a_ctrl_c_while_duckdb_lands_a_file_stops_the_run_and_refuses_nothing(
    store: Store, home: Home, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """DuckDB turns a SIGINT during a query into ``RuntimeError("Query interrupted")`` and consumes
    the ``KeyboardInterrupt``; contained as an unreadable file, a Ctrl-C or a terminated run
    quarantined a good file and the run went on (found by review). Now the interrupt goes on up:
    the file stays in incoming/ for the next run, nothing of it landed, nothing quarantined."""
    rows = gp_rows(3)
    write_csv(home.incoming_for("gp_events") / "gp.csv", rows, GP.field_names)

    def interrupted_query(con, *args, **kwargs):
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            con.execute(ENDLESS)
        finally:
            timer.cancel()

    target = "insert_numbered" if where == "inside the landing transaction" else "inspect_file"
    monkeypatch.setattr(ingest, target, interrupted_query)
    with pytest.raises(KeyboardInterrupt):
        _run(store, home)
    assert (home.incoming_for("gp_events") / "gp.csv").exists()
    assert not any(home.quarantine_for("gp_events").glob("*"))
    assert _landed(store) == 0


def test_duckdbs_own_interrupt_exception_while_landing_is_an_interrupt_too(
    store: Store, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where DuckDB raises ``InterruptException`` (a ``duckdb.Error``) rather than ``RuntimeError``,
    it is not taken for a malformed file either."""
    write_csv(home.incoming_for("gp_events") / "gp.csv", gp_rows(3), GP.field_names)

    def raise_interrupt(*args, **kwargs):
        raise duckdb.InterruptException("INTERRUPT Error: Interrupted!")

    monkeypatch.setattr(ingest, "insert_numbered", raise_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(store, home)
    assert (home.incoming_for("gp_events") / "gp.csv").exists()
    assert _landed(store) == 0


def test_a_second_interrupt_while_a_landing_rolls_back_is_an_interrupt_and_no_transaction_is_no_error() -> None:
    """With more than one DuckDB thread a Ctrl-C's rollback waits for the insert to end, and a
    second Ctrl-C then stops the ROLLBACK itself (found by review): that is an interrupt, not an
    error to report; a ROLLBACK with no transaction open is nothing."""

    class Interrupted:
        def execute(self, sql: str) -> None:
            raise RuntimeError(QUERY_INTERRUPTED)

    with pytest.raises(KeyboardInterrupt):
        ingest._rollback(Interrupted())
    ingest._rollback(duckdb.connect())
