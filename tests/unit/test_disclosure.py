"""Statistical disclosure control: tables crafted to tempt it, and random tables.

Rules under test: ``safehaven.publish.disclosure`` module docstring (CoP 34b, 35; ISB 1523; HES
analysis guide; OpenSAFELY "Safe outputs" and midpoint 6 rounding).
"""

from __future__ import annotations

import itertools
import math

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehaven.publish.disclosure import (
    FORMULA_LEADERS,
    DisclosureError,
    Policy,
    check_invariants,
    neutralise_formula_cells,
    neutralise_sql,
    protect,
    public_select_sql,
    true_range,
)

DIMS2 = ["practice", "age_band"]


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    c = duckdb.connect()
    yield c
    c.close()


def load(con: duckdb.DuckDBPyConnection, name: str, cols: str, rows: list[tuple]) -> None:
    con.execute(f"CREATE OR REPLACE TABLE {name} ({cols})")
    marks = ", ".join("?" for _ in cols.split(","))
    con.executemany(f"INSERT INTO {name} VALUES ({marks})", rows)


def cells(con: duckdb.DuckDBPyConnection, table: str, *cols: str) -> dict:
    """{dimension values: (count, reason)} of the cell rows of a protected table."""
    key = ", ".join(cols)
    has_totals = "total_over" in [d[0] for d in con.execute(f"SELECT * FROM {table}").description]
    where = " WHERE total_over IS NULL" if has_totals else ""
    return {
        tuple(r[:-2]): (r[-2], r[-1])
        for r in con.execute(f"SELECT {key}, people, suppressed FROM {table}{where}").fetchall()
    }


