"""Subject access: what the haven holds about one person, and every use of their record.

Rules (CoP 12: organisations "should be able to tell a person" how their information is used;
Data Protection Act subject access, as on the rules-for-sharing page; Government response to
the Caldicott review, recommendation 1: "an audit trail that details anyone and everyone who
has accessed a patient's record should be made available ... to patients"):

* **Who may ask the haven to run it.** The governance lead, who holds the identity vault's
  private key: the report is refused on a host without ``keys/vault.key`` (roles are enforced
  by keys, not by a flag). The person's NHS number is turned into their haven pseudonym with
  the haven key, exactly as the pipeline does (canonical form, HMAC-SHA256), and is never
  written anywhere: not to the report, the audit trail, or a log.
* **What is held**: the number of records in each haven collection, the number of entries
  in the identity vault (values stay encrypted), and the person's objections (type, dates,
  whether in force today).
* **Every release that held their record**: ``governance.release_members`` joined to the
  data release register (release, agreement, recipient, purposes, legal basis, level, date).
  Anonymised releases hold no record of anyone and are not listed per person.
* **Every access**: audit entries for the releases above, for reads of a haven collection
  holding their records made while their records were there (a read of a whole table is a
  read of each record in it), for re-identifications, and any entry naming their pseudonym.
* The request itself is audited (action ``subject_access``, object: the person's haven
  pseudonym, which the audit trail accepts as a hex token; never the NHS number).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import duckdb

from safehaven.context import Haven
from safehaven.core import audit
from safehaven.core import registers as reg
from safehaven.core.identifiers import canonical_nhs, is_valid_nhs
from safehaven.core.keys import VAULT, KeyRing
from safehaven.core.sql import q
from safehaven.core.store import table_exists
from safehaven.intake import landings
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import vault
from safehaven.protect.objections import EVENTS, episodes_sql, in_force_sql
from safehaven.protect.pseudonymise import pseudonym


class SubjectAccessDenied(PermissionError):
    """The caller does not hold the governance role's key, or the request is malformed."""


@dataclass
class SubjectAccessReport:
    generated_at: str
    records_held: dict[str, int] = field(default_factory=dict)
    first_received: dict[str, str] = field(default_factory=dict)
    vault_entries: int = 0
    objections: list[dict[str, Any]] = field(default_factory=list)
    releases: list[dict[str, Any]] = field(default_factory=list)
    accesses: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        lines = [f"Subject access report (generated {self.generated_at})", "", "What the haven holds:"]
        held = {c: n for c, n in self.records_held.items() if n}
        if not held and not self.vault_entries:
            lines.append("  no records")
        for c, n in sorted(held.items()):
            lines.append(f"  {c}: {n} record(s), first received {self.first_received.get(c, '?')}")
        lines.append(f"  identity vault: {self.vault_entries} encrypted identifier value(s)")
        lines += ["", "Objections:"]
        if not self.objections:
            lines.append("  none recorded")
        for o in self.objections:
            state = "in force" if o["in_force"] else "not in force"
            withdrawn = f", withdrawn {o['withdrawn_date']}" if o["withdrawn_date"] else ""
            lines.append(f"  {o['objection_type']}: recorded {o['recorded_date']}{withdrawn} ({state})")
        lines += ["", "Releases that included your record:"]
        if not self.releases:
            lines.append("  none")
        for r in self.releases:
            lines.append(
                f"  {r['released_at']}  {r['release_id']} to {r['recipient']} ({r['identifiability']}, "
                f"legal basis {r['legal_basis']}): {r['purposes']}"
            )
        lines += ["", "Accesses and uses recorded in the audit trail:"]
        if not self.accesses:
            lines.append("  none")
        for e in self.accesses:
            why = f" for {e['purpose']}" if e["purpose"] else ""
            under = f" under {e['agreement']}" if e["agreement"] else ""
            lines.append(
                f"  #{e['seq']} {e['at']}  {e['actor']} ({e['role']}) {e['action']} {e['object']}"
                f"{why}{under}: {e['outcome']}"
            )
        return "\n".join(lines)


