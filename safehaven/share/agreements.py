"""Data-sharing agreements: the CoP 43 contents, machine-checked.

An agreement (``data_contracts/agreements/<id>.yaml``) is the only thing that lets data leave
the haven other than as a published anonymised output. It does not itself give a legal basis
(CoP 41) but names one, and the haven refuses to act on it unless its parts agree with each
other and with the collections' contracts.

What an agreement holds (CoP 43 a-i; CoP 41; Caldicott principles 1-4 and 6):

* ``legal_basis``: the basis for disclosure and use (CoP 21, 30-31, 40, 43a) and a reference
  to it (a CAG reference, a statute or direction, a consent form, a COPI notice).
* ``purposes`` (CoP 43b; Caldicott 1): what the data will be used for.
* ``identifiability``: the level released (confidentiality guide Rule 3): ``identifiable``,
  ``pseudonymised`` (record level, per-agreement pseudonyms, coarsened quasi-identifiers) or
  ``anonymised`` (aggregates under statistical disclosure control).
* ``collections`` and ``fields``: every field released, each with its justification
  (Caldicott 3, "the inclusion of each individual item of data should be considered and
  justified"); nothing else leaves.
* ``linkages`` (CoP 22, 42b, 43i): which collections may be joined by haven pseudonym, and why.
* ``onward_sharing`` (43c), ``retention`` (destruction when the purpose is achieved, 43d, and
  when the terms are broken, 43f), ``audit`` (43e), ``penalties`` (43g), ``publication``
  licence (43h; CoP 36: OGL or CC BY), ``start_date``/``end_date``.
* ``instrument``: a *contract* is required where the recipient is not a public body; an
  *agreement* may serve between public bodies (CoP 41).
* ``approval``: status (``draft``, ``approved``, ``suspended``, ``expired``), approver and date
  (Caldicott 1: scrutinised and documented by an appropriate guardian). The haven's decision
  lives in its store (``safehaven.share.approvals``): this block approves nothing by itself;
  the governance lead approves the agreement, or adopts this block, with a named, audited
  command (``safehaven agreements approve|adopt``). A block saying ``suspended`` withholds.
* Disclosure settings: ``k_anonymity`` (default 5) for record-level releases, what to do with
  groups smaller than k (``small_groups``: suppress locally, or refuse the release), the most
  people a release may drop that way (``max_suppressed_share``), and the ``coarsening`` allowed
  (date of birth to ``year`` or ``week``; postcode to ``district`` or ``none``, meaning the
  postcode is not released at all).
* ``routine_release`` (optional): ``one_reviewer`` or ``automatic``. Once a release under the
  agreement has been approved by two reviewers, later releases with the same fields and
  checks are released on one reviewer's approval, or automatically
  (``safehaven.share.review``). Ignored for identifiable releases, which always need two
  reviewers and the vault custodian.

Two layers of checking:

1. **Structure** (pydantic, ``extra="forbid"``): a file that does not parse as an agreement
   is an :class:`AgreementError` naming the file and the bad key.
2. **Consistency** (:func:`problems`): each rule below, checked against the contracts. An
   agreement with problems is refused: it cannot be approved and it releases nothing.

   * identifiable or pseudonymised data needs a basis that permits confidential data to leave
     (``consent``, ``statutory``, ``public_interest``, ``section_251``, ``copi_reg3``); an
     anonymised release must have basis ``anonymised`` (CoP 21, 40);
   * every basis other than ``anonymised`` names its reference;
   * a released field must exist in its collection's contract; a direct identifier may only
     be released at the identifiable level; a postcode only with ``postcode: district`` and
     an anonymised release only with date of birth to ``year``;
   * every field has a real justification (not empty, not ``TODO``);
   * linkages name two different collections of the agreement; several collections released
     under one pseudonym domain must be joined by named linkages (otherwise the recipient
     could link what the agreement did not approve: CoP 22, 42b);
   * a recipient that is not a public body needs a contract (CoP 41);
   * dates run forward; an approved agreement names its approver and date; a suspended one
     its reason; onward sharing, if permitted, states its terms.

An agreement is *in force* on a day when it is approved, valid, and the day lies between its
start and end dates; :func:`Agreement.in_force` gives the reason when it is not. An approved
agreement past its end date is treated as expired without anyone editing the file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from safehaven.core import yamlio
from safehaven.core.days import haven_today
from safehaven.core.legal_basis import CONFIDENTIAL_BASES, LegalBasis
from safehaven.intake.contracts import Contract, ContractRegistry, FieldSpec
from safehaven.protect.pseudonymise import haven_coarsening
from safehaven.publish.disclosure.policy import K_ANONYMITY, MIN_K_ANONYMITY

Level = Literal["identifiable", "pseudonymised", "anonymised"]
Status = Literal["draft", "approved", "suspended", "expired"]

ID_PATTERN = r"^[a-z][a-z0-9-]{1,62}[a-z0-9]$"
TODO = re.compile(r"\bTODO\b|\bTBC\b|\bFIXME\b", re.IGNORECASE)
MIN_JUSTIFICATION = 15


class AgreementError(ValueError):
    """An agreement file that cannot be read, or an agreement that cannot be acted on."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Recipient(_Strict):
    """Who receives the data, and whether it is a public body (CoP 41)."""

    name: str = Field(min_length=3)
    public_body: bool
    #: the role accountable at the recipient (a role, never a person's contact details).
    accountable_role: str | None = None


