"""Tests for the governance commands (``safehaven.cli.governance``) through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from safehaven.cli.common import PASSPHRASE_ENV
from safehaven.cli.main import main
from safehaven.core import audit
from safehaven.core import registers as reg
from safehaven.core.home import Home
from safehaven.core.keys import VAULT, KeyRing
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.share import approvals
from tests.governance_helpers import (
    NHS,
    REVIEWERS,
    adopt,
    agreement_data,
    contracts_root,
    logged_in_as,
    login_of,
    record_unchecked_decision,
    small_haven,
    write_agreement,
)


@pytest.fixture
def root(home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = contracts_root(tmp_path)
    monkeypatch.setenv("SAFEHAVEN_CONTRACTS", str(root))
    return root


@pytest.fixture
def governance_key(home: Home) -> None:
    assert KeyRing(home.keys).exists(VAULT)  # the home's custodian created the pair


def run(*args: str, stdin: str | None = None):
    return CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)


def _audit_log(home: Home, n: int = 6) -> None:
    with Store(home).connect() as con:
        for i in range(n):
            audit.append(con, actor="tester", role="pipeline", action="read", object=f"haven.gp_events/{i}")


# --- audit verify -----------------------------------------------------------------------


TAMPERING = [
    pytest.param("UPDATE governance.audit_log SET purpose = 'marketing' WHERE seq = 4", 4, id="edited"),
    pytest.param("DELETE FROM governance.audit_log WHERE seq = 3", 3, id="deleted"),
    pytest.param(
        "UPDATE governance.audit_log SET seq = CASE seq WHEN 2 THEN 5 ELSE 2 END WHERE seq IN (2, 5)", 2, id="reordered"
    ),
    pytest.param("DELETE FROM governance.audit_log WHERE seq > 3", 4, id="truncated"),
]


@pytest.mark.parametrize(("sql", "seq"), TAMPERING)
def test_audit_verify_exits_non_zero_naming_the_first_bad_seq(home: Home, sql: str, seq: int) -> None:
    _audit_log(home)
    assert run("audit", "verify").exit_code == 0
    with Store(home).connect() as con:
        con.execute(sql)
    result = run("audit", "verify")
    assert result.exit_code == 1
    assert f"first bad entry: seq {seq}" in result.output
    with Store(home).connect(read_only=True) as con:
        breaches = reg.breaches(con)
    assert [(b["kind"], b["severity"]) for b in breaches] == [("integrity_failure", 2)]
    assert "integrity_failure" in (home.registers / "breach_register.csv").read_text()


def test_audit_verify_ok_and_log(home: Home) -> None:
    _audit_log(home, 3)
    result = run("audit", "verify")
    assert result.exit_code == 0 and "3 entries, chain intact" in result.output
    assert "#3" in run("audit", "log", "--limit", "1").output


def test_audit_verify_without_a_store(home: Home) -> None:
    assert run("audit", "verify").exit_code == 0


# --- agreements -------------------------------------------------------------------------


def test_validate_reports_what_is_missing_or_contradictory(root: Path) -> None:
    write_agreement(root, agreement_data())
    write_agreement(root, agreement_data(id="bad-one", identifiability="anonymised"))
    result = run("agreements", "validate")
    assert result.exit_code == 1
    assert "ok         test-linked" in result.output
    assert "REFUSED    bad-one" in result.output and "anonymised level with legal basis 'section_251'" in result.output
    assert run("agreements", "validate", "test-linked").exit_code == 0


def test_validate_the_projects_own_agreements(home: Home) -> None:
    result = run("agreements", "validate")
    assert result.exit_code == 0, result.output


def test_draft_then_validate_lists_the_todos(root: Path) -> None:
    result = run(
        "agreements",
        "draft",
        "new-study",
        "--title",
        "A new study",
        "--recipient",
        "Somewhere",
        "--basis",
        "section_251",
        "--level",
        "pseudonymised",
        "--field",
        "hospital_episodes.admission_date",
    )
    assert result.exit_code == 0, result.output
    assert (root / "agreements" / "new-study.yaml").exists()
    check = run("agreements", "validate")
    assert check.exit_code == 0, "a draft does not fail a check of the whole directory"
    assert "INCOMPLETE new-study" in check.output and "still marked TODO" in check.output
    assert run("agreements", "validate", "new-study").exit_code == 1
    assert (
        run(
            "agreements",
            "draft",
            "new-study",
            "--title",
            "x",
            "--recipient",
            "y",
            "--basis",
            "consent",
            "--level",
            "identifiable",
            "--field",
            "a.b",
        ).exit_code
        == 1
    )


def test_approve_and_suspend_are_store_records_not_file_edits_and_are_audited(
    home: Home, root: Path, governance_key: None
) -> None:
    path = write_agreement(root, agreement_data(approval={"status": "draft"}))
    before = path.read_bytes()
    assert "not approved in the haven" in run("agreements", "list").output
    result = run("agreements", "approve", "test-linked", "--approver", "Dr A. Example, Caldicott Guardian")
    assert result.exit_code == 0, result.output
    assert path.read_bytes() == before  # the tracked file holds the terms only
    with Store(home).connect() as con:
        assert approvals.latest(con, "test-linked").decision == "approved"  # type: ignore[union-attr]
    result = run(
        "agreements",
        "suspend",
        "test-linked",
        "--reason",
        "audit of the recipient pending",
        "--by",
        "Dr A. Example, Caldicott Guardian",
    )
    assert result.exit_code == 0, result.output
    assert path.read_bytes() == before
    assert (home.registers / "agreement_decisions.csv").exists()
    with Store(home).connect(read_only=True) as con:
        entries = audit.entries_for(con, agreement="test-linked")
    assert [(e.action, e.role, e.object) for e in entries] == [
        ("approve", "governance", "agreement:test-linked"),
        ("suspend", "governance", "agreement:test-linked"),
    ]
    assert entries[0].detail_value["by"] == "Dr A. Example, Caldicott Guardian"
    listing = run("agreements", "list").output
    assert "test-linked" in listing and "suspended" in listing


def test_approving_needs_the_governance_key(root: Path, home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    write_agreement(root, agreement_data(approval={"status": "draft"}))
    approve = ("agreements", "approve", "test-linked", "--approver", "Dr A. Example, Caldicott Guardian")
    with monkeypatch.context() as m:  # the sealed key is here, but not the custodian's passphrase
        m.delenv(PASSPHRASE_ENV)
        result = run(*approve)
    assert result.exit_code == 1 and "custodian's passphrase" in result.output
    KeyRing(home.keys).path(VAULT).rename(home.root.parent / "vault.key.offline")  # the key is off this host
    result = run(*approve)
    assert result.exit_code == 1 and "governance lead" in result.output


def test_approving_an_agreement_with_problems_is_refused(root: Path, governance_key: None) -> None:
    path = write_agreement(root, agreement_data(linkages=[], approval={"status": "draft"}))
    before = path.read_bytes()
    result = run("agreements", "approve", "test-linked", "--approver", "Dr A. Example, Caldicott Guardian")
    assert result.exit_code == 1 and "no linkage names hospital_episodes and social_care" in result.output
    assert path.read_bytes() == before


# --- releases, subject access, registers ------------------------------------------------


@pytest.fixture
def released(home: Home, root: Path, governance_key: None) -> Home:
    write_agreement(root, agreement_data())
    with Store(home).connect() as con:
        small_haven(con, KeyRing(home.keys), ContractRegistry(root))
        adopt(con, ContractRegistry(root), "test-linked")  # the governance lead adopts its approval
    result = run("agreements", "release", "test-linked")
    assert result.exit_code == 0 and "prepared test-linked-r0001" in result.output, result.output
    for by in REVIEWERS:
        with logged_in_as(login_of(by)):  # each reviewer at their own login, not the operator's
            result = run("review", "approve", "test-linked-r0001", "--by", by)
        assert result.exit_code == 0, result.output
    assert "released" in result.output
    return home


def test_subject_access_command(released: Home) -> None:
    result = run("subject-access", NHS[0][:3], NHS[0][3:6], NHS[0][6:])
    assert result.exit_code == 0, result.output
    assert "test-linked-r0001" in result.output and "hospital_episodes: 2 record(s)" in result.output
    assert NHS[0] not in result.output
    from_stdin = run("subject-access", "-", "--json", stdin=NHS[0] + "\n")
    assert from_stdin.exit_code == 0 and '"release_id": "test-linked-r0001"' in from_stdin.output
    assert run("subject-access", "123").exit_code == 2


def test_subject_access_needs_the_governance_key(released: Home) -> None:
    KeyRing(released.keys).destroy(VAULT)
    result = run("subject-access", NHS[0])
    assert result.exit_code == 1 and "governance lead" in result.output


def test_registers_command(released: Home) -> None:
    result = run("registers")
    assert result.exit_code == 0 and "1 release(s) under 1 agreement(s)" in result.output
    assert "test-linked-r0001" in run("registers", "--show", "releases").output
    assert (released.registers / "data_release_register.parquet").exists()


def test_release_command_refusal_exits_non_zero(released: Home, root: Path) -> None:
    write_agreement(root, agreement_data(id="unlinked", linkages=[]))
    adopted = run("agreements", "adopt", "unlinked", "--by", "Dr Test, Caldicott Guardian", "--reason", "carried over")
    assert adopted.exit_code == 1 and "refused, nothing adopted: unlinked:" in adopted.output, adopted.output
    with Store(released).connect() as con:  # approved before adoption checked the file
        record_unchecked_decision(con, ContractRegistry(root), "unlinked")
    result = run("agreements", "release", "unlinked")
    assert result.exit_code == 1 and "linkage refused" in result.output
    assert "severity 0 refused_linkage" in run("registers", "--show", "breaches").output
