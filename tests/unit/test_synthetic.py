"""The synthetic data generator (``docs/rules.md`` "Synthetic data only").

Small populations throughout: each generation here takes a fraction of a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import duckdb
import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from safehaven.core.identifiers import canonical_nhs_sql, check_digit, nhs_valid_sql
from safehaven.tools.synthetic import (
    CODE_LIST_DIR,
    COLUMNS,
    DEFECT_COLLECTIONS,
    MAX_PATIENTS,
    _Calendar,
    _population,
    _test_number_space,
    default_period_end,
    generate,
    load_code_list,
    main,
    period_start,
)

PERIOD_END = date(2024, 3, 31)
STAMP = "20240331"
PATIENTS = 3000
CANON = canonical_nhs_sql("nhs_number")
#: Validity of ``k``, a column already holding the canonical number (canonicalise once, not per digit).
VALID = nhs_valid_sql("k")


def path_of(out: Path, name: str, ext: str = "csv") -> Path:
    return out / name / f"{name}_{STAMP}.{ext}"


def connect(out: Path, ext: str = "csv") -> duckdb.DuckDBPyConnection:
    """DuckDB with one table per collection, every column read as text (as the haven lands it)."""
    con = duckdb.connect()
    for name in COLUMNS:
        path = path_of(out, name, ext)
        source = f"read_csv('{path}', all_varchar=true)" if ext == "csv" else f"read_parquet('{path}')"
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM {source}")
    return con


@dataclass(frozen=True)
class Drop:
    """One generated incoming folder, its row counts and a DuckDB connection over it."""

    out: Path
    counts: dict[str, int]
    con: duckdb.DuckDBPyConnection


def _compiled(name: str) -> list:
    from safehaven.intake.contracts import ContractRegistry
    from safehaven.intake.rules import compile_checks

    registry = ContractRegistry()
    return compile_checks(registry.contracts[name], registry)


def failing_rows(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Per collection: rows failing any compiled contract rule."""
    from safehaven.intake.contracts import ContractRegistry

    result: dict[str, int] = {}
    for name in ContractRegistry().contracts:
        any_rule = " OR ".join(f"NOT ({c.valid_sql})" for c in _compiled(name))
        result[name] = int(one(con, f"SELECT count(*) FROM {name} WHERE {any_rule}"))
    return result


def rule_failures(con: duckdb.DuckDBPyConnection, name: str) -> dict[str, int]:
    """Rows failing each rule of one collection (for failure messages only: slower)."""
    counts = {c.id: int(one(con, f"SELECT count(*) FROM {name} WHERE NOT ({c.valid_sql})")) for c in _compiled(name)}
    return {rule: n for rule, n in counts.items() if n}


def one(con: duckdb.DuckDBPyConnection, sql: str) -> object:
    row = con.execute(sql).fetchone()
    assert row is not None
    return row[0]


def codes(name: str) -> set[str]:
    data = yaml.safe_load((CODE_LIST_DIR / f"{name}.yaml").read_text())
    return {str(c["code"]) for c in data["codes"]}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Drop:
    out = tmp_path_factory.mktemp("clean") / "incoming"
    counts = generate(out, PATIENTS, seed=11, defect_rate=0.0, period_end=PERIOD_END)
    return Drop(out, counts, connect(out))


@pytest.fixture(scope="module")
def defective(tmp_path_factory: pytest.TempPathFactory) -> Drop:
    out = tmp_path_factory.mktemp("defective") / "incoming"
    counts = generate(out, PATIENTS, seed=11, defect_rate=0.05, period_end=PERIOD_END)
    return Drop(out, counts, connect(out))


