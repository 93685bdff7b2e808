"""Re-identification: a recipient's pseudonyms back to identifiers, only under a lawful agreement.

Rules (``docs/rules.md`` "Identifiability levels": identifiable data "leaves only with a legal basis";
CoP 13, 14; Caldicott principles 2-4; CoP 12 and Govt response rec. 1 on audit):

* Only through the CLI (``safehaven reidentify``), only by whoever holds the vault's
  private key (the governance lead; ``safehaven.protect.vault``), and only for an agreement that
  permits identifiable data today (``Agreement.permits_identifiable``: identifiable level,
  a confidential legal basis, approved and in date), its approval taken from the store's
  decision (``safehaven.share.approvals``), never from the file's ``approval:`` block. Anything else is
  refused, audited, and recorded in the breach register as a near miss (processing without a legal basis).
* Only pseudonyms the haven released to that agreement's recipient
  (``governance.release_members``) are resolved: a recipient cannot re-identify someone it
  was never sent. Pseudonyms are matched in DuckDB by recomputing the agreement-domain
  pseudonym of each released person (``HMAC(agreement key, pid)``), never by reversing one.
* The national data opt-out applies to re-identification as to any identifiable flow
  (``safehaven.protect.optouts.decide``): under a basis it covers, objectors are withheld and counted.
* Only the identifiers the agreement itself releases (its listed fields that the vault holds)
  are revealed: minimum necessary (Caldicott 3).
* Audited: one entry for the request (counts only) and one per re-identified person (object:
  the haven pid, as ``safehaven.share.subject_access`` expects) so a subject access report lists
  it. No value is ever audited.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from safehaven.context import Haven
from safehaven.core import audit
from safehaven.protect import feed, optouts, vault
from safehaven.protect.objections import objectors_sql
from safehaven.protect.pseudonymise import PSEUDONYM_HEX, hmac_sql, install_agreement_key
from safehaven.share.agreements import Agreement, problems

_PSEUDONYM = re.compile(rf"[0-9a-f]{{{PSEUDONYM_HEX}}}")


class ReidentificationRefused(PermissionError):
    """The request was refused; the message says why (no values)."""


@dataclass
class ReidentifyResult:
    agreement_id: str
    requested: int
    fields: list[str]
    identified: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    malformed: int = 0
    not_released: int = 0
    withheld_objection: int = 0
    opt_out_reason: str = ""


def _refuse(haven: Haven, agreement_id: str, reason: str, detail: dict[str, object]) -> None:
    from safehaven.core import registers

    with haven.store().connect() as con:
        registers.record_breach(
            con,
            kind="no_legal_basis",
            severity=0,
            what=f"re-identification under agreement {agreement_id} refused: {reason}",
            remedial_action="refused before any identifier was decrypted",
            detail={"agreement": agreement_id, **detail},
        )
        audit.append(
            con,
            actor=haven.actor,
            role="governance",
            action="reidentify",
            object=f"agreement:{agreement_id}",
            agreement=agreement_id,
            outcome="refused",
            detail={"reason": reason, **detail},
            home=haven.home,
        )
    raise ReidentificationRefused(reason)


def _require_feed(haven: Haven, agreement_id: str, agreement_days: int | None, counts: dict[str, int]) -> None:
    """Refuse (audited) while the objection feed is blocked or stale: an objection it has not
    delivered could not be honoured (``safehaven.protect.feed``; NDOP, CoP 14b)."""
    try:
        with haven.store().connect() as con:
            feed.require_sound_feed(con, haven.home, haven.today, agreement_days, collections=haven.contracts.contracts)
    except feed.ObjectionFeedBlocked as exc:
        _refuse(haven, agreement_id, f"objections cannot be honoured now: {exc}", counts)


def _refuse_unless_sound(haven: Haven, agreement: Agreement, counts: dict[str, int]) -> None:
    """Refuse under an agreement with problems (``agreements.problems``: e.g. a consent basis naming
    no reference, a field its contracts no longer hold), as releases and linkage do; an approval
    decided before the problems arose does not cure them (found by review; Caldicott 1, CoP 41-43)."""
    found = problems(agreement, haven.contracts, today=haven.today)
    if found:
        _refuse(haven, agreement.id, f"agreement {agreement.id} cannot be acted on: {found[0]}", counts)


def _refuse_unless_members_on_record(haven: Haven, agreement_id: str, counts: dict[str, int]) -> None:
    """Refuse while a release's members in the store are not as the audit trail records them
    (``safehaven.share.review.members_not_on_record``): a row added with the store key would let the
    custodian re-identify someone never released (found by review; CoP 23d)."""
    from safehaven.share import review  # review imports the release machinery; only this needs it

    with haven.store().connect(read_only=True) as con:
        found = review.members_not_on_record(con, agreement_id)
    if found:
        reason = (
            f"release membership is not as the audit trail records it ({found[0]}); restore the store from a backup"
        )
        _refuse(haven, agreement_id, reason, counts)


def reidentify(
    haven: Haven,
    agreement_id: str,
    pseudonyms: list[str],
    *,
    agreements_root: Path | None = None,
) -> ReidentifyResult:
    """Resolve a recipient's pseudonyms to the identifiers its agreement releases (module docstring).

    ``haven.keyring`` must carry the key custodian (``safehaven.protect.vault.private_key``); the
    agreements are read under ``agreements_root``, else the context's contracts root; ``haven.actor``
    is audited.
    """
    import pyarrow as pa  # here: only re-identification needs it, not loading the code location (issue 22)

    from safehaven.share import approvals
    from safehaven.share.agreements import AgreementError

    home, actor, registry, keyring = haven.home, haven.actor, haven.contracts, haven.keyring
    asked = sorted({p.strip().lower() for p in pseudonyms if p.strip()})
    well_formed = [p for p in asked if _PSEUDONYM.fullmatch(p)]
    counts = {"requested": len(asked), "malformed": len(asked) - len(well_formed)}
    try:
        with haven.store().connect() as con:
            standing = approvals.load_standing(con, agreement_id, agreements_root or registry.root)
    except AgreementError as exc:
        _refuse(haven, agreement_id, f"no valid agreement: {exc}", counts)
        raise  # pragma: no cover - _refuse raises
    agreement = approvals.effective(standing)  # the store's decision, never the file's block
    _refuse_unless_sound(haven, agreement, counts)
    if not agreement.permits_identifiable_on(haven.today):
        ok, why = standing.in_force(haven.today)
        reason = (
            why
            if not ok
            else (
                f"agreement {agreement_id} releases {agreement.identifiability} data under {agreement.basis}, "
                "not identifiable data"
            )
        )
        _refuse(haven, agreement_id, reason, counts)
    contracts = {c: registry.contracts[c] for c in agreement.collections if c in registry.contracts}
    wanted = sorted(
        {
            f.field
            for f in agreement.fields
            if f.collection in contracts and f.field in vault.vault_fields(contracts[f.collection])
        }
    )
    if not wanted:
        _refuse(haven, agreement_id, "the agreement releases no identifier held in the vault", counts)
    private = vault.private_key(keyring)
    decision = optouts.decide(agreement.basis, "identifiable")
    if decision.applied:  # objections are honoured only from a complete, fresh feed (fail closed)
        _require_feed(haven, agreement_id, agreement.objections_max_age_days, counts)
    _refuse_unless_members_on_record(haven, agreement_id, counts)
    gp = any(c.practice_field for c in contracts.values())
    result = ReidentifyResult(
        agreement_id, len(asked), wanted, malformed=counts["malformed"], opt_out_reason=decision.reason
    )
    with haven.store().connect() as con:
        optouts.ensure_tables(con)
        name = install_agreement_key(con, keyring, agreement_id, create=False)
        con.register("_reid_asked_rows", pa.table({"pseudonym": pa.array(well_formed, pa.string())}))
        con.execute("CREATE OR REPLACE TEMP TABLE _reid_asked AS SELECT pseudonym FROM _reid_asked_rows")
        con.unregister("_reid_asked_rows")
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _reid_match AS SELECT m.pid, {hmac_sql('m.pid', name)} AS pseudonym "
            f"FROM (SELECT DISTINCT pid FROM {optouts.MEMBERS} WHERE agreement_id = ?) m",
            [agreement_id],
        )
        con.execute("DELETE FROM _reid_match WHERE pseudonym NOT IN (SELECT pseudonym FROM _reid_asked)")
        matched = con.execute("SELECT count(*) FROM _reid_match").fetchone()[0]
        result.not_released = len(well_formed) - matched
        if decision.applied:
            objectors = objectors_sql(None, optouts.objector_types(gp))  # the haven's (UK) day
            result.withheld_objection = con.execute(
                f"SELECT count(*) FROM _reid_match WHERE pid IN ({objectors})"
            ).fetchone()[0]
            con.execute(f"DELETE FROM _reid_match WHERE pid IN ({objectors})")
        by_pid = dict(con.execute("SELECT pid, pseudonym FROM _reid_match").fetchall())
        revealed = vault.reveal(con, private, "SELECT pid FROM _reid_match", tuple(wanted))
        result.identified = {by_pid[pid]: values for pid, values in revealed.items()}
        con.execute("DROP TABLE _reid_match")
        con.execute("DROP TABLE _reid_asked")
        summary = {
            **counts,
            "identified": len(result.identified),
            "not_released": result.not_released,
            "withheld_objection": result.withheld_objection,
            "fields": wanted,
            "opt_out_applied": decision.applied,
        }
        entries = [
            dict(
                actor=actor,
                role="governance",
                action="reidentify",
                object=f"agreement:{agreement_id}",
                purpose=agreement.purposes[0],
                legal_basis=agreement.basis,
                agreement=agreement_id,
                detail=summary,
            )
        ]
        entries += [
            dict(
                actor=actor,
                role="governance",
                action="reidentify",
                object=pid,
                purpose=agreement.purposes[0],
                legal_basis=agreement.basis,
                agreement=agreement_id,
                detail={"fields": sorted(revealed[pid])},
            )
            for pid in sorted(revealed)
        ]
        audit.append_many(con, entries, home=home)
    return result
