"""The objection register, the type 1 rule and the objection-rate monitor (safehaven.protect.objections)."""

from __future__ import annotations

import secrets
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from safehaven.core import registers
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.store import Store
from safehaven.protect.objections import (
    EVENTS,
    REGISTRATIONS,
    TYPE1_INCIDENTS,
    binomial_upper,
    current_sql,
    ensure_tables,
    objection_rates,
    objectors_sql,
)
from safehaven.protect.pseudonymise import hmac_sql, install_key
from tests.unit.populate import populated

ROOT = Path(__file__).resolve().parents[2]


def _memory() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("CREATE SCHEMA governance")
    ensure_tables(con)
    return con


def _event(con, pid, kind, recorded, withdrawn=None, registered=None, practice=None) -> None:
    con.execute(
        f"INSERT INTO {EVENTS} SELECT coalesce(max(event_id), 0) + 1, ?, ?, ?, ?, ?, 't', 0, ?, 'k' FROM {EVENTS}",
        [pid, kind, recorded, withdrawn, practice, registered or datetime.now(UTC)],
    )


def _pids(con, sql) -> set[str]:
    return {r[0] for r in con.execute(sql).fetchall()}


def test_objection_after_a_withdrawal_is_in_force_again() -> None:
    con = _memory()
    _event(con, "p", "national_opt_out", date(2024, 1, 1), date(2024, 3, 1))
    _event(con, "p", "national_opt_out", date(2024, 6, 1))
    assert _pids(con, objectors_sql("2024-02-01")) == {"p"}
    assert _pids(con, objectors_sql("2024-04-01")) == set()
    assert _pids(con, objectors_sql("2024-06-01")) == {"p"}
    assert _pids(con, f"SELECT pid FROM ({current_sql('2024-04-01')}) WHERE in_force") == set()


def test_the_latest_statement_of_an_episode_wins_and_history_is_kept() -> None:
    con = _memory()
    _event(con, "p", "type1", date(2024, 1, 1))
    _event(con, "p", "type1", date(2024, 1, 1), date(2024, 2, 1))
    assert _pids(con, objectors_sql("2024-03-01", ("type1",))) == set()
    assert con.execute(f"SELECT count(*) FROM {EVENTS}").fetchone()[0] == 2, "append-only history"


def test_register_as_known_at_an_earlier_time() -> None:
    con = _memory()
    then = datetime(2024, 5, 1, tzinfo=UTC)
    _event(con, "late", "national_opt_out", date(2024, 1, 1), registered=then + timedelta(days=3))
    assert _pids(con, objectors_sql("2024-05-01", known_at=then)) == set()
    assert _pids(con, objectors_sql("2024-05-01")) == {"late"}


def test_type1_records_held_before_their_objection_arrived_are_dropped_with_the_incident(home: Home) -> None:
    """The objections file comes a night after the GP file: the GP records of people whose type 1
    objection was recorded before that GP file was sent are already in the haven. Once the
    objections are registered they are dropped as entry would have dropped them, with the
    incident per sender, so no output counts them (guide Rule 4B)."""
    import shutil

    from tests.unit.populate import drop, process

    drop(home)
    held_back = home.root.parent / "objections_later"
    shutil.move(str(home.incoming_for("objections")), held_back)
    first = process(home)["gp_events"]
    assert first.type1_dropped == 0  # nothing registered yet: every GP record entered
    shutil.move(str(held_back), home.incoming_for("objections"))
    second = process(home)["gp_events"]
    assert second.type1_purged > 0
    with Store(home).connect() as con:
        in_haven = con.execute(
            f"SELECT count(*) FROM haven.gp_events h JOIN governance.batches b ON b.batch_id = h._batch "
            f"WHERE h.pid IN ({objectors_sql('current_date', ('type1',))})"
        ).fetchone()[0]
        incidents = con.execute(f"SELECT sum(records_dropped) FROM {TYPE1_INCIDENTS}").fetchone()[0]
    assert in_haven == 0
    assert incidents == second.type1_purged


def test_types_are_checked() -> None:
    with pytest.raises(ValueError):
        objectors_sql("current_date", ("type2",))


def test_type1_records_are_dropped_before_the_haven_and_counted_per_sender(home: Home) -> None:
    reports = populated(home)
    gp = reports["gp_events"]
    assert gp.type1_dropped > 0 and len(gp.type1_by_sender) >= 1
    assert gp.rows_out == gp.rows_in - gp.type1_dropped
    assert sum(gp.type1_by_sender.values()) == gp.type1_dropped
    with Store(home).connect() as con:
        in_haven = con.execute(
            f"SELECT count(*) FROM haven.gp_events WHERE pid IN ({objectors_sql('current_date', ('type1',))})"
        ).fetchone()[0]
        incidents = dict(
            con.execute(
                f"SELECT sender, records_dropped FROM {TYPE1_INCIDENTS} WHERE collection = 'gp_events'"
            ).fetchall()
        )
        breaches = [b for b in registers.breaches(con) if b["kind"] == "type1_objection_disregarded"]
        hospital_objectors = con.execute(
            f"SELECT count(*) FROM haven.hospital_episodes WHERE pid IN ({objectors_sql('current_date', ('type1',))})"
        ).fetchone()[0]
    assert in_haven == 0
    assert incidents == gp.type1_by_sender
    assert len(breaches) == 1 and str(gp.type1_dropped) in breaches[0]["what"]
    assert hospital_objectors > 0, "type 1 is about GP data: hospital records stay"
    assert reports["hospital_episodes"].type1_dropped == 0