@pytest.fixture(scope="module", params=[0.0, 0.05], ids=["clean", "defective"])
def small(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[float, Drop]:
    """A small drop for the compiled contract rules (their NHS-number SQL is costly per row)."""
    out = tmp_path_factory.mktemp("small") / "incoming"
    counts = generate(out, 600, seed=12, defect_rate=request.param, period_end=PERIOD_END)
    return request.param, Drop(out, counts, connect(out))


# --- files and columns ---------------------------------------------------------------------


def test_files_and_columns_exactly_as_specified(clean: Drop) -> None:
    out, counts = clean.out, clean.counts
    assert set(counts) == set(COLUMNS)
    for name, columns in COLUMNS.items():
        path = path_of(out, name)
        header = path.read_text(encoding="utf-8").splitlines()[0]
        assert header == ",".join(columns)
        assert counts[name] > 0
        assert len(path.read_text(encoding="utf-8").splitlines()) == counts[name] + 1
    assert not list(out.rglob("*.tmp"))


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    runs = []
    for run in ("a", "b", "c"):
        seed = 5 if run != "c" else 6
        generate(tmp_path / run, 400, seed=seed, defect_rate=0.05, period_end=PERIOD_END)
        runs.append({name: path_of(tmp_path / run, name).read_bytes() for name in COLUMNS})
    assert runs[0] == runs[1]
    assert all(runs[0][name] != runs[2][name] for name in COLUMNS)


def test_parquet_is_reproducible_and_matches_csv(tmp_path: Path) -> None:
    for run in ("a", "b"):
        generate(tmp_path / run, 300, seed=9, defect_rate=0.05, period_end=PERIOD_END, fmt="parquet")
    generate(tmp_path / "csv", 300, seed=9, defect_rate=0.05, period_end=PERIOD_END)
    for name in COLUMNS:
        assert path_of(tmp_path / "a", name, "parquet").read_bytes() == (
            path_of(tmp_path / "b", name, "parquet").read_bytes()
        )
    parquet, csv = connect(tmp_path / "a", "parquet"), connect(tmp_path / "csv")
    for name in COLUMNS:
        assert parquet.execute(f"SELECT * FROM {name}").fetchall() == csv.execute(f"SELECT * FROM {name}").fetchall()


# --- identity ------------------------------------------------------------------------------


def test_nhs_numbers_valid_and_in_test_range_when_clean(clean: Drop) -> None:
    con = clean.con
    for name in COLUMNS:
        canonical = f"(SELECT {CANON} AS k FROM {name})"
        bad = one(con, f"SELECT count(*) FROM {canonical} WHERE NOT coalesce({VALID}, false) OR NOT k LIKE '999%'")
        assert bad == 0, name


def test_one_identity_per_patient_across_collections(clean: Drop) -> None:
    con = clean.con
    union = " UNION ALL ".join(
        f"SELECT {CANON} AS k, date_of_birth, sex, postcode FROM {name}"
        for name in ("gp_events", "hospital_episodes", "social_care")
    )
    people, inconsistent = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE n > 1) FROM "
        f"(SELECT k, count(DISTINCT (date_of_birth, sex, postcode)) AS n FROM ({union}) GROUP BY k)"
    ).fetchone()  # type: ignore[misc]
    assert inconsistent == 0
    assert 0.8 * PATIENTS < people <= PATIENTS  # a few patients have no records at all


def test_nhs_number_formatting_varies(clean: Drop) -> None:
    con = clean.con
    for name in COLUMNS:
        plain, spaced, hyphen, total = con.execute(
            f"SELECT count(*) FILTER (WHERE regexp_full_match(nhs_number, '[0-9]{{10}}')),"
            f" count(*) FILTER (WHERE regexp_full_match(nhs_number, '[0-9]{{3}} [0-9]{{3}} [0-9]{{4}}')),"
            f" count(*) FILTER (WHERE regexp_full_match(nhs_number, '[0-9]{{3}}-[0-9]{{3}}-[0-9]{{4}}')),"
            f" count(*) FROM {name}"
        ).fetchone()  # type: ignore[misc]
        assert plain + spaced + hyphen == total, name
        assert plain > total / 2 and spaced > 0 and hyphen > 0, name
    # The same patient is written differently in different files.
    assert one(
        con,
        f"SELECT count(*) FROM (SELECT {CANON} AS k, nhs_number FROM gp_events) g "
        f"JOIN (SELECT {CANON} AS k, nhs_number FROM hospital_episodes) h USING (k) "
        f"WHERE g.nhs_number <> h.nhs_number",
    )