class LegalBasisSpec(_Strict):
    """The legal basis for disclosure and use (CoP 43a) and where it is recorded."""

    basis: LegalBasis
    reference: str | None = None


class ReleasedField(_Strict):
    """One field released, with why it is needed (Caldicott 3)."""

    collection: str
    field: str
    justification: str


class Linkage(_Strict):
    """A permitted join of two collections by haven pseudonym, and what it is for (CoP 43i)."""

    left: str
    right: str
    purpose: str = Field(min_length=3)

    def names(self, a: str, b: str) -> bool:
        """True when this linkage joins collections ``a`` and ``b`` (in either order)."""
        return {self.left, self.right} == {a, b}


class Coarsening(_Strict):
    """The finest quasi-identifiers the agreement allows (guide Rule 3 tier 2; ``docs/rules.md``)."""

    dob: Literal["year", "week"] = "year"
    postcode: Literal["district", "none"] = "none"


class OnwardSharing(_Strict):
    """Whether the recipient may pass the data on, and on what terms (CoP 43c)."""

    permitted: bool
    terms: str = Field(min_length=3)


class Publication(_Strict):
    """Licence of publications made from the data (CoP 36, 43h)."""

    licence: Literal["OGL-3.0", "CC-BY-4.0"]
    terms: str = Field(min_length=3)


class Retention(_Strict):
    """Destruction when the purpose is achieved (43d) and when the terms are broken (43f)."""

    days: int = Field(gt=0)
    destruction: str = Field(min_length=3)
    on_breach: str = Field(min_length=3)


class Approval(_Strict):
    """The approval block, rewritten by ``safehaven agreements approve|suspend``."""

    status: Status
    approver: str | None = None
    date: dt.date | None = None
    reason: str | None = None
    suspended_by: str | None = None
    suspended_on: dt.date | None = None


