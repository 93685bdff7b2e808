"""The disclosure audit across outputs and joint protection (issue: no suppressed cell recoverable).

Rules under test: ``safehaven.publish.disclosure.audit`` (the protection interval: every
suppressed cell's feasible interval, from the whole publication, reaches above the threshold
and contains 0 unless it lies wholly above it), ``.relations`` (subset within a window, same
population, revision) and ``.joint`` (suppression chosen knowing the other tables). Real
DuckDB, real HiGHS; the property test checks the audit against an independent dense LP.
"""

from __future__ import annotations

import itertools
import random

import duckdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from safehaven.publish.disclosure import Policy, check_invariants, protect, true_range
from safehaven.publish.disclosure.audit import AuditTable, audit
from safehaven.publish.disclosure.joint import protect_jointly
from safehaven.publish.disclosure.relations import Link, Relation

POLICY = Policy()
SUBSET = Link("subset", "child", "parent", (("la", "la"),), ("month", "month"), (0, 1))


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    c = duckdb.connect()
    yield c
    c.close()


def load(con: duckdb.DuckDBPyConnection, name: str, cols: str, rows: list[tuple]) -> None:
    con.execute(f"CREATE OR REPLACE TABLE {name} ({cols})")
    con.executemany(f"INSERT INTO {name} VALUES ({', '.join('?' for _ in cols.split(','))})", rows)


def month(i: int) -> str:
    return f"2025-{i + 1:02d}-01"


# --- the relation of the issue: discharge[M, provider, LA] <= users[M, LA] + users[M+1, LA] ---------


def discharge_and_users(con: duckdb.DuckDBPyConnection) -> None:
    """LA 'A' has nobody in service in months 0-2: every discharge cell of A is a true, known 0.

    Provider P has 3 people (a primary) in month 0, LA 'B'; the other cells of that row and
    column are zeros. Cell order puts LA 'A' first, so a table-by-table secondary suppression
    picks the known zero.
    """
    users = [(month(m), la, n) for m in range(3) for la, n in (("A", 0), ("B", 40), ("C", 25))]
    load(con, "users_true", "month DATE, la VARCHAR, people BIGINT", users)
    child = {(0, "P", "B"): 3, (0, "Q", "B"): 20, (0, "Q", "C"): 12, (1, "Q", "B"): 15, (1, "Q", "C"): 9}
    rows = [
        (month(m), p, la, child.get((m, p, la), 0)) for m, p, la in itertools.product(range(2), "PQ", ("A", "B", "C"))
    ]
    load(con, "child_true", "month DATE, provider VARCHAR, la VARCHAR, people BIGINT", rows)
    protect(con, "users_true", "parent", ["month", "la"], policy=POLICY)


def tables(child: str = "child") -> list[AuditTable]:
    return [
        AuditTable("parent", "parent", ("month", "la")),
        AuditTable("child", child, ("month", "provider", "la")),
    ]


def test_the_issue_relation_fails_the_current_suppression(con: duckdb.DuckDBPyConnection) -> None:
    discharge_and_users(con)
    protect(con, "child_true", "child", ["month", "provider", "la"], policy=POLICY)
    assert check_invariants(con, "child", ["month", "provider", "la"]) == []  # each table obeys the rules alone
    known_zero = con.execute(
        "SELECT count(*) FROM child WHERE la = 'A' AND people IS NULL AND suppressed = 'secondary'"
    ).fetchone()[0]
    assert known_zero >= 1  # a secondary suppression the users table proves to be 0
    report = audit(con, tables(), [SUBSET])
    assert not report.passed
    assert report.failing["child"]
    assert report.cells_audited == con.execute("SELECT count(*) FROM child WHERE people IS NULL").fetchone()[0]
    assert report.lp_solves >= 2
    # without the relation the same tables pass: the relation is what the attack uses
    assert audit(con, tables(), []).passed


