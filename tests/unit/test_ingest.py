"""Ingest: every kind of bad file is quarantined whole with a readable reason; earlier data is kept."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake.contracts import CONTRACTS_DIR, ContractRegistry
from safehaven.intake.ingest import ingest_collection
from safehaven.intake.validation import validate_collection
from tests.unit.validation_helpers import gp_rows, write_csv

REGISTRY = ContractRegistry(CONTRACTS_DIR)
GP = REGISTRY.contracts["gp_events"]
HEADER = ",".join(GP.field_names)
ROWS = gp_rows(3, start=500)
LINE = ",".join(ROWS[0][f] for f in GP.field_names)
SEEDED = [r["nhs_number"] for r in ROWS]


def _ragged(body: str) -> bytes:
    """The second row with a surplus field."""
    lines = body.splitlines()
    lines[1] += ",surplus"
    return (HEADER + "\n" + "\n".join(lines) + "\n").encode()


def _missing_column(body: str) -> bytes:
    """The last column dropped from the header and every row."""
    return (
        HEADER.rsplit(",", 1)[0] + "\n" + "".join(line.rsplit(",", 1)[0] + "\n" for line in body.splitlines())
    ).encode()


#: each kind of bad file, built from the good rows' CSV body (no header)
CSV_BUILDERS: dict[str, Callable[[str], bytes]] = {
    "empty": lambda body: b"",
    "nul_byte": lambda body: (HEADER + "\n" + body).encode().replace(b"M83337", b"M83\x00337", 1),
    "latin1": lambda body: (HEADER + "\n" + body.replace("M83337", "M8333é")).encode("latin-1"),
    "utf16": lambda body: (HEADER + "\n" + body).encode("utf-16"),
    "truncated_utf8": lambda body: (HEADER + "\n" + body).encode() + "é".encode()[:1],
    "no_header": lambda body: body.encode(),
    "semicolons": lambda body: (HEADER.replace(",", ";") + "\n" + body.replace(",", ";")).encode(),
    "duplicate": lambda body: (HEADER + ",sex\n" + body.replace("\n", ",1\n")).encode(),
    "case_collision": lambda body: (HEADER + ",SEX\n" + body.replace("\n", ",1\n")).encode(),
    "hostile": lambda body: (
        HEADER.replace("postcode", 'postcode"; DROP TABLE landing.gp_events; --') + "\n" + body
    ).encode(),
    "spaced": lambda body: (HEADER.replace("postcode", " postcode") + "\n" + body).encode(),
    "missing_column": _missing_column,
    "extra_column": lambda body: (HEADER + ",comments\n" + body.replace("\n", ",x\n")).encode(),
    "ragged": _ragged,
    "broken_quote": lambda body: (HEADER + "\n" + body.replace("M83337", '"M83337', 1)).encode(),
    "header_only": lambda body: (HEADER + "\n").encode(),
    "double_bom": lambda body: ("\ufeff\ufeff" + HEADER + "\n" + body).encode(),
    "excel_sep": lambda body: ("sep=,\r\n" + HEADER + "\r\n" + body).encode(),
    "trailing_empty_columns": lambda body: (HEADER + ",,\n" + body.replace("\n", ",,\n")).encode(),
    "gzip": lambda body: gzip.compress((HEADER + "\n" + body).encode()),
    "xlsx": lambda body: b"PK\x03\x04\x14\x00\x06\x00" + bytes(range(256)),
}


def _csv_bytes(name: str) -> bytes:
    """A bad CSV file of one kind (the good rows, broken one way)."""
    body = "".join(",".join(r[f] for f in GP.field_names) + "\n" for r in ROWS)
    if name not in CSV_BUILDERS:
        raise AssertionError(name)
    return CSV_BUILDERS[name](body)


CSV_CASES = {
    "empty": "file.empty",
    "nul_byte": "file.nul_byte",
    "latin1": "file.encoding",
    "utf16": "file.nul_byte",
    "truncated_utf8": "file.encoding",
    "no_header": "file.header.missing",
    "semicolons": "file.header.delimiter",
    "duplicate": "file.header.duplicate",
    "case_collision": "file.header.case_collision",
    "hostile": "file.header.hostile_name",
    "spaced": "file.header.hostile_name",
    "missing_column": "file.header.columns",
    "extra_column": "file.header.columns",
    "ragged": "file.malformed",
    "broken_quote": "file.malformed",
    "header_only": "file.no_rows",
    "double_bom": "file.encoding",
    "excel_sep": "file.header.excel_sep",
    "trailing_empty_columns": "file.header.empty_name",
    "gzip": "file.type",
    "xlsx": "file.type",
}


@pytest.fixture
def earlier(store: Store, home: Home) -> Home:
    """A haven that already landed one good gp_events file."""
    write_csv(home.incoming_for("gp_events") / "gp_good.csv", gp_rows(5), GP.field_names)
    with store.connect() as con:
        assert ingest_collection(con, GP, home.incoming_for("gp_events"), home.quarantine_for("gp_events")).files_landed
    return home


def _state(store: Store) -> tuple:
    with store.connect(read_only=True) as con:
        return (
            con.execute("SELECT count(*), sum(hash(columns(*))) FROM landing.gp_events").fetchone(),
            con.execute("SELECT count(*) FROM governance.batches").fetchone(),
        )


def _ingest_one(store: Store, home: Home, name: str, data: bytes) -> tuple[dict, Path]:
    path = home.incoming_for("gp_events") / name
    path.write_bytes(data)
    with store.connect() as con:
        report = ingest_collection(con, GP, home.incoming_for("gp_events"), home.quarantine_for("gp_events"))
    assert report.files_quarantined == 1 and report.files_landed == 0, report
    assert not path.exists()
    moved = home.quarantine_for("gp_events") / report.quarantined[0]["file"]
    assert moved.exists() and moved.read_bytes() == data  # the whole file, as received
    reason = json.loads(moved.with_name(moved.name + ".reason.json").read_text())
    return reason, moved


@pytest.mark.parametrize("kind", sorted(CSV_CASES))
def test_each_kind_of_bad_csv_is_quarantined_with_a_reason(store: Store, earlier: Home, kind: str) -> None:
    before = _state(store)
    reason, moved = _ingest_one(store, earlier, f"gp_{kind}.csv", _csv_bytes(kind))
    assert reason["rule"] == CSV_CASES[kind]
    assert reason["collection"] == "gp_events" and reason["contract_version"] == GP.version
    assert len(reason["reason"]) > 15 and reason["what_to_do"].startswith(reason["what_to_do"][0].lower())
    assert "Nothing of this file was landed" in reason["what_to_do"]
    text = moved.with_name(moved.name + ".reason.json").read_text()
    for number in SEEDED:
        assert number not in text
    assert "DROP TABLE" not in text
    assert _state(store) == before  # earlier data kept, nothing of the bad file landed


def test_a_file_of_another_type_is_quarantined(store: Store, earlier: Home) -> None:
    reason, _ = _ingest_one(store, earlier, "gp.xlsx", b"PK\x03\x04 not a csv")
    assert reason["rule"] == "file.type"


def _parquet(path: Path, select: str) -> bytes:
    con = duckdb.connect()
    con.execute(f"COPY ({select}) TO '{path}' (FORMAT parquet)")
    return path.read_bytes()


GOOD_SELECT = (
    "SELECT 'M83337' AS practice_code, 9990000018 AS nhs_number, DATE '1950-02-03' AS date_of_birth, "
    "1 AS sex, 'B29 3RH' AS postcode, '2026-01-02' AS event_date, 38341003 AS diagnosis_code"
)


@pytest.mark.parametrize(
    ("kind", "select"),
    [
        ("boolean code", GOOD_SELECT.replace("1 AS sex", "true AS sex")),
        ("timestamp date", GOOD_SELECT.replace("DATE '1950-02-03'", "TIMESTAMP '1950-02-03 10:00:00'")),
        ("float code", GOOD_SELECT.replace("38341003 AS", "38341003.0::DOUBLE AS")),
        ("binary text", GOOD_SELECT.replace("'B29 3RH' AS", "'B29 3RH'::BLOB AS")),
        ("nested", GOOD_SELECT.replace("'M83337' AS", "['M83337'] AS")),
    ],
)
def test_a_parquet_column_that_cannot_be_the_contract_type_is_quarantined(
    store: Store, earlier: Home, tmp_path: Path, kind: str, select: str
) -> None:
    data = _parquet(tmp_path / "x.parquet", select)
    before = _state(store)
    reason, _ = _ingest_one(store, earlier, "gp.parquet", data)
    assert reason["rule"] == "file.column_type", kind
    assert "the contract's type is" in reason["reason"]
    assert _state(store) == before


def test_unreadable_parquet_is_quarantined(store: Store, earlier: Home) -> None:
    reason, _ = _ingest_one(store, earlier, "gp.parquet", b"PAR1 this is not parquet PAR1")
    assert reason["rule"] == "file.parquet"


def test_parquet_with_dates_and_integer_codes_lands(store: Store, home: Home, tmp_path: Path) -> None:
    (home.incoming_for("gp_events")).mkdir(parents=True, exist_ok=True)
    _parquet(home.incoming_for("gp_events") / "gp.parquet", GOOD_SELECT)
    with store.connect() as con:
        report = ingest_collection(con, GP, home.incoming_for("gp_events"), home.quarantine_for("gp_events"))
        assert report.files_landed == 1
        row = con.execute("SELECT nhs_number, date_of_birth, sex, diagnosis_code FROM landing.gp_events").fetchone()
    assert row == ("9990000018", "1950-02-03", "1", "38341003")


OBJ = REGISTRY.contracts["objections"]
NHS = "9990000018"


@pytest.mark.parametrize(
    ("name", "data", "rule"),
    [
        ("gp.csv", (HEADER + f",nhs_{NHS}\n" + LINE + ",1\n").encode(), "file.header.columns"),
        ("gp.csv", (HEADER + f",x{NHS},x{NHS}\n" + LINE + ",1,1\n").encode(), "file.header.duplicate"),
        (f"gp.{NHS}", (HEADER + "\n" + LINE + "\n").encode(), "file.type"),
    ],
    ids=["extra column", "duplicate column", "suffix"],
)
def test_an_nhs_number_in_a_received_column_name_or_suffix_is_withheld_from_the_reason_file(
    store: Store, earlier: Home, name: str, data: bytes, rule: str
) -> None:
    """A per-patient column (``nhs_9990000018``) is named in the reason as ``shown_name`` shows it
    (CoP 8a): the reason and its details still say which column, the number withheld."""
    reason, moved = _ingest_one(store, earlier, name, data)
    assert reason["rule"] == rule
    assert NHS not in moved.with_name(moved.name + ".reason.json").read_text()
    assert "[number withheld]" in reason["reason"]


def test_a_nested_parquet_column_is_refused_without_its_field_names(
    store: Store, earlier: Home, tmp_path: Path
) -> None:
    """A STRUCT's field names are the sender's: the reason names the column's kind of type only."""
    data = _parquet(tmp_path / "x.parquet", GOOD_SELECT.replace("'B29 3RH' AS", f"{{'nhs_{NHS}': 'x'}} AS"))
    reason, moved = _ingest_one(store, earlier, "gp.parquet", data)
    assert reason["rule"] == "file.column_type" and "postcode is STRUCT(...)" in reason["reason"]
    assert NHS not in moved.with_name(moved.name + ".reason.json").read_text()