def roundmid_any(x: int, to: int = 6) -> int:
    """OpenSAFELY's documented R function, transcribed: ceiling(x/to)*to - floor(to/2)*(x!=0)."""
    return math.ceil(x / to) * to - (to // 2) * (x != 0)


# --- rounding grids --------------------------------------------------------------------


def test_nearest5_and_midpoint6_grids(con: duckdb.DuckDBPyConnection) -> None:
    load(con, "src", "n INTEGER, people INTEGER", [(i, i) for i in range(0, 61)])
    protect(con, "src", "r5", ["n"], margins=[], policy=Policy(threshold=0))
    protect(con, "src", "r6", ["n"], margins=[], policy=Policy(threshold=0, rounding="midpoint6"))
    r5 = dict(con.execute("SELECT n, people FROM r5").fetchall())
    r6 = dict(con.execute("SELECT n, people FROM r6").fetchall())
    for n in range(61):
        assert r5[n] == 5 * round(n / 5)  # no ties: n/5 is never x.5 for whole n
        assert r6[n] == roundmid_any(n)
    # The mapping table OpenSAFELY documents: 0 -> 0, 1-6 -> 3, 7-12 -> 9, 13-18 -> 15.
    assert {r6[n] for n in range(1, 7)} == {3}
    assert {r6[n] for n in range(7, 13)} == {9}
    assert {r6[n] for n in range(13, 19)} == {15}
    assert r6[0] == 0
    # Not 6*floor(n/6)+3, which differs at the multiples of 6.
    assert r6[6] == 3 and r6[12] == 9


def test_midpoint6_keeps_suppression_of_small_counts(con: duckdb.DuckDBPyConnection) -> None:
    load(con, "src", "n INTEGER, people INTEGER", [(i, i) for i in range(0, 40)])
    policy = Policy(rounding="midpoint6")
    protect(con, "src", "out", ["n"], margins=[], policy=policy)
    got = dict(con.execute("SELECT n, people FROM out").fetchall())
    assert got[0] == 0
    assert all(got[n] is None for n in range(1, 8))
    assert got[8] == 9 and got[12] == 9 and got[13] == 15
    assert check_invariants(con, "out", ["n"], policy=policy, margins=[]) == []
    for n in range(8, 40):
        lo, hi = true_range(got[n], policy)
        assert lo <= n <= hi


# --- primary and secondary suppression -------------------------------------------------


def test_single_small_cell_in_a_row_gets_a_secondary(con: duckdb.DuckDBPyConnection) -> None:
    # One practice, four age bands: 3 is primary; the margin (the practice total) would
    # give it back, so the next smallest non-zero cell (12) is suppressed too.
    load(
        con,
        "src",
        "practice VARCHAR, age_band VARCHAR, people INTEGER",
        [("P1", "0-17", 3), ("P1", "18-44", 40), ("P1", "45-64", 12), ("P1", "65+", 0)],
    )
    report = protect(con, "src", "out", ["practice", "age_band"], margins=[["practice"]])
    got = cells(con, "out", "practice", "age_band")
    assert got[("P1", "0-17")] == (None, "primary")
    assert got[("P1", "45-64")] == (None, "secondary")
    assert got[("P1", "18-44")] == (40, None)
    assert got[("P1", "65+")] == (0, None)
    assert (report.primary, report.secondary) == (1, 1)
    assert check_invariants(con, "out", DIMS2, margins=[["practice"]]) == []


def test_two_small_cells_protect_each_other(con: duckdb.DuckDBPyConnection) -> None:
    load(
        con,
        "src",
        "practice VARCHAR, age_band VARCHAR, people INTEGER",
        [("P1", "0-17", 3), ("P1", "18-44", 40), ("P1", "45-64", 5), ("P1", "65+", 22)],
    )
    report = protect(con, "src", "out", DIMS2, margins=[["practice"]])
    assert (report.primary, report.secondary) == (2, 0)
    got = cells(con, "out", *DIMS2)
    assert got[("P1", "18-44")] == (40, None) and got[("P1", "65+")] == (20, None)


def test_only_zeros_left_then_a_zero_is_suppressed(con: duckdb.DuckDBPyConnection) -> None:
    load(
        con,
        "src",
        "practice VARCHAR, age_band VARCHAR, people INTEGER",
        [("P1", "0-17", 0), ("P1", "18-44", 4), ("P1", "45-64", 0)],
    )
    protect(con, "src", "out", DIMS2, margins=[["practice"]])
    got = cells(con, "out", *DIMS2)
    assert got[("P1", "18-44")] == (None, "primary")
    assert got[("P1", "0-17")] == (None, "secondary")  # ties broken by cell order
    assert got[("P1", "45-64")] == (0, None)


def test_small_margin_is_fully_suppressed_and_total_is_null(con: duckdb.DuckDBPyConnection) -> None:
    # Practice P2 has 6 people in all: both its cells are small and its derived total is
    # NULL. Down each age-band column a P2 cell would be alone, so the smallest other
    # cell of each column (both P1's) goes too: P1's total is NULL as well; P3's is not.
    load(
        con,
        "src",
        "practice VARCHAR, age_band VARCHAR, people INTEGER",
        [
            ("P1", "0-17", 30),
            ("P1", "18-44", 41),
            ("P2", "0-17", 2),
            ("P2", "18-44", 4),
            ("P3", "0-17", 50),
            ("P3", "18-44", 61),
        ],
    )
    protect(con, "src", "out", DIMS2, totals=True)
    rows = con.execute(
        "SELECT practice, people, suppressed FROM out WHERE total_over = 'age_band' ORDER BY 1"
    ).fetchall()
    assert rows == [("P1", None, "secondary"), ("P2", None, "secondary"), ("P3", 110, None)]
    got = cells(con, "out", *DIMS2)
    assert got[("P1", "0-17")][1] == "secondary" and got[("P1", "18-44")][1] == "secondary"
    grand = con.execute("SELECT people FROM out WHERE total_over = 'practice,age_band'").fetchone()
    assert grand == (110,)
    assert check_invariants(con, "out", DIMS2) == []


def test_secondary_reaches_a_fixed_point_over_rows_and_columns(
    con: duckdb.DuckDBPyConnection,
) -> None:
    # 3 x 3 with one small cell: the row secondary leaves its column with a single
    # suppressed cell, which leaves another row with one, and so on until a rectangle.
    rows = [
        ("P1", "a", 3), ("P1", "b", 20), ("P1", "c", 50),
        ("P2", "a", 30), ("P2", "b", 40), ("P2", "c", 60),
        ("P3", "a", 35), ("P3", "b", 45), ("P3", "c", 9),
    ]  # fmt: skip
    load(con, "src", "practice VARCHAR, age_band VARCHAR, people INTEGER", rows)
    report = protect(con, "src", "out", DIMS2)
    got = cells(con, "out", *DIMS2)
    suppressed = {k for k, (_, reason) in got.items() if reason}
    assert report.primary == 1 and report.secondary == 3
    assert suppressed == {("P1", "a"), ("P1", "b"), ("P2", "a"), ("P2", "b")}
    assert report.iterations >= 2
    assert check_invariants(con, "out", DIMS2) == []


# --- totals ----------------------------------------------------------------------------


def test_totals_are_sums_of_published_cells_not_true_counts(
    con: duckdb.DuckDBPyConnection,
) -> None:
    rows = [("P1", "a", 3), ("P1", "b", 22), ("P1", "c", 51), ("P1", "d", 9)]
    load(con, "src", "practice VARCHAR, age_band VARCHAR, people INTEGER", rows)
    report = protect(con, "src", "out", DIMS2, margins=[["practice"]], totals=True)
    total = con.execute("SELECT people FROM out WHERE total_over = 'age_band'").fetchone()
    # 3 primary, 9 secondary: published 20 + 50; the true total 85 would give 3 + 9 back.
    assert total == (70,)
    assert report.main.published_total == 70 and report.total_difference == 70 - 85
    assert check_invariants(con, "out", DIMS2, margins=[["practice"]]) == []
    con.execute("UPDATE out SET people = 85 WHERE total_over = 'age_band'")
    problems = check_invariants(con, "out", DIMS2, margins=[["practice"]])
    assert any("differ from the sum of published cells" in p for p in problems)


# --- differencing ----------------------------------------------------------------------


def test_differencing_two_outputs_never_pins_a_small_count(con: duckdb.DuckDBPyConnection) -> None:
    """Table A: people by age band over all practices. Table B: the same excluding practice
    P. True A - B is P's count. Enumerate P's count p in 0..7 against many sizes of the
    rest, protect both tables, and group the scenarios by what is published: every
    published (A, B) pair that a small p produces is also produced by other values of p.
    """
    scenarios = [(rest, p) for rest in range(0, 120) for p in range(0, 8)]
    load(
        con,
        "a_src",
        "scenario INTEGER, people INTEGER",
        [(i, r + p) for i, (r, p) in enumerate(scenarios)],
    )
    load(
        con,
        "b_src",
        "scenario INTEGER, people INTEGER",
        [(i, r) for i, (r, _) in enumerate(scenarios)],
    )
    # Each scenario stands alone (no margin groups across scenarios).
    protect(con, "a_src", "a", ["scenario"], margins=[])
    protect(con, "b_src", "b", ["scenario"], margins=[])
    seen: dict[tuple, set[int]] = {}
    for i, a, b in con.execute("SELECT a.scenario, a.people, b.people FROM a JOIN b USING (scenario)").fetchall():
        seen.setdefault((a, b), set()).add(scenarios[i][1])
    for (a, b), ps in seen.items():
        if ps & set(range(1, 8)):
            assert len(ps) >= 2, f"published pair {(a, b)} pins p to {ps}"
    # The same, from the rounding windows alone (what an attacker can compute).
    policy = Policy()
    for a_pub, b_pub in itertools.product(range(10, 200, 5), repeat=2):
        (alo, ahi), (blo, bhi) = true_range(a_pub, policy), true_range(b_pub, policy)
        candidates = {x - y for x in range(alo, ahi + 1) for y in range(blo, bhi + 1)}
        small = candidates & set(range(1, 8))
        if small:
            assert len({c for c in candidates if c >= 0}) >= 5


def test_differencing_table_a_and_table_b_of_one_release(con: duckdb.DuckDBPyConnection) -> None:
    # A concrete pair: practice P3 has 3 people aged 85+; B excludes P3.
    src = [
        ("P1", "85+", 41), ("P2", "85+", 38), ("P3", "85+", 3),
        ("P1", "75-84", 90), ("P2", "75-84", 77), ("P3", "75-84", 60),
    ]  # fmt: skip
    load(con, "src", "practice VARCHAR, age_band VARCHAR, people INTEGER", src)
    con.execute("CREATE VIEW a_src AS SELECT age_band, sum(people) AS people FROM src GROUP BY 1")
    con.execute(
        "CREATE VIEW b_src AS SELECT age_band, sum(people) AS people FROM src WHERE practice <> 'P3' GROUP BY 1"
    )
    protect(con, "a_src", "a", ["age_band"])
    protect(con, "b_src", "b", ["age_band"])
    a = dict(con.execute("SELECT age_band, people FROM a").fetchall())
    b = dict(con.execute("SELECT age_band, people FROM b").fetchall())
    assert (a["85+"], b["85+"]) == (80, 80)  # 82 and 79: the difference reads as 0
    lo = max(0, true_range(a["85+"])[0] - true_range(b["85+"])[1])
    hi = true_range(a["85+"])[1] - true_range(b["85+"])[0]
    assert (lo, hi) == (0, 4) and lo < 3 < hi


# --- zero and 100% cells, rates and means ----------------------------------------------


RATE_ROWS = [
    ("P1", "a", 0, 40),  # zero cell: 0%
    ("P1", "b", 30, 30),  # 100% cell: complement 0
    ("P1", "c", 26, 30),  # complement 4: "all but 4" reads off
    ("P1", "d", 3, 100),  # small numerator
    ("P1", "e", 40, 5),  # impossible: filtered out below
    ("P1", "f", 2, 5),  # small denominator
    ("P1", "g", 44, 120),
    ("P1", "h", 51, 90),
]


def rate_source(con: duckdb.DuckDBPyConnection) -> None:
    rows = [r for r in RATE_ROWS if r[2] <= r[3]]
    load(con, "src", "practice VARCHAR, age_band VARCHAR, people INTEGER, pop INTEGER", rows)


def test_zero_and_100_percent_cells_default(con: duckdb.DuckDBPyConnection) -> None:
    rate_source(con)
    protect(con, "src", "out", DIMS2, margins=[], rate_cols={"rate": "pop"})
    got = {
        r[0]: r[1:]
        for r in con.execute("SELECT age_band, people, suppressed, pop, pop_suppressed, rate FROM out").fetchall()
    }
    assert got["a"] == (0, None, 40, None, 0.0)  # a true zero is published as 0
    assert got["b"] == (30, None, 30, None, 1.0)  # a 100% cell is published by default
    assert got["c"][:2] == (None, "primary") and got["c"][4] is None  # complement 4
    assert got["d"][:2] == (None, "primary") and got["d"][4] is None
    assert got["f"] == (None, "primary", None, "primary", None)  # denominator 5
    assert got["g"] == (45, None, 120, None, 45 / 120)  # from published values
    assert check_invariants(con, "out", DIMS2, margins=[], rate_cols={"rate": "pop"}) == []


def test_zero_and_100_percent_cells_suppressed_on_request(con: duckdb.DuckDBPyConnection) -> None:
    rate_source(con)
    policy = Policy(suppress_zeros=True)
    protect(con, "src", "out", DIMS2, margins=[], rate_cols={"rate": "pop"}, policy=policy)
    got = dict(con.execute("SELECT age_band, suppressed FROM out").fetchall())
    assert got["a"] == "primary" and got["b"] == "primary"
    assert got["g"] is None
    assert check_invariants(con, "out", DIMS2, policy=policy, margins=[]) == []


def test_numerator_above_denominator_is_refused(con: duckdb.DuckDBPyConnection) -> None:
    load(con, "src", "practice VARCHAR, age_band VARCHAR, people INTEGER, pop INTEGER", RATE_ROWS)
    with pytest.raises(DisclosureError, match="more people than denominator"):
        protect(con, "src", "out", DIMS2, rate_cols={"rate": "pop"})


def test_means_on_few_people_are_suppressed(con: duckdb.DuckDBPyConnection) -> None:
    load(
        con,
        "src",
        "practice VARCHAR, age_band VARCHAR, people INTEGER, mean_bmi DOUBLE, n_bmi INTEGER",
        [
            ("P1", "a", 20, 27.5, 7),  # mean built on 7 people
            ("P1", "b", 30, 26.0, 25),
            ("P1", "c", 5, 30.1, 5),  # its people are suppressed
        ],
    )
    protect(
        con,
        "src",
        "out",
        DIMS2,
        margins=[],
        mean_cols={"mean_bmi": "n_bmi"},
    )
    got = dict(con.execute("SELECT age_band, mean_bmi FROM out").fetchall())
    assert got == {"a": None, "b": 26.0, "c": None}
    cols = [d[0] for d in con.execute("SELECT * FROM out").description]
    assert "n_bmi" not in cols  # only declared columns leave


def test_mean_follows_its_count_cell(con: duckdb.DuckDBPyConnection) -> None:
    load(
        con,
        "src",
        "practice VARCHAR, age_band VARCHAR, people INTEGER, mean_age DOUBLE",
        [("P1", "a", 3, 40.0), ("P1", "b", 9, 50.0), ("P1", "c", 80, 60.0)],
    )
    protect(con, "src", "out", DIMS2, margins=[["practice"]], mean_cols={"mean_age": "people"})
    got = dict(con.execute("SELECT age_band, mean_age FROM out").fetchall())
    assert got == {"a": None, "b": None, "c": 60.0}  # b is the secondary cell


# --- check_invariants catches broken tables --------------------------------------------


def test_check_invariants_reports_each_kind_of_violation(con: duckdb.DuckDBPyConnection) -> None:
    load(
        con,
        "bad",
        "practice VARCHAR, age_band VARCHAR, people INTEGER, suppressed VARCHAR, pop INTEGER, rate DOUBLE",
        [
            ("P1", "a", 3, None, 100, 0.03),  # small published, rate off published values
            ("P1", "b", 12, None, 100, 0.12),  # off the grid
            ("P1", "c", None, "primary", 100, None),  # alone in its row
            ("P1", "d", 20, None, 100, 0.9),  # rate disagrees
            ("P2", "a", None, None, 100, None),  # NULL without a reason
            ("P2", "b", 10, None, 100, 0.1),
        ],
    )
    problems = check_invariants(con, "bad", DIMS2, rate_cols={"rate": "pop"})
    text = "\n".join(problems)
    assert "published count(s) in 1..7" in text
    assert "off the nearest5 grid" in text
    assert "exactly one suppressed cell" in text
    assert "suppression reason disagrees" in text
    assert "rate(s) not derived" in text
    # Messages carry counts and column names only, never a cell's dimension values.
    assert "P1" not in text and "P2" not in text


def test_check_invariants_midpoint6_grid(con: duckdb.DuckDBPyConnection) -> None:
    load(con, "t", "n INTEGER, people INTEGER", [(1, 9), (2, 10), (3, 0), (4, 15)])
    problems = check_invariants(con, "t", ["n"], policy=Policy(rounding="midpoint6"), margins=[])
    assert problems == ["people: 1 published cell(s) off the midpoint6 grid"]


# --- guards ----------------------------------------------------------------------------


def test_refuses_duplicate_cells_and_bad_counts(con: duckdb.DuckDBPyConnection) -> None:
    load(con, "dup", "n INTEGER, people INTEGER", [(1, 10), (1, 12)])
    with pytest.raises(DisclosureError, match="more than once"):
        protect(con, "dup", "out", ["n"])
    load(con, "neg", "n INTEGER, people INTEGER", [(1, -1)])
    with pytest.raises(DisclosureError, match="non-negative whole counts"):
        protect(con, "neg", "out", ["n"])
    load(con, "frac", "n INTEGER, people DOUBLE", [(1, 2.5)])
    with pytest.raises(DisclosureError, match="non-negative whole counts"):
        protect(con, "frac", "out", ["n"])
    with pytest.raises(DisclosureError, match="lacks columns"):
        protect(con, "dup", "out", ["n"], count_col="patients")
    with pytest.raises(DisclosureError, match="unknown dimensions"):
        protect(con, "dup", "out", ["n"], margins=[["m"]])


def test_schema_qualified_target_and_no_leftover_work_tables(
    con: duckdb.DuckDBPyConnection,
) -> None:
    con.execute("CREATE SCHEMA published")
    load(con, "src", "n INTEGER, people INTEGER", [(1, 10), (2, 30)])
    protect(con, "src", "published.counts", ["n"])
    assert con.execute("SELECT count(*) FROM published.counts").fetchone() == (2,)
    left = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE '__sdc_%'").fetchone()
    assert left == (0,)


# --- CSV injection ---------------------------------------------------------------------


def test_neutralise_formula_cells(con: duckdb.DuckDBPyConnection) -> None:
    values = ["=1+1", "+44", "-3", "@SUM(A1)", "\tx", "\rx", "Leeds", "", None, "a=b"]
    load(con, "t", "label VARCHAR, people INTEGER", [(v, 10) for v in values])
    got = [r[0] for r in con.execute(f"SELECT {neutralise_sql('label')} FROM t").fetchall()]
    assert got == ["'=1+1", "'+44", "'-3", "'@SUM(A1)", "'\tx", "'\rx", "Leeds", "", None, "a=b"]
    assert neutralise_formula_cells(con, "t") == 6
    assert neutralise_formula_cells(con, "t") == 0  # idempotent: "'" is not a leader
    assert con.execute("SELECT people FROM t LIMIT 1").fetchone() == (10,)


#: any character (NUL included: DuckDB holds it) but lone surrogates, which are not text, with the
#: leaders, a quote, a space and a newline drawn often
CHARACTER = st.one_of(st.sampled_from([*FORMULA_LEADERS, "'", " ", "\n"]), st.characters(codec="utf-8"))
#: any text, its first character drawn on its own: a leader starts about one text in three (drawn
#: as one string, Hypothesis started 2 of 146 with one, too few for the rule to be tested)
TEXT = st.builds(str.__add__, st.one_of(st.just(""), CHARACTER), st.text(alphabet=CHARACTER, max_size=5))


@given(values=st.lists(st.one_of(st.none(), TEXT), min_size=1, max_size=12))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_cell_is_neutralised_exactly_when_it_starts_with_a_formula_leader(
    con: duckdb.DuckDBPyConnection, values: list[str | None]
) -> None:
    """The SQL rule (one ``regexp_matches``) is the written rule: prefix "'" to text whose first
    character is one of ``FORMULA_LEADERS``, leave all other text and NULL as they are; in a
    query (``neutralise_sql``) and in place (``neutralise_formula_cells``, which counts the cells)."""
    load(con, "t", "i INTEGER, label VARCHAR", list(enumerate(values)))
    expected = [v if v is None or v[:1] not in FORMULA_LEADERS else "'" + v for v in values]
    got = [r[0] for r in con.execute(f"SELECT {neutralise_sql('label')} FROM t ORDER BY i").fetchall()]
    assert got == expected
    assert neutralise_formula_cells(con, "t", ["label"]) == sum(e != v for e, v in zip(expected, values, strict=True))
    assert [r[0] for r in con.execute("SELECT label FROM t ORDER BY i").fetchall()] == expected


# --- property-based --------------------------------------------------------------------

CATEGORIES = ["a", "b", "c", None]


@st.composite
def random_tables(draw: st.DrawFn) -> tuple[list[str], list[tuple], Policy, bool]:
    ndims = draw(st.integers(1, 3))
    dims = [f"d{i}" for i in range(ndims)]
    levels = [draw(st.lists(st.sampled_from(CATEGORIES), min_size=1, max_size=4, unique=True))
              for _ in dims]  # fmt: skip
    count = st.one_of(st.integers(0, 12), st.integers(0, 300))
    rows = []
    for key in itertools.product(*levels):
        if draw(st.integers(0, 9)) == 0:
            continue  # sparse: absent cells
        rows.append((*key, draw(count)))
    policy = Policy(
        rounding=draw(st.sampled_from(["nearest5", "midpoint6"])),
        suppress_zeros=draw(st.booleans()),
    )
    return dims, rows, policy, draw(st.booleans())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_tables())
