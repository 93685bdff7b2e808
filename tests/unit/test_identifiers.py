"""The NHS number rule (NHS Data Dictionary; ``docs/rules.md`` "Data standards")."""

import duckdb
import pytest

from safehaven.core.identifiers import (
    canonical_nhs,
    canonical_nhs_sql,
    check_digit,
    is_test_number,
    is_valid_nhs,
    nhs_valid_sql,
)


def test_published_example_is_valid_in_every_format() -> None:
    for text in ("943 476 5919", "9434765919", "943-476-5919"):
        assert is_valid_nhs(text)
        assert canonical_nhs(text) == "9434765919"


def test_wrong_check_digit_is_invalid() -> None:
    assert not is_valid_nhs("9434765918")


def test_check_of_ten_means_invalid() -> None:
    # 000000060: weighted sum 6*3 = 18, 18 % 11 = 7, 11 - 7 = 4 -> valid; find a ten instead
    nine = next(f"{n:09d}" for n in range(1000) if check_digit(f"{n:09d}") is None)
    assert check_digit(nine) is None
    assert not any(is_valid_nhs(nine + str(d)) for d in range(10))


def test_check_of_eleven_becomes_zero() -> None:
    nine = next(f"{n:09d}" for n in range(1000) if check_digit(f"{n:09d}") == 0)
    assert is_valid_nhs(nine + "0")


def test_test_range() -> None:
    assert is_test_number("999 000 0018")
    assert not is_test_number("9434765919")


@pytest.mark.parametrize(
    "value,expected",
    [
        ("943 476 5919", True),
        ("943-476-5919", True),
        ("9434765919", True),
        ("9434765918", False),
        ("94347659", False),
        ("abcdefghij", False),
        (None, False),
        ("", False),
    ],
)
def test_sql_rule_matches_python(value: str | None, expected: bool) -> None:
    sql = nhs_valid_sql(canonical_nhs_sql("$v"))
    assert duckdb.execute(f"SELECT {sql}", {"v": value}).fetchone()[0] is expected


def test_sql_and_python_agree_on_ten_thousand_numbers() -> None:
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT n, {nhs_valid_sql('n')} FROM (SELECT lpad(CAST(9990000000 + range * 7 AS VARCHAR), 10, '0') n "
        "FROM range(10000))"
    ).fetchall()
    assert all(is_valid_nhs(n) is ok for n, ok in rows)
    assert any(ok for _, ok in rows) and not all(ok for _, ok in rows)
