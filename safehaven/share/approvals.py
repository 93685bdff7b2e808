"""Agreement approval and suspension as records in the haven, not in tracked files.

Rule (Caldicott 1: uses are scrutinised and documented by an appropriate guardian; CoP 41-43;
SATRE 3.3.04-3.3.05, assigned responsibility): whether an agreement may be acted on is a
decision a person makes, so it is recorded where the haven keeps its other evidence, the
encrypted store (``governance.agreement_decisions``), audited, and exported to
``registers/agreement_decisions.{csv,parquet}``. The agreement file under
``data_contracts/agreements/`` holds the terms; a checkout or deploy cannot undo an approval.

* **Pinned to the terms.** A decision records the SHA-256 of the agreement file it was made
  on. An approval stands only while the file is byte-identical: a changed file (any edit,
  including a revert by a checkout) is *not approved* until the governance lead approves it
  again (``safehaven agreements approve``). Fail closed: the flow stops and says how to clear it.
* **Latest decision wins**: ``approved`` or ``suspended``; none means not approved.
* **No decision, no flow.** An agreement with no decision in the store is *not approved in the
  haven*, whatever its file's ``approval:`` block says: anyone who can add a file under
  ``data_contracts/agreements/`` must not be able to approve it (fail closed; issue 18). The
  reason given says how to clear it: ``safehaven agreements approve`` or ``adopt``.
* **Adoption is a person's decision.** ``safehaven agreements adopt <id>... | --all --by ...
  --reason ...`` (:func:`adopt`) records, for each agreement whose file's block says
  ``approved`` or ``suspended``, a decision with ``source = file`` pinned to the file's
  SHA-256, made by the named person and audited like an approval. A file without such a block
  is reported, not adopted; an agreement that already has a decision is left as it is. A file
  with problems (``safehaven.share.agreements.problems``, what ``safehaven agreements
  validate`` reports) is not adopted: the whole request is refused in one line before anything
  is recorded, as ``approve`` refuses it.
* **A file can withhold, never grant.** A file whose block says ``suspended`` is suspended even
  when the store's decision on those very bytes is ``approved`` (:func:`effective`). Disposal
  (:func:`for_disposal`) reads the same way: dates and retention from the file, approval only
  from the store, a file's suspension always standing (CoP 43d, 43f).

* **Checked against the audit trail** (:func:`unaudited`). The decisions table is in the store,
  which anyone holding the store key can edit (an approval inserted, a suspension deleted). Each
  decision is also an audit entry, keyed, chained and anchored outside the store, so the store's
  latest decision is acted on only while it is the trail's latest decision on the agreement and
  that entry verifies; otherwise nothing flows until the governance lead records a decision
  again (a decision killed between its store row and its audit entry is refused the same way).

:func:`effective` gives the agreement with its ``approval`` taken from the store, so the
existing ``Agreement.in_force``/``status_on`` logic (dates, expiry) applies unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb

from safehaven.core import audit, schema
from safehaven.core import registers as reg
from safehaven.core.days import haven_today
from safehaven.core.files import sha256_file
from safehaven.core.home import Home
from safehaven.core.store import table_exists
from safehaven.intake.contracts import ContractRegistry
from safehaven.share.agreements import (
    Agreement,
    AgreementError,
    Approval,
    agreement_path,
    agreements_dir,
    load_agreement_file,
    load_agreement_pinned,
    problems,
    scan_agreements,
)

DECISIONS = schema.AGREEMENT_DECISIONS
RELEASE_REGISTER = schema.RELEASE_REGISTER
APPROVED, SUSPENDED = "approved", "suspended"
#: the audit action recording each decision (:func:`_record`)
_ACTION = {APPROVED: "approve", SUSPENDED: "suspend"}
#: where a decision came from: a person's command, or the file's block adopted by a person
SOURCE_COMMAND, SOURCE_FILE = "command", "file"
#: what :func:`adopt` did with one agreement
ADOPTED, NO_BLOCK, ALREADY_DECIDED = "adopted", "no approval block", "already decided"
#: the command that records a decision (quoted in every "not approved" reason)
APPROVE_COMMAND = 'safehaven agreements approve {id} --approver "Name, role"'
ADOPT_COMMAND = 'safehaven agreements adopt {id} --by "Name, role" --reason "..."'
MIN_NAME = 3
MIN_REASON = 5


@dataclass(frozen=True)
class Decision:
    """One recorded decision on an agreement."""

    agreement_id: str
    decision: str
    decided_by: str
    decided_on: date
    reason: str | None
    agreement_sha256: str
    source: str


@dataclass(frozen=True)
class Standing:
    """An agreement as the haven stands on it today: the file, its hash, and the store's decision."""

    agreement: Agreement
    sha256: str
    decision: Decision | None
    #: why the store's decision cannot be acted on: it is not the one the audit trail records (:func:`unaudited`)
    unaudited: str | None = None

    @property
    def changed_since_decision(self) -> bool:
        return self.decision is not None and self.decision.agreement_sha256 != self.sha256

    def not_approved(self) -> str | None:
        """Why the haven holds no standing decision on these terms, with how to clear it; else ``None``."""
        a = self.agreement
        if self.unaudited:
            return (
                f"{self.unaudited}; nothing flows until the governance lead records the decision again: "
                f"{APPROVE_COMMAND.format(id=a.id)} (and then suspends it, if it should not flow)"
            )
        if self.decision is None:
            adopt = (
                f", or adopts its file's {a.approval.status} block with: {ADOPT_COMMAND.format(id=a.id)}"
                if a.approval.status in (APPROVED, SUSPENDED)
                else ""
            )
            return (
                f"agreement {a.id} has not been approved in this haven (its file says {a.approval.status}, "
                f"which approves nothing); the governance lead approves it with: {APPROVE_COMMAND.format(id=a.id)}"
                + adopt
            )
        if self.changed_since_decision:
            return (
                f"agreement {a.id} changed since it was {self.decision.decision} (its file's SHA-256 differs); "
                f"nothing flows until it is approved again: {APPROVE_COMMAND.format(id=a.id)}"
            )
        return None

    def in_force(self, day: date | None = None) -> tuple[bool, str]:
        """Whether data may flow under the agreement on ``day``; if not, why and how to clear it."""
        why = self.not_approved()
        if why:
            return False, why
        return effective(self).in_force(day)

    def status_on(self, day: date | None = None) -> str:
        """The status the haven acts on: ``draft`` without a standing decision, else the store's."""
        return effective(self).status_on(day)


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    schema.ensure(con, DECISIONS)


