"""Planning a disposal: everything it will touch, fixed before anything is changed (CoP 43d, 43f, 48-50).

Rules: ``safehaven.dispose`` package docstring ("What is due", "What disposal does"). Planning is
read-only; an agreement in force is refused (suspend it first); the objections collection is not
disposed of by receipt date (objections are honoured for as long as the haven holds data, CoP
11-14); a disposal that needs the vault private key is refused on a host without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import duckdb

from safehaven.context import Haven
from safehaven.core.home import Home
from safehaven.core.keys import VAULT, KeyRing, agreement_purpose, derive_agreement_key
from safehaven.core.store import Store, table_exists
from safehaven.dispose.found import (
    files_under,
    incoming_copies,
    quarantine_files,
    release_tables,
    staged_files,
    staged_requests,
)
from safehaven.dispose.journal import midnight, new_id, now
from safehaven.dispose.model import RELEASE_REGISTER, DisposalError, Plan, Target
from safehaven.dispose.vault_sets import disposed_people, drop_vault_sets, load_batches, needs_vault_key, vault_sets
from safehaven.intake import landings
from safehaven.intake.contracts import Contract, ContractRegistry
from safehaven.intake.ingest import BATCHES
from safehaven.protect.pseudonymise import install_key
from safehaven.share import approvals, review
from safehaven.share.agreements import Agreement, AgreementError, agreement_path, load_agreement_file

#: Folders of ``releases/<agreement>/`` that are not releases.
NOT_RELEASES = ("notices", "rekey")


def agreement_file(
    registry: ContractRegistry, agreement_id: str, con: duckdb.DuckDBPyConnection | None = None
) -> Agreement | None:
    """The agreement as the haven acts on it, or ``None`` when it has no file; an unreadable file
    is refused (its status is unknown).

    Terms, dates and retention come from the file; whether it is approved or suspended from the
    store's decision (``safehaven.share.approvals.for_disposal``; no store: not approved), so a
    file saying ``approved`` cannot keep data from disposal and a file saying ``suspended``
    is not overridden (Caldicott 1; CoP 43d, 43f).
    """
    try:
        path = agreement_path(agreement_id, registry.root)
    except AgreementError:
        return None
    if not path.exists():
        return None
    try:
        return approvals.for_disposal(con, load_agreement_file(path), path)
    except AgreementError as exc:
        raise DisposalError(f"{exc}; fix the agreement file before disposing of its data") from None


def _registered_releases(con: duckdb.DuckDBPyConnection | None, agreement_id: str) -> list[tuple[str, datetime]]:
    """(release id, released at) of the agreement's releases in the data release register, oldest first."""
    if con is None or not table_exists(con, "governance", "release_register"):
        return []
    rows = con.execute(
        f"SELECT release_id, released_at FROM {RELEASE_REGISTER} WHERE agreement_id = ? "
        "ORDER BY released_at, release_id",
        [agreement_id],
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def _plan_releases(plan: Plan, con: duckdb.DuckDBPyConnection | None, home: Home) -> None:
    """Some releases of an agreement: their folders, and the release tables if the latest is among them."""
    t = plan.target
    aid = str(t.agreement)
    for rid in t.releases:
        files, dirs = files_under(home, home.releases / aid / rid, "release")
        plan.files += files
        plan.dirs += dirs
    plan.release_ids = list(t.releases)
    registered = _registered_releases(con, aid)
    if registered and registered[-1][0] in t.releases:
        plan.release_tables = release_tables(con, aid)
    _plan_staged(plan, con, home, staged_requests(con, agreement=aid, release_ids=t.releases))


def _plan_staged(plan: Plan, con: duckdb.DuckDBPyConnection | None, home: Home, release_ids: list[str]) -> None:
    """Requests still staged: withdrawn by the rows step, their staged files (and the files a
    stopped delivery left in ``releases/``: ``found.staged_files``) shredded by the files step.
    A file or folder the plan holds already (an agreement's whole ``releases/`` folder) is not
    listed twice."""
    files, dirs = staged_files(con, home, release_ids)
    planned = {f["path"] for f in plan.files}
    plan.staged_requests += release_ids
    plan.files += [f for f in files if f["path"] not in planned]
    plan.dirs += [d for d in dirs if d not in plan.dirs]


def _refuse_in_force(registry: ContractRegistry, aid: str, today: date, con: duckdb.DuckDBPyConnection | None) -> None:
    """An agreement in force keeps its data (CoP 43d: only when the purpose is achieved)."""
    agreement = agreement_file(registry, aid, con)
    if agreement is None:
        return
    in_force, why = agreement.in_force(today)
    if in_force:
        raise DisposalError(
            f"agreement {aid} is in force ({why}); data under an agreement in force is not disposed of. "
            f"Suspend it first (safehaven agreements suspend {aid}), or dispose of single releases past their "
            "retention with --release"
        )


def _agreement_key(keyring: KeyRing, aid: str) -> list[dict[str, Any]]:
    """The agreement's pseudonym salt, to destroy (with the id of the key derived from it)."""
    purpose = agreement_purpose(aid)
    if not keyring.exists(purpose):
        return []
    salt = keyring.get(purpose)
    entry: dict[str, Any] = {"kind": "agreement_pseudonym_salt", "purpose": purpose, "key_id": salt.key_id}
    if keyring.exists("haven"):
        entry["derived_key_id"] = derive_agreement_key(keyring.get("haven").material, salt.material, aid).key_id
    return [entry]


def _plan_agreement(
    plan: Plan,
    con: duckdb.DuckDBPyConnection | None,
    home: Home,
    registry: ContractRegistry,
    keyring: KeyRing,
    today: date,
) -> None:
    """An agreement's data: some releases, or (once it is no longer in force) everything and its key."""
    if plan.target.releases:
        _plan_releases(plan, con, home)
        return
    aid = str(plan.target.agreement)
    _refuse_in_force(registry, aid, today, con)
    folder = home.releases / aid
    plan.files, plan.dirs = files_under(home, folder, "release")
    plan.release_ids = (
        sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in NOT_RELEASES) if folder.is_dir() else []
    )
    plan.release_tables = release_tables(con, aid)
    plan.keys += _agreement_key(keyring, aid)
    _plan_staged(plan, con, home, staged_requests(con, agreement=aid))