def _monitor_population(con, sizes: list[int], rates: list[float], seed: int = 3) -> list[str]:
    rng = np.random.default_rng(seed)
    practices = [f"P{i:05d}" for i in range(len(sizes))]
    regs, events = [], []
    for practice, n, rate in zip(practices, sizes, rates, strict=True):
        for _ in range(n):
            pid = secrets.token_hex(16)
            regs.append([practice, pid])
            if rng.random() < rate:
                events.append([pid, practice])
    reg_rows = pa.table({"practice": [r[0] for r in regs], "pid": [r[1] for r in regs]})
    ev_rows = pa.table({"pid": [e[0] for e in events], "practice": [e[1] for e in events]})
    con.register("_regs", reg_rows)
    con.register("_evs", ev_rows)
    con.execute(f"INSERT INTO {REGISTRATIONS} SELECT practice, pid, now(), 'gp_events' FROM _regs")
    con.execute(
        f"INSERT INTO {EVENTS} SELECT 0, pid, 'type1', DATE '2024-01-01', NULL, practice, 't', 0, now(), 'k' FROM _evs"
    )
    return practices


def test_the_outlier_practice_is_flagged_and_ordinary_ones_are_not() -> None:
    con = _memory()
    rng = np.random.default_rng(11)
    sizes = [int(s) for s in rng.integers(400, 3000, 30)]
    rates = [0.02] * 30
    rates[17] = 0.25
    practices = _monitor_population(con, sizes, rates)
    result = {r.practice: r for r in objection_rates(con, "type1", "2024-06-01")}
    assert [p for p, r in result.items() if r.outlier] == [practices[17]]
    flagged = result[practices[17]]
    assert flagged.rate > 0.2 and 0.015 < flagged.baseline < 0.03
    assert flagged.upper_limit is not None and flagged.rate > flagged.upper_limit and flagged.z > 3.09
    assert flagged.p_value is not None and flagged.p_value < 0.001
    assert all(r.assessed for r in result.values())
    for r in result.values():
        if not r.outlier:
            assert r.upper_limit is not None and r.rate <= r.upper_limit


def test_a_small_practice_is_judged_exactly_not_by_the_normal_approximation() -> None:
    con = duckdb.connect()
    con.execute("CREATE SCHEMA governance")
    ensure_tables(con)
    regs = [[f"P{i}", f"p{i}-{j}"] for i in range(3) for j in range(2000)] + [["SMALL", f"s{j}"] for j in range(20)]
    objecting = [f"p{i}-{j}" for i in range(3) for j in range(40)] + ["s0", "s1", "s2"]  # 2%; 3 of 20 = 15%
    con.register("_r", pa.table({"practice": [r[0] for r in regs], "pid": [r[1] for r in regs]}))
    con.execute(f"INSERT INTO {REGISTRATIONS} SELECT practice, pid, now(), 'gp_events' FROM _r")
    con.register("_o", pa.table({"pid": objecting}))
    con.execute(
        f"INSERT INTO {EVENTS} SELECT 0, o.pid, 'type1', DATE '2024-01-01', NULL, r.practice, 't', 0, now(), "
        "'k' FROM _o o JOIN _r r USING (pid)"
    )
    small = {r.practice: r for r in objection_rates(con, "type1", "2024-06-01")}["SMALL"]
    assert small.z is not None and small.z > 3.09, "the normal approximation would raise a false alarm"
    assert small.p_value is not None and 0.001 < small.p_value < 0.05 and not small.outlier


def test_with_three_practices_the_outlier_does_not_hide_in_its_own_baseline() -> None:
    con = _memory()
    practices = _monitor_population(con, [600, 700, 650], [0.02, 0.25, 0.02])
    result = {r.practice: r for r in objection_rates(con, "type1", "2024-06-01")}
    assert [p for p, r in result.items() if r.outlier] == [practices[1]]
    assert result[practices[1]].baseline < 0.05, "leave-one-out: the baseline excludes the practice itself"


