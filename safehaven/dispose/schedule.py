"""What is due for disposal, and the daily sweep that disposes of it (CoP 43d, 43f, 48-50).

Rules (``safehaven.dispose`` package docstring, "What is due"): a collection's records are due
``retention_days`` after the haven received them; an agreement's data when it has expired (CoP
43d) or been suspended for a breach (CoP 43f); one release ``retention.days`` after it was made.
A suspension not for a breach, and a pseudonym key without an agreement file, are listed for a
person to review, never disposed of automatically. Whether an agreement is approved, suspended
or expired is the store's decision (``safehaven.share.approvals.for_disposal``), never the file's
``approval:`` block alone; its dates and retention come from the file. An interrupted disposal is resumed first.
"""

from __future__ import annotations

import os
import re
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb

from safehaven.context import Haven
from safehaven.core import registers as reg
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing, agreement_ids, agreement_purpose
from safehaven.core.store import Store, table_exists
from safehaven.dispose.found import quarantine_files, release_tables
from safehaven.dispose.journal import midnight, pending
from safehaven.dispose.model import (
    DisposalError,
    DisposalPending,
    DueItem,
    SweepReport,
    Target,
)
from safehaven.dispose.planning import Received, received_before, released_before
from safehaven.dispose.run import dispose, record_landings, resume
from safehaven.intake.contracts import Contract, ContractRegistry
from safehaven.share import approvals
from safehaven.share.agreements import Agreement, AgreementError, agreements_dir, scan_agreements

#: A suspension whose approval reason names a breach is a suspension for a breach (CoP 43f).
BREACH_REASON = re.compile(r"\bbreach", re.IGNORECASE)
#: The least breach severity that counts as a breach of the agreement (breach register).
BREACH_SEVERITY = 1


def suspended_for_breach(agreement: Agreement) -> str | None:
    """Why a suspended agreement counts as suspended for a breach (CoP 43f), or ``None``: its
    suspension's reason names one. That decision is the one the audit trail records
    (``safehaven.share.approvals``: a decision edited in the store is refused before this)."""
    ap = agreement.approval
    if BREACH_REASON.search(ap.reason or ""):
        return f"suspended for a breach: {ap.reason}"
    return None


def breach_on_register(agreement: Agreement, con: duckdb.DuckDBPyConnection | None) -> str | None:
    """A breach of severity 1 or 2 naming the agreement in the breach register since it was
    suspended, or ``None``. The register is in the store, not on the audit trail (anyone holding
    the store key can add a row), so such a breach never disposes of data by itself: a person
    weighs it (the agreement is listed for review, saying so)."""
    if con is None or not table_exists(con, "governance", "breach_register"):
        return None
    ap = agreement.approval
    since = midnight(ap.suspended_on or ap.date or date.min)
    row = con.execute(
        f"SELECT breach_id, kind FROM {reg.BREACH_REGISTER} WHERE severity >= {BREACH_SEVERITY} AND recorded_at >= ? "
        "AND json_extract_string(detail, '$.agreement') = ? ORDER BY breach_id LIMIT 1",
        [since, agreement.id],
    ).fetchone()
    return f"breach {row[0]} ({row[1]}) in the breach register names it" if row else None


def _holds(home: Home, keyring: KeyRing, con: duckdb.DuckDBPyConnection | None, agreement_id: str) -> bool:
    """Whether the haven still holds anything of the agreement: its key, release files or tables."""
    folder = home.releases / agreement_id
    return (
        keyring.exists(agreement_purpose(agreement_id))
        or folder.is_symlink()  # a link in place of its folder: held until a disposal refuses it (found.files_under)
        or (folder.is_dir() and any(folder.iterdir()))
        or bool(release_tables(con, agreement_id))
    )


def _due_collection(
    home: Home, contract: Contract, con: duckdb.DuckDBPyConnection | None, today: date
) -> list[DueItem]:
    """The collection's records received more than its retention ago, if any, as the audit trail
    records their receipt (``safehaven.dispose.planning.received_before``); and a review item for
    batches whose receipt the record does not settle."""
    cutoff = today - timedelta(days=contract.retention_days or 0)
    received = received_before(con, contract.collection, midnight(cutoff))
    files, folders = quarantine_files(home, contract.collection, midnight(cutoff), set())
    items = [_unsettled(contract, received, cutoff)] if received.unrecorded or received.register_differs else []
    if not (received.before or files or folders):
        return items
    due = DueItem(
        "dispose",
        f"{contract.collection}: received before {cutoff}, more than the contract's retention of "
        f"{contract.retention_days} days ago (contract v{contract.version})",
        Target.for_collection(contract.collection, cutoff),
        {"batches": len(received.before), "quarantined_files": len(files), "quarantined_folders": len(folders)},
    )
    return [due, *items]


