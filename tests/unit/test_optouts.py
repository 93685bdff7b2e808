"""The national data opt-out on what leaves the haven, and the CoP 14b notices (safehaven.protect.optouts)."""

from __future__ import annotations

import csv
import json
import secrets
from datetime import UTC, date, datetime, timedelta

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehaven.core import audit
from safehaven.core.days import haven_today
from safehaven.core.home import Home
from safehaven.core.identifiers import canonical_nhs_sql, check_digit
from safehaven.core.keys import KeyRing, agreement_key
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.ingest import ensure_tables as ensure_landing
from safehaven.protect.objections import EVENTS, ensure_tables, register_objections
from safehaven.protect.optouts import (
    DECISIONS,
    EXEMPT_BASES,
    LEGAL_BASES,
    MEMBERS,
    apply_optouts,
    decide,
    notices,
    record_decision,
)
from safehaven.protect.optouts import ensure_tables as ensure_optout_tables
from safehaven.protect.pseudonymise import hmac_sql, install_agreement_key, install_key, pseudonym, release_pseudonym

BASE = date(2024, 1, 1)
CONFIDENTIAL = sorted(LEGAL_BASES - {"anonymised"})


# --- decide --------------------------------------------------------------------------------


@pytest.mark.parametrize("basis", CONFIDENTIAL)
@pytest.mark.parametrize("level", ["identifiable", "pseudonymised"])
def test_opt_out_applies_to_confidential_flows_unless_the_basis_is_exempt(basis: str, level: str) -> None:
    decision = decide(basis, level)
    assert decision.applied is (basis not in EXEMPT_BASES)
    assert decision.legal_basis == basis and decision.reason


def test_exempt_bases_are_consent_statute_and_copi_reg3() -> None:
    assert EXEMPT_BASES == {"consent", "statutory", "copi_reg3"}
    assert decide("section_251", "pseudonymised").applied
    assert decide("public_interest", "identifiable").applied


@pytest.mark.parametrize("basis", sorted(LEGAL_BASES))
def test_anonymised_outputs_include_everyone_unless_they_choose_otherwise(basis: str) -> None:
    assert not decide(basis, "anonymised").applied
    assert "Rule 4C" in decide(basis, "anonymised").reason
    assert decide(basis, "anonymised", by_choice=True).applied


@pytest.mark.parametrize("level", ["identifiable", "pseudonymised"])
def test_confidential_data_under_the_anonymised_basis_is_refused(level: str) -> None:
    with pytest.raises(ValueError, match="no legal basis"):
        decide("anonymised", level)


def test_unknown_basis_or_level_is_refused() -> None:
    with pytest.raises(ValueError):
        decide("legitimate_interest", "pseudonymised")
    with pytest.raises(ValueError):
        decide("consent", "de-identified")


# --- the property: no objector gets through -----------------------------------------------


def _number(n: int) -> str | None:
    nine = f"999{n:06d}"
    check = check_digit(nine)
    return None if check is None else nine + str(check)


FORMATS = [
    lambda s: s,
    lambda s: f"{s[:3]} {s[3:6]} {s[6:]}",
    lambda s: f"{s[:3]}-{s[3:6]}-{s[6:]}",
    lambda s: f"  {s[:3]} {s[3:6]}-{s[6:]} ",
]
numbers = st.integers(0, 999_999).map(_number).filter(lambda s: s is not None)


@st.composite
def scenarios(draw):
    people = draw(st.lists(numbers, min_size=1, max_size=25, unique=True))
    records = [(p, draw(st.sampled_from(range(len(FORMATS))))) for p in people for _ in range(draw(st.integers(1, 3)))]
    events = []
    for p in draw(st.lists(st.sampled_from(people), max_size=30)):
        recorded = draw(st.integers(0, 100))
        withdrawn = draw(st.one_of(st.none(), st.integers(recorded + 1, recorded + 60)))
        kind = draw(st.sampled_from(["type1", "national_opt_out"]))
        events.append((p, draw(st.sampled_from(range(len(FORMATS)))), kind, recorded, withdrawn))
    as_of = draw(st.integers(0, 170))
    basis = draw(st.sampled_from(CONFIDENTIAL))
    level = draw(st.sampled_from(["identifiable", "pseudonymised"]))
    gp = draw(st.booleans())
    return records, events, as_of, basis, level, gp