def test_postcodes_and_organisation_codes_look_real(clean: Drop) -> None:
    con = clean.con
    postcode = "[A-Z]{1,2}[0-9]{1,2} [0-9][ABDEFGHJLNPQRSTUWXYZ]{2}"
    for name in ("gp_events", "hospital_episodes", "social_care"):
        assert one(con, f"SELECT count(*) FROM {name} WHERE NOT regexp_full_match(postcode, '{postcode}')") == 0
    assert one(con, "SELECT count(*) FROM gp_events WHERE NOT regexp_full_match(practice_code, '[A-Z][0-9]{5}')") == 0
    assert (
        one(con, "SELECT count(*) FROM hospital_episodes WHERE NOT regexp_full_match(provider_code, 'R[A-Z0-9]{2}')")
        == 0
    )
    assert one(con, "SELECT count(DISTINCT provider_code) FROM hospital_episodes") >= 8


def test_age_and_sex_structure(clean: Drop) -> None:
    con = clean.con
    ages = con.execute(
        f"SELECT DISTINCT {CANON}, date_diff('day', date_of_birth::DATE, DATE '{PERIOD_END}') / 365.25 FROM gp_events"
    ).fetchall()
    age = np.array([a for _, a in ages])
    assert age.min() >= 0 and age.max() < 101.5
    assert 35 < age.mean() < 45  # England's mean age is about 40
    sexes = dict(con.execute("SELECT sex, count(DISTINCT nhs_number) FROM gp_events GROUP BY 1").fetchall())
    assert set(sexes) <= {"0", "1", "2", "9"}
    assert sexes["1"] + sexes["2"] > 0.98 * sum(sexes.values())
    assert sexes.get("9", 0) > 0
    hospital_age = one(
        con, "SELECT avg(date_diff('day', date_of_birth::DATE, admission_date::DATE)) / 365.25 FROM hospital_episodes"
    )
    assert hospital_age > age.mean() + 10  # hospital activity is skewed to older people
    too_young = one(
        con, "SELECT count(*) FROM social_care WHERE start_date::DATE < date_of_birth::DATE + INTERVAL 18 YEAR"
    )
    assert too_young == 0


# --- codes and dates -----------------------------------------------------------------------


def test_every_code_is_in_its_code_list_when_clean(clean: Drop) -> None:
    con = clean.con
    used = {
        "snomed_gp_diagnoses": "SELECT DISTINCT diagnosis_code FROM gp_events",
        "icd10": "SELECT DISTINCT left(primary_diagnosis, 3) FROM hospital_episodes",
        "asc_service_types": "SELECT DISTINCT service_type FROM social_care",
        "ons_local_authorities": "SELECT DISTINCT local_authority_code FROM social_care",
        "objection_types": "SELECT DISTINCT objection_type FROM objections",
        "person_gender": "SELECT DISTINCT sex FROM gp_events UNION SELECT DISTINCT sex FROM social_care",
    }
    for code_list, sql in used.items():
        values = {row[0] for row in con.execute(sql).fetchall()}
        assert values and values <= codes(code_list), code_list
    lengths = {
        row[0] for row in con.execute("SELECT DISTINCT length(primary_diagnosis) FROM hospital_episodes").fetchall()
    }
    assert lengths == {3, 4}  # some episodes carry a fourth character, e.g. I219


def test_dates_are_iso_in_period_and_ordered_when_clean(clean: Drop) -> None:
    con = clean.con
    start, end = f"DATE '{period_start(PERIOD_END)}'", f"DATE '{PERIOD_END}'"
    assert period_start(PERIOD_END) == date(2023, 4, 1)
    checks = {
        "gp_events": f"NOT (event_date::DATE BETWEEN greatest({start}, date_of_birth::DATE) AND {end})",
        "hospital_episodes": f"NOT (admission_date::DATE BETWEEN greatest({start}, date_of_birth::DATE) AND {end})"
        f" OR NOT (discharge_date::DATE BETWEEN admission_date::DATE AND {end})",
        "social_care": f"NOT (start_date::DATE BETWEEN {start} AND {end})"
        f" OR coalesce(NOT (end_date::DATE BETWEEN start_date::DATE AND {end}), false)",
        "objections": f"NOT (recorded_date::DATE BETWEEN {start} AND {end})"
        f" OR coalesce(withdrawn_date::DATE <= recorded_date::DATE OR withdrawn_date::DATE > {end}, false)",
    }
    for name, bad in checks.items():
        assert one(con, f"SELECT count(*) FROM {name} WHERE {bad}") == 0, name
    assert one(con, "SELECT count(*) FROM social_care WHERE end_date IS NULL") > 0  # ongoing services


