"""Agreement approvals fail closed (issue 18; ``safehaven.share.approvals``).

A file's ``approval:`` block approves nothing by itself: only a decision in the store, made by a
named person (``agreements approve``, or ``agreements adopt`` of the file's block) and pinned to
the file's SHA-256, lets anything flow; every refusal says how to clear it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from safehaven.cli import run as run_cli
from safehaven.cli.common import USAGE
from safehaven.cli.main import main
from safehaven.context import Haven as Context
from safehaven.core import audit
from safehaven.core import registers as reg
from safehaven.core.days import haven_today
from safehaven.core.files import sha256_file
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.store import Store
from safehaven.dispose.planning import agreement_file
from safehaven.intake.contracts import ContractRegistry
from safehaven.share import approvals
from safehaven.share.agreements import AgreementError
from safehaven.share.linkage import find_authority
from safehaven.share.releases import SKIPPED, prepare
from tests.governance_helpers import (
    GOVERNANCE_LEAD,
    adopt,
    agreement_data,
    contracts_root,
    copy_small_haven,
    install_haven_key,
    small_haven_template,
    write_agreement,
)

ROOT = Path(__file__).resolve().parents[2]
LINKED = "test-linked"
SUSPENDED_BLOCK = {"status": "suspended", "approver": "Dr X, CG", "date": "2025-01-01", "reason": "audit due"}


@dataclass
class Haven:
    home: Home
    con: duckdb.DuckDBPyConnection
    registry: ContractRegistry
    keyring: KeyRing

    def prepare(self, agreement_id: str = LINKED):
        context = Context.open(self.home, contracts=self.registry, keyring=self.keyring)
        return prepare(self.con, agreement_id, haven=context)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small haven every test starts from, built once for the module (``haven`` copies it)."""
    root = tmp_path_factory.mktemp("small_haven")
    small_haven_template(root)
    return root


@pytest.fixture
def haven(home: Home, tmp_path: Path, template: Path) -> Iterator[Haven]:
    registry = copy_small_haven(template, home, tmp_path)
    keyring = KeyRing(home.keys)
    with Store(home).connect() as con:
        install_haven_key(con, keyring)
        yield Haven(home, con, registry, keyring)


def test_an_approval_block_in_the_file_alone_releases_nothing_and_says_how_to_clear_it(haven: Haven) -> None:
    write_agreement(haven.registry.root, agreement_data())  # its file says approved
    result = haven.prepare()
    assert result.status == SKIPPED
    assert "has not been approved in this haven (its file says approved, which approves nothing)" in result.reason
    assert f"safehaven agreements approve {LINKED}" in result.reason
    assert f"safehaven agreements adopt {LINKED}" in result.reason
    assert not (haven.home.releases / LINKED).exists() and reg.releases(haven.con) == []
    assert approvals.latest(haven.con, LINKED) is None, "nothing was adopted on the way"


def test_adopt_records_an_audited_file_decision_pinned_to_the_files_hash(haven: Haven) -> None:
    path = write_agreement(haven.registry.root, agreement_data())
    adopt(haven.con, haven.registry, LINKED)
    decision = approvals.latest(haven.con, LINKED)
    assert decision is not None
    assert (decision.decision, decision.source, decision.decided_by) == ("approved", "file", GOVERNANCE_LEAD)
    assert decision.agreement_sha256 == sha256_file(path)
    entry = audit.entries_for(haven.con, agreement=LINKED)[-1]
    assert (entry.action, entry.object, entry.outcome) == ("approve", f"agreement:{LINKED}", "ok")
    detail = entry.detail_value
    assert detail["source"] == "file" and detail["adopted"] is True and detail["sha256"] == sha256_file(path)
    assert detail["by"] == GOVERNANCE_LEAD and detail["adoption_reason"] == "adopted for the test"
    assert haven.prepare().status != SKIPPED


def test_adopt_refuses_without_a_named_person_or_a_reason(haven: Haven) -> None:
    write_agreement(haven.registry.root, agreement_data())
    with pytest.raises(AgreementError, match="name who adopts"):
        approvals.adopt(haven.con, [LINKED], " ", "carried over", registry=haven.registry, actor="ig-lead")
    with pytest.raises(AgreementError, match="give the reason"):
        approvals.adopt(haven.con, [LINKED], GOVERNANCE_LEAD, "", registry=haven.registry, actor="ig-lead")
    assert approvals.latest(haven.con, LINKED) is None