def _objections_parquet(home: Home, withdrawn: list) -> Path:
    """An objections list as pandas writes it (a column of only ``None`` has Arrow's null type)."""
    folder = home.incoming_for("objections")
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "nhs_number": [NHS, "9990000026"],
            "objection_type": ["national_opt_out", "national_opt_out"],
            "recorded_date": ["2024-01-02", "2024-01-03"],
            "withdrawn_date": withdrawn,
            "source_practice": [None, None],
        }
    ).to_parquet(folder / "objections.parquet")
    return folder


def test_a_pandas_parquet_objections_list_with_no_withdrawals_lands_and_validates_with_null_dates(
    store: Store, home: Home
) -> None:
    """A column with no value at all can be any type: read as NULLs, not refused as INTEGER."""
    folder = _objections_parquet(home, [None, None])
    with store.connect() as con:
        report = ingest_collection(con, OBJ, folder, home.quarantine_for("objections"))
        assert (report.files_landed, report.files_quarantined, report.rows_landed) == (1, 0, 2)
        checked = validate_collection(con, OBJ, REGISTRY, home.quarantine_for("objections"))
        assert (checked.rows_valid, checked.rows_invalid) == (2, 0)
        valid = con.execute("SELECT count(*), count(withdrawn_date) FROM landing.objections_valid").fetchone()
    assert valid == (2, 0)


