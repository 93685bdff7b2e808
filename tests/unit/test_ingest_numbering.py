"""Landing numbers each row by its place in the file (``safehaven.intake.ingest.insert_numbered``).

``_row`` is the number a reason names a row by, part of a record's identity in the store, and the
order an objections file's statements are applied in. DuckDB reads a file of this size on
several threads; each row's ``diagnosis_code`` here holds its row number in the file, so the
numbers landing gives can be compared with the file itself.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake import ingest
from safehaven.intake.contracts import CONTRACTS_DIR, ContractRegistry
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


def test_a_batch_whose_new_rows_are_not_one_run_is_numbered_again_in_one_pass(
    store: Store, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "_one_run", lambda first, last, count, rows: False)
    _numbered_file(home.incoming_for("gp_events"), "gp_first.csv", 1)
    _land(store, home)
    assert _misnumbered(store, 1) == (ROWS, 0)
    with store.connect(read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT _batch) FROM landing.gp_events").fetchone() == (ROWS, 1)
