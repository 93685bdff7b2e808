"""Control totals: a file cut short at a row boundary is refused whole, never landed as a smaller file."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake import control
from safehaven.intake.contracts import CONTRACTS_DIR, Contract, ContractRegistry
from safehaven.intake.ingest import AWAITING_CONTROL, IngestReport, drop_key, ingest_collection, waiting_drops
from safehaven.intake.refusals import FileRejected
from tests.unit.validation_helpers import gp_rows, write_csv

REGISTRY = ContractRegistry(CONTRACTS_DIR)
#: gp_events as a collection whose sender sends a control file with each data file
GP = REGISTRY.contracts["gp_events"].model_copy(update={"control": "manifest"})
ROWS = gp_rows(5, start=700)
SEEDED = [r["nhs_number"] for r in ROWS]


def _ingest(store: Store, home: Home, contract: Contract = GP) -> IngestReport:
    c = contract.collection
    with store.connect() as con:
        return ingest_collection(con, contract, home.incoming_for(c), home.quarantine_for(c))


def _control(data: Path, body: object) -> Path:
    """Write ``data``'s control file holding ``body`` (JSON), as its sender writes it: last."""
    path = control.control_path(data)
    path.write_text(json.dumps(body))
    return path


def _landed_rows(store: Store) -> int:
    with store.connect(read_only=True) as con:
        return con.execute("SELECT count(*) FROM landing.gp_events").fetchone()[0]


def _reason(home: Home, name: str) -> dict:
    return json.loads((home.quarantine_for("gp_events") / f"{name}.reason.json").read_text())


def _cut_short(path: Path, keep: int) -> None:
    """Keep the header and the first ``keep`` rows: a transfer cut off at a row boundary."""
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[: 1 + keep]))


def _no_seeded_number_in_reasons(home: Home) -> None:
    for reason in home.quarantine_for("gp_events").glob("*.reason.json"):
        text = reason.read_text()
        assert not [n for n in SEEDED if n in text], reason.name


def test_a_file_cut_short_at_a_row_boundary_is_quarantined_whole_with_its_control_file(
    store: Store, home: Home
) -> None:
    """The sender's control file says 5 rows; the transfer stopped after the third whole row. The
    file reads as a valid smaller file, so only the control total can tell: it is refused whole,
    with a reason a person can act on, and its control file goes to quarantine with it."""
    data = write_csv(home.incoming_for("gp_events") / "gp_extract.csv", ROWS, GP.field_names)
    _cut_short(data, keep=3)
    _control(data, {"rows": 5})
    report = _ingest(store, home)
    assert (report.files_landed, report.files_quarantined) == (0, 2)
    assert _landed_rows(store) == 0
    reason = _reason(home, "gp_extract.csv")
    assert reason["rule"] == "file.control.rows"
    assert "the control file says 5 rows, the file holds 3: the transfer was cut short" in reason["reason"]
    assert "ask the sender to send the file again" in reason["what_to_do"]
    companion = _reason(home, "gp_extract.csv.ctl.json")
    assert companion["rule"] == "file.control.rows" and companion["details"]["control_for"] == "gp_extract.csv"
    assert list(home.incoming_for("gp_events").iterdir()) == []
    assert report.drops[next(iter(report.drops))] == "quarantined (file.control.rows)"
    _no_seeded_number_in_reasons(home)


def test_a_file_cut_short_inside_its_last_row_is_refused_though_its_rows_agree(store: Store, home: Home) -> None:
    """Cut inside the last value of the last row: DuckDB still reads 5 rows, one value shortened, so
    the count agrees; the missing line end shows the cut."""
    data = write_csv(home.incoming_for("gp_events") / "gp_extract.csv", ROWS, GP.field_names)
    data.write_bytes(data.read_bytes()[:-5])  # "...,38341" for "...,38341003\r\n"
    _control(data, {"rows": 5})
    report = _ingest(store, home)
    assert (report.files_landed, report.files_quarantined) == (0, 2)
    reason = _reason(home, "gp_extract.csv")
    assert reason["rule"] == "file.control.last_row" and "cut short inside its last row" in reason["reason"]


