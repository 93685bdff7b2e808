"""Small hand-made batches for the validation tests: valid rows, one known defect at a time."""

from __future__ import annotations

import csv
from pathlib import Path

import duckdb

from safehaven.core.home import Home
from safehaven.core.identifiers import check_digit
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.ingest import ingest_collection


def nhs_numbers(count: int, start: int = 0) -> list[str]:
    """Valid test-range NHS numbers (999...), distinct, in order."""
    found: list[str] = []
    n = start
    while len(found) < count:
        nine = f"999{n:06d}"
        digit = check_digit(nine)
        if digit is not None:
            found.append(nine + str(digit))
        n += 1
    return found


def gp_rows(count: int, start: int = 0) -> list[dict[str, str]]:
    """Valid gp_events rows, one patient each."""
    return [
        {
            "practice_code": "M83337",
            "nhs_number": nhs,
            "date_of_birth": "1950-02-03",
            "sex": "1",
            "postcode": "B29 3RH",
            "event_date": f"2026-0{1 + i % 6}-1{i % 10}",
            "diagnosis_code": "38341003",
        }
        for i, nhs in enumerate(nhs_numbers(count, start))
    ]


def write_csv(path: Path, rows: list[dict[str, str]], columns: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def land(
    con: duckdb.DuckDBPyConnection,
    home: Home,
    registry: ContractRegistry,
    collection: str,
    rows: list[dict[str, str]],
    name: str,
) -> str:
    """Write ``rows`` as ``incoming/<collection>/<name>`` and land it; return the batch id."""
    contract = registry.contracts[collection]
    write_csv(home.incoming_for(collection) / name, rows, contract.field_names)
    report = ingest_collection(con, contract, home.incoming_for(collection), home.quarantine_for(collection))
    assert report.files_landed == 1, report
    return report.batches[0]
