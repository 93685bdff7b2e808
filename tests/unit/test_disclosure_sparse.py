"""The joint protection's fallback on sparse tables (module docstring of ``.joint``, rule 4).

When the ordinary joint loop gives up, every published non-zero cell of the failing blocks is
suppressed and the publication audited again; it passes, or still fails closed. Real DuckDB,
real HiGHS.
"""

from __future__ import annotations

import duckdb
import pytest

from safehaven.publish.disclosure import Policy, check_invariants, protect
from safehaven.publish.disclosure import joint as joint_module
from safehaven.publish.disclosure.audit import AuditTable, audit
from safehaven.publish.disclosure.joint import protect_jointly
from safehaven.publish.disclosure.relations import Link

POLICY = Policy()


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    c = duckdb.connect()
    yield c
    c.close()


def load(con: duckdb.DuckDBPyConnection, name: str, cols: str, rows: list[tuple]) -> None:
    con.execute(f"CREATE OR REPLACE TABLE {name} ({cols})")
    con.executemany(f"INSERT INTO {name} VALUES ({', '.join('?' for _ in cols.split(','))})", rows)


def test_fallback_suppresses_the_failing_block_when_the_loop_gives_up(
    con: duckdb.DuckDBPyConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sparse breakdown A (region, sex) of the people of B (region, age): per region the sums
    are equal. In R1, M = 3 (a primary) and F = 9 (published 10), and B's R1 sum is published:
    M = sum - F is pinned to 0..4. The loop is cut to one round, so it gives up; the fallback
    suppresses F too and the audit passes."""
    regions = [f"R{i}" for i in range(1, 7)]
    a = [(r, s, 0) for r in regions for s in ("M", "F")]
    a[0], a[1] = ("R1", "M", 3), ("R1", "F", 9)
    b = [(r, g, 0) for r in regions for g in ("young", "old")]
    b[0] = ("R1", "young", 12)
    load(con, "a_true", "region VARCHAR, sex VARCHAR, people BIGINT", a)
    load(con, "b_true", "region VARCHAR, age VARCHAR, people BIGINT", b)
    protect(con, "b_true", "b", ["region", "age"], margins=[], policy=POLICY)
    link = Link("same_population", "a", "b", (("region", "region"),))
    tb, ta = AuditTable("b", "b", ("region", "age")), AuditTable("a", "a", ("region", "sex"))
    dims = ["region", "sex"]
    protect(con, "a_true", "a", dims, margins=[], policy=POLICY)
    assert not audit(con, [ta, tb], [link]).passed

    monkeypatch.setattr(joint_module, "MAX_ROUNDS", 1)
    _, report = protect_jointly(con, "a", "a_true", "a", dims, [tb], [link], margins=[], policy=POLICY)
    assert report.passed, report.problems
    assert report.fallback_block_suppression == 2
    assert report.as_metadata()["audit_fallback_block_suppression"] == 2
    assert audit(con, [ta, tb], [link]).passed
    assert check_invariants(con, "a", dims, margins=[]) == []
    assert con.execute("SELECT count(*) FROM a WHERE people BETWEEN 1 AND 7").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM a WHERE region = 'R1' AND people IS NULL").fetchone()[0] == 2


def test_fallback_is_not_applied_when_the_loop_passes(con: duckdb.DuckDBPyConnection) -> None:
    load(con, "parent_true", "region VARCHAR, people BIGINT", [("R1", 30), ("R2", 40)])
    rows = [("R1", "S1", 3), ("R1", "S2", 20), ("R2", "S1", 12), ("R2", "S2", 20)]
    load(con, "child_true", "region VARCHAR, service VARCHAR, people BIGINT", rows)
    protect(con, "parent_true", "parent", ["region"], margins=[], policy=POLICY)
    link = Link("subset", "child", "parent", (("region", "region"),))
    parent = AuditTable("parent", "parent", ("region",))
    _, report = protect_jointly(
        con, "child", "child_true", "child", ["region", "service"], [parent], [link], policy=POLICY
    )
    assert report.passed and report.fallback_block_suppression == 0


def test_a_zero_pinned_by_the_parent_still_fails_closed(con: duckdb.DuckDBPyConnection) -> None:
    """Sparse subset: two regions, R2 with nobody in the parent. S1 has a primary in R1, and its
    pair group over region holds only R2's zero, which the parent pins to 0: no suppression of
    child cells can free it (the 200-patient demo's case), so the audit still fails."""
    load(con, "parent_true", "region VARCHAR, people BIGINT", [("R1", 30), ("R2", 0)])
    rows = [("R1", "S1", 3), ("R1", "S2", 20), ("R2", "S1", 0), ("R2", "S2", 0)]
    load(con, "child_true", "region VARCHAR, service VARCHAR, people BIGINT", rows)
    protect(con, "parent_true", "parent", ["region"], margins=[], policy=POLICY)
    link = Link("subset", "child", "parent", (("region", "region"),))
    parent = AuditTable("parent", "parent", ("region",))
    _, report = protect_jointly(
        con, "child", "child_true", "child", ["region", "service"], [parent], [link], policy=POLICY
    )
    assert not report.passed
    assert report.fallback_block_suppression >= 1