def _content_contract(registry: ContractRegistry, collection: str) -> Contract:
    """The collection's contract; an objections collection is refused (module docstring)."""
    contract = registry.contracts.get(collection)
    if contract is None:
        raise DisposalError(f"there is no contract for collection {collection!r}")
    if contract.kind != "content":
        raise DisposalError(
            f"{collection} holds objections, which are honoured for as long as the haven holds data; "
            "they are not disposed of by receipt date"
        )
    return contract


@dataclass
class Received:
    """A collection's batches not yet disposed of, by when the audit trail records them received
    (``safehaven.intake.landings``) against a cut-off."""

    #: received before the cut-off: (batch id, file name, rows, received, status), oldest first
    before: list[tuple[str, str, int, datetime, str]] = field(default_factory=list)
    #: not on record, the register dating them before the cut-off: not disposed of by date
    unrecorded: list[str] = field(default_factory=list)
    #: on record, the register's time on the other side of the cut-off: the record decides
    register_differs: list[str] = field(default_factory=list)


def received_before(con: duckdb.DuckDBPyConnection | None, collection: str, cutoff: datetime) -> Received:
    """The batches of ``collection`` received before ``cutoff`` as the audit trail records them,
    never as the batch register alone dates them (CoP 43d, 23d; ``safehaven.intake.landings``)."""
    out = Received()
    if con is None or not table_exists(con, "governance", "batches"):
        return out
    recorded = landings.received(con, collection)
    rows = con.execute(  # compared in SQL: an odd register time (infinity, NULL) is never read as a date
        f"SELECT batch_id, file_name, rows, coalesce(landed_at < ?, true), status FROM {BATCHES} "
        "WHERE collection = ? AND status <> 'disposed' ORDER BY batch_id",
        [cutoff, collection],
    ).fetchall()
    out.unrecorded, out.register_differs = _unsettled([(r[0], r[3]) for r in rows], recorded, cutoff)
    out.before = sorted(
        ((b, name, n, recorded[b], status) for b, name, n, _, status in rows if recorded.get(b, cutoff) < cutoff),
        key=lambda r: (r[3], r[0]),
    )
    return out


