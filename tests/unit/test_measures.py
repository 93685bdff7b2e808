"""Quality measures per field and batch: completeness, validity, uniqueness, date coverage."""

from __future__ import annotations

from datetime import date

import pytest

from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake.contracts import CONTRACTS_DIR, ContractRegistry
from safehaven.intake.measures import MEASURES_TABLE
from safehaven.intake.validation import validate_collection
from tests.unit.validation_helpers import gp_rows, land

REGISTRY = ContractRegistry(CONTRACTS_DIR)


@pytest.fixture
def measured(store: Store, home: Home) -> dict[tuple[str, str], tuple]:
    rows = gp_rows(100)
    for r in rows[:20]:  # 20 events of one patient: 81 distinct patients
        r["nhs_number"] = rows[0]["nhs_number"]
    rows[30]["postcode"] = ""  # missing
    rows[31]["postcode"] = "NOT A POSTCODE"  # invalid
    rows[32]["event_date"] = "2026-02-30"  # does not parse
    rows[33]["event_date"] = "2099-01-01"  # out of range
    rows[34]["sex"] = "5"  # invalid
    with store.connect() as con:
        batch = land(con, home, REGISTRY, "gp_events", rows, "gp.csv")
        validate_collection(con, REGISTRY.contracts["gp_events"], REGISTRY, home.quarantine_for("gp_events"))
        got = con.execute(
            f"SELECT field, measure, value, numerator, denominator, period_start, period_end, batch_id, "
            f"collection, contract_version FROM {MEASURES_TABLE}"
        ).fetchall()
    assert {r[7] for r in got} == {batch}
    assert {(r[8], r[9]) for r in got} == {("gp_events", "1.0.0")}
    return {(r[0], r[1]): r[2:7] for r in got}


def test_batch_measures(measured) -> None:
    assert measured[("*", "rows")][:3] == (1.0, 100, 100)
    assert measured[("*", "row_validity")][:3] == (0.95, 95, 100)


def test_completeness_and_validity_per_field(measured) -> None:
    assert measured[("postcode", "completeness")][:3] == (0.99, 99, 100)
    assert measured[("postcode", "validity")][1:3] == (98, 99)
    assert measured[("event_date", "completeness")][:3] == (1.0, 100, 100)
    assert measured[("event_date", "validity")][1:3] == (98, 100)  # one unparseable, one out of range
    assert measured[("sex", "validity")][1:3] == (99, 100)
    assert measured[("diagnosis_code", "validity")][:3] == (1.0, 100, 100)
    fields = {f for f, m in measured if m == "completeness"}
    assert fields == set(REGISTRY.contracts["gp_events"].field_names)


def test_uniqueness_of_the_patient_key(measured) -> None:
    value, distinct, valid_rows = measured[("nhs_number", "uniqueness")][:3]
    assert (distinct, valid_rows) == (76, 95)  # rows 30-34 are invalid; 20 rows share one patient
    assert value == pytest.approx(76 / 95)


def test_date_coverage_of_the_period(measured) -> None:
    value, months, span, first, last = measured[("event_date", "date_coverage")]
    assert (months, span) == (6, 6)  # gp_rows spreads events over January to June 2026
    assert value == 1.0
    assert first == date(2026, 1, 10) and last == date(2026, 6, 19)


def test_measures_are_stored_once_per_batch_field_and_measure(store: Store, home: Home, measured) -> None:
    with store.connect() as con:
        dupes = con.execute(f"SELECT count(*) - count(DISTINCT (batch_id, field, measure)) FROM {MEASURES_TABLE}")
        assert dupes.fetchone() == (0,)
        columns = [d[0] for d in con.execute(f"SELECT * FROM {MEASURES_TABLE} LIMIT 0").description]
    assert columns == [
        "batch_id",
        "collection",
        "contract_version",
        "field",
        "measure",
        "value",
        "numerator",
        "denominator",
        "period_start",
        "period_end",
        "measured_at",
    ]