def test_a_parquet_column_of_another_type_with_a_value_is_still_refused(store: Store, home: Home) -> None:
    """Only a column with no values is exempt: one integer among NULLs is an integer date column."""
    folder = _objections_parquet(home, [None, 5])
    with store.connect() as con:
        report = ingest_collection(con, OBJ, folder, home.quarantine_for("objections"))
    assert (report.files_landed, report.files_quarantined) == (0, 1)
    [reason] = [json.loads(p.read_text()) for p in home.quarantine_for("objections").glob("*.reason.json")]
    assert reason["rule"] == "file.column_type" and "withdrawn_date is " in reason["reason"]


def test_a_parquet_column_with_no_values_lands_as_nulls_for_any_contract(store: Store, home: Home) -> None:
    """Not the objections contract only: a GP column of booleans, all NULL, lands as NULLs."""
    home.incoming_for("gp_events").mkdir(parents=True, exist_ok=True)
    _parquet(home.incoming_for("gp_events") / "gp.parquet", GOOD_SELECT.replace("1 AS sex", "NULL::BOOLEAN AS sex"))
    with store.connect() as con:
        report = ingest_collection(con, GP, home.incoming_for("gp_events"), home.quarantine_for("gp_events"))
        assert report.files_landed == 1
        assert con.execute("SELECT sex, practice_code FROM landing.gp_events").fetchone() == (None, "M83337")