def _unsettled(contract: Contract, received: Received, cutoff: date) -> DueItem:
    """The review item for batches the register dates one side of the cut-off and the audit trail
    the other, or not at all (``safehaven.intake.landings``): none is disposed of by the register."""
    parts = []
    if received.unrecorded:
        parts.append(
            f"{len(received.unrecorded)} batch(es) whose receipt is not on the audit trail (landed by a run "
            "that was stopped, or while the trail did not verify) are not disposed of by date; the daily "
            "sweep and the collection's next landing step put them on record, counting from then (if they "
            "stay listed, the audit trail does not verify: safehaven audit verify)"
        )
    if received.register_differs:
        parts.append(
            f"{len(received.register_differs)} batch(es) whose received time in the batch register differs from "
            "the one the audit trail records: retention counts from the trail's; check who changed the register"
        )
    return DueItem(
        "review",
        f"{contract.collection} (retention cut-off {cutoff}): " + "; ".join(parts),
        Target.for_collection(contract.collection, cutoff),
        {"unrecorded": received.unrecorded[:20], "register_differs": received.register_differs[:20]},
    )


def _due_suspended(aid: str, a: Agreement, con: duckdb.DuckDBPyConnection | None) -> DueItem:
    """A suspended agreement: disposed of if for a breach (CoP 43f), else listed for review."""
    breach = suspended_for_breach(a)
    if breach:
        reason = f"agreement {aid} {breach} (CoP 43f): {a.retention.on_breach}"
        return DueItem("dispose", reason, Target.for_agreement(aid), {"status": "suspended"})
    reason = (
        f"agreement {aid} is suspended ({a.approval.reason}), not for a recorded breach; a suspension can be "
        "lifted, so its data is not disposed of automatically"
    )
    on_register = breach_on_register(a, con)
    if on_register:
        reason += (
            f"; {on_register}: if the suspension is for it, record the suspension again with a reason naming "
            "the breach (the register alone does not dispose of data: it is not on the audit trail)"
        )
    return DueItem("review", reason, Target.for_agreement(aid), {"status": "suspended"})


def _due_releases(
    home: Home, aid: str, a: Agreement, status: str, con: duckdb.DuckDBPyConnection | None, today: date
) -> list[DueItem]:
    """Releases under an agreement in force delivered more than its retention ago, as the audit trail
    records their delivery (``safehaven.dispose.planning.released_before``), whose copy the haven
    holds; and a review item for releases whose delivery the record does not settle."""
    cutoff = midnight(today - timedelta(days=a.retention.days))
    released = released_before(con, aid, cutoff)
    # a link in place of a release's folder counts as held: its disposal then refuses it (found.files_under)
    kinds = (released.before, released.unrecorded, released.register_differs)
    held = [[r for r in rids if os.path.lexists(home.releases / aid / r)] for rids in kinds]
    old, unrecorded, differs = held
    items = [_unsettled_releases(aid, unrecorded, differs, cutoff)] if unrecorded or differs else []
    if not old:
        return items
    due = DueItem(
        "dispose",
        f"{len(old)} release(s) under agreement {aid} were made more than its retention of {a.retention.days} days ago",
        Target.for_agreement(aid, old),
        {"status": status},
    )
    return [due, *items]


def _unsettled_releases(aid: str, unrecorded: list[str], differs: list[str], cutoff: datetime) -> DueItem:
    """The review item for releases the release register dates one side of the cut-off and the audit
    trail the other, or that it holds with no delivery on record: none is disposed of by the register."""
    parts = []
    if unrecorded:
        parts.append(
            f"{len(unrecorded)} release(s) in the release register have no delivery on the audit trail and are "
            "not disposed of by date (a delivery that was stopped: safehaven review release finishes it; "
            "otherwise check who added the register row)"
        )
    if differs:
        parts.append(
            f"{len(differs)} release(s) whose release time in the release register differs from the delivery "
            "the audit trail records: retention counts from the trail's; check who changed the register"
        )
    return DueItem(
        "review",
        f"agreement {aid} (retention cut-off {cutoff.date()}): " + "; ".join(parts),
        Target.for_agreement(aid),
        {"unrecorded": unrecorded[:20], "register_differs": differs[:20]},
    )