def _unsettled(
    register: list[tuple[str, bool]], recorded: dict[str, datetime], cutoff: datetime
) -> tuple[list[str], list[str]]:
    """The one rule for batches and releases alike (CoP 43d, 23d): the audit trail's time decides,
    the store's register never does. Of the register's (id, dated before the cut-off) rows, those
    with no time on record that the register dates before the cut-off, and those on record that it
    dates on the other side: each a review item, neither disposed of by date."""
    unrecorded = [key for key, by_register in register if key not in recorded and by_register]
    differs = [key for key, by_register in register if key in recorded and by_register != (recorded[key] < cutoff)]
    return unrecorded, differs


@dataclass
class Released:
    """An agreement's releases by when the audit trail records them delivered
    (``safehaven.share.review.deliveries``) against a cut-off."""

    #: delivered before the cut-off, oldest first
    before: list[str] = field(default_factory=list)
    #: not on record, the release register dating them before the cut-off: not disposed of by date
    unrecorded: list[str] = field(default_factory=list)
    #: on record, the register's time on the other side of the cut-off: the record decides
    register_differs: list[str] = field(default_factory=list)


def released_before(con: duckdb.DuckDBPyConnection | None, agreement_id: str, cutoff: datetime) -> Released:
    """The releases of ``agreement_id`` delivered before ``cutoff`` as the audit trail records them,
    never as the release register alone dates them (CoP 43d, 23d): the daily sweep destroys the
    haven's copy of a release past its retention with no person, and the register is a store table
    that whoever holds the store key can date back (a fresh release destroyed) or forward (one kept
    past its retention). Also those registered but not on record, and those the two date apart."""
    out = Released()
    if con is None or not table_exists(con, "governance", "release_register"):
        return out
    recorded = review.deliveries(con, agreement_id)
    rows = con.execute(  # compared in SQL: an odd register time (infinity, NULL) is never read as a date
        f"SELECT release_id, coalesce(released_at < ?, true) FROM {RELEASE_REGISTER} WHERE agreement_id = ? "
        "ORDER BY release_id",
        [cutoff, agreement_id],
    ).fetchall()
    out.unrecorded, out.register_differs = _unsettled(rows, recorded, cutoff)
    out.before = sorted((r for r, at in recorded.items() if at < cutoff), key=lambda r: (recorded[r], r))
    return out


def _plan_batches(plan: Plan, con: duckdb.DuckDBPyConnection | None, cutoff: datetime) -> None:
    """The collection's batches received before ``cutoff`` (as the audit trail records it) and not yet
    disposed of; a batch whose receipt is not on record is left out (:func:`received_before`)."""
    rows = received_before(con, plan.target.collection, cutoff).before
    plan.batches = [
        {"batch_id": b, "file_name": f, "rows": n, "landed_at": at.isoformat(), "status": s} for b, f, n, at, s in rows
    ]


def _plan_collection_releases(plan: Plan, con: duckdb.DuckDBPyConnection | None, home: Home) -> None:
    """Record-level releases of the collection made since its first disposed batch landed, their tables, and
    the requests holding it still staged."""
    accepted = [b for b in plan.batches if b["status"] == "accepted"]  # only these reached the haven
    if not accepted or con is None:
        return
    first = min(datetime.fromisoformat(b["landed_at"]) for b in accepted)
    _plan_staged(plan, con, home, staged_requests(con, collection=plan.target.collection, since=first))
    if not table_exists(con, "governance", "release_register"):
        return
    releases = con.execute(
        f"SELECT release_id, agreement_id FROM {RELEASE_REGISTER} WHERE identifiability <> 'anonymised' "
        "AND list_contains(string_split(collections, ', '), ?) AND released_at >= ? "
        "ORDER BY released_at, release_id",
        [plan.target.collection, first],
    ).fetchall()
    for rid, aid in releases:
        plan.release_ids.append(rid)
        files, dirs = files_under(home, home.releases / aid / rid, "release")
        plan.files += files
        plan.dirs += dirs
    for aid in sorted({a for _, a in releases}):
        plan.release_tables += release_tables(con, aid)


def _plan_vault(
    plan: Plan, con: duckdb.DuckDBPyConnection | None, contract: Contract, registry: ContractRegistry, keyring: KeyRing
) -> None:
    """How many vault entries need the vault private key to be disposed of precisely (``vault_sets``)."""
    ready = (
        plan.batch_ids
        and con is not None
        and table_exists(con, "vault", "identity")
        and keyring.exists("haven")
        and table_exists(con, "landing", f"{contract.collection}_valid")
    )
    if not ready or con is None:
        return
    install_key(con, "haven", keyring.get("haven"))
    load_batches(con, plan.batch_ids)
    disposed_people(con, contract)
    plan.vault_values_needing_key = vault_sets(con, registry.contracts.values())
    drop_vault_sets(con)


