"""The release assets (assets/releases.py): one per agreement, skip, refuse, release; and end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from assets.definitions import build_definitions
from assets.keys import haven as haven_key
from assets.releases import GROUP, REVIEW_CHECK, build, release_key
from assets.runner import run_nightly
from resources.haven import SafeHavenResource
from safehaven.context import Haven
from safehaven.core import audit
from safehaven.core import registers as reg
from safehaven.core.home import Home
from safehaven.core.identifiers import is_valid_nhs
from safehaven.core.keys import KeyRing
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry, contracts_dir
from safehaven.share import review
from safehaven.share.agreements import load_agreements
from safehaven.share.releases import MANIFEST, verify_release
from safehaven.share.subject_access import subject_access
from safehaven.tools import synthetic
from tests.conftest import custodian_ring, leaked_nhs_numbers, seeded_nhs_numbers
from tests.governance_helpers import (
    adopt,
    adopt_project_agreements,
    agreement_data,
    approve_release,
    contracts_root,
    record_unchecked_decision,
    small_haven,
    write_agreement,
)


@pytest.fixture
def registry(home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ContractRegistry:
    root = contracts_root(tmp_path)
    monkeypatch.setenv("SAFEHAVEN_CONTRACTS", str(root))
    registry = ContractRegistry(root)
    with Store(home).connect() as con:
        small_haven(con, KeyRing(home.keys), registry)
    return registry


def _adopted(home: Home, registry: ContractRegistry, data: dict) -> Path:
    """Write the agreement and adopt its approval block, as the governance lead would."""
    path = write_agreement(registry.root, data)
    with Store(home).connect() as con:
        adopt(con, registry, data["id"])
    return path


def _materialize(registry: ContractRegistry, agreement_id: str, instance: dg.DagsterInstance):
    assets = [a for a in build(registry) if release_key(agreement_id) in a.keys]
    return dg.materialize(assets, resources={"haven": SafeHavenResource()}, instance=instance, raise_on_error=False)


def test_one_release_asset_per_agreement_in_the_release_group() -> None:
    defs = build_definitions()
    job = defs.resolve_job_def("nightly")
    for agreement_id, agreement in load_agreements(contracts_dir()).items():
        if agreement_id == "anon-linked-stats":  # its product is the published linked output
            continue
        key = release_key(agreement_id)
        assert key in job.asset_layer.executable_asset_keys
        spec = defs.resolve_assets_def(key)
        assert spec.group_names_by_key[key] == GROUP
        assert spec.node_def.pool == "safehaven_store"
        assert {haven_key(c) for c in agreement.collections} <= set(spec.asset_deps[key])


def test_release_asset_materialises_with_counts_only(home: Home, registry: ContractRegistry, dagster_instance) -> None:
    _adopted(home, registry, agreement_data())
    result = _materialize(registry, "test-linked", dagster_instance)
    assert result.success
    (event,) = result.get_asset_materialization_events()
    meta = event.event_specific_data.materialization.metadata  # type: ignore[union-attr]
    assert meta["release_id"].value == "test-linked-r0001" and meta["status"].value == "prepared"
    assert meta["rows_out"].value > 0 and meta["records_withheld_objections"].value == 3
    assert (home.root / "staging" / "releases" / "test-linked-r0001" / MANIFEST).exists()
    assert not (home.releases / "test-linked").exists()  # nothing leaves before review
    # the pending request is a warning with the checker summary, not a failure
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == REVIEW_CHECK and not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.metadata["waiting"].value == 1 and "k per person" in check.metadata["summary"].value
    with Store(home).connect() as con:
        approve_release(con, "test-linked-r0001", home, registry=registry)
    assert (home.releases / "test-linked" / "test-linked-r0001" / MANIFEST).exists()
    # the next run finds nothing new: no request, no materialisation, and the check passes
    again = _materialize(registry, "test-linked", dagster_instance)
    assert again.success and again.get_asset_materialization_events() == []
    assert all(c.passed for c in again.get_asset_check_evaluations())
    with Store(home).connect(read_only=True) as con:
        assert len(reg.releases(con)) == 1


def test_a_refused_shredding_keeps_the_release_check_warning_every_run_until_the_files_are_put_back(
    home: Home, registry: ContractRegistry, dagster_instance, tmp_path: Path
) -> None:
    """A withdrawn request's staged folder moved out of the haven and linked back: the release
    asset retries the shredding every run (not only when it prepares), and its check warns, naming
    the request and what to do, until a person puts the files back; then they are shredded and
    the check passes (CoP 27b)."""
    _adopted(home, registry, agreement_data())
    assert _materialize(registry, "test-linked", dagster_instance).success
    with Store(home).connect() as con:
        staging = review.get(con, "test-linked-r0001").staging_dir
        outside = tmp_path / "moved-out"
        staging.rename(outside)
        staging.symlink_to(outside)
        with pytest.raises(review.ReviewError, match="is a symbolic link"):
            review.withdraw(con, "test-linked-r0001", "Chris Custodian, Caldicott Guardian", "changed by hand")
    for _ in range(2):
        result = _materialize(registry, "test-linked", dagster_instance)
        assert result.success
        (check,) = result.get_asset_check_evaluations()
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
        assert "the files of test-linked-r0001 (will never leave) are not shredded" in check.description
        assert "Put them back" in check.metadata["shredding_refused"].value
    assert outside.is_dir() and staging.is_symlink(), "the files outside are left as they are"
    staging.unlink()
    outside.rename(staging)
    result = _materialize(registry, "test-linked", dagster_instance)
    assert not staging.exists(), "shredded by the release asset's retry"
    assert all(c.passed or "waiting" in c.description for c in result.get_asset_check_evaluations())
    assert all("not shredded" not in c.description for c in result.get_asset_check_evaluations())


def test_a_delivery_killed_after_its_move_is_named_by_the_release_check_every_run_until_finished(
    home: Home, registry: ContractRegistry, dagster_instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between moving its files into releases/<agreement>/<id>/ and registering them, a
    delivery left the extract in the recipient's folder, unrecorded, and every run said only
    "unchanged" (found by review). The release check names it, where its files are and the command
    that finishes it, every run, until the delivery is finished."""
    _adopted(home, registry, agreement_data())
    assert _materialize(registry, "test-linked", dagster_instance).success
    rid = "test-linked-r0001"
    with Store(home).connect() as con:
        with monkeypatch.context() as m:
            get = review.get
            m.setattr(review, "deliver", lambda c, r, **k: get(c, r))  # approved; the delivery "killed" below
            approve_release(con, rid, home, registry=registry)
        req = review.get(con, rid)
        final = home.releases / "test-linked" / rid
        final.parent.mkdir(parents=True)
        req.staging_dir.rename(final)  # what a delivery killed after its move leaves
    for _ in range(2):
        result = _materialize(registry, "test-linked", dagster_instance)
        (check,) = result.get_asset_check_evaluations()
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
        assert f"the delivery of {rid} stopped part way: its files are in releases/test-linked/{rid}" in (
            check.description or ""
        )
        assert f"safehaven review release {rid}" in (check.description or "")
    with Store(home).connect() as con:
        assert review.deliver(con, rid, home=home, registry=registry, by="V. Keeper, custodian").state == "released"
    result = _materialize(registry, "test-linked", dagster_instance)
    assert all("stopped part way" not in (c.description or "") for c in result.get_asset_check_evaluations())