def test_an_empty_file_with_a_control_file_is_refused_as_empty(store: Store, home: Home) -> None:
    folder = home.incoming_for("gp_events")
    folder.mkdir(parents=True)
    (folder / "gp_extract.csv").write_bytes(b"")
    _control(folder / "gp_extract.csv", {"rows": 0})
    assert [q["rule"] for q in _ingest(store, home).quarantined] == ["file.empty", "file.empty"]


def test_a_file_with_a_matching_control_file_lands_and_both_are_removed(store: Store, home: Home) -> None:
    data = write_csv(home.incoming_for("gp_events") / "gp_extract.csv", ROWS, GP.field_names)
    _control(data, {"rows": 5, "sha256": hashlib.sha256(data.read_bytes()).hexdigest().upper()})
    report = _ingest(store, home)
    assert (report.files_landed, report.rows_landed, report.files_quarantined, report.files_vanished) == (1, 5, 0, 0)
    assert list(home.incoming_for("gp_events").iterdir()) == []


def test_a_control_file_whose_sha256_is_not_the_files_refuses_it(store: Store, home: Home) -> None:
    """The rows agree but the bytes are not those the sender described (changed or corrupted)."""
    data = write_csv(home.incoming_for("gp_events") / "gp_extract.csv", ROWS, GP.field_names)
    _control(data, {"rows": 5, "sha256": hashlib.sha256(b"another file").hexdigest()})
    report = _ingest(store, home)
    assert (report.files_landed, report.files_quarantined) == (0, 2)
    assert _reason(home, "gp_extract.csv")["rule"] == "file.control.sha256"
    assert _landed_rows(store) == 0


def test_a_file_waits_for_its_control_file_and_a_later_run_lands_it(store: Store, home: Home) -> None:
    """Senders write the control file last: until it is there the file is not judged, and the
    run says what it waits for; the next run after it arrives lands the file."""
    folder = home.incoming_for("gp_events")
    data = write_csv(folder / "gp_extract.csv", ROWS, GP.field_names)
    before = _ingest(store, home)
    assert (before.files_arriving, before.files_landed, before.files_quarantined) == (1, 0, 0)
    assert before.awaiting_control == ["gp_extract.csv"]
    assert list(before.drops.values()) == [AWAITING_CONTROL]
    assert data.exists() and not home.quarantine_for("gp_events").exists()
    _control(data, {"rows": 5})
    after = _ingest(store, home)
    assert (after.files_landed, after.rows_landed, after.awaiting_control) == (1, 5, [])
    assert list(folder.iterdir()) == []


def test_a_file_whose_control_file_is_still_being_written_waits(store: Store, home: Home) -> None:
    data = write_csv(home.incoming_for("gp_events") / "gp_extract.csv", ROWS, GP.field_names)
    with open(control.control_path(data), "w") as writer:
        writer.write('{"rows": ')
        writer.flush()
        during = _ingest(store, home)
        writer.write("5}")
    assert (during.files_arriving, during.files_quarantined, during.awaiting_control) == (1, 0, ["gp_extract.csv"])
    assert _ingest(store, home).files_landed == 1