def _plan_collection(
    plan: Plan, con: duckdb.DuckDBPyConnection | None, home: Home, registry: ContractRegistry, keyring: KeyRing
) -> None:
    """A collection's records received before a day: batches, releases made from them, plain copies, vault."""
    t = plan.target
    assert t.collection is not None and t.before is not None
    contract = _content_contract(registry, t.collection)
    cutoff = midnight(t.before)
    _plan_batches(plan, con, cutoff)
    ids = set(plan.batch_ids)
    _plan_collection_releases(plan, con, home)
    files, dirs = quarantine_files(home, t.collection, cutoff, ids)
    plan.files += files
    plan.dirs += dirs
    plan.files += incoming_copies(home, t.collection, ids)
    _plan_vault(plan, con, contract, registry, keyring)


def _plan_target(
    plan: Plan,
    con: duckdb.DuckDBPyConnection | None,
    home: Home,
    registry: ContractRegistry,
    keyring: KeyRing,
    today: date,
) -> None:
    if plan.target.kind == "agreement":
        _plan_agreement(plan, con, home, registry, keyring, today)
    else:
        _plan_collection(plan, con, home, registry, keyring)


def _collection_reason(target: Target, registry: ContractRegistry) -> str:
    contract = registry.contracts.get(target.collection or "")
    days = (
        f"; the contract's retention is {contract.retention_days} days" if contract and contract.retention_days else ""
    )
    return f"records of {target.collection} received before {target.before} are no longer required{days}"


def _agreement_reason(
    target: Target, registry: ContractRegistry, today: date, con: duckdb.DuckDBPyConnection | None
) -> str:
    agreement = agreement_file(registry, target.agreement or "", con)
    if target.releases:
        return (
            f"the haven's copy of release(s) {', '.join(target.releases)} under agreement {target.agreement} "
            "is no longer required"
        )
    if agreement is None:
        return f"agreement {target.agreement} has no agreement file; its data is no longer required"
    status = agreement.status_on(today)
    if status == "expired":
        return f"agreement {agreement.id} expired on {agreement.end_date} (CoP 43d): {agreement.retention.destruction}"
    if status == "suspended":
        return (
            f"agreement {agreement.id} suspended: {agreement.approval.reason} (CoP 43f): "
            f"{agreement.retention.on_breach}"
        )
    return f"agreement {agreement.id} ({status}): its data is no longer required"


def default_reason(
    target: Target, registry: ContractRegistry, today: date, con: duckdb.DuckDBPyConnection | None = None
) -> str:
    """Why ``target`` is disposed of, when the caller gives no reason (CoP 43d, 43f; contract retention)."""
    if target.kind == "collection":
        return _collection_reason(target, registry)
    return _agreement_reason(target, registry, today, con)


@contextmanager
def _read_store(home: Home, keyring: KeyRing) -> Iterator[duckdb.DuckDBPyConnection | None]:
    """The store opened read-only, or ``None`` when the haven has none yet."""
    if not home.store_file.exists():
        yield None
        return
    with Store(home, keyring).connect(read_only=True) as con:
        yield con


def make_plan(
    haven: Haven,
    target: Target,
    *,
    reason: str | None = None,
    authorised_by: str | None = None,
) -> Plan:
    """What disposing of ``target`` would touch (read-only; a dry run prints its summary).

    ``haven`` gives the home, the contracts (retention periods, agreements), the key ring, the
    requester (``haven.actor``) and the day retention is counted to.
    """
    home, registry, keyring, today = haven.home, haven.contracts, haven.keyring, haven.today
    with _read_store(home, keyring) as con:
        why = reason or default_reason(target, registry, today, con)
        plan = Plan(new_id(), target, why, haven.actor, authorised_by, now())
        _plan_target(plan, con, home, registry, keyring, today)
    if plan.vault_values_needing_key and not keyring.exists(VAULT):
        raise needs_vault_key(keyring, plan.vault_values_needing_key)
    return plan