def latest(con: duckdb.DuckDBPyConnection, agreement_id: str) -> Decision | None:
    """The most recent decision on an agreement, or ``None`` (reads only: safe on a read-only store)."""
    if not table_exists(con, *DECISIONS.split(".")):
        return None
    row = con.execute(
        f"SELECT agreement_id, decision, decided_by, decided_on, reason, agreement_sha256, source FROM {DECISIONS} "
        "WHERE agreement_id = ? ORDER BY decision_id DESC LIMIT 1",
        [agreement_id],
    ).fetchone()
    return Decision(*row) if row else None


def _same_recipient(con: duckdb.DuckDBPyConnection, agreement: Agreement) -> None:
    """Refuse to approve an agreement for a recipient other than the one it was approved for or
    released to before. The pseudonym domain and the release members are the agreement id's, so a
    new recipient under the old id would be given pseudonyms linking to the old recipient's
    extracts, and re-identification would resolve the old recipient's people for it (found by
    review; Caldicott 1, CoP 41-43): a new recipient needs a new agreement id."""
    earlier = {
        e.fields.get("recipient")
        for e in audit.authentic_entries(con, [_ACTION[APPROVED]])
        if e.object == f"agreement:{agreement.id}"
    }
    if table_exists(con, *RELEASE_REGISTER.split(".")):
        query = f"SELECT DISTINCT recipient FROM {RELEASE_REGISTER} WHERE agreement_id = ?"
        earlier |= {r for (r,) in con.execute(query, [agreement.id]).fetchall()}
    others = sorted(str(r) for r in earlier - {None, agreement.recipient.name})
    if others:
        raise AgreementError(
            f"agreement {agreement.id} was approved for, or released to, {others[0]}; its file now names "
            f"{agreement.recipient.name}. A new recipient needs a new agreement (a new id): pseudonyms and "
            "release members belong to the agreement id"
        )


