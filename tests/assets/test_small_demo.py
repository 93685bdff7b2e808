"""A small haven publishes every output: the demo at 200 patients (``safehaven run --demo-patients 200``).

Its night failed: ``discharge_to_social_care`` hid zeros as secondary suppressions that
``social_care_users`` shows to be zeros, and the disclosure audit refused them (a suppressed
cell shown to be 0 protects nothing). Those were in margin groups of one provider, which no one
publishes; the output now declares only the group a local authority may publish (``margins:``
in its YAML; ``docs/methods.md`` rule 5), and the audit still checks every suppressed cell
against the whole publication (CoP 34b; ISB 1523).
"""

from pathlib import Path

import pytest

from resources.haven import SafeHavenResource
from safehaven.core.home import Home
from safehaven.core.keys import VAULT
from safehaven.intake.contracts import ContractRegistry
from safehaven.publish.outputs import load_outputs
from safehaven.tools import synthetic
from tests.assets.test_outputs import stage_assets
from tests.conftest import custodian_ring
from tests.governance_helpers import adopt_project_agreements
from tests.stages import materialize_stages

pytestmark = pytest.mark.slow


def test_the_200_patient_demo_publishes_every_output_with_its_disclosure_audit_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAFEHAVEN_HOME", str(tmp_path / "haven"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    home = Home(tmp_path / "haven").ensure()
    custodian_ring(home).create_keypair(VAULT)
    adopt_project_agreements(home)
    synthetic.generate(home.incoming, patients=200, seed=42)  # safehaven run's default seed
    registry = ContractRegistry()
    result = materialize_stages(stage_assets(registry), resources={"haven": SafeHavenResource()}, raise_on_error=False)
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["discharge_to_social_care_disclosure_safe"], "the small linked output is published"
    assert result.success, [k for k, passed in checks.items() if not passed]
    for name in load_outputs(registry):
        assert (home.published / f"{name}.csv").is_file(), name
