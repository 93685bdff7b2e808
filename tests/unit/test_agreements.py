"""Tests for ``safehaven.share.agreements``: CoP 43 contents, machine-checked (CoP 21-22, 40-43; Caldicott 1-4, 6)."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from safehaven.core.days import haven_today
from safehaven.intake.contracts import CONTRACTS_DIR, ContractRegistry
from safehaven.share.agreements import (
    AgreementError,
    Approval,
    agreements_dir,
    approve,
    draft_yaml,
    load_agreement,
    load_agreement_file,
    load_agreements,
    problems,
    scan_agreements,
    suspend,
)
from tests.governance_helpers import BASE, agreement_data, contracts_root, write_agreement


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return contracts_root(tmp_path)


@pytest.fixture
def registry(root: Path) -> ContractRegistry:
    return ContractRegistry(root)


def _one(root: Path, **overrides: Any):
    data = agreement_data(**overrides)
    write_agreement(root, data)
    return load_agreement(data["id"], root)


# --- the project's own agreements -------------------------------------------------------


def test_project_agreements_parse_and_validate() -> None:
    found = load_agreements(CONTRACTS_DIR)
    assert {
        "research-hes-asc-linked",
        "anon-linked-stats",
        "statutory-gp-audit",
        "flu-surveillance-2024",
        "risk-stratification",
        "cohort-consent-study",
    } <= set(found)
    registry = ContractRegistry(CONTRACTS_DIR)
    for agreement in found.values():
        assert problems(agreement, registry) == [], agreement.id
    assert found["anon-linked-stats"].names_linkage("social_care", "hospital_episodes")
    assert found["research-hes-asc-linked"].in_force()[0]
    assert found["flu-surveillance-2024"].status_on() == "expired"
    assert found["risk-stratification"].status_on() == "suspended"
    assert found["cohort-consent-study"].status_on() == "draft"
    assert agreements_dir(CONTRACTS_DIR) == CONTRACTS_DIR / "agreements"
    assert agreements_dir(CONTRACTS_DIR / "agreements") == CONTRACTS_DIR / "agreements"


def test_base_test_agreement_is_valid(root: Path, registry: ContractRegistry) -> None:
    assert problems(_one(root), registry) == []


# --- structure --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"colour": "blue"}, "colour"),
        ({"legal_basis": {"basis": "because"}}, "legal_basis.basis"),
        ({"identifiability": "secret"}, "identifiability"),
        ({"purposes": []}, "purposes"),
        ({"k_anonymity": 1}, "k_anonymity"),
        ({"approval": {"status": "maybe"}}, "approval.status"),
        ({"publication": {"licence": "all rights reserved", "terms": "x"}}, "publication.licence"),
    ],
)
def test_structural_errors_name_the_file_and_key(root: Path, change: dict, words: str) -> None:
    write_agreement(root, agreement_data(**change))
    with pytest.raises(AgreementError, match=words) as caught:
        load_agreements(root)
    assert "test-linked.yaml" in str(caught.value)
    found, errors = scan_agreements(root)
    assert found == {} and "test-linked" in errors


def test_id_must_match_file_name(root: Path) -> None:
    data = agreement_data()
    (root / "agreements" / "other-name.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(AgreementError, match="does not match the file name"):
        load_agreements(root)


# --- consistency ------------------------------------------------------------------------


def _field(collection: str, name: str, why: str = "Needed for the purpose of the study.") -> dict[str, str]:
    return {"collection": collection, "field": name, "justification": why}


CONTRADICTIONS = [
    pytest.param(
        {"identifiability": "identifiable", "legal_basis": {"basis": "anonymised"}},
        "identifiable level with legal basis 'anonymised'",
        id="identifiable-without-basis",
    ),
    pytest.param(
        {"legal_basis": {"basis": "anonymised"}},
        "pseudonymised level with legal basis 'anonymised'",
        id="pseudonymised-without-basis",
    ),
    pytest.param(
        {"identifiability": "anonymised"},
        "anonymised level with legal basis 'section_251'",
        id="anonymised-with-other-basis",
    ),
    pytest.param({"legal_basis": {"basis": "statutory"}}, "names no reference", id="no-reference"),
    pytest.param(
        {"fields": BASE["fields"] + [_field("hospital_episodes", "nhs_number")]},
        "is a direct identifier and cannot be released at the pseudonymised level",
        id="direct-identifier",
    ),
    pytest.param(
        {"fields": BASE["fields"] + [_field("hospital_episodes", "blood_group")]},
        "field hospital_episodes.blood_group is not in the hospital_episodes contract",
        id="unknown-field",
    ),
    pytest.param(
        {"fields": BASE["fields"] + [_field("gp_events", "diagnosis_code")]},
        "gp_events is not one of the agreement's collections",
        id="collection-not-listed",
    ),
    pytest.param(
        {"collections": ["hospital_episodes", "social_care", "nowhere"]},
        "collection 'nowhere' has no contract",
        id="unknown-collection",
    ),
    pytest.param(
        {"collections": ["hospital_episodes", "social_care", "objections"]},
        "not a content collection",
        id="objections-collection",
    ),
    pytest.param(
        {"fields": BASE["fields"] + [_field("social_care", "postcode")]},
        "is a postcode but the agreement's coarsening says postcode: none",
        id="postcode-none",
    ),
    pytest.param(
        {"fields": BASE["fields"] + [_field("social_care", "end_date", "needed")]},
        "has no real justification",
        id="short-justification",
    ),
    pytest.param(
        {"fields": BASE["fields"] + [_field("social_care", "end_date", "TODO say why this is needed")]},
        "justification is still marked TODO",
        id="todo",
    ),
    pytest.param({"fields": BASE["fields"] + [BASE["fields"][0]]}, "is listed more than once", id="duplicate"),
    pytest.param({"linkages": []}, "no linkage names hospital_episodes and social_care", id="unlinked-collections"),
    pytest.param(
        {"linkages": [{"left": "social_care", "right": "social_care", "purpose": "self"}]},
        "joins social_care to itself",
        id="self-linkage",
    ),
    pytest.param(
        {"linkages": BASE["linkages"] + [{"left": "gp_events", "right": "social_care", "purpose": "x y"}]},
        "names gp_events, which is not one of the agreement's collections",
        id="linkage-outside",
    ),
    pytest.param({"instrument": "agreement"}, "a contract is required (CoP 41)", id="contract-needed"),
    pytest.param({"end_date": "2024-01-01"}, "is before start_date", id="dates-backwards"),
    pytest.param({"approval": {"status": "approved"}}, "no approver is named", id="approved-without-approver"),
    pytest.param(
        {"approval": {"status": "approved", "approver": "Dr X, CG"}}, "no approval date", id="approved-without-date"
    ),
    pytest.param(
        {"approval": {"status": "suspended", "approver": "Dr X, CG", "date": "2025-01-01"}},
        "status suspended but no reason",
        id="suspended-without-reason",
    ),
    pytest.param(
        {
            "approval": {
                "status": "approved",
                "approver": "Dr X, CG",
                "date": (haven_today() + timedelta(days=30)).isoformat(),
            }
        },
        "is in the future",
        id="approval-in-future",
    ),
    pytest.param(
        {"onward_sharing": {"permitted": True, "terms": "yes"}}, "terms are not stated", id="onward-sharing-terms"
    ),
    pytest.param(
        {"collections": ["hospital_episodes", "social_care", "gp_events"]},
        "collection gp_events is listed but no field of it is released",
        id="collection-unused",
    ),
]


@pytest.mark.parametrize(("change", "words"), CONTRADICTIONS)
def test_each_contradiction_is_named(root: Path, registry: ContractRegistry, change: dict, words: str) -> None:
    found = problems(_one(root, **change), registry)
    assert any(words in p for p in found), found


def test_anonymised_level_needs_year_of_birth(root: Path, registry: ContractRegistry) -> None:
    a = _one(
        root,
        id="anon-test",
        identifiability="anonymised",
        legal_basis={"basis": "anonymised"},
        coarsening={"dob": "week", "postcode": "none"},
    )
    assert any("date of birth only to the year" in p for p in problems(a, registry))


def test_identifiable_agreement_may_release_direct_identifiers(root: Path, registry: ContractRegistry) -> None:
    a = _one(
        root,
        identifiability="identifiable",
        legal_basis={"basis": "consent", "reference": "Form v1"},
        fields=BASE["fields"] + [_field("hospital_episodes", "nhs_number")],
    )
    assert problems(a, registry) == []
    assert a.permits_identifiable
    assert not _one(root).permits_identifiable


# --- in force ---------------------------------------------------------------------------


def test_in_force_by_status_and_dates(root: Path) -> None:
    a = _one(root, start_date="2025-01-01", end_date="2025-12-31")
    assert a.in_force(date(2025, 6, 1)) == (True, "agreement test-linked is approved and in force until 2025-12-31")
    ok, why = a.in_force(date(2026, 1, 1))
    assert not ok and "expired on 2025-12-31" in why
    assert a.status_on(date(2026, 1, 1)) == "expired"
    ok, why = a.in_force(date(2024, 12, 31))
    assert not ok and "starts on 2025-01-01" in why
    suspended = a.model_copy(
        update={"approval": Approval(status="suspended", approver="X", date=date(2025, 1, 1), reason="audit pending")}
    )
    assert suspended.in_force(date(2025, 6, 1)) == (False, "agreement test-linked is suspended: audit pending")
    draft = a.model_copy(update={"approval": Approval(status="draft")})
    assert "draft" in draft.in_force(date(2025, 6, 1))[1]
    assert not draft.permits_identifiable_on(date(2025, 6, 1))


# --- approve, suspend, draft ------------------------------------------------------------


def test_approve_rewrites_only_the_approval_block(root: Path, registry: ContractRegistry) -> None:
    path = write_agreement(root, agreement_data(approval={"status": "draft"}))
    original = "# a comment the governance lead wrote\n" + path.read_text() + "# trailing comment\n"
    path.write_text(original)
    a = approve("test-linked", "Dr A. Example, Caldicott Guardian", root=root, registry=registry)
    assert a.approval == Approval(status="approved", approver="Dr A. Example, Caldicott Guardian", date=haven_today())
    text = path.read_text()
    assert text.startswith("# a comment the governance lead wrote\n")
    assert text.endswith("# trailing comment\n")
    before, after = original.split("approval:")[0], text.split("approval:")[0]
    assert before == after, "everything before the approval block is kept byte for byte"
    assert load_agreement("test-linked", root).approval.status == "approved"


def test_approve_refuses_an_agreement_with_problems(root: Path, registry: ContractRegistry) -> None:
    path = write_agreement(root, agreement_data(legal_basis={"basis": "anonymised"}, approval={"status": "draft"}))
    before = path.read_bytes()
    with pytest.raises(AgreementError, match="cannot be approved: pseudonymised level with legal basis"):
        approve("test-linked", "Dr A. Example, Caldicott Guardian", root=root, registry=registry)
    assert path.read_bytes() == before


def test_approve_refuses_an_ended_agreement(root: Path, registry: ContractRegistry) -> None:
    write_agreement(root, agreement_data(start_date="2020-01-01", end_date="2021-01-01", approval={"status": "draft"}))
    with pytest.raises(AgreementError, match="ended on 2021-01-01"):
        approve("test-linked", "Dr A. Example, Caldicott Guardian", root=root, registry=registry)


def test_suspend_then_reapprove(root: Path, registry: ContractRegistry) -> None:
    write_agreement(root, agreement_data())
    a = suspend("test-linked", "audit of onward sharing pending", "Dr A. Example, Caldicott Guardian", root=root)
    assert a.approval.status == "suspended" and a.approval.reason == "audit of onward sharing pending"
    assert a.approval.suspended_on == haven_today()
    assert a.approval.approver == "Dr Test, Caldicott Guardian", "the original approval is kept"
    assert not a.in_force()[0]
    assert problems(a, registry) == []
    with pytest.raises(AgreementError, match="only an approved agreement can be suspended"):
        suspend("test-linked", "again please", "Dr A", root=root)
    again = approve("test-linked", "Dr B, Caldicott Guardian", root=root, registry=registry)
    assert again.in_force()[0] and again.approval.reason is None


def test_draft_parses_and_lists_every_todo(root: Path, registry: ContractRegistry) -> None:
    text = draft_yaml(
        "new-study",
        title="A new study",
        recipient="Somewhere (synthetic)",
        public_body=False,
        basis="section_251",
        level="pseudonymised",
        fields=[("hospital_episodes", "admission_date"), ("social_care", "service_type")],
        links=[("hospital_episodes", "social_care")],
        start=date(2026, 1, 1),
        end=date(2027, 1, 1),
    )
    (root / "agreements" / "new-study.yaml").write_text(text)
    a = load_agreement("new-study", root)
    found = problems(a, registry)
    todos = [p for p in found if "TODO" in p]
    assert len(todos) >= 8, found
    assert {"fields[0].justification is still marked TODO", "penalties is still marked TODO"} <= set(todos)
    with pytest.raises(AgreementError, match="cannot be approved"):
        approve("new-study", "Dr A. Example, Caldicott Guardian", root=root, registry=registry)


def test_an_agreement_that_names_a_key_twice_is_refused_not_read_as_its_last(tmp_path: Path) -> None:
    """YAML forbids a key twice in one mapping; PyYAML kept the last, so an agreement could show a
    reviewer one recipient at the top and act for another further down (found by review)."""
    root = contracts_root(tmp_path)
    path = write_agreement(root, agreement_data())
    text = path.read_text()
    path.write_text(text + "recipient:\n  organisation: Someone Else Ltd\n  contact: x@example.org\n")
    with pytest.raises(AgreementError, match="the key 'recipient' appears twice"):
        load_agreement_file(path)