def _objecting(events, person: str, as_of: int, types: set[str]) -> bool:
    """Oracle: the latest statement per (person, type, recorded date) wins; in force on as_of."""
    latest: dict[tuple[str, str, int], int | None] = {}
    for p, _, kind, recorded, withdrawn in events:
        latest[(p, kind, recorded)] = withdrawn
    return any(
        p == person and kind in types and recorded <= as_of and (w is None or w > as_of)
        for (p, kind, recorded), w in latest.items()
    )


def _memory_haven() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    for zone in ("landing", "governance", "haven"):
        con.execute(f"CREATE SCHEMA {zone}")
    ensure_landing(con, ContractRegistry().objections())
    ensure_tables(con)
    install_key(con, "haven", secrets.token_bytes(32))
    return con


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_no_objector_leaves_without_an_exempt_basis(scenario) -> None:
    records, events, as_of, basis, level, gp = scenario
    con = _memory_haven()
    con.execute(
        "CREATE TABLE landing.objections_valid (nhs_number VARCHAR, objection_type VARCHAR, "
        "recorded_date DATE, withdrawn_date DATE, source_practice VARCHAR, _batch VARCHAR, _row BIGINT)"
    )
    if events:
        con.executemany(
            "INSERT INTO landing.objections_valid VALUES (?, ?, ?, ?, NULL, 'b1', ?)",
            [
                [FORMATS[f](p), kind, BASE + timedelta(r), None if w is None else BASE + timedelta(w), i]
                for i, (p, f, kind, r, w) in enumerate(events)
            ],
        )
    register_objections(con, ContractRegistry().objections())
    con.execute("CREATE TABLE raw (nhs VARCHAR, person VARCHAR)")
    con.executemany("INSERT INTO raw VALUES (?, ?)", [[FORMATS[f](p), p] for p, f in records])
    con.execute(
        f"CREATE TABLE haven.recs AS SELECT {hmac_sql(canonical_nhs_sql('nhs'), 'haven')} AS pid, person FROM raw"
    )

    sql, withheld, decision = apply_optouts(
        con, "SELECT * FROM haven.recs", "pid", basis, level, (BASE + timedelta(as_of)).isoformat(), gp_sourced=gp
    )
    released = [r[0] for r in con.execute(f"SELECT person FROM ({sql})").fetchall()]
    types = {"national_opt_out", "type1"} if gp else {"national_opt_out"}
    objector_records = [p for p, _ in records if _objecting(events, p, as_of, types)]
    if basis in EXEMPT_BASES:
        assert not decision.applied
        assert sorted(released) == sorted(p for p, _ in records), "an exempt basis includes objectors"
        assert withheld == 0 and decision.overruled == len(objector_records)
    else:
        assert decision.applied
        assert not set(released) & set(objector_records), "an objector's record got through"
        assert sorted(released) == sorted(p for p, _ in records if p not in objector_records)
        assert withheld == len(objector_records)


def test_formatting_never_lets_an_objector_through() -> None:
    con = _memory_haven()
    con.execute(
        "CREATE TABLE landing.objections_valid AS SELECT '943 476 5919' AS nhs_number, "
        "'national_opt_out' AS objection_type, DATE '2024-01-01' AS recorded_date, "
        "NULL::DATE AS withdrawn_date, NULL AS source_practice, 'b' AS _batch, 1::BIGINT AS _row"
    )
    register_objections(con, ContractRegistry().objections())
    con.execute(
        f"CREATE TABLE haven.recs AS SELECT {hmac_sql(canonical_nhs_sql('n'), 'haven')} AS pid, n "
        "FROM (VALUES ('9434765919'), ('943-476-5919'), ('943 476 5919'), ('9990001236')) t(n)"
    )
    sql, withheld, _ = apply_optouts(
        con, "SELECT * FROM haven.recs", "pid", "section_251", "pseudonymised", "2024-06-01"
    )
    assert withheld == 3
    assert con.execute(f"SELECT n FROM ({sql})").fetchall() == [("9990001236",)]