def _record(
    con: duckdb.DuckDBPyConnection,
    agreement: Agreement,
    sha: str,
    *,
    decision: str,
    by: str,
    on: date,
    reason: str | None,
    source: str,
    actor: str,
    extra: dict[str, object] | None = None,
) -> Decision:
    """Insert one decision and audit it (who, when, why, on which file hash; an approval also names
    its recipient, :func:`_same_recipient`). Text that may hold an NHS number is refused first:
    the decision and its audit entry are both written, or neither (found by review)."""
    given = [("the name (--by/--approver)", by), ("the reason", reason)]
    given += [(f"the {key.replace('_', ' ')}", str(value)) for key, value in (extra or {}).items()]
    for what, text in given:
        if audit.holds_identifier(text):
            raise AgreementError(audit.NO_IDENTIFIER_IN_TEXT.format(what=what))
    ensure_tables(con)
    if decision == APPROVED:
        _same_recipient(con, agreement)
        extra = {**(extra or {}), "recipient": agreement.recipient.name}
    con.execute(
        f"INSERT INTO {DECISIONS} SELECT coalesce(max(decision_id), 0) + 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
        f"CAST(? AS TIMESTAMPTZ) FROM {DECISIONS}",
        [agreement.id, decision, by, on, reason, agreement.version, sha, source, actor, datetime.now(UTC).isoformat()],
    )
    audit.append(
        con,
        actor=actor,
        role="governance",
        action=_ACTION[decision],
        object=f"agreement:{agreement.id}",
        purpose=agreement.purposes[0],
        legal_basis=agreement.basis,
        agreement=agreement.id,
        detail={
            "by": by,
            "on": on.isoformat(),
            "reason": reason,
            "version": agreement.version,
            "sha256": sha,
            "source": source,
            **(extra or {}),
        },
    )
    return Decision(agreement.id, decision, by, on, reason, sha, source)


def standing(con: duckdb.DuckDBPyConnection, agreement: Agreement, path: Path, sha: str | None = None) -> Standing:
    """The agreement's standing: its file hash and the store's latest decision, checked against
    the audit trail (:func:`unaudited`). Adopts nothing (module docstring, "No decision, no flow")."""
    if sha is None:  # the terms and their hash from one read (``sha``: of the read ``agreement`` came from)
        pinned, sha = load_agreement_pinned(path)
        if pinned != agreement:
            raise AgreementError(f"agreement {agreement.id}'s file changed while it was being read; run again")
    decision = latest(con, agreement.id)
    return Standing(agreement, sha, decision, unaudited(con, agreement.id, decision))


def unaudited(con: duckdb.DuckDBPyConnection, agreement_id: str, decision: Decision | None) -> str | None:
    """Why the store's latest decision on the agreement must not be acted on (None: it is the
    latest decision the audit trail records for it, or neither records one).

    Module docstring, "Checked against the audit trail": the decisions table is in the store,
    which anyone holding the store key can edit; each decision is also an audit entry (keyed,
    chained, anchored outside the store: :func:`_record`). The store's latest decision must be
    the trail's latest ``approve``/``suspend`` of ``agreement:<id>`` (decision, file SHA-256, by
    whom), and that entry must verify with every entry after it (``audit.authentic_from``)."""
    entry = _latest_audited(con, agreement_id)
    if _as_recorded(decision) != _as_audited(entry):
        return (
            f"agreement {agreement_id}'s decision in the store is not the audit trail's latest "
            f"({_said(entry)}): it was recorded, changed or deleted outside the haven, or a decision stopped "
            "before its audit entry"
        )
    if entry is not None and not audit.authentic_from(con, entry.seq):
        return f"the audit entry of agreement {agreement_id}'s decision does not verify"
    return None


