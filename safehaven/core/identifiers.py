"""NHS number rules, as DuckDB SQL and as plain Python for single values.

Rule (NHS Data Dictionary, "NHS NUMBER"; ``docs/rules.md`` "Data standards", CoP 7-9): an NHS number is
ten digits. Digits 1-9 are weighted 10 down to 2 and summed; the check digit is
``11 - (sum mod 11)``, where 11 becomes 0 and 10 means the number is invalid. Numbers that
start with 999 pass the check but are never issued: they are test numbers, and all synthetic
data here uses them.

Formatting never changes identity (CoP 11-14: "formatting never lets an objector through"):
``"943 476 5919"``, ``"943-476-5919"`` and ``"9434765919"`` canonicalise to the same value.
There is one canonical form, produced in one place: ``canonical_nhs_sql``.
"""

from __future__ import annotations

import re

#: Characters stripped when canonicalising (spaces, hyphens and other separators).
_SEPARATORS = r"[\s\-\./]"


def canonical_nhs_sql(expr: str) -> str:
    """SQL for the canonical form of an NHS number: separators removed, NULL if empty."""
    return f"nullif(regexp_replace(trim(CAST({expr} AS VARCHAR)), '{_SEPARATORS}', '', 'g'), '')"


def nhs_valid_sql(expr: str) -> str:
    """SQL boolean: ``expr`` (already canonical) is ten digits with a valid mod-11 check digit.

    Vectorised inside DuckDB: no Python per row.
    """
    weighted = " + ".join(f"{10 - i} * CAST(substr({expr}, {i + 1}, 1) AS INTEGER)" for i in range(9))
    check = f"(11 - (({weighted}) % 11))"
    return (
        f"(coalesce(regexp_full_match({expr}, '[0-9]{{10}}'), false) AND "
        f"CASE WHEN regexp_full_match({expr}, '[0-9]{{10}}') THEN "
        f"(CASE {check} WHEN 11 THEN 0 ELSE {check} END) = CAST(substr({expr}, 10, 1) AS INTEGER) "
        f"AND {check} <> 10 ELSE false END)"
    )


def check_digit(first_nine: str) -> int | None:
    """The mod-11 check digit for nine digits, or None where the result is 10 (invalid)."""
    if not re.fullmatch(r"[0-9]{9}", first_nine):
        raise ValueError("expected nine digits")
    total = sum((10 - i) * int(d) for i, d in enumerate(first_nine))
    check = 11 - total % 11
    if check == 11:
        return 0
    if check == 10:
        return None
    return check


def canonical_nhs(value: str) -> str:
    """Python twin of ``canonical_nhs_sql`` for single values typed by a person (CLI)."""
    return re.sub(_SEPARATORS, "", value.strip())


def is_valid_nhs(value: str) -> bool:
    """True when ``value`` (any formatting) is a valid NHS number by the mod-11 rule."""
    canon = canonical_nhs(value)
    if not re.fullmatch(r"[0-9]{10}", canon):
        return False
    return check_digit(canon[:9]) == int(canon[9])


def is_test_number(value: str) -> bool:
    """True for the never-issued 999 test range."""
    return canonical_nhs(value).startswith("999")
