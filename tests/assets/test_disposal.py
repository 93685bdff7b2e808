"""The ``disposal`` job and its daily schedule, around the real nightly job (issue #7)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from assets.definitions import build_definitions, defs
from assets.runner import run_nightly
from safehaven.context import Haven
from safehaven.core import audit
from safehaven.core.days import haven_today
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.store import Store
from safehaven.dispose import disposal
from safehaven.intake import landings
from safehaven.intake.contracts import CONTRACTS_DIR, ContractRegistry
from safehaven.share import review
from safehaven.share.agreements import suspend
from safehaven.tools import synthetic
from tests.conftest import building_haven, leaked_nhs_numbers, seeded_nhs_numbers
from tests.governance_helpers import approve_release

PATIENTS = 300
GP_AUDIT = "statutory-gp-audit"


def test_disposal_job_and_daily_schedule_are_wired() -> None:
    job = defs.resolve_job_def("disposal")
    assert job.tags.get("safehaven/store") == "writer"
    assert [n.name for n in job.nodes] == ["dispose"]
    assert job.nodes[0].definition.pool == "safehaven_store"
    schedule = defs.resolve_schedule_def("disposal_daily_0300_london")
    assert schedule.job_name == "disposal"
    assert schedule.cron_schedule == "0 3 * * *" and schedule.execution_timezone == "Europe/London"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    request = schedule.evaluate_tick(dg.build_schedule_context()).run_requests[0]
    assert request.run_config == {"ops": {"dispose": {"config": {"sweep": True}}}}


def _gp_received_eight_years_ago(collection: str) -> datetime:
    """The landing clock of the module's run: the GP drop is received eight years ago, as the audit
    trail records it (retention counts from there: ``safehaven.intake.landings``)."""
    return datetime.now(UTC) - timedelta(days=2920 if collection == "gp_events" else 0)


@pytest.fixture(scope="module")
def ran_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    """One nightly run over a drop for the whole module, with the project's agreements copied beside
    the haven so a test may suspend one; returns the root and the NHS numbers only the GP drop held."""
    root = tmp_path_factory.mktemp("disposal")
    contracts = root / "data_contracts"
    shutil.copytree(CONTRACTS_DIR, contracts)
    with building_haven(root) as (home, instance), pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEHAVEN_CONTRACTS", str(contracts))
        synthetic.generate(home.incoming, patients=PATIENTS, seed=7, defect_rate=0.01)
        gp_numbers = seeded_nhs_numbers(home.incoming_for("gp_events"))
        others = (
            seeded_nhs_numbers(home.incoming_for("hospital_episodes"))
            | seeded_nhs_numbers(home.incoming_for("social_care"))
            | seeded_nhs_numbers(home.incoming_for("objections"))
        )
        mp.setattr(landings, "clock", _gp_received_eight_years_ago)
        ok, stages = run_nightly(home, instance)
        assert ok, [s for s in stages if s.checks_failed]
        with Store(home).connect() as con:  # two output checkers approve what the run prepared
            for request in review.requests(con, states=review.AWAITING_REVIEW):
                approve_release(con, request.release_id, home, registry=ContractRegistry(contracts))
    return root, gp_numbers - others


@pytest.fixture
def prebuilt(ran_once) -> Path:
    return ran_once[0]


@pytest.fixture
def ran(home: Home, tmp_path: Path, ran_once, monkeypatch: pytest.MonkeyPatch) -> tuple[Home, Path, set[str]]:
    """This test's own copy of the module's run (``home``, ``dagster_instance``) and of its agreements."""
    contracts = tmp_path / "data_contracts"
    monkeypatch.setenv("SAFEHAVEN_CONTRACTS", str(contracts))
    assert (home.releases / GP_AUDIT).exists()
    return home, contracts, ran_once[1]


def _run(instance, config: dict) -> dg.ExecuteInProcessResult:
    job = build_definitions().resolve_job_def("disposal")
    return job.execute_in_process(
        run_config={"ops": {"dispose": {"config": config}}}, instance=instance, raise_on_error=False
    )


@pytest.mark.slow
def test_daily_sweep_disposes_of_what_is_due_and_the_pipeline_runs_on(ran, dagster_instance) -> None:
    home, contracts, gp_only = ran
    suspend(GP_AUDIT, "the recipient breached the no-onward-sharing term", "SIRO", root=contracts)
    salt_id = KeyRing(home.keys).get(f"agreement-{GP_AUDIT}").key_id

    result = _run(dagster_instance, {"sweep": True})

    assert result.success
    (output,) = [e for e in result.events_for_node("dispose") if e.event_type_value == "STEP_OUTPUT"]
    meta = {k: v.value for k, v in output.event_specific_data.metadata.items()}
    assert meta["disposals"] == 2 and meta["rows_disposed"] > 0 and salt_id in meta["key_ids_destroyed"]
    assert leaked_nhs_numbers([home.root.parent / "dagster_home"], gp_only) == {}
    with Store(home).connect(read_only=True) as con:
        certs = disposal.certificates(con)
        assert sorted(c["target_kind"] for c in certs) == ["agreement", "collection"]
        assert con.execute("SELECT count(*) FROM landing.gp_events").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM haven.gp_events").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM haven.hospital_episodes").fetchone()[0] > 0
        assert audit.verify(con, home).ok
    assert salt_id in {k for c in certs for k in c["key_ids_destroyed"].split(", ")}
    assert not KeyRing(home.keys).exists(f"agreement-{GP_AUDIT}")
    assert not (home.releases / GP_AUDIT).exists()
    assert gp_only and leaked_nhs_numbers([home.root], gp_only) == {}
    assert (home.registers / "disposal_register.csv").exists()
    due = disposal.due(Haven.open(home, contracts=ContractRegistry(contracts)))
    assert due == [] or all(i.action == "review" for i in due)

    again = _run(dagster_instance, {"sweep": True})  # nothing left: a no-op, no new certificate
    assert again.success
    with Store(home).connect(read_only=True) as con:
        assert len(disposal.certificates(con)) == 2

    synthetic.generate(home.incoming, patients=100, seed=8, defect_rate=0.0)
    ok, stages = run_nightly(home, dagster_instance)
    assert ok, [s for s in stages if s.checks_failed]
    with Store(home).connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM haven.gp_events").fetchone()[0] > 0


@pytest.mark.slow
def test_job_config_names_a_collection_or_an_agreement(ran, dagster_instance) -> None:
    home, _, _ = ran
    bad = _run(dagster_instance, {"collection": "gp_events"})
    assert not bad.success
    refused = _run(dagster_instance, {"agreement": GP_AUDIT})  # in force: refused, nothing changed
    assert not refused.success
    assert KeyRing(home.keys).exists(f"agreement-{GP_AUDIT}")
    tomorrow = (haven_today() + timedelta(days=1)).isoformat()
    done = _run(
        dagster_instance,
        {"collection": "social_care", "before": tomorrow, "authorised_by": "Dr A. Example, Caldicott Guardian"},
    )
    assert done.success
    with Store(home).connect(read_only=True) as con:
        (cert,) = disposal.certificates(con)
        assert cert["collection"] == "social_care" and cert["authorised_by"].startswith("Dr A.")
        assert con.execute("SELECT count(*) FROM haven.social_care").fetchone()[0] == 0
