"""Declared outputs: loading, the reporting period, the full grid, protection on crafted data.

Rules under test: ``safehaven.publish.outputs`` module docstring (CoP 28-29, 34b, 35; ISB 1523) and
``safehaven.publish.disclosure`` (its rules applied to declared outputs, end to end in the store's SQL).
"""

from __future__ import annotations

from datetime import date

import duckdb
import pytest
import yaml

from safehaven.intake.contracts import ContractRegistry
from safehaven.publish.disclosure import Policy, check_invariants, true_range
from safehaven.publish.disclosure.policy import THRESHOLD
from safehaven.publish.outputs import (
    MACROS,
    Output,
    OutputError,
    build_output,
    install_helpers,
    load_code_lists,
    load_output,
    load_outputs,
    outputs_dir,
    reporting_period,
)
from safehaven.share.agreements import load_agreements

TODAY = date(2026, 3, 15)  # reporting period ends 2026-02-28


@pytest.fixture(scope="module")
def registry() -> ContractRegistry:
    return ContractRegistry()


def haven_store() -> duckdb.DuckDBPyConnection:
    """An in-memory store with the zones an output reads and writes, and two haven tables."""
    c = duckdb.connect()
    for schema in ("haven", "published", "governance"):
        c.execute(f"CREATE SCHEMA {schema}")
    c.execute(
        "CREATE TABLE haven.hospital_episodes (pid VARCHAR, provider_code VARCHAR, admission_date DATE, "
        "discharge_date DATE, primary_diagnosis VARCHAR)"
    )
    c.execute(
        "CREATE TABLE haven.social_care (pid VARCHAR, local_authority_code VARCHAR, service_type VARCHAR, "
        "start_date DATE, end_date DATE)"
    )
    return c


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    c = haven_store()
    yield c
    c.close()


def admit(con: duckdb.DuckDBPyConnection, people: int, provider: str, day: str, icd: str, tag: str = "") -> None:
    """``people`` distinct people admitted on ``day`` at ``provider`` with ``icd``."""
    con.execute(
        "INSERT INTO haven.hospital_episodes SELECT md5(? || ? || ? || ? || i::VARCHAR), ?, CAST(? AS DATE), "
        "CAST(? AS DATE) + 2, ? FROM range(?) t(i)",
        [tag, provider, day, icd, provider, day, day, icd, people],
    )


def admissions(name: str = "adm", where: str = "TRUE", **extra: object) -> Output:
    spec = {
        "name": name,
        "version": "1.0.0",
        "title": "People admitted",
        "description": "Distinct people admitted in the month.",
        "purpose": "A test output for the rules of safehaven.publish.outputs.",
        "users": ["tests"],
        "collections": ["hospital_episodes"],
        "dimensions": [
            {"name": "month", "description": "month", "domain": "reporting_months"},
            {"name": "provider_code", "description": "provider", "domain": "observed"},
            {"name": "chapter", "description": "chapter", "domain": {"values": ["A", "B", "C"]}},
        ],
        "measures": [{"name": "people", "description": "people"}],
        "zeros": {"publish": True, "structural": []},
        "sql": f"""SELECT m.month, h.provider_code, left(h.primary_diagnosis, 1) AS chapter,
                          count(DISTINCT h.pid) AS people
                   FROM haven.hospital_episodes h
                   JOIN reporting_months m ON h.admission_date BETWEEN m.month AND m.month_end
                   WHERE {where} GROUP BY ALL""",
    }
    spec.update(extra)
    return Output.model_validate(spec)


def rows(con: duckdb.DuckDBPyConnection, table: str) -> dict[tuple, tuple]:
    return {
        (r[0].isoformat(), r[1], r[2]): (r[3], r[4])
        for r in con.execute(f"SELECT month, provider_code, chapter, people, suppressed FROM {table}").fetchall()
    }


# --- declarations ------------------------------------------------------------------------


def test_the_declared_outputs_load_and_name_their_collections(registry: ContractRegistry) -> None:
    outputs = load_outputs(registry)
    assert {"gp_activity", "hospital_admissions", "social_care_users", "discharge_to_social_care"} <= set(outputs)
    for output in outputs.values():
        assert output.measures[0].kind == "count"
        assert output.purpose and output.users, "relevance needs a purpose and users"
        assert set(output.collections) <= set(registry.contracts)
        assert not output.totals, "distinct people do not add up: no output publishes totals"


def test_the_linked_output_is_named_by_its_agreement(registry: ContractRegistry) -> None:
    linked = [o for o in load_outputs(registry).values() if o.linkage]
    assert linked, "at least one linked statistic"
    agreements = load_agreements(registry.root)
    for output in linked:
        assert output.linkage is not None
        agreement = agreements[output.linkage.agreement]
        assert agreement.identifiability == "anonymised"
        assert agreement.names_linkage(output.linkage.left, output.linkage.right)


def test_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="first measure"):
        admissions(
            measures=[{"name": "d", "kind": "denominator", "description": "x"}, {"name": "people", "description": "x"}]
        )
    with pytest.raises(ValueError, match="must all differ"):
        admissions(measures=[{"name": "chapter", "description": "x"}])
    with pytest.raises(ValueError, match="needs a denominator"):
        admissions(
            measures=[
                {"name": "people", "description": "x"},
                {"name": "rate", "kind": "rate", "description": "x", "denominator": "nope"},
            ]
        )
    with pytest.raises(ValueError, match="linkage joins two of the output"):
        admissions(
            linkage={
                "agreement": "a",
                "left": "hospital_episodes",
                "right": "social_care",
                "purpose": "a purpose long enough",
            }
        )
    with pytest.raises(ValueError, match="domain"):
        admissions(dimensions=[{"name": "month", "description": "m", "domain": {"values": ["x"], "sql": "y"}}])