def _check_request(keyring: KeyRing, nhs_number: str) -> None:
    """Refuse without the vault private key (governance lead only) or with an invalid NHS number."""
    try:
        vault.private_key(keyring)  # refuses a missing key here, an unsafe key file with KeyRingError
    except vault.VaultError:
        raise SubjectAccessDenied(
            f"subject access needs the governance lead's identity vault key ({keyring.path(VAULT)}); "
            "it is not on this host"
        ) from None
    if not is_valid_nhs(nhs_number):
        raise SubjectAccessDenied("that is not a valid NHS number (10 digits with a valid mod-11 check digit)")


def _check_members(con: duckdb.DuckDBPyConnection) -> None:
    """Refuse while a release's members in the store are not as the audit trail records them
    (``safehaven.share.review.members_not_on_record``): a member row deleted with the store key would
    have the report say the person was in no release that held them (found by review; CoP 12, 23d)."""
    from safehaven.share import review  # review imports the release machinery; only this check needs it

    found = review.members_not_on_record(con)
    if found:
        raise SubjectAccessDenied(
            f"release membership is not as the audit trail records it ({found[0]}): the report could miss a "
            "release that held the person; restore the store from a backup, then ask again"
        )


def _records_held(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry, pid: str, report: SubjectAccessReport
) -> dict[str, datetime | None]:
    """Records held per collection, when each was first received, and the person's vault entries.
    Returns, per collection, the time from which its accesses are listed (:func:`_received`)."""
    has_batches = table_exists(con, "governance", "batches")
    landed = "b.landed_at" if has_batches else "NULL::TIMESTAMPTZ"
    join = "LEFT JOIN governance.batches b ON b.batch_id = h._batch" if has_batches else ""
    windows: dict[str, datetime | None] = {}
    for contract in registry.content():
        c = contract.collection
        if not table_exists(con, "haven", c):
            continue
        n, first, batches = con.execute(
            f"SELECT count(*), min({landed}), list(DISTINCT h._batch) FROM haven.{q(c)} h {join} WHERE h.pid = ?",
            [pid],
        ).fetchone()
        report.records_held[c] = int(n)
        if n:
            shown, windows[c] = _received(con, c, batches or [], first)
            if shown is not None:
                report.first_received[c] = shown.isoformat(timespec="seconds")
    if table_exists(con, "vault", "identity"):
        row = con.execute("SELECT count(*) FROM vault.identity WHERE pid = ?", [pid]).fetchone()
        report.vault_entries = int(row[0]) if row else 0
    return windows


def _received(
    con: duckdb.DuckDBPyConnection, collection: str, batches: list[str], register_first: datetime | None
) -> tuple[datetime | None, datetime | None]:
    """When the person's records of ``collection`` were first received, and the time from which the
    collection's accesses are listed. The batch register's time is a store column whoever holds the
    store key can move forward, which would hide the accesses in between from the person (CoP 12,
    23d): the receipt the audit trail records (``safehaven.intake.landings``) counts, the earlier of
    the two is shown, and a batch with no receipt on record lists the collection's accesses from the
    start (none is hidden on the register's word)."""
    recorded = landings.received(con, collection)
    times = [recorded[b] for b in batches if b in recorded] + ([register_first] if register_first else [])
    first = min(times, default=None)
    return first, None if any(b not in recorded for b in batches) else first


def _objections(con: duckdb.DuckDBPyConnection, pid: str) -> list[dict[str, Any]]:
    """The person's objection episodes, and whether each is in force."""
    if not table_exists(con, *EVENTS.split(".")):
        return []
    rows = con.execute(
        f"SELECT objection_type, recorded_date, withdrawn_date, {in_force_sql()} FROM ({episodes_sql()}) "
        "WHERE pid = ? ORDER BY recorded_date, objection_type",
        [pid],
    ).fetchall()
    return [
        {"objection_type": t, "recorded_date": str(r), "withdrawn_date": str(w) if w else None, "in_force": bool(f)}
        for t, r, w, f in rows
    ]