class Agreement(_Strict):
    """One data-sharing agreement or contract (CoP 41-43)."""

    id: str = Field(pattern=ID_PATTERN)
    version: str = Field(min_length=1)
    title: str = Field(min_length=3)
    instrument: Literal["contract", "agreement"]
    recipient: Recipient
    purposes: list[str] = Field(min_length=1)
    legal_basis: LegalBasisSpec
    identifiability: Level
    collections: list[str] = Field(min_length=1)
    fields: list[ReleasedField] = Field(min_length=1)
    linkages: list[Linkage] = []
    coarsening: Coarsening = Coarsening()
    k_anonymity: int = Field(default=K_ANONYMITY, ge=MIN_K_ANONYMITY)
    small_groups: Literal["suppress", "refuse"] = "suppress"
    max_suppressed_share: float = Field(default=0.05, ge=0.0, le=1.0)
    #: routine flow after a two-reviewer release of the same shape (``safehaven.share.review``)
    routine_release: Literal["one_reviewer", "automatic"] | None = None
    #: days the objection register may go unrefreshed before a record-level release refuses
    #: (default: the haven's window, ``safehaven.protect.feed.window_days``)
    objections_max_age_days: int | None = Field(default=None, gt=0)
    onward_sharing: OnwardSharing
    publication: Publication
    start_date: date
    end_date: date
    retention: Retention
    audit: str = Field(min_length=3)
    penalties: str = Field(min_length=3)
    approval: Approval

    @field_validator("collections")
    @classmethod
    def _unique_collections(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("collections are listed more than once")
        return value

    # -- derived facts -------------------------------------------------------------------

    @property
    def basis(self) -> str:
        return self.legal_basis.basis

    def fields_of(self, collection: str) -> list[ReleasedField]:
        return [f for f in self.fields if f.collection == collection]

    def names_linkage(self, a: str, b: str) -> Linkage | None:
        """The linkage joining ``a`` and ``b``, if the agreement names one."""
        return next((lk for lk in self.linkages if lk.names(a, b)), None)

    def status_on(self, day: date | None = None) -> Status:
        """The status in effect: an approved agreement past its end date is ``expired``."""
        day = day or haven_today()
        if self.approval.status == "approved" and day > self.end_date:
            return "expired"
        return self.approval.status

    def in_force(self, day: date | None = None) -> tuple[bool, str]:
        """Whether data may flow under this agreement on ``day``, and if not, why not."""
        day = day or haven_today()
        status = self.status_on(day)
        if status == "expired":
            return False, f"agreement {self.id} expired on {self.end_date.isoformat()}"
        if status == "suspended":
            why = f": {self.approval.reason}" if self.approval.reason else ""
            return False, f"agreement {self.id} is suspended{why}"
        if status == "draft":
            # the haven's reason (``safehaven.share.approvals.effective``) says how to clear it
            return False, self.approval.reason or f"agreement {self.id} is a draft and has not been approved"
        if day < self.start_date:
            return False, f"agreement {self.id} starts on {self.start_date.isoformat()}"
        return True, f"agreement {self.id} is approved and in force until {self.end_date.isoformat()}"

    def permits_identifiable_on(self, day: date | None = None) -> bool:
        """Identifiable data may flow: identifiable level, a basis that permits it, in force."""
        return self.identifiability == "identifiable" and self.basis in CONFIDENTIAL_BASES and self.in_force(day)[0]

    @property
    def permits_identifiable(self) -> bool:
        """``permits_identifiable_on(today)`` (the re-identification command checks this)."""
        return self.permits_identifiable_on()


# --- loading ----------------------------------------------------------------------------


def agreements_dir(root: Path) -> Path:
    """The agreements directory: ``root/agreements`` for a contracts root, else ``root`` itself.

    The root is always named by the caller (the context's contracts): no default, so a
    deployment's own contracts can never be passed over for the packaged ones (issue 13)."""
    base = Path(root)
    return base / "agreements" if (base / "agreements").is_dir() or base.name != "agreements" else base


def agreement_path(agreement_id: str, root: Path) -> Path:
    if not re.fullmatch(ID_PATTERN, agreement_id):
        raise AgreementError(f"{agreement_id!r} is not a valid agreement id (lower case, digits, hyphens)")
    return agreements_dir(root) / f"{agreement_id}.yaml"


def load_agreement_file(path: Path) -> Agreement:
    """Parse one file; errors name the file and each bad key."""
    return load_agreement_pinned(path)[0]


def load_agreement_pinned(path: Path) -> tuple[Agreement, str]:
    """Parse one file and give the SHA-256 of the very bytes parsed: an approval is pinned to the
    file's hash, so the terms acted on and the hash compared must come from one read (two reads
    let a file swapped in between be acted on under another's approval: found by review)."""
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AgreementError(f"agreement {path.name} cannot be read: {exc}") from None
    return parse_agreement(text.replace("\r\n", "\n"), path.name), hashlib.sha256(data).hexdigest()


def parse_agreement(text: str, name: str) -> Agreement:
    """Parse an agreement's YAML text (``name``: its file name, ``<id>.yaml``); errors name each bad key."""
    try:
        data = yamlio.safe_load(text)
    except yaml.YAMLError as exc:
        raise AgreementError(f"agreement {name} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise AgreementError(f"agreement {name} is not a mapping of CoP 43 contents")
    try:
        agreement = Agreement.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors())
        raise AgreementError(f"agreement {name} is not valid: {details}") from None
    if agreement.id != Path(name).stem:
        raise AgreementError(f"agreement {name}: id {agreement.id!r} does not match the file name")
    return agreement


def scan_agreements(root: Path) -> tuple[dict[str, Agreement], dict[str, str]]:
    """Every agreement file: the ones that parse, and an error message for each that does not."""
    found: dict[str, Agreement] = {}
    errors: dict[str, str] = {}
    directory = agreements_dir(root)
    for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
        try:
            found[path.stem] = load_agreement_file(path)
        except AgreementError as exc:
            errors[path.stem] = str(exc)
    return found, errors


def load_agreements(root: Path) -> dict[str, Agreement]:
    """All agreements under ``root`` (a contracts root or the agreements directory itself).

    Raises :class:`AgreementError` if any file does not parse: an unreadable agreement must be
    fixed, not silently ignored. Parsing is structural; see :func:`problems` for consistency.
    """
    found, errors = scan_agreements(root)
    if errors:
        raise AgreementError("; ".join(errors.values()))
    return found


def load_agreement(agreement_id: str, root: Path) -> Agreement:
    path = agreement_path(agreement_id, root)
    if not path.exists():
        raise AgreementError(f"no agreement {agreement_id!r} ({path})")
    return load_agreement_file(path)


# --- consistency ------------------------------------------------------------------------


def _todos(value: Any, where: str) -> Iterable[str]:
    if isinstance(value, str):
        if TODO.search(value):
            yield f"{where} is still marked TODO"
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _todos(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _todos(v, f"{where}[{i}]")


def linkage_problems(agreement: Agreement) -> list[str]:
    """Linkage rules (CoP 22, 42b, 43i): what would be joined without a named linkage."""
    found: list[str] = []
    cols = set(agreement.collections)
    for i, lk in enumerate(agreement.linkages):
        if lk.left == lk.right:
            found.append(f"linkages[{i}] joins {lk.left} to itself")
        for side in (lk.left, lk.right):
            if side not in cols:
                found.append(f"linkages[{i}] names {side}, which is not one of the agreement's collections")
    released = [c for c in agreement.collections if agreement.fields_of(c)]
    for c in unlinked_collections(agreement, released):
        found.append(
            f"{c} would be released under the same pseudonyms as {released[0]} but no linkage "
            f"names {released[0]} and {c} (directly or through other collections): "
            "releasing them together would let the recipient link them"
        )
    return found


def unlinked_collections(agreement: Agreement, collections: list[str]) -> list[str]:
    """Collections not reachable from the first through the agreement's linkages."""
    if len(collections) < 2:
        return []
    reached = {collections[0]}
    changed = True
    while changed:
        changed = False
        for lk in agreement.linkages:
            if lk.left == lk.right:
                continue
            if (lk.left in reached) != (lk.right in reached):
                reached |= {lk.left, lk.right}
                changed = True
    return [c for c in collections if c not in reached]


def basis_problems(agreement: Agreement) -> list[str]:
    """Legal-basis rules (CoP 21, 30-31, 40): confidential data leaves only under a basis that
    permits it, an anonymised release says so with basis ``anonymised``, and every other basis
    names its reference. A release refused for these is a ``no_legal_basis`` breach."""
    a = agreement
    level, basis = a.identifiability, a.basis
    found: list[str] = []
    if level in ("identifiable", "pseudonymised") and basis not in CONFIDENTIAL_BASES:
        found.append(
            f"{level} level with legal basis {basis!r}: confidential data may leave only under "
            f"one of {', '.join(sorted(CONFIDENTIAL_BASES))}"
        )
    if level == "anonymised" and basis != "anonymised":
        found.append(
            f"anonymised level with legal basis {basis!r}: an anonymised release carries no "
            "confidential data and must say so with basis 'anonymised' (an agreement that needs "
            f"{basis} is releasing more than anonymised data)"
        )
    if basis != "anonymised" and not (a.legal_basis.reference or "").strip():
        found.append(f"legal basis {basis} names no reference (CAG number, statute, consent form or notice)")
    return found


def _collection_problems(agreement: Agreement, contracts: dict[str, Contract]) -> list[str]:
    """Each collection of the agreement has a content contract."""
    found: list[str] = []
    for c in agreement.collections:
        if c not in contracts:
            found.append(f"collection {c!r} has no contract")
        elif contracts[c].kind != "content":
            found.append(f"collection {c!r} is not a content collection and cannot be released")
    return found


def _released_spec_problems(agreement: Agreement, where: str, spec: FieldSpec) -> list[str]:
    """A direct identifier only at the identifiable level; postcode and birth week only as coarsened."""
    a = agreement
    level = a.identifiability
    found: list[str] = []
    if spec.identifiability == "direct_identifier" and level != "identifiable":
        found.append(
            f"{where} is a direct identifier and cannot be released at the {level} level "
            "(the recipient's per-agreement pseudonym stands in for it)"
        )
    coarsening = haven_coarsening(spec)
    if coarsening == "district" and a.coarsening.postcode == "none":
        found.append(f"{where} is a postcode but the agreement's coarsening says postcode: none")
    if coarsening == "week" and level == "anonymised" and a.coarsening.dob != "year":
        found.append(f"{where}: an anonymised release allows date of birth only to the year")
    return found


def _released_field_problems(agreement: Agreement, f: ReleasedField, contracts: dict[str, Contract]) -> list[str]:
    """One released field: of the agreement's collections, in its contract, allowed at the level, justified."""
    where = f"field {f.collection}.{f.field}"
    if f.collection not in agreement.collections:
        return [f"{where}: {f.collection} is not one of the agreement's collections"]
    if f.collection not in contracts:
        return []
    contract = contracts[f.collection]
    if f.field not in contract.field_names:
        return [f"{where} is not in the {f.collection} contract (v{contract.version})"]
    found = _released_spec_problems(agreement, where, contract.field(f.field))
    if len(f.justification.strip()) < MIN_JUSTIFICATION:
        found.append(f"{where} has no real justification (Caldicott 3: each item must be justified)")
    return found


def field_problems(agreement: Agreement, registry: ContractRegistry) -> list[str]:
    """Collection and field rules (CoP 7-9; Caldicott 3), against the contracts.

    Each collection has a content contract and at least one released field; each field is in
    its contract, listed once, and justified; a direct identifier only at the identifiable
    level; a field the haven holds as a postcode district only with ``postcode: district``;
    one it holds as a birth week only to the year in an anonymised release
    (``safehaven.protect.pseudonymise.haven_coarsening`` says which fields those are).
    """
    a = agreement
    contracts = registry.contracts
    found = _collection_problems(a, contracts)
    seen: set[tuple[str, str]] = set()
    for f in a.fields:
        if (f.collection, f.field) in seen:
            found.append(f"field {f.collection}.{f.field} is listed more than once")
        seen.add((f.collection, f.field))
        found += _released_field_problems(a, f, contracts)
    found += [f"collection {c} is listed but no field of it is released" for c in a.collections if not a.fields_of(c)]
    return found


def term_problems(agreement: Agreement, *, today: date | None = None) -> list[str]:
    """Recipient, terms and approval rules (CoP 41, 43; Caldicott 1), and leftover TODOs.

    A recipient that is not a public body needs a contract; dates run forward; permitted
    onward sharing states its terms; an approved (or suspended, or expired) agreement names its
    approver and a date not in the future; a suspended one its reason; no TODO is left.
    """
    today = today or haven_today()
    a = agreement
    found: list[str] = []
    if not a.recipient.public_body and a.instrument != "contract":
        found.append("the recipient is not a public body, so a contract is required (CoP 41), not an agreement")
    if a.end_date < a.start_date:
        found.append(f"end_date {a.end_date} is before start_date {a.start_date}")
    if a.onward_sharing.permitted and len(a.onward_sharing.terms.strip()) < MIN_JUSTIFICATION:
        found.append("onward sharing is permitted but its terms are not stated")
    ap = a.approval
    if ap.status in ("approved", "suspended", "expired"):
        if not (ap.approver or "").strip():
            found.append(f"status {ap.status} but no approver is named")
        if ap.date is None:
            found.append(f"status {ap.status} but no approval date is given")
        elif ap.date > today:
            found.append(f"approval date {ap.date} is in the future")
    if ap.status == "suspended" and not (ap.reason or "").strip():
        found.append("status suspended but no reason is given")
    found += list(_todos(a.model_dump(mode="json"), ""))
    return found


def problems(agreement: Agreement, registry: ContractRegistry, *, today: date | None = None) -> list[str]:
    """Everything missing or contradictory in an agreement; empty means it may be acted on.

    The groups, in order: :func:`basis_problems`, :func:`field_problems`,
    :func:`linkage_problems`, :func:`term_problems`.
    """
    return (
        basis_problems(agreement)
        + field_problems(agreement, registry)
        + linkage_problems(agreement)
        + term_problems(agreement, today=today)
    )


# --- approval (the governance lead's commands) ------------------------------------------


def _approval_yaml(approval: Approval) -> str:
    lines = ["approval:", f"  status: {approval.status}"]
    for name in ("approver", "date", "reason", "suspended_by", "suspended_on"):
        value = getattr(approval, name)
        if value is None:
            continue
        text = value.isoformat() if isinstance(value, date) else json.dumps(str(value), ensure_ascii=False)
        lines.append(f"  {name}: {text}")
    return "\n".join(lines) + "\n"


def write_approval(path: Path, approval: Approval) -> Agreement:
    """Rewrite only the ``approval:`` block of an agreement file (comments elsewhere are kept).

    The block is the top-level ``approval:`` line and the indented lines after it; it is added
    at the end when missing. Written atomically; the result is parsed again and returned.
    """
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"^approval:\s*(#.*)?$", line.rstrip("\n"))), None)
    block = _approval_yaml(approval)
    if start is None:
        new = text + ("" if text.endswith("\n") else "\n") + block
    else:
        end = start + 1
        while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
            end += 1
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1
        new = "".join(lines[:start]) + block + "".join(lines[end:])
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    try:
        agreement = Agreement.model_validate(yamlio.safe_load(new))
        if agreement.approval != approval:
            raise AgreementError(f"rewriting the approval block of {path.name} did not give the approval asked for")
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return agreement