def test_bom_and_crlf_are_accepted_and_a_known_file_is_skipped(store: Store, home: Home) -> None:
    body = "\ufeff" + HEADER + "\r\n" + LINE + "\r\n"
    folder = home.incoming_for("gp_events")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gp.csv").write_text(body, encoding="utf-8", newline="")
    with store.connect() as con:
        first = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
        assert (first.files_landed, first.rows_landed) == (1, 1)
        assert con.execute("SELECT practice_code, diagnosis_code FROM landing.gp_events").fetchone() == (
            "M83337",
            ROWS[0]["diagnosis_code"],
        )
        (folder / "gp_again.csv").write_text(body, encoding="utf-8", newline="")
        again = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
    assert (again.files_landed, again.files_skipped) == (0, 1)
    assert not list(folder.iterdir())  # received files are removed once landed (or known)


def test_two_bad_files_with_one_name_are_both_kept(store: Store, earlier: Home) -> None:
    _ingest_one(store, earlier, "gp.csv", _csv_bytes("ragged"))
    _, second = _ingest_one(store, earlier, "gp.csv", _csv_bytes("broken_quote"))
    assert second.name != "gp.csv"
    assert len(list(earlier.quarantine_for("gp_events").glob("*.reason.json"))) == 2


def test_a_hard_linked_file_is_quarantined_and_the_other_name_keeps_its_bytes(
    store: Store, earlier: Home, tmp_path: Path
) -> None:
    """A file with another hard link shares its bytes with a name outside the collection folder
    (here: outside the home): it is not landed, and neither ingest nor a later disposal of the
    quarantined copy overwrites those bytes."""
    from safehaven.core.files import shred_file

    outside = tmp_path / "sender_archive.csv"
    data = (HEADER + "\n" + LINE + "\n").encode()
    outside.write_bytes(data)
    linked = earlier.incoming_for("gp_events") / "gp_linked.csv"
    linked.hardlink_to(outside)
    before = _state(store)
    with store.connect() as con:
        report = ingest_collection(con, GP, earlier.incoming_for("gp_events"), earlier.quarantine_for("gp_events"))
    assert (report.files_landed, report.files_quarantined) == (0, 1)
    assert report.quarantined[0]["rule"] == "file.not_regular"
    assert outside.read_bytes() == data and not linked.exists()
    kept = earlier.quarantine_for("gp_events") / report.quarantined[0]["file"]
    assert kept.read_bytes() == data and kept.stat().st_nlink == 1, "quarantine holds a file of its own"
    shred_file(kept)  # as disposal later does
    assert outside.read_bytes() == data
    assert _state(store) == before