def test_output_meets_the_contracts_except_for_exactly_the_injected_defects(small: tuple[float, Drop]) -> None:
    """Clean rows pass every compiled contract rule; a defective row fails at least one.

    One defect per defective row, so failing rows = round(rate * rows) exactly.
    """
    rate, drop = small
    for name, failing in failing_rows(drop.con).items():
        expected = round(rate * drop.counts[name]) if name in DEFECT_COLLECTIONS else 0
        assert failing == expected, (name, rule_failures(drop.con, name))


# --- defects -------------------------------------------------------------------------------


def test_every_kind_of_defect_appears(defective: Drop) -> None:
    con = defective.con
    today = "current_date"
    gp = {
        "bad check digit": f"NOT coalesce({nhs_valid_sql(CANON)}, true)",
        "unknown code": "diagnosis_code NOT IN (SELECT unnest(?))",
        "before birth": "try_cast(event_date AS DATE) < try_cast(date_of_birth AS DATE)",
        "future": f"try_cast(event_date AS DATE) > {today}",
        "unparseable": "event_date IS NOT NULL AND try_cast(event_date AS DATE) IS NULL",
        "missing": "nhs_number IS NULL OR event_date IS NULL OR diagnosis_code IS NULL OR date_of_birth IS NULL",
    }
    snomed = sorted(codes("snomed_gp_diagnoses"))
    for kind, predicate in gp.items():
        params = [snomed] if "?" in predicate else []
        assert con.execute(f"SELECT count(*) FROM gp_events WHERE {predicate}", params).fetchone()[0] > 0, kind  # type: ignore[index]
    hospital_backwards = "try_cast(discharge_date AS DATE) < try_cast(admission_date AS DATE)"
    assert one(con, f"SELECT count(*) FROM hospital_episodes WHERE {hospital_backwards}") > 0
    assert (
        one(con, "SELECT count(*) FROM social_care WHERE try_cast(end_date AS DATE) < try_cast(start_date AS DATE)") > 0
    )


def test_rate_one_makes_every_row_defective(tmp_path: Path) -> None:
    counts = generate(tmp_path, 100, seed=2, defect_rate=1.0, period_end=PERIOD_END)
    for name, failing in failing_rows(connect(tmp_path)).items():
        assert failing == (counts[name] if name in DEFECT_COLLECTIONS else 0), name


# --- volumes, linkage, objections ----------------------------------------------------------


def test_volumes_per_patient(clean: Drop) -> None:
    counts = clean.counts
    assert 6.5 < counts["gp_events"] / PATIENTS < 8.5
    assert 1.6 < counts["hospital_episodes"] / PATIENTS < 2.4
    assert 0.4 < counts["social_care"] / PATIENTS < 0.6
    admitted = one(clean.con, f"SELECT count(DISTINCT {CANON}) FROM hospital_episodes")
    assert admitted < PATIENTS / 2  # most patients have no episode


def test_at_least_three_practices_for_200_patients(tmp_path: Path) -> None:
    generate(tmp_path, 200, seed=1, defect_rate=0.0, period_end=PERIOD_END)
    con = connect(tmp_path)
    sizes = [
        r[0]
        for r in con.execute(
            f"SELECT count(DISTINCT {CANON}) FROM gp_events GROUP BY practice_code ORDER BY 1"
        ).fetchall()
    ]
    assert len(sizes) >= 3


def test_practice_list_sizes_at_national_scale() -> None:
    """About 2k-20k patients a practice (lognormal, clipped), with one mid-sized outlier."""
    cal = _Calendar.build(PERIOD_END)
    pop = _population(np.random.default_rng(0), 300_000, cal, load_code_list("ons_local_authorities"))
    sizes = np.bincount(pop.practice)
    assert len(sizes) == round(300_000 / 8_500)
    assert sizes.min() > 1_500 and sizes.max() < 21_000 and sizes.max() > 3 * sizes.min()
    assert sizes.min() < sizes[pop.outlier_practice] < sizes.max()