def _as_recorded(d: Decision | None) -> tuple | None:
    """What a decision in the store says, in the terms of its audit entry (every field it holds)."""
    if d is None:
        return None
    on = d.decided_on.isoformat() if isinstance(d.decided_on, date) else str(d.decided_on)
    return (_ACTION.get(d.decision), d.agreement_sha256, d.decided_by, on, d.reason, d.source)


def _as_audited(entry: audit.Entry | None) -> tuple | None:
    if entry is None:
        return None
    said = entry.fields
    return (entry.action, *(said.get(k) for k in ("sha256", "by", "on", "reason", "source")))


def _latest_audited(con: duckdb.DuckDBPyConnection, agreement_id: str) -> audit.Entry | None:
    """The audit trail's latest decision entry on the agreement (unverified: :func:`unaudited` verifies it)."""
    return audit.latest_entry(con, f"agreement:{agreement_id}", tuple(_ACTION.values()))


def _said(entry: audit.Entry | None) -> str:
    """The trail's latest decision, as its entry says it (never the store's text, which anyone
    holding the store key could have written)."""
    return "none" if entry is None else f"{entry.action} by {audit.scrub(str(entry.fields.get('by')))}"


def for_disposal(con: duckdb.DuckDBPyConnection | None, agreement: Agreement, path: Path) -> Agreement:
    """The agreement as disposal judges it (CoP 43d, 43f): the store's latest decision on the
    file's dates and retention. A file saying ``suspended`` stands (nothing overrides it); a file
    saying ``approved`` approves nothing (no decision, or no store: ``draft``). A file changed
    since the decision keeps the decision here: nothing flows under it (:func:`effective`), but
    its data is not treated as released from its agreement until a person decides. A decision
    that is not the audit trail's (:func:`unaudited`) is neither acted on nor ignored: raises
    ``AgreementError`` (disposal refuses; the daily sweep makes it a review item)."""
    decision = latest(con, agreement.id) if con is not None else None
    if agreement.approval.status == SUSPENDED:
        return agreement
    why = unaudited(con, agreement.id, decision) if con is not None else None
    if why:
        raise AgreementError(f"{why}; the governance lead records the decision again before disposal acts on it")
    if decision is None:
        return effective(Standing(agreement, sha256_file(path), None))
    return _decided(agreement, decision)


def load_standing(con: duckdb.DuckDBPyConnection, agreement_id: str, root: Path) -> Standing:
    """Read ``<root>/agreements/<id>.yaml`` and its standing (raises ``AgreementError``)."""
    path = agreement_path(agreement_id, root)
    if not path.exists():
        raise AgreementError(f"no agreement {agreement_id!r} ({path})")
    agreement, sha = load_agreement_pinned(path)
    return standing(con, agreement, path, sha)


def effective_agreements(con: duckdb.DuckDBPyConnection, root: Path) -> dict[str, Agreement]:
    """Every readable agreement with its approval taken from the store (:func:`effective`).

    What a caller passes to ``safehaven.share.linkage.authorise_linkage`` so the file's own
    ``approval:`` block never authorises a join.
    """
    found, _errors = scan_agreements(root)
    folder = agreements_dir(root)
    with audit.one_walk():  # every decision checked against the trail by one walk of it
        return {aid: effective(standing(con, a, folder / f"{aid}.yaml")) for aid, a in found.items()}


def status_label(con: duckdb.DuckDBPyConnection, agreement: Agreement, path: Path, day: date | None = None) -> str:
    """The status to show a person: the store's decision (``changed`` if the file changed since),
    or ``not approved in the haven`` for a file with no decision. Adopts nothing."""
    s = standing(con, agreement, path)
    if s.unaudited:
        return "not approved: its decision in the store is not the audit trail's"
    if s.decision is None:
        return f"not approved in the haven (file: {agreement.approval.status})"
    if s.changed_since_decision:
        return f"changed since {s.decision.decision}"
    return s.status_on(day)