def test_random_tables_satisfy_the_invariants(
    table: tuple[list[str], list[tuple], Policy, bool],
) -> None:
    dims, rows, policy, totals = table
    con = duckdb.connect()
    try:
        cols = ", ".join([f"{d} VARCHAR" for d in dims] + ["people INTEGER"])
        con.execute(f"CREATE TABLE src ({cols})")
        if rows:
            marks = ", ".join("?" for _ in range(len(dims) + 1))
            con.executemany(f"INSERT INTO src VALUES ({marks})", rows)
        report = protect(con, "src", "out", dims, policy=policy, totals=totals)
        assert check_invariants(con, "out", dims, policy=policy) == []
        assert con.execute("SELECT count(*) FROM out WHERE people BETWEEN 1 AND 7").fetchone() == (0,)

        where = " WHERE o.total_over IS NULL" if totals else ""
        on = " AND ".join(f"s.{d} IS NOT DISTINCT FROM o.{d}" for d in dims)
        joined = con.execute(f"SELECT s.people, o.people, o.suppressed FROM src s JOIN out o ON {on}{where}").fetchall()
        assert len(joined) == len(rows) == report.cells
        for true, published, reason in joined:
            small = 1 <= true <= policy.threshold or (policy.suppress_zeros and true == 0)
            assert (reason == "primary") == small
            assert (published is None) == (reason is not None)
            if published is not None:
                lo, hi = true_range(published, policy)
                assert lo <= true <= hi
        assert report.primary == sum(1 for _, _, r in joined if r == "primary")
        assert report.secondary == sum(1 for _, _, r in joined if r == "secondary")
        published_sum = sum(p for _, p, _ in joined if p is not None)
        assert report.main.published_total == published_sum
        assert report.total_difference == published_sum - sum(t for t, _, _ in joined)
    finally:
        con.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=12),
    st.sampled_from(["nearest5", "midpoint6"]),
    st.booleans(),
)
def test_random_rates_are_built_on_published_values_only(
    pairs: list[tuple[int, int]], rounding: str, suppress_zeros: bool
) -> None:
    policy = Policy(rounding=rounding, suppress_zeros=suppress_zeros)  # type: ignore[arg-type]
    con = duckdb.connect()
    try:
        rows = [("P1" if i % 2 else "P2", f"band{i // 2}", n, n + extra)
                for i, (n, extra) in enumerate(pairs)]  # fmt: skip
        load(con, "src", "practice VARCHAR, age_band VARCHAR, people INTEGER, pop INTEGER", rows)
        protect(con, "src", "out", DIMS2, rate_cols={"rate": "pop"}, policy=policy)
        assert check_invariants(con, "out", DIMS2, policy=policy, rate_cols={"rate": "pop"}) == []
        got = {(r[0], r[1]): r[2:] for r in con.execute("SELECT practice, age_band, rate, pop FROM out").fetchall()}
        for practice, band, n, d in rows:
            rate, pop = got[(practice, band)]
            if any(1 <= x <= 7 or (suppress_zeros and x == 0) for x in (n, d, d - n)):
                assert rate is None
            assert pop is None or not 1 <= pop <= 7
    finally:
        con.close()