def _releases(con: duckdb.DuckDBPyConnection, pid: str) -> list[dict[str, Any]]:
    """The releases the person's records were in (data release register)."""
    reg.ensure_tables(con)
    cur = con.execute(
        f"SELECT r.release_id, r.agreement_id, r.recipient, r.purposes, r.legal_basis, r.identifiability, "
        f"r.released_at FROM {reg.RELEASE_MEMBERS} m JOIN {reg.RELEASE_REGISTER} r USING (release_id) "
        "WHERE m.pid = ? ORDER BY r.released_at, r.release_id",
        [pid],
    )
    names = [d[0] for d in cur.description]
    return [
        {**dict(zip(names, row, strict=True)), "released_at": row[-1].isoformat(timespec="seconds")}
        for row in cur.fetchall()
    ]


def _access_entries(
    con: duckdb.DuckDBPyConnection, report: SubjectAccessReport, pid: str, windows: dict[str, datetime | None]
) -> dict[int, audit.Entry]:
    """Audit entries about the person: their releases, their collections since received, their pseudonym."""
    entries: dict[int, audit.Entry] = {}
    for r in report.releases:
        for e in audit.entries_for(con, object_like=f"release:{r['release_id']}"):
            entries[e.seq] = e
    for c, since in windows.items():
        for e in audit.entries_for(con, object_like=f"haven.{c}", since=since):
            entries[e.seq] = e
        for e in audit.entries_for(con, object_like=f"linkage:%haven.{c}%", since=since):
            if e.outcome == "ok":
                entries[e.seq] = e
    for e in audit.entries_for(con, object_like=f"%{pid}%"):
        entries[e.seq] = e
    return entries


def _accesses(
    con: duckdb.DuckDBPyConnection, report: SubjectAccessReport, pid: str, windows: dict[str, datetime | None]
) -> list[dict[str, Any]]:
    """The accesses to the person's records, oldest first; their pseudonym shown as ``<you>``."""
    return [
        {
            "seq": e.seq,
            "at": e.at.isoformat(timespec="seconds"),
            "actor": e.actor,
            "role": e.role,
            "action": e.action,
            "object": e.object.replace(pid, "<you>"),
            "purpose": e.purpose,
            "legal_basis": e.legal_basis,
            "agreement": e.agreement,
            "outcome": e.outcome,
        }
        for e in sorted(_access_entries(con, report, pid, windows).values(), key=lambda e: e.seq)
    ]


def subject_access(
    con: duckdb.DuckDBPyConnection,
    nhs_number: str,
    *,
    haven: Haven,
) -> SubjectAccessReport:
    """The report for one NHS number (any formatting), from the collections of ``haven.contracts``,
    with ``haven.keyring`` (the key custodian's), audited as ``haven.actor``. Raises
    :class:`SubjectAccessDenied`."""
    keyring, registry = haven.keyring, haven.contracts
    _check_request(keyring, nhs_number)
    _check_members(con)
    pid = pseudonym(keyring.get("haven").material, canonical_nhs(nhs_number))
    report = SubjectAccessReport(datetime.now(UTC).isoformat(timespec="seconds"))
    windows = _records_held(con, registry, pid, report)
    report.objections = _objections(con, pid)
    report.releases = _releases(con, pid)
    report.accesses = _accesses(con, report, pid, windows)
    audit.append(
        con,
        actor=haven.actor,
        role="governance",
        action="subject_access",
        object=pid,
        purpose="subject access request (CoP 12; Data Protection Act)",
        legal_basis="statutory",
        detail={
            "collections": len([c for c, n in report.records_held.items() if n]),
            "releases": len(report.releases),
            "accesses": len(report.accesses),
        },
    )
    return report
