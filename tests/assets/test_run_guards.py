"""What a run started from the Dagster UI cannot change or skip (found by a hostile review).

A data engineer may materialise any asset alone, in any order, with any run configuration the
Launchpad accepts. The haven's governance settings are not a run's choice
(``resources.haven.GOVERNED``: refused at run start), a release is built again when the contracts
it follows change (``safehaven.share.release_inputs``), and GP data is not taken into the haven
while objections wait outside the register (``safehaven.protect.haven.refuse_while_objections_unregistered``).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from assets import keys
from assets.definitions import build_definitions
from assets.releases import build, release_key
from assets.runner import haven_run_config
from resources.haven import GOVERNED, GovernedSettingInRunConfig, SafeHavenResource, refuse_governed_config
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.ingest import BATCHES
from safehaven.protect.objections import EVENTS
from safehaven.tools import synthetic
from tests.governance_helpers import (
    adopt,
    adopt_project_agreements,
    agreement_data,
    contracts_root,
    small_haven,
    write_agreement,
)


@pytest.fixture
def stale(home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ContractRegistry:
    """A haven whose objection register was last refreshed 400 days ago, with an adopted agreement."""
    root = contracts_root(tmp_path)
    monkeypatch.setenv("SAFEHAVEN_CONTRACTS", str(root))
    registry = ContractRegistry(root)
    data = agreement_data()
    write_agreement(registry.root, data)
    with Store(home).connect() as con:
        small_haven(con, KeyRing(home.keys), registry)
        con.execute(
            f"UPDATE {BATCHES} SET landed_at = now() - INTERVAL 400 DAY, validated_at = now() - INTERVAL 400 DAY "
            "WHERE collection = 'objections'"
        )
        adopt(con, registry, data["id"])
    return registry


def _release(registry: ContractRegistry, instance: dg.DagsterInstance, config: dict | None = None):
    assets = [a for a in build(registry) if release_key("test-linked") in a.keys]
    return dg.materialize(
        assets,
        resources={"haven": SafeHavenResource.from_environment()},
        instance=instance,
        raise_on_error=False,
        run_config={"resources": {"haven": {"config": config}}} if config else None,
    )


def _failure(result: dg.ExecuteInProcessResult) -> str:
    failures = [e for e in result.all_events if e.is_failure]
    return " ".join(str(e.event_specific_data.error) for e in failures if e.event_specific_data is not None)


@pytest.mark.parametrize(
    "config",
    [
        {"objections_max_age_days": 100000},
        {"objections_window_error": None, "objections_max_age_days": 100000},
        {"contracts": "/elsewhere/data_contracts"},
        {"audit_worm_dir": "/tmp/an-ordinary-folder"},
    ],
    ids=["window widened", "window refusal cleared", "other contracts", "another audit target"],
)
def test_a_run_that_sets_a_governance_setting_is_refused_before_anything_runs(
    home: Home, stale: ContractRegistry, dagster_instance: dg.DagsterInstance, config: dict
) -> None:
    """The stale register refuses the record-level release; a run configured to widen the window,
    clear its refusal or read other contracts (where a quasi-identifier could be relabelled content,
    so k-anonymity did not apply) is refused at run start, naming the setting, and prepares nothing."""
    plain = _release(stale, dagster_instance)
    assert not plain.success and "last refreshed" in _failure(plain)
    configured = _release(stale, dagster_instance, config)
    assert not configured.success and not configured.get_asset_materialization_events()
    assert "governance settings, not a run's" in _failure(configured)
    assert sorted(config)[0] in _failure(configured)
    assert set(config) <= set(GOVERNED)


def test_a_run_naming_only_the_home_and_the_stores_waits_runs(
    home: Home, stale: ContractRegistry, dagster_instance: dg.DagsterInstance
) -> None:
    """What a run may set: the home (``safehaven run`` names it), operational limits, and a governance
    setting restated with the value the environment gives it; the guard it meets is the stale
    register's, not the configuration's."""
    restated = {"objections_max_age_days": 31, "contracts": str(stale.root), "audit_worm_dir": None}
    result = _release(stale, dagster_instance, {"home": str(home.root), "lock_wait_seconds": 5.0, **restated})
    assert not result.success and "last refreshed" in _failure(result)
    assert "governance settings" not in _failure(result)


def test_gp_data_is_not_taken_into_the_haven_while_objections_wait_outside_the_register(
    home: Home, dagster_instance: dg.DagsterInstance
) -> None:
    """Intake of objections and GP data done, the GP haven step materialised alone before the
    register step: refused, naming the register step, so no type 1 objector's record enters the
    haven; after the register step it runs and takes none of them in."""
    adopt_project_agreements(home)
    synthetic.generate(home.incoming, patients=200, seed=3)
    defs = build_definitions()
    config = haven_run_config(home, quiet=True)
    for c in ("objections", "gp_events"):
        assert (
            defs.resolve_job_def(f"intake_{c}").execute_in_process(instance=dagster_instance, run_config=config).success
        )
    nightly = defs.resolve_job_def("nightly")

    def alone(key: dg.AssetKey) -> dg.ExecuteInProcessResult:
        return nightly.execute_in_process(
            instance=dagster_instance, run_config=config, raise_on_error=False, asset_selection=[key]
        )

    refused = alone(keys.haven("gp_events"))
    assert not refused.success and "not in the objection register" in _failure(refused)
    assert alone(keys.OBJECTION_REGISTER).success
    assert alone(keys.haven("gp_events")).success
    with Store(home).connect(read_only=True) as con:
        objectors = con.execute(
            f"SELECT count(*) FROM haven.gp_events WHERE pid IN (SELECT pid FROM {EVENTS} "
            "WHERE objection_type = 'type1' AND withdrawn_date IS NULL)"
        ).fetchone()[0]
    assert objectors == 0


@pytest.mark.parametrize("setting", ["contracts", "audit_worm_dir"])
def test_a_link_to_the_environments_folder_is_not_the_environments_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """A run naming a symbolic link to the environment's contracts folder (or write-once target)
    would pass a comparison of resolved paths, and the resource follows the link again at each use:
    repointed once the run started, its later steps read other contracts or anchor elsewhere (found
    by review). The run's text must be the environment's; the environment's own spelling passes."""
    folder = tmp_path / "approved"
    folder.mkdir()
    monkeypatch.setenv("SAFEHAVEN_CONTRACTS" if setting == "contracts" else "SAFEHAVEN_AUDIT_WORM", str(folder))
    link = tmp_path / "link"
    link.symlink_to(folder)
    with pytest.raises(GovernedSettingInRunConfig, match=setting):
        refuse_governed_config({"resources": {"haven": {"config": {setting: str(link)}}}})
    refuse_governed_config({"resources": {"haven": {"config": {setting: f"{folder}/"}}}})