def approve(
    agreement_id: str,
    approver: str,
    *,
    root: Path,
    registry: ContractRegistry,
    today: date | None = None,
) -> Agreement:
    """Approve (or re-approve after a suspension) an agreement that has no problems.

    Refused when the agreement does not validate as approved, or has passed its end date.
    """
    today = today or haven_today()
    if len(approver.strip()) < 3:
        raise AgreementError('name the approver and their role, e.g. "Name, Caldicott Guardian"')
    path = agreement_path(agreement_id, root)
    current = load_agreement(agreement_id, root)
    if current.end_date < today:
        raise AgreementError(f"agreement {agreement_id} ended on {current.end_date}; it cannot be approved")
    approval = Approval(status="approved", approver=approver.strip(), date=today)
    found = problems(current.model_copy(update={"approval": approval}), registry, today=today)
    if found:
        raise AgreementError(f"agreement {agreement_id} cannot be approved: " + "; ".join(found))
    return write_approval(path, approval)


def suspend(agreement_id: str, reason: str, by: str, *, root: Path, today: date | None = None) -> Agreement:
    """Suspend an approved agreement: nothing is released under it until it is re-approved."""
    today = today or haven_today()
    if len(reason.strip()) < 5:
        raise AgreementError("give the reason for the suspension")
    path = agreement_path(agreement_id, root)
    current = load_agreement(agreement_id, root)
    if current.approval.status != "approved":
        raise AgreementError(
            f"agreement {agreement_id} is {current.approval.status}, not approved; "
            "only an approved agreement can be suspended"
        )
    approval = current.approval.model_copy(
        update={
            "status": "suspended",
            "reason": reason.strip(),
            "suspended_by": by.strip(),
            "suspended_on": today,
        }
    )
    return write_approval(path, approval)