UNREADABLE = {
    "not json": b"rows=5",
    "not an object": b"[5]",
    "negative": b'{"rows": -1}',
    "fraction": b'{"rows": 5.0}',
    "text": b'{"rows": "5"}',
    "boolean": b'{"rows": true}',
    "no rows": b'{"sha256": "' + b"0" * 64 + b'"}',
    "short sha256": b'{"rows": 5, "sha256": "abc"}',
    "unknown key": b'{"rows": 5, "sha-256": "x"}',
    "duplicate key": b'{"rows": 5, "rows": 5}',
    "nested": b"[" * 2000 + b"]" * 2000,
    "too large": b'{"rows": 5}' + b" " * control.MAX_CONTROL_BYTES,
    "not utf-8": b'{"rows": 5, "sha256": "\xff"}',
}


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_a_control_file_that_cannot_be_read_refuses_its_file(store: Store, home: Home, kind: str) -> None:
    data = write_csv(home.incoming_for("gp_events") / "gp_extract.csv", ROWS, GP.field_names)
    control.control_path(data).write_bytes(UNREADABLE[kind])
    report = _ingest(store, home)
    assert (report.files_landed, report.files_quarantined) == (0, 2)
    reason = _reason(home, "gp_extract.csv")
    assert reason["rule"] == "file.control.unreadable"
    assert reason["reason"].startswith("the file's control file cannot be read: ")
    assert (home.quarantine_for("gp_events") / "gp_extract.csv.ctl.json").read_bytes() == UNREADABLE[kind]


def test_a_control_file_that_is_a_link_is_not_followed_and_refuses_its_file(
    store: Store, home: Home, tmp_path: Path
) -> None:
    data = write_csv(home.incoming_for("gp_events") / "gp_extract.csv", ROWS, GP.field_names)
    outside = tmp_path / "outside.json"
    outside.write_text('{"rows": 5}')
    control.control_path(data).symlink_to(outside)
    report = _ingest(store, home)
    assert (report.files_landed, report.files_quarantined) == (0, 2)
    assert _reason(home, "gp_extract.csv")["rule"] == "file.control.unreadable"
    assert (home.quarantine_for("gp_events") / "gp_extract.csv.ctl.json").is_symlink()


def test_a_hard_linked_control_file_refuses_its_file_and_the_other_name_keeps_its_bytes(
    store: Store, home: Home, tmp_path: Path
) -> None:
    """Landing removes (shreds) a control file with its data file: one that is also a name elsewhere
    is never read, so the other name's bytes are never overwritten."""
    data = write_csv(home.incoming_for("gp_events") / "gp_extract.csv", ROWS, GP.field_names)
    elsewhere = tmp_path / "senders_copy.json"
    elsewhere.write_text('{"rows": 5}')
    os.link(elsewhere, control.control_path(data))
    report = _ingest(store, home)
    assert (report.files_landed, report.files_quarantined) == (0, 2)
    assert _reason(home, "gp_extract.csv")["rule"] == "file.control.unreadable"
    assert elsewhere.read_text() == '{"rows": 5}'


def test_a_control_file_with_no_data_file_is_quarantined_as_an_orphan(store: Store, home: Home) -> None:
    folder = home.incoming_for("gp_events")
    folder.mkdir(parents=True)
    _control(folder / "gp_extract.csv", {"rows": 5})
    report = _ingest(store, home)
    assert (report.files_landed, report.files_quarantined) == (0, 1)
    assert _reason(home, "gp_extract.csv.ctl.json")["rule"] == "file.control.orphan"
    assert list(folder.iterdir()) == []


def test_a_refused_data_file_takes_its_control_file_to_quarantine(store: Store, home: Home) -> None:
    """Refused for a rule of its own (a header only): its control file is not left behind as an orphan."""
    folder = home.incoming_for("gp_events")
    folder.mkdir(parents=True)
    (folder / "gp_extract.csv").write_text(",".join(GP.field_names) + "\n")
    _control(folder / "gp_extract.csv", {"rows": 0})
    report = _ingest(store, home)
    assert [q["rule"] for q in report.quarantined] == ["file.no_rows", "file.no_rows"]
    assert list(folder.iterdir()) == []


def _crlf_bom_quoted_newline(rows: list[dict[str, str]]) -> bytes:
    """Excel-style CSV (``utf-8-sig``, CRLF, every field quoted) with a line break inside one field."""
    rows = [dict(r) for r in rows]
    rows[1]["postcode"] = "B29\r\n3RH"
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=GP.field_names, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode("utf-8-sig")


