"""Tests for ``safehaven.share.review``: nothing leaves that two people have not checked.

The issue's required properties: a release is not delivered before two distinct reviewers
approve; the operator or one person twice cannot approve; a file changed after review is
refused at release; an unchanged nightly run opens no request and adds no register row; a
changed agreement file needs re-approval; a routine flow releases by its declared rule; every
transition appears in the audit trail.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from safehaven.context import Haven as Context
from safehaven.core import audit
from safehaven.core import days as haven_days
from safehaven.core import registers as reg
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.share import approvals, review
from safehaven.share.releases import MANIFEST, PREPARED, SKIPPED, UNCHANGED, prepare
from tests.conftest import leaked_nhs_numbers
from tests.governance_helpers import (
    BASE,
    NHS,
    REVIEWERS,
    adopt,
    agreement_data,
    approve_as,
    copy_small_haven,
    delivery_stopped,
    install_haven_key,
    logged_in_as,
    login_of,
    small_haven_template,
    write_agreement,
)

R1, R2 = REVIEWERS
OPERATOR = "night-operator"
CG = "Dr A. Example, Caldicott Guardian"


@dataclass
class Haven:
    home: Home
    con: duckdb.DuckDBPyConnection
    registry: ContractRegistry
    keyring: KeyRing

    def add(self, **overrides: Any) -> Path:
        """Write the agreement and adopt its approval block, as the governance lead would."""
        path = write_agreement(self.registry.root, agreement_data(**overrides))
        adopt(self.con, self.registry, path.stem)
        return path

    def prepare(self, agreement_id: str = "test-linked"):
        context = Context.open(self.home, contracts=self.registry, keyring=self.keyring, actor=OPERATOR)
        return prepare(self.con, agreement_id, haven=context)

    def approve(self, release_id: str, by: str, *, login: str | None = None, **kwargs: Any) -> review.Request:
        """``by``'s approval at their own OS login (``login``, else ``login_of(by)``)."""
        return approve_as(self.con, release_id, by, login=login, home=self.home, registry=self.registry, **kwargs)

    def deliver(self, release_id: str, by: str = "V. Keeper, custodian") -> review.Request:
        return review.deliver(self.con, release_id, home=self.home, registry=self.registry, by=by)

    def delivered(self, agreement_id: str = "test-linked") -> list[str]:
        folder = self.home.releases / agreement_id
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


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


def test_nightly_run_prepares_into_staging_and_delivers_nothing(haven: Haven) -> None:
    haven.add()
    result = haven.prepare()
    assert result.status == PREPARED and result.release_id == "test-linked-r0001"
    staged = haven.home.root / "staging" / "releases" / "test-linked-r0001"
    assert result.directory == staged and (staged / MANIFEST).exists()
    assert stat.S_IMODE(staged.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in staged.iterdir()} == {0o600}
    assert json.loads((staged / MANIFEST).read_text())["review"]["rule"] == review.TWO_REVIEWERS
    assert haven.delivered() == [] and reg.releases(haven.con) == []
    assert review.get(haven.con, "test-linked-r0001").state == review.PREPARED
    members = haven.con.execute("SELECT count(*) FROM governance.release_members").fetchone()[0]
    assert members == 0  # nobody is recorded as released before anything leaves


def test_release_is_not_delivered_before_two_distinct_reviewers_approve(haven: Haven) -> None:
    haven.add()
    rid = haven.prepare().release_id
    assert haven.approve(rid, R1).state == review.APPROVED_BY_ONE
    assert haven.delivered() == [] and reg.releases(haven.con) == []
    req = haven.approve(rid, R2)
    assert req.state == review.RELEASED
    assert haven.delivered() == [rid]
    (row,) = reg.releases(haven.con)
    assert row["review_rule"] == review.TWO_REVIEWERS and row["reviewed_by"] == f"{R1}; {R2}"
    assert not req.staging_dir.exists()
    assert (haven.home.registers / "release_requests.csv").exists()


def test_each_file_needs_each_reviewers_decision(haven: Haven) -> None:
    haven.add()
    rid = haven.prepare().release_id
    haven.approve(rid, R1, files=["hospital_episodes.parquet"])
    assert review.get(haven.con, rid).state == review.PREPARED  # social_care.parquet not yet decided
    haven.approve(rid, R1, files=["social_care.parquet"])
    assert review.get(haven.con, rid).state == review.APPROVED_BY_ONE


@pytest.mark.parametrize("who", [OPERATOR, f"  {OPERATOR.upper()} "], ids=["same", "spelt-differently"])
def test_the_operator_of_the_run_cannot_approve(haven: Haven, who: str) -> None:
    haven.add()
    rid = haven.prepare().release_id
    with pytest.raises(review.ReviewError, match="operated the run"):
        haven.approve(rid, who)
    assert review.get(haven.con, rid).state == review.PREPARED


def test_one_person_cannot_approve_twice(haven: Haven) -> None:
    haven.add()
    rid = haven.prepare().release_id
    haven.approve(rid, R1)
    with pytest.raises(review.ReviewError, match="already approved"):
        haven.approve(rid, R1.lower())
    assert review.get(haven.con, rid).state == review.APPROVED_BY_ONE and haven.delivered() == []


def test_a_file_changed_after_review_is_refused_at_release(haven: Haven) -> None:
    haven.add(identifiability="pseudonymised")
    rid = haven.prepare().release_id
    haven.approve(rid, R1)
    staged = review.get(haven.con, rid).staging_dir / "social_care.parquet"
    staged.write_bytes(staged.read_bytes() + b"\0")  # changed after the first reviewer saw it
    with pytest.raises(review.ReviewError, match="not the file that was prepared"):
        haven.approve(rid, R2)
    assert haven.delivered() == [] and reg.releases(haven.con) == []


def test_a_file_changed_after_approval_is_refused_at_delivery_and_keeps_being_refused(haven: Haven) -> None:
    """Identifiable-style flow: approved by two, then delivered separately (the custodian's step)."""
    haven.add()
    rid = haven.prepare().release_id
    haven.con.execute(f"UPDATE {review.REQUESTS} SET rule = ? WHERE release_id = ?",
                      [review.TWO_REVIEWERS_AND_CUSTODIAN, rid])  # fmt: skip
    haven.approve(rid, R1)
    assert haven.approve(rid, R2).state == review.APPROVED  # waits for the custodian
    staged = review.get(haven.con, rid).staging_dir / "hospital_episodes.parquet"
    staged.write_bytes(b"not what was reviewed")
    for _ in range(2):
        with pytest.raises(review.ReviewError, match="refused: hospital_episodes.parquet is not the file"):
            haven.deliver(rid)
    assert haven.delivered() == [] and reg.releases(haven.con) == []
    assert [b["kind"] for b in reg.breaches(haven.con)] == ["reviewed_file_changed"] * 2
    review.withdraw(haven.con, rid, "V. Keeper, custodian", "staged file changed after review")
    assert review.get(haven.con, rid).state == review.WITHDRAWN
    assert haven.prepare().status == PREPARED  # the next run offers it again


def test_an_unchanged_nightly_run_opens_no_request_and_adds_no_register_row(haven: Haven) -> None:
    haven.add()
    rid = haven.prepare().release_id
    haven.approve(rid, R1)
    haven.approve(rid, R2)
    again = haven.prepare()
    assert again.status == UNCHANGED and again.release_id == rid
    assert [r.release_id for r in review.requests(haven.con)] == [rid]
    assert len(reg.releases(haven.con)) == 1 and haven.delivered() == [rid]
    assert not any((haven.home.root / "staging" / "releases").iterdir())
    # while a request waits, the same content is not opened twice either
    haven.con.execute("DELETE FROM haven.social_care WHERE sex = '2'")
    waiting = haven.prepare()
    assert waiting.status == PREPARED and haven.prepare().status == UNCHANGED
    assert [r.state for r in review.requests(haven.con)] == [review.RELEASED, review.PREPARED]


def test_changed_data_supersedes_the_waiting_request(haven: Haven) -> None:
    haven.add()
    first = haven.prepare().release_id
    haven.con.execute("DELETE FROM haven.social_care WHERE sex = '2'")
    second = haven.prepare().release_id
    assert (first, second) == ("test-linked-r0001", "test-linked-r0002")
    assert review.get(haven.con, first).state == review.SUPERSEDED
    assert not review.get(haven.con, first).staging_dir.exists()
    with pytest.raises(review.ReviewError, match="only a prepared request"):
        haven.approve(first, R1)


