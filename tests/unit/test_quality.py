"""Quality statements: figures from the validation records, timeliness, changes, rendering.

Rules under test: ``safehaven.publish.quality`` module docstring (CoP 28-29; ESS quality dimensions).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import pytest

from safehaven.core.home import Home
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.measures import RULE_RESULTS, ensure_rule_results_table
from safehaven.intake.measures import ensure_table as ensure_measures_table
from safehaven.publish.outputs import Output, build_output
from safehaven.publish.quality import (
    ESS_DIMENSIONS,
    build_statement,
    changes_since_last_release,
    collection_figures,
    disclosure_figures,
    finalise,
    policy_record,
    record_release,
    render_markdown,
)
from tests.unit.test_outputs import TODAY as OUTPUTS_TODAY
from tests.unit.test_outputs import admissions, admit, haven_store

TODAY = date(2026, 3, 15)


@pytest.fixture(scope="module")
def registry() -> ContractRegistry:
    return ContractRegistry()


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    c = duckdb.connect()
    for schema in ("landing", "haven", "published", "governance"):
        c.execute(f"CREATE SCHEMA {schema}")
    yield c
    c.close()


def seed(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    """Three social care batches: accepted with 2 bad rows, refused, awaiting validation; one quarantined file."""
    con.execute(
        "CREATE TABLE governance.batches (batch_id VARCHAR, collection VARCHAR, file_name VARCHAR, sha256 VARCHAR, "
        "rows BIGINT, landed_at TIMESTAMPTZ, status VARCHAR, invalid_rows BIGINT, validated_at TIMESTAMPTZ, "
        "contract_version VARCHAR)"
    )
    con.execute(
        "INSERT INTO governance.batches VALUES "
        "('b1', 'social_care', 'a.csv', 'b1', 100, TIMESTAMPTZ '2026-03-01 02:00:00+00', 'accepted', 2, now(), "
        "'1.0.0'),"
        "('b2', 'social_care', 'b.csv', 'b2', 50, TIMESTAMPTZ '2026-03-02 02:00:00+00', 'refused', 20, now(), '1.0.0'),"
        "('b3', 'social_care', 'c.csv', 'b3', 10, TIMESTAMPTZ '2026-03-03 02:00:00+00', 'landed', NULL, NULL, NULL),"
        "('x1', 'gp_events', 'g.csv', 'x1', 999, TIMESTAMPTZ '2026-03-04 02:00:00+00', 'accepted', 0, now(), '1.0.0')"
    )
    con.execute("CREATE TABLE landing.social_care_rejected (_batch VARCHAR, _row BIGINT, failed_rules VARCHAR[])")
    con.execute(
        "INSERT INTO landing.social_care_rejected SELECT 'b1', i, ['nhs_number.nhs_number'] FROM range(2) t(i) "
        "UNION ALL SELECT 'b2', i, ['start_date.type', 'end_not_before_start'] FROM range(20) t(i)"
    )
    # The validate stage's per-rule results of the same batches (every rule, and the row-level tolerance).
    ensure_rule_results_table(con)
    con.execute(
        f"INSERT INTO {RULE_RESULTS} (batch_id, collection, rule_id, kind, sql_failures) VALUES "
        "('b1', 'social_care', 'nhs_number.nhs_number', 'nhs_number', 2), "
        "('b1', 'social_care', 'start_date.type', 'type', 0), "
        "('b1', 'social_care', 'rows.within_tolerance', 'rows', 2), "
        "('b2', 'social_care', 'nhs_number.nhs_number', 'nhs_number', 0), "
        "('b2', 'social_care', 'start_date.type', 'type', 20), "
        "('b2', 'social_care', 'end_not_before_start', 'order', 20), "
        "('b2', 'social_care', 'rows.within_tolerance', 'rows', 20), "
        "('x1', 'gp_events', 'nhs_number.nhs_number', 'nhs_number', 0)"
    )
    cols = [
        "local_authority_code",
        "service_type",
        "start_date",
        "end_date",
        "nhs_number",
        "date_of_birth",
        "sex",
        "postcode",
    ]
    con.execute(
        f"CREATE TABLE landing.social_care ({', '.join(c + ' VARCHAR' for c in cols)}, _batch VARCHAR, _row BIGINT)"
    )
    con.execute(
        "INSERT INTO landing.social_care SELECT 'E08000025', 'day_care', '2026-01-05', "
        "CASE WHEN i < 40 THEN '2026-02-01' ELSE '  ' END, '9434765919', '1950-01-01', '1', 'LS1 4AB', 'b1', i "
        "FROM range(160) t(i)"
    )
    con.execute("CREATE TABLE landing.social_care_valid AS SELECT * FROM landing.social_care LIMIT 0")
    con.execute("INSERT INTO landing.social_care_valid SELECT * FROM landing.social_care WHERE _row < 98")
    con.execute(
        "CREATE TABLE haven.social_care AS SELECT md5(_row::VARCHAR) AS pid, local_authority_code, service_type, "
        "CAST(start_date AS DATE) AS start_date, CAST(NULL AS DATE) AS end_date, _batch, _row "
        "FROM landing.social_care_valid"
    )
    q = home.quarantine_for("social_care")
    q.mkdir(parents=True, exist_ok=True)
    (q / "bad.csv.reason.json").write_text(json.dumps({"rule": "file.columns", "reason": "x"}))
    (q / "b.csv.reason.json").write_text(json.dumps({"rule": "batch.tolerance", "reason": "y"}))


def test_collection_figures_agree_with_the_validation_records(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry, tmp_path: Path
) -> None:
    home = Home(tmp_path / "home").ensure()
    seed(con, home)
    f = collection_figures(con, registry.contracts["social_care"], home)
    assert (f["batches"], f["batches_accepted"], f["batches_refused"], f["batches_awaiting_validation"]) == (3, 1, 1, 1)
    assert f["rows_received"] == 160
    assert f["rows_checked"] == 150
    assert f["rows_invalid"] == 22 == con.execute("SELECT count(*) FROM landing.social_care_rejected").fetchone()[0]
    assert f["rows_valid"] == 98
    assert f["pass_rate"] == round(98 / 150, 6)
    assert f["rows_quarantined_in_accepted_batches"] == 2
    assert f["rows_withheld_in_refused_batches"] == 50
    assert f["failures_by_rule"] == {"end_not_before_start": 20, "nhs_number.nhs_number": 2, "start_date.type": 20}
    assert f["completeness_as_received"]["end_date"] == 0.25
    assert f["completeness_as_received"]["nhs_number"] == 1.0
    assert f["records_in_haven"] == 98
    assert f["records_not_in_haven_type1_objections"] == 0
    assert f["files_quarantined_at_ingest"] == {"files": 1, "by_rule": {"file.columns": 1}}
    assert f["data_last_received_at"] == "2026-03-03T02:00:00+00:00"
    assert "measures_from_validation" not in f


def test_quality_measures_are_used_when_the_validation_stage_writes_them(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry, tmp_path: Path
) -> None:
    home = Home(tmp_path / "home").ensure()
    seed(con, home)
    ensure_measures_table(con)
    con.execute(
        "INSERT INTO governance.quality_measures VALUES "
        "('b1', 'social_care', '1.0.0', '*', 'row_validity', 0.98, 98, 100, NULL, NULL, now()),"
        "('b2', 'social_care', '1.0.0', '*', 'row_validity', 0.6, 30, 50, NULL, NULL, now()),"
        "('b1', 'social_care', '1.0.0', 'end_date', 'completeness', 0.4, 40, 100, NULL, NULL, now()),"
        "('b1', 'social_care', '1.0.0', 'start_date', 'date_coverage', 1, 2, 2, '2025-12-01', '2026-01-31', now()),"
        "('x1', 'gp_events', '1.0.0', '*', 'row_validity', 1, 999, 999, NULL, NULL, now())"
    )
    f = collection_figures(con, registry.contracts["social_care"], home)
    assert f["measures_from_validation"] == {
        "batches": 2,
        "row_validity": {"*": {"value": round(128 / 150, 6), "numerator": 128, "denominator": 150}},
        "completeness": {"end_date": {"value": 0.4, "numerator": 40, "denominator": 100}},
        "date_coverage": {
            "start_date": {"value": 1.0, "numerator": 2, "denominator": 2, "period": ["2025-12-01", "2026-01-31"]}
        },
    }
    out = social_output()
    st = build_statement(con, out, registry, home, build_output(con, out, registry, today=TODAY))
    md = render_markdown(st)
    assert "Measures from validation of social_care (2 batch(es)); row validity 85.33%" in md
    assert "`end_date` 40.00%" in md and "(2025-12-01 to 2026-01-31)" in md


def social_output(**extra: object) -> Output:
    spec = {
        "name": "users",
        "version": "1.0.0",
        "title": "Service users",
        "description": "People using services.",
        "purpose": "Testing quality statements.",
        "users": ["tests", "the public"],
        "collections": ["social_care"],
        "dimensions": [
            {"name": "month", "description": "m", "domain": "reporting_months"},
            {"name": "service_type", "description": "s", "domain": {"code_list": "asc_service_types"}},
        ],
        "measures": [{"name": "people", "description": "people"}],
        "zeros": {"publish": True, "structural": []},
        "coherence": ["A person can receive several services."],
        "sql": """SELECT m.month, s.service_type, count(DISTINCT s.pid) AS people FROM haven.social_care s
                  JOIN reporting_months m ON s.start_date BETWEEN m.month AND m.month_end GROUP BY ALL""",
    }
    spec.update(extra)
    return Output.model_validate(spec)


def test_statement_covers_every_ess_dimension_with_figures_that_agree(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry, tmp_path: Path
) -> None:
    home = Home(tmp_path / "home").ensure()
    seed(con, home)
    out = social_output()
    built = build_output(con, out, registry, today=TODAY)
    st = build_statement(con, out, registry, home, built, as_of=datetime(2026, 3, 10, tzinfo=UTC))
    assert set(ESS_DIMENSIONS) <= set(st)
    assert st["relevance"]["users"] == ["tests", "the public"]
    sdc = st["accuracy"]["disclosure_control"]
    table = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE suppressed), "
        "count(*) FILTER (WHERE people % 5 = 0 AND NOT suppressed) "
        "FROM published.users"
    ).fetchone()
    assert (sdc["cells"], sdc["cells_suppressed"]) == table[:2]
    assert table[2] == sdc["cells"] - sdc["cells_suppressed"], "every published count is on the rounding grid"
    assert not {"cells_rounded", "cells_published_unchanged"} & set(sdc)
    assert st["accuracy"]["collections"]["social_care"]["rows_checked"] == 150
    assert st["accuracy"]["reporting_period"]["end"] == "2026-01-31"
    tp = st["timeliness_and_punctuality"]
    assert tp["days_from_period_end_to_publication"] == 38 and tp["punctual"] is False
    cc = st["comparability_and_coherence"]
    assert cc["contracts"] == {"social_care": registry.contracts["social_care"].version}
    assert cc["code_lists"]["asc_service_types"]["system"].startswith("http")
    assert cc["changes_since_last_release"] == ["first release of this output"]
    md = render_markdown(st)
    for heading in (
        "## Relevance",
        "## Accuracy",
        "## Timeliness and punctuality",
        "## Accessibility and clarity",
        "## Comparability and coherence",
    ):
        assert heading in md
    assert "| social_care | 3 (1 / 1) | 150 | 22 | 98 | 65.33% | 1 |" in md
    # Counts, versions and dates of the process only: no identifier or pseudonym.
    text = json.dumps(st) + md
    assert "9434765919" not in text and "LS1 4AB" not in text
    assert not re.search(r"[0-9a-f]{32}", text.replace(out.definition_sha256(), ""))


def test_the_statement_states_the_zeros_policy_and_the_cells_its_structural_zeros_removed(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry, tmp_path: Path
) -> None:
    home = Home(tmp_path / "home").ensure()
    seed(con, home)
    nursing = {"match": {"service_type": "long_term_nursing"}, "reason": "this authority commissions no nursing care"}
    out = social_output(zeros={"publish": True, "structural": [nursing]})
    built = build_output(con, out, registry, today=TODAY)
    st = build_statement(con, out, registry, home, built)
    zeros = st["accuracy"]["disclosure_control"]["zeros"]
    assert zeros == {
        "sampling_zeros": "published as 0",
        "structural_zeros": {
            "declared": [
                {
                    "match": "service_type=long_term_nursing",
                    "reason": "this authority commissions no nursing care",
                    "cells_removed": 1,
                }
            ],
            "cells_removed": 1,
        },
    }
    assert st["accuracy"]["disclosure_control"]["cells"] == built.grid_cells
    assert st["comparability_and_coherence"]["disclosure_policy"]["structural_zeros"] == [
        "service_type=long_term_nursing"
    ]
    md = render_markdown(st)
    assert "Sampling zeros (possible cells in which no one was counted) are published as 0" in md
    assert "`service_type=long_term_nursing` (this authority commissions no nursing care): 1 cell(s)" in md
    plain = build_statement(
        con, social_output(), registry, home, build_output(con, social_output(), registry, today=TODAY)
    )
    assert "Structural zeros (combinations that cannot occur, which are not cells of the table): none declared" in (
        render_markdown(plain)
    )


def test_finalise_stamps_the_release_and_its_punctuality() -> None:
    st = {"timeliness_and_punctuality": {"period_end": "2026-02-28", "target_days_after_period_end": 35}}
    done = finalise(st, "r1", datetime(2026, 3, 20, 12, tzinfo=UTC))
    assert done["release"] == {"id": "r1", "status": "published", "published_at": "2026-03-20T12:00:00+00:00"}
    assert done["timeliness_and_punctuality"]["days_from_period_end_to_publication"] == 20
    assert done["timeliness_and_punctuality"]["punctual"] is True
    assert "release" not in st, "the stored statement is not changed"


def test_changes_since_the_last_release(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry, tmp_path: Path
) -> None:
    home = Home(tmp_path / "home").ensure()
    seed(con, home)
    out = social_output()
    built = build_output(con, out, registry, today=TODAY)
    first = finalise(build_statement(con, out, registry, home, built), "r1", datetime(2026, 3, 1, tzinfo=UTC))
    record_release(con, [first])
    same = build_statement(con, out, registry, home, built)
    assert same["comparability_and_coherence"]["changes_since_last_release"] == [
        "no change of definition, contracts, code lists, policy or columns since release r1"
    ]
    midpoint = social_output(
        version="1.1.0",
        policy={"rounding": "midpoint6"},
        measures=[{"name": "people_midpoint6", "description": "people"}],
        sql=out.sql.replace("AS people", "AS people_midpoint6"),  # the count column its SQL defines
    )
    changes = changes_since_last_release(
        con,
        "users",
        {
            "output_version": midpoint.version,
            "definition_sha256": midpoint.definition_sha256(),
            "contracts": first["comparability_and_coherence"]["contracts"],
            "code_lists": first["comparability_and_coherence"]["code_lists"],
            "policy": policy_record(midpoint),
            "columns": first["accessibility_and_clarity"]["columns"],
        },
    )
    text = "\n".join(changes)
    assert "output definition version" in text and "1.1.0" in text
    assert "disclosure control policy" in text and "midpoint6" in text
    assert "code list" not in text and "contract" not in text


def _built_figures(counts: dict[tuple[str, str], int]) -> tuple[dict, list]:
    """The disclosure figures and published cells of a one-output build over ``counts`` (people
    per provider and admission day), in a store of its own (``tests.unit.test_outputs``)."""
    con = haven_store()
    for (provider, day), n in counts.items():
        admit(con, n, provider, day, "A01")
    output = admissions()
    built = build_output(con, output, ContractRegistry(), today=OUTPUTS_TODAY)
    cells = con.execute(
        f"SELECT month, provider_code, chapter, people FROM {built.table} WHERE NOT suppressed ORDER BY ALL"
    )
    return disclosure_figures(output, built), cells.fetchall()


def test_the_statement_does_not_say_how_many_counts_rounding_changed() -> None:
    """Two populations that publish the same table (every count 30) get the same statement: had
    it said how many cells rounding changed, "none" would tell a reader every count is exact and
    "one" that one 30 is not 30, undoing the rounding (``quality.disclosure_figures``; CoP 34b)."""
    exact = {(p, d): 30 for p in ("RX1", "RX2") for d in ("2025-12-05", "2026-01-05", "2026-02-05")}
    figures, published = _built_figures(exact)
    off_figures, off_published = _built_figures({**exact, ("RX2", "2026-02-05"): 32})
    assert published == off_published
    assert figures == off_figures
