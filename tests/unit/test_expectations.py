"""The contract -> Great Expectations compiler: one expectation per rule, equal in meaning to the SQL."""

from __future__ import annotations

from datetime import date

import duckdb
import pytest

from safehaven.intake.contracts import CONTRACTS_DIR, ContractRegistry
from safehaven.intake.expectations import BROKEN_RULES, ROWS_RULE, anchored, compile_suite, prefix3_regex
from safehaven.intake.rules import FORMAT_RE, NHS_RE, compile_checks, prefix3_sql, typed_projection

REGISTRY = ContractRegistry(CONTRACTS_DIR)
TODAY = date(2026, 6, 30)

EXPECTED_TYPES = {
    "required": "expect_column_values_to_not_be_null",
    "type": "expect_column_values_to_not_be_null",
    "nhs_number": "expect_column_values_to_match_regex",
    "format": "expect_column_values_to_match_regex",
    "range": "expect_column_values_to_be_between",
    "order": "expect_column_pair_values_a_to_be_greater_than_b",
}


@pytest.mark.parametrize("collection", sorted(REGISTRY.contracts))
def test_one_expectation_per_rule_and_one_for_the_rows(collection: str) -> None:
    contract = REGISTRY.contracts[collection]
    checks = compile_checks(contract, REGISTRY, TODAY, over="typed")
    suite = compile_suite(contract, REGISTRY, TODAY)
    assert [p.rule_id for p in suite] == [c.id for c in checks] + [ROWS_RULE]
    for planned in suite:
        config = planned.expectation.configuration
        assert config.meta["id"] == planned.rule_id
        if planned.kind in EXPECTED_TYPES:
            assert config.type == EXPECTED_TYPES[planned.kind], planned.rule_id
        if contract.tolerance > 0:
            assert config.kwargs["mostly"] == pytest.approx(1 - contract.tolerance)
        else:
            assert config.kwargs.get("mostly", 1) == 1
    rows = suite[-1].expectation.configuration
    assert rows.kwargs["column"] == BROKEN_RULES and rows.kwargs["max_value"] == 0
    # GX reads the typed projection of the pass and the per-row count of broken rules (safehaven.intake.validation).
    gx_columns = {c.name for c in typed_projection(contract)} | {BROKEN_RULES}
    assert gx_columns >= {f.name for f in contract.fields} | {BROKEN_RULES}
    for planned in suite:
        kwargs = planned.expectation.configuration.kwargs
        read = [kwargs.get(k) for k in ("column", "column_A", "column_B")] + list(kwargs.get("column_list") or [])
        assert {c for c in read if c} <= gx_columns, planned.rule_id


def test_expectations_read_the_typed_values_and_the_contract() -> None:
    hospital = {p.rule_id: p for p in compile_suite(REGISTRY.contracts["hospital_episodes"], REGISTRY, TODAY)}
    sex = hospital["sex.code_list"].expectation.configuration
    assert sex.type == "expect_column_values_to_be_in_set"
    assert sex.kwargs["column"] == "sex"
    assert sex.kwargs["value_set"] == REGISTRY.code_list("person_gender").code_values
    admitted = hospital["admission_date.range"].expectation.configuration.kwargs
    assert admitted["column"] == "admission_date"
    assert str(admitted["min_value"])[:10] == "2000-01-01" and str(admitted["max_value"])[:10] == TODAY.isoformat()
    pair = hospital["discharge_not_before_admission"].expectation.configuration.kwargs
    assert (pair["column_A"], pair["column_B"], pair["or_equal"]) == ("discharge_date", "admission_date", True)
    assert pair["ignore_row_if"] == "either_value_is_missing"
    required = hospital["admission_date.required"].expectation.configuration.kwargs
    assert required["column"] == "_raw_admission_date"  # the text as given
    typed = hospital["admission_date.type"].expectation.configuration.kwargs
    assert typed["column"] == "admission_date"
    assert "_raw_admission_date" in str(typed["row_condition"])
    nhs = hospital["nhs_number.nhs_number"]
    assert nhs.evaluated_by == "gx+sql" and not nhs.comparable
    assert nhs.expectation.configuration.kwargs["regex"] == anchored(NHS_RE)
    icd = hospital["primary_diagnosis.code_list"].expectation.configuration
    assert icd.type == "expect_column_values_to_match_regex"
    assert icd.kwargs["regex"] == prefix3_regex(REGISTRY.code_list("icd10").code_values)
    assert "(?i" not in icd.kwargs["regex"]  # RE2's case folding is not DuckDB's upper(): ASCII letters only


SAMPLES = {
    "uk_postcode": ["B29 3RH", "EC1A 1BB", "EC1A1BB", "XB29 3RHX", "B29 3R", "12345", "B29  3RH", "b29 3rh"],
    "ods_code": ["M83337", "RRK", "AB", "M833371", "M8333 ", "m83337", "RR-K"],
    "gss_code": ["E08000025", "W06000015", "E0800002", "X08000025", "E080000251"],
}


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_anchored_regexes_on_duckdb_equal_the_sql_full_match(fmt: str) -> None:
    """GX on DuckDB is a partial match (regexp_matches): anchoring makes it the SQL rule."""
    con = duckdb.connect()
    regex = FORMAT_RE[fmt]
    for value in SAMPLES[fmt]:
        gx_side, sql_side = con.execute(
            "SELECT regexp_matches($v, $a), regexp_full_match($v, $r)", {"v": value, "a": anchored(regex), "r": regex}
        ).fetchone()
        assert gx_side is sql_side, value
    assert con.execute("SELECT regexp_matches('XB29 3RHX', ?)", [FORMAT_RE["uk_postcode"]]).fetchone()[0]


def test_prefix3_regex_equals_the_sql_rule() -> None:
    codes = ["A08", "I21", "C50", "Z9", "LONG1", "K21"]
    regex = prefix3_regex(codes)
    con = duckdb.connect()
    look_alikes = ["\u212a21", "\u013121", "\u0130219", "\uff2b21", "\u041a21", "K21\uff19", "\u017a9", "A\uff108"]
    for value in [
        "A08",
        "a08",
        "A081",
        "I219X",
        "I2",
        "Z9",
        "z9",
        "Z91",
        "LONG1",
        "LON",
        "B01",
        "",
        "A0",
        *look_alikes,
    ]:
        gx_side, sql_side = con.execute(
            f"SELECT regexp_matches($v, $re), {prefix3_sql('$v', codes)}", {"v": value, "re": regex}
        ).fetchone()
        assert gx_side is sql_side, value
        assert sql_side is (value.isascii() and value[:3].upper() in {"A08", "I21", "C50", "Z9", "K21"}), value
    assert prefix3_regex(["LONG1"]) == "^$a"


def test_the_compiled_icd10_regex_accepts_the_code_list_and_its_fourth_characters() -> None:
    codes = REGISTRY.code_list("icd10").code_values
    regex = prefix3_regex(codes)
    con = duckdb.connect()
    ok = con.execute(
        "SELECT bool_and(regexp_matches(c, ?)) FROM (SELECT unnest(?) AS c)",
        [regex, codes + [c + "9" for c in codes] + [c.lower() for c in codes]],
    ).fetchone()[0]
    assert ok
    assert not con.execute("SELECT regexp_matches('Q99', ?)", [regex]).fetchone()[0]