def test_an_entry_renamed_by_its_sender_while_the_folder_is_read_does_not_fail_the_stage(
    store: Store, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transfer tool renames ``b.csv.filepart`` while ``a.csv`` is read: the stage goes on,
    ``a.csv`` lands, and the vanished entry is counted, not quarantined (it is not ours now)."""
    from safehaven.intake import ingest

    folder = home.incoming_for("gp_events")
    write_csv(folder / "a.csv", gp_rows(3), GP.field_names)
    write_csv(folder / "b.csv.filepart", gp_rows(3, start=50), GP.field_names)
    original = ingest.inspect_file

    def renaming(con, path, contract):
        if path.name == "a.csv":
            (folder / "b.csv.filepart").rename(folder / "b.csv")
        return original(con, path, contract)

    monkeypatch.setattr(ingest, "inspect_file", renaming)
    with store.connect() as con:
        report = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
    assert (report.files_landed, report.files_quarantined, report.files_vanished) == (1, 0, 1)
    assert (folder / "b.csv").exists(), "left for the next run"


def test_a_file_name_that_is_not_utf8_is_refused_by_name_with_a_reason_a_person_can_act_on(
    store: Store, home: Home
) -> None:
    folder = home.incoming_for("gp_events")
    folder.mkdir(parents=True, exist_ok=True)
    name = Path(os.fsdecode(b"gp_d\xe9cembre.csv"))
    (folder / name).write_bytes((HEADER + "\n" + LINE + "\n").encode())
    with store.connect() as con:
        report = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
    assert report.quarantined[0]["rule"] == "file.name"
    moved = home.quarantine_for("gp_events") / report.quarantined[0]["file"]
    reason = json.loads(moved.with_name(moved.name + ".reason.json").read_text())
    assert "rename the file" in reason["what_to_do"] and reason["file"] == "gp_d\\xe9cembre.csv"


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("9990000018.csv", "[number withheld].csv"),
        ("optout 999 000 0018.csv", "optout [number withheld].csv"),
        ("gp\n2026 dagster - INFO - forged.csv", "gp\\n2026 dagster - INFO - forged.csv"),
        ("tab\there\x1b]0;x\x07.csv", "tab\\there\\x1b]0;x\\x07.csv"),  # ('[' is refused: bad_name)
    ],
)
def test_a_received_file_name_is_shown_with_numbers_withheld_and_control_characters_escaped(
    store: Store, home: Home, name: str, shown: str
) -> None:
    """The name recorded in the reason file, the quarantine, the report (logs, metadata) and the
    batch register: never an NHS-number-like run, never a raw line feed (``audit.shown_name``)."""
    folder = home.incoming_for("gp_events")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(_csv_bytes("ragged"))
    (folder / ("ok_" + name)).write_bytes((HEADER + "\n" + LINE + "\n").encode())
    with store.connect() as con:
        report = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
        registered = con.execute("SELECT file_name FROM governance.batches").fetchall()
    assert report.quarantined[0]["file"] == shown
    reason = (home.quarantine_for("gp_events") / (shown + ".reason.json")).read_text()
    assert json.loads(reason)["file"] == shown
    assert registered == [("ok_" + shown,)]
    names = [p.name for p in home.quarantine_for("gp_events").iterdir()]
    for text in (reason, str(report), str(registered), *names):
        assert "9990000018" not in text and "999 000 0018" not in text
    assert not any("\n" in n or "\x1b" in n for n in [*names, *(r[0] for r in registered)])


def test_a_resaved_copy_of_a_landed_file_is_not_landed_again(store: Store, home: Home) -> None:
    """Excel's "CSV UTF-8" re-save of a landed file (a byte-order mark, CRLF, every field quoted,
    rows in another order): other bytes, the same records; it is named and not landed twice. A
    file with one record more is a different file and lands."""
    folder = home.incoming_for("gp_events")
    rows = gp_rows(6, start=300)
    write_csv(folder / "gp_events_20261130.csv", rows, GP.field_names)
    with store.connect() as con:
        first = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    writer.writerow(GP.field_names)
    writer.writerows([[r[f] for f in GP.field_names] for r in reversed(rows)])
    (folder / "gp_events_20261130 (1).csv").write_bytes(("\ufeff" + buffer.getvalue()).encode())
    with store.connect() as con:
        again = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
        held = con.execute("SELECT count(*) FROM landing.gp_events").fetchone()[0]
    assert (first.files_landed, again.files_landed, again.files_skipped) == (1, 0, 1)
    assert again.copies == [{"file": "gp_events_20261130 (1).csv", "same_records_as": first.batches[0][:16]}]
    assert held == 6 and not list(folder.iterdir())
    write_csv(folder / "gp_more.csv", [*rows, *gp_rows(1, start=900)], GP.field_names)
    with store.connect() as con:
        more = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
    assert (more.files_landed, more.copies) == (1, [])


def test_batches_landed_before_the_records_digest_are_digested_once(store: Store, home: Home) -> None:
    folder = home.incoming_for("gp_events")
    rows = gp_rows(4, start=700)
    write_csv(folder / "old.csv", rows, GP.field_names)
    with store.connect() as con:
        ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
        con.execute("DELETE FROM governance.batch_contents")  # as a store made before the table
    write_csv(folder / "old again.csv", list(reversed(rows)), GP.field_names)
    with store.connect() as con:
        again = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
        digests = con.execute("SELECT count(*) FROM governance.batch_contents").fetchone()[0]
    assert (again.files_landed, len(again.copies), digests) == (0, 1, 1)


def test_a_file_still_open_for_writing_is_left_for_a_later_run_and_then_landed_whole(store: Store, home: Home) -> None:
    """A transfer tool writing the file in place has flushed 2 of its 5 rows when the run
    starts: nothing of it is landed or quarantined; once the writer closes it, it lands whole."""
    folder = home.incoming_for("gp_events")
    folder.mkdir(parents=True, exist_ok=True)
    rows = [",".join(r[f] for f in GP.field_names) for r in gp_rows(5, start=400)]
    with open(folder / "gp_extract.csv", "w") as writer:
        writer.write(HEADER + "\n" + "\n".join(rows[:2]) + "\n")
        writer.flush()
        with store.connect() as con:
            during = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
        writer.write("\n".join(rows[2:]) + "\n")
    with store.connect() as con:
        after = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
    assert (during.files_arriving, during.files_landed, during.files_quarantined) == (1, 0, 0)
    assert (after.files_landed, after.rows_landed) == (1, 5)


def test_a_file_written_to_while_it_is_read_is_not_committed(
    store: Store, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written to between the hash and the end of landing (a writer that opened it just after
    the check): the landing is rolled back and the file waits for the next run."""
    from safehaven.intake import ingest

    folder = home.incoming_for("gp_events")
    write_csv(folder / "gp_extract.csv", gp_rows(3, start=450), GP.field_names)
    original = ingest.read_relation_sql

    def appending(path, contract):
        with open(path, "a", newline="") as fh:  # as write_csv writes (csv module, CRLF)
            csv.writer(fh).writerow([gp_rows(1, start=460)[0][f] for f in GP.field_names])
        return original(path, contract)

    monkeypatch.setattr(ingest, "read_relation_sql", appending)
    with store.connect() as con:
        during = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
        held = con.execute("SELECT count(*) FROM landing.gp_events").fetchone()[0]
    assert (during.files_arriving, during.files_landed, held) == (1, 0, 0)
    monkeypatch.setattr(ingest, "read_relation_sql", original)
    with store.connect() as con:
        after = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
    assert (after.files_landed, after.rows_landed) == (1, 4)


