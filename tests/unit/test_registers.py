"""Tests for ``safehaven.core.registers``: breach register scale and published exports (CoP 32-33; Govt rec. 6)."""

from __future__ import annotations

from collections.abc import Iterator

import duckdb
import pytest

from safehaven.core import registers as reg
from safehaven.core.home import Home
from safehaven.core.store import Store


@pytest.fixture
def con(home: Home) -> Iterator[duckdb.DuckDBPyConnection]:
    with Store(home).connect() as connection:
        yield connection


def test_record_breach_numbers_entries_and_uses_the_scale(con: duckdb.DuckDBPyConnection) -> None:
    first = reg.record_breach(
        con, kind="refused_linkage", severity=None, what="a join was refused", remedial_action="nothing was joined"
    )
    second = reg.record_breach(
        con,
        kind="type1_objection_disregarded",
        severity="low",
        what="3 records sent by 1 practice",
        remedial_action="dropped",
        detail={"records_by_sender": {"A81001": 3}},
    )
    third = reg.record_breach(
        con, kind="local_incident", severity="serious", what="x happened", remedial_action="y was done"
    )
    assert (first, second, third) == (1, 2, 3)
    rows = reg.breaches(con)
    assert [(r["kind"], r["severity"]) for r in rows] == [
        ("refused_linkage", 0),
        ("type1_objection_disregarded", 0),
        ("local_incident", 2),
    ]
    assert rows[0]["severity_label"].startswith("near miss")
    assert rows[2]["severity_label"].startswith("serious, reportable")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"kind": "made_up", "severity": None}, "give its severity"),
        ({"kind": "refused_linkage", "severity": 7}, "not on the scale"),
        ({"kind": "Bad Kind", "severity": 0}, "lower-case words"),
        ({"kind": "refused_linkage", "severity": 0, "what": ""}, "what happened"),
        ({"kind": "refused_linkage", "severity": 0, "what": "patient 999 123 4567 objected"}, "NHS number"),
        ({"kind": "refused_linkage", "severity": 0, "detail": {"n": "9991234567"}}, "NHS number"),
    ],
)
def test_bad_breach_entries_are_refused(con: duckdb.DuckDBPyConnection, kwargs: dict, words: str) -> None:
    entry = {"what": "something", "remedial_action": "something else", **kwargs}
    with pytest.raises(ValueError, match=words):
        reg.record_breach(con, **entry)
    assert reg.breaches(con) == []


def test_record_breach_is_rolled_back_with_the_callers_transaction(con: duckdb.DuckDBPyConnection) -> None:
    reg.ensure_tables(con)
    con.execute("BEGIN TRANSACTION")
    reg.record_breach(con, kind="no_legal_basis", severity=1, what="x", remedial_action="y")
    con.execute("ROLLBACK")
    assert reg.breaches(con) == []


def test_export_writes_csv_and_parquet_with_formula_cells_neutralised(
    con: duckdb.DuckDBPyConnection, home: Home
) -> None:
    reg.record_breach(
        con, kind="no_legal_basis", severity=1, what='=HYPERLINK("http://x")', remedial_action="-2+3 was removed"
    )
    paths = reg.export(con, home)
    assert set(paths) == {
        "data_release_register.csv",
        "data_release_register.parquet",
        "breach_register.csv",
        "breach_register.parquet",
    }
    csv = (home.registers / "breach_register.csv").read_text()
    assert "'=HYPERLINK" in csv and "'-2+3" in csv
    parquet = duckdb.sql(f"SELECT what FROM '{home.registers / 'breach_register.parquet'}'").fetchall()
    assert parquet == [('=HYPERLINK("http://x")',)]
    header = (home.registers / "data_release_register.csv").read_text().splitlines()[0]
    for column in (
        "agreement_id",
        "recipient",
        "purposes",
        "legal_basis",
        "collections",
        "identifiability",
        "agreement_start",
        "agreement_end",
        "opt_outs_applied",
        "opt_outs_reason",
        "records_released",
        "records_withheld_objections",
    ):
        assert column in header


def test_severity_scale_is_documented() -> None:
    assert set(reg.SEVERITY_LABELS) == {0, 1, 2}
    for kind in ("refused_linkage", "no_legal_basis", "objection_breached", "integrity_failure"):
        assert kind in reg.KINDS
        assert f"**{reg.KINDS[kind].severity}," in (reg.__doc__ or "")


def test_every_column_type_but_numbers_dates_and_booleans_is_neutralised_in_a_register_export(
    con: duckdb.DuckDBPyConnection, home: Home
) -> None:
    """A cell is text to a spreadsheet unless its column holds numbers, dates, times or booleans
    (``disclosure.formula_safe_type``): an ENUM, a UNION or a BLOB starting with a formula leader
    is prefixed as a VARCHAR one is (found by review: only VARCHAR and JSON were); a negative
    number, a date and a boolean are written as they are."""
    con.execute("CREATE TYPE leader AS ENUM ('=HYPERLINK(1)', 'ok')")
    con.execute("CREATE SCHEMA IF NOT EXISTS odd")
    con.execute(
        "CREATE TABLE odd.register (id INTEGER, e leader, u UNION(s VARCHAR, n INTEGER), b BLOB, "
        "v VARCHAR COLLATE nocase, amount DECIMAL(9,2), day DATE, stamped TIMESTAMPTZ, flag BOOLEAN)"
    )
    con.execute(
        "INSERT INTO odd.register VALUES (1, '=HYPERLINK(1)', union_value(s := '=1+1'), '@x'::BLOB, '+44', "
        "-2.50, DATE '2026-01-02', TIMESTAMPTZ '2026-01-02 03:04:05+00', true)"
    )
    reg.export_table(con, home, "odd.register", "odd_register", "id")
    [row] = duckdb.sql(f"SELECT * FROM read_csv('{home.registers / 'odd_register.csv'}', all_varchar=true)").fetchall()
    assert row[:5] == ("1", "'=HYPERLINK(1)", "'=1+1", "'@x", "'+44")
    assert row[5:7] == ("-2.50", "2026-01-02") and row[8] == "true"
    assert not row[7].startswith("'")
