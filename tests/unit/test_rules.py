"""Every contract rule compiled to SQL: a passing and a failing case each, the check digit, speed rules."""

from __future__ import annotations

import random
from datetime import date

import duckdb
import pytest

from safehaven.core.identifiers import check_digit, is_valid_nhs, nhs_valid_sql
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.rules import (
    check_weights_sql,
    compile_checks,
    lit,
    nhs_check_digit_lookup_sql,
    pass_sql,
    q,
)

TODAY = date(2026, 6, 30)
REGISTRY = ContractRegistry()

#: One valid row per collection, as text (the way a file lands).
VALID = {
    "gp_events": {
        "practice_code": "M83337",
        "nhs_number": "943 476 5919",
        "date_of_birth": "1950-02-03",
        "sex": "1",
        "postcode": "b29 3rh",
        "event_date": "2026-01-02",
        "diagnosis_code": "38341003",
    },
    "hospital_episodes": {
        "provider_code": "RRK",
        "nhs_number": "943-476-5919",
        "date_of_birth": "1950-02-03",
        "sex": "2",
        "postcode": "LS1 4AP",
        "admission_date": "2026-01-02",
        "discharge_date": "2026-01-05",
        "primary_diagnosis": "i219",
    },
    "social_care": {
        "local_authority_code": "E08000025",
        "service_type": "day_care",
        "start_date": "2026-01-02",
        "end_date": "",
        "nhs_number": "9434765919",
        "date_of_birth": "1950-02-03",
        "sex": "9",
        "postcode": "M1 1AE",
    },
    "objections": {
        "nhs_number": "9434765919",
        "objection_type": "type1",
        "recorded_date": "2025-01-01",
        "withdrawn_date": "",
        "source_practice": "M83337",
    },
}


def failed_rules(collection: str, rows: list[dict[str, str | None]], over: str = "typed") -> list[list[str]]:
    """The rules each row breaks, by the single pass (or the landed-text predicates)."""
    contract = REGISTRY.contracts[collection]
    con = duckdb.connect()
    cols = ", ".join(f"{q(f)} VARCHAR" for f in contract.field_names)
    con.execute(f"CREATE TABLE landed ({cols}, _batch VARCHAR, _row BIGINT)")
    for i, row in enumerate(rows, start=1):
        con.execute(
            f"INSERT INTO landed VALUES ({', '.join('?' for _ in contract.field_names)}, 'b', ?)",
            [row[f] for f in contract.field_names] + [i],
        )
    if over == "typed":
        sql = pass_sql(contract, REGISTRY, "landed", ["b"], TODAY)
        return [sorted(r[0]) for r in con.execute(f"SELECT failed_rules FROM ({sql}) ORDER BY _row").fetchall()]
    checks = compile_checks(contract, REGISTRY, TODAY, over="landed")
    items = ", ".join(f"CASE WHEN NOT ({c.valid_sql}) THEN {lit(c.id)} END" for c in checks)
    sql = f"SELECT list_filter([{items}], x -> x IS NOT NULL) FROM landed ORDER BY _row"
    return [sorted(r[0]) for r in con.execute(sql).fetchall()]


def with_value(collection: str, **values: str | None) -> dict[str, str | None]:
    return {**VALID[collection], **values}