@pytest.mark.parametrize(
    "name",
    [
        "gp 999\t000\t0018.csv",
        "gp 999\n000\n0018.csv",
        "optout_999_000_0018.csv",
        "(999) 000 0018.csv",
        "999,000,0018.csv",
        "999:000:0018.csv",
        "999  000  0018.csv",
        "9990000018abcdef.csv",
        "gp 999\u200b000\u200b0018.csv",
        os.fsdecode(b"gp 999\xe9000\xe90018.csv"),
        "\u0669\u0669\u0669\u0660\u0660\u0660\u0660\u0660\u0661\u0668.csv",
        # spellings a hostile review found passing the 3-3-4 rule (all valid numbers)
        "referral 999 - 000 - 0018.csv",
        "99 9000 0018.csv",
        "99900 00018.csv",
        "9 9 9 0 0 0 0 0 1 8.csv",
        "999-\u00ad 0000018.csv",
        "999\u200b\u200b\u200b0000018.csv",
        "\u2079\u2079\u2079\u2070\u2070\u2070\u2070\u2070\u00b9\u2078.csv",
        "\u2468\u2468\u2468\u24ea\u24ea\u24ea\u24ea\u24ea\u2460\u2467.csv",
        "09990000018.csv",
        "99900000189990000018.csv",
        "referral 999    000    0018.csv",
        "999\u200b\u200b\u200b\u200b0000018.csv",
    ],
)
def test_a_name_withholds_an_nhs_number_however_its_digit_groups_are_separated(name: str) -> None:
    from safehaven.core.audit import WITHHELD, shown_name

    shown = shown_name(name)
    assert WITHHELD in shown and not any(run in shown for run in ("999", "0018", "\u0669\u0669\u0669"))


#: digits of three scripts and widths, and characters that may stand between two digits
_SCRIPTS = (
    "0123456789",
    "\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19",
    "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669",
)
_GAPS = st.text(alphabet=" \t_-.,:;()[]\u00a0\u200b\u2010\u2013\u00ad/+#~", max_size=6)


@st.composite
def spelled_numbers(draw: st.DrawFn) -> tuple[str, str]:
    """(a valid NHS number, a file name spelling it in any grouping, script and width, between
    any text without digits)."""
    from safehaven.core.identifiers import check_digit

    nine = draw(st.text(alphabet="0123456789", min_size=9, max_size=9))
    check = check_digit(nine)
    if check is None:
        nine, check = "999000001", 8
    number = nine + str(check)
    script = draw(st.sampled_from(_SCRIPTS))
    spelled = "".join(script[int(d)] + (draw(_GAPS) if i < 9 else "") for i, d in enumerate(number))
    words = st.text(alphabet=st.characters(blacklist_categories=("Nd", "No", "Nl", "Cs")), max_size=12)
    return number, draw(words) + spelled + draw(words) + ".csv"