def test_withdrawal_re_includes_from_its_date() -> None:
    con = _memory_haven()
    nhs = "9990001236"
    con.execute(
        "CREATE TABLE landing.objections_valid (nhs_number VARCHAR, objection_type VARCHAR, "
        "recorded_date DATE, withdrawn_date DATE, source_practice VARCHAR, _batch VARCHAR, _row BIGINT)"
    )
    # first drop: objection from 1 Feb; a later drop restates it withdrawn on 1 Apr
    con.execute(
        f"INSERT INTO landing.objections_valid VALUES ('{nhs}', 'national_opt_out', '2024-02-01', NULL, NULL, 'b1', 1)"
    )
    register_objections(con, ContractRegistry().objections())
    # learnt before the withdrawal was made (a withdrawal dated by then would be stale: held)
    con.execute("UPDATE governance.objection_events SET registered_at = TIMESTAMPTZ '2024-03-01 00:00:00+00'")
    con.execute(
        f"INSERT INTO landing.objections_valid VALUES ('{nhs}', 'national_opt_out', '2024-02-01', "
        "'2024-04-01', NULL, 'b2', 1)"
    )
    register_objections(con, ContractRegistry().objections())
    con.execute(f"CREATE TABLE haven.recs AS SELECT {hmac_sql(repr(nhs), 'haven')} AS pid")
    kept = {}
    for day in ("2024-01-31", "2024-02-01", "2024-03-31", "2024-04-01", "2024-06-01"):
        sql, withheld, _ = apply_optouts(
            con, "SELECT * FROM haven.recs", "pid", "public_interest", "pseudonymised", day
        )
        kept[day] = con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]
    assert kept == {"2024-01-31": 1, "2024-02-01": 0, "2024-03-31": 0, "2024-04-01": 1, "2024-06-01": 1}


def test_as_of_is_never_pasted_into_sql() -> None:
    con = _memory_haven()
    con.execute("CREATE TABLE haven.recs (pid VARCHAR)")
    with pytest.raises(ValueError):
        apply_optouts(con, "SELECT * FROM haven.recs", "pid", "consent", "identifiable", "2024-01-01'; DROP TABLE x")


# --- decisions and notices -----------------------------------------------------------------


def test_every_decision_is_recorded_with_basis_and_counts(store: Store) -> None:
    with store.connect() as con:
        record_decision(
            con, release_id="r1", agreement_id="a-1", decision=decide("consent", "identifiable"), withheld=0
        )
        record_decision(
            con, release_id="r2", agreement_id="a-1", decision=decide("section_251", "pseudonymised"), withheld=12
        )
        rows = con.execute(
            f"SELECT release_id, legal_basis, applied, withheld, reason FROM {DECISIONS} ORDER BY 1"
        ).fetchall()
    assert [r[:4] for r in rows] == [("r1", "consent", False, 0), ("r2", "section_251", True, 12)]
    assert all(r[4] for r in rows)


def _event(con, pid: str, kind: str, recorded: date, withdrawn: date | None, registered: datetime) -> None:
    con.execute(
        f"INSERT INTO {EVENTS} SELECT coalesce(max(event_id), 0) + 1, ?, ?, ?, ?, NULL, 'test', 0, ?, 'k' "
        f"FROM {EVENTS}",
        [pid, kind, recorded, withdrawn, registered],
    )