def test_the_issue_relation_passes_the_joint_protection(con: duckdb.DuckDBPyConnection) -> None:
    discharge_and_users(con)
    others = [AuditTable("parent", "parent", ("month", "la"))]
    dims = ["month", "provider", "la"]
    _, report = protect_jointly(con, "child", "child_true", "child", dims, others, [SUBSET], policy=POLICY)
    assert report.passed, report.problems
    assert check_invariants(con, "child", dims) == []
    assert audit(con, tables(), [SUBSET]).passed
    # no secondary suppression is a cell the users table pins to 0
    assert con.execute("SELECT count(*) FROM child WHERE la = 'A' AND people IS NULL").fetchone()[0] == 0
    meta = report.as_metadata()
    assert meta["audit_cells"] > 0 and meta["audit_failing"] == 0 and meta["audit_seconds"] >= 0
    assert set(meta) >= {"audit_lp_solves", "audit_narrowest_upper", "audit_iterations", "audit_upper_unbounded"}


# --- a linked subset without a time window --------------------------------------------------------


def test_linked_subset_tempts_and_joint_protection_resists(con: duckdb.DuckDBPyConnection) -> None:
    """Child (region, service) is a linked subset of parent (region): child <= parent per region.

    Region R2 has nobody in the parent; a primary in column S1 tempts a table-by-table secondary
    into R2 (first in cell order among zeros).
    """
    load(con, "parent_true", "region VARCHAR, people BIGINT", [("R1", 30), ("R2", 0), ("R3", 50)])
    rows = [("R1", "S1", 3), ("R1", "S2", 20), ("R2", "S1", 0), ("R2", "S2", 0), ("R3", "S1", 0), ("R3", "S2", 40)]
    load(con, "child_true", "region VARCHAR, service VARCHAR, people BIGINT", rows)
    protect(con, "parent_true", "parent", ["region"], margins=[], policy=POLICY)
    link = Link("subset", "child", "parent", (("region", "region"),))
    parent = AuditTable("parent", "parent", ("region",))
    child = AuditTable("child", "child", ("region", "service"))

    protect(con, "child_true", "child", ["region", "service"], policy=POLICY)
    assert not audit(con, [parent, child], [link]).passed

    _, report = protect_jointly(
        con, "child", "child_true", "child", ["region", "service"], [parent], [link], policy=POLICY
    )
    assert report.passed, report.problems
    assert check_invariants(con, "child", ["region", "service"]) == []
    assert con.execute("SELECT count(*) FROM child WHERE region = 'R2' AND people IS NULL").fetchone()[0] == 0


# --- the same population by a second breakdown ------------------------------------------------------


def test_second_breakdown_tempts_and_joint_protection_resists(con: duckdb.DuckDBPyConnection) -> None:
    """A (region, sex) and B (region, age) count the same people: per region their sums are equal.

    B publishes region R2 as all zeros, so every cell of A in R2 is a known 0; a primary in
    A's column F tempts a table-by-table secondary into R2.
    """
    a = [("R1", "M", 20), ("R1", "F", 3), ("R2", "M", 0), ("R2", "F", 0), ("R3", "M", 30), ("R3", "F", 0)]
    b = [("R1", "young", 10), ("R1", "old", 13), ("R2", "young", 0), ("R2", "old", 0)]
    b += [("R3", "young", 12), ("R3", "old", 18)]
    load(con, "a_true", "region VARCHAR, sex VARCHAR, people BIGINT", a)
    load(con, "b_true", "region VARCHAR, age VARCHAR, people BIGINT", b)
    protect(con, "b_true", "b", ["region", "age"], policy=POLICY)
    link = Link("same_population", "a", "b", (("region", "region"),))
    tb = AuditTable("b", "b", ("region", "age"))
    ta = AuditTable("a", "a", ("region", "sex"))

    protect(con, "a_true", "a", ["region", "sex"], policy=POLICY)
    report = audit(con, [ta, tb], [link])
    assert not report.passed and report.failing["a"]

    _, report = protect_jointly(con, "a", "a_true", "a", ["region", "sex"], [tb], [link], policy=POLICY)
    assert report.passed, report.problems
    assert check_invariants(con, "a", ["region", "sex"]) == []
    assert con.execute("SELECT count(*) FROM a WHERE region = 'R2' AND people IS NULL").fetchone()[0] == 0


