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
* **Adoption, once.** The first time the haven sees an agreement that has no decision in the
  store, an ``approval:`` block in the file saying ``approved`` or ``suspended`` is adopted as
  a decision with ``source = file`` (audited). This carries over approvals made before they
  moved into the store; after that the file's block is never read again for the decision.

:func:`effective` gives the agreement with its ``approval`` taken from the store, so the
existing ``Agreement.in_force``/``status_on`` logic (dates, expiry) applies unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb

from safehaven.core import audit
from safehaven.core import registers as reg
from safehaven.core.files import sha256_file
from safehaven.core.home import Home
from safehaven.intake.contracts import ContractRegistry
from safehaven.share.agreements import (
    Agreement,
    AgreementError,
    Approval,
    agreement_path,
    load_agreement_file,
    problems,
)

DECISIONS = "governance.agreement_decisions"
APPROVED, SUSPENDED = "approved", "suspended"
#: where a decision came from: a person's command, or the file's block adopted once
SOURCE_COMMAND, SOURCE_FILE = "command", "file"
MIN_NAME = 3
MIN_REASON = 5

_DDL = f"""
CREATE TABLE IF NOT EXISTS {DECISIONS} (
    decision_id BIGINT PRIMARY KEY,
    agreement_id VARCHAR NOT NULL,
    decision VARCHAR NOT NULL,
    decided_by VARCHAR NOT NULL,
    decided_on DATE NOT NULL,
    reason VARCHAR,
    agreement_version VARCHAR NOT NULL,
    agreement_sha256 VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    recorded_by VARCHAR NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL
)
"""


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

    @property
    def changed_since_decision(self) -> bool:
        return self.decision is not None and self.decision.agreement_sha256 != self.sha256

    def in_force(self, day: date | None = None) -> tuple[bool, str]:
        """Whether data may flow under the agreement on ``day``; if not, why and how to clear it."""
        a = self.agreement
        if self.decision is None:
            return False, (
                f"agreement {a.id} has not been approved in this haven (its file says {a.approval.status}); "
                f"approve it with: safehaven agreements approve {a.id} --approver ..."
            )
        if self.changed_since_decision:
            return False, (
                f"agreement {a.id} changed since it was {self.decision.decision} (its file's SHA-256 differs); "
                f"nothing flows until it is approved again: safehaven agreements approve {a.id} --approver ..."
            )
        return effective(self).in_force(day)


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(_DDL)


def latest(con: duckdb.DuckDBPyConnection, agreement_id: str) -> Decision | None:
    """The most recent decision on an agreement, or ``None``."""
    ensure_tables(con)
    row = con.execute(
        f"SELECT agreement_id, decision, decided_by, decided_on, reason, agreement_sha256, source FROM {DECISIONS} "
        "WHERE agreement_id = ? ORDER BY decision_id DESC LIMIT 1",
        [agreement_id],
    ).fetchone()
    return Decision(*row) if row else None


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
) -> Decision:
    """Insert one decision and audit it (who, when, why, on which file hash)."""
    ensure_tables(con)
    con.execute(
        f"INSERT INTO {DECISIONS} SELECT coalesce(max(decision_id), 0) + 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
        f"CAST(? AS TIMESTAMPTZ) FROM {DECISIONS}",
        [agreement.id, decision, by, on, reason, agreement.version, sha, source, actor, datetime.now(UTC).isoformat()],
    )
    audit.append(
        con,
        actor=actor,
        role="governance",
        action="approve" if decision == APPROVED else "suspend",
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
        },
    )
    return Decision(agreement.id, decision, by, on, reason, sha, source)