def test_notices_list_exactly_the_changed_records(store: Store, home: Home) -> None:
    keyring = KeyRing(home.keys)
    keyring.get_or_create("haven")
    now = datetime.now(UTC)
    today = now.date()
    t1 = now - timedelta(days=10)
    before_t1 = t1 - timedelta(days=1)
    pids = {name: secrets.token_hex(16) for name in "ABCDEFG"}
    with store.connect() as con:
        ensure_tables(con)
        ensure_optout_tables(con)
        con.executemany(f"INSERT INTO {MEMBERS} VALUES ('r1', 'study-a', ?, ?)", [[pids[n], t1] for n in "ABCDEG"])
        con.execute(f"INSERT INTO {MEMBERS} VALUES ('r1', 'study-b', ?, ?)", [pids["F"], t1])
        nat = "national_opt_out"
        _event(con, pids["A"], nat, today - timedelta(5), None, now)  # objected after R1
        _event(con, pids["B"], nat, today - timedelta(20), None, now)  # late-registered
        _event(con, pids["C"], nat, today - timedelta(30), None, before_t1)  # objecting at R1 ...
        _event(con, pids["C"], nat, today - timedelta(30), today - timedelta(3), now)  # ... since withdrawn
        _event(con, pids["D"], nat, today - timedelta(30), None, before_t1)  # no change
        _event(con, pids["F"], nat, today - timedelta(5), None, now)  # another recipient's
        _event(con, pids["G"], nat, today - timedelta(8), today - timedelta(4), now)  # came and went
        _event(con, pids["E"], "type1", today - timedelta(5), None, now)  # type 1: not GP data
        record_decision(
            con, release_id="r1", agreement_id="study-a", decision=decide("section_251", "pseudonymised"), withheld=7
        )
        name = install_agreement_key(con, keyring, "study-a")
        report = notices(con, agreement_id="study-a", recipient_key_name=name, since_release_id="r1")
        again = notices(con, agreement_id="study-a", recipient_key_name=name)
        entries = audit.entries_for(con, agreement="study-a")
    key = agreement_key(keyring, "study-a")
    ps = {n: release_pseudonym(key, p) for n, p in pids.items()}
    assert sorted(report.objected) == sorted([ps["A"], ps["B"]])
    assert report.withdrawn == [ps["C"]]
    assert report.withheld == 7 and report.release_id == "r1" and report.opt_out_applied
    with open(report.csv_path) as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["pseudonym", "change"]
    assert sorted(rows[1:]) == sorted([[ps["A"], "objected"], [ps["B"], "objected"], [ps["C"], "withdrawn"]])
    text = report.csv_path.read_text() + report.json_path.read_text()
    assert not any(p in text for p in pids.values()), "notices are keyed by the recipient's pseudonyms only"
    summary = json.loads(report.json_path.read_text())
    assert summary["objected"] == 2 and summary["withdrawn"] == 1 and summary["withheld"] == 7
    assert report.csv_path.parent == home.releases / "study-a" / "notices"
    assert again.objected == [] and again.withdrawn == [], "the next notice starts where the last one ended"
    assert [e.action for e in entries].count("optout.notice") == 2


def test_notices_use_the_recipients_pseudonym_domain(store: Store, home: Home) -> None:
    keyring = KeyRing(home.keys)
    haven = keyring.get_or_create("haven")
    nhs = "9990001236"
    pid = pseudonym(haven.material, nhs)
    with store.connect() as con:
        ensure_tables(con)
        ensure_optout_tables(con)
        con.execute(f"INSERT INTO {MEMBERS} VALUES ('r1', 'study-a', ?, now() - INTERVAL 2 DAY)", [pid])
        _event(con, pid, "national_opt_out", haven_today(), None, datetime.now(UTC))
        report = notices(
            con, agreement_id="study-a", recipient_key_name=install_agreement_key(con, keyring, "study-a"), write=False
        )
    assert report.objected == [release_pseudonym(agreement_key(keyring, "study-a"), pid)]
    assert pid not in report.objected and nhs not in report.objected
