"""The objections and pseudonymise stages as Dagster assets: type 1 drops per sender, the
objection-rate warning check, the vault, and nothing identifiable in Dagster's storage."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import duckdb
import pytest

from assets import intake, keys, objections, pseudonymise
from resources.haven import SafeHavenResource
from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect.objections import MEMBERS_SEEDED, REGISTRATIONS, TYPE1, objection_rates
from safehaven.tools import synthetic
from tests.conftest import building_haven, leaked_nhs_numbers, seeded_nhs_numbers
from tests.stages import materialize_stages

PATIENTS = 600
# Every test here reads or reruns a run of the pipeline: the slow tier (`pytest -m "not slow"` skips it).
pytestmark = pytest.mark.slow


def _assets() -> list:
    registry = ContractRegistry()
    return [
        *intake.build(registry),
        *objections.build(registry),
        *pseudonymise.build(registry),
    ]


def _expected_outlier(incoming: Path) -> str:
    """From the drop itself: the practice with the highest share of type 1 objectors."""
    gp = next((incoming / "gp_events").glob("*.csv"))
    obj = next((incoming / "objections").glob("*.csv"))
    return duckdb.execute(
        f"""
        WITH lists AS (SELECT practice_code, count(DISTINCT regexp_replace(nhs_number, '[^0-9]', '', 'g')) AS n
                       FROM read_csv('{gp}', all_varchar=true) GROUP BY 1),
             t1 AS (SELECT source_practice, count(*) AS x FROM read_csv('{obj}', all_varchar=true)
                    WHERE objection_type = 'type1' GROUP BY 1)
        SELECT practice_code FROM lists JOIN t1 ON t1.source_practice = lists.practice_code
        ORDER BY x / n DESC LIMIT 1
        """
    ).fetchone()[0]


@pytest.fixture(scope="module")
def ran_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dg.ExecuteInProcessResult, str, set[str]]:
    """One drop through the stages for the whole module (its root, the result, the outlier, the seeded numbers)."""
    root = tmp_path_factory.mktemp("objections")
    with building_haven(root) as (home, instance):
        synthetic.generate(home.incoming, patients=PATIENTS, seed=5, defect_rate=0.01)
        outlier = _expected_outlier(home.incoming)
        seeded = seeded_nhs_numbers(home.incoming)
        result = materialize_stages(_assets(), resources={"haven": SafeHavenResource()}, instance=instance)
    return root, result, outlier, seeded


@pytest.fixture
def prebuilt(ran_once) -> Path:
    return ran_once[0]


@pytest.fixture
def run(ran_once) -> tuple[dg.ExecuteInProcessResult, str, set[str]]:
    """The module's run; a test that asks for ``home`` or ``dagster_instance`` gets its own copy of its haven."""
    _, result, outlier, seeded = ran_once
    return result, outlier, seeded


def _meta(result, key: dg.AssetKey) -> dict:
    [mat] = [
        e.event_specific_data.materialization
        for e in result.get_asset_materialization_events()
        if e.event_specific_data.materialization.asset_key == key
    ]
    return {k: v.value for k, v in mat.metadata.items()}


def test_the_outlier_practice_is_flagged_as_a_warning_and_ordinary_ones_are_not(run) -> None:
    result, outlier, _ = run
    assert result.success, "a warning check does not fail the run"
    [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == objections.RATE_CHECK]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    flagged = check.metadata["flagged"].value
    assert [f["practice"] for f in flagged] == [outlier]
    assert flagged[0]["rate"] > flagged[0]["upper_limit"] > flagged[0]["baseline"] > 0
    assert check.metadata["practices_assessed"].value >= 3


def test_type1_drops_are_counted_per_sender(run) -> None:
    result, outlier, _ = run
    meta = _meta(result, keys.haven("gp_events"))
    by_sender = meta["type1_dropped_by_sender"]
    assert meta["type1_records_dropped"] == sum(by_sender.values()) > 0
    assert max(by_sender, key=by_sender.get) == outlier
    assert meta["rows_out"] == meta["rows_in"] - meta["type1_records_dropped"]
    assert _meta(result, keys.haven("hospital_episodes"))["type1_records_dropped"] == 0


def test_vault_assets_write_identifiers_once(run, home: Home, dagster_instance) -> None:
    result, _, _ = run
    gp = _meta(result, keys.vault("gp_events"))
    assert gp["rows_out"] > 0 and gp["fields"] == ["nhs_number", "date_of_birth", "postcode"]
    again = materialize_stages(_assets(), resources={"haven": SafeHavenResource()}, instance=dagster_instance)
    assert _meta(again, keys.vault("gp_events"))["rows_out"] == 0
    assert _meta(again, keys.haven("gp_events"))["rows_in"] == 0


def test_no_nhs_number_reaches_dagster_storage_or_any_file(run, home: Home, tmp_path: Path) -> None:
    _, _, seeded = run
    assert len(seeded) > 300
    assert leaked_nhs_numbers([home.root, tmp_path / "dagster_home"], seeded) == {}


def test_running_list_sizes_equal_a_full_recount_after_a_second_drop(run, home: Home, dagster_instance) -> None:
    """The monitor's list sizes are running counts (issue 22): the second drop's batch adds its own
    (practice, pid) pairs as it enters the haven, and the rates equal those of a recount of the
    whole GP haven table."""
    synthetic.generate(home.incoming, patients=PATIENTS, seed=6, defect_rate=0.01)
    again = materialize_stages(_assets(), resources={"haven": SafeHavenResource()}, instance=dagster_instance)
    assert again.success and _meta(again, keys.haven("gp_events"))["rows_in"] > 0
    sources = [("haven.gp_events", "practice_code")]
    with Store(home).connect() as con:
        running = objection_rates(con, TYPE1, gp_sources=sources)
        assert con.execute(f"SELECT count(*) FROM {MEMBERS_SEEDED}").fetchone() == (1,)
        (recounted,) = con.execute(  # forget every pair the haven table gives, and count them again whole
            f"DELETE FROM {REGISTRATIONS} r WHERE EXISTS (SELECT 1 FROM haven.gp_events h "
            "WHERE h.practice_code = r.practice AND h.pid = r.pid)"
        ).fetchone()
        con.execute(f"DELETE FROM {MEMBERS_SEEDED}")
        full = objection_rates(con, TYPE1, gp_sources=sources)
    assert recounted > PATIENTS  # both drops' people were in the running counts
    assert running == full and sum(r.list_size for r in full) >= recounted