def test_a_files_approval_block_alone_releases_nothing_and_the_asset_says_how_to_clear_it(
    home: Home, registry: ContractRegistry, dagster_instance
) -> None:
    write_agreement(registry.root, agreement_data())  # its file says approved; no decision in the haven
    result = _materialize(registry, "test-linked", dagster_instance)
    assert result.success and result.get_asset_materialization_events() == []
    observations = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    reason = observations[0].event_specific_data.asset_observation.metadata["reason"].value  # type: ignore[union-attr]
    assert "has not been approved in this haven" in reason and "safehaven agreements approve test-linked" in reason
    assert not (home.releases / "test-linked").exists()


@pytest.mark.parametrize(
    "approval",
    [
        {"status": "suspended", "approver": "Dr X, CG", "date": "2025-01-01", "reason": "audit due"},
        {"status": "expired", "approver": "Dr X, CG", "date": "2020-01-01"},
    ],
    ids=["suspended", "expired"],
)
def test_suspended_or_expired_agreement_skips_and_writes_nothing(
    home: Home, registry: ContractRegistry, dagster_instance, approval: dict
) -> None:
    _adopted(home, registry, agreement_data(approval=approval))
    result = _materialize(registry, "test-linked", dagster_instance)
    assert result.success
    assert result.get_asset_materialization_events() == []
    observations = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    meta = observations[0].event_specific_data.asset_observation.metadata  # type: ignore[union-attr]
    assert meta["released"].value is False and approval["status"] in meta["reason"].value
    assert not (home.releases / "test-linked").exists()
    with Store(home).connect(read_only=True) as con:
        assert reg.releases(con) == []


def test_suspension_takes_effect_without_reloading_definitions(
    home: Home, registry: ContractRegistry, dagster_instance
) -> None:
    path = _adopted(home, registry, agreement_data())
    assets = [a for a in build(registry) if release_key("test-linked") in a.keys]  # built while approved
    path.write_text(path.read_text().replace("status: approved", "status: suspended\n  reason: stop now"))
    result = dg.materialize(assets, resources={"haven": SafeHavenResource()}, instance=dagster_instance)
    assert result.get_asset_materialization_events() == []
    assert not (home.releases / "test-linked").exists()