def test_adopt_reports_an_agreement_without_an_approval_block_and_adopts_nothing(haven: Haven) -> None:
    write_agreement(haven.registry.root, agreement_data(approval={"status": "draft"}))
    [outcome] = approvals.adopt(haven.con, None, GOVERNANCE_LEAD, "carried over", registry=haven.registry, actor="x")
    assert outcome.outcome == approvals.NO_BLOCK and "says draft" in outcome.message
    assert approvals.latest(haven.con, LINKED) is None


def test_re_adopting_an_agreement_that_already_has_a_decision_is_a_no_op(haven: Haven) -> None:
    write_agreement(haven.registry.root, agreement_data())
    adopt(haven.con, haven.registry, LINKED)
    [again] = approvals.adopt(haven.con, [LINKED], "Someone Else, SIRO", "again", registry=haven.registry, actor="x")
    assert again.outcome == approvals.ALREADY_DECIDED and "nothing adopted" in again.message
    assert haven.con.execute(f"SELECT count(*) FROM {approvals.DECISIONS}").fetchone() == (1,)


def test_a_file_edited_after_adoption_is_not_approved(haven: Haven) -> None:
    path = write_agreement(haven.registry.root, agreement_data())
    adopt(haven.con, haven.registry, LINKED)
    path.write_text(path.read_text().replace("Annual audit by the haven.", "Audit every two years."))
    result = haven.prepare()
    assert result.status == SKIPPED and "changed since it was approved" in result.reason
    assert f"safehaven agreements approve {LINKED}" in result.reason


def test_a_file_saying_suspended_is_not_overridden_by_an_approval_in_the_store(haven: Haven) -> None:
    path = write_agreement(haven.registry.root, agreement_data(approval=SUSPENDED_BLOCK))
    with pytest.raises(AgreementError, match="file says it is suspended"):
        approvals.approve(haven.con, LINKED, GOVERNANCE_LEAD, registry=haven.registry, actor="ig-lead")
    adopt(haven.con, haven.registry, LINKED)  # adopted as what the file says: suspended
    result = haven.prepare()
    assert result.status == SKIPPED and "is suspended: audit due" in result.reason
    # and were the store to hold an approval of those very bytes, the file's suspension still stands
    file_says = approvals.load_standing(haven.con, LINKED, haven.registry.root)
    approved = approvals.Decision(
        LINKED, "approved", GOVERNANCE_LEAD, haven_today(), None, sha256_file(path), "command"
    )
    standing = approvals.Standing(file_says.agreement, file_says.sha256, approved)
    assert standing.in_force() == (False, f"agreement {LINKED} is suspended: audit due")
    assert agreement_file(haven.registry, LINKED, haven.con).status_on() == "suspended"  # type: ignore[union-attr]


def test_a_linkage_is_not_authorised_by_a_files_approval_block(haven: Haven) -> None:
    write_agreement(haven.registry.root, agreement_data())
    found = approvals.effective_agreements(haven.con, haven.registry.root)
    agreement, why = find_authority(found, "hospital_episodes", "social_care", registry=haven.registry)
    assert agreement is None and f"safehaven agreements approve {LINKED}" in why
    adopt(haven.con, haven.registry, LINKED)
    found = approvals.effective_agreements(haven.con, haven.registry.root)
    assert find_authority(found, "hospital_episodes", "social_care", registry=haven.registry)[0] is not None


def test_disposal_reads_the_stores_decision_not_the_files_block(haven: Haven) -> None:
    write_agreement(haven.registry.root, agreement_data())
    assert agreement_file(haven.registry, LINKED, haven.con).status_on() == "draft"  # type: ignore[union-attr]
    assert agreement_file(haven.registry, LINKED, None).status_on() == "draft"  # type: ignore[union-attr]
    adopt(haven.con, haven.registry, LINKED)
    assert agreement_file(haven.registry, LINKED, haven.con).in_force()[0]  # type: ignore[union-attr]


# --- the commands ------------------------------------------------------------------------


@pytest.fixture
def contracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Home) -> Path:
    """A copy of the project's contracts, named by $SAFEHAVEN_CONTRACTS."""
    root = tmp_path / "contracts"
    shutil.copytree(ROOT / "data_contracts", root)
    monkeypatch.setenv("SAFEHAVEN_CONTRACTS", str(root))
    return root


