"""The baseline's hand-written rules give each row the pipeline's verdict (fast; no harness run).

The smoke test compares whole-drop counts; this compares single rows, so a drift is named by
its case. Covered: every NHS number case and every missing-value case of the rule tests (a
missing value breaks only its field's ``required`` rule, ``safehaven.intake.contracts``). Date
ranges are left out: the baseline judges them against today, the rule tests against a fixed day.
"""

from __future__ import annotations

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import baseline
from safehaven.publish.disclosure import neutralise_sql
from tests.unit.test_disclosure import TEXT
from tests.unit.test_rules import CASES, VALID, failed_rules, with_value

LISTS = baseline.load_code_lists()
COMPARED = [
    (c, v, e)
    for c, v, e in CASES
    if "nhs_number" in v or any(r.endswith(".required") for r in e) or any(x in ("", None) for x in v.values())
]


def baseline_failed(collection: str, row: dict[str, str | None]) -> list[str]:
    con = duckdb.connect()
    con.execute("CREATE SCHEMA landing")
    cols = baseline.COLUMNS[collection]
    con.execute(f"CREATE TABLE landing.{collection} (_row BIGINT, {', '.join(f'{c} VARCHAR' for c in cols)})")
    con.execute(f"INSERT INTO landing.{collection} VALUES (1, {', '.join('?' for _ in cols)})", [row[c] for c in cols])
    (failed,) = con.execute(f"SELECT failed FROM ({baseline.checks_sql(collection, LISTS)})").fetchone()
    return sorted(failed)


@pytest.mark.parametrize(
    ("collection", "values", "expected"),
    COMPARED,
    ids=[f"{c}:{','.join(v)}={'|'.join(e) or 'ok'}" for c, v, e in COMPARED],
)
def test_baseline_breaks_the_same_rules_as_the_pipeline(
    collection: str, values: dict[str, str | None], expected: list[str]
) -> None:
    row = with_value(collection, **values)
    assert baseline_failed(collection, row) == failed_rules(collection, [row])[0] == sorted(expected)


def test_a_missing_nhs_number_breaks_only_its_required_rule_in_the_baseline() -> None:
    """The disagreement of issue 14's follow-up: 45 against 40 gp_events failures at the smoke scale."""
    for collection in sorted(VALID):
        for missing in (None, "", "   ", " - "):
            assert baseline_failed(collection, with_value(collection, nhs_number=missing)) == ["nhs_number.required"]


@given(values=st.lists(st.one_of(st.none(), TEXT), min_size=1, max_size=12))
@settings(max_examples=60, deadline=None)
def test_the_baseline_neutralises_the_cells_the_pipeline_neutralises(values: list[str | None]) -> None:
    """The baseline writes its own formula test (importing the disclosure package would put SciPy in
    its measured time); it gives every text cell the pipeline's ``neutralise_sql`` verdict."""
    con = duckdb.connect()
    con.execute("CREATE TABLE t (i INTEGER, label VARCHAR)")
    con.executemany("INSERT INTO t VALUES (?, ?)", list(enumerate(values)))
    ours, theirs = neutralise_sql("label"), baseline._neutral("label")
    assert (
        con.execute(f"SELECT {theirs} FROM t ORDER BY i").fetchall()
        == con.execute(f"SELECT {ours} FROM t ORDER BY i").fetchall()
    )