@settings(max_examples=300, deadline=None)
@given(spelled_numbers())
def test_no_spelling_of_a_valid_nhs_number_survives_in_a_shown_name(case: tuple[str, str]) -> None:
    """Whatever the grouping (any characters but letters and digits between them), the digits'
    script or width, and the text around it, the shown name never holds the number's ten digits
    in a row once its digits are read and its gaps dropped (CoP 8a)."""
    import unicodedata

    from safehaven.core.audit import shown_name

    number, name = case
    shown = shown_name(name)
    digits = "".join(str(int(n)) for c in shown if len(n := unicodedata.normalize("NFKC", c)) == 1 and n.isdecimal())
    assert number not in digits, (name, shown)


def test_a_number_spread_over_folders_is_withheld_from_a_shown_path() -> None:
    """A folder received whole keeps its inner names; a record of its files (a disposal
    certificate) shows their paths with a number withheld even when its groups are folders."""
    from safehaven.core.audit import WITHHELD, shown_path

    shown = shown_path("quarantine/gp_events/batch/999/000/0018.csv")
    assert WITHHELD in shown and "0018" not in shown and shown.startswith("quarantine/gp_events/batch/")


def test_dates_and_times_in_a_name_are_kept() -> None:
    from safehaven.core.audit import shown_name

    for name in ("gp_events_20261130.csv", "extract_2026-11-30_1200.csv", "drop 2026-11-30T23.59.59.csv"):
        assert shown_name(name) == name


@pytest.mark.parametrize("name", ["x" * 246 + ".csv", "\x01" * 70 + ".csv", "1234567890 " * 20 + ".csv"])
def test_a_name_too_long_once_shown_is_quarantined_under_a_shorter_one_with_its_reason(
    store: Store, home: Home, name: str
) -> None:
    folder = home.incoming_for("gp_events")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(_csv_bytes("ragged"))
    with store.connect() as con:
        report = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
    moved = home.quarantine_for("gp_events") / report.quarantined[0]["file"]
    assert moved.exists() and len(moved.name.encode()) <= 200 and moved.name.endswith(".csv")
    assert json.loads(moved.with_name(moved.name + ".reason.json").read_text())["rule"] == "file.malformed"


def test_entries_of_one_name_quarantined_unread_each_keep_their_own_copy_and_reason(
    store: Store, home: Home, tmp_path: Path
) -> None:
    """Three nights, each a symbolic link named ``export.csv`` (quarantined unread, so keyed by a
    stand-in for its hash): none overwrites another."""
    folder = home.incoming_for("gp_events")
    folder.mkdir(parents=True, exist_ok=True)
    for night in range(3):
        target = tmp_path / f"target{night}.csv"
        target.write_text(str(night))
        (folder / "export.csv").symlink_to(target)
        with store.connect() as con:
            report = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
        assert report.files_quarantined == 1
    kept = sorted(p.name for p in home.quarantine_for("gp_events").iterdir())
    assert len([k for k in kept if k.endswith(".reason.json")]) == 3 and len(kept) == 6
    assert (
        len(
            {
                json.loads((home.quarantine_for("gp_events") / k).read_text())["sha256"]
                for k in kept
                if k.endswith(".json")
            }
        )
        == 3
    )


