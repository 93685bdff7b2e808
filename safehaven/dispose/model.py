"""What a disposal is about and what it produced: targets, due items, plans, results (CoP 43d, 43f, 48-50).

Rules: ``safehaven.dispose`` package docstring. Plans and results carry counts, ids, file names
and hashes, never a value.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

from safehaven.core import registers as reg
from safehaven.core import schema
from safehaven.core.keys import KeyRingError, check_agreement_id

JOURNAL = "disposal.json"
REGISTER = schema.DISPOSAL_REGISTER
PROGRESS = schema.DISPOSAL_PROGRESS
EXPORT_STEM = "disposal_register"
STEPS = ("keys", "rows", "files", "rebuild", "record")
#: the audit action of a disposal, and the outcomes of its start and of its certificate
ACTION, STARTED, FINISHED = "dispose", "started", "ok"
#: the field of a disposal's ``started`` entry listing the ids of the keys it destroys
DESTROYS = "keys_destroyed"
#: the outcome of an attempt refused part way (``safehaven.dispose.run._audit_refusal``)
REFUSED = "refused"
PURPOSE = "disposal at the end of retention or of the agreement (CoP 43d, 43f, 48-50)"
RELEASE_REGISTER = reg.RELEASE_REGISTER
_RELEASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

RETAINED = (
    "kept by design: published anonymised aggregates (not confidential); the data release register, "
    "release_members, opt-out decisions and notices log, breach register and audit trail (governance records "
    "keyed by haven pseudonyms or holding counts); validation results and quality measures (counts); batch "
    "tombstones (file name, SHA-256, row count)"
)
METHOD = (
    "logical: keys destroyed (overwritten, synced, unlinked) and rows deleted in one transaction; physical: "
    "plain files overwritten with random bytes, synced and unlinked; store rebuilt into a fresh file under a "
    "fresh key and swapped in atomically; the old store key overwritten and unlinked"
)


class DisposalError(Exception):
    """A disposal that cannot be done as asked; nothing was changed unless the message says so."""


class DisposalPending(DisposalError):
    """Another disposal was interrupted and must be completed first (``safehaven dispose --resume``)."""


# --- what to dispose of ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a disposal is about: one agreement (optionally some of its releases), or a collection's
    records received before a day."""

    kind: str  # "agreement" or "collection"
    agreement: str | None = None
    releases: tuple[str, ...] = ()
    collection: str | None = None
    before: date | None = None

    @classmethod
    def for_agreement(cls, agreement_id: str, releases: tuple[str, ...] | list[str] = ()) -> Target:
        try:
            check_agreement_id(agreement_id)
        except KeyRingError as exc:
            raise DisposalError(str(exc)) from None
        for rid in releases:
            if not _RELEASE_ID.fullmatch(rid):
                raise DisposalError(f"{rid!r} is not a release id")
        return cls("agreement", agreement=agreement_id, releases=tuple(sorted(set(releases))))

    @classmethod
    def for_collection(cls, collection: str, before: date | str) -> Target:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", collection or ""):
            raise DisposalError(f"{collection!r} is not a collection name")
        day = date.fromisoformat(before) if isinstance(before, str) else before
        return cls("collection", collection=collection, before=day)

    def describe(self) -> str:
        if self.kind == "collection":
            return f"collection {self.collection}: records received before {self.before}"
        if self.releases:
            return f"agreement {self.agreement}: release(s) {', '.join(self.releases)}"
        return f"agreement {self.agreement}: all its data"

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "agreement": self.agreement,
            "releases": list(self.releases),
            "collection": self.collection,
            "before": self.before.isoformat() if self.before else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Target:
        if data["kind"] == "collection":
            return cls.for_collection(data["collection"], data["before"])
        return cls.for_agreement(data["agreement"], data.get("releases") or ())


@dataclass
class DueItem:
    """Something whose retention or agreement has ended. ``action`` is ``dispose`` (the daily job
    does it), ``review`` (a person decides: a suspension not for a breach, an orphaned key) or
    ``resume`` (an interrupted disposal)."""

    action: str
    reason: str
    target: Target | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason": self.reason,
            "target": self.target.as_dict() if self.target else None,
            "detail": self.detail,
        }


@dataclass
class Plan:
    """Everything one disposal will touch, fixed before anything is changed (journalled; no values)."""

    disposal_id: str
    target: Target
    reason: str
    requested_by: str
    authorised_by: str | None
    planned_at: str
    batches: list[dict[str, Any]] = field(default_factory=list)
    release_ids: list[str] = field(default_factory=list)
    release_tables: list[str] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    keys: list[dict[str, Any]] = field(default_factory=list)
    vault_values_needing_key: int = 0
    #: release requests still staged that the disposal withdraws (their staged files are in ``files``)
    staged_requests: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.batches or self.release_tables or self.files or self.dirs or self.keys or self.staged_requests)

    @property
    def batch_ids(self) -> list[str]:
        return [b["batch_id"] for b in self.batches]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = self.target.as_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        data = dict(data)
        data["target"] = Target.from_dict(data["target"])
        return cls(**data)

    def summary(self) -> dict[str, Any]:
        """Counts and ids for a dry run (no values)."""
        return {
            "target": self.target.describe(),
            "reason": self.reason,
            "batches": len(self.batches),
            "rows_in_batches": sum(int(b.get("rows") or 0) for b in self.batches),
            "releases": self.release_ids,
            "release_tables": self.release_tables,
            "staged_requests": self.staged_requests,
            "files": len(self.files),
            "bytes": sum(int(f["bytes"]) for f in self.files),
            "keys": [{k: v for k, v in key.items() if k != "path"} for key in self.keys],
            "vault_values_needing_the_vault_key": self.vault_values_needing_key,
        }


@dataclass
class DisposalResult:
    """The outcome of :func:`dispose` / :func:`resume`: the certificate, or why there was nothing to do."""

    status: str  # "disposed" or "nothing_to_dispose"
    target: Target
    reason: str
    disposal_id: str | None = None
    certificate: dict[str, Any] | None = None
    resumed: bool = False

    def as_metadata(self) -> dict[str, Any]:
        """Counts and ids for Dagster metadata and CLI output (never values)."""
        meta: dict[str, Any] = {"target": self.target.describe(), "status": self.status, "reason": self.reason}
        if self.certificate:
            c = self.certificate
            meta.update(
                disposal_id=self.disposal_id,
                resumed=self.resumed,
                batches=len(c["batches"]),
                rows_disposed=c["rows_disposed"],
                files_destroyed=c["files_destroyed"],
                staged_requests_withdrawn=len(c.get("staged_requests_withdrawn", [])),
                bytes_destroyed=c["bytes_destroyed"],
                keys_destroyed=len(c["keys_destroyed"]),
                key_ids_destroyed=", ".join(k["key_id"] for k in c["keys_destroyed"]),
                store_key_old=c["store_key_old"],
                store_key_new=c["store_key_new"],
            )
        return meta


@dataclass
class SweepReport:
    """What one daily run did: results of the disposals made, and the items left for a person."""

    results: list[DisposalResult] = field(default_factory=list)
    review: list[DueItem] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