def test_an_equality_that_pins_a_small_count_is_found(con: duckdb.DuckDBPyConnection) -> None:
    """Two suppressed cells whose sum another breakdown publishes as 0..2 are both pinned small."""
    load(con, "a", "region VARCHAR, sex VARCHAR, people BIGINT", [("R1", "M", None), ("R1", "F", None)])
    load(con, "b", "region VARCHAR, age VARCHAR, people BIGINT", [("R1", "young", 10), ("R1", "old", 0)])
    link = Link("same_population", "a", "b", (("region", "region"),))
    report = audit(con, [AuditTable("a", "a", ("region", "sex")), AuditTable("b", "b", ("region", "age"))], [link])
    assert report.passed  # 8..12 people: each cell can be 0 or 8
    con.execute("UPDATE b SET people = 0")
    report = audit(con, [AuditTable("a", "a", ("region", "sex")), AuditTable("b", "b", ("region", "age"))], [link])
    assert report.failing == {"a": {0, 1}}


# --- a revision of an earlier publication -------------------------------------------------------------


def test_revision_tempts_and_joint_protection_resists(con: duckdb.DuckDBPyConnection) -> None:
    """The previous publication suppressed B (a true 0, the secondary of A's 3); late records
    arrive for C, so a table-by-table protection now picks C and publishes B as 0: with counts
    that only grow, the old B is then proven 0 (and the old A alone in its row)."""
    old = [("X", "A", 3), ("X", "B", 0), ("X", "C", 0)]
    new = [("X", "A", 3), ("X", "B", 0), ("X", "C", 9)]  # late records: 9 people in C
    load(con, "old_true", "la VARCHAR, service VARCHAR, people BIGINT", old)
    load(con, "new_true", "la VARCHAR, service VARCHAR, people BIGINT", new)
    protect(con, "old_true", "previous", ["la", "service"], policy=POLICY)
    assert con.execute("SELECT service FROM previous WHERE people IS NULL ORDER BY 1").fetchall() == [("A",), ("B",)]
    dims = ("la", "service")
    link = Link("revision", "t", "t@previous", (("la", "la"), ("service", "service")), added_only=True)
    prev = AuditTable("t@previous", "previous", dims, audited=False)

    protect(con, "new_true", "t", list(dims), policy=POLICY)
    assert con.execute("SELECT people FROM t WHERE service = 'B'").fetchone()[0] == 0
    report = audit(con, [AuditTable("t", "t", dims), prev], [link])
    assert not report.passed and report.changes_audited >= 2

    _, report = protect_jointly(con, "t", "new_true", "t", list(dims), [prev], [link], policy=POLICY)
    assert report.passed, report.problems
    assert con.execute("SELECT people IS NULL FROM t WHERE service = 'B'").fetchone()[0]
    # without "added_only" the revision says nothing about the old cells: both versions pass
    free = Link("revision", "t", "t@previous", link.on, added_only=False)
    protect(con, "new_true", "t", list(dims), policy=POLICY)
    assert audit(con, [AuditTable("t", "t", dims), prev], [free]).passed


def test_contradicted_relation_fails_closed(con: duckdb.DuckDBPyConnection) -> None:
    """A declared relation the published values contradict: the audit fails, not passes."""
    load(con, "parent", "region VARCHAR, people BIGINT", [("R1", 0)])
    load(con, "child", "region VARCHAR, service VARCHAR, people BIGINT", [("R1", "S", 50), ("R1", "T", None)])
    link = Link("subset", "child", "parent", (("region", "region"),))
    report = audit(
        con, [AuditTable("parent", "parent", ("region",)), AuditTable("child", "child", ("region", "service"))], [link]
    )
    assert not report.passed
    assert any("contradicted" in p for p in report.problems)


