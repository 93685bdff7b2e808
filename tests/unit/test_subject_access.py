"""Tests for ``safehaven.share.subject_access`` (CoP 12; Government response rec. 1)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from safehaven.cli.common import PASSPHRASE_ENV
from safehaven.context import Haven
from safehaven.core import audit, schema
from safehaven.core.home import Home
from safehaven.core.keys import VAULT, KeyRing
from safehaven.core.store import Store
from safehaven.intake import landings
from safehaven.intake.contracts import ContractRegistry
from safehaven.share.subject_access import SubjectAccessDenied, subject_access
from tests.conftest import TEST_PASSPHRASE, custodian_ring, with_vault_keys
from tests.governance_helpers import (
    NHS,
    OPTED_OUT,
    WITHDRAWN,
    adopt,
    agreement_data,
    contracts_root,
    copy_small_haven,
    install_haven_key,
    prepare_and_release,
    small_haven,
    write_agreement,
)

GP_ONLY = {
    "id": "gp-audit",
    "instrument": "agreement",
    "recipient": {"name": "Audit body", "public_body": True},
    "legal_basis": {"basis": "statutory", "reference": "HSCA 2012 s259"},
    "collections": ["gp_events"],
    "linkages": [],
    "fields": [
        {"collection": "gp_events", "field": "diagnosis_code", "justification": "The audit counts recorded diagnoses."}
    ],
}


def _lead(home: Home, registry: ContractRegistry) -> Haven:
    """The governance lead's context: the key custodian's ring, the test's contracts."""
    return Haven.open(home, contracts=registry, keyring=custodian_ring(home))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The haven every test starts from, built once for the module (``setting`` copies it): the
    small haven with both agreements adopted and released once each; never change it."""
    root = tmp_path_factory.mktemp("subject_access")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEHAVEN_HOME", str(root / "haven"))
        mp.setenv(PASSPHRASE_ENV, TEST_PASSPHRASE)
        home = with_vault_keys(Home(root / "haven").ensure())
        registry = ContractRegistry(contracts_root(root))
        keyring = KeyRing(home.keys)
        write_agreement(registry.root, agreement_data())
        write_agreement(registry.root, agreement_data(**GP_ONLY))
        with Store(home).connect() as con:
            small_haven(con, keyring, registry)
            adopt(con, registry)  # the governance lead adopts both agreements' approvals
            for aid in ("test-linked", "gp-audit"):
                prepare_and_release(con, aid, haven=_lead(home, registry))
    return root


@pytest.fixture
def setting(
    home: Home, tmp_path: Path, template: Path
) -> Iterator[tuple[duckdb.DuckDBPyConnection, Home, ContractRegistry]]:
    registry = copy_small_haven(template, home, tmp_path)
    with Store(home).connect() as con:
        install_haven_key(con, KeyRing(home.keys))  # as small_haven does
        yield con, home, registry


def test_report_lists_every_release_that_held_the_person(setting) -> None:
    con, home, registry = setting
    report = subject_access(con, NHS[0], haven=_lead(home, registry))
    assert report.records_held == {"gp_events": 3, "hospital_episodes": 2, "social_care": 1}
    assert [r["release_id"] for r in report.releases] == ["test-linked-r0001", "gp-audit-r0001"]
    assert report.releases[1]["legal_basis"] == "statutory"
    actions = {(a["action"], a["object"]) for a in report.accesses}
    assert {
        ("release", "release:test-linked-r0001"),
        ("release", "release:gp-audit-r0001"),
        ("read", "haven.hospital_episodes"),
        ("read", "haven.gp_events"),
    } <= actions
    assert report.objections == []


def test_objector_is_only_in_the_release_that_overruled_the_opt_out(setting) -> None:
    con, home, registry = setting
    report = subject_access(con, NHS[OPTED_OUT], haven=_lead(home, registry))
    assert [r["release_id"] for r in report.releases] == ["gp-audit-r0001"]
    assert report.objections == [
        {"objection_type": "national_opt_out", "recorded_date": "2024-01-01", "withdrawn_date": None, "in_force": True}
    ]
    withdrawn = subject_access(con, NHS[WITHDRAWN], haven=_lead(home, registry))
    assert withdrawn.objections[0]["in_force"] is False and withdrawn.objections[0]["withdrawn_date"] == "2024-06-01"


def test_any_formatting_finds_the_same_person(setting) -> None:
    con, home, registry = setting
    spaced = f"{NHS[1][:3]} {NHS[1][3:6]} {NHS[1][6:]}"
    assert (
        subject_access(con, spaced, haven=_lead(home, registry)).records_held
        == subject_access(con, NHS[1], haven=_lead(home, registry)).records_held
    )


def test_report_and_audit_hold_no_identifier(setting) -> None:
    con, home, registry = setting
    report = subject_access(con, NHS[0], haven=_lead(home, registry))
    text = report.to_text() + str(report.as_dict())
    assert NHS[0] not in text
    last = audit.entries_for(con)[-1]
    assert last.action == "subject_access" and last.role == "governance" and len(last.object) == 32
    assert NHS[0] not in str(vars(last))
    assert audit.verify(con).ok


def test_someone_the_haven_never_received(setting) -> None:
    con, home, registry = setting
    report = subject_access(con, NHS[59], haven=_lead(home, registry))
    assert not any(report.records_held.values()) and report.releases == [] and report.accesses == []
    assert "no records" in report.to_text()


def test_refused_without_the_governance_key_or_with_a_bad_number(setting) -> None:
    con, home, registry = setting
    with pytest.raises(SubjectAccessDenied, match="not a valid NHS number"):
        subject_access(con, "9990000001", haven=_lead(home, registry))
    KeyRing(home.keys).destroy(VAULT)
    with pytest.raises(SubjectAccessDenied, match="governance lead's identity vault key"):
        subject_access(con, NHS[0], haven=_lead(home, registry))


def test_a_membership_row_deleted_in_the_store_refuses_the_report_instead_of_omitting_the_release(setting) -> None:
    """A release's members are checked against the count and digest audited when it was prepared: a
    row deleted with the store key had the report say the person was in no release (found by review)."""
    con, home, registry = setting
    assert subject_access(con, NHS[0], haven=_lead(home, registry)).releases
    con.execute(
        "DELETE FROM governance.release_members WHERE release_id = 'test-linked-r0001' AND pid = "
        "(SELECT min(pid) FROM governance.release_members WHERE release_id = 'test-linked-r0001')"
    )
    with pytest.raises(SubjectAccessDenied, match="test-linked-r0001: its members in the store differ"):
        subject_access(con, NHS[0], haven=_lead(home, registry))


def test_a_delivered_release_whose_register_row_was_deleted_refuses_the_report(setting) -> None:
    """The trail records the delivery; with its register row deleted in the store the report could
    not say who received it: refused, naming the release."""
    con, home, registry = setting
    con.execute("DELETE FROM governance.release_register WHERE release_id = 'gp-audit-r0001'")
    with pytest.raises(SubjectAccessDenied, match="gp-audit-r0001: the audit trail records its delivery but"):
        subject_access(con, NHS[0], haven=_lead(home, registry))


def test_release_membership_is_checked_on_a_read_only_store_that_never_released(home: Home) -> None:
    """The check reads only: a store with no release tables (nothing ever released) has nothing to
    check, and a read-only connection (re-identification's) is never asked to create them."""
    from safehaven.share import review

    with Store(home).connect():
        pass
    with Store(home).connect(read_only=True) as con:
        assert review.members_not_on_record(con) == []


def test_a_receipt_moved_forward_in_the_batch_register_hides_no_access_from_the_person(setting) -> None:
    """The batch register is a store column: dated forward to 2099 it would have the report list the
    accesses to the person's records only from then. The receipt the audit trail records counts (and
    is shown); a batch with no receipt on record has its collection's accesses listed from the start."""
    con, home, registry = setting
    moved = con.execute(f"UPDATE {schema.BATCHES} SET landed_at = '2099-01-01 00:00:00+00'").fetchone()[0]
    assert moved >= 2  # small_haven's batch of each collection
    landings.record(con, "gp_events", "b-gp_events", datetime(2020, 1, 1, tzinfo=UTC))  # on record
    report = subject_access(con, NHS[0], haven=_lead(home, registry))
    assert report.first_received["gp_events"].startswith("2020-01-01")
    read = {a["object"] for a in report.accesses if a["action"] == "read"}
    assert {"haven.gp_events", "haven.hospital_episodes"} <= read