@pytest.mark.parametrize("said, lands", [(5, True), (6, False)])
def test_rows_are_counted_as_parsed_not_as_lines(store: Store, home: Home, said: int, lands: bool) -> None:
    """5 rows over 7 lines (a BOM, CRLF ends and a quoted line break): the count is DuckDB's rows,
    not its header or lines, so 5 lands and 6 (the lines after the header) is refused."""
    data = home.incoming_for("gp_events") / "gp_extract.csv"
    data.parent.mkdir(parents=True)
    data.write_bytes(_crlf_bom_quoted_newline(ROWS))
    assert data.read_bytes().count(b"\n") == 7
    _control(data, {"rows": said})
    report = _ingest(store, home)
    assert (report.files_landed, report.rows_landed) == ((1, 5) if lands else (0, 0))


def test_a_pandas_file_with_bom_crlf_and_a_quoted_line_break_counts_right(store: Store, home: Home) -> None:
    frame = pd.DataFrame(ROWS)[GP.field_names]
    frame.loc[2, "postcode"] = "B29\n3RH"
    data = home.incoming_for("gp_events") / "gp_extract.csv"
    data.parent.mkdir(parents=True)
    frame.to_csv(data, index=False, encoding="utf-8-sig", lineterminator="\r\n", quoting=csv.QUOTE_ALL)
    _control(data, {"rows": 5})
    assert _ingest(store, home).rows_landed == 5


def test_a_parquet_file_is_counted_by_its_rows(store: Store, home: Home) -> None:
    data = home.incoming_for("gp_events") / "gp_extract.parquet"
    data.parent.mkdir(parents=True)
    pd.DataFrame(ROWS)[GP.field_names].to_parquet(data, index=False)
    _control(data, {"rows": 4})
    report = _ingest(store, home)
    assert (report.files_landed, report.quarantined[0]["rule"]) == (0, "file.control.rows")


def test_an_nhs_number_like_count_is_withheld_from_the_reason() -> None:
    with pytest.raises(FileRejected) as refused:
        control.check_rows(control.Control(rows=int(SEEDED[0])), 5)
    assert SEEDED[0] not in refused.value.reason and SEEDED[0] not in json.dumps(refused.value.details)


def test_the_sensor_sees_a_data_file_as_a_drop_only_once_its_control_file_is_there(home: Home) -> None:
    """A drop run before its control file arrived would refuse nothing and never run again: so the
    data file is no drop until then, and its control file is never a drop of its own."""
    folder = home.incoming_for("gp_events")
    data = write_csv(folder / "gp_extract.csv", ROWS, GP.field_names)
    assert waiting_drops(folder, GP) == {}
    _control(data, {"rows": 5})
    assert waiting_drops(folder, GP) == {drop_key(data): data}
    data.unlink()
    assert list(waiting_drops(folder, GP).values()) == [control.control_path(data)]  # an orphan: landing refuses it


def test_without_the_option_a_file_lands_as_today_and_a_control_file_is_refused(store: Store, home: Home) -> None:
    plain = REGISTRY.contracts["gp_events"]
    assert plain.control == "none"
    data = write_csv(home.incoming_for("gp_events") / "gp_extract.csv", ROWS, plain.field_names)
    _control(data, {"rows": 5})
    report = _ingest(store, home, plain)
    assert report.files_landed == 1 and [q["rule"] for q in report.quarantined] == ["file.type"]


def test_a_contract_declares_control_manifest_or_none() -> None:
    doc = REGISTRY.contracts["gp_events"].model_dump(mode="json")
    assert Contract.model_validate({**doc, "control": "manifest"}).control == "manifest"
    with pytest.raises(ValueError):
        Contract.model_validate({**doc, "control": "checksum"})


def test_the_runs_log_names_the_file_waiting_for_its_control_file(store: Store, home: Home) -> None:
    """The landing step's summary says which file waits, for what, and that a later run lands it."""
    from types import SimpleNamespace

    from assets.ingest import _log_report

    write_csv(home.incoming_for("gp_events") / "gp_extract.csv", ROWS, GP.field_names)
    said: list[str] = []
    log = SimpleNamespace(info=said.append, warning=said.append)
    _log_report(SimpleNamespace(log=log), "gp_events", _ingest(store, home))
    assert said == [
        "gp_events: gp_extract.csv waits for its control file (gp_extract.csv.ctl.json, which the contract asks "
        "for and its sender writes last); it stays in incoming/gp_events/ and a later run lands it once that is there"
    ]


