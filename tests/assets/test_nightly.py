"""The whole nightly job, end to end, on a small generated population (issue: pipeline spine)."""

from pathlib import Path

import duckdb
import pytest

from assets import keys
from assets.runner import run_nightly
from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.tools import synthetic
from tests.conftest import building_haven, leaked_nhs_numbers, seeded_nhs_numbers

PATIENTS = 300
# Every test here reads or reruns a run of the pipeline: the slow tier (`pytest -m "not slow"` skips it).
pytestmark = pytest.mark.slow


def _drop(home: Home, seed: int = 7) -> set[str]:
    synthetic.generate(home.incoming, patients=PATIENTS, seed=seed, defect_rate=0.01)
    return seeded_nhs_numbers(home.incoming)


def _counts(home: Home) -> dict[str, int]:
    with Store(home).connect(read_only=True) as con:
        tables = con.execute(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables "
            "WHERE table_catalog = 'store' AND table_schema IN ('landing', 'haven', 'published') "
            "AND table_type = 'BASE TABLE'"
        ).fetchall()
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for (t,) in tables}


@pytest.fixture(scope="module")
def nightly_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str], object]:
    """One drop and one nightly run for the whole module (its root, the seeded numbers, the stages)."""
    root = tmp_path_factory.mktemp("nightly")
    with building_haven(root) as (home, instance):
        seeded = _drop(home)
        ok, stages = run_nightly(home, instance)
    assert ok, [s for s in stages if s.checks_failed]
    return root, seeded, stages


@pytest.fixture
def prebuilt(nightly_once) -> Path:
    return nightly_once[0]


@pytest.fixture
def first_run(home: Home, nightly_once) -> tuple[Home, set[str], object]:
    """The first run's haven, this test's own copy of it (``home``, ``dagster_instance``)."""
    _, seeded, stages = nightly_once
    return home, seeded, stages


def test_full_job_materialises_every_stage(first_run) -> None:
    home, _, stages = first_run
    names = {s.asset for s in stages}
    for group in (keys.LANDING, keys.VALIDATED, keys.HAVEN, keys.PUBLISHED):
        assert any(n.startswith(f"{group}/") for n in names), group
    assert keys.OBJECTION_REGISTER.to_user_string() in names
    # every stage that materialised reports its counts; one that did not (an agreement not in
    # force) says why instead
    materialised = [s for s in stages if not s.note.startswith("skipped: ")]
    assert all(s.rows_in is not None and s.rows_out is not None for s in materialised)
    haven_rows = {s.asset: s.rows_out for s in stages if s.asset.startswith(f"{keys.HAVEN}/")}
    assert all(n > 0 for n in haven_rows.values())
    for name in ("gp_activity", "hospital_admissions", "social_care_users"):
        assert (home.published / f"{name}.csv").exists()
        assert (home.published / f"{name}.parquet").exists()
    assert home.published_db.exists()


def test_no_seeded_nhs_number_in_any_file_or_event_log(first_run, tmp_path: Path) -> None:
    home, seeded, _ = first_run
    assert len(seeded) > 100
    assert leaked_nhs_numbers([home.root, tmp_path / "dagster_home"], seeded) == {}


def test_received_files_are_removed_once_landed(first_run) -> None:
    home, _, _ = first_run
    assert not [p for p in home.incoming.rglob("*") if p.is_file()]


def test_store_cannot_be_opened_without_its_key(first_run) -> None:
    home, _, _ = first_run
    with pytest.raises(duckdb.Error):
        duckdb.connect(str(home.store_file), read_only=True)
    con = duckdb.connect()
    with pytest.raises(duckdb.Error):
        con.execute(f"ATTACH '{home.store_file}' AS s (ENCRYPTION_KEY '{'00' * 32}', READ_ONLY)")


def test_rerun_of_the_same_drop_is_idempotent(first_run, dagster_instance) -> None:
    home, _, _ = first_run
    before = _counts(home)
    published_before = (home.published / "hospital_admissions.csv").read_bytes()
    _drop(home)  # the sender sends the very same files again
    ok, stages = run_nightly(home, dagster_instance)
    assert ok
    assert _counts(home) == before
    assert (home.published / "hospital_admissions.csv").read_bytes() == published_before
    landing = {s.asset: s.rows_in for s in stages if s.asset.startswith(f"{keys.LANDING}/")}
    assert set(landing.values()) == {0}


def test_bad_drop_is_quarantined_and_earlier_data_kept(first_run, dagster_instance) -> None:
    home, _, _ = first_run
    before = _counts(home)
    bad = home.incoming_for("social_care") / "social_care_20990101.csv"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("local_authority_code,service_type\nE08000025,day_care\n")
    ok, stages = run_nightly(home, dagster_instance)
    assert ok, "a bad file must not stop the other collections"
    reason = home.quarantine_for("social_care") / "social_care_20990101.csv.reason.json"
    assert reason.exists()
    assert "missing columns" in reason.read_text()
    assert (home.quarantine_for("social_care") / "social_care_20990101.csv").exists()
    assert not bad.exists()
    assert _counts(home) == before
    landing = {s.asset: s.rows_in for s in stages}
    assert landing[keys.landing("social_care").to_user_string()] == 0


def test_a_file_planted_in_published_is_moved_out_and_the_run_says_so(first_run, dagster_instance) -> None:
    """The next run's publication moves a planted file out of published/ into evidence/, and the
    run's summary says so (``safehaven.publish.integrity``)."""
    home, _, _ = first_run
    planted = home.published / "adm_by_postcode.csv"
    planted.write_text("nhs_number,postcode\n9434765919,LS1 4AP\n")
    ok, stages = run_nightly(home, dagster_instance)
    assert ok
    assert not planted.exists()
    assert [p.name for p in home.evidence.glob("published-*/files/*")] == [planted.name]
    (stage,) = [s for s in stages if s.asset == keys.PUBLISHED_FILES.to_user_string()]
    assert stage.note.startswith("1 entry of published/ altered or planted: kept in evidence/")
