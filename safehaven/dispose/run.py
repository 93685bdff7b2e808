"""Carrying out a disposal: plan, journal, steps, certificate; or resuming one (CoP 43d, 43f, 48-50).

Rules: ``safehaven.dispose`` package docstring. One disposal at a time: while a journal is
pending, another target is refused (:class:`DisposalPending`) until the interrupted one is
completed; the same target resumes it. Every start, resumption, refusal part way and completion
is audited.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from safehaven.context import Haven
from safehaven.core import audit
from safehaven.core import registers as reg
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.store import SimulatedCrash, Store, table_exists
from safehaven.dispose import journal
from safehaven.dispose.certificate import certificate_of, ensure_tables
from safehaven.dispose.journal import journal_path, journal_sound, pending, save_journal
from safehaven.dispose.model import (
    ACTION,
    DESTROYS,
    FINISHED,
    PURPOSE,
    REFUSED,
    STARTED,
    DisposalError,
    DisposalPending,
    DisposalResult,
    Plan,
    Target,
)
from safehaven.dispose.planning import make_plan
from safehaven.dispose.steps import Run
from safehaven.intake import landings
from safehaven.intake.contracts import ContractRegistry

log = logging.getLogger(__name__)


def _audit(home: Home, keyring: KeyRing, plan: Plan, actor: str, outcome: str, detail: dict[str, Any]) -> None:
    """One ``dispose`` audit entry for ``plan`` (``started`` or ``resumed``)."""
    with Store(home, keyring).connect() as con:
        ensure_tables(con)
        audit.append(
            con,
            actor=actor,
            role="governance",
            action=ACTION,
            object=f"disposal:{plan.disposal_id}",
            purpose=PURPOSE,
            agreement=plan.target.agreement,
            outcome=outcome,
            home=home,
            keyring=keyring,
            detail=detail,
        )


def plan_digest(plan: dict[str, Any]) -> str:
    """SHA-256 of a plan as the journal holds it (canonical JSON): recorded in the audit entry of
    the disposal's start, so a journal written or changed outside the haven is not carried out."""
    return hashlib.sha256(journal.canonical(plan)).hexdigest()


def _started_on_record(home: Home, keyring: KeyRing, journal: dict[str, Any]) -> bool:
    """Refuse to resume a journal the haven did not write as it stands, or whose plan is not the
    one the audit trail records starting; True when the trail also records it finished (certified).

    The journal is a file beside the store: whoever can write there could otherwise have the
    daily sweep, which resumes first, destroy whatever a forged plan names, or mark steps done so
    that they are skipped while the certificate claims them. It carries a MAC over all of it under
    a key derived from the audit key (``safehaven.dispose.journal.save_journal``), and the trail's
    own ``started`` entry of the disposal (its hash verified under the audit key) must hold the
    SHA-256 of its plan (:func:`plan_digest`). A journal from before either was recorded is refused
    too: a person plans that disposal again. An authentic journal of a disposal already certified
    (left by a crash after the certificate, or a copy put back later) is never carried out again:
    its steps would destroy whatever now bears the planned names, e.g. a file sent again."""
    disposal = journal.get("disposal_id")
    with Store(home, keyring).connect(read_only=True) as con:
        entries = [e for e in audit.authentic_entries(con, [ACTION], home) if e.object == f"disposal:{disposal}"]
    plan = journal.get("plan")
    started = [e.fields for e in entries if e.outcome == STARTED]
    if journal_sound(keyring, journal) and isinstance(plan, dict):
        if any(f.get("plan_sha256") == plan_digest(plan) for f in started):
            return any(e.outcome == FINISHED for e in entries)
    raise DisposalError(
        f"the disposal journal {journal_path(home)} is not a disposal the audit trail records starting, "
        "or not as the haven wrote it (written or changed outside the haven, or by an earlier version): "
        "nothing was disposed of; check it with the governance lead, restore it from a backup, or remove "
        "it and plan the disposal again"
    )


def _run(
    home: Home,
    journal: dict[str, Any],
    registry: ContractRegistry,
    keyring: KeyRing,
    crash_after: str | None,
    resumed: bool,
) -> DisposalResult:
    finished = resumed and _started_on_record(home, keyring, journal)
    plan = Plan.from_dict(journal["plan"])
    if resumed:
        detail = {"steps_done": sorted(journal["steps"]), **({"already_certified": True} if finished else {})}
        _audit(home, keyring, plan, reg.current_actor(), "resumed", detail)
    if finished:
        certificate = _certified(home, keyring, plan)
    else:
        try:
            certificate = Run(home, journal, registry, keyring, crash_after).run()
        except DisposalError as refused:
            _audit_refusal(home, keyring, plan, journal, refused)
            raise
    return DisposalResult("disposed", plan.target, plan.reason, plan.disposal_id, certificate, resumed)


