"""Landing numbers each row by its place in the file (``safehaven.intake.ingest.insert_numbered``).

``_row`` is the number a reason names a row by, part of a record's identity in the store, and the
order an objections file's statements are applied in. DuckDB reads a file of this size on
several threads; each row's ``diagnosis_code`` here holds its row number in the file, so the
numbers landing gives can be compared with the file itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError

from safehaven.core.files import sha256_file
from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake import ingest
from safehaven.intake.contracts import CONTRACTS_DIR, ContractRegistry, FieldSpec
from safehaven.intake.ingest import ingest_collection

GP = ContractRegistry(CONTRACTS_DIR).contracts["gp_events"]
#: DuckDB threads of the landing connection (the suite's default is one: ``tests/conftest.py``)
THREADS = 4
#: rows enough for DuckDB to read the file on several threads (about 16 MB of CSV; from about
#: 200,000 rows of these DuckDB 1.4 splits the file, and without insertion order kept it lands
#: them out of order)
ROWS = 300_000


def _numbered_file(folder: Path, name: str, first: int) -> pl.DataFrame:
    """A GP file (written by polars) whose ``diagnosis_code`` is each row's number in the file
    plus ``first`` - 1 (so two files' rows differ)."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = pl.DataFrame(
        {
            "practice_code": ["A81001"] * ROWS,
            "nhs_number": ["9990000018"] * ROWS,
            "date_of_birth": ["1950-02-03"] * ROWS,
            "sex": ["1"] * ROWS,
            "postcode": ["LS1 4AP"] * ROWS,
            "event_date": ["2026-01-01"] * ROWS,
            "diagnosis_code": [str(first + i) for i in range(ROWS)],
        }
    )
    path = folder / name
    if name.endswith(".parquet"):
        frame.write_parquet(path, row_group_size=20_000)
    else:
        frame.write_csv(path)
    return frame


def _misnumbered(store: Store, first: int) -> tuple[int, int]:
    """(rows of the batch whose codes start at ``first``, those whose ``_row`` is not their place)."""
    with store.connect(read_only=True) as con:
        return con.execute(
            "SELECT count(*), count(*) FILTER (WHERE _row <> CAST(diagnosis_code AS BIGINT) - ? + 1) "
            "FROM landing.gp_events WHERE CAST(diagnosis_code AS BIGINT) BETWEEN ? AND ?",
            [first, first, first + ROWS - 1],
        ).fetchone()


def _land(store: Store, home: Home) -> None:
    with Store(home, threads=THREADS).connect() as con:
        report = ingest_collection(con, GP, home.incoming_for("gp_events"), home.quarantine_for("gp_events"))
    assert report.files_landed == 1 and report.files_quarantined == 0, report


def test_each_landed_row_is_numbered_by_its_place_in_a_file_read_on_several_threads(store: Store, home: Home) -> None:
    _numbered_file(home.incoming_for("gp_events"), "gp_first.csv", 1)
    _land(store, home)
    assert _misnumbered(store, 1) == (ROWS, 0)
    # a second file lands beside rows already committed, and is numbered from 1 again
    _numbered_file(home.incoming_for("gp_events"), "gp_second.parquet", 1_000_001)
    _land(store, home)
    assert _misnumbered(store, 1_000_001) == (ROWS, 0)
    assert _misnumbered(store, 1) == (ROWS, 0)


def test_rows_of_the_batch_written_outside_the_haven_refuse_the_file_and_stay(store: Store, home: Home) -> None:
    """Rows already in the landing table under the file's batch id (its SHA-256), though the batch
    was never landed: the file is refused by name and nothing of it lands; the rows are left for a
    person to look into, not deleted or numbered."""
    folder = home.incoming_for("gp_events")
    _numbered_file(folder, "gp_first.csv", 1)
    sha = sha256_file(folder / "gp_first.csv")
    with store.connect() as con:
        ingest.ensure_tables(con, GP)
        con.execute("INSERT INTO landing.gp_events (nhs_number, _batch) VALUES ('foreign', ?)", [sha])
        report = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
        left = con.execute("SELECT nhs_number, _batch, _row FROM landing.gp_events").fetchall()
    assert report.files_landed == 0 and [q["rule"] for q in report.quarantined] == ["file.batch_in_landing"]
    assert left == [("foreign", sha, None)]


def test_a_field_cannot_be_named_as_duckdbs_row_id() -> None:
    """The landing numbers rows by DuckDB's row id; a column named ``rowid`` would hide it."""
    spec = {"name": "rowid", "type": "VARCHAR", "description": "x", "identifiability": "direct_identifier"}
    with pytest.raises(ValidationError, match="row id"):
        FieldSpec(**spec)
    assert FieldSpec(**{**spec, "name": "row_id"}).name == "row_id"


