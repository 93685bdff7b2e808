"""The NHS number rule (NHS Data Dictionary; ``docs/rules.md`` "Data standards")."""

import random

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safehaven.core.identifiers import (
    DASHES,
    WHITESPACE,
    canonical_nhs,
    canonical_nhs_sql,
    check_digit,
    is_spreadsheet_rendering,
    is_test_number,
    is_valid_nhs,
    nhs_fault,
    nhs_valid_sql,
    spreadsheet_sql,
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


# --- one canonical form in Python and SQL ----------------------------------------------------

SPACES = [chr(c) for lo, hi in WHITESPACE for c in range(lo, hi + 1)]
DASH_CHARS = [chr(c) for lo, hi in DASHES for c in range(lo, hi + 1)]
#: Characters that look like separators or digits but are neither here.
LOOKALIKES = ["\u200b", "\ufeff", "\u00ad", "/", ".", "_", "+", "'", '"', "\u2044", "\u00b7"]
UNICODE_DIGITS = ["\u0660", "\u06f5", "\u0966", "\uff11", "\u00b2", "\u2460", "\U0001d7ce"]


def _sql_view(values: list[str]) -> list[tuple[str | None, bool, bool]]:
    """Canonical text, validity and the spreadsheet flag of each value, as DuckDB computes them."""
    canon = canonical_nhs_sql("v")
    rows = duckdb.execute(
        f"SELECT i, {canon}, coalesce({nhs_valid_sql(canon)}, false), coalesce({spreadsheet_sql(canon)}, false) "
        "FROM (SELECT unnest(?) AS v, generate_subscripts(?, 1) AS i) ORDER BY i",
        [values, values],
    ).fetchall()
    return [(c, ok, sheet) for _, c, ok, sheet in rows]


def _python_view(value: str) -> tuple[str | None, bool, bool]:
    canon = canonical_nhs(value)
    return (canon or None, is_valid_nhs(value), bool(canon) and is_spreadsheet_rendering(canon))


def _generated(rng: random.Random) -> str:
    """A plausible or hostile rendering of an NHS number (valid or not)."""
    nine = "".join(rng.choice("0123456789") for _ in range(9))
    digit = check_digit(nine)
    digits = list(nine + str(digit if digit is not None and rng.random() < 0.8 else rng.randrange(10)))
    if rng.random() < 0.15:  # wrong length
        digits = digits[: rng.randrange(0, 12)] + [rng.choice("0123456789") for _ in range(rng.randrange(3))]
    out: list[str] = []
    for d in digits:
        if rng.random() < 0.03:
            d = rng.choice(UNICODE_DIGITS)
        out.append(d)
        if rng.random() < 0.25:
            out.append(rng.choice(SPACES + DASH_CHARS) * rng.randrange(1, 3))
        if rng.random() < 0.01:
            out.append(rng.choice(LOOKALIKES))
    text = "".join(out)
    roll = rng.random()
    if roll < 0.08:
        text += rng.choice([".0", ".", ".00", "/"])
    elif roll < 0.12:
        text = f"{text[:1]}.{text[1:]}{rng.choice(['E+09', 'e+9', 'E09', 'E-09', 'E+10'])}"
    elif roll < 0.14:
        text = rng.choice(["", " ", "\u00a0", "-", "\t\u2009"]) + text
    pad = [rng.choice(SPACES) for _ in range(rng.randrange(0, 3))]
    return "".join(pad) + text + "".join(reversed(pad))


def test_python_and_sql_agree_on_a_hundred_thousand_generated_strings() -> None:
    """Differential: the canonical text, validity and spreadsheet flag agree on every string."""
    rng = random.Random(20240614)
    values = [_generated(rng) for _ in range(100_000)]
    sql = _sql_view(values)
    disagree = [i for i, v in enumerate(values) if _python_view(v) != sql[i]]
    assert not disagree, f"{len(disagree)} disagreements, first at index {disagree[0]}"
    kinds = {nhs_fault(v) for v in values}
    assert kinds == {None, "missing", "spreadsheet", "format", "check_digit"}  # every path was exercised


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=20), min_size=1, max_size=50))
def test_python_and_sql_agree_on_any_unicode_text(values: list[str]) -> None:
    assert [_python_view(v) for v in values] == _sql_view(values)


@pytest.mark.parametrize("space", ["\u00a0", "\u2009", "\u000b", "\u3000", "\u202f", "\u2028"])
def test_unicode_spaces_separate_anywhere(space: str) -> None:
    text = f"943{space}476{space}5919"
    assert canonical_nhs(text) == "9434765919" and is_valid_nhs(text)
    assert _sql_view([text]) == [("9434765919", True, False)]


@pytest.mark.parametrize("dash", ["-", "\u2010", "\u2011", "\u2013", "\u2014", "\u2212"])
def test_usual_dashes_separate(dash: str) -> None:
    assert is_valid_nhs(f"943{dash}476{dash}5919")


@pytest.mark.parametrize("text", ["9434765919.0", "943476591.9", "9.434765919E+09", "9.43E09", "9434765919."])
def test_spreadsheet_renderings_are_invalid_with_their_own_rule(text: str) -> None:
    assert nhs_fault(text) == "spreadsheet"
    assert _sql_view([text])[0][1:] == (False, True)


@pytest.mark.parametrize("text", ["9434765919/", "943/476/5919", "\u0669\u0664\u0663" + "4765919", "94347\u200b65919"])
def test_other_characters_are_invalid(text: str) -> None:
    assert nhs_fault(text) == "format"
    assert _sql_view([text])[0][1:] == (False, False)


def test_separators_only_is_missing() -> None:
    assert nhs_fault(" \u00a0-\u2009") == "missing"
    assert _sql_view([" \u00a0-\u2009"]) == [(None, False, False)]