# --- the public form (rule 8) ------------------------------------------------------------


def test_public_form_has_one_boolean_marker_and_keeps_the_invariants(con: duckdb.DuckDBPyConnection) -> None:
    load(
        con,
        "src",
        "practice VARCHAR, age_band VARCHAR, people INTEGER",
        [("=P1", "a", 3), ("=P1", "b", 40), ("P2", "a", 50), ("P2", "b", 60), ("P3", "a", 70), ("P3", "b", 81)],
    )
    protect(con, "src", "temp.work", DIMS2)
    temp = "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'work' AND temporary"
    assert con.execute(temp).fetchone() == (1,)
    con.execute(f"CREATE TABLE pub AS {public_select_sql(con, 'work', order_by=DIMS2)}")
    rows = con.execute("SELECT practice, age_band, people, suppressed FROM pub").fetchall()
    assert rows == [
        ("'=P1", "a", None, True),
        ("'=P1", "b", None, True),
        ("P2", "a", None, True),
        ("P2", "b", None, True),
        ("P3", "a", 70, False),
        ("P3", "b", 80, False),
    ]
    assert check_invariants(con, "pub", DIMS2) == []
    con.execute("UPDATE pub SET suppressed = false WHERE practice = 'P2' AND age_band = 'a'")
    assert check_invariants(con, "pub", DIMS2) == ["people: 1 cell(s) whose suppression reason disagrees"]