# (collection, field overrides, the rules the row must break; [] = it must pass)
CASES = [
    # required: present passes (VALID), missing fails; empty text and blanks count as missing
    ("gp_events", {"practice_code": ""}, ["practice_code.required"]),
    ("gp_events", {"sex": "   "}, ["sex.required"]),
    ("gp_events", {"nhs_number": None}, ["nhs_number.required"]),
    ("gp_events", {"nhs_number": " - "}, ["nhs_number.required"]),  # separators only
    ("objections", {"withdrawn_date": ""}, []),  # optional: missing is fine
    # type: a date that parses passes, one that does not fails
    ("gp_events", {"event_date": "2025-13-45"}, ["event_date.type"]),
    ("gp_events", {"date_of_birth": "03/02/1950"}, ["date_of_birth.type"]),
    ("objections", {"withdrawn_date": "2025-02-30"}, ["withdrawn_date.type"]),
    # NHS number: Unicode spaces and dashes anywhere pass; a wrong check digit, a check of 10,
    # the wrong length, letters, dots or slashes fail; a spreadsheet rendering fails its own rule too
    ("gp_events", {"nhs_number": "943\u00a0476\u20095919"}, []),
    ("gp_events", {"nhs_number": "\u000b943\u2013476\u20135919 "}, []),
    ("gp_events", {"nhs_number": "943.476.5919"}, ["nhs_number.nhs_number"]),
    ("gp_events", {"nhs_number": "9434765919/"}, ["nhs_number.nhs_number"]),
    ("gp_events", {"nhs_number": "943476591.0"}, ["nhs_number.nhs_number", "nhs_number.spreadsheet"]),
    ("objections", {"nhs_number": "9.434765919E+09"}, ["nhs_number.nhs_number", "nhs_number.spreadsheet"]),
    ("gp_events", {"nhs_number": "9434765918"}, ["nhs_number.nhs_number"]),
    ("gp_events", {"nhs_number": "999000006" + "0"}, ["nhs_number.nhs_number"]),  # check digit would be 10
    ("gp_events", {"nhs_number": "943476591"}, ["nhs_number.nhs_number"]),
    ("gp_events", {"nhs_number": "94347659190"}, ["nhs_number.nhs_number"]),
    ("gp_events", {"nhs_number": "943476591X"}, ["nhs_number.nhs_number"]),
    # formats: postcode (any case), ODS, GSS-like local authority via its code list
    ("gp_events", {"postcode": "EC1A 1BB"}, []),
    ("gp_events", {"postcode": "EC1A1BB"}, []),
    ("gp_events", {"postcode": "B29 3R"}, ["postcode.format"]),
    ("gp_events", {"postcode": "12345"}, ["postcode.format"]),
    ("gp_events", {"practice_code": "M8333712"}, ["practice_code.format"]),
    ("gp_events", {"practice_code": "m83337"}, ["practice_code.format"]),
    ("hospital_episodes", {"provider_code": "R!K"}, ["provider_code.format"]),
    ("objections", {"source_practice": "AB"}, ["source_practice.format"]),
    # code lists: exact match, and ICD-10 on the first three characters in any case
    ("gp_events", {"diagnosis_code": "99999999"}, ["diagnosis_code.code_list"]),
    ("gp_events", {"sex": "3"}, ["sex.code_list"]),
    ("hospital_episodes", {"sex": "M"}, ["sex.code_list"]),
    ("social_care", {"sex": "F"}, ["sex.code_list"]),
    ("social_care", {"postcode": "B2"}, ["postcode.format"]),
    ("hospital_episodes", {"postcode": "LS14 AP"}, ["postcode.format"]),
    ("hospital_episodes", {"primary_diagnosis": "I21"}, []),
    ("hospital_episodes", {"primary_diagnosis": "Q999"}, ["primary_diagnosis.code_list"]),
    ("hospital_episodes", {"primary_diagnosis": "I2"}, ["primary_diagnosis.code_list"]),
    ("social_care", {"local_authority_code": "E99999999"}, ["local_authority_code.code_list"]),
    ("social_care", {"service_type": "Day_Care"}, ["service_type.code_list"]),
    ("objections", {"objection_type": "type2"}, ["objection_type.code_list"]),
    # date ranges: plausible passes; before min or after today fails
    ("gp_events", {"date_of_birth": "1900-01-01"}, []),
    ("gp_events", {"date_of_birth": "1899-12-31"}, ["date_of_birth.range"]),
    ("gp_events", {"event_date": TODAY.isoformat()}, []),
    ("gp_events", {"event_date": "2026-07-01", "date_of_birth": "1950-02-03"}, ["event_date.range"]),
    ("hospital_episodes", {"admission_date": "1999-12-31", "date_of_birth": "1950-02-03"}, ["admission_date.range"]),
    # cross-field: equal dates pass; later-before-earlier fails; a missing side passes here
    ("hospital_episodes", {"discharge_date": "2026-01-02"}, []),
    ("hospital_episodes", {"discharge_date": "2026-01-01"}, ["discharge_not_before_admission"]),
    ("gp_events", {"date_of_birth": "2026-01-03"}, ["event_not_before_birth"]),
    ("social_care", {"end_date": "2026-01-01"}, ["end_not_before_start"]),
    ("social_care", {"date_of_birth": "2026-02-01"}, ["start_not_before_birth"]),
    ("hospital_episodes", {"date_of_birth": "2026-01-03"}, ["admission_not_before_birth"]),
    ("objections", {"withdrawn_date": "2024-12-31"}, ["withdrawn_not_before_recorded"]),
    ("hospital_episodes", {"discharge_date": ""}, ["discharge_date.required"]),
]


@pytest.mark.parametrize("collection", sorted(VALID))
def test_the_valid_row_passes_every_rule(collection: str) -> None:
    assert failed_rules(collection, [VALID[collection]]) == [[]]