def test_unlisted_linkage_fails_the_asset_and_is_registered(
    home: Home, registry: ContractRegistry, dagster_instance
) -> None:
    write_agreement(registry.root, agreement_data(linkages=[]))  # adoption refuses it: approved before that check
    with Store(home).connect() as con:
        record_unchecked_decision(con, registry, "test-linked")
    result = _materialize(registry, "test-linked", dagster_instance)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "no agreement names a linkage of hospital_episodes and social_care" in str(failure.event_specific_data)
    with Store(home).connect(read_only=True) as con:
        assert [b["kind"] for b in reg.breaches(con)] == ["refused_linkage"]
    assert not (home.releases / "test-linked").exists()


def test_unreadable_agreement_gets_a_failing_asset(home: Home, registry: ContractRegistry, dagster_instance) -> None:
    (registry.root / "agreements" / "broken.yaml").write_text("id: broken\n")
    result = _materialize(registry, "broken", dagster_instance)
    assert not result.success


# --- end to end -------------------------------------------------------------------------


@pytest.mark.slow
def test_nightly_run_releases_under_the_projects_agreements(home: Home, dagster_instance) -> None:
    synthetic.generate(home.incoming, patients=300, seed=11, defect_rate=0.01)
    seeded = seeded_nhs_numbers(home.incoming)
    adopt_project_agreements(home)
    ok, stages = run_nightly(home, dagster_instance)
    assert ok, [s for s in stages if s.checks_failed]
    releases = [s for s in stages if s.asset.startswith("release/")]  # every release asset runs its check
    prepared = {s.asset for s in releases if s.rows_out is not None}  # materialised: a request was opened
    assert prepared == {"release/research-hes-asc-linked", "release/statutory-gp-audit"}
    skipped = {s.asset: s.note for s in releases if s.rows_out is None}  # observed with the reason
    assert set(skipped) == {
        "release/cohort-consent-study",  # draft
        "release/flu-surveillance-2024",  # expired
        "release/risk-stratification",  # suspended
    }
    assert all(note.startswith("skipped: ") for note in skipped.values()), skipped
    # prepared requests waiting for review are a warning, not a failed run; nothing has left yet
    assert all(s.checks_warned == [REVIEW_CHECK] for s in stages if s.asset in prepared)
    assert not any(home.releases.iterdir())
    with Store(home).connect() as con:
        for request in review.requests(con, states=review.AWAITING_REVIEW):
            approve_release(con, request.release_id, home, registry=ContractRegistry())
    # anon-linked-stats is served by the published output that names it, not by a second table
    assert not (home.releases / "anon-linked-stats").exists()
    assert not (home.releases / "risk-stratification").exists()  # suspended
    assert not (home.releases / "flu-surveillance-2024").exists()  # expired
    assert not (home.releases / "cohort-consent-study").exists()  # draft

    with Store(home).connect(read_only=True) as con:
        rows = reg.releases(con)
        assert audit.verify(con, home).ok
        members = con.execute(
            "SELECT release_id, count(DISTINCT pid) FROM governance.release_members GROUP BY ALL"
        ).fetchall()
    assert {r["agreement_id"] for r in rows} == {"research-hes-asc-linked", "statutory-gp-audit"}
    for row in rows:  # the register matches what was written, row for row
        directory = home.releases / row["agreement_id"] / row["release_id"]
        assert hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest() == row["manifest_sha256"]
        assert verify_release(directory) == []
        manifest = json.loads((directory / MANIFEST).read_text())
        written = sum(
            duckdb.sql(f"SELECT count(*) FROM '{directory / f['name']}'").fetchone()[0] for f in manifest["files"]
        )
        assert written == row["records_released"]
    assert dict(members) == {r["release_id"]: r["people_released"] for r in rows if r["people_released"] is not None}

    # no seeded NHS number in any release file, manifest or register (nor anywhere else)
    assert leaked_nhs_numbers([home.releases, home.registers, home.root], seeded) == {}

    # subject access for someone in the statutory GP release lists it
    lead = Haven.open(home, contracts=ContractRegistry(), keyring=custodian_ring(home))
    with Store(home).connect() as con:
        reports = [subject_access(con, n, haven=lead) for n in sorted(filter(is_valid_nhs, seeded))[:40]]
    statutory = next(r for r in rows if r["agreement_id"] == "statutory-gp-audit")["release_id"]
    assert any(statutory in [x["release_id"] for x in r.releases] for r in reports)