def effective(s: Standing) -> Agreement:
    """The agreement with its ``approval`` block replaced by the store's decision (for flows).

    No decision or a changed file gives ``draft`` with the reason saying how to clear it; a file
    whose own block says ``suspended`` stays suspended (a file can withhold, never grant).
    """
    why = s.not_approved()
    if s.decision is None or why:
        return s.agreement.model_copy(update={"approval": Approval(status="draft", reason=why)})
    return _decided(s.agreement, s.decision)


def _decided(agreement: Agreement, d: Decision) -> Agreement:
    """``agreement`` under decision ``d``; the file's own suspension stands."""
    if agreement.approval.status == SUSPENDED:
        return agreement
    if d.decision == APPROVED:
        approval = Approval(status="approved", approver=d.decided_by, date=d.decided_on)
    else:
        approval = Approval(
            status="suspended",
            approver=agreement.approval.approver or d.decided_by,
            date=agreement.approval.date or d.decided_on,
            reason=d.reason,
            suspended_by=d.decided_by,
            suspended_on=d.decided_on,
        )
    return agreement.model_copy(update={"approval": approval})


def approve(
    con: duckdb.DuckDBPyConnection,
    agreement_id: str,
    approver: str,
    *,
    registry: ContractRegistry,
    actor: str,
    today: date | None = None,
) -> Decision:
    """Approve (or re-approve) an agreement with no problems, pinned to its file's SHA-256.

    Refused for an agreement past its end date, or whose file's own block says ``suspended``
    (a file can withhold, never grant: module docstring)."""
    today = today or haven_today()
    if len(approver.strip()) < MIN_NAME:
        raise AgreementError('name the approver and their role, e.g. "Name, Caldicott Guardian"')
    path = agreement_path(agreement_id, registry.root)
    if not path.exists():
        raise AgreementError(f"no agreement {agreement_id!r} ({path})")
    current, sha = load_agreement_pinned(path)  # approved as read: the hash of the bytes checked
    if current.end_date < today:
        raise AgreementError(f"agreement {agreement_id} ended on {current.end_date}; it cannot be approved")
    if current.approval.status == SUSPENDED:
        raise AgreementError(
            f"agreement {agreement_id}'s file says it is suspended ({current.approval.reason}), which withholds it "
            "whatever the store says; the file must be changed before it can be approved"
        )
    as_approved = current.model_copy(
        update={"approval": Approval(status="approved", approver=approver.strip(), date=today)}
    )
    found = problems(as_approved, registry, today=today)
    if found:
        raise AgreementError(f"agreement {agreement_id} cannot be approved: " + "; ".join(found))
    return _record(
        con,
        current,
        sha,
        decision=APPROVED,
        by=approver.strip(),
        on=today,
        reason=None,
        source=SOURCE_COMMAND,
        actor=actor,
    )


def suspend(
    con: duckdb.DuckDBPyConnection,
    agreement_id: str,
    reason: str,
    by: str,
    *,
    registry: ContractRegistry,
    actor: str,
    today: date | None = None,
) -> Decision:
    """Suspend an approved agreement: nothing flows under it until it is approved again."""
    today = today or haven_today()
    if len(reason.strip()) < MIN_REASON:
        raise AgreementError("give the reason for the suspension")
    path = agreement_path(agreement_id, registry.root)
    if not path.exists():
        raise AgreementError(f"no agreement {agreement_id!r} ({path})")
    s = standing(con, load_agreement_file(path), path)
    if s.decision is None or s.decision.decision != APPROVED:
        raise AgreementError(
            f"agreement {agreement_id} is not approved in this haven; only an approved agreement can be suspended"
        )
    return _record(
        con,
        s.agreement,
        s.sha256,
        decision=SUSPENDED,
        by=by.strip(),
        on=today,
        reason=reason.strip(),
        source=SOURCE_COMMAND,
        actor=actor,
    )


