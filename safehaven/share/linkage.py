"""Approved-only linkage: collections are joined by haven pseudonym only under an agreement.

Rule (CoP 22: organisations holding confidential information for different purposes take
steps to avoid linkage unless there is consent, a statutory basis, a public interest or
another basis in law; CoP 42b; CoP 43i "permitted arrangements for linkage"; Government
response rec. 10): before any code joins two collections it asks :func:`authorise_linkage`.
The join is allowed only when an agreement that is

* approved and in date on the day (not a draft, not suspended, not past its end date), and
* consistent (``safehaven.share.agreements.problems`` finds nothing wrong with it),

names that pair of collections in its ``linkages`` (in either order). Otherwise the linkage is
refused: :class:`LinkageRefused` is raised with the reason, the attempt goes to the breach
register (kind ``refused_linkage``, severity 0 "near miss": the control stopped it) and to the
audit trail (outcome ``refused``). An authorised linkage is audited too (outcome ``ok``, with
the agreement and its legal basis), so every join of two collections can be accounted for.

Call it outside an open transaction (the audit trail commits its own).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date

import duckdb

from safehaven.core import audit
from safehaven.core.days import haven_today
from safehaven.core.registers import current_actor, record_breach
from safehaven.intake.contracts import ContractRegistry
from safehaven.share.agreements import Agreement, problems


class LinkageRefused(PermissionError):
    """A join of two collections that no approved, in-date agreement names."""

    def __init__(self, message: str, breach_id: int | None = None) -> None:
        super().__init__(message)
        self.breach_id = breach_id


def _candidates(agreements: Mapping[str, Agreement] | Iterable[Agreement] | Agreement) -> list[Agreement]:
    if isinstance(agreements, Agreement):
        return [agreements]
    if isinstance(agreements, Mapping):
        return list(agreements.values())
    return list(agreements)


def find_authority(
    agreements: Mapping[str, Agreement] | Iterable[Agreement] | Agreement,
    left: str,
    right: str,
    *,
    today: date | None = None,
    registry: ContractRegistry,
    identifiability: str | None = None,
) -> tuple[Agreement | None, str]:
    """The first agreement (by id) authorising the join, or None and why none does. No side effects."""
    today = today or haven_today()
    if left == right:
        return None, f"a linkage needs two different collections, not {left} with itself"
    reasons: list[str] = []
    naming = sorted(
        (
            a
            for a in _candidates(agreements)
            if a.names_linkage(left, right) and identifiability in (None, a.identifiability)
        ),
        key=lambda a: a.id,
    )
    for agreement in naming:
        ok, why = agreement.in_force(today)
        if not ok:
            reasons.append(why)
            continue
        found = problems(agreement, registry, today=today)
        if found:
            reasons.append(f"agreement {agreement.id} does not validate ({'; '.join(found[:3])})")
            continue
        return agreement, f"linkage of {left} and {right} named by agreement {agreement.id}"
    if not naming:
        level = f" at the {identifiability} level" if identifiability else ""
        return None, f"no agreement{level} names a linkage of {left} and {right}"
    return None, f"no approved, in-date agreement names a linkage of {left} and {right}: " + "; ".join(reasons)


def authorise_linkage(
    con: duckdb.DuckDBPyConnection,
    agreements: Mapping[str, Agreement] | Iterable[Agreement] | Agreement,
    left: str,
    right: str,
    purpose: str,
    *,
    today: date | None = None,
    registry: ContractRegistry,
    actor: str | None = None,
    role: str = "pipeline",
    identifiability: str | None = None,
) -> Agreement:
    """Authorise joining ``left`` and ``right`` for ``purpose``, or refuse and record it.

    ``agreements`` are the candidates (a mapping of id to agreement, a list, or one agreement:
    pass only the agreement the caller acts under when it must be that one; ``identifiability``
    restricts the candidates to one level, e.g. ``"anonymised"`` for a published statistic, so
    a record-level agreement naming the same linkage cannot authorise it). Returns the
    authorising agreement. Raises :class:`LinkageRefused` after writing a breach register
    entry and an audit entry. ``purpose`` is recorded in both; it must hold no identifier.
    """
    agreement, reason = find_authority(
        agreements, left, right, today=today, registry=registry, identifiability=identifiability
    )
    who = actor or current_actor()
    obj = f"linkage:haven.{left}+haven.{right}"
    if agreement is None:
        breach_id = record_breach(
            con,
            kind="refused_linkage",
            severity=0,
            what=f"linkage of {left} and {right} for '{purpose}' was refused: {reason}",
            remedial_action="the join was not run and nothing was released; the requester must obtain an "
            "approved data-sharing agreement naming this linkage (CoP 22, 42b, 43i) before trying again",
            detail={"left": left, "right": right, "purpose": purpose, "actor": who},
        )
        audit.append(
            con,
            actor=who,
            role=role,
            action="link",
            object=obj,
            purpose=purpose,
            outcome="refused",
            detail={"reason": reason, "breach_id": breach_id},
        )
        raise LinkageRefused(f"linkage refused (breach {breach_id}): {reason}", breach_id)
    audit.append(
        con,
        actor=who,
        role=role,
        action="link",
        object=obj,
        purpose=purpose,
        legal_basis=agreement.basis,
        agreement=agreement.id,
        outcome="ok",
        detail={"agreement_version": agreement.version, "reason": reason},
    )
    return agreement