@pytest.mark.parametrize(
    ("collection", "values", "expected"), CASES, ids=[f"{c}:{','.join(v)}={'|'.join(e) or 'ok'}" for c, v, e in CASES]
)
def test_each_rule_passes_and_fails_as_written(
    collection: str, values: dict[str, str | None], expected: list[str]
) -> None:
    row = with_value(collection, **values)
    assert failed_rules(collection, [row]) == [sorted(expected)]
    # The same predicates written over the landed text give the same verdict.
    assert failed_rules(collection, [row], over="landed") == [sorted(expected)]


def test_every_rule_of_every_contract_has_a_failing_case() -> None:
    """Every code list, cross-field rule and format of every contract, and every kind of rule."""
    covered = {(c, rule) for c, _, expected in CASES for rule in expected}
    kinds: set[str] = set()
    for contract in REGISTRY.contracts.values():
        for check in compile_checks(contract, REGISTRY, TODAY, over="typed"):
            if (contract.collection, check.id) in covered:
                kinds.add(check.kind)
            elif check.kind in ("code_list", "allowed", "order", "format"):
                pytest.fail(f"{contract.collection}: no failing case for {check.id}")
    assert kinds == {"required", "type", "nhs_number", "spreadsheet", "format", "code_list", "range", "order"}


def test_a_row_breaking_several_rules_lists_each_once() -> None:
    row = with_value("gp_events", nhs_number="123", sex="", event_date="2099-01-01")
    assert failed_rules("gp_events", [row]) == [["event_date.range", "nhs_number.nhs_number", "sex.required"]]


# --- the check digit -------------------------------------------------------------------------

#: The check digit over the number's text (``safehaven.core.identifiers``): the lookup must agree with it.
TEXT_CHECK = nhs_valid_sql("CAST(n AS VARCHAR)")


def test_published_example_and_a_check_of_ten() -> None:
    con = duckdb.connect()
    assert check_digit("943476591") == 9
    nine = next(f"999{n:06d}" for n in range(1000) if check_digit(f"999{n:06d}") is None)
    numbers = [9434765919, 9434765918] + [int(nine + str(d)) for d in range(10)]
    sql = (
        f"SELECT n, {nhs_check_digit_lookup_sql('n')}, {TEXT_CHECK} FROM (SELECT unnest(?) AS n), "
        f"{check_weights_sql()} AS _w"
    )
    got = {n: (a, b) for n, a, b in con.execute(sql, [numbers]).fetchall()}
    assert got[9434765919] == (True, True)
    assert got[9434765918] == (False, False)
    assert all(got[int(nine + str(d))] == (False, False) for d in range(10))


def test_sql_check_digit_matches_the_published_algorithm_on_a_hundred_thousand_numbers() -> None:
    rng = random.Random(3)
    numbers = [rng.randrange(10**9, 10**10) for _ in range(50_000)]
    numbers += [int(f"{p}{check_digit(str(p)) or 0}") for p in (rng.randrange(10**8, 10**9) for _ in range(50_000))]
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT n, {nhs_check_digit_lookup_sql('n')}, {TEXT_CHECK} "
        f"FROM (SELECT unnest(?) AS n), {check_weights_sql()} AS _w",
        [numbers],
    ).fetchall()
    for n, lookup, text in rows:
        expected = is_valid_nhs(str(n))
        assert lookup is expected and text is expected, n
    assert sum(1 for _, ok, _ in rows if ok) > 40_000


# --- compiled once ---------------------------------------------------------------------------


def test_each_field_is_canonicalised_and_parsed_once_in_the_pass() -> None:
    for contract in REGISTRY.contracts.values():
        sql = pass_sql(contract, REGISTRY, "landed", ["b"], TODAY)
        nhs_fields = [f for f in contract.fields if f.rule and f.rule.format == "nhs_number"]
        dates = [f for f in contract.fields if f.type == "DATE"]
        assert sql.count("regexp_replace(") == len(nhs_fields), contract.collection
        assert sql.count("try_strptime(") == len(dates), contract.collection


def test_rules_that_need_no_value_pass_on_null() -> None:
    checks = compile_checks(REGISTRY.contracts["objections"], REGISTRY, TODAY, over="typed")
    con = duckdb.connect()
    row = (
        "SELECT NULL::VARCHAR AS nhs_number, NULL::VARCHAR AS objection_type, NULL::VARCHAR AS _raw_recorded_date, "
        "NULL::DATE AS recorded_date, NULL::VARCHAR AS _raw_withdrawn_date, NULL::DATE AS withdrawn_date, "
        "NULL::VARCHAR AS source_practice, NULL::BIGINT AS _int_nhs_number, [0] AS hi, [0] AS lo"
    )
    for check in checks:
        ok = con.execute(f"SELECT {check.valid_sql.replace('_w.', '')} FROM ({row})").fetchone()[0]
        assert ok is (check.kind != "required"), check.id