def test_hospital_patients_appear_in_social_care_after_discharge(clean: Drop) -> None:
    con = clean.con
    admitted, linked = con.execute(
        f"""
        WITH h AS (SELECT {CANON} AS k, discharge_date::DATE AS discharged FROM hospital_episodes),
             s AS (SELECT {CANON} AS k, start_date::DATE AS started FROM social_care)
        SELECT count(DISTINCT h.k),
               count(DISTINCT h.k) FILTER (WHERE s.started BETWEEN h.discharged AND h.discharged + 14)
        FROM h LEFT JOIN s USING (k)
        """
    ).fetchone()  # type: ignore[misc]
    assert linked > 0.08 * admitted


def test_objections_rates_outlier_and_withdrawals(clean: Drop) -> None:
    con = clean.con
    rates = con.execute(
        f"""
        WITH reg AS (SELECT DISTINCT practice_code, {CANON} AS k FROM gp_events),
             t1 AS (SELECT source_practice AS practice_code, count(*) AS n FROM objections
                    WHERE objection_type = 'type1' GROUP BY 1)
        SELECT practice_code, coalesce(t1.n, 0) / count(*) AS rate
        FROM reg LEFT JOIN t1 USING (practice_code) GROUP BY practice_code, t1.n ORDER BY rate DESC
        """
    ).fetchall()
    assert rates[0][1] > 0.15  # the outlier practice, about 25%
    assert all(rate < 0.06 for _, rate in rates[1:])  # everyone else about 2%
    opt_out, withdrawn, total = con.execute(
        "SELECT count(*) FILTER (WHERE objection_type = 'national_opt_out'),"
        " count(*) FILTER (WHERE withdrawn_date IS NOT NULL), count(*) FROM objections"
    ).fetchone()  # type: ignore[misc]
    assert 0.035 * PATIENTS < opt_out < 0.065 * PATIENTS
    assert 0.04 * total < withdrawn < 0.18 * total
    orphan = one(con, "SELECT count(*) FROM objections WHERE objection_type = 'type1' AND source_practice IS NULL")
    assert orphan == 0


# --- API, CLI, limits ----------------------------------------------------------------------


def test_200_patients_generate_quickly(tmp_path: Path) -> None:
    began = time.perf_counter()
    counts = generate(tmp_path, 200, seed=3, period_end=PERIOD_END)
    assert time.perf_counter() - began < 5.0
    assert counts["gp_events"] > 0


def test_cli_writes_an_incoming_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--patients", "150", "--seed", "4", "--out", str(tmp_path), "--period-end", "2024-03-31"]
    assert main([*argv, "--defect-rate", "0", "--format", "parquet"]) == 0
    assert "gp_events:" in capsys.readouterr().out
    assert all(path_of(tmp_path, name, "parquet").exists() for name in COLUMNS)
    with pytest.raises(SystemExit):
        main(["--patients", str(MAX_PATIENTS + 1), "--out", str(tmp_path)])


def test_refuses_more_patients_than_test_numbers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="999 test range"):
        generate(tmp_path, MAX_PATIENTS + 1)
    with pytest.raises(ValueError):
        generate(tmp_path, 10, fmt="xlsx")
    assert len(_test_number_space()[0]) == MAX_PATIENTS


def test_default_period_end_is_last_day_of_previous_month() -> None:
    assert default_period_end(date(2024, 3, 15)) == date(2024, 2, 29)
    assert default_period_end(date(2024, 1, 1)) == date(2023, 12, 31)
    assert period_start(date(2024, 2, 29)) == date(2023, 3, 1)


@given(st.integers(min_value=0, max_value=MAX_PATIENTS - 1))
def test_test_number_space_agrees_with_check_digit(i: int) -> None:
    prefixes, checks = _test_number_space()
    prefix = str(prefixes[i])
    assert prefix.startswith("999")
    assert check_digit(prefix) == checks[i]