@dataclass(frozen=True)
class Adoption:
    """What :func:`adopt` did with one agreement: ADOPTED, NO_BLOCK or ALREADY_DECIDED."""

    agreement_id: str
    outcome: str
    message: str
    decision: Decision | None = None


def _check_adopter(by: str, reason: str) -> None:
    if len(by.strip()) < MIN_NAME:
        raise AgreementError('name who adopts the file\'s approval and their role, e.g. "Name, Caldicott Guardian"')
    if len(reason.strip()) < MIN_REASON:
        raise AgreementError("give the reason the file's approval is adopted (recorded in the store and the audit)")


def _adopt_one(
    con: duckdb.DuckDBPyConnection,
    s: Standing,
    by: str,
    reason: str,
    *,
    actor: str,
    today: date,
) -> Adoption:
    """Adopt one agreement's block (module docstring, "Adoption is a person's decision")."""
    a, ap = s.agreement, s.agreement.approval
    if s.decision is not None:
        return Adoption(a.id, ALREADY_DECIDED, f"{a.id}: already {s.decision.decision} in this haven; nothing adopted")
    if ap.status not in (APPROVED, SUSPENDED):
        return Adoption(a.id, NO_BLOCK, f"{a.id}: its file's approval block says {ap.status}; nothing to adopt")
    decision = _record(
        con,
        a,
        s.sha256,
        decision=ap.status,
        by=by.strip(),
        on=today,
        reason=ap.reason if ap.status == SUSPENDED else reason.strip(),
        source=SOURCE_FILE,
        actor=actor,
        extra={"adopted": True, "adoption_reason": reason.strip(), "file_approval": ap.model_dump(mode="json")},
    )
    return Adoption(a.id, ADOPTED, f"{a.id}: adopted as {ap.status} by {by.strip()}", decision)


def adopt(
    con: duckdb.DuckDBPyConnection,
    agreement_ids: list[str] | None,
    by: str,
    reason: str,
    *,
    registry: ContractRegistry,
    actor: str,
    today: date | None = None,
) -> list[Adoption]:
    """Adopt the ``approval:`` block of each named agreement (``None``: every readable one) as a
    decision by ``by``, pinned to the file's SHA-256 and audited (Caldicott 1; CoP 41-43;
    SATRE 3.3.04). Refused without a named person and a reason; a file without an
    approved/suspended block, or one already decided, is only reported. Refused whole, with
    nothing recorded or audited, when any file that would be adopted has problems
    (:func:`adoption_problems`). An agreement decided before that check, or whose contracts
    changed since, is still refused at every release and linkage (``safehaven.share.releases``
    rule 2).
    """
    _check_adopter(by, reason)
    today = today or haven_today()
    ids = sorted(scan_agreements(registry.root)[0]) if agreement_ids is None else agreement_ids
    found = [load_standing(con, aid, registry.root) for aid in ids]
    refused = adoption_problems(found, registry, today)
    if refused:
        raise AgreementError(refused)
    return [_adopt_one(con, s, by, reason, actor=actor, today=today) for s in found]


def adoption_problems(found: list[Standing], registry: ContractRegistry, today: date) -> str:
    """One line naming each agreement that would be adopted but whose file has problems, and
    how to see them; empty when every one validates."""
    bad = {
        s.agreement.id: issues
        for s in found
        if s.decision is None and s.agreement.approval.status in (APPROVED, SUSPENDED)
        for issues in [problems(s.agreement, registry, today=today)]
        if issues
    }
    if not bad:
        return ""
    named = " | ".join(f"{aid}: {'; '.join(issues)}" for aid, issues in bad.items())
    return (
        f"refused, nothing adopted: {named}. Correct the file(s) "
        f"(safehaven agreements validate {' '.join(bad)}), then adopt again"
    )


def export(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    """Write the decisions to ``registers/agreement_decisions.{csv,parquet}``."""
    ensure_tables(con)
    reg.export_table(con, home, DECISIONS, "agreement_decisions", "decision_id")