def _adopt(con: duckdb.DuckDBPyConnection, agreement: Agreement, sha: str, actor: str) -> Decision | None:
    """Adopt the file's approval block once, when the store holds no decision (module docstring)."""
    ap = agreement.approval
    if ap.status not in (APPROVED, SUSPENDED) or not ap.approver or ap.date is None:
        return None
    return _record(
        con,
        agreement,
        sha,
        decision=ap.status,
        by=(ap.suspended_by if ap.status == SUSPENDED and ap.suspended_by else ap.approver),
        on=(ap.suspended_on if ap.status == SUSPENDED and ap.suspended_on else ap.date),
        reason=ap.reason,
        source=SOURCE_FILE,
        actor=actor,
    )


def standing(con: duckdb.DuckDBPyConnection, agreement: Agreement, path: Path, actor: str) -> Standing:
    """The agreement's standing: its file hash and the store's latest decision (adopting once)."""
    sha = sha256_file(path)
    decision = latest(con, agreement.id)
    if decision is None:
        decision = _adopt(con, agreement, sha, actor)
    return Standing(agreement, sha, decision)


def status_label(con: duckdb.DuckDBPyConnection, agreement: Agreement, path: Path, day: date | None = None) -> str:
    """The status to show a person: the store's decision (``changed`` if the file changed since),
    or ``not approved in the haven`` for a file the haven has not adopted yet. Adopts nothing."""
    decision = latest(con, agreement.id)
    if decision is None:
        return f"not approved in the haven (file: {agreement.approval.status})"
    if decision.agreement_sha256 != sha256_file(path):
        return f"changed since {decision.decision}"
    return effective(Standing(agreement, decision.agreement_sha256, decision)).status_on(day)


def effective(s: Standing) -> Agreement:
    """The agreement with its ``approval`` block replaced by the store's decision.

    A changed file or no decision gives ``draft`` (not approved); the store's reason is kept.
    """
    d = s.decision
    if d is None or s.changed_since_decision:
        return s.agreement.model_copy(update={"approval": Approval(status="draft")})
    if d.decision == APPROVED:
        approval = Approval(status="approved", approver=d.decided_by, date=d.decided_on)
    else:
        approval = Approval(
            status="suspended",
            approver=s.agreement.approval.approver or d.decided_by,
            date=s.agreement.approval.date or d.decided_on,
            reason=d.reason,
            suspended_by=d.decided_by,
            suspended_on=d.decided_on,
        )
    return s.agreement.model_copy(update={"approval": approval})


def approve(
    con: duckdb.DuckDBPyConnection,
    agreement_id: str,
    approver: str,
    *,
    registry: ContractRegistry,
    actor: str,
    today: date | None = None,
) -> Decision:
    """Approve (or re-approve) an agreement with no problems, pinned to its file's SHA-256."""
    today = today or date.today()
    if len(approver.strip()) < MIN_NAME:
        raise AgreementError('name the approver and their role, e.g. "Name, Caldicott Guardian"')
    path = agreement_path(agreement_id, registry.root)
    if not path.exists():
        raise AgreementError(f"no agreement {agreement_id!r} ({path})")
    current = load_agreement_file(path)
    if current.end_date < today:
        raise AgreementError(f"agreement {agreement_id} ended on {current.end_date}; it cannot be approved")
    as_approved = current.model_copy(
        update={"approval": Approval(status="approved", approver=approver.strip(), date=today)}
    )
    found = problems(as_approved, registry, today=today)
    if found:
        raise AgreementError(f"agreement {agreement_id} cannot be approved: " + "; ".join(found))
    return _record(
        con,
        current,
        sha256_file(path),
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
    today = today or date.today()
    if len(reason.strip()) < MIN_REASON:
        raise AgreementError("give the reason for the suspension")
    path = agreement_path(agreement_id, registry.root)
    if not path.exists():
        raise AgreementError(f"no agreement {agreement_id!r} ({path})")
    s = standing(con, load_agreement_file(path), path, actor)
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


def export(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    """Write the decisions to ``registers/agreement_decisions.{csv,parquet}``."""
    ensure_tables(con)
    reg.export_table(con, home, DECISIONS, "agreement_decisions", "decision_id")