def test_a_request_that_will_never_leave_has_its_staged_files_shredded(haven: Haven, tmp_path) -> None:  # noqa: ANN001
    """Rejected, withdrawn or superseded: the staged record-level files are overwritten before
    they are unlinked (a hard link made outside the haven sees random bytes, not the extract)."""
    haven.add()
    rid = haven.prepare().release_id
    staged = sorted(p for p in review.get(haven.con, rid).staging_dir.rglob("*") if p.is_file())
    assert staged
    witnesses = []
    for i, path in enumerate(staged):
        witness = tmp_path / f"witness-{i}"
        os.link(path, witness)
        witnesses.append((witness, path.read_bytes()))
    review.reject(haven.con, rid, R1, "the cohort is too small to leave")
    assert not review.get(haven.con, rid).staging_dir.exists()
    for witness, before in witnesses:
        after = witness.read_bytes()
        assert len(after) == len(before) and after != before


def test_a_failed_shredding_leaves_nothing_deliverable_and_is_retried_by_the_next_run(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    haven.add()
    rid = haven.prepare().release_id
    staging = review.get(haven.con, rid).staging_dir
    real, failed = review.shred_tree, []

    def fails_once(root: Path, *args: Any, **kwargs: Any) -> int:
        if not failed:
            failed.append(root)
            raise OSError("input/output error while shredding")
        return real(root, *args, **kwargs)

    monkeypatch.setattr(review, "shred_tree", fails_once)
    with pytest.raises(OSError, match="input/output error"):
        review.withdraw(haven.con, rid, CG, "the staged files were changed by hand")
    assert failed == [staging] and staging.exists(), "the shredding failed and left the files"
    assert review.get(haven.con, rid).state == review.WITHDRAWN, "the state is recorded: it will never leave"
    with pytest.raises(review.ReviewError):
        haven.deliver(rid, CG)
    assert haven.delivered() == []
    assert haven.prepare().status == PREPARED  # the next run opens a request, and first retries the shredding
    assert not staging.exists()
    assert review.shred_discarded(haven.con) == [], "nothing is left to retry"


@pytest.mark.parametrize("dangling", [False, True], ids=["link", "dangling link"])
def test_a_withdrawal_whose_staged_folder_is_a_link_is_refused_and_retried_until_put_back(
    haven: Haven, tmp_path: Path, dangling: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The staged folder moved out and linked back: the withdrawal unlinked the link and recorded
    the request withdrawn and shredded while its files survived outside. Refused saying what to do
    (the request stays withdrawn: it will never leave), retried at every later discard or run and
    refused again (logged), the files outside untouched, while the next preparation goes on (one
    refusal failed every agreement's release each night: found by review); once put back, they
    are shredded (CoP 27b, 49; found by review)."""
    haven.add()
    rid = haven.prepare().release_id
    staging = review.get(haven.con, rid).staging_dir
    held = sorted(p.name for p in staging.rglob("*"))
    outside = tmp_path / "insider" / staging.name
    outside.parent.mkdir()
    shutil.move(staging, outside)
    staging.symlink_to(outside.with_name("gone") if dangling else outside)
    with pytest.raises(review.ReviewError, match=f"staging/releases/{rid} is a symbolic link.*Put them back"):
        review.withdraw(haven.con, rid, CG, "the staged files were changed by hand")
    assert review.get(haven.con, rid).state == review.WITHDRAWN and staging.is_symlink()
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger=review.log.name):
            assert review.shred_discarded(haven.con) == []
        assert f"the shredding of {rid} is refused" in caplog.text and "is a symbolic link" in caplog.text
        caplog.clear()
    assert haven.prepare().release_id != rid, "the next preparation goes on"
    assert sorted(p.name for p in outside.rglob("*")) == held
    [(listed, why)] = review.unshredded(haven.con)
    assert listed == rid and "is a symbolic link" in why and "Put them back" in why
    staging.unlink()
    shutil.move(outside, staging)
    assert review.shred_discarded(haven.con) == [rid] and not os.path.lexists(staging)
    assert review.unshredded(haven.con) == []
    refused, done = _shredding_entries(haven, rid)
    assert len(refused) == 1, "refused at the withdrawal and at three retries: audited once, the same reason"
    assert "is a symbolic link" in refused[0].detail_value["reason"]
    assert [e.detail_value["refused_at_seq"] for e in done] == [refused[0].seq], "the retry that shredded is audited"


def _shredding_entries(haven: Haven, rid: str) -> tuple[list[audit.Entry], list[audit.Entry]]:
    """The audited refusals of a request's shredding, and the retries that shredded it after one."""
    entries = audit.entries_for(haven.con, object_like=f"release-request:{rid}")
    return (
        [e for e in entries if e.action == review.SHRED_REFUSED_ACTION],
        [e for e in entries if e.action == review.SHRED_DONE_ACTION],
    )


def test_a_refused_shredding_is_audited_again_when_its_reason_changes_and_a_disk_error_stops_no_run(
    haven: Haven, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link in place of the staged folder, then, once it is put back, a disk error while
    shredding: two reasons, two audited refusals (no entry for a retry refused for the same
    reason); the disk error does not stop the next preparation (it is retried like a refusal,
    CoP 27b), and the retry that shreds is audited."""
    haven.add()
    rid = haven.prepare().release_id
    staging = review.get(haven.con, rid).staging_dir
    outside = tmp_path / "insider"
    shutil.move(staging, outside)
    staging.symlink_to(outside)
    with pytest.raises(review.ReviewError):
        review.reject(haven.con, rid, R1, "the cohort is too small to leave")
    staging.unlink()
    shutil.move(outside, staging)
    with monkeypatch.context() as m:
        m.setattr(review, "shred_tree", lambda *_a: (_ for _ in ()).throw(OSError(5, "Input/output error", "x.csv")))
        assert review.shred_discarded(haven.con) == [] and review.shred_discarded(haven.con) == []
        haven.con.execute("DELETE FROM haven.social_care WHERE sex = '2'")
        assert haven.prepare().status == PREPARED, "a disk error while shredding does not stop the next preparation"
        [(_, why)] = review.unshredded(haven.con)
        assert why.startswith("OSError (Input/output error) at ")
    refused, done = _shredding_entries(haven, rid)
    assert [("symbolic link" in e.detail_value["reason"], "OSError" in e.detail_value["reason"]) for e in refused] == [
        (True, False),
        (False, True),
    ]
    assert done == []
    assert review.shred_discarded(haven.con) == [rid] and not staging.exists()
    assert len(_shredding_entries(haven, rid)[1]) == 1


def test_a_withdrawal_under_a_dangling_link_in_place_of_staging_releases_is_refused_at_every_retry(
    haven: Haven, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``staging/releases`` moved out and a dangling link left: the withdrawal is refused, and so is
    every retry (its staged folder is not "there" through the link, so it was never retried: found
    by review); the files moved out are untouched."""
    haven.add()
    rid = haven.prepare().release_id
    staging = review.get(haven.con, rid).staging_dir
    shutil.move(staging.parent, tmp_path / "moved")
    staging.parent.symlink_to(tmp_path / "gone")
    with pytest.raises(review.ReviewError, match="staging/releases is a symbolic link"):
        review.withdraw(haven.con, rid, CG, "the staged files were changed by hand")
    with caplog.at_level(logging.WARNING, logger=review.log.name):
        assert review.shred_discarded(haven.con) == []
    assert f"the shredding of {rid} is refused" in caplog.text
    assert (tmp_path / "moved" / staging.name).is_dir()


def test_return_and_reject_need_a_comment_and_release_nothing(haven: Haven) -> None:
    haven.add()
    rid = haven.prepare().release_id
    with pytest.raises(review.ReviewError, match="say why"):
        review.return_request(haven.con, rid, R1, "")
    assert review.return_request(haven.con, rid, R1, "drop the admission date").state == review.RETURNED
    haven.con.execute("DELETE FROM haven.social_care WHERE sex = '2'")
    rid2 = haven.prepare().release_id
    assert review.reject(haven.con, rid2, R2, "the cohort is too small to leave").state == review.REJECTED
    assert haven.prepare().status == UNCHANGED  # rejected content is not offered again
    assert haven.delivered() == [] and reg.releases(haven.con) == []


def test_a_changed_agreement_file_needs_re_approval(haven: Haven) -> None:
    path = haven.add()
    assert haven.prepare().status == PREPARED  # the file's approval adopted by the lead, pinned to its hash
    path.write_text(path.read_text().replace("Annual audit by the haven.", "Audit every two years."))
    result = haven.prepare()
    assert result.status == SKIPPED and "changed since it was approved" in result.reason
    assert "safehaven agreements approve test-linked" in result.reason
    # an edit of the file's own approval block does not approve it either
    path.write_text(path.read_text().replace("Dr Test", "Dr Forged"))
    assert haven.prepare().status == SKIPPED
    approvals.approve(haven.con, "test-linked", CG, registry=haven.registry, actor="ig-lead")
    assert haven.prepare().status in (PREPARED, UNCHANGED)


def test_a_suspension_in_the_store_stops_preparation(haven: Haven) -> None:
    haven.add()
    approvals.approve(haven.con, "test-linked", CG, registry=haven.registry, actor="ig-lead")
    approvals.suspend(haven.con, "test-linked", "audit of onward sharing", CG, registry=haven.registry,
                      actor="ig-lead")  # fmt: skip
    result = haven.prepare()
    assert result.status == SKIPPED and "suspended: audit of onward sharing" in result.reason


@pytest.mark.parametrize(
    ("routine", "reviewers", "rule"),
    [("one_reviewer", (R1,), review.ONE_REVIEWER), ("automatic", (), review.AUTOMATIC)],
)
def test_a_routine_flow_releases_by_its_declared_rule(
    haven: Haven, routine: str, reviewers: tuple[str, ...], rule: str
) -> None:
    haven.add(routine_release=routine)
    first = haven.prepare()
    assert first.rule == review.TWO_REVIEWERS  # the first release always has two reviewers
    haven.approve(first.release_id, R1)
    haven.approve(first.release_id, R2)
    haven.con.execute("DELETE FROM haven.social_care WHERE sex = '2'")  # new data, same fields and checks
    second = haven.prepare()
    assert second.rule == rule
    for by in reviewers:
        haven.approve(second.release_id, by)
    assert haven.delivered() == [first.release_id, second.release_id]
    rows = reg.releases(haven.con)
    assert [r["review_rule"] for r in rows] == [review.TWO_REVIEWERS, rule]
    manifest = json.loads((haven.home.releases / "test-linked" / second.release_id / MANIFEST).read_text())
    assert manifest["review"]["rule"] == rule


def test_identifiable_requests_always_need_two_reviewers_and_the_custodian(haven: Haven) -> None:
    from safehaven.share.agreements import Agreement
    from safehaven.share.releases import review_rule

    a = Agreement.model_validate(agreement_data(identifiability="identifiable", routine_release="automatic"))
    assert review_rule(haven.con, a, "any shape")[0] == review.TWO_REVIEWERS_AND_CUSTODIAN


def test_checker_summary_is_counts_only(haven: Haven) -> None:
    haven.add()
    req = review.get(haven.con, haven.prepare().release_id)
    files = {f["file"]: f for f in req.summary["files"]}
    he = files["hospital_episodes.parquet"]
    assert he["rows"] > 0 and he["people"] > 0
    assert {c["name"]: c["class"] for c in he["columns"]}["person_id"] == "pseudonym"
    assert he["k_per_person"]["smallest_group"] >= 5 and he["k_per_person"]["people_below_k"] == 0
    assert req.summary["records_withheld_objections"] == 3
    text = json.dumps(req.summary)
    assert not any(n in text for n in NHS) and leaked_nhs_numbers([haven.home.root], set(NHS)) == {}


def test_every_transition_appears_in_the_audit_trail(haven: Haven) -> None:
    haven.add()
    rid = haven.prepare().release_id
    review.return_request(haven.con, rid, R1, "please coarsen further")
    haven.con.execute("DELETE FROM haven.social_care WHERE sex = '2'")
    rid2 = haven.prepare().release_id
    haven.approve(rid2, R1)
    haven.approve(rid2, R2)
    trail = [
        (e.object.removeprefix("release-request:"), e.action, e.actor, (e.detail_value or {}).get("to"))
        for e in audit.entries_for(haven.con, object_like="release-request:%")
    ]
    assert trail == [
        (rid, "review.prepare", OPERATOR, review.PREPARED),
        (rid, "review.return", R1, review.RETURNED),
        (rid2, "review.prepare", OPERATOR, review.PREPARED),
        (rid, "review.supersede", OPERATOR, review.SUPERSEDED),
        (rid2, "review.decide", R1, None),
        (rid2, "review.approve_first", R1, review.APPROVED_BY_ONE),
        (rid2, "review.decide", R2, None),
        (rid2, "review.approve", R2, review.APPROVED),
        (rid2, "review.release", R2, review.RELEASED),
    ]
    assert audit.verify(haven.con).ok


def test_while_a_request_awaits_review_reviewers_see_only_how_many_reviews_are_in(haven: Haven) -> None:
    """Blinded review (SATRE 3.3.05; the OpenSAFELY Airlock): not who reviewed, nor any decision or comment."""
    haven.add()
    rid = haven.prepare().release_id
    req = review.get(haven.con, rid)
    assert review.reviews_view(haven.con, req) == {
        "blinded": True, "reviews_in": 0, "reviews_needed": 2, "approved_by": None, "decisions": None,
    }  # fmt: skip
    haven.approve(rid, R1, files=["hospital_episodes.parquet"], comment="rounded ok")
    assert review.reviews_view(haven.con, review.get(haven.con, rid))["reviews_in"] == 0  # one file is not a review
    req = haven.approve(rid, R1, files=["social_care.parquet"], comment="fine by me")
    view = review.reviews_view(haven.con, req)
    assert req.state == review.APPROVED_BY_ONE
    assert view == {"blinded": True, "reviews_in": 1, "reviews_needed": 2, "approved_by": None, "decisions": None}
    assert R1 not in json.dumps(view) and "fine by me" not in json.dumps(view)
    # the audit trail still records every decision as it is made (the custodian's record)
    trail = audit.entries_for(haven.con, object_like=f"release-request:{rid}")
    decided = [e for e in trail if e.action == "review.decide"]
    assert [(e.actor, e.detail_value["comment"]) for e in decided] == [(R1, "rounded ok"), (R1, "fine by me")]


@pytest.mark.parametrize("ending", ["release", "return"])
def test_once_a_request_leaves_review_every_reviewer_decision_and_comment_is_shown(haven: Haven, ending: str) -> None:
    haven.add()
    rid = haven.prepare().release_id
    haven.approve(rid, R1, comment="fine by me")
    if ending == "release":
        req = haven.approve(rid, R2)
    else:
        req = review.return_request(haven.con, rid, R2, "coarsen the admission date")
    view = review.reviews_view(haven.con, req)
    assert view["blinded"] is False and view["reviews_in"] == 2
    assert view["approved_by"] == ([R1, R2] if ending == "release" else [R1])
    seen = {(d["reviewer"], d["file"], d["decision"], d["comment"]) for d in view["decisions"]}
    files = ("hospital_episodes.parquet", "social_care.parquet")
    theirs = ("approve", None) if ending == "release" else ("return", "coarsen the admission date")
    assert seen == {(R1, f, "approve", "fine by me") for f in files} | {(R2, f, *theirs) for f in files}


def test_transitions_are_listed_in_one_place() -> None:
    assert set(review.TRANSITIONS["withdraw"]) == set(review.OPEN)
    assert review.TRANSITIONS["release"] == {review.APPROVED: review.RELEASED}
    finals = {review.RELEASED, review.REJECTED, review.WITHDRAWN, review.SUPERSEDED}
    assert not any(state in moves for moves in review.TRANSITIONS.values() for state in finals)


def test_aggregate_summary_says_every_count_is_a_multiple_of_5_or_suppressed(haven: Haven) -> None:
    haven.add(
        id="anon-test",
        instrument="agreement",
        recipient={"name": "The public", "public_body": True},
        identifiability="anonymised",
        legal_basis={"basis": "anonymised"},
    )
    req = review.get(haven.con, haven.prepare("anon-test").release_id)
    for f in req.summary["files"]:
        assert f["every_count_multiple_of_5_or_suppressed"] is True
        assert f["min_nonzero_count"] is None or f["min_nonzero_count"] >= 5
        assert "people" not in f and {c["class"] for c in f["columns"]} >= {"count"}


def test_review_commands_through_the_cli(haven: Haven, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from safehaven.cli.main import main
    from safehaven.core.registers import current_actor

    monkeypatch.setenv("SAFEHAVEN_CONTRACTS", str(haven.registry.root))
    haven.add()
    haven.con.close()  # the CLI opens the store itself (one writer)

    def run(*args: str):
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    assert "prepared test-linked-r0001" in run("agreements", "release", "test-linked").output
    listing = run("review", "list").output
    assert "test-linked-r0001" in listing and "prepared" in listing and "0 of 2 reviews in" in listing
    shown = run("review", "show", "test-linked-r0001").output
    assert "k per person" in shown and "| person_id |" in shown and not any(n in shown for n in NHS)
    operator = run("review", "approve", "test-linked-r0001", "--by", current_actor())
    assert operator.exit_code == 1 and "operated the run" in operator.output
    monkeypatch.setattr(reg, "os_login", lambda: login_of(R1))  # each at their own login, not the operator's
    assert run("review", "approve", "test-linked-r0001", "--by", R1, "--comment", "fine by me").exit_code == 0
    assert run("review", "approve", "test-linked-r0001", "--by", R1).exit_code == 1
    assert run("review", "return", "test-linked-r0001", "--by", R2, "--comment", "x").exit_code == 1
    # blinded: the second reviewer sees that one review is in, not whose, nor its decisions or comment
    blind = [run("review", "list").output, run("review", "show", "test-linked-r0001").output,
             run("review", "show", "test-linked-r0001", "--json").output]  # fmt: skip
    assert "1 of 2 reviews in" in blind[0] and "reviews: 1 of 2 in" in blind[1]
    assert json.loads(blind[2])["reviews"]["reviews_in"] == 1 and "k_per_person" in blind[2]
    assert not any(R1 in text or "fine by me" in text for text in blind)
    monkeypatch.setattr(reg, "os_login", lambda: login_of(R2))
    out = run("review", "approve", "test-linked-r0001", "--by", R2).output
    assert "released ->" in out and (haven.home.releases / "test-linked" / "test-linked-r0001").is_dir()
    assert "no release requests waiting" in run("review", "list").output
    after = run("review", "show", "test-linked-r0001").output
    assert f"approved by {R1}, {R2}" in after and f"{R1}: approve social_care.parquet (fine by me)" in after
    decided = json.loads(run("review", "show", "test-linked-r0001", "--json").output)["reviews"]["decisions"]
    assert {d["reviewer"] for d in decided} == {R1, R2}


# --- delivery reads the review from the audit trail, not only the store ---------------------


def test_a_request_set_to_approved_in_the_store_is_not_delivered(haven: Haven) -> None:
    haven.add()
    rid = haven.prepare().release_id
    haven.con.execute(f"UPDATE {review.REQUESTS} SET state = 'approved' WHERE release_id = ?", [rid])
    with pytest.raises(review.ReviewError, match="audit trail's latest state of test-linked-r0001 is prepared"):
        haven.deliver(rid)
    assert haven.delivered() == [] and reg.releases(haven.con) == []
    assert [b["kind"] for b in reg.breaches(haven.con)] == ["review_not_in_audit_trail"]


def test_a_second_review_inserted_in_the_store_does_not_make_two(haven: Haven) -> None:
    haven.add()
    rid = haven.prepare().release_id
    haven.approve(rid, R1)
    haven.con.execute(  # the insider's second reviewer: rows in the store, no audit entry
        f"INSERT INTO {review.REVIEWS} SELECT release_id, 'A. Nother, Output checker', file_name, sha256, "
        f"decision, comment, now() FROM {review.REVIEWS} WHERE release_id = ?",
        [rid],
    )
    haven.con.execute(f"UPDATE {review.REQUESTS} SET state = 'approved' WHERE release_id = ?", [rid])
    assert len(review.approvers(haven.con, review.get(haven.con, rid))) == 2  # as the store tells it
    with pytest.raises(review.ReviewError, match="latest state of test-linked-r0001 is approved_by_one"):
        haven.deliver(rid)
    assert haven.delivered() == []


def test_a_rule_lowered_in_the_store_before_review_still_needs_the_audited_reviewers(haven: Haven) -> None:
    haven.add()
    rid = haven.prepare().release_id
    haven.con.execute(f"UPDATE {review.REQUESTS} SET rule = ? WHERE release_id = ?", [review.ONE_REVIEWER, rid])
    with pytest.raises(review.ReviewError, match="holds 1 approval"):
        haven.approve(rid, R1)  # one reviewer meets the stored rule; the audited one needs two
    assert haven.delivered() == [] and reg.releases(haven.con) == []


def test_a_routine_rule_is_not_unlocked_by_a_release_set_in_the_store(haven: Haven) -> None:
    """Routine flows start from a release two reviewers approved, as the audit trail records it:
    a request set to released with SQL starts none."""
    haven.add(routine_release="automatic")
    first = haven.prepare()
    haven.con.execute(f"UPDATE {review.REQUESTS} SET state = 'released' WHERE release_id = ?", [first.release_id])
    haven.con.execute("DELETE FROM haven.social_care WHERE sex = '2'")  # new data, same shape
    second = haven.prepare()
    assert second.rule == review.TWO_REVIEWERS and second.status == PREPARED
    assert haven.delivered() == []


def test_a_release_id_used_again_counts_only_the_reviews_of_its_latest_preparation(haven: Haven) -> None:
    haven.add()
    first = haven.prepare()
    haven.approve(first.release_id, R1)
    review.return_request(haven.con, first.release_id, R2, "please check the counts")
    haven.con.execute(f"DELETE FROM {review.REVIEWS} WHERE release_id = ?", [first.release_id])
    haven.con.execute(f"DELETE FROM {review.REQUESTS} WHERE release_id = ?", [first.release_id])
    again = haven.prepare()
    assert again.release_id == first.release_id
    req = review.get(haven.con, again.release_id)
    haven.con.execute(  # R1's old approval replayed in the store for the new preparation
        f"INSERT INTO {review.REVIEWS} SELECT ?, ?, name, sha256, 'approve', NULL, now() FROM "
        "(SELECT unnest(?) AS name, unnest(?) AS sha256)",
        [req.release_id, R1, [f["name"] for f in req.files], [f["sha256"] for f in req.files]],
    )
    with pytest.raises(review.ReviewError, match="holds 1 approval"):
        haven.approve(again.release_id, "C. Third, Output checker")
    assert haven.delivered() == []


def test_a_decision_whose_audit_entry_cannot_be_written_is_not_recorded(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    haven.add()
    rid = haven.prepare().release_id
    with monkeypatch.context() as m:
        m.setattr(audit, "append", lambda *a, **k: (_ for _ in ()).throw(OSError("no space left on device")))
        with pytest.raises(OSError, match="no space left"):
            haven.approve(rid, R1)
    assert review.decisions(haven.con, review.get(haven.con, rid)) == []
    haven.approve(rid, R1)  # recorded now, as if the first attempt had never been
    assert haven.approve(rid, R2).state == review.RELEASED


def test_a_request_redirected_to_another_agreement_in_the_store_is_not_delivered(haven: Haven) -> None:
    haven.add()
    rid = haven.prepare().release_id
    haven.approve(rid, R1)
    haven.con.execute(f"UPDATE {review.REQUESTS} SET agreement_id = 'other-recipient' WHERE release_id = ?", [rid])
    with pytest.raises(review.ReviewError, match="agreement or files of test-linked-r0001 in the store differ"):
        haven.approve(rid, R2)
    assert not (haven.home.releases / "other-recipient").exists() and haven.delivered() == []


def test_a_request_prepared_before_its_agreement_was_suspended_is_not_delivered(haven: Haven) -> None:
    haven.add()
    rid = haven.prepare().release_id
    approvals.suspend(haven.con, "test-linked", "audit of onward sharing", "Dr Y, CG", registry=haven.registry,
                      actor="ig-lead")  # fmt: skip
    haven.approve(rid, R1)
    with pytest.raises(review.ReviewError, match="agreement test-linked is suspended: audit of onward sharing"):
        haven.approve(rid, R2)
    assert haven.delivered() == [] and reg.releases(haven.con) == []


# --- a delivery stopped part way is finished by the next attempt -------------------------------


@pytest.mark.parametrize("stopped", ["after the move", "after the register"])
def test_a_delivery_stopped_part_way_is_finished_by_the_next_attempt(haven: Haven, stopped: str) -> None:
    """A kill after the files moved into ``releases/`` (or after the register row) runs no rollback:
    the files sat there with no register row or members, so subject access and disposal could not
    know those people were released, and the next attempt was refused as "nothing was released"
    (found by review). The next attempt checks the moved files against the reviewed hashes and
    finishes: registered once, audited once, the request released."""
    haven.add()
    rid = haven.prepare().release_id
    haven.approve(rid, R1)
    killed_in = "_register" if stopped == "after the move" else "_audit_delivery"
    delivery_stopped(lambda: haven.approve(rid, R2), killed_in=killed_in)  # a kill -9 runs no except-block
    assert rid in haven.delivered() and review.get(haven.con, rid).state == review.APPROVED

    haven.deliver(rid, "custodian")
    assert review.get(haven.con, rid).state == review.RELEASED
    assert [r["release_id"] for r in reg.releases(haven.con)] == [rid]
    assert haven.con.execute("SELECT count(*) FROM governance.release_members").fetchone()[0] > 0
    assert reg.breaches(haven.con) == []
    delivered = [e for e in audit.entries_for(haven.con, object_like=f"release:{rid}") if e.outcome == "ok"]
    assert len(delivered) == 1


def test_files_moved_by_a_stopped_delivery_and_changed_since_are_refused_saying_where_they_are(
    haven: Haven,
) -> None:
    haven.add()
    rid, moved = _stopped_after_the_move(haven)
    next(moved.glob("*.parquet")).write_bytes(b"changed")
    with pytest.raises(review.ReviewError, match="is not the file that was prepared and reviewed"):
        haven.deliver(rid, "custodian")
    (breach,) = reg.breaches(haven.con)
    assert f"releases/test-linked/{rid}/" in str(breach) and "nothing was released" not in str(breach)
    assert reg.releases(haven.con) == []


def _stopped_after_the_move(haven: Haven) -> tuple[str, Path]:
    """A request whose delivery was killed after its files moved into ``releases/``, before its
    register row (the rename back never runs); returns its id and where its files are."""
    rid = haven.prepare().release_id
    haven.approve(rid, R1)
    delivery_stopped(lambda: haven.approve(rid, R2))
    return rid, haven.home.releases / "test-linked" / rid


def test_a_stopped_delivery_refused_then_withdrawn_leaves_nothing_in_releases(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agreement expires before the next attempt: the refusal says where the moved files are,
    and withdrawing the request, as it says, shreds them (CoP 27b; found by review)."""
    haven.add(identifiability="pseudonymised", end_date=haven_days.haven_today().isoformat())
    rid, folder = _stopped_after_the_move(haven)
    assert any(folder.glob("*.parquet")) and review.get(haven.con, rid).state == review.APPROVED
    _delivery_on(monkeypatch, days=1)  # the next attempt is the next day: the agreement has expired
    with pytest.raises(review.ReviewError, match="not in force") as refused:
        haven.deliver(rid, "custodian")
    assert f"releases/test-linked/{rid}/" in str(refused.value) and "withdrawing the request shreds" in str(
        refused.value
    )
    review.withdraw(haven.con, rid, CG, "agreement expired before delivery")
    assert review.get(haven.con, rid).state == review.WITHDRAWN
    assert not folder.exists() and reg.releases(haven.con) == []
    assert haven.con.execute(f"SELECT count(*) FROM {review.REQUEST_MEMBERS}").fetchone()[0] == 0


def test_a_refused_delivery_stopped_after_its_registration_says_a_withdrawal_does_not_remove_the_files(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after its register row, the delivery's files are a registered release: the refusal
    says where they are and that only a disposal of the agreement's data removes them, never that
    a withdrawal does (found by the re-read: it said so whether or not the release was registered)."""
    haven.add(identifiability="pseudonymised", end_date=haven_days.haven_today().isoformat())
    rid = haven.prepare().release_id
    haven.approve(rid, R1)
    delivery_stopped(lambda: haven.approve(rid, R2), killed_in="_audit_delivery")
    assert [r["release_id"] for r in reg.releases(haven.con)] == [rid]
    _delivery_on(monkeypatch, days=1)
    with pytest.raises(review.ReviewError, match="not in force") as refused:
        haven.deliver(rid, "custodian")
    said = str(refused.value)
    assert f"releases/test-linked/{rid}/" in said and "withdrawing the request shreds" not in said
    assert "registered in the release register: withdrawing the request does not remove them" in said
    assert "safehaven dispose --agreement test-linked" in said


def test_a_failed_shredding_of_a_stopped_deliverys_files_is_retried_by_the_next_discard(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    haven.add()
    rid, folder = _stopped_after_the_move(haven)
    with monkeypatch.context() as m:
        m.setattr(review, "shred_tree", lambda *_a: (_ for _ in ()).throw(OSError("disk error")))
        with pytest.raises(OSError):
            review.withdraw(haven.con, rid, CG, "withdrawn before delivery")
    assert folder.is_dir() and review.get(haven.con, rid).state == review.WITHDRAWN
    assert review.shred_discarded(haven.con) == [rid] and not folder.exists()


def test_withdrawing_never_shreds_a_registered_release(haven: Haven) -> None:
    """A delivery stopped after its register row: its files left on the record; a withdrawal keeps them."""
    haven.add()
    rid = haven.prepare().release_id
    haven.approve(rid, R1)
    delivery_stopped(lambda: haven.approve(rid, R2), killed_in="_audit_delivery")
    review.withdraw(haven.con, rid, CG, "withdrawn after registration")
    assert haven.delivered() == [rid] and [r["release_id"] for r in reg.releases(haven.con)] == [rid]


def _drop_judged(con: duckdb.DuckDBPyConnection, collection: str, status: str, minutes_later: int = 0) -> None:
    """A drop of ``collection`` that arrived now (plus ``minutes_later``) and was ``status`` at validation."""
    from safehaven.core import schema

    schema.ensure(con, schema.BATCHES)
    con.execute(
        f"INSERT INTO {schema.BATCHES} (batch_id, collection, file_name, sha256, rows, landed_at, status, "
        "invalid_rows, validated_at, contract_version, drop_key, arrived_at) VALUES (?, ?, 'drop.csv', 'x', 10, "
        "now(), ?, 0, now(), '1', ?, now() + to_minutes(CAST(? AS BIGINT)))",
        [f"{status}-{collection}-{minutes_later}", collection, status, f"drop-{minutes_later}", minutes_later],
    )


def test_an_approved_release_of_a_collection_held_since_preparation_is_not_delivered_until_it_clears(
    haven: Haven,
) -> None:
    """A drop of one of its collections is refused after preparation: delivery is refused (audited,
    not a breach) saying what clears it, and goes ahead once a corrected drop passes (CoP 7-9;
    found by review)."""
    haven.add()
    rid = haven.prepare().release_id
    _drop_judged(haven.con, "social_care", "refused")
    haven.approve(rid, R1)
    with pytest.raises(review.ReviewError, match="social_care is held.*corrected drop passes validation"):
        haven.approve(rid, R2)
    assert haven.delivered() == [] and reg.breaches(haven.con) == []
    assert review.get(haven.con, rid).state == review.APPROVED
    refused = [e for e in audit.entries_for(haven.con, object_like=f"release-request:{rid}") if e.outcome == "refused"]
    assert [e.fields["reason"] for e in refused] == ["collection_held"]
    _drop_judged(haven.con, "social_care", "accepted", minutes_later=1)  # the sender's corrected file
    assert haven.deliver(rid).state == review.RELEASED and haven.delivered() == [rid]


# --- delivery judges the agreement on the day of delivery, under the terms it was prepared under -----


def _delivery_on(monkeypatch: pytest.MonkeyPatch, days: int) -> None:
    """Deliveries from now on happen ``days`` later (``review``'s clock, and the haven's day:
    ``safehaven.core.days.clock``, which the delivery's day is read from)."""
    later = datetime.now(UTC) + timedelta(days=days)
    monkeypatch.setattr(haven_days, "clock", lambda: later)

    class Later(datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN001, ANN206
            return later if tz else later.replace(tzinfo=None)

    monkeypatch.setattr(review, "datetime", Later)


def test_a_request_prepared_in_force_is_not_delivered_once_its_agreement_has_expired(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    haven.add(identifiability="pseudonymised", end_date=haven_days.haven_today().isoformat())  # its last day
    rid = haven.prepare().release_id
    haven.approve(rid, R1)
    _delivery_on(monkeypatch, days=1)  # the second checker gets round to it the next day
    with pytest.raises(review.ReviewError, match=r"expired on .*not in force on the day of delivery: withdraw it"):
        haven.approve(rid, R2)
    assert haven.delivered() == [] and reg.releases(haven.con) == []
    refused = [e for e in audit.entries_for(haven.con, object_like=f"release-request:{rid}") if e.outcome == "refused"]
    assert [e.fields["reason"] for e in refused] == ["agreement"]


@pytest.mark.parametrize("change", ["file suspended", "end date brought forward"])
def test_an_agreement_file_suspended_or_ended_after_preparation_stops_delivery(haven: Haven, change: str) -> None:
    """The governance lead withholds the agreement in its file after a request was prepared: a
    ``suspended`` block (a file can withhold, never grant) or an end date of yesterday. Either
    changes the file, so nothing flows until it is approved again, and the request is not delivered."""
    haven.add()
    rid = haven.prepare().release_id
    data = agreement_data()
    if change == "file suspended":
        data["approval"] = {**data["approval"], "status": "suspended", "reason": "onward sharing under audit"}
    else:
        data["end_date"] = (haven_days.haven_today() - timedelta(days=1)).isoformat()
    write_agreement(haven.registry.root, data)
    haven.approve(rid, R1)
    with pytest.raises(review.ReviewError, match="not delivered: agreement test-linked changed since it was approved"):
        haven.approve(rid, R2)
    assert haven.delivered() == [] and reg.releases(haven.con) == []


def test_an_old_copy_of_the_contracts_does_not_deliver_past_a_suspension_the_haven_has_seen(
    haven: Haven, tmp_path: Path
) -> None:
    """The governance lead suspends the agreement in its file after preparation; the first checker
    approves with the deployment's contracts (its entry records that file), the second points at a
    copy taken before the suspension, whose bytes match the pin and the store's decision: the
    delivery is refused, the file on record being another (Caldicott 1; CoP 41-43; found by review)."""
    haven.add()
    rid = haven.prepare().release_id
    stale = tmp_path / "stale_contracts"
    shutil.copytree(haven.registry.root, stale)
    data = agreement_data()
    data["approval"] = {**data["approval"], "status": "suspended", "reason": "onward sharing under audit"}
    write_agreement(haven.registry.root, data)  # the deployment's file: suspended
    haven.approve(rid, R1)
    with pytest.raises(review.ReviewError, match="recorded another file of agreement test-linked.*withdraw it"):
        approve_as(haven.con, rid, R2, home=haven.home, registry=ContractRegistry(stale))
    assert haven.delivered() == [] and reg.releases(haven.con) == []
    refused = [e for e in audit.entries_for(haven.con, object_like=f"release-request:{rid}") if e.outcome == "refused"]
    assert [e.fields["reason"] for e in refused] == ["agreement"]


def test_a_request_prepared_under_terms_since_narrowed_and_approved_again_is_not_delivered(haven: Haven) -> None:
    """A field is removed from the agreement (no longer justified) and the new file approved before
    the checkers reach a request prepared under the old terms: it would release that field."""
    haven.add()
    rid = haven.prepare().release_id
    narrowed = agreement_data(fields=[f for f in BASE["fields"] if f["field"] != "date_of_birth"], version="1.1.0")
    write_agreement(haven.registry.root, narrowed)
    approvals.approve(haven.con, "test-linked", CG, registry=haven.registry, actor="ig-lead")
    haven.approve(rid, R1)
    with pytest.raises(review.ReviewError, match="prepared under an earlier version of the agreement.*current terms"):
        haven.approve(rid, R2)
    assert haven.delivered() == [] and reg.releases(haven.con) == []
    review.withdraw(haven.con, rid, CG, "prepared under the old terms")
    assert haven.prepare().status == PREPARED  # the next run prepares it under the current terms


def test_a_request_prepared_before_requests_pinned_their_agreement_is_not_delivered(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    haven.add()
    with monkeypatch.context() as mp:  # its preparation entry records no agreement SHA-256, as before the pin
        mp.setattr(review, "AGREEMENT_PIN", "not_recorded_then")
        rid = haven.prepare().release_id
    haven.approve(rid, R1)
    with pytest.raises(review.ReviewError, match="prepared under an earlier version of the agreement"):
        haven.approve(rid, R2)
    assert haven.delivered() == []


# --- one person is one reviewer, whatever the spelling or the name typed ------------------------------


LOOKALIKES = ["Alice Reviewer\u200b", "\uff21lice Reviewer", "Alice Reviewer.", "alice\u00a0reviewer"]


@pytest.mark.parametrize("twin", LOOKALIKES, ids=["zero-width-space", "fullwidth", "full-stop", "nbsp"])
def test_one_reviewer_cannot_approve_twice_under_a_lookalike_of_their_own_name(haven: Haven, twin: str) -> None:
    haven.add()
    rid = haven.prepare().release_id
    haven.approve(rid, "Alice Reviewer", login="login-alice")
    with pytest.raises(review.ReviewError, match="already approved"):
        haven.approve(rid, twin, login="login-other")  # another login: only the name says it is her
    assert review.get(haven.con, rid).state == review.APPROVED_BY_ONE and haven.delivered() == []


@pytest.mark.parametrize("twin", LOOKALIKES[:3], ids=["zero-width-space", "fullwidth", "full-stop"])
def test_the_audited_count_takes_a_lookalike_name_for_the_same_person(haven: Haven, twin: str) -> None:
    """The store renamed behind the check: delivery counts the people in the audit trail the same way."""
    haven.add()
    rid = haven.prepare().release_id
    haven.con.execute(f"UPDATE {review.REQUESTS} SET rule = ? WHERE release_id = ?",
                      [review.TWO_REVIEWERS_AND_CUSTODIAN, rid])  # fmt: skip
    haven.approve(rid, "Alice Reviewer", login="login-alice")
    haven.con.execute(f"UPDATE {review.REVIEWS} SET reviewer = 'Somebody Else' WHERE release_id = ?", [rid])
    assert haven.approve(rid, twin, login="login-other").state == review.APPROVED
    with pytest.raises(review.ReviewError, match="holds 1 approval"):
        haven.deliver(rid)
    assert haven.delivered() == []


def test_a_name_of_fewer_than_three_letters_or_digits_is_refused(haven: Haven) -> None:
    haven.add()
    rid = haven.prepare().release_id
    with pytest.raises(review.ReviewError, match="name the reviewer with --by"):
        haven.approve(rid, ". . . .")


def test_the_login_that_prepared_a_request_at_a_terminal_cannot_approve_it(haven: Haven) -> None:
    """`safehaven agreements release` at a terminal: the request's preparer is the OS login, and a
    name typed with --by from that login is still the operator."""
    me = reg.current_actor()
    haven.add()
    context = Context.open(haven.home, contracts=haven.registry, keyring=haven.keyring)
    rid = prepare(haven.con, "test-linked", haven=context).release_id
    assert review.get(haven.con, rid).prepared_by == me
    with pytest.raises(review.ReviewError, match="OS login that prepared test-linked-r0001 cannot approve it"):
        haven.approve(rid, R1, login=me)
    assert review.decisions(haven.con, review.get(haven.con, rid)) == []


def test_two_approvals_from_one_login_are_one_reviewer(haven: Haven) -> None:
    haven.add()
    rid = haven.prepare().release_id
    haven.approve(rid, R1, login="login-shared")
    with pytest.raises(review.ReviewError, match="approved it from this OS login"):
        haven.approve(rid, R2, login="login-shared")
    assert review.get(haven.con, rid).state == review.APPROVED_BY_ONE and haven.delivered() == []


def test_setting_LOGNAME_does_not_change_the_os_login(monkeypatch: pytest.MonkeyPatch) -> None:
    """The login is the account of the real uid, whatever the environment names (found by review)."""
    import pwd

    account = pwd.getpwuid(os.getuid()).pw_name
    for variable in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(variable, "alice")
    assert reg.os_login() == account and reg.current_actor() == account


def test_one_account_renaming_itself_in_LOGNAME_is_one_reviewer(haven: Haven, monkeypatch: pytest.MonkeyPatch) -> None:
    """One account (one uid) approving twice under two names and two LOGNAMEs is one person: the
    second approval is refused and nothing leaves (SATRE 3.3.04-3.3.05; found by review)."""
    haven.add()
    with logged_in_as("svc-pipeline"):  # the service account's run, not this account
        context = Context.open(haven.home, contracts=haven.registry, keyring=haven.keyring).as_scheduled()
        rid = prepare(haven.con, "test-linked", haven=context).release_id
    monkeypatch.setenv("LOGNAME", "alice")
    review.approve(haven.con, rid, R1, home=haven.home, registry=haven.registry)
    monkeypatch.setenv("LOGNAME", "bob")
    with pytest.raises(review.ReviewError, match="approved it from this OS login"):
        review.approve(haven.con, rid, R2, home=haven.home, registry=haven.registry)
    assert review.get(haven.con, rid).state == review.APPROVED_BY_ONE
    assert haven.delivered() == [] and reg.releases(haven.con) == []


def test_the_audited_count_takes_two_approvals_from_one_login_for_one_reviewer(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    haven.add()
    rid = haven.prepare().release_id
    haven.approve(rid, R1, login="login-shared")
    monkeypatch.setattr(review, "_own_login", lambda *_a: None)  # the approval-time check bypassed
    with pytest.raises(review.ReviewError, match="holds 0 approval"):
        haven.approve(rid, R2, login="login-shared")
    assert haven.delivered() == []


def test_the_audited_count_refuses_an_approval_from_the_login_that_prepared_it_at_a_terminal(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    me = reg.current_actor()
    haven.add()
    rid = prepare(haven.con, "test-linked", haven=Context.open(haven.home, contracts=haven.registry)).release_id
    monkeypatch.setattr(review, "_own_login", lambda *_a: None)  # the approval-time check bypassed
    haven.approve(rid, R1, login=me)
    with pytest.raises(review.ReviewError, match="holds 1 approval"):
        haven.approve(rid, R2)
    assert haven.delivered() == []


def test_the_login_of_a_run_of_the_pipeline_cannot_approve_what_it_prepared(haven: Haven) -> None:
    """A run of the pipeline (scheduled, started from the UI, or ``safehaven run`` at a terminal:
    the path does not say who was at the keyboard) prepares under its login, and that login
    cannot approve the request; reviewers at their own logins can."""
    haven.add()
    context = Context.open(haven.home, contracts=haven.registry, keyring=haven.keyring).as_scheduled()
    rid = prepare(haven.con, "test-linked", haven=context).release_id
    with pytest.raises(review.ReviewError, match="the OS login that prepared"):
        haven.approve(rid, R1, login=reg.os_login())
    haven.approve(rid, R1)
    assert haven.approve(rid, R2).state == review.RELEASED


# --- a request refused for a changed file never leaves; links are never followed ----------------------


def _awaiting_custodian(haven: Haven) -> str:
    haven.add()
    rid = haven.prepare().release_id
    haven.con.execute(f"UPDATE {review.REQUESTS} SET rule = ? WHERE release_id = ?",
                      [review.TWO_REVIEWERS_AND_CUSTODIAN, rid])  # fmt: skip
    haven.approve(rid, R1)
    assert haven.approve(rid, R2).state == review.APPROVED
    return rid


def test_a_request_refused_for_a_changed_file_is_refused_even_once_the_bytes_are_put_back(haven: Haven) -> None:
    rid = _awaiting_custodian(haven)
    staged = review.get(haven.con, rid).staging_dir / "hospital_episodes.parquet"
    original = staged.read_bytes()
    staged.write_bytes(b"swapped by an insider")
    with pytest.raises(review.ReviewError, match="not the file"):
        haven.deliver(rid)
    staged.write_bytes(original)  # put back
    with pytest.raises(review.ReviewError, match="refused before as a breach.*withdraw it"):
        haven.deliver(rid)
    assert haven.delivered() == [] and reg.releases(haven.con) == []
    assert [b["kind"] for b in reg.breaches(haven.con)] == ["reviewed_file_changed"]  # recorded once
    review.withdraw(haven.con, rid, CG, "staged file swapped and put back")
    assert haven.prepare().status == PREPARED


#: a valid NHS number (the check digit holds) a planted file is named after
NHS_LIKE_NAME = "9434765919.csv"


def test_a_planted_file_named_like_an_nhs_number_is_refused_as_a_breach_and_for_ever(haven: Haven) -> None:
    """A file planted in staging under a name that spells an NHS number, with a reviewed file
    swapped: the refusal is recorded (breach and audit, the name withheld), and once everything
    is put back the request is still refused for ever (found by review)."""
    rid = _awaiting_custodian(haven)
    staged = review.get(haven.con, rid).staging_dir
    target = staged / "hospital_episodes.parquet"
    original = target.read_bytes()
    target.write_bytes(b"swapped by an insider")
    planted = staged / NHS_LIKE_NAME
    planted.write_text("x\n")
    with pytest.raises(review.ReviewError, match="was added after preparation") as refused:
        haven.deliver(rid)
    [breach] = reg.breaches(haven.con)
    assert breach["kind"] == "reviewed_file_changed" and "not the file" in breach["what"]
    assert not any(NHS_LIKE_NAME[:10] in text for text in (str(refused.value), breach["what"]))
    planted.unlink()
    target.write_bytes(original)  # put back
    with pytest.raises(review.ReviewError, match="refused before as a breach"):
        haven.deliver(rid)
    assert haven.delivered() == [] and reg.releases(haven.con) == []


@pytest.mark.parametrize("name", [NHS_LIKE_NAME, "943_476_5919.csv"])
def test_a_file_planted_in_staging_is_a_reason_to_refuse_delivery_and_its_name_is_withheld(
    haven: Haven, name: str
) -> None:
    """Nothing unreviewed leaves: a file in staging that was never prepared refuses the delivery. Its
    name is shown as a received file's (``audit.shown_name``): a name spelling an NHS number, with
    separators the audit guard does not know too, is recorded and said withheld (CoP 8a)."""
    rid = _awaiting_custodian(haven)
    (review.get(haven.con, rid).staging_dir / name).write_text("x\n")
    with pytest.raises(review.ReviewError, match="was added after preparation") as refused:
        haven.deliver(rid)
    assert haven.delivered() == [] and [b["kind"] for b in reg.breaches(haven.con)] == ["reviewed_file_changed"]
    entries = audit.entries_for(haven.con, object_like=f"release-request:{rid}")
    recorded = [str(refused.value), reg.breaches(haven.con)[0]["what"], *(str(e.detail) for e in entries)]
    assert not any(name.removesuffix(".csv") in text for text in recorded)


def test_a_refusal_whose_details_the_audit_guard_refuses_is_recorded_without_them(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: were a problem's text still to look like an NHS number (here the scrubbing and
    the shown name are bypassed), the breach and the refusal are recorded with a generic text, and
    the request is refused for ever all the same."""
    rid = _awaiting_custodian(haven)
    monkeypatch.setattr(audit, "scrub", lambda text: text)
    monkeypatch.setattr(audit, "shown_name", lambda name: name)
    planted = review.get(haven.con, rid).staging_dir / NHS_LIKE_NAME
    planted.write_text("x\n")
    with pytest.raises(review.ReviewError, match="the details could not be recorded") as refused:
        haven.deliver(rid)
    assert NHS_LIKE_NAME[:10] not in str(refused.value)
    assert [b["what"].endswith(review.UNRECORDABLE_PROBLEM) for b in reg.breaches(haven.con)] == [True]
    planted.unlink()
    with pytest.raises(review.ReviewError, match="refused before as a breach"):
        haven.deliver(rid)
    assert haven.delivered() == []


def test_a_staged_file_replaced_by_a_link_is_refused_at_review(haven: Haven, tmp_path: Path) -> None:
    haven.add()
    rid = haven.prepare().release_id
    staged = review.get(haven.con, rid).staging_dir / "hospital_episodes.parquet"
    outside = tmp_path / "insider" / "copy.parquet"
    outside.parent.mkdir()
    shutil.move(staged, outside)
    staged.symlink_to(outside)  # the same bytes, through a link outside the home
    with pytest.raises(review.ReviewError, match="not a plain file"):
        haven.approve(rid, R1)
    assert haven.delivered() == []


@pytest.mark.parametrize("entry", ["symbolic link", "hard link"])
def test_a_staged_file_replaced_by_a_link_after_review_is_refused_at_delivery(
    haven: Haven, tmp_path: Path, entry: str
) -> None:
    rid = _awaiting_custodian(haven)
    staged = review.get(haven.con, rid).staging_dir / "hospital_episodes.parquet"
    outside = tmp_path / "insider.parquet"
    if entry == "symbolic link":
        shutil.move(staged, outside)
        staged.symlink_to(outside)
    else:
        os.link(staged, outside)  # a second name outside the home for the same bytes
    with pytest.raises(review.ReviewError, match="hospital_episodes.parquet is not the file.*not a plain file"):
        haven.deliver(rid)
    assert haven.delivered() == [] and [b["kind"] for b in reg.breaches(haven.con)] == ["reviewed_file_changed"]


def test_review_list_shows_a_request_whose_files_are_not_shredded_until_they_are(
    haven: Haven, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``safehaven review list`` names a request that will never leave whose shredding is refused,
    with what to do, after its waiting requests (or none); it goes once the files are shredded."""
    from click.testing import CliRunner

    from safehaven.cli.main import main

    monkeypatch.setenv("SAFEHAVEN_CONTRACTS", str(haven.registry.root))
    rid, staging = _staged_folder_moved_out_and_linked_back(haven, tmp_path)
    haven.con.close()  # the CLI opens the store itself (one writer)

    def run(*args: str) -> str:
        return CliRunner().invoke(main, list(args), catch_exceptions=False).output

    withdrawn = run("review", "withdraw", rid, "--by", CG, "--comment", "changed by hand")
    assert "refused:" in withdrawn and "is a symbolic link" in withdrawn
    listing = run("review", "list")
    assert "no release requests waiting" in listing
    assert f"not shredded: the files of {rid} (it will never leave): " in listing and "Put them back" in listing
    staging.unlink()
    (tmp_path / "moved").rename(staging)
    with Store(haven.home).connect() as con:
        assert review.shred_discarded(con) == [rid]
    assert "not shredded" not in run("review", "list")


@pytest.mark.parametrize("action", ["approve", "return", "reject", "withdraw"])
@pytest.mark.parametrize("typed", ["drop 999-022-6660, who complained", "it holds 9 9 9 0 1 0 7 1 5 7"])
def test_a_comment_that_may_hold_an_nhs_number_is_refused_before_anything_is_recorded(
    haven: Haven, action: str, typed: str
) -> None:
    """A comment is kept in the store, the audit trail and the exported request register: one
    that may spell an NHS number (however spaced) is refused in one line, and the request, its
    reviews and the trail are as they were (found by review: the audit entry refused it after
    the state had changed, so a rejection stood unaudited and the number was exported)."""
    haven.add()
    rid = haven.prepare().release_id
    before = (review.get(haven.con, rid).state, len(audit.entries_for(haven.con)))
    act = {
        "approve": lambda: review.approve(haven.con, rid, R1, home=haven.home, registry=haven.registry, comment=typed),
        "return": lambda: review.return_request(haven.con, rid, R1, typed),
        "reject": lambda: review.reject(haven.con, rid, R1, typed),
        "withdraw": lambda: review.withdraw(haven.con, rid, CG, typed),
    }[action]
    with pytest.raises(review.ReviewError, match="looks like it holds an NHS number.*nothing was changed") as refused:
        act()
    assert "999" not in str(refused.value)
    assert (review.get(haven.con, rid).state, len(audit.entries_for(haven.con))) == before
    assert haven.con.execute(f"SELECT count(*) FROM {review.REVIEWS} WHERE release_id = ?", [rid]).fetchone()[0] == 0
    assert review.get(haven.con, rid).staging_dir.exists()


@pytest.mark.parametrize("where", ["releases/<agreement>", "staging/releases"])
def test_delivery_through_a_link_in_place_of_a_folder_the_haven_wrote_is_refused(
    haven: Haven, tmp_path: Path, where: str
) -> None:
    """``releases/<agreement>`` (or ``staging/releases``) replaced by a link to a folder outside the
    haven: delivery moved the extract there and registered it as released in the haven (found by
    review). Refused, naming the link, with nothing moved or registered; once a plain folder is back,
    the same request is delivered."""
    haven.add()
    rid = haven.prepare().release_id
    outside = tmp_path / "outside"
    if where == "staging/releases":
        area = haven.home.root / "staging" / "releases"
        shutil.move(area, outside)
    else:
        area = haven.home.releases / "test-linked"
        outside.mkdir()
    area.symlink_to(outside)
    haven.approve(rid, R1)
    with pytest.raises(review.ReviewError, match=f"{where.replace('<agreement>', 'test-linked')} is a symbolic link"):
        haven.approve(rid, R2)
    assert review.get(haven.con, rid).state == review.APPROVED and haven.delivered() == []
    assert not (outside / rid).exists() or where == "staging/releases"
    area.unlink()
    if where == "staging/releases":
        shutil.move(outside, area)
    assert haven.deliver(rid, R2).state == review.RELEASED
    assert (haven.home.releases / "test-linked" / rid).is_dir() and haven.delivered() == [rid]


def test_an_identifiable_release_is_delivered_by_a_third_person_not_one_of_its_reviewers(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The custodian's delivery of an identifiable release is the third pair of eyes: one of its
    two reviewers, by name (any spelling) or at the login their approval came from, is refused
    (found by review: a reviewer delivered her own approval with the vault passphrase)."""
    rid = _awaiting_custodian(haven)
    third = "must be a third person, not one of its two reviewers"
    with pytest.raises(review.ReviewError, match=third):
        haven.deliver(rid, R1.upper())
    monkeypatch.setattr(reg, "os_login", lambda: login_of(R2))
    with pytest.raises(review.ReviewError, match=third):
        haven.deliver(rid, "V. Keeper, custodian")
    tried = [e for e in audit.entries_for(haven.con, object_like=f"release-request:{rid}") if e.outcome == "refused"]
    assert [(e.action, e.actor) for e in tried] == [(review.RELEASE_ACTION, R1.upper()), (review.RELEASE_ACTION,
            "V. Keeper, custodian")], "each attempt is audited"  # fmt: skip
    monkeypatch.setattr(reg, "os_login", lambda: "login-v-keeper")
    assert haven.deliver(rid, "V. Keeper, custodian").state == review.RELEASED


def test_a_home_restored_elsewhere_acts_on_its_own_staged_files_not_the_old_places(
    haven: Haven, tmp_path: Path
) -> None:
    """The store keeps the path each request was staged at; a home copied to a new place (a
    restore from backup) withdrew by shredding the *old* home's staged files and left its own
    (found by review). A request's staged folder is in the home whose store it is read from."""
    haven.add()
    rid = haven.prepare().release_id
    haven.con.execute("CHECKPOINT")
    moved = Home(shutil.copytree(haven.home.root, tmp_path / "restored", symlinks=True))
    with Store(moved).connect() as con:
        req = review.get(con, rid)
        assert req.staging_dir == moved.root / "staging" / "releases" / rid and req.home.root == moved.root
        review.withdraw(con, rid, CG, "restored for a test of the restore")
    assert not (moved.root / "staging" / "releases" / rid).exists(), "the restored home's files are shredded"
    assert any(review.get(haven.con, rid).staging_dir.iterdir()), "the old home's are untouched"


def test_a_custodian_name_that_may_hold_an_nhs_number_is_refused_before_the_delivery_moves_anything(
    haven: Haven,
) -> None:
    """``review release --by`` went unchecked until the delivery's audit entry refused it, after the
    files had moved and been registered (found by review): refused first, nothing moved."""
    haven.add()
    rid = haven.prepare().release_id
    haven.con.execute(f"UPDATE {review.REQUESTS} SET rule = ? WHERE release_id = ?",
                      [review.TWO_REVIEWERS_AND_CUSTODIAN, rid])  # fmt: skip
    haven.approve(rid, R1)
    haven.approve(rid, R2)
    with pytest.raises(review.ReviewError, match="the name .--by. looks like it holds an NHS number"):
        haven.deliver(rid, "Carol Custodian 999 021 5707")
    assert haven.delivered() == [] and reg.releases(haven.con) == []
    assert review.get(haven.con, rid).state == review.APPROVED


@pytest.mark.parametrize(
    "comment",
    ["checked on 2026-12-06 09:15", "as statutory-gp-audit-r0001 2026-12-19", "call 0161 496 0000 about it"],
)
def test_ordinary_comments_with_dates_times_and_release_ids_are_accepted(haven: Haven, comment: str) -> None:
    """The identifier rule for typed text is the audit log's (ten digits in a row or 3-3-4) plus a
    valid number spelt one digit at a time; dates, times and release ids pass (found by review:
    the file-name rule refused one comment in four of them)."""
    haven.add()
    rid = haven.prepare().release_id
    assert review.return_request(haven.con, rid, R1, comment).state == review.RETURNED


def test_a_refused_shredding_whose_link_was_removed_stays_in_view_until_a_person_resolves_it(
    haven: Haven, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The staged folder moved out and linked back, the withdrawal's shredding refused; a person then
    removes the link alone: the files survive where it pointed, and the refusal vanished from view
    with nothing on the trail (found by review). It stays listed, saying what to do, until a person
    records (audited) that the files were found and destroyed."""
    from click.testing import CliRunner

    from safehaven.cli.main import main

    monkeypatch.setenv("SAFEHAVEN_CONTRACTS", str(haven.registry.root))
    rid, staging = _staged_folder_moved_out_and_linked_back(haven, tmp_path)
    with pytest.raises(review.ReviewError):
        review.withdraw(haven.con, rid, CG, "changed by hand")
    with pytest.raises(review.ReviewError, match="still in the home"):
        review.resolve_shredding(haven.con, rid, by=CG, reason="destroyed them")
    staging.unlink()
    for _ in range(2):
        assert review.shred_discarded(haven.con) == []
        [(listed, why)] = review.unshredded(haven.con)
        assert listed == rid and f"safehaven review resolve-shredding {rid}" in why
    refused, done = _shredding_entries(haven, rid)
    assert [e.outcome for e in refused] == ["refused"] and done == []
    haven.con.close()
    said = CliRunner().invoke(
        main, ["review", "resolve-shredding", rid, "--by", CG, "--reason", "found in the insider's folder; shredded"]
    )
    assert said.exit_code == 0, said.output
    with Store(haven.home).connect() as con:
        assert review.unshredded(con) == []
        [entry] = [e for e in audit.entries_for(con) if e.action == review.SHRED_DONE_ACTION]
    assert entry.actor == CG and entry.detail_value["by_person"] is True


def _staged_folder_moved_out_and_linked_back(haven: Haven, tmp_path: Path) -> tuple[str, Path]:
    """A prepared request whose staged folder an insider moved to ``tmp_path/moved`` and linked
    back in its place; its id and staged folder."""
    haven.add()
    rid = haven.prepare().release_id
    staging = review.get(haven.con, rid).staging_dir
    staging.rename(tmp_path / "moved")
    staging.symlink_to(tmp_path / "moved")
    return rid, staging