def test_relation_declarations_are_checked() -> None:
    Relation(kind="subset", of="x", match={"la": "la"}, time="month", window=(0, 1), why="a reason long enough")
    for bad in (
        {"kind": "subset", "why": "no other output named"},
        {"kind": "revision", "of": "x", "why": "a revision names no other"},
        {"kind": "subset", "of": "x", "window": (0, 1), "why": "a window needs a time dimension"},
        {"kind": "subset", "of": "x", "time": "month", "window": (1, 0), "why": "first after last"},
    ):
        with pytest.raises(ValueError):
            Relation.model_validate(bad)


# --- property: random small tables and relations -------------------------------------------------------


def brute_force_intervals(
    parent: dict[tuple[int, int], int | None], child: dict[tuple[int, int, int], int | None], months: int
) -> list[tuple[float, float]]:
    """Every suppressed child cell's [min, max], by a dense LP written out here (independent)."""
    pkeys, ckeys = sorted(parent), sorted(child)
    index = {("p", k): i for i, k in enumerate(pkeys)} | {("c", k): len(pkeys) + i for i, k in enumerate(ckeys)}
    bounds = []
    for table in (parent, child):
        for k in sorted(table):
            v = table[k]
            bounds.append((0, None) if v is None else true_range(v, POLICY))
    rows = []
    for m, prov, la in ckeys:
        if m + 1 >= months:
            continue
        row = np.zeros(len(index))
        row[index[("c", (m, prov, la))]] = 1
        row[index[("p", (m, la))]] -= 1
        row[index[("p", (m + 1, la))]] -= 1
        rows.append(row)
    a_ub = np.array(rows) if rows else None
    b_ub = np.zeros(len(rows)) if rows else None
    out = []
    for k in ckeys:
        if child[k] is not None:
            continue
        c = np.zeros(len(index))
        c[index[("c", k)]] = 1
        lo = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
        hi = linprog(-c, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
        out.append((lo.fun, np.inf if hi.status == 3 else -hi.fun))
    return out


def read(con: duckdb.DuckDBPyConnection, table: str, dims: list[str]) -> dict:
    cols = ", ".join(dims)
    return {tuple(r[:-1]): r[-1] for r in con.execute(f"SELECT {cols}, people FROM {table}").fetchall()}


@st.composite
def related_tables(draw: st.DrawFn) -> tuple[int, int, int, list[int], list[float]]:
    months = draw(st.integers(2, 3))
    las = draw(st.integers(1, 3))
    provs = draw(st.integers(1, 3))
    parent = draw(st.lists(st.sampled_from([0, 0, 2, 5, 9, 14, 30]), min_size=months * las, max_size=months * las))
    shares = draw(
        st.lists(
            st.sampled_from([0.0, 0.0, 0.1, 0.3, 0.6]), min_size=months * las * provs, max_size=months * las * provs
        )
    )
    return months, las, provs, parent, shares


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(related_tables())
def test_random_related_tables_are_protected_jointly(
    con: duckdb.DuckDBPyConnection, case: tuple[int, int, int, list[int], list[float]]
) -> None:
    """After joint protection no suppressed cell's interval is narrower than the protection
    interval, as an independent dense LP confirms; where it cannot be reached the audit fails
    (the publication is refused), and the independent LP agrees that a cell is exposed."""
    months, las, provs, parent_counts, shares = case
    parent = {(m, la): parent_counts[m * las + la] for m in range(months) for la in range(las)}
    child = {}
    for i, (m, prov, la) in enumerate(itertools.product(range(months), range(provs), range(las))):
        window = parent[(m, la)] + (parent[(m + 1, la)] if m + 1 < months else 0)
        child[(m, prov, la)] = int(window * shares[i])
    load(con, "parent_true", "month INTEGER, la INTEGER, people BIGINT", [(*k, v) for k, v in parent.items()])
    load(
        con,
        "child_true",
        "month INTEGER, provider INTEGER, la INTEGER, people BIGINT",
        [(*k, v) for k, v in child.items()],
    )
    con.execute("CREATE OR REPLACE MACRO date_diff(unit, a, b) AS b - a")  # integer months for the test
    protect(con, "parent_true", "parent", ["month", "la"], policy=POLICY)
    link = Link("subset", "child", "parent", (("la", "la"),), ("month", "month"), (0, 1))
    dims = ["month", "provider", "la"]
    others = [AuditTable("parent", "parent", ("month", "la"))]
    _, report = protect_jointly(con, "child", "child_true", "child", dims, others, [link], policy=POLICY)
    assert check_invariants(con, "child", dims) == []
    intervals = brute_force_intervals(read(con, "parent", ["month", "la"]), read(con, "child", dims), months)

    def protected(lo: float, hi: float) -> bool:
        return np.floor(hi + 1e-6) >= 8 and (np.ceil(lo - 1e-6) <= 0 or np.ceil(lo - 1e-6) >= 8)

    assert report.passed == all(protected(lo, hi) for lo, hi in intervals)
    if report.passed:
        assert all(protected(lo, hi) for lo, hi in intervals)


@pytest.mark.parametrize(
    "policy", [Policy(), Policy(rounding="midpoint6"), Policy(threshold=0), Policy(threshold=10)], ids=str
)
def test_published_values_are_intervals_as_true_range_says(policy: Policy) -> None:
    """The audit models a published v as the interval true_range(v), never an equality;
    a suppressed cell as [0, inf)."""
    from safehaven.publish.disclosure.audit import _bounds

    values = np.array([*range(0, 60), np.nan])
    lo, hi = _bounds(values, policy)
    for v, a, b in zip(values[:-1], lo[:-1], hi[:-1], strict=True):
        assert (a, b) == true_range(int(v), policy)
    assert (lo[-1], hi[-1]) == (0, np.inf)


# --- property: a change proven protected downwards by batch programs, as by its own programs ----------


def _revision_case(rng: random.Random) -> tuple[list, list, list, bool]:
    """Per LA a parent count, and a child table under it (``child[la, s] <= parent[la]``)
    published before and again: with late records only (``added_only``), or revised freely."""
    las, services = rng.randint(1, 3), rng.randint(2, 4)
    parent = [rng.choice([0, 2, 5, 9, 14, 30]) for _ in range(las)]
    cells = [(la, s) for la in range(las) for s in range(services)]
    shares = (0.0, 0.0, 0.1, 0.3, 0.6, 1.0)
    old = [int(parent[la] * rng.choice(shares)) for la, _ in cells]
    added_only = rng.random() < 0.5
    new = [
        min(parent[la], o + rng.choice((0, 0, 3, 9))) if added_only else int(parent[la] * rng.choice(shares))
        for (la, _), o in zip(cells, old, strict=True)
    ]

    def rows(counts: list[int]) -> list[tuple]:
        return [(f"L{la}", f"S{s}", n) for (la, s), n in zip(cells, counts, strict=True)]

    return [(f"L{la}", n) for la, n in enumerate(parent)], rows(old), rows(new), added_only


def _revision_audit(con: duckdb.DuckDBPyConnection, case: tuple[list, list, list, bool]) -> tuple[list, list]:
    """Load and protect a case (table by table); the tables and links of its audit."""
    parent, old, new, added_only = case
    load(con, "parent_true", "la VARCHAR, people BIGINT", parent)
    load(con, "old_true", "la VARCHAR, service VARCHAR, people BIGINT", old)
    load(con, "new_true", "la VARCHAR, service VARCHAR, people BIGINT", new)
    dims = ("la", "service")
    protect(con, "parent_true", "parent", ["la"], policy=POLICY)
    protect(con, "old_true", "previous", list(dims), policy=POLICY)
    protect(con, "new_true", "t", list(dims), policy=POLICY)
    links = [
        Link("revision", "t", "t@previous", (("la", "la"), ("service", "service")), added_only=added_only),
        Link("subset", "t", "parent", (("la", "la"),)),
        Link("subset", "t@previous", "parent", (("la", "la"),)),
    ]
    tables = [
        AuditTable("t", "t", dims),
        AuditTable("t@previous", "previous", dims, audited=False),
        AuditTable("parent", "parent", ("la",)),
    ]
    return tables, links


def test_changes_proven_by_batch_programs_get_the_verdicts_of_their_own_programs(
    con: duckdb.DuckDBPyConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The changes between two publications not proven to rise above the threshold are tried
    downwards by two batch programs before each gets programs of its own
    (``audit._falls_far``): on 40 random revisions under a parent table, every item's verdict,
    and the audit's, is the one its own programs give, and the batches do prove changes (so
    fewer programs are solved in all)."""
    from safehaven.publish.disclosure import audit as audit_module

    real, proven = audit_module._falls_far, []

    def counted(solver, blk, linked, *rest):
        mask = real(solver, blk, linked, *rest)
        proven.append(int(mask.sum()))
        return mask

    solves = {"batched": 0, "alone": 0}
    rng = random.Random(20261206)
    for _ in range(40):
        tables, links = _revision_audit(con, _revision_case(rng))
        monkeypatch.setattr(audit_module, "_falls_far", counted)
        batched = audit(con, tables, links)
        monkeypatch.setattr(audit_module, "_falls_far", lambda solver, blk, linked, *_: np.zeros(len(linked), bool))
        alone = audit(con, tables, links)
        assert (batched.passed, batched.failing, batched.problems) == (alone.passed, alone.failing, alone.problems)
        # a change proven downwards has no upper bound found: left out of the narrowest, never a 0 in its place
        if batched.narrowest_upper is not None:
            assert alone.narrowest_upper is not None and batched.narrowest_upper >= alone.narrowest_upper
        solves["batched"] += batched.lp_solves
        solves["alone"] += alone.lp_solves
    assert sum(proven) > 5
    assert solves["batched"] < solves["alone"]


def test_a_change_proven_downwards_does_not_stand_for_the_narrowest_upper_bound(
    con: duckdb.DuckDBPyConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change proven able to fall far (``audit._falls_far``) has no upper bound found: the
    report's narrowest upper bound, published in the quality statement, is the one the programs
    alone find (4: S0 + S1 = the LA's 10, S1 published 10), not the 0 its proof stands on."""
    from safehaven.publish.disclosure import audit as audit_module

    load(con, "parent", "la VARCHAR, people BIGINT", [("L0", 10)])
    load(con, "parentprev", "la VARCHAR, people BIGINT", [("L0", 10)])
    load(con, "t", "la VARCHAR, service VARCHAR, people BIGINT", [("L0", "S0", None), ("L0", "S1", 10)])
    load(con, "prev", "la VARCHAR, service VARCHAR, people BIGINT", [("L0", "S0", None), ("L0", "S1", None)])
    dims = ("la", "service")
    tables = [
        AuditTable("t", "t", dims),
        AuditTable("t@previous", "prev", dims, audited=False),
        AuditTable("parent", "parent", ("la",)),
        AuditTable("parent@previous", "parentprev", ("la",), audited=False),
    ]
    links = [
        Link("revision", "t", "t@previous", (("la", "la"), ("service", "service"))),
        Link("same_population", "t", "parent", (("la", "la"),)),
        Link("same_population", "t@previous", "parent@previous", (("la", "la"),)),
    ]
    batched = audit(con, tables, links)
    monkeypatch.setattr(audit_module, "_falls_far", lambda solver, blk, linked, *_: np.zeros(len(linked), bool))
    alone = audit(con, tables, links)
    assert batched.failing == alone.failing == {"t": {0}}
    assert batched.narrowest_upper == alone.narrowest_upper == 4