def draft_yaml(
    agreement_id: str,
    *,
    title: str,
    recipient: str,
    public_body: bool,
    basis: str,
    level: str,
    fields: list[tuple[str, str]],
    links: list[tuple[str, str]],
    start: date,
    end: date,
) -> str:
    """A draft agreement: every CoP 43 heading present, TODO where a person must write.

    It parses, and :func:`problems` lists each TODO until it is replaced, so it cannot be
    approved half-written.
    """
    collections = list(dict.fromkeys(c for c, _ in fields))
    q = json.dumps
    out = [
        f"# Draft data-sharing {'agreement' if public_body else 'contract'} (CoP 41-43). Replace every TODO,",
        f"# then: safehaven agreements validate {agreement_id}",
        f"id: {agreement_id}",
        "version: 0.1.0",
        f"title: {q(title)}",
        f"instrument: {'agreement' if public_body else 'contract'}",
        "recipient:",
        f"  name: {q(recipient)}",
        f"  public_body: {'true' if public_body else 'false'}",
        "  accountable_role: TODO the role accountable for the data at the recipient",
        "purposes:",
        "  - TODO the specific purpose(s) the data may be used for (Caldicott 1)",
        "legal_basis:",
        f"  basis: {basis}",
        "  reference: " + ("null" if basis == "anonymised" else "TODO CAG number, statute, consent form or notice"),
        f"identifiability: {level}",
        f"collections: [{', '.join(collections)}]",
        "fields:",
    ]
    for collection, name in fields:
        out += [
            f"  - collection: {collection}",
            f"    field: {name}",
            "    justification: TODO why this field is needed for the purpose (Caldicott 3)",
        ]
    out.append("linkages:" + ("" if links else " []"))
    for left, right in links:
        out += [f"  - left: {left}", f"    right: {right}", "    purpose: TODO why these collections must be linked"]
    out += [
        "coarsening:",
        "  dob: year",
        "  postcode: none",
        f"k_anonymity: {K_ANONYMITY}",
        "small_groups: suppress",
        "max_suppressed_share: 0.05",
        "onward_sharing:",
        "  permitted: false",
        "  terms: No onward sharing.",
        "publication:",
        "  licence: OGL-3.0",
        "  terms: TODO what may be published, and how",
        f"start_date: {start.isoformat()}",
        f"end_date: {end.isoformat()}",
        "retention:",
        "  days: 365",
        "  destruction: TODO how the data is destroyed once the purpose is achieved (CoP 43d)",
        "  on_breach: TODO how the data is destroyed if the terms are broken (CoP 43f)",
        "audit: TODO how adherence is audited (CoP 43e)",
        "penalties: TODO the penalties if the terms are broken (CoP 43g)",
        "approval:",
        "  status: draft",
    ]
    return "\n".join(out) + "\n"