def test_a_file_rewritten_in_place_after_its_sha256_check_is_not_landed(
    store: Store, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rewritten in place (same inode, same size) after its SHA-256 matched the control file's, its
    modification time set back: its status-change time, which a sender cannot set back, shows the
    change, so nothing of it lands under the original bytes' SHA-256; the next run refuses it."""
    from safehaven.intake import ingest

    data = write_csv(home.incoming_for("gp_events") / "gp_extract.csv", ROWS, GP.field_names)
    original = data.read_bytes()
    _control(data, {"rows": 5, "sha256": hashlib.sha256(original).hexdigest()})
    real_inspect = ingest.inspect_file

    def rewrite_then_inspect(con, path, contract):  # noqa: ANN001, ANN202
        st = os.stat(path)
        time.sleep(0.01)  # a later status-change time, on any clock granularity
        with open(path, "r+b") as fh:
            fh.write(original.replace(b"M83337", b"Z99999", 1))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return real_inspect(con, path, contract)

    monkeypatch.setattr(ingest, "inspect_file", rewrite_then_inspect)
    during = _ingest(store, home)
    assert (during.files_landed, during.files_arriving, _landed_rows(store)) == (0, 1, 0)
    monkeypatch.undo()
    after = _ingest(store, home)
    assert (after.files_landed, _reason(home, "gp_extract.csv")["rule"]) == (0, "file.control.sha256")
    assert _landed_rows(store) == 0


def test_a_new_file_of_the_same_name_placed_while_the_old_one_lands_stays_for_the_next_run(
    store: Store, home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daily sender of one fixed name renames the next extract.csv and its control file into place
    while the last one lands: only the entries read are removed, so the new ones wait in incoming/
    and the next run lands them (never shredded unread)."""
    from safehaven.intake import ingest

    folder = home.incoming_for("gp_events")
    _control(write_csv(folder / "extract.csv", ROWS, GP.field_names), {"rows": 5})
    staging = tmp_path / "sender_staging"
    staging.mkdir()
    v2 = write_csv(staging / "extract.csv", gp_rows(3, start=900), GP.field_names)
    _control(v2, {"rows": 3})
    real = ingest._record_landing

    def sender_places_v2(*args):  # noqa: ANN002, ANN202
        os.replace(v2, folder / "extract.csv")
        os.replace(control.control_path(v2), control.control_path(folder / "extract.csv"))
        return real(*args)

    monkeypatch.setattr(ingest, "_record_landing", sender_places_v2)
    first = _ingest(store, home)
    assert (first.files_landed, first.rows_landed) == (1, 5)
    assert sorted(p.name for p in folder.iterdir()) == ["extract.csv", "extract.csv.ctl.json"]
    monkeypatch.undo()
    second = _ingest(store, home)
    assert (second.files_landed, second.rows_landed, _landed_rows(store)) == (1, 3, 8)
    assert list(folder.iterdir()) == []


def test_a_run_killed_between_removing_a_landed_file_and_its_control_file_leaves_no_orphan(
    store: Store, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control file is removed first: a run killed before the data file's removal leaves a data
    file without its control file, which waits, never a control file refused as an orphan though its
    data file landed; once a control file comes again it is known as landed and removed."""
    from safehaven.intake import ingest

    folder = home.incoming_for("gp_events")
    data = write_csv(folder / "gp_extract.csv", ROWS, GP.field_names)
    _control(data, {"rows": 5})
    real_shred = ingest.shred_file

    def killed_after_the_first(path: Path) -> int:
        real_shred(path)
        raise KeyboardInterrupt  # the run killed between the two removals

    monkeypatch.setattr(ingest, "shred_file", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        _ingest(store, home)
    monkeypatch.undo()
    assert [p.name for p in folder.iterdir()] == ["gp_extract.csv"]
    waiting = _ingest(store, home)
    assert (waiting.awaiting_control, waiting.files_quarantined) == (["gp_extract.csv"], 0)
    _control(data, {"rows": 5})
    again = _ingest(store, home)
    assert (again.files_skipped, again.files_quarantined, _landed_rows(store)) == (1, 0, 5)
    assert list(folder.iterdir()) == []


def test_a_file_whose_control_file_name_would_exceed_the_name_limit_is_refused_naming_why(
    store: Store, home: Home
) -> None:
    """A legal 250-byte name whose control file's name (259 bytes) no file system here holds: the
    sender can never send it, so the file is refused (``file.control.name``), not left waiting for ever."""
    folder = home.incoming_for("gp_events")
    name = "x" * 246 + ".csv"
    data = write_csv(folder / name, ROWS, GP.field_names)
    assert waiting_drops(folder, GP) == {drop_key(data): data}  # a drop: the sensor starts its run
    report = _ingest(store, home)
    assert (report.files_quarantined, report.files_arriving, report.awaiting_control) == (1, 0, [])
    [refused] = report.quarantined
    reason = json.loads((home.quarantine_for("gp_events") / f"{refused['file']}.reason.json").read_text())
    assert reason["rule"] == "file.control.name"
    assert "would exceed the file system's limit of 255 bytes" in reason["reason"]
    assert "rename the file at least 9 bytes shorter" in reason["what_to_do"]
    assert list(folder.iterdir()) == [] and _landed_rows(store) == 0


def test_a_control_file_named_in_another_unicode_normalisation_refuses_its_file_naming_that(
    store: Store, home: Home
) -> None:
    """``café.csv`` (NFC) and its control file named in NFD (as a macOS sender's tools may write it):
    the names look the same but are other bytes, so both are refused together as
    ``file.control.name`` saying so, never an orphan beside a file waiting for ever."""
    import unicodedata

    folder = home.incoming_for("gp_events")
    data = write_csv(folder / unicodedata.normalize("NFC", "café.csv"), ROWS, GP.field_names)
    (folder / unicodedata.normalize("NFD", "café.csv.ctl.json")).write_text(json.dumps({"rows": 5}))
    assert list(waiting_drops(folder, GP).values()) == [data]
    report = _ingest(store, home)
    assert [q["rule"] for q in report.quarantined] == ["file.control.name", "file.control.name"]
    assert (report.files_arriving, report.awaiting_control) == (0, [])
    assert "another Unicode form" in _reason(home, data.name)["reason"]
    assert list(folder.iterdir()) == [] and _landed_rows(store) == 0


def test_a_control_file_swapped_for_a_folder_after_it_was_checked_refuses_its_file_and_the_stage_goes_on(
    store: Store, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Swapped for a folder between ``lstat`` and ``open``: the opened descriptor is checked again,
    so the file is refused (``file.control.unreadable``) and the next file is judged."""
    import sys

    folder = home.incoming_for("gp_events")
    data = write_csv(folder / "a_extract.csv", ROWS, GP.field_names)
    ctl = _control(data, {"rows": 5})
    _control(write_csv(folder / "b_extract.csv", gp_rows(2, start=800), GP.field_names), {"rows": 2})
    real_lstat = os.lstat

    def lstat_then_swap(path, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        st = real_lstat(path, *a, **k)
        if Path(path) == ctl and ctl.is_file() and sys._getframe(1).f_code.co_name == "_control_bytes":
            ctl.unlink()
            ctl.mkdir()
        return st

    monkeypatch.setattr(control.os, "lstat", lstat_then_swap)
    report = _ingest(store, home)
    assert _reason(home, "a_extract.csv")["rule"] == "file.control.unreadable"
    assert "not a plain file" in _reason(home, "a_extract.csv")["reason"]
    assert (report.files_landed, _landed_rows(store)) == (1, 2)