def test_midpoint6_outputs_name_their_counts_and_publish_on_its_grid(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    with pytest.raises(ValueError, match="_midpoint6"):
        admissions(policy={"rounding": "midpoint6"})
    out = admissions(
        policy={"rounding": "midpoint6"},
        measures=[{"name": "people_midpoint6", "description": "people"}],
        sql=admissions().sql.replace("AS people", "AS people_midpoint6"),
    )
    for n, icd in ((8, "A01"), (13, "B01"), (40, "C01")):
        admit(con, n, "RX1", "2026-01-10", icd)
    built = build_output(con, out, registry, today=TODAY)
    got = con.execute(f"SELECT chapter, people_midpoint6 FROM {built.table} WHERE month = DATE '2026-01-01'").fetchall()
    assert dict(got) == {"A": 9, "B": 15, "C": 39}
    assert built.violations == []


def test_a_file_must_be_named_after_its_output(tmp_path, registry: ContractRegistry) -> None:
    source = outputs_dir(registry.root) / "hospital_admissions.yaml"
    (tmp_path / "other.yaml").write_text(source.read_text())
    with pytest.raises(OutputError, match="file name"):
        load_output(tmp_path / "other.yaml")


def test_an_output_below_the_havens_suppression_floor_is_refused_naming_the_file(
    tmp_path, registry: ContractRegistry
) -> None:
    """Every check (invariants, guard, audit) reads the threshold from the definition it protects,
    so a definition may raise the floor of suppressed counts, never lower it: ``threshold: 0`` in
    an output's YAML published a cell of 3 people as 5 (found by review)."""
    spec = yaml.safe_load((outputs_dir(registry.root) / "gp_activity.yaml").read_text())
    for lowered in (0, THRESHOLD - 1):
        spec["policy"]["threshold"] = lowered
        (tmp_path / "gp_activity.yaml").write_text(yaml.safe_dump(spec))
        with pytest.raises(OutputError, match=r"gp_activity\.yaml: policy\.threshold"):
            load_output(tmp_path / "gp_activity.yaml")
    spec["policy"]["threshold"] = THRESHOLD + 3
    (tmp_path / "gp_activity.yaml").write_text(yaml.safe_dump(spec))
    assert load_output(tmp_path / "gp_activity.yaml").disclosure_policy.threshold == THRESHOLD + 3


# --- zeros: a stated policy, sampling vs structural (module docstring, "Zeros") ---------------

STRUCTURAL_RY2_C = {"match": {"provider_code": "RY2", "chapter": "C"}, "reason": "RY2 has no chapter C service"}


def test_an_output_that_does_not_state_its_zeros_policy_is_refused_naming_the_file_and_the_key(
    tmp_path, registry: ContractRegistry
) -> None:
    spec = yaml.safe_load((outputs_dir(registry.root) / "gp_activity.yaml").read_text())
    del spec["zeros"]
    (tmp_path / "gp_activity.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(OutputError, match=r"gp_activity\.yaml: .*missing key zeros") as refused:
        load_output(tmp_path / "gp_activity.yaml")
    assert "\n" not in str(refused.value), "one line"
    spec["zeros"] = {"publish": True}
    (tmp_path / "gp_activity.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(OutputError, match=r"gp_activity\.yaml: zeros\.structural"):
        load_output(tmp_path / "gp_activity.yaml")


def test_the_zeros_policy_is_stated_once_and_sets_the_suppression_of_sampling_zeros() -> None:
    with pytest.raises(ValueError, match="zeros.publish"):
        admissions(policy={"suppress_zeros": True})
    assert admissions().disclosure_policy.suppress_zeros is False
    assert admissions(zeros={"publish": False, "structural": []}).disclosure_policy.suppress_zeros is True
    with pytest.raises(ValueError, match="names dimensions this output does not have"):
        admissions(zeros={"publish": True, "structural": [{"match": {"sex": "Male"}, "reason": "no such dimension"}]})


def test_every_declared_output_states_its_zeros_policy(registry: ContractRegistry) -> None:
    for output in load_outputs(registry).values():
        assert output.zeros.publish, f"{output.name}: sampling zeros are published (a zero describes nobody)"
        assert output.zeros.structural == [], f"{output.name}: no impossible combination in its dimensions"


def test_structural_zeros_are_not_cells_of_the_grid_and_are_reported(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    """In January RY2 has 3 people in A and nobody in B or C: B is a sampling zero, C a structural
    zero. Without the declaration C could be B's fellow zero; with it, C is no cell at all and
    the secondary suppression falls on B, the only zero left in the row."""
    admit(con, 40, "RX1", "2026-01-10", "A01")
    admit(con, 3, "RY2", "2026-01-10", "A01")
    admit(con, 50, "RY2", "2026-02-10", "A01")
    out = admissions(zeros={"publish": True, "structural": [STRUCTURAL_RY2_C]})
    built = build_output(con, out, registry, today=TODAY)
    got = rows(con, built.table)
    assert not [k for k in got if k[1:] == ("RY2", "C")], "a structural zero is not a row"
    assert len(got) == built.grid_cells == 2 * 2 * 3 - 2
    assert built.structural.as_dict() == {
        "declared": [
            {"match": "provider_code=RY2, chapter=C", "reason": "RY2 has no chapter C service", "cells_removed": 2}
        ],
        "cells_removed": 2,
    }
    assert got[("2026-01-01", "RY2", "A")] == (None, True)
    assert got[("2026-01-01", "RY2", "B")] == (None, True), "the secondary is the sampling zero"
    assert built.report.cells == len(got) and built.violations == []
    assert built.as_metadata()["structural_zero_cells"] == 2


def test_structural_zeros_match_months_and_lists_of_values(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    admit(con, 40, "RX1", "2026-01-10", "A01")
    admit(con, 40, "RY2", "2026-02-10", "A01")
    zero = {"match": {"month": date(2026, 1, 1), "chapter": ["B", "C"]}, "reason": "no B or C service in January"}
    built = build_output(con, admissions(zeros={"publish": True, "structural": [zero]}), registry, today=TODAY)
    got = rows(con, built.table)
    assert {k[2] for k in got if k[0] == "2026-01-01"} == {"A"}
    assert built.structural.cells_removed == 2 * 2  # two providers, two chapters, one month


def test_a_structural_zero_with_people_in_it_refuses_the_output(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    admit(con, 40, "RX1", "2026-01-10", "A01")
    admit(con, 20, "RY2", "2026-01-10", "A01")  # RY2 held by enough people to be a published label
    admit(con, 2, "RY2", "2026-01-10", "C01")  # people where the declaration says none can be
    out = admissions(zeros={"publish": True, "structural": [STRUCTURAL_RY2_C]})
    with pytest.raises(OutputError, match=r"adm: declared structural zero.*provider_code=RY2, chapter=C"):
        build_output(con, out, registry, today=TODAY)
    assert not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE '_true_%'").fetchone()[0]
    assert not con.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'published'").fetchone()[0]


def test_a_structural_zero_naming_a_value_the_dimension_lacks_is_refused(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    """A misspelt declaration removes nothing, so the impossible cells it meant would be treated
    as sampling zeros: refused when the output loads (a listed domain) or builds (a code list)."""
    with pytest.raises(ValueError, match=r"names chapter=D, not a value of that dimension \(A, B, C\)"):
        admissions(zeros={"publish": True, "structural": [{"match": {"chapter": "D"}, "reason": "misspelt: no D"}]})

    load_code_lists(con, registry)
    admit(con, 40, "RX1", "2026-01-10", "A09")
    by_code = admissions(
        dimensions=[
            {"name": "month", "description": "month", "domain": "reporting_months"},
            {"name": "provider_code", "description": "provider", "domain": "observed"},
            {"name": "icd", "description": "category", "domain": {"code_list": "icd10", "field": "code"}},
        ],
        sql="""SELECT m.month, h.provider_code, left(h.primary_diagnosis, 3) AS icd, count(DISTINCT h.pid) AS people
               FROM haven.hospital_episodes h
               JOIN reporting_months m ON h.admission_date BETWEEN m.month AND m.month_end GROUP BY ALL""",
        zeros={"publish": True, "structural": [{"match": {"icd": ["A08", "A0S"]}, "reason": "a typo for A09"}]},
    )
    with pytest.raises(OutputError, match=r"adm: declared structural zero icd=A08\|A0S names icd=A0S, which is not"):
        build_output(con, by_code, registry, today=TODAY)
    assert not con.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'published'").fetchone()[0]


# --- reporting period ----------------------------------------------------------------------


def test_reporting_period_is_whole_months_and_stops_before_the_current_month(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    admit(con, 10, "RX1", "2025-11-20", "A01")
    admit(con, 10, "RX1", "2026-02-03", "A01")
    admit(con, 4, "RX1", "2026-03-02", "A01")  # the month of the run: held back
    period = reporting_period(con, admissions(), registry, TODAY)
    assert (period.start, period.end, period.months) == (date(2025, 11, 1), date(2026, 2, 28), 4)
    assert period.after_end == {"hospital_episodes": 4}
    load_code_lists(con, registry)
    install_helpers(con, period)
    months = con.execute("SELECT month, month_end FROM reporting_months ORDER BY 1").fetchall()
    assert months[0] == (date(2025, 11, 1), date(2025, 11, 30))
    assert months[-1] == (date(2026, 2, 1), date(2026, 2, 28))


def test_age_band_is_completed_years(con: duckdb.DuckDBPyConnection, registry: ContractRegistry) -> None:
    load_code_lists(con, registry)
    install_helpers(con, reporting_period(con, admissions(), registry, TODAY))
    assert set(MACROS) >= {"age_band", "codes", "sex_category"}
    got = con.execute(
        "SELECT age_band(DATE '2008-03-02', DATE '2026-03-01'), age_band(DATE '2008-03-01', DATE '2026-03-01'), "
        "age_band(DATE '1941-01-01', DATE '2026-01-01')"
    ).fetchone()
    assert got == ("0-17", "18-44", "85+")


#: The scalar lookups the outputs used before lookups became joins (module docstring, "Helpers"):
#: one correlated subquery per row. The tests below prove the joins give the same groups.
FORMER_MACROS = {
    "code_group": "(list_name, c) AS (SELECT grp FROM governance.code_list WHERE list = list_name AND code = c)",
    "sex_group": (
        "(c) AS CASE (SELECT grp FROM governance.code_list WHERE list = 'person_gender' AND code = c) "
        "WHEN 'Male' THEN 'Male' WHEN 'Female' THEN 'Female' ELSE 'Not known' END"
    ),
}
FORMER_SQL = {
    "gp_activity": """SELECT m.month, e.practice_code,
        coalesce(code_group('snomed_gp_diagnoses', e.diagnosis_code), 'Unknown') AS diagnosis_group,
        age_band(e.birth_week, m.month) AS age_band, sex_group(e.sex) AS sex, count(DISTINCT e.pid) AS people
        FROM haven.gp_events e JOIN reporting_months m ON e.event_date BETWEEN m.month AND m.month_end
        GROUP BY ALL""",
    "hospital_admissions": """SELECT m.month, h.provider_code,
        coalesce(code_group('icd10', upper(left(h.primary_diagnosis, 3))), 'Unknown') AS diagnosis_chapter,
        count(DISTINCT h.pid) AS people
        FROM haven.hospital_episodes h JOIN reporting_months m ON h.admission_date BETWEEN m.month AND m.month_end
        GROUP BY ALL""",
}


def test_a_code_lookup_join_gives_the_groups_of_the_former_scalar_lookup(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    load_code_lists(con, registry)
    install_helpers(con, reporting_period(con, admissions(), registry, TODAY))
    for name, body in FORMER_MACROS.items():
        con.execute(f"CREATE TEMP MACRO {name}{body}")
    con.execute("CREATE TEMP TABLE probe (list VARCHAR, v VARCHAR)")
    con.execute(
        "INSERT INTO probe VALUES ('snomed_gp_diagnoses', '38341003'), ('snomed_gp_diagnoses', '0000000'), "
        "('snomed_gp_diagnoses', NULL), ('icd10', 'A09'), ('icd10', 'a09'), ('icd10', 'Z99'), ('icd10', NULL), "
        "('person_gender', '0'), ('person_gender', '1'), ('person_gender', '2'), ('person_gender', '9'), "
        "('person_gender', '7'), ('person_gender', NULL)"
    )
    for code_list in ("snomed_gp_diagnoses", "icd10", "person_gender"):
        joined = con.execute(
            f"SELECT t.v, coalesce(c.grp, 'Unknown'), sex_category(c.grp) FROM probe t "
            f"LEFT JOIN codes('{code_list}') c ON c.code = t.v WHERE t.list = '{code_list}' ORDER BY ALL"
        ).fetchall()
        former = con.execute(
            f"SELECT v, coalesce(code_group('{code_list}', v), 'Unknown'), "
            f"CASE code_group('{code_list}', v) WHEN 'Male' THEN 'Male' WHEN 'Female' THEN 'Female' "
            f"ELSE 'Not known' END FROM probe WHERE list = '{code_list}' ORDER BY ALL"
        ).fetchall()
        assert joined == former, code_list
    groups = dict(
        con.execute(
            "SELECT t.v, coalesce(c.grp, 'Unknown') FROM probe t LEFT JOIN codes('icd10') c ON c.code = t.v "
            "WHERE t.list = 'icd10'"
        ).fetchall()
    )
    assert groups["A09"] == "I Certain infectious and parasitic diseases"
    assert groups["a09"] == groups["Z99"] == groups[None] == "Unknown", "codes not in the list, and NULL"
    sexes = dict(
        con.execute(
            "SELECT t.v, sex_category(c.grp) FROM probe t LEFT JOIN codes('person_gender') c ON c.code = t.v "
            "WHERE t.list = 'person_gender'"
        ).fetchall()
    )
    assert sexes == dict(con.execute("SELECT v, sex_group(v) FROM probe WHERE list = 'person_gender'").fetchall())
    assert sexes == {
        "0": "Not known",
        "1": "Male",
        "2": "Female",
        "9": "Not known",
        "7": "Not known",
        None: "Not known",
    }


@pytest.mark.parametrize("name", sorted(FORMER_SQL))
def test_declared_outputs_count_the_cells_of_their_former_scalar_lookups_and_range_joins(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry, name: str
) -> None:
    """Edge cases: month boundaries, the held-back month, codes not in the list, NULL codes and sexes."""
    con.execute(
        "CREATE TABLE haven.gp_events (pid VARCHAR, practice_code VARCHAR, birth_week DATE, sex VARCHAR, "
        "event_date DATE, diagnosis_code VARCHAR)"
    )
    days = ["2025-11-01", "2025-11-30", "2025-12-31", "2026-01-01", "2026-02-28", "2026-03-01", "2026-03-14"]
    codes = ["38341003", "195967001", "0000000", None]
    sexes = ["0", "1", "2", "9", "7", None]
    con.execute(
        "INSERT INTO haven.gp_events SELECT 'p' || (i % 37), 'A8' || (i % 3), "
        "DATE '1940-01-01' + CAST(1000 * (i % 31) AS INTEGER), s.v, CAST(d.v AS DATE), c.v "
        "FROM range(40) r(i), unnest(?) d(v), unnest(?) c(v), unnest(?) s(v) "
        "WHERE (i + length(coalesce(c.v, '')) + length(coalesce(s.v, ''))) % 2 = 0",
        [days, codes, sexes],
    )
    for i, day in enumerate(days):
        for icd in ("A09", "a09x", "I10", "Z99", None):
            admit(con, 3 + i, f"R{i % 2}", day, icd, tag=str(icd))
    output = load_outputs(registry)[name]
    load_code_lists(con, registry)
    install_helpers(con, reporting_period(con, output, registry, TODAY))
    for macro, body in FORMER_MACROS.items():
        con.execute(f"CREATE TEMP MACRO {macro}{body}")
    con.execute(f"CREATE TEMP TABLE now AS {output.sql}")
    con.execute(f"CREATE TEMP TABLE former AS {FORMER_SQL[name]}")
    assert con.execute("DESCRIBE now").fetchall() == con.execute("DESCRIBE former").fetchall()
    now = con.execute("SELECT * FROM now ORDER BY ALL").fetchall()
    assert now == con.execute("SELECT * FROM former ORDER BY ALL").fetchall()
    assert len(now) > 10
    groups = {r[2] for r in now}
    assert "Unknown" in groups and len(groups) >= 3
    months = {r[0] for r in now}
    assert months == {date(2025, 11, 1), date(2025, 12, 1), date(2026, 1, 1), date(2026, 2, 1)}


# --- full grid and protection ------------------------------------------------------------


def test_full_grid_publishes_missing_cells_as_true_zeros(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    admit(con, 30, "RX1", "2026-01-10", "A01")
    admit(con, 40, "RY2", "2026-02-10", "B01")
    built = build_output(con, admissions(), registry, today=TODAY)
    got = rows(con, built.table)
    assert len(got) == built.grid_cells == 2 * 2 * 3  # months x providers seen x chapters
    assert got[("2026-02-01", "RX1", "A")] == (0, False)
    assert got[("2026-01-01", "RX1", "A")] == (30, False)
    assert built.violations == []


def test_single_small_cell_in_a_row_gets_a_secondary_and_one_public_marker(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    admit(con, 3, "RX1", "2026-01-10", "A01")
    admit(con, 40, "RX1", "2026-01-10", "B01")
    admit(con, 52, "RX1", "2026-01-10", "C01")
    built = build_output(con, admissions(), registry, today=TODAY)
    got = rows(con, built.table)
    assert got[("2026-01-01", "RX1", "A")] == (None, True)
    assert got[("2026-01-01", "RX1", "B")] == (None, True), "the smallest other cell protects it"
    assert got[("2026-01-01", "RX1", "C")] == (50, False)
    types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE {built.table})").fetchall())
    assert types["suppressed"] == "BOOLEAN", "the kind of suppression is never published"
    assert built.report.primary == 1 and built.report.secondary == 1
    assert check_invariants(con, built.table, ["month", "provider_code", "chapter"]) == []


def test_two_small_cells_and_a_small_margin(con: duckdb.DuckDBPyConnection, registry: ContractRegistry) -> None:
    admit(con, 2, "RX1", "2026-01-10", "A01")
    admit(con, 5, "RX1", "2026-01-10", "B01")
    admit(con, 60, "RX1", "2026-01-10", "C01")
    admit(con, 30, "RY2", "2026-01-10", "C01")  # RY2 is held by enough people to be a label
    admit(con, 1, "RY2", "2026-02-10", "A01")  # RY2's whole February row is one person
    built = build_output(con, admissions(), registry, today=TODAY)
    got = rows(con, built.table)
    assert got[("2026-01-01", "RX1", "A")][1] and got[("2026-01-01", "RX1", "B")][1]
    assert got[("2026-01-01", "RX1", "C")] == (60, False), "two small cells protect each other"
    ry2 = [v for k, v in got.items() if k[:2] == ("2026-02-01", "RY2")]
    assert sum(1 for v in ry2 if v[1]) >= 2, "a lone small cell in a row of zeros takes a zero with it"
    assert built.violations == []


def test_a_differencing_pair_of_one_release_never_pins_a_small_count(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    """Table A over all providers, table B without one: A - B bounds the excluded count only."""
    for provider, n in (("RX1", 41), ("RY2", 37), ("RZ3", 3)):
        admit(con, n, provider, "2026-01-10", "A01", tag=provider)
    all_providers = admissions(
        "all_providers",
        dimensions=[
            {"name": "month", "description": "m", "domain": "reporting_months"},
            {"name": "chapter", "description": "c", "domain": {"values": ["A"]}},
        ],
        sql="""SELECT m.month, left(primary_diagnosis, 1) AS chapter, count(DISTINCT pid) AS people
              FROM haven.hospital_episodes h JOIN reporting_months m
                ON h.admission_date BETWEEN m.month AND m.month_end {where} GROUP BY ALL""".format(where=""),
    )
    without = all_providers.model_copy(
        update={
            "name": "without_rz3",
            "sql": all_providers.sql.replace("GROUP BY ALL", "WHERE provider_code <> 'RZ3' GROUP BY ALL"),
        }
    )
    a = build_output(con, all_providers, registry, today=TODAY)
    b = build_output(con, without, registry, today=TODAY)
    pa = con.execute(f"SELECT people FROM {a.table} WHERE month = DATE '2026-01-01'").fetchone()[0]
    pb = con.execute(f"SELECT people FROM {b.table} WHERE month = DATE '2026-01-01'").fetchone()[0]
    assert pa is not None and pb is not None
    (alo, ahi), (blo, bhi) = true_range(pa, Policy()), true_range(pb, Policy())
    window = [t for t in range(max(0, alo - bhi), ahi - blo + 1)]
    assert 3 in window and len(window) >= 5, "the excluded provider's 3 people are not pinned"


def test_cells_outside_the_declared_grid_and_null_dimensions_are_refused(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    admit(con, 10, "RX1", "2026-01-10", "Z01")
    with pytest.raises(OutputError, match="outside the declared domains"):
        build_output(
            con,
            admissions(
                dimensions=[
                    {"name": "month", "description": "m", "domain": "reporting_months"},
                    {"name": "provider_code", "description": "p", "domain": "observed"},
                    {"name": "chapter", "description": "c", "domain": {"sql": "SELECT 'A'"}},
                ]
            ),
            registry,
            today=TODAY,
        )
    with pytest.raises(OutputError, match="NULL dimension"):
        build_output(
            con,
            admissions(sql=admissions().sql.replace("left(h.primary_diagnosis, 1)", "CAST(NULL AS VARCHAR)")),
            registry,
            today=TODAY,
        )


@pytest.mark.parametrize("domain", [{"values": ["A", "B", "C"]}, {"code_list": "icd10", "field": "group"}])
def test_a_values_or_code_list_domain_is_exactly_its_declared_values(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry, domain: dict
) -> None:
    """Found by review: a ``values`` or ``code_list`` domain was its declared values UNION the values
    the SQL emitted, so SQL giving an exact admission date for the chapter published a lone person's
    date as a row label and the "outside the declared domains" refusal never fired. Such a domain is
    exactly its declared values: a cell outside them refuses the build and nothing is published."""
    admit(con, 40, "RX1", "2026-01-10", "A01")
    admit(con, 1, "RX1", "2026-01-17", "A01", tag="lone")
    dims = [
        {"name": "month", "description": "month", "domain": "reporting_months"},
        {"name": "provider_code", "description": "provider", "domain": {"values": ["RX1"]}},
        {"name": "chapter", "description": "chapter", "domain": domain},
    ]
    sql = admissions().sql.replace(
        "left(h.primary_diagnosis, 1) AS chapter", "strftime(h.admission_date, '%d %b %Y') AS chapter"
    )
    with pytest.raises(OutputError, match="adm: 2 cell\\(s\\) fall outside the declared domains") as refused:
        build_output(con, admissions(sql=sql, dimensions=dims), registry, today=TODAY)
    assert "Jan" not in str(refused.value), "never a value"
    assert published_tables(con) == 0


def test_a_code_list_domain_declares_the_values_besides_its_list_and_they_are_rows_of_the_grid(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    """A code list's ``also`` values (``Unknown`` for a code not in the list) are declared rows: present
    whether or not anyone has such a code, and the only values the SQL may add to the list's."""
    admit(con, 40, "RX1", "2026-01-10", "A09")
    sql = admissions().sql.replace(
        "left(h.primary_diagnosis, 1) AS chapter",
        "coalesce((SELECT grp FROM codes('icd10') c WHERE c.code = h.primary_diagnosis), 'Unknown') AS chapter",
    )
    dims = [
        {"name": "month", "description": "month", "domain": "reporting_months"},
        {"name": "provider_code", "description": "provider", "domain": {"values": ["RX1"]}},
        {
            "name": "chapter",
            "description": "chapter",
            "domain": {"code_list": "icd10", "field": "group", "also": ["Unknown"]},
        },
    ]
    built = build_output(con, admissions(sql=sql, dimensions=dims), registry, today=TODAY)
    chapters = {r[0] for r in con.execute(f"SELECT DISTINCT chapter FROM {built.table}").fetchall()}
    assert "Unknown" in chapters and "I Certain infectious and parasitic diseases" in chapters
    with pytest.raises(ValueError, match="only a code_list domain declares also"):
        admissions(dimensions=[{"name": "month", "description": "m", "domain": {"values": ["x"], "also": ["y"]}}])


def test_a_linked_output_needs_its_agreement(con: duckdb.DuckDBPyConnection, registry: ContractRegistry) -> None:
    linked = load_outputs(registry)["discharge_to_social_care"]
    with pytest.raises(OutputError, match="authorised the linkage"):
        build_output(con, linked, registry, today=TODAY)
    with pytest.raises(OutputError, match="authorised the linkage"):
        build_output(con, linked, registry, today=TODAY, agreement_id="some-other-agreement")


def test_an_output_reading_two_collections_without_its_linkage_is_refused_naming_the_file(
    tmp_path, registry: ContractRegistry
) -> None:
    """Found by review: ``discharge_to_social_care.yaml`` with its ``linkage:`` block deleted loaded,
    and its join on pid ran under no agreement. More than one collection needs a linkage naming
    exactly them (a linkage names two collections, so three are always refused)."""
    spec = yaml.safe_load((outputs_dir(registry.root) / "discharge_to_social_care.yaml").read_text())
    linkage = spec.pop("linkage")
    (tmp_path / "discharge_to_social_care.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(
        OutputError, match=r"discharge_to_social_care\.yaml: .*reads 2 collections .*without a linkage naming"
    ) as refused:
        load_output(tmp_path / "discharge_to_social_care.yaml")
    assert "\n" not in str(refused.value) and "add linkage:" in str(refused.value)
    spec["linkage"] = linkage
    spec["collections"] = [*spec["collections"], "gp_events"]
    (tmp_path / "discharge_to_social_care.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(OutputError, match=r"reads 3 collections .*without a linkage naming exactly them"):
        load_output(tmp_path / "discharge_to_social_care.yaml")


def test_a_build_over_two_collections_without_a_linkage_is_refused_whatever_the_caller_passes(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    """Defence in depth: a declaration that reaches the build without its linkage (not through the
    loader) is never counted, and the aggregate stage does not take it for an unlinked output."""
    from safehaven.publish.aggregate import _authorised_agreement

    linked = load_outputs(registry)["discharge_to_social_care"]
    unlinked = linked.model_copy(update={"linkage": None})  # not validated: as if the loader were bypassed
    admit(con, 12, "RX1", "2026-01-05", "A01")
    for agreement in (None, linked.linkage.agreement):
        with pytest.raises(OutputError, match="no linkage declared, so no agreement authorises joining them"):
            build_output(con, unlinked, registry, today=TODAY, agreement_id=agreement)
    with pytest.raises(OutputError, match="no linkage declared"):
        _authorised_agreement(con, unlinked, registry)
    assert not con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE schema_name IN ('published', 'counts')"
    ).fetchone()[0]


def test_linked_output_counts_care_within_the_window_only(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    linked = load_outputs(registry)["discharge_to_social_care"]
    admit(con, 12, "RX1", "2026-01-05", "A01", tag="w")  # discharged 2026-01-07
    admit(con, 9, "RX1", "2026-02-20", "A01", tag="later")  # data run to February
    con.execute(
        "INSERT INTO haven.social_care SELECT pid, 'E08000025', 'short_term_reablement', "
        "discharge_date + CAST(i % 20 AS INTEGER), NULL FROM (SELECT pid, discharge_date, "
        "row_number() OVER (ORDER BY pid) AS i FROM haven.hospital_episodes WHERE admission_date < DATE '2026-02-01')"
    )
    con.execute("INSERT INTO haven.social_care VALUES ('someone', 'E08000025', 'day_care', DATE '2026-02-25', NULL)")
    built = build_output(con, linked, registry, today=TODAY, agreement_id=linked.linkage.agreement)
    months = {r[0] for r in con.execute(f"SELECT DISTINCT month FROM {built.table}").fetchall()}
    assert date(2026, 2, 1) not in months, "February's 14-day follow-up runs past the period end"
    cell = con.execute(
        f"SELECT people, local_authority_name, service_type_name FROM {built.table} WHERE month = DATE '2026-01-01' "
        "AND provider_code = 'RX1' AND local_authority_code = 'E08000025' AND service_type = 'short_term_reablement'"
    ).fetchone()
    # i = 1..12 -> care starts 1..12 days after discharge: all 12 within 14 days.
    assert cell == (10, "Birmingham", "Short term support to maximise independence (reablement)")
    assert built.violations == []


# --- observed dimensions: values held by enough people (safehaven.publish.observed) ----------------

#: An observed dimension that is one person's pseudonym (its digits as letters), admission date and
#: diagnosis under a provider's name (found by review: the whole table was one row per person).
PID_AS_PROVIDER = """SELECT m.month,
       translate(h.pid, '0123456789', 'ghijklmnop') || '|' || strftime(h.admission_date, '%d %b %Y') AS provider_code,
       left(h.primary_diagnosis, 1) AS chapter, count(DISTINCT h.pid) AS people
FROM haven.hospital_episodes h
JOIN counting_months m ON m.month = date_trunc('month', h.admission_date)
GROUP BY ALL"""


def published_tables(con: duckdb.DuckDBPyConnection) -> int:
    return con.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'published'").fetchone()[0]


def test_an_observed_dimension_computed_from_pid_is_refused_naming_the_file(
    tmp_path, registry: ContractRegistry
) -> None:
    spec = yaml.safe_load((outputs_dir(registry.root) / "gp_activity.yaml").read_text())
    spec["sql"] = spec["sql"].replace("e.practice_code,", "lower(e.pid) AS practice_code,")
    (tmp_path / "gp_activity.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(
        OutputError, match=r"gp_activity\.yaml: .*observed dimension practice_code is computed from pid"
    ):
        load_output(tmp_path / "gp_activity.yaml")
    with pytest.raises(ValueError, match="observed dimension provider_code is computed from pid"):
        admissions(sql=PID_AS_PROVIDER)


@pytest.mark.parametrize(
    "provider",
    [
        "strftime(h.admission_date, '%d %b %Y')",  # an exact date, as text
        "h.provider_code || '|' || h.primary_diagnosis || strftime(h.admission_date, '%j')",
    ],
)
def test_an_observed_value_held_by_few_people_refuses_the_build_naming_no_value(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry, provider: str
) -> None:
    """Found by review: the dimension values of the grid are published whatever they are (only the
    counts are protected), so an observed value held by one person published that person as a row."""
    for day in range(1, 29):
        admit(con, 2, "RX1", f"2026-01-{day:02d}", "A01")
    out = admissions(sql=admissions().sql.replace("h.provider_code,", f"{provider} AS provider_code,"))
    with pytest.raises(OutputError) as refused:
        build_output(con, out, registry, today=TODAY)
    message = str(refused.value)
    assert message.startswith("adm: observed dimension provider_code has 28 value(s) held by 7 people or fewer")
    assert message.endswith("declare a code list for it, or group rare values in the output's SQL")
    assert "Jan" not in message and "2026" not in message and "RX1" not in message, "never a value"
    assert published_tables(con) == 0


def test_an_observed_value_derived_from_pid_out_of_sight_is_refused_by_the_people_holding_it(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    """A pseudonym rewritten in a CTE is refused when the declaration loads (the column is traced to
    the pid it is computed from), and, should a declaration reach the build without that check, by the
    data: each value is held by one person."""
    admit(con, 40, "RX1", "2026-01-10", "A01")
    hidden = (
        PID_AS_PROVIDER.replace("FROM haven.hospital_episodes h", "FROM person h")
        .replace(
            "SELECT m.month,",
            "WITH person AS (SELECT pid, translate(pid, '0123456789', 'ghijklmnop') AS tag, admission_date, "
            "primary_diagnosis FROM haven.hospital_episodes) SELECT m.month,",
        )
        .replace("translate(h.pid, '0123456789', 'ghijklmnop')", "h.tag")
    )
    with pytest.raises(ValueError, match="observed dimension provider_code is computed from pid"):
        admissions(sql=hidden)
    unchecked = admissions().model_copy(update={"sql": hidden})  # not validated: as if the loader were bypassed
    with pytest.raises(OutputError, match="adm: observed dimension provider_code has 40 value"):
        build_output(con, unchecked, registry, today=TODAY)
    assert published_tables(con) == 0


def test_an_observed_value_the_check_cannot_find_among_the_rows_counted_is_held_by_no_one(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    """Fail closed: values are matched to the people holding them by running the SQL again; a value
    not found that way (here an expression that differs at every run) counts as held by no one."""
    admit(con, 40, "RX1", "2026-01-10", "A01")
    random = admissions().sql.replace("h.provider_code,", "CAST(random() AS VARCHAR) AS provider_code,")
    with pytest.raises(OutputError, match="adm: observed dimension provider_code has 1 value"):
        build_output(con, admissions(sql=random), registry, today=TODAY)
    assert published_tables(con) == 0


def test_an_observed_value_needs_more_distinct_people_over_the_period_than_the_threshold(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    """People, not cells: RZ9's same 5 people in two months fill cells adding to 10 and are refused;
    the threshold's own number of people (counts of 1-7 are suppressed) is too few, one more is not;
    an output that raises its threshold raises the bar."""
    admit(con, 40, "RX1", "2026-01-10", "A01")
    for month in ("2026-01-05", "2026-02-05"):
        con.execute(
            "INSERT INTO haven.hospital_episodes SELECT md5('same' || i::VARCHAR), 'RZ9', CAST(? AS DATE) + j::INT, "
            "CAST(? AS DATE) + j::INT + 2, 'B01' FROM range(5) t(i), range(2) u(j)",
            [month, month],
        )
    with pytest.raises(OutputError, match="provider_code has 1 value"):
        build_output(con, admissions(), registry, today=TODAY)
    admit(con, THRESHOLD - 5, "RZ9", "2026-02-20", "C01")  # seven people in all
    with pytest.raises(OutputError, match="provider_code has 1 value"):
        build_output(con, admissions(), registry, today=TODAY)
    admit(con, 1, "RZ9", "2026-02-21", "C01")  # eight
    built = build_output(con, admissions(), registry, today=TODAY)
    assert {k[1] for k in rows(con, built.table)} == {"RX1", "RZ9"} and built.violations == []
    with pytest.raises(OutputError, match="held by 10 people or fewer"):
        build_output(con, admissions(policy={"threshold": 10}), registry, today=TODAY)


def test_an_observed_dimension_whose_people_cannot_be_counted_is_refused(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    """Fail closed: the people holding a value are counted from the output's own SQL, so SQL in
    which that cannot be done (its count is not of distinct pid, or it drops rows after grouping)
    is refused, saying how to write it."""
    admit(con, 40, "RX1", "2026-01-10", "A01")
    with pytest.raises(ValueError, match="count column people as COUNT"):  # refused earlier, when it loads (sql_gate)
        admissions(sql=admissions().sql.replace("count(DISTINCT h.pid)", "count(*)"))
    having = admissions().sql.replace("GROUP BY ALL", "GROUP BY ALL HAVING count(DISTINCT h.pid) > 0")
    with pytest.raises(OutputError, match="adm: the people holding each value of observed dimension provider_code"):
        build_output(con, admissions(sql=having), registry, today=TODAY)
    assert published_tables(con) == 0


#: The reviewer's self-join: one person's exact admission date from ``h``, the people counted from ``o``.
SELF_JOIN = """SELECT m.month, strftime(h.admission_date, '%d %b %Y') AS provider_code,
       left(h.primary_diagnosis, 1) AS chapter, count(DISTINCT o.pid) AS people
FROM haven.hospital_episodes h
JOIN haven.hospital_episodes o ON o.provider_code = h.provider_code
JOIN reporting_months m ON h.admission_date BETWEEN m.month AND m.month_end
GROUP BY ALL"""
#: The pseudonym, letter-encoded in a CTE, on the self-join.
CTE_SELF_JOIN = """WITH person AS (SELECT pid, translate(pid, '0123456789', 'ghijklmnop') AS tag, provider_code,
                        admission_date, primary_diagnosis FROM haven.hospital_episodes)
SELECT m.month, h.tag AS provider_code, left(h.primary_diagnosis, 1) AS chapter, count(DISTINCT o.pid) AS people
FROM person h JOIN person o ON o.provider_code = h.provider_code
JOIN reporting_months m ON h.admission_date BETWEEN m.month AND m.month_end
GROUP BY ALL"""
#: The last admission date at the row's provider, one person's, as a correlated scalar subquery.
SCALAR_SUBQUERY = admissions().sql.replace(
    "h.provider_code,",
    "(SELECT strftime(max(x.admission_date), '%d %b %Y') FROM haven.hospital_episodes x "
    "WHERE x.provider_code = h.provider_code) AS provider_code,",
)


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        (SELF_JOIN, "reads h.admission_date, a column of h, not of o whose pid is counted"),
        (CTE_SELF_JOIN, "reads h.tag, a column of h, not of o whose pid is counted"),
        (CTE_SELF_JOIN.replace("h.tag AS", "o.tag AS"), "is computed from pid"),
        (SCALAR_SUBQUERY, "contains a subquery"),
    ],
    ids=["self_join", "cte_rename_self_join", "cte_rename", "scalar_subquery"],
)
def test_an_observed_dimension_not_read_from_the_counted_row_is_refused_when_it_loads(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry, sql: str, problem: str
) -> None:
    """Found by review: the people holding an observed value were counted through the counted alias,
    so a value read from another copy of the table (a self-join), from a scalar subquery, or a
    pseudonym renamed in a CTE was "held" by everyone at the provider and published one person's
    exact date, or every pseudonym, as row labels. An observed dimension reads plain columns of the
    alias whose pid is counted, traced through CTEs, never pid; anything else is refused at load,
    naming the file and the problem, and nothing is built."""
    admit(con, 40, "RX1", "2026-01-10", "A01")
    admit(con, 1, "RX1", "2026-01-17", "A01", tag="lone")
    with pytest.raises(ValueError, match=f"observed dimension provider_code {problem}"):
        admissions(sql=sql)
    assert published_tables(con) == 0


def test_an_observed_dimension_from_a_self_join_is_refused_naming_the_file(
    tmp_path, registry: ContractRegistry
) -> None:
    """The load refusal is one line naming the file and the problem (README's example)."""
    spec = yaml.safe_load((outputs_dir(registry.root) / "gp_activity.yaml").read_text())
    spec["sql"] = (
        spec["sql"]
        .replace("e.practice_code,", "strftime(x.event_date, '%d %b %Y') AS practice_code,")
        .replace("FROM haven.gp_events e", "FROM haven.gp_events e JOIN haven.gp_events x USING (practice_code)")
    )
    (tmp_path / "gp_activity.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(OutputError) as refused:
        load_output(tmp_path / "gp_activity.yaml")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("invalid output gp_activity.yaml: ")
    assert (
        "observed dimension practice_code reads x.event_date, a column of x, not of e whose pid is counted" in message
    )


@pytest.mark.parametrize(
    ("cte", "dimension", "problem"),
    [
        (
            "SELECT h.pid, o.admission_date AS day FROM haven.hospital_episodes h "
            "JOIN haven.hospital_episodes o USING (provider_code)",
            "p.day",
            "reads o.admission_date, a column of o",
        ),
        (
            "SELECT pid, max(admission_date) OVER (PARTITION BY provider_code) AS day FROM haven.hospital_episodes",
            "p.day",
            "uses an aggregate or window function",
        ),
        (
            "SELECT pid, translate(pid, '0123456789', 'ghijklmnop') AS tag, tag AS day FROM haven.hospital_episodes",
            "p.day",
            "cannot be traced",
        ),
        (
            "SELECT pid, * EXCLUDE (pid) FROM haven.hospital_episodes",
            "p.provider_code",
            "cannot be traced to a column its query names",
        ),
        (
            "SELECT pid, provider_code FROM haven.hospital_episodes",
            "provider_code || m.month",
            "cannot be traced|a column of m",
        ),
        (
            "SELECT pid, provider_code, strftime(admission_date, '%d') AS Provider_Code FROM haven.hospital_episodes",
            "p.provider_code",
            "cannot be traced to a column its query names",
        ),
    ],
    ids=["join_in_cte", "window_in_cte", "name_of_the_select", "select_star", "month_table", "named_twice"],
)
def test_an_observed_dimension_is_traced_through_ctes_to_the_counted_row_or_refused(
    cte: str, dimension: str, problem: str
) -> None:
    """Fail closed at every level: inside a CTE the value must come from the row source that passes the
    pid on, as a plain column of a haven table; a join, a window over other rows, a bare name the
    SELECT gives a computed column, or a ``SELECT *`` (nothing to trace) is refused, and a month table
    is read only for a dimension declared ``reporting_months``."""
    sql = f"""WITH p AS ({cte})
        SELECT m.month, {dimension} AS provider_code, 'A' AS chapter, count(DISTINCT p.pid) AS people
        FROM p JOIN reporting_months m ON TRUE GROUP BY ALL"""
    with pytest.raises(ValueError, match=f"observed dimension provider_code .*({problem})"):
        admissions(sql=sql)


def test_an_observed_dimension_read_from_the_counted_row_through_a_cte_loads_and_is_built(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    """The rule refuses no honest SQL: a value computed in a CTE from the same row as the pid it passes
    on is counted by the people holding it, as the shipped gp_activity's practice code is."""
    admit(con, 40, "RX1", "2026-01-10", "A01")
    sql = """WITH p AS (SELECT pid, upper(provider_code) AS trust, admission_date, primary_diagnosis
                        FROM haven.hospital_episodes)
        SELECT m.month, lower(p.trust) AS provider_code, left(p.primary_diagnosis, 1) AS chapter,
               count(DISTINCT p.pid) AS people
        FROM p JOIN reporting_months m ON p.admission_date BETWEEN m.month AND m.month_end GROUP BY ALL"""
    built = build_output(con, admissions(sql=sql), registry, today=TODAY)
    assert {k[1] for k in rows(con, built.table)} == {"rx1"} and built.violations == []


#: A domain of exact admission dates, read from the haven.
DATE_DOMAIN = "SELECT strftime(admission_date, '%d %b %Y') FROM haven.hospital_episodes"


def date_dimensions(domain_sql: str = DATE_DOMAIN) -> list[dict]:
    return [
        {"name": "month", "description": "month", "domain": "reporting_months"},
        {"name": "provider_code", "description": "day", "domain": {"sql": domain_sql}},
        {"name": "chapter", "description": "chapter", "domain": {"values": ["A", "B", "C"]}},
    ]


def test_a_domain_read_from_the_haven_refuses_a_value_held_by_few_people_naming_no_value(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    """Found by review: a ``domain: {sql: ...}`` is data-driven like ``observed`` but had no people
    check, so a domain of exact admission dates published one person's date as a row label of the grid
    (its count suppressed, its label out). Each value of a domain read from the haven must be held by
    more than the threshold of distinct people in the rows the domain's own SQL reads."""
    admit(con, 40, "RX1", "2026-01-10", "A01")
    admit(con, 1, "RX1", "2026-01-17", "A01", tag="lone")
    sql = admissions().sql.replace("h.provider_code,", "strftime(h.admission_date, '%d %b %Y') AS provider_code,")
    out = admissions(sql=sql, dimensions=date_dimensions())
    with pytest.raises(OutputError) as refused:
        build_output(con, out, registry, today=TODAY)
    message = str(refused.value)
    assert message.startswith("adm: the domain of dimension provider_code has 1 value(s) held by 7 people or fewer")
    assert "Jan" not in message and "2026" not in message, "never a value"
    assert published_tables(con) == 0
    admit(con, THRESHOLD, "RX1", "2026-01-17", "A01", tag="more")  # eight people on that day
    built = build_output(con, out, registry, today=TODAY)
    assert {k[1] for k in rows(con, built.table)} == {"10 Jan 2026", "17 Jan 2026"} and built.violations == []


@pytest.mark.parametrize(
    ("domain_sql", "problem"),
    [
        ("SELECT provider_code FROM haven.hospital_episodes GROUP BY provider_code", "no GROUP BY"),
        (
            "SELECT DISTINCT h.provider_code || s.service_type FROM haven.hospital_episodes h "
            "JOIN haven.social_care s USING (pid)",
            "one SELECT of one column, read from one haven table",
        ),
        ("SELECT DISTINCT (SELECT max(provider_code) FROM haven.hospital_episodes)", "read from one haven table"),
        ("SELECT DISTINCT lower(pid) FROM haven.hospital_episodes", "is computed from pid"),
        ("SELECT DISTINCT 'RX1' FROM haven.hospital_episodes", "read from one haven table"),
    ],
    ids=["group_by", "two_tables", "scalar_subquery", "pid", "constant"],
)
def test_a_domain_read_from_the_haven_whose_people_cannot_be_counted_is_refused_when_it_loads(
    domain_sql: str, problem: str
) -> None:
    """Fail closed: the people holding a domain's values are counted from its own SQL, so SQL that does
    not read each value from one haven row source (or reads pid) is refused when the outputs load."""
    with pytest.raises(ValueError, match=f"the domain of dimension provider_code: .*{problem}"):
        admissions(
            dimensions=date_dimensions(domain_sql),
            collections=["hospital_episodes", "social_care"],
            linkage={
                "agreement": "x",
                "left": "hospital_episodes",
                "right": "social_care",
                "purpose": "a test of the domain rule",
            },
        )


def test_a_domain_that_reads_no_haven_table_is_not_counted() -> None:
    """The reporting months or a generated series hold no one's values: such a domain loads as before
    (the shipped discharge_to_social_care's month domain is one)."""
    assert admissions(dimensions=date_dimensions("SELECT strftime(month, '%b') FROM reporting_months"))


# --- relations between outputs: joint protection and the release audit ----------------------------


def test_relation_dimensions_must_exist() -> None:
    bad = {"kind": "subset", "of": "x", "match": {"nowhere": "la"}, "why": "a dimension this output lacks"}
    with pytest.raises(ValueError, match="relation names dimensions"):
        admissions(relations=[bad])


def linked_case(con: duckdb.DuckDBPyConnection, extra: list[tuple[str, str]]) -> None:
    """3 people discharged from RX1 start reablement in Birmingham, 20 from RX2; 15 other
    users in each ``extra`` (local authority, service) in January and February; nobody else."""
    admit(con, 3, "RX1", "2026-01-05", "A01", tag="a")
    admit(con, 20, "RX2", "2026-01-05", "A01", tag="b")
    admit(con, 9, "RX1", "2026-02-20", "A01", tag="later")
    con.execute(
        "INSERT INTO haven.social_care SELECT pid, 'E08000025', 'short_term_reablement', discharge_date + 1, NULL "
        "FROM haven.hospital_episodes WHERE admission_date < DATE '2026-02-01'"
    )
    con.execute("INSERT INTO haven.social_care VALUES ('someone', 'E09000033', 'day_care', DATE '2026-02-25', NULL)")
    for la, service in extra:
        con.execute(
            f"INSERT INTO haven.social_care SELECT md5('{la}{service}' || i::VARCHAR), '{la}', '{service}', "
            "DATE '2026-01-10', NULL FROM range(15) t(i)"
        )


def linked_output(outputs: dict[str, Output]) -> Output:
    """The shipped discharge_to_social_care over this case's two providers (RX2 is not a declared
    trust: since a values domain is exactly its values, the case's grid is declared here), with
    every margin group (the default), as the joint protection's tests need: the shipped output
    declares one of them."""
    spec = outputs["discharge_to_social_care"].model_dump(mode="json")
    spec["margins"] = None
    for dim in spec["dimensions"]:
        if dim["name"] == "provider_code":
            dim["domain"] = {"kind": "values", "values": ["RX1", "RX2"]}
    return Output.model_validate(spec)


RECTANGLE = [
    ("E10000030", "short_term_reablement"),
    ("E08000025", "short_term_other"),
    ("E10000030", "short_term_other"),
]


def test_the_linked_output_is_protected_knowing_social_care_users(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    """A table-by-table secondary suppression picks the first zero in code order, which
    social_care_users proves to be 0; the joint protection picks cells it cannot prove 0."""
    from safehaven.publish.release_audit import audit_release

    outputs = load_outputs(registry)
    users, linked = outputs["social_care_users"], linked_output(outputs)
    linked_case(con, RECTANGLE)
    assert build_output(con, users, registry, today=TODAY).violations == []
    agreement = linked.linkage.agreement

    alone = build_output(con, linked, registry, today=TODAY, agreement_id=agreement, publication={})
    assert alone.violations == [] and alone.audit is None  # each table passes its own checks
    report, problems = audit_release(con, [users, linked], None)
    assert problems and report.failing["discharge_to_social_care"]

    built = build_output(con, linked, registry, today=TODAY, agreement_id=agreement)
    assert built.violations == [], built.violations
    assert built.audit is not None and built.audit.passed
    meta = built.as_metadata()
    assert meta["audit_cells"] >= built.report.primary + built.report.secondary and meta["audit_failing"] == 0
    report, problems = audit_release(con, [users, linked], None)
    assert problems == [] and report.cells_audited > 0
    suppressed = set(
        con.execute(
            f"SELECT local_authority_code, service_type FROM {built.table} WHERE people IS NULL "
            "AND provider_code = 'RX1'"
        ).fetchall()
    )
    assert suppressed == {("E08000025", "short_term_reablement"), *RECTANGLE}


def test_the_linked_output_fails_closed_when_only_known_zeros_are_left(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    """Where a row's only other cells are proven 0 by social_care_users, no secondary
    suppression in this table can protect it: the build reports it and blocks publication."""
    outputs = load_outputs(registry)
    users, linked = outputs["social_care_users"], linked_output(outputs)
    linked_case(con, RECTANGLE[:2])
    build_output(con, users, registry, today=TODAY)
    built = build_output(con, linked, registry, today=TODAY, agreement_id=linked.linkage.agreement)
    assert built.audit is not None and not built.audit.passed
    assert any("protection interval not met" in v for v in built.violations)
    assert built.audit.iterations < 8, "gives up once nothing is left to change"