def _audit_refusal(home: Home, keyring: KeyRing, plan: Plan, journal: dict[str, Any], refused: DisposalError) -> None:
    """Audit a started disposal refused part way (``dispose``/``refused``: the steps done and the
    reason, which names files by their shown paths only): the governance lead sees on the trail
    why it waits, at every attempt, until a person clears it and a resume completes it (CoP 49).
    A trail that cannot take the entry does not hide the refusal itself."""
    detail = {"steps_done": sorted(journal["steps"]), "reason": str(refused)[:1000]}
    try:
        _audit(home, keyring, plan, reg.current_actor(), REFUSED, detail)
    except Exception:  # noqa: BLE001 - the refusal is raised whatever the trail does
        log.warning("disposal %s: its refusal could not be audited", plan.disposal_id)


def _certified(home: Home, keyring: KeyRing, plan: Plan) -> dict[str, Any]:
    """The certificate of a disposal the trail records finished; its journal is removed with no
    step carried out again (:func:`_started_on_record`)."""
    with Store(home, keyring).connect(read_only=True) as con:
        stored = certificate_of(con, plan.disposal_id)
    if stored is None:
        raise DisposalError(
            f"the audit trail records disposal {plan.disposal_id} certified but the disposal register has no "
            f"certificate for it: nothing was disposed of again; check the register with the governance lead "
            f"(restore it from a backup) before removing {journal_path(home)}"
        )
    journal_path(home).unlink(missing_ok=True)
    return stored


def _start(home: Home, keyring: KeyRing, plan: Plan) -> dict[str, Any]:
    """Audit the start of a new disposal, naming the ids of the keys it destroys (:data:`DESTROYS`),
    then write its journal (a journal is carried out only as the trail records it starting:
    :func:`_started_on_record`); returns the journal."""
    target = plan.target
    journal = {"disposal_id": plan.disposal_id, "target": target.as_dict(), "plan": plan.as_dict(), "steps": {}}
    detail = {
        "target": target.as_dict(),
        "plan_sha256": plan_digest(journal["plan"]),
        "reason": plan.reason[:500],
        **{k: v for k, v in plan.summary().items() if k in ("batches", "files", "releases", "staged_requests")},
        # ids only: a key the trail records a disposal destroying is never recorded again, even
        # before the certificate (``safehaven.protect.key_record``)
        DESTROYS: sorted(str(k["key_id"]) for k in plan.keys),
    }
    _audit(home, keyring, plan, plan.requested_by, STARTED, detail)
    save_journal(home, keyring, journal)
    return journal


def record_landings(haven: Haven) -> None:
    """Put on record the receipt of every content batch the audit trail does not record
    (``safehaven.intake.landings.record_unrecorded``), before a disposal or a sweep: a collection
    that sends nothing more is still disposed of by date, and a disposal's vault entry sets judge a
    GP batch's landing as the haven's late type 1 purge does, which records them first (adopted on a
    haven from before the rule: ``safehaven.protect.haven.purge_late_type1``; found by review: they
    disagreed). Nothing is recorded while the trail does not verify."""
    if not haven.home.store_file.exists():
        return
    with Store(haven.home, haven.keyring).connect() as con:
        if table_exists(con, "governance", "batches"):
            for contract in haven.contracts.content():
                landings.record_unrecorded(con, contract.collection)


def dispose(
    haven: Haven,
    target: Target,
    *,
    reason: str | None = None,
    authorised_by: str | None = None,
    plan: Plan | None = None,
    _crash_after: str | None = None,
) -> DisposalResult:
    """Dispose of ``target``: logically, then physically, then certify (``safehaven.dispose``).

    Idempotent: a target already disposed of has nothing left and returns ``nothing_to_dispose``
    without a new certificate. If the same target's disposal was interrupted it is resumed; if
    another's was, :class:`DisposalPending` is raised. ``plan`` (from :func:`make_plan`, e.g. the one a
    person confirmed) is carried out as it stands. ``_crash_after`` (tests only) stops after
    a step's action and before its journal entry: ``plan``, ``keys``, ``rows``, ``files``,
    ``rebuild:build``, ``rebuild:journal`` (inside ``Store.rebuild``), ``rebuild``, ``record``.
    ``haven`` gives the home, the contracts, the key ring, the requester and the day.
    """
    home, registry, keyring = haven.home, haven.contracts, haven.keyring
    home.ensure()
    record_landings(haven)
    journal = pending(home)
    if journal is not None:
        interrupted = Target.from_dict(journal["target"])
        if interrupted == target:
            return _run(home, journal, registry, keyring, _crash_after, resumed=True)
        raise DisposalPending(
            f"disposal {journal['disposal_id']} ({interrupted.describe()}) was interrupted; "
            "complete it first: safehaven dispose --resume"
        )
    if plan is None or plan.target != target:
        plan = make_plan(haven, target, reason=reason, authorised_by=authorised_by)
    if plan.empty:
        return DisposalResult("nothing_to_dispose", target, f"nothing is held for {target.describe()}")
    journal = _start(home, keyring, plan)
    if _crash_after == "plan":
        raise SimulatedCrash("simulated crash after plan")
    return _run(home, journal, registry, keyring, _crash_after, resumed=False)


def resume(haven: Haven, *, _crash_after: str | None = None) -> DisposalResult | None:
    """Complete an interrupted disposal from its journal (with ``haven``'s contracts and key ring);
    ``None`` when there is none."""
    journal = pending(haven.home)
    if journal is None:
        return None
    return _run(haven.home, journal, haven.contracts, haven.keyring, _crash_after, resumed=True)