def test_a_file_that_cannot_be_opened_is_quarantined_and_the_next_file_lands(
    store: Store, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The haven's user may not read a file (another account's 0600): it is quarantined as
    unreadable, the stage goes on (the check for a writer does not fail on it)."""
    folder = home.incoming_for("gp_events")
    write_csv(folder / "a_locked.csv", gp_rows(3, start=600), GP.field_names)
    write_csv(folder / "b_open.csv", gp_rows(3, start=610), GP.field_names)
    real_open = os.open

    def denying(path, flags, *args, **kwargs):
        if str(path).endswith("a_locked.csv"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denying)
    from safehaven.intake import ingest

    real_hash = ingest.sha256_file

    def denying_hash(path: Path) -> str:
        if path.name == "a_locked.csv":
            raise PermissionError(13, "Permission denied")
        return real_hash(path)

    monkeypatch.setattr(ingest, "sha256_file", denying_hash)
    with store.connect() as con:
        report = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
    assert (report.files_landed, report.quarantined[0]["rule"]) == (1, "file.unreadable")


def test_a_file_removed_and_sent_again_while_the_folder_is_read_does_not_fail_the_stage(
    store: Store, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safehaven.intake import ingest

    folder = home.incoming_for("gp_events")
    write_csv(folder / "gp.csv", gp_rows(3, start=620), GP.field_names)
    real = ingest.still_arriving

    def replaced(path):
        raise FileNotFoundError(path)  # gone at this instant; the sender re-uploads it at once

    monkeypatch.setattr(ingest, "still_arriving", replaced)
    with store.connect() as con:
        report = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
    assert report.files_vanished == 1 and (folder / "gp.csv").exists()
    monkeypatch.setattr(ingest, "still_arriving", real)
    with store.connect() as con:
        assert ingest_collection(con, GP, folder, home.quarantine_for("gp_events")).files_landed == 1


def test_a_change_time_ahead_of_the_clock_is_not_taken_as_arriving(tmp_path: Path) -> None:
    """Where no lease can be taken, "changed in the last minute" decides; a sender's clock an
    hour ahead (``scp -p``) must not make a complete file wait for ever."""
    from safehaven.intake.ingest import _changed_lately

    path = tmp_path / "f.csv"
    path.write_text("x")
    assert _changed_lately(path.stat())
    ahead = time.time() + 3600
    os.utime(path, (ahead, ahead))
    assert not _changed_lately(path.stat())


def test_records_of_a_refused_batch_sent_again_are_judged_again(store: Store, home: Home) -> None:
    """A re-saved copy of a refused batch is not a copy of held records: it lands and is
    validated again (after the sender's or the haven's fix it may be accepted)."""
    folder = home.incoming_for("gp_events")
    rows = gp_rows(4, start=640)
    write_csv(folder / "gp.csv", rows, GP.field_names)
    with store.connect() as con:
        first = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
        con.execute("UPDATE governance.batches SET status = 'refused' WHERE batch_id = ?", [first.batches[0]])
    write_csv(folder / "gp again.csv", list(reversed(rows)), GP.field_names)
    with store.connect() as con:
        again = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
    assert (again.files_landed, again.copies) == (1, [])


# --- files written by other tools: BOM, every field quoted, CRLF -----------------------------

#: Cell text: any Unicode but surrogates and NUL (a NUL byte is refused by rule), no CR/LF
#: (a quoted line break is CSV, but not this test's subject).
CELL = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00\r\n"), max_size=12)


def _land_bytes(contract, data: bytes) -> tuple[int, int, list[tuple]]:
    """Ingest ``data`` as one file into a fresh in-memory store: (landed, quarantined, rows)."""
    with tempfile.TemporaryDirectory() as tmp:
        incoming = Path(tmp) / "incoming"
        incoming.mkdir()
        (incoming / "drop.csv").write_bytes(data)
        con = duckdb.connect()
        con.execute("CREATE SCHEMA landing; CREATE SCHEMA governance")
        report = ingest_collection(con, contract, incoming, Path(tmp) / "quarantine")
        cols = ", ".join(f'"{f}"' for f in contract.field_names)
        rows = con.execute(f"SELECT {cols} FROM landing.{contract.collection} ORDER BY _row").fetchall()
        return report.files_landed, report.files_quarantined, rows


@settings(max_examples=40, deadline=None)
@given(
    collection=st.sampled_from(sorted(REGISTRY.contracts)),
    cells=st.lists(st.lists(CELL, min_size=12, max_size=12), min_size=1, max_size=4),
    crlf=st.booleans(),
)
def test_bom_and_quoted_header_land_for_every_collection(collection: str, cells: list[list[str]], crlf: bool) -> None:
    """A ``utf-8-sig`` file with every field quoted (Excel, csv.QUOTE_ALL) lands with its values."""
    contract = REGISTRY.contracts[collection]
    names = contract.field_names
    rows = [row[: len(names)] for row in cells]
    text = io.StringIO()
    writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\r\n" if crlf else "\n")
    writer.writerow(names)
    writer.writerows(rows)
    landed, quarantined, got = _land_bytes(contract, text.getvalue().encode("utf-8-sig"))
    assert (landed, quarantined) == (1, 0)
    assert got == [tuple(v if v != "" else None for v in row) for row in rows]  # DuckDB reads "" as NULL


@pytest.mark.parametrize("collection", sorted(REGISTRY.contracts))
def test_pandas_quote_all_with_bom_lands(collection: str) -> None:
    """The file from issue 14: pandas ``to_csv(quoting=QUOTE_ALL, encoding="utf-8-sig")``."""
    contract = REGISTRY.contracts[collection]
    frame = pd.DataFrame([{f: f"v{i}" for i, f in enumerate(contract.field_names)}])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.csv"
        frame.to_csv(path, index=False, quoting=csv.QUOTE_ALL, encoding="utf-8-sig", lineterminator="\r\n")
        data = path.read_bytes()
    assert data.startswith(b'\xef\xbb\xbf"')
    landed, quarantined, got = _land_bytes(contract, data)
    assert (landed, quarantined) == (1, 0)
    assert got == [tuple(f"v{i}" for i in range(len(contract.field_names)))]