def _due_agreement(
    home: Home, aid: str, a: Agreement, con: duckdb.DuckDBPyConnection | None, today: date
) -> list[DueItem]:
    """What is due for one agreement the haven holds data of."""
    status = a.status_on(today)
    if status == "expired":
        reason = f"agreement {aid} expired on {a.end_date} (CoP 43d): {a.retention.destruction}"
        return [DueItem("dispose", reason, Target.for_agreement(aid), {"status": status})]
    if status == "suspended":
        return [_due_suspended(aid, a, con)]
    return _due_releases(home, aid, a, status, con, today)


def _agreement_items(
    home: Home, aid: str, a: Agreement, path: Path, con: duckdb.DuckDBPyConnection | None, today: date
) -> list[DueItem]:
    """What is due for one agreement, as disposal judges it; a review item when its decision in the
    store is not the audit trail's (``approvals.for_disposal``: never acted on, never ignored)."""
    try:
        judged = approvals.for_disposal(con, a, path)
    except AgreementError as exc:
        return [DueItem("review", str(exc), Target.for_agreement(aid), {})]
    return _due_agreement(home, aid, judged, con, today)


def _due_in(
    items: list[DueItem],
    home: Home,
    registry: ContractRegistry,
    keyring: KeyRing,
    con: duckdb.DuckDBPyConnection | None,
    today: date,
) -> None:
    collections = [
        item for c in registry.content() if c.retention_days for item in _due_collection(home, c, con, today)
    ]
    found, errors = scan_agreements(registry.root)
    folder = agreements_dir(registry.root)
    agreements = [
        item
        for aid, a in sorted(found.items())
        if _holds(home, keyring, con, aid)
        for item in _agreement_items(home, aid, a, folder / f"{aid}.yaml", con, today)
    ]
    items += collections + agreements
    items += [
        DueItem(
            "review",
            f"a pseudonym key exists for agreement {aid}, which has no agreement file",
            Target.for_agreement(aid),
            {},
        )
        for aid in agreement_ids(keyring)
        if aid not in found and aid not in errors
    ]


def due(haven: Haven) -> list[DueItem]:
    """Everything whose retention period or agreement has ended by ``haven.today`` (module docstring),
    under ``haven``'s contracts, oldest rule first."""
    home, registry, keyring, today = haven.home, haven.contracts, haven.keyring, haven.today
    items: list[DueItem] = []
    journal = pending(home)
    if journal is not None:
        items.append(
            DueItem(
                "resume",
                f"disposal {journal['disposal_id']} was interrupted",
                Target.from_dict(journal["target"]),
                {"steps_done": sorted(journal["steps"])},
            )
        )
    if home.store_file.exists():
        with Store(home, keyring).connect(read_only=True) as con:
            _due_in(items, home, registry, keyring, con, today)
    else:
        _due_in(items, home, registry, keyring, None, today)
    return items


def sweep(haven: Haven, *, authorised_by: str | None = None) -> SweepReport:
    """Resume an interrupted disposal, then dispose of everything due (the daily job), with ``haven``."""
    report = SweepReport()
    record_landings(haven)
    resumed = resume(haven)
    if resumed is not None:
        report.results.append(resumed)
    for item in due(haven):
        if item.action == "review":
            report.review.append(item)
        elif item.action == "dispose" and item.target is not None:
            _sweep_one(haven, item, report, authorised_by)
    return report


def _sweep_one(haven: Haven, item: DueItem, report: SweepReport, authorised_by: str | None) -> None:
    """Dispose of one due item; a refusal is reported and the sweep goes on (an interruption stops it)."""
    assert item.target is not None
    try:
        result = dispose(haven, item.target, reason=item.reason, authorised_by=authorised_by)
    except DisposalPending:
        raise
    except DisposalError as exc:
        report.failed.append({"target": item.target.describe(), "error": str(exc)})
        return
    report.results.append(result)