def _long_quoted_fields_file(folder: Path, name: str) -> tuple[int, int]:
    """A well-formed GP CSV whose every 51st row has a quoted field of about 780 KB holding line
    ends and lines that look like rows (found by review: DuckDB's parallel reader refuses it);
    each row's ``nhs_number`` is its row number. Returns the rows written and the long field's length."""
    folder.mkdir(parents=True, exist_ok=True)
    fake = "\n".join(f"{1_000_000 + j},fake,x,x,x,x,x" for j in range(60_000))
    n = 0
    with (folder / name).open("w", newline="", encoding="utf-8") as fh:
        fh.write(",".join(GP.field_names) + "\n")
        for _ in range(60):
            for text in [f'"{fake}"', *["38341003"] * 50]:
                n += 1
                fh.write(f"A81001,{n},1950-02-03,1,LS1 4AP,2026-01-01,{text}\n")
    return n, len(fake)


def test_a_file_the_parallel_reader_cannot_read_is_read_on_one_thread_not_refused(store: Store, home: Home) -> None:
    folder = home.incoming_for("gp_events")
    rows, longest = _long_quoted_fields_file(folder, "gp_long_fields.csv")
    _land(store, home)
    with store.connect(read_only=True) as con:
        landed = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE _row <> CAST(nhs_number AS BIGINT)), max(length(diagnosis_code)) "
            "FROM landing.gp_events"
        ).fetchone()
    assert landed == (rows, 0, longest)


def test_such_a_file_cut_short_inside_a_long_field_is_refused_not_landed_short(store: Store, home: Home) -> None:
    """DuckDB's one-thread reader drops a last row whose quoted field is never closed (found by
    review): the cut file is refused as malformed, whole, as the parallel reader would refuse it."""
    folder = home.incoming_for("gp_events")
    _long_quoted_fields_file(folder, "gp_cut.csv")
    path = folder / "gp_cut.csv"
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b',"') + 400_000])  # 400 KB into the last long field
    with Store(home, threads=THREADS).connect() as con:
        report = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
        landed = con.execute("SELECT count(*) FROM landing.gp_events").fetchone()[0]
    assert report.files_landed == 0 and [q["rule"] for q in report.quarantined] == ["file.malformed"]
    assert landed == 0


def test_rows_the_haven_cannot_number_refuse_the_file_as_its_own_fault(
    store: Store, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row ids that are not one run (never seen) refuse the file, nothing of it landed, with a
    reason that names the haven, not the sender, as at fault (found by review)."""
    monkeypatch.setattr(ingest, "_one_run", lambda first, last, rows: False)
    folder = home.incoming_for("gp_events")
    _numbered_file(folder, "gp_first.csv", 1)
    with store.connect() as con:
        report = ingest_collection(con, GP, folder, home.quarantine_for("gp_events"))
        landed = con.execute("SELECT count(*) FROM landing.gp_events").fetchone()[0]
    assert report.files_landed == 0 and [q["rule"] for q in report.quarantined] == ["file.not_numbered"]
    assert landed == 0
    reason = json.loads((home.quarantine_for("gp_events") / "gp_first.csv.reason.json").read_text())
    assert "fault in the haven" in reason["reason"]


def test_a_file_refused_for_rows_written_outside_the_haven_is_refused_again_until_they_are_removed(
    store: Store, home: Home
) -> None:
    """The refusal holds: the file sent back while the foreign rows are still there is refused
    again, with them left as they were; once a person has removed them it lands, numbered."""
    folder, quarantine = home.incoming_for("gp_events"), home.quarantine_for("gp_events")
    _numbered_file(folder, "gp_first.csv", 1)
    sha = sha256_file(folder / "gp_first.csv")
    with store.connect() as con:
        ingest.ensure_tables(con, GP)
        con.execute("INSERT INTO landing.gp_events (nhs_number, _batch) VALUES ('foreign', ?)", [sha])
        for _ in range(2):  # refused, then sent back unchanged and refused again
            report = ingest_collection(con, GP, folder, quarantine)
            assert report.files_landed == 0 and [q["rule"] for q in report.quarantined] == ["file.batch_in_landing"]
            assert con.execute("SELECT nhs_number, _row FROM landing.gp_events").fetchall() == [("foreign", None)]
            [kept] = quarantine.glob("gp_first*.csv")  # a second copy is kept under a name of its own
            kept.rename(folder / "gp_first.csv")
        con.execute("DELETE FROM landing.gp_events WHERE _batch = ?", [sha])  # the person's remedy
        report = ingest_collection(con, GP, folder, quarantine)
    assert report.files_landed == 1 and report.files_quarantined == 0, report
    assert _misnumbered(store, 1) == (ROWS, 0)