def test_exact_binomial_tail() -> None:
    from math import comb

    n, p0 = 40, 0.05
    for x in (0, 2, 5, 9):
        exact = sum(comb(n, k) * p0**k * (1 - p0) ** (n - k) for k in range(x, n + 1))
        assert binomial_upper(n, p0, x)[0] == pytest.approx(exact, rel=1e-9)
    _, limit = binomial_upper(n, p0, 0)
    k = round(limit * n)
    assert sum(comb(n, j) * p0**j * (1 - p0) ** (n - j) for j in range(k, n + 1)) < 0.001
    assert sum(comb(n, j) * p0**j * (1 - p0) ** (n - j) for j in range(k - 1, n + 1)) >= 0.001


def _type1_only_gp_file(home: Home) -> int:
    """Write a GP file holding one record of a type 1 objector (sent by a practice that should
    have withheld it); returns how many type 1 incidents the store held before."""
    from tests.unit.populate import write_csv

    with Store(home).connect() as con:
        install_key(con, "haven", KeyRing(home.keys).get("haven"))
        nhs, practice = con.execute(
            f"SELECT nhs_number, source_practice FROM landing.objections_valid "
            f"WHERE {hmac_sql('nhs_number', 'haven')} IN ({objectors_sql('current_date', ('type1',))}) "
            "AND source_practice IS NOT NULL ORDER BY 1 LIMIT 1"
        ).fetchone()
        before = con.execute(f"SELECT count(*) FROM {TYPE1_INCIDENTS}").fetchone()[0]
    header = ["practice_code", "nhs_number", "date_of_birth", "sex", "postcode", "event_date", "diagnosis_code"]
    write_csv(
        home.incoming_for("gp_events") / "gp_events_20260101.csv",
        header,
        [[practice, nhs, "1950-01-01", "1", "LE6 7US", "2025-03-01", "58214004"]],
    )
    return before


def _incidents_and_breaches(home: Home) -> tuple[int, int]:
    with Store(home).connect() as con:
        incidents = con.execute(f"SELECT count(*) FROM {TYPE1_INCIDENTS}").fetchone()[0]
        breaches = [b for b in registers.breaches(con) if b["kind"] == "type1_objection_disregarded"]
    return incidents, len(breaches)


def test_a_batch_of_type1_records_only_is_recorded_once_not_every_night(home: Home, populated_haven) -> None:
    """A GP file holding only a type 1 objector's records leaves no haven row; it still enters
    the haven once (``governance.haven_batches``), so its incident is recorded once, not nightly."""
    from tests.conftest import copy_haven
    from tests.unit.populate import process

    copy_haven(populated_haven, home)
    before = _type1_only_gp_file(home)
    nights = [process(home)["gp_events"] for _ in range(3)]
    assert [(n.batches, n.type1_dropped) for n in nights] == [(1, 1), (0, 0), (0, 0)]
    assert _incidents_and_breaches(home)[0] == before + 1


KILLED_AT_THE_INCIDENT = """
import sys
from pathlib import Path
from tests.crash.harness import arm
arm("safehaven.protect.haven:record_type1_incident", 1, sys.argv[2])
from safehaven.core.home import Home
from tests.unit.populate import process
process(Home(Path(sys.argv[1])))
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_kill_as_the_type1_incident_is_recorded_loses_neither_the_incident_nor_the_breach(
    home: Home, populated_haven, when: str
) -> None:
    """The incident and its breach are written in the transaction that enters the batch into
    the haven (``safehaven.protect.haven``): a ``kill -9`` just before or just after writing
    them leaves either nothing of the batch (the next night does it all) or all of it; never a
    batch entered whose incident is lost (it would never be new again). guide Rule 4B."""
    import os
    import subprocess
    import sys

    from tests.conftest import copy_haven
    from tests.unit.populate import process

    copy_haven(populated_haven, home)
    before = _type1_only_gp_file(home)
    before_breaches = _incidents_and_breaches(home)[1]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AT_THE_INCIDENT, str(home.root), when],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    process(home)
    assert _incidents_and_breaches(home) == (before + 1, before_breaches + 1)


def test_a_store_without_the_haven_batch_record_has_it_filled_once_and_adds_nothing(
    home: Home, populated_haven
) -> None:
    """A store made before ``governance.haven_batches``: its haven's batches are recorded once
    from the haven table, and a rerun adds no record (batches enter the haven once)."""
    from tests.conftest import copy_haven
    from tests.unit.populate import process

    copy_haven(populated_haven, home)
    with Store(home).connect() as con:
        recorded = con.execute("SELECT collection, count(*) FROM governance.haven_batches GROUP BY 1 ORDER BY 1")
        recorded = recorded.fetchall()
        con.execute("DELETE FROM governance.haven_batches")
        rows = con.execute("SELECT count(*) FROM haven.gp_events").fetchone()[0]
    reports = process(home)
    assert all(r.batches == 0 for r in reports.values())
    with Store(home).connect() as con:
        assert con.execute("SELECT count(*) FROM haven.gp_events").fetchone()[0] == rows
        again = con.execute("SELECT collection, count(*) FROM governance.haven_batches GROUP BY 1 ORDER BY 1")
        assert again.fetchall() == recorded