def _decisions(home: Home) -> dict[str, tuple[str, str, str]]:
    with Store(home).connect() as con:
        rows = con.execute(f"SELECT agreement_id, decision, source, decided_by FROM {approvals.DECISIONS}").fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_agreements_adopt_records_named_file_decisions_and_reports_the_rest(contracts: Path, home: Home) -> None:
    by = "Dr A. Example, Caldicott Guardian"
    args = ["agreements", "adopt", "--all", "--by", by, "--reason", "approved before the store held decisions"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "research-hes-asc-linked: adopted as approved by Dr A. Example" in result.output
    assert "cohort-consent-study: its file's approval block says draft; nothing to adopt" in result.output
    decisions = _decisions(home)
    assert decisions["research-hes-asc-linked"] == ("approved", "file", by)
    assert decisions["risk-stratification"][:2] == ("suspended", "file")
    assert "cohort-consent-study" not in decisions and "flu-surveillance-2024" not in decisions
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "already approved in this haven; nothing adopted" in again.output
    assert _decisions(home) == decisions


def test_agreements_adopt_refuses_a_file_with_problems_in_one_line_and_records_nothing(
    contracts: Path, home: Home
) -> None:
    write_agreement(contracts, agreement_data(id="no-basis", legal_basis={"basis": "anonymised"}))
    with Store(home).connect() as con:
        approvals.ensure_tables(con)
        before = len(audit.entries_for(con))
    by = "Dr A. Example, Caldicott Guardian"
    for args in (["no-basis"], ["--all"]):  # --all: the clean files are not adopted either
        result = CliRunner().invoke(main, ["agreements", "adopt", *args, "--by", by, "--reason", "carried over"])
        assert result.exit_code == 1, result.output
        assert result.output.count("\n") == 1 and result.output.startswith("refused, nothing adopted: no-basis: ")
        assert "pseudonymised" in result.output and "safehaven agreements validate no-basis" in result.output
        assert _decisions(home) == {}
        with Store(home).connect() as con:
            assert len(audit.entries_for(con)) == before, "nothing audited"


def test_agreements_adopt_refuses_without_by(contracts: Path, home: Home) -> None:
    result = CliRunner().invoke(main, ["agreements", "adopt", "--all", "--reason", "carried over"])
    assert result.exit_code == USAGE and "--by" in result.output
    assert not home.store_file.exists() or _decisions(home) == {}


def test_agreements_adopt_is_an_audited_command() -> None:
    from safehaven.cli.audit import AUDITED_COMMANDS

    assert ("agreements", "adopt") in AUDITED_COMMANDS


def _run(monkeypatch: pytest.MonkeyPatch, *args: str):
    """``safehaven run`` with the job itself replaced (only the set-up before it is under test)."""
    monkeypatch.setattr(run_cli, "_execute", lambda home, verbose, in_process, months=None: (True, [], None))
    return CliRunner().invoke(main, ["run", *args])


def test_the_demo_run_adopts_the_demo_agreements_and_says_so(
    contracts: Path, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(monkeypatch, "--demo-patients", "20")
    assert result.exit_code == 0, result.output
    assert "generated a synthetic demo drop" in result.output
    assert f"adopting the example agreements' approvals as '{run_cli.DEMO_ADOPTER}'" in result.output
    assert "statutory-gp-audit: adopted as approved by demo set-up (make run)" in result.output
    assert _decisions(home)["research-hes-asc-linked"] == ("approved", "file", run_cli.DEMO_ADOPTER)


def test_a_run_that_generates_no_demo_drop_adopts_nothing(
    contracts: Path, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(monkeypatch, "--no-demo")
    assert result.exit_code == 0, result.output
    assert "adopting" not in result.output
    assert not home.store_file.exists() or _decisions(home) == {}


# --- the decisions are checked against the audit trail ------------------------------------


def _approve_with_sql(haven: Haven, sha: str, decision: str = "approved") -> None:
    """What someone holding the store key could do: record a decision no person made."""
    haven.con.execute(
        f"INSERT INTO {approvals.DECISIONS} SELECT coalesce(max(decision_id), 0) + 1, ?, ?, 'Dr Forged, CG', "
        f"current_date, NULL, '1', ?, 'command', 'x', now() FROM {approvals.DECISIONS}",
        [LINKED, decision, sha],
    )


def test_an_approval_inserted_in_the_store_without_its_audit_entry_releases_nothing(haven: Haven) -> None:
    path = write_agreement(haven.registry.root, agreement_data())
    approvals.ensure_tables(haven.con)
    _approve_with_sql(haven, sha256_file(path))
    result = haven.prepare()
    assert result.status == SKIPPED
    assert "decision in the store is not the audit trail's latest (none)" in result.reason
    assert f"safehaven agreements approve {LINKED}" in result.reason
    assert not (haven.home.releases / LINKED).exists()


def test_a_suspension_deleted_from_the_store_does_not_revive_the_approval(haven: Haven) -> None:
    write_agreement(haven.registry.root, agreement_data())
    adopt(haven.con, haven.registry, LINKED)
    approvals.suspend(haven.con, LINKED, "audit overdue", "Dr Y, CG", registry=haven.registry, actor="ig-lead")
    haven.con.execute(f"DELETE FROM {approvals.DECISIONS} WHERE decision = 'suspended'")
    result = haven.prepare()
    assert result.status == SKIPPED and "is not the audit trail's latest (suspend by Dr Y, CG)" in result.reason
    approvals.approve(haven.con, LINKED, "Dr Z, CG", registry=haven.registry, actor="ig-lead")  # a person decides again
    assert haven.prepare().status != SKIPPED


def test_a_suspension_reason_that_may_hold_an_nhs_number_is_refused_and_nothing_is_recorded(haven: Haven) -> None:
    """The reason is kept in the store, the audit trail and the exported decisions: one that may
    spell an NHS number is refused in one line before the decision is written (found by review:
    the suspension stood in the store with no audit entry after a traceback)."""
    write_agreement(haven.registry.root, agreement_data())
    adopt(haven.con, haven.registry, LINKED)
    entries = len(audit.entries_for(haven.con))
    for reason, by in (("complaint from 943 476 5919", "Dr Y, CG"), ("audit overdue", "9434765919")):
        with pytest.raises(AgreementError, match="looks like it holds an NHS number"):
            approvals.suspend(haven.con, LINKED, reason, by, registry=haven.registry, actor="ig-lead")
    assert approvals.latest(haven.con, LINKED).decision == approvals.APPROVED
    assert len(audit.entries_for(haven.con)) == entries


def test_an_adoption_reason_that_may_hold_an_nhs_number_is_refused_and_nothing_is_recorded(haven: Haven) -> None:
    """The person's reason for adopting a file's approval goes into the audit entry's detail: one
    that may spell an NHS number left the decision in the store with no entry (found by review)."""
    write_agreement(haven.registry.root, agreement_data())
    with pytest.raises(AgreementError, match="looks like it holds an NHS number"):
        approvals.adopt(haven.con, [LINKED], "Dr Y, CG", "as agreed with 943 476 5919", registry=haven.registry,
                        actor="ig-lead")  # fmt: skip
    assert approvals.latest(haven.con, LINKED) is None


def test_a_decision_changed_in_the_store_and_in_its_audit_entry_does_not_verify(haven: Haven) -> None:
    write_agreement(haven.registry.root, agreement_data())
    adopt(haven.con, haven.registry, LINKED)
    approvals.suspend(haven.con, LINKED, "audit overdue", "Dr Y, CG", registry=haven.registry, actor="ig-lead")
    haven.con.execute(f"UPDATE {approvals.DECISIONS} SET decision = 'approved' WHERE decision = 'suspended'")
    haven.con.execute(f"UPDATE {audit.TABLE} SET action = 'approve' WHERE action = 'suspend'")
    standing = approvals.load_standing(haven.con, LINKED, haven.registry.root)
    assert "the audit entry of agreement test-linked's decision does not verify" in (standing.not_approved() or "")
    assert standing.in_force()[0] is False


def test_disposal_neither_acts_on_nor_ignores_a_decision_that_is_not_the_trails(haven: Haven) -> None:

    from safehaven.dispose import schedule
    from safehaven.dispose.model import DisposalError

    path = write_agreement(haven.registry.root, agreement_data())
    adopt(haven.con, haven.registry, LINKED)
    _approve_with_sql(haven, sha256_file(path), decision="suspended")  # "suspended", by no one
    haven.con.execute(f"UPDATE {approvals.DECISIONS} SET reason = 'breach of onward sharing' WHERE decision_id = 2")
    agreement = approvals.load_standing(haven.con, LINKED, haven.registry.root).agreement
    [item] = schedule._agreement_items(haven.home, LINKED, agreement, path, haven.con, haven_today())
    assert item.action == "review" and "not the audit trail's latest" in item.reason
    with pytest.raises(DisposalError, match="not the audit trail's latest"):
        agreement_file(haven.registry, LINKED, haven.con)


def test_every_field_of_a_decision_is_checked_and_no_stored_text_is_quoted(haven: Haven) -> None:
    write_agreement(haven.registry.root, agreement_data())
    adopt(haven.con, haven.registry, LINKED)
    haven.con.execute(f"UPDATE {approvals.DECISIONS} SET decided_on = DATE '2001-01-01'")
    assert approvals.load_standing(haven.con, LINKED, haven.registry.root).unaudited
    haven.con.execute(f"UPDATE {approvals.DECISIONS} SET decided_by = '943 476 5919'")
    result = haven.prepare()
    assert result.status == SKIPPED and "943 476 5919" not in result.reason


def test_a_decision_made_before_a_breach_of_the_trail_that_was_resolved_still_stands(haven: Haven) -> None:
    """A later entry altered, recorded as a breach and resolved (``audit resolve``) writes off that
    range only: the decision before it is still on record, as ``verify`` reads the trail."""
    write_agreement(haven.registry.root, agreement_data())
    adopt(haven.con, haven.registry, LINKED)
    seq = audit.append(haven.con, actor="p", role="pipeline", action="x", object="t", detail={"n": 1})
    audit.append(haven.con, actor="p", role="pipeline", action="x", object="t", detail={"n": 2})
    haven.con.execute(f"UPDATE {audit.TABLE} SET detail = '{{\"n\":9}}' WHERE seq = ?", [seq])
    assert "does not verify" in (approvals.load_standing(haven.con, LINKED, haven.registry.root).unaudited or "")
    audit.resolve(haven.con, haven.home, actor="ig-lead", decision="entry altered; investigated; resume")
    assert approvals.load_standing(haven.con, LINKED, haven.registry.root).unaudited is None
    assert haven.prepare().status != SKIPPED


def test_the_terms_acted_on_and_the_hash_compared_come_from_one_read_of_the_file(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An approval is pinned to the file's SHA-256. Parsed from one read and hashed from another,
    a widened file swapped in for the parse and the approved bytes swapped back for the hash ran
    under the old approval (found by review): now whatever is parsed is what is hashed."""
    from safehaven.core import yamlio
    from safehaven.share import agreements

    root = contracts_root(tmp_path)
    registry = ContractRegistry(root)
    path = write_agreement(root, agreement_data())
    approved = path.read_bytes()
    with Store(home).connect() as con:
        adopt(con, registry, "test-linked")
        write_agreement(root, agreement_data(recipient={"name": "Data Broker Ltd (private)", "public_body": False}))
        real = yamlio.safe_load

        def swapped_back_while_parsed(text: str) -> object:
            path.write_bytes(approved)  # the insider's rename lands while the widened text is parsed
            return real(text)

        monkeypatch.setattr(agreements.yamlio, "safe_load", swapped_back_while_parsed)
        standing = approvals.load_standing(con, "test-linked", root)
    assert standing.agreement.recipient.name == "Data Broker Ltd (private)"
    ok, why = standing.in_force()
    assert not ok and "changed" in why


def test_an_agreement_id_is_not_approved_again_for_another_recipient(home: Home, tmp_path: Path) -> None:
    """The pseudonym domain and the release members belong to the agreement id: approved again for
    a new recipient, the old id gave it pseudonyms linking to the old recipient's extracts and let
    re-identification resolve the old recipient's people (found by review). Refused; a new recipient
    needs a new agreement."""
    root = contracts_root(tmp_path)
    registry = ContractRegistry(root)
    write_agreement(root, agreement_data())
    with Store(home).connect() as con:
        approvals.approve(con, "test-linked", "Dr Test, Caldicott Guardian", registry=registry, actor="ig")
        write_agreement(root, agreement_data(recipient={"name": "Another Body Ltd", "public_body": False}))
        with pytest.raises(AgreementError, match="A new recipient needs a new agreement"):
            approvals.approve(con, "test-linked", "Dr Test, Caldicott Guardian", registry=registry, actor="ig")
        write_agreement(root, agreement_data(version="1.1"))  # the same recipient: approved again as ever
        approvals.approve(con, "test-linked", "Dr Test, Caldicott Guardian", registry=registry, actor="ig")
