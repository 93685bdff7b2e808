"""Release requests: nothing leaves the haven that two people have not checked.

Rule (SATRE 3.3.04-3.3.05: assigned responsibility for output checking is mandatory; Five
Safes "safe outputs"; CoP 32-33, 43; the OpenSAFELY Airlock is the anchor):

* The nightly run *prepares* a release (``safehaven.share.releases.prepare``): its files,
  manifest and checker summary go to a staging area inside the haven home but outside
  ``releases/`` (``staging/releases/<release-id>/``, 0700 directories, 0600 files), and a
  request named by the release id it would create is opened. Nothing reaches
  ``releases/<agreement>/`` until the request is approved.
* **Two independent reviewers**: neither the person who operated the run (the actor recorded
  when the request was prepared) nor each other, names compared in one canonical form
  (:func:`person_key`). Each approves from their own OS login: not the login that prepared the
  request (at a terminal, from the UI or on the schedule: the service account approves nothing),
  nor the login of another person's approval (:func:`_own_login`; counted so at delivery). The
  login is the process's account (``registers.os_login``: its real uid's), never ``$LOGNAME``. Each
  records a decision per file, pinned to the file's SHA-256 at that moment; a request is
  approved only when the rule's number of reviewers have each approved every file.
* **What is released is what was reviewed**: at delivery every staged file is hashed again
  and must equal the hash pinned when it was prepared and when each reviewer approved it;
  anything else is refused (a near-miss breach, audited) and keeps being refused until a
  person withdraws the request and a new one is prepared, even once the files match again
  (:func:`_not_refused_before`). Staged files are hashed as plain files only, never through a
  link (``core.files.sha256_plain``).
* **Under the agreement in force, on the terms reviewed**: a request is delivered only while its
  agreement is in force on the day of delivery and its file is the one the request was
  prepared under (:func:`_agreement_in_force`), and the latest file of it the haven has on record
  (:func:`_other_file_on_record`); and while no collection of it is held
  (:func:`_collections_not_held`).
* **Rules** (:data:`RULES`): ``two_reviewers`` by default; an agreement may declare
  ``routine_release: one_reviewer | automatic`` for releases whose fields and checks (the
  *shape*) equal those of an earlier release approved by two reviewers; identifiable releases
  always need two reviewers and the vault custodian (delivery needs the vault key).
* **Every transition is audited** (``object = release-request:<id>``): who, when, from, to, why.
  **Delivery reads the review from the audit trail** (:func:`_unaudited_approval`): the store's
  tables can be edited by anyone holding the store key, so a request leaves only when the
  verified trail shows it prepared with the stored files, approved as its latest state, and
  approved file by file by the people its (stricter) rule needs.
* **Blinded review** (SATRE 3.3.05: output checks by two independent checkers; the OpenSAFELY
  Airlock's independent review, where checkers do not see each other's decisions until both
  have reviewed): while a request awaits a reviewer's decision (:data:`AWAITING_REVIEW`), what
  the reviewers are shown (:func:`reviews_view`, used by ``safehaven review list|show``) says
  only how many of the reviews its rule needs are in: not who has reviewed, nor any per-file
  decision or comment (a reviewer's own included: ``--by`` is a name typed, not a login, so
  "your own decisions" would show anyone's). Once the request has left review (approved,
  returned, rejected, released, withdrawn, superseded) every decision, reviewer and comment is
  shown. The store and the audit trail record every decision as it is made: that is the
  custodian's and IG lead's record, not the reviewers' view (``review show`` prints no audit
  entries). Because a return or a rejection ends review at once, the reviews of a request still
  waiting can only be approvals; blinding hides who gave them, for which files and with what
  comment, and the state ``approved_by_one`` says no more than "1 of 2 reviews in".
* **Disposal withdraws what is staged**: a request still staged under an agreement or holding
  records of a collection being disposed of is withdrawn (:func:`withdraw_for_disposal`, why
  ``disposed: <disposal id>``) and its staged files are shredded by the disposal
  (``safehaven.dispose``), which counts them in its certificate.
* **What will never leave is shredded** (CoP 27b): a rejected, withdrawn or superseded
  request's staged files are overwritten and unlinked (:func:`_discard`), and so are files a
  stopped delivery of it moved into ``releases/`` unless registered or delivered
  (:func:`_undelivered_release`). The state is recorded
  first, so a request whose shredding failed can never be delivered; the shredding is retried
  by the next discard and the next request opened (:func:`shred_discarded`), until the staged
  folder is gone.

The states and the transitions between them are listed once, in :data:`TRANSITIONS`.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from safehaven.core import audit, schema
from safehaven.core import registers as reg
from safehaven.core.days import haven_today
from safehaven.core.digests import sealed_rows
from safehaven.core.files import sha256_file, sha256_plain, shred_tree, stand_in
from safehaven.core.home import Home
from safehaven.core.sql import lit
from safehaven.core.store import opened_by, table_exists
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import optouts

if TYPE_CHECKING:
    from safehaven.share.agreements import Agreement

log = logging.getLogger(__name__)

REQUESTS = schema.RELEASE_REQUESTS
REVIEWS = schema.RELEASE_REVIEWS
REQUEST_MEMBERS = schema.RELEASE_REQUEST_MEMBERS

# --- the state machine (one place) --------------------------------------------------------

PREPARED = "prepared"
APPROVED_BY_ONE = "approved_by_one"
APPROVED = "approved"
RELEASED = "released"
#: the key of the opt-out decision stored with a request that holds the objection register's
#: freshness window it was prepared under (delivery holds the register to it again)
WINDOW_KEY = "objections_window_days"
#: the longest freshness window a stored request may carry (a year)
MAX_WINDOW_DAYS = 366
RETURNED = "returned"
REJECTED = "rejected"
WITHDRAWN = "withdrawn"
SUPERSEDED = "superseded"

#: waiting for a reviewer's decision
AWAITING_REVIEW = (PREPARED, APPROVED_BY_ONE)
#: not yet final: a newer preparation supersedes these
OPEN = (PREPARED, APPROVED_BY_ONE, APPROVED, RETURNED)
#: will never leave: their staged files are shredded (``_discard``)
NEVER_LEAVES = (REJECTED, WITHDRAWN, SUPERSEDED)
#: the comment of a request withdrawn for a disposal, whose files the disposal shreds and certifies
DISPOSED_PREFIX = "disposed: "

#: action -> {from state: to state}
TRANSITIONS: dict[str, dict[str, str]] = {
    "approve_first": {PREPARED: APPROVED_BY_ONE},
    "approve": {PREPARED: APPROVED, APPROVED_BY_ONE: APPROVED},
    "release": {APPROVED: RELEASED},
    "return": {PREPARED: RETURNED, APPROVED_BY_ONE: RETURNED},
    "reject": {PREPARED: REJECTED, APPROVED_BY_ONE: REJECTED},
    "withdraw": {s: WITHDRAWN for s in OPEN},
    "supersede": {s: SUPERSEDED for s in OPEN},
}

# --- release rules ------------------------------------------------------------------------

TWO_REVIEWERS = "two_reviewers"
ONE_REVIEWER = "one_reviewer"
AUTOMATIC = "automatic"
TWO_REVIEWERS_AND_CUSTODIAN = "two_reviewers_and_custodian"
#: rule -> reviewers needed
#: the audit action of a delivery (its entry names the reviewers and the release's shape)
RELEASE_ACTION = "release"
#: the audit action of a request's preparation (its files, manifest, level and members)
PREPARE_ACTION = "review.prepare"
#: the audit action of a reviewer's decision on a request
DECIDE_ACTION = "review.decide"
#: the audit action of a delivery refused as a near-miss breach (:func:`_refuse_delivery`)
REFUSED_ACTION = "review.release"
#: the audit action of a discarded request's shredding refused (once per reason: :func:`_shredding_refused`)
SHRED_REFUSED_ACTION = "review.shred_refused"
#: the audit action of a shredding refused before and done by a later retry (:func:`_shredding_done`)
SHRED_DONE_ACTION = "review.shredded"
RULES: dict[str, int] = {TWO_REVIEWERS: 2, ONE_REVIEWER: 1, AUTOMATIC: 0, TWO_REVIEWERS_AND_CUSTODIAN: 2}
#: an automatic approval is recorded under this name
AUTOMATIC_REVIEWER = "routine rule (automatic)"
MIN_COMMENT = 5
#: the fewest letters and digits a reviewer's name holds (:func:`person_key`)
MIN_NAME = 3
#: the Unicode categories a name keeps when compared: letters and numbers (:func:`person_key`)
NAME_CATEGORIES = ("L", "N")
#: the key of the agreement file's SHA-256 in a request's preparation entry (:func:`_agreement_in_force`)
AGREEMENT_PIN = "agreement_sha256"


class ReviewError(Exception):
    """A review step that must not happen; the message says why and how to clear it (no values)."""


@dataclass(frozen=True)
class Request:
    """One release request as stored."""

    release_id: str
    agreement_id: str
    identifiability: str
    state: str
    rule: str
    rule_reason: str
    staging_dir: Path
    content_sha256: str
    shape_sha256: str
    manifest_sha256: str
    files: list[dict[str, Any]]
    summary: dict[str, Any]
    prepared_by: str
    prepared_at: datetime
    comment: str | None

    @property
    def home(self) -> Home:
        """The home the request was staged in: its staged folder is ``staging/releases/<release-id>/``
        (``safehaven.share.releases.staging_dir``)."""
        return Home(self.staging_dir.parents[2])

    @property
    def reviewers_needed(self) -> int:
        return RULES[self.rule]


_COLS = (
    "release_id, agreement_id, identifiability, state, rule, rule_reason, staging_dir, content_sha256, "
    "shape_sha256, manifest_sha256, files, summary, prepared_by, prepared_at, comment"
)


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    schema.ensure(con, REQUESTS, REVIEWS, REQUEST_MEMBERS)


def _request(row: tuple[Any, ...], home: Home | None) -> Request:
    """A request from its row; its staged folder in ``home``, the home whose store the row was read
    from, not the path stored when it was prepared: a home moved or restored elsewhere would
    otherwise shred, hash and deliver the old place's files (found by review). Only a connection
    no home opened (a test's) keeps the stored path."""
    values = list(row)
    values[6] = home.staged_release(values[0]) if home is not None else Path(values[6])
    values[10], values[11] = json.loads(values[10]), json.loads(values[11])
    return Request(*values)


def get(con: duckdb.DuckDBPyConnection, release_id: str) -> Request:
    """The request named by the release id it would create; :class:`ReviewError` if none."""
    ensure_tables(con)
    row = con.execute(f"SELECT {_COLS} FROM {REQUESTS} WHERE release_id = ?", [release_id]).fetchone()
    if row is None:
        raise ReviewError(f"no release request {release_id} (safehaven review list shows the open ones)")
    return _request(row, opened_by(con))


def requests(
    con: duckdb.DuckDBPyConnection, *, states: tuple[str, ...] | None = None, agreement_id: str | None = None
) -> list[Request]:
    """Requests, oldest first, optionally in ``states`` and for one agreement."""
    ensure_tables(con)
    where, params = ["true"], []
    if states:
        where.append(f"state IN ({', '.join('?' for _ in states)})")
        params += list(states)
    if agreement_id:
        where.append("agreement_id = ?")
        params.append(agreement_id)
    sql = f"SELECT {_COLS} FROM {REQUESTS} WHERE {' AND '.join(where)} ORDER BY prepared_at, release_id"
    home = opened_by(con)
    return [_request(r, home) for r in con.execute(sql, params).fetchall()]


def latest_comparable(con: duckdb.DuckDBPyConnection, agreement_id: str) -> Request | None:
    """The newest request of an agreement that a new preparation is compared with.

    Superseded and withdrawn requests are skipped; released, open, returned and rejected ones
    count (content equal to a rejected request is not offered again).
    """
    found = [r for r in requests(con, agreement_id=agreement_id) if r.state not in (SUPERSEDED, WITHDRAWN)]
    return found[-1] if found else None


def two_reviewer_shapes(con: duckdb.DuckDBPyConnection, agreement_id: str) -> set[str]:
    """Shapes of this agreement's releases that two reviewers approved (routine flows start from
    these), from the audit trail's ``release`` entries whose own hash verifies, not from the
    store's requests, whose state and rule someone holding the store key could set. A release
    whose entry predates shapes in it (none recorded) starts no routine flow."""
    found = set()
    for entry in audit.authentic_entries(con, [RELEASE_ACTION]):
        detail = entry.fields
        reviewers = detail.get("reviewers")
        if (
            entry.agreement == agreement_id
            and detail.get("rule") == TWO_REVIEWERS
            and isinstance(reviewers, list)
            and len(reviewers) >= RULES[TWO_REVIEWERS]
            and isinstance(detail.get("shape_sha256"), str)
        ):
            found.add(detail["shape_sha256"])
    return found


def person_key(name: str) -> str:
    """The one form in which two names of people are compared (operator, reviewers; in the store
    and in the audit trail): compatibility-normalised (NFKC: a fullwidth or styled letter is the
    letter), letters and digits only (spaces, punctuation, and format characters such as a
    zero-width space dropped), case-folded. "Alice Reviewer", "alice  REVIEWER.",
    "Alice\u200bReviewer" and a fullwidth "Alice Reviewer" are one person (SATRE 3.3.04-3.3.05:
    two independent checkers; found by review)."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    return "".join(c for c in folded if unicodedata.category(c)[0] in NAME_CATEGORIES)


def _same(a: str, b: str) -> bool:
    return person_key(a) == person_key(b)


# --- transitions --------------------------------------------------------------------------


def _transition(
    con: duckdb.DuckDBPyConnection,
    req: Request,
    action: str,
    *,
    by: str,
    why: str,
    detail: dict[str, Any] | None = None,
) -> Request:
    """Move a request along :data:`TRANSITIONS` and audit it; refuse any other move, and text that
    may hold an NHS number (:func:`_plain_text`) before anything is recorded."""
    _plain_text(by=by, why=why)
    to = TRANSITIONS[action].get(req.state)
    if to is None:
        raise ReviewError(f"request {req.release_id} is {req.state}; the step {action!r} is not open to it")
    con.execute(
        f"UPDATE {REQUESTS} SET state = ?, updated_at = now(), comment = coalesce(?, comment) "
        "WHERE release_id = ? AND state = ?",
        [to, why if action in ("return", "reject", "withdraw") else None, req.release_id, req.state],
    )
    audit.append(
        con,
        actor=by,
        role="review",
        action=f"review.{action}",
        object=_object(req),
        agreement=req.agreement_id,
        detail={"from": req.state, "to": to, "why": why, "os_user": reg.os_login(), **(detail or {})},
    )
    return get(con, req.release_id)


def open_request(
    con: duckdb.DuckDBPyConnection,
    *,
    release_id: str,
    agreement_id: str,
    identifiability: str,
    rule: tuple[str, str],
    staging_dir: Path,
    content_sha256: str,
    shape_sha256: str,
    manifest_sha256: str,
    files: list[dict[str, Any]],
    summary: dict[str, Any],
    register_row: dict[str, Any],
    optout_decision: dict[str, Any],
    members_sql: str | None,
    actor: str,
    agreement_sha256: str,
    scheduled: bool = False,
) -> Request:
    """Record a prepared request (superseding older open ones of the agreement) and audit it.

    ``members_sql`` selects the haven pids of everyone in the release (record level), kept in
    the store until delivery. ``agreement_sha256``: the SHA-256 of the agreement file it was
    prepared under (its audit entry pins it: :func:`_agreement_in_force`). The entry also records
    the OS login that prepared it and whether that was a run of the pipeline (``scheduled``) or
    a person at a terminal (:func:`_own_login`). Call outside an open transaction.
    """
    ensure_tables(con)
    shred_discarded(con)  # a shredding that failed before is retried by the next run
    older = requests(con, states=OPEN, agreement_id=agreement_id)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            f"INSERT INTO {REQUESTS} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), now(), NULL)",
            [
                release_id, agreement_id, identifiability, PREPARED, rule[0], rule[1], str(staging_dir),
                content_sha256, shape_sha256, manifest_sha256, json.dumps(files), json.dumps(summary),
                json.dumps(register_row, default=str), json.dumps(optout_decision), actor,
            ],
        )  # fmt: skip
        if members_sql:
            con.execute(f"INSERT INTO {REQUEST_MEMBERS} SELECT DISTINCT ?, ?, pid FROM ({members_sql})",
                        [release_id, agreement_id])  # fmt: skip
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    audit.append(
        con,
        actor=actor,
        role="pipeline",
        action=PREPARE_ACTION,
        object=f"release-request:{release_id}",
        agreement=agreement_id,
        detail={"to": PREPARED, "rule": rule[0], "files": [{"name": f["name"], "sha256": f["sha256"]} for f in files],
                "manifest_sha256": manifest_sha256, "shape_sha256": shape_sha256, "identifiability": identifiability,
                "members": _members(con, release_id), AGREEMENT_PIN: agreement_sha256, "os_user": reg.os_login(),
                "scheduled": scheduled},
    )  # fmt: skip
    for old in older:
        _discard(con, _transition(con, old, "supersede", by=actor, why=f"superseded by {release_id}"))
    return get(con, release_id)


def members_not_on_record(con: duckdb.DuckDBPyConnection, agreement_id: str | None = None) -> list[str]:
    """Record-level releases (under ``agreement_id``, or any) whose members in the store are not as
    the audit trail records them, each with why; empty: every one is.

    ``governance.release_members`` says who was sent what; anyone holding the store key can add a
    row (the custodian would then re-identify someone never released) or delete one (a subject
    access report would omit a release). So a release there must have an authentic delivery entry,
    and its members must match the count and digest audited at its latest preparation (a
    preparation audited before members were recorded is checked on its delivery alone). Found by
    review; CoP 12, 23d."""
    rids = _record_level_releases(con, agreement_id)
    delivered = {e.object for e in audit.authentic_entries(con, [RELEASE_ACTION]) if e.outcome == "ok"}
    prepared = {e.object: e.fields for e in audit.authentic_entries(con, [PREPARE_ACTION])}  # the latest wins
    found = []
    for rid in rids:
        audited = prepared.get(f"release-request:{rid}", {}).get("members")
        if f"release:{rid}" not in delivered:
            found.append(f"{rid}: its members are in the store but the audit trail records no delivery of it")
        elif not _registered(con, rid):
            found.append(f"{rid}: the audit trail records its delivery but the release register has no row for it")
        elif audited is not None and audited != _members(con, rid):
            found.append(f"{rid}: its members in the store differ from those audited when it was prepared")
    return found


def _record_level_releases(con: duckdb.DuckDBPyConnection, agreement_id: str | None) -> list[str]:
    """The ids of releases with members, or registered above the anonymised level, under
    ``agreement_id`` (or any), in order; read only (a read-only connection may ask)."""
    parts = [
        f"SELECT release_id FROM {table} WHERE (CAST(? AS VARCHAR) IS NULL OR agreement_id = ?){extra}"
        for table, extra in ((reg.RELEASE_MEMBERS, ""), (reg.RELEASE_REGISTER, " AND identifiability <> 'anonymised'"))
        if table_exists(con, *table.split("."))
    ]
    if not parts:
        return []
    rows = con.execute(" UNION ".join(parts) + " ORDER BY 1", [agreement_id, agreement_id] * len(parts)).fetchall()
    return [r for (r,) in rows]


def _members(con: duckdb.DuckDBPyConnection, release_id: str) -> list:
    """The request's kept members as they stand: their count and SHA-256 over their haven pids in
    order (``core.digests.sealed_rows_sql``), recorded at preparation and checked at delivery."""
    where = f"WHERE t.release_id = {lit(release_id)}"
    found = next(iter(sealed_rows(con, _member_table(con, release_id), "t.pid", where=where)), None)
    return [int(found[1]), str(found[2])] if found else [0, ""]


def _member_table(con: duckdb.DuckDBPyConnection, release_id: str) -> str:
    """Where the request's members are: moved to the release's at registration, so a delivery
    stopped after it reads them there (its checks of the members are the same either way)."""
    if _registered(con, release_id):
        return f"(SELECT release_id, agreement_id, pid FROM {reg.RELEASE_MEMBERS})"
    return REQUEST_MEMBERS


def _discard(con: duckdb.DuckDBPyConnection, req: Request) -> None:
    """Shred the staged files and drop the kept members of a request that will never be released
    (CoP 27b: record-level files are overwritten, not only unlinked, as disposal does), and the
    files a stopped delivery of it had moved into ``releases/`` (:func:`_undelivered_release`).

    Called once the request's state says it will never leave, so a failure here leaves nothing
    deliverable; the shredding of any request left so (this one included) is retried first.
    """
    shred_discarded(con, but=req.release_id)
    try:
        _shred(con, req)
    except (ReviewError, OSError) as refused:
        _shredding_refused(con, req, refused)
        raise


def _shred(con: duckdb.DuckDBPyConnection, req: Request) -> None:
    """Drop a discarded request's kept members and shred its staged and undelivered files, each
    folder first found in place (:func:`_refuse_stand_in`)."""
    con.execute(f"DELETE FROM {REQUEST_MEMBERS} WHERE release_id = ?", [req.release_id])
    undelivered = _undelivered_release(con, req)
    for folder in (req.staging_dir, *([undelivered] if undelivered is not None else [])):
        _refuse_stand_in(req, folder)
        shred_tree(folder)


def _refuse_stand_in(req: Request, folder: Path) -> None:
    """Refuse (``ReviewError``) to shred a folder the haven wrote for ``req`` when a symbolic link
    (dangling or not), or anything but a folder, stands in its place, in place of a folder the
    haven wrote above it (between the home's area and it) or inside it: the files it stands for
    may have been moved out of the haven's reach, and unlinking it would record them shredded
    while they survive (CoP 27b: what will never leave is destroyed; CoP 49). The request stays
    as recorded (it will never leave); :func:`shred_discarded` retries at the next discard or run,
    and refuses again until a person puts the files back."""
    root = req.home.root
    _, path = stand_in(root, folder, inside=True)  # the rule's one statement (safehaven.core.files)
    if path is not None:
        raise ReviewError(
            f"{_standing_in(root, path)}: the files of {req.release_id} may have been moved out of the haven's reach "
            "and would survive its shredding (CoP 27b). Put them back in its place (the next withdrawal, rejection "
            "or run shreds them), or, once you have found and destroyed them, remove it and record that: "
            f'safehaven review resolve-shredding {req.release_id} --by "Name, role" --reason "..."'
        )


def _standing_in(root: Path, path: Path) -> str:
    """What a refusal says of ``path``, a link or a file standing in place of a folder the haven
    wrote (``core.files.stand_in``), by its shown path under the home ``root``."""
    what = "a symbolic link" if path.is_symlink() else "not a folder"
    return f"{audit.shown_path(str(path.relative_to(root)))} is {what}, not what the haven wrote there"


def stopped_deliveries(con: duckdb.DuckDBPyConnection, agreement_id: str | None = None) -> list[tuple[str, str]]:
    """``(release id, shown folder)`` of each approved request whose delivery stopped after moving
    its files into ``releases/<agreement>/<release-id>/`` (before or after registering them): the
    files wait in the recipient's folder until a person finishes the delivery (``safehaven review
    release``) or, while they are not registered, withdraws the request (which shreds them). For
    the release's check, every run (found by review: nothing named it, so it waited unseen)."""
    found = []
    for req in requests(con, states=(APPROVED,), agreement_id=agreement_id):
        folder = req.home.releases / req.agreement_id / req.release_id
        if os.path.lexists(folder):
            found.append((req.release_id, audit.shown_path(str(folder.relative_to(req.home.root)))))
    return found


def undelivered_folder(con: duckdb.DuckDBPyConnection, release_id: str) -> Path | None:
    """The folder in ``releases/`` a stopped delivery of ``release_id`` left, neither registered nor
    delivered (:func:`_undelivered_release`); None otherwise (for a disposal's plan)."""
    return _undelivered_release(con, get(con, release_id))


def _undelivered_release(con: duckdb.DuckDBPyConnection, req: Request) -> Path | None:
    """``releases/<agreement>/<release-id>/`` of the haven ``req`` was staged in (its staged folder
    is ``staging/releases/<release-id>/``: ``safehaven.share.releases.staging_dir``) when it exists
    though the release was neither registered nor delivered: a delivery stopped after its move
    left it, and a request that will never leave must not leave it there for the recipient,
    unrecorded (CoP 27b; found by review). None otherwise: a registered or delivered release's
    files are never shredded here."""
    folder = req.home.releases / req.agreement_id / req.release_id
    if not (folder.exists() or folder.is_symlink()):
        return None
    if _registered(con, req.release_id) or _delivery_audited(con, req.release_id):
        return None
    return folder


def shred_discarded(
    con: duckdb.DuckDBPyConnection, *, but: str | None = None, agreement_id: str | None = None
) -> list[str]:
    """Shred the files a failed :func:`_discard` left behind: requests that will never leave whose
    staged folder, or undelivered folder in ``releases/`` (:func:`_undelivered_release`), still
    exists (those withdrawn for a disposal are left to it: it shreds and certifies them), or a
    link stands in its place or above it (refused again: :func:`_refuse_stand_in`); only those of
    ``agreement_id`` if given. Returns the ids shredded. A refusal (or a file-system error) is
    logged, audited once per reason (:func:`_shredding_refused`), shown by the release's check and
    ``safehaven review list`` (:func:`unshredded`), and retried by the next discard or run; it
    does not stop the others, nor the preparation or withdrawal that called this (found by review:
    one link failed every agreement's release each night). A retry that shreds what was refused
    is audited too (:func:`_shredding_done`): the refusal is resolved on record."""
    done = []
    for req in _discarded_left(con, but=but, agreement_id=agreement_id):
        try:
            _shred(con, req)
        except (ReviewError, OSError) as refused:
            _shredding_refused(con, req, refused)
            continue
        _shredding_done(con, req)
        done.append(req.release_id)
    return done


def _object(req: Request) -> str:
    """The audit object of a request's entries."""
    return f"release-request:{req.release_id}"


def _discarded_left(con: duckdb.DuckDBPyConnection, *, but: str | None, agreement_id: str | None) -> list[Request]:
    """Requests that will never leave whose files (or a link in their place) are still there,
    less those a disposal withdrew (it shreds and certifies them)."""
    return [
        r
        for r in requests(con, states=NEVER_LEAVES, agreement_id=agreement_id)
        if r.release_id != but and not (r.comment or "").startswith(DISPOSED_PREFIX) and _left_behind(con, r)
    ]


def _refusal_reason(refused: Exception) -> str:
    """What a refused shredding says: the haven's own refusal, or the file-system error's kind
    and the file's place in the home (never a value: audited)."""
    if isinstance(refused, ReviewError):
        return str(refused)
    where = audit.shown_path(Path(refused.filename).name) if getattr(refused, "filename", None) else "a file"
    return f"{type(refused).__name__} ({refused.strerror or 'no detail'}) at {where}; the shredding is retried"


def _shredding_refused(con: duckdb.DuckDBPyConnection, req: Request, refused: Exception) -> None:
    """Log a refused shredding, and audit it unless its latest shredding entry is this same
    refusal: each night's retry does not add an entry, a new reason does (CoP 27b, 49)."""
    reason = _refusal_reason(refused)
    log.warning("the shredding of %s is refused: %s", req.release_id, reason)
    last = audit.latest_entry(con, _object(req), (SHRED_REFUSED_ACTION, SHRED_DONE_ACTION))
    if last is not None and last.action == SHRED_REFUSED_ACTION and (last.detail_value or {}).get("reason") == reason:
        return
    audit.append(
        con, actor=reg.current_actor(), role="pipeline", action=SHRED_REFUSED_ACTION, object=_object(req),
        agreement=req.agreement_id, outcome="refused", detail={"state": req.state, "reason": reason},
    )  # fmt: skip


def _shredding_done(con: duckdb.DuckDBPyConnection, req: Request) -> None:
    """Audit a retry that shredded files whose shredding was refused before (the refusal resolved)."""
    last = audit.latest_entry(con, _object(req), (SHRED_REFUSED_ACTION, SHRED_DONE_ACTION))
    if last is not None and last.action == SHRED_REFUSED_ACTION:
        audit.append(
            con, actor=reg.current_actor(), role="pipeline", action=SHRED_DONE_ACTION, object=_object(req),
            agreement=req.agreement_id, detail={"state": req.state, "refused_at_seq": last.seq},
        )  # fmt: skip


def unshredded(con: duckdb.DuckDBPyConnection, agreement_id: str | None = None) -> list[tuple[str, str]]:
    """``(release id, reason)`` of each request that will never leave whose files are still there
    (its shredding refused, the reason as last audited), or whose refused shredding no one has
    resolved though nothing is left to shred (the link removed: the files it stood for may survive
    where it pointed): for the release's check and ``safehaven review list``, in view until a
    person resolves it (:func:`resolve_shredding`; found by review: removing the link cleared it
    unaudited)."""
    found = []
    for req in requests(con, states=NEVER_LEAVES, agreement_id=agreement_id):
        if (req.comment or "").startswith(DISPOSED_PREFIX):
            continue
        refused = _unresolved_refusal(con, req)
        if _left_behind(con, req):
            found.append((req.release_id, refused.detail_value["reason"] if refused else "not shredded yet"))
        elif refused is not None:
            found.append((req.release_id, GONE_UNSHREDDED.format(rid=req.release_id)))
    return found


#: what a refused shredding whose link was removed says (:func:`unshredded`)
GONE_UNSHREDDED = (
    "its shredding was refused and what stood in the way is gone, but the haven never shredded the files: they may "
    "survive where it pointed; find and destroy them, then record it: safehaven review resolve-shredding {rid} "
    '--by "Name, role" --reason "..."'
)


def _unresolved_refusal(con: duckdb.DuckDBPyConnection, req: Request) -> audit.Entry | None:
    """The request's latest shredding entry when it is a refusal (none since has shredded or resolved it)."""
    last = audit.latest_entry(con, _object(req), (SHRED_REFUSED_ACTION, SHRED_DONE_ACTION))
    return last if last is not None and last.action == SHRED_REFUSED_ACTION else None


def resolve_shredding(con: duckdb.DuckDBPyConnection, release_id: str, *, by: str, reason: str) -> None:
    """A person records that the files of a request whose shredding was refused, and whose link was
    then removed, have been found and destroyed (audited ``review.shredded``, with who and why):
    the haven cannot see them, so only a person's word on record clears it (CoP 27b, 49). Refused
    while its files, or what stands in their place, are still in the home (the next run shreds
    them, or refuses again), or when no refusal waits."""
    _plain_text(by=by, comment=reason)
    if len(person_key(by)) < MIN_NAME or len(reason.strip()) < MIN_COMMENT:
        raise ReviewError('name who destroyed the files (--by "Name, role") and say how (--reason)')
    req = get(con, release_id)
    refused = _unresolved_refusal(con, req)
    if refused is None:
        raise ReviewError(f"no refused shredding of {release_id} waits to be resolved")
    if _left_behind(con, req):
        raise ReviewError(
            f"the files of {release_id}, or what stands in their place, are still in the home: put the files back "
            "in place (the next run shreds them) or remove what stands there, then resolve it"
        )
    audit.append(
        con, actor=by.strip(), role="governance", action=SHRED_DONE_ACTION, object=_object(req),
        agreement=req.agreement_id,
        detail={"state": req.state, "refused_at_seq": refused.seq, "by_person": True, "reason": reason.strip()},
    )  # fmt: skip


def _left_behind(con: duckdb.DuckDBPyConnection, req: Request) -> bool:
    """Whether a discarded request's files (or a link standing in for them, or for a folder above
    them: ``safehaven.core.files.stand_in``) are still there."""
    if os.path.lexists(req.staging_dir) or _undelivered_release(con, req) is not None:
        return True
    return stand_in(req.home.root, req.staging_dir)[1] is not None


def _require_independent(con: duckdb.DuckDBPyConnection, req: Request, by: str) -> None:
    """Neither the operator of the run nor a reviewer who has already approved this request, names
    compared as one person's (:func:`person_key`)."""
    if len(person_key(by)) < MIN_NAME:
        raise ReviewError('name the reviewer with --by, e.g. --by "Name, Output checker"')
    if _same(by, req.prepared_by):
        raise ReviewError(
            f"{by} operated the run that prepared {req.release_id}; the reviewers must be two other people"
        )
    done = _store_approvals(con, req).get(person_key(by))
    if done is not None and done[1] >= {f["name"] for f in req.files}:
        raise ReviewError(
            f"{by} has already approved {req.release_id}; the second approval must come from another person"
        )


def _store_approvals(con: duckdb.DuckDBPyConnection, req: Request) -> dict[str, tuple[str, set[str]]]:
    """Each person's approvals in the store (by :func:`person_key`): the name they first gave, and
    the files they approved under any spelling of it."""
    rows = con.execute(
        f"SELECT reviewer, file_name FROM {REVIEWS} WHERE release_id = ? AND decision = 'approve' "
        "ORDER BY decided_at, reviewer",
        [req.release_id],
    ).fetchall()
    found: dict[str, tuple[str, set[str]]] = {}
    for reviewer, name in rows:
        found.setdefault(person_key(reviewer), (reviewer, set()))[1].add(name)
    return found


def approvers(con: duckdb.DuckDBPyConnection, req: Request) -> list[str]:
    """Reviewers who have approved every file of the request, by name, one per person."""
    names = {f["name"] for f in req.files}
    return sorted(shown for shown, files in _store_approvals(con, req).values() if files >= names)


def _own_login(con: duckdb.DuckDBPyConnection, req: Request, by: str) -> None:
    """Refuse an approval given from the OS login that prepared the request (however it was
    prepared: :func:`_preparer_logins`) or from the login of another person's
    approval of it: a second typed ``--by`` name from one account is one person, whatever it
    says (SATRE 3.3.04-3.3.05: two independent checkers, neither the operator; found by review).
    The login is the account of the process's real uid (``registers.os_login``), never an
    environment variable one account can set to any name. Each approval's audit entry records
    its login; delivery counts them so too (:func:`_audited_approvers`)."""
    trail = _trail(con, req)
    if trail is None:
        return  # delivery refuses a request whose preparation is not on the trail
    prepared, since = trail
    me, key = reg.os_login(), person_key(by)
    if me in _preparer_logins(prepared):
        raise ReviewError(
            f"the OS login that prepared {req.release_id} cannot approve it: each reviewer approves from their "
            "own login, not the operator's (log in as yourself and approve again)"
        )
    if any(login == me for who, logins in _audited_logins(since).items() if who != key for login in logins):
        raise ReviewError(
            f"another reviewer of {req.release_id} approved it from this OS login; the second approval must come "
            "from another person at their own login"
        )


# --- what reviewers are shown (blinded review, module docstring) ----------------------------


def blinded(req: Request) -> bool:
    """Whether the reviews of ``req`` are hidden from the reviewers (it still awaits a decision)."""
    return req.state in AWAITING_REVIEW


def reviews_in(con: duckdb.DuckDBPyConnection, req: Request) -> int:
    """How many reviewers have decided every file of ``req`` (a review is in once it covers every
    file), one per person (:func:`person_key`)."""
    ensure_tables(con)
    rows = con.execute(f"SELECT reviewer, file_name FROM {REVIEWS} WHERE release_id = ?", [req.release_id]).fetchall()
    decided: dict[str, set[str]] = {}
    for reviewer, name in rows:
        decided.setdefault(person_key(reviewer), set()).add(name)
    return sum(1 for names in decided.values() if names >= {f["name"] for f in req.files})


def decisions(con: duckdb.DuckDBPyConnection, req: Request) -> list[dict[str, Any]]:
    """Every per-file decision on ``req``, oldest first: reviewer, file, SHA-256, decision, comment, when."""
    ensure_tables(con)
    rows = con.execute(
        f"SELECT reviewer, file_name, sha256, decision, comment, decided_at FROM {REVIEWS} WHERE release_id = ? "
        "ORDER BY decided_at, reviewer, file_name",
        [req.release_id],
    ).fetchall()
    keys = ("reviewer", "file", "sha256", "decision", "comment", "decided_at")
    return [dict(zip(keys, (*r[:5], r[5].isoformat()), strict=True)) for r in rows]


def reviews_view(con: duckdb.DuckDBPyConnection, req: Request) -> dict[str, Any]:
    """What the reviewers may see of the reviews of ``req`` (blinded review, module docstring).

    While it awaits a decision: ``reviews_in`` of ``reviews_needed`` only (``approved_by`` and
    ``decisions`` are ``None``). Afterwards: who approved, and every decision with its comment.
    """
    view: dict[str, Any] = {
        "blinded": blinded(req),
        "reviews_in": reviews_in(con, req),
        "reviews_needed": req.reviewers_needed,
        "approved_by": None,
        "decisions": None,
    }
    if not view["blinded"]:
        view.update(approved_by=approvers(con, req), decisions=decisions(con, req))
    return view


def _pin(req: Request, wanted: list[str] | None) -> dict[str, str]:
    """Hash the files being decided now; each must still equal its hash pinned at preparation."""
    pinned = {f["name"]: f["sha256"] for f in req.files}
    names = wanted or sorted(pinned)
    unknown = sorted(set(names) - set(pinned))
    if unknown:
        raise ReviewError(f"{req.release_id} has no file {', '.join(unknown)} (files: {', '.join(sorted(pinned))})")
    found: dict[str, str] = {}
    for name in names:
        actual = sha256_plain(req.staging_dir / name) or "missing"  # a link is never followed
        if actual != pinned[name]:
            raise ReviewError(
                f"{name} of {req.release_id} is not the file that was prepared (SHA-256 differs, it is missing, "
                "or it is not a plain file: a link or a second name); "
                f"withdraw the request (safehaven review withdraw {req.release_id} --by ...) and let the next run "
                "prepare it again"
            )
        found[name] = actual
    return found


def _plain_text(**texts: str | None) -> None:
    """Refuse (``ReviewError``) a reviewer's name or comment that may hold an NHS number, before any
    decision or state is recorded: both go to the store, the audit trail (which refuses them: a
    state changed with no entry, found by review) and the exported request register."""
    for what, text in texts.items():
        if audit.holds_identifier(text):
            shown = "the name (--by)" if what == "by" else "the comment"
            raise ReviewError(audit.NO_IDENTIFIER_IN_TEXT.format(what=shown))


def _decide(con: duckdb.DuckDBPyConnection, req: Request, by: str, decision: str, hashes: dict[str, str],
            comment: str | None) -> None:  # fmt: skip
    _plain_text(by=by, comment=comment)
    con.executemany(
        f"INSERT INTO {REVIEWS} VALUES (?, ?, ?, ?, ?, ?, now())",
        [[req.release_id, by.strip(), name, sha, decision, comment] for name, sha in hashes.items()],
    )


def approve(
    con: duckdb.DuckDBPyConnection,
    release_id: str,
    by: str,
    *,
    home: Home,
    registry: ContractRegistry,
    files: list[str] | None = None,
    comment: str | None = None,
) -> Request:
    """Record ``by``'s approval of ``files`` (default: every file) and move the request on.

    When the rule's reviewers have each approved every file the request is ``approved`` and,
    unless it needs the vault custodian, delivered at once (:func:`deliver`).
    """
    _plain_text(by=by, comment=comment)
    req = get(con, release_id)
    if req.state not in AWAITING_REVIEW:
        raise ReviewError(f"request {release_id} is {req.state}; only a prepared request can be approved")
    _require_independent(con, req, by)
    _own_login(con, req, by)
    hashes = _pin(req, files)
    audit.append(  # first: a decision whose entry cannot be written (or is killed before) is not recorded
        con,
        actor=by.strip(),
        role="review",
        action=DECIDE_ACTION,
        object=f"release-request:{release_id}",
        agreement=req.agreement_id,
        detail={
            "decision": "approve",
            "files": hashes,
            "comment": comment,
            "os_user": reg.os_login(),
            AGREEMENT_SEEN: _agreement_seen(registry, req.agreement_id),
        },
    )
    _decide(con, req, by, "approve", hashes, comment)
    names = approvers(con, req)
    if len(names) >= req.reviewers_needed:
        req = _transition(con, req, "approve", by=by.strip(), why=f"approved by {', '.join(names)}")
        if TWO_REVIEWERS_AND_CUSTODIAN not in (req.rule, _audited_rule(con, req)):
            return deliver(con, release_id, home=home, registry=registry, by=by.strip())
    elif names and req.state == PREPARED:
        req = _transition(con, req, "approve_first", by=by.strip(), why=f"approved by {names[0]}")
    return req


def _audited_rule(con: duckdb.DuckDBPyConnection, req: Request) -> object:
    """The rule audited at the request's latest preparation (None when there is none): an
    identifiable request waits for the custodian whatever rule the store now says."""
    entry = audit.latest_entry(con, f"release-request:{req.release_id}", [PREPARE_ACTION])
    return entry.fields.get("rule") if entry is not None else None


def _close(con: duckdb.DuckDBPyConnection, release_id: str, by: str, comment: str, action: str,
           files: list[str] | None) -> Request:  # fmt: skip
    """Return or reject a request with comments (every file decided is recorded)."""
    if len((comment or "").strip()) < MIN_COMMENT:
        raise ReviewError(f"say why the request is {action}ed (--comment), so the operator knows what to change")
    req = get(con, release_id)
    if req.state not in AWAITING_REVIEW:
        raise ReviewError(f"request {release_id} is {req.state}; only a prepared request can be {action}ed")
    _require_independent(con, req, by)
    hashes = {f["name"]: f["sha256"] for f in req.files if not files or f["name"] in files}
    _decide(con, req, by, action, hashes, comment.strip())
    req = _transition(con, req, action, by=by.strip(), why=comment.strip(), detail={"files": sorted(hashes)})
    if action == "reject":
        _discard(con, req)
    return req


def return_request(con: duckdb.DuckDBPyConnection, release_id: str, by: str, comment: str,
                   files: list[str] | None = None) -> Request:  # fmt: skip
    """Return a request with comments: nothing leaves; the next run prepares a corrected one."""
    return _close(con, release_id, by, comment, "return", files)


def reject(con: duckdb.DuckDBPyConnection, release_id: str, by: str, comment: str,
           files: list[str] | None = None) -> Request:  # fmt: skip
    """Reject a request: nothing leaves, and the same content is not offered again."""
    return _close(con, release_id, by, comment, "reject", files)


def withdraw(con: duckdb.DuckDBPyConnection, release_id: str, by: str, comment: str) -> Request:
    """Withdraw an open request (e.g. one whose staged files were changed); its staging is removed."""
    if len((comment or "").strip()) < MIN_COMMENT:
        raise ReviewError("say why the request is withdrawn (--comment)")
    _plain_text(by=by, comment=comment)
    req = _transition(con, get(con, release_id), "withdraw", by=by.strip(), why=comment.strip())
    _discard(con, req)
    return req


def withdraw_for_disposal(con: duckdb.DuckDBPyConnection, release_id: str, *, by: str, disposal_id: str) -> bool:
    """Withdraw a request whose data is being disposed of (module docstring): whether this disposal withdrew it
    (``False`` when it had already left, e.g. delivered, before the disposal reached it).

    Its kept members are deleted; its staged files are left for the disposal's files step, which
    shreds them and counts them in the certificate. Run again (a resumed disposal), it changes nothing.
    """
    req = get(con, release_id)
    why = f"{DISPOSED_PREFIX}{disposal_id}"
    if req.state == WITHDRAWN and req.comment == why:
        return True
    if req.state not in TRANSITIONS["withdraw"]:
        return False
    _transition(con, req, "withdraw", by=by, why=why, detail={"disposal_id": disposal_id})
    con.execute(f"DELETE FROM {REQUEST_MEMBERS} WHERE release_id = ?", [release_id])
    return True


def auto_approve(
    con: duckdb.DuckDBPyConnection, release_id: str, *, home: Home, registry: ContractRegistry, actor: str
) -> Request:
    """Approve and deliver a request under the ``automatic`` routine rule (audited as such)."""
    req = get(con, release_id)
    if req.rule != AUTOMATIC:
        raise ReviewError(f"request {release_id} is under the {req.rule} rule; it needs reviewers")
    hashes = _pin(req, None)
    _decide(con, req, AUTOMATIC_REVIEWER, "approve", hashes, req.rule_reason)
    _transition(con, req, "approve", by=actor, why=req.rule_reason)
    return deliver(con, release_id, home=home, registry=registry, by=actor)


# --- delivery ------------------------------------------------------------------------------


def _verify_staged(con: duckdb.DuckDBPyConnection, req: Request, folder: Path | None = None) -> list[str]:
    """Problems between the staged directory (or ``folder``, where an interrupted delivery moved it)
    and what was prepared and reviewed (empty: identical). A file there that was not prepared is
    one (it was planted: nothing unreviewed leaves). Names are shown as logs show a received file's
    (``audit.shown_name``: a name spelling an NHS number is withheld), so the refusal can always be
    recorded (CoP 8a; found by review)."""
    folder = folder or req.staging_dir
    if folder.is_symlink() or not folder.is_dir():
        return [f"the staged directory of {req.release_id} is missing or is a link"]
    listed = {f["name"]: f["sha256"] for f in req.files}
    listed["manifest.json"] = req.manifest_sha256
    found = [f"{audit.shown_name(p.name)} was added after preparation" for p in sorted(folder.iterdir())
             if p.name not in listed]  # fmt: skip
    for name, sha in listed.items():
        if sha256_plain(folder / name) != sha:  # a link or a second name is never hashed through
            found.append(
                f"{audit.shown_name(name)} is not the file that was prepared and reviewed (SHA-256 differs, it is "
                "missing, or it is not a plain file: a link or a second name)"
            )
    reviewed = con.execute(
        f"SELECT file_name, sha256 FROM {REVIEWS} WHERE release_id = ? AND decision = 'approve'", [req.release_id]
    ).fetchall()
    found += [f"{audit.shown_name(name)} was approved at a different SHA-256 than the one prepared"
              for name, sha in reviewed if listed.get(name) != sha]  # fmt: skip
    return found


#: a request's preparation entry, then every entry of it from there (:func:`_trail`)
Trail = tuple[audit.Entry, list[audit.Entry]]


def _trail(con: duckdb.DuckDBPyConnection, req: Request) -> Trail | None:
    """The request's latest audited preparation and its entries since (a release id used again
    counts only its own), or None when the trail holds no preparation of it or does not verify
    from its first entry to the end."""
    entries = [e for e in audit.entries_for(con, object_like=f"release-request:{req.release_id}")]
    entries = [e for e in entries if e.object == f"release-request:{req.release_id}"]
    prepared = [e for e in entries if e.action == PREPARE_ACTION]
    if not prepared or not audit.authentic_from(con, entries[0].seq):
        return None
    return prepared[-1], [e for e in entries if e.seq >= prepared[-1].seq]


def _unaudited_approval(con: duckdb.DuckDBPyConnection, req: Request, trail: Trail | None) -> str | None:
    """Why the audit trail does not show ``req`` prepared and approved as it is about to leave
    (None: it does).

    The requests and reviews tables are in the store, which anyone holding the store key can edit
    (a state set to approved, a review inserted, a rule, a recipient, a level or a pinned hash
    changed, members deleted); the audit trail is keyed, chained and anchored outside it (CoP 23d;
    SATRE 3.3.04-3.3.05). So the trail must hold the request's latest preparation with the stored
    agreement, level, files, manifest hash and members; after it, its move to ``approved`` as its
    latest state and approvals of every file at its prepared hash by as many distinct people, none
    of them its operator (names compared by :func:`person_key`) and each from their own OS login,
    neither the login of a person at a terminal who prepared it nor another approver's
    (:func:`_audited_approvers`), as the stricter of its audited and stored rules needs (none only when
    both are ``automatic``); a routine rule only for a shape two reviewers approved before
    (:func:`two_reviewer_shapes`); and those entries must verify, with every entry after them."""
    if trail is None:
        return f"the audit trail holds no verified record of the preparation of {req.release_id}"
    prepared, since = trail
    at = prepared.fields
    files = {f.get("name"): f.get("sha256") for f in at.get("files", []) if isinstance(f, dict)}
    why = _prepared_as_stored(con, req, prepared, files)
    if why:
        return why
    states = [e.fields.get("to") for e in since if "to" in e.fields]
    if states[-1] != APPROVED:
        return f"the audit trail's latest state of {req.release_id} is {states[-1]}, not approved"
    needed = max(_needed(at.get("rule")), _needed(req.rule))
    reviewed = _audited_approvers(since, files, prepared)
    if len(reviewed) < needed:
        return f"the audit trail holds {len(reviewed)} approval(s) of every file of {req.release_id}; it needs {needed}"
    if needed < RULES[TWO_REVIEWERS] and at.get("shape_sha256") not in two_reviewer_shapes(con, req.agreement_id):
        return f"{req.release_id} is under a routine rule, but no release of its shape was approved by two reviewers"
    return None


def _prepared_as_stored(
    con: duckdb.DuckDBPyConnection, req: Request, prepared: audit.Entry, files: dict[str, str]
) -> str | None:
    """Why the stored request is not the one audited at its preparation (None: it is). A
    preparation audited before its level and members were recorded is checked on the rest."""
    at = prepared.fields
    if (prepared.agreement, files, at.get("manifest_sha256")) != (
        req.agreement_id,
        {f["name"]: f["sha256"] for f in req.files},
        req.manifest_sha256,
    ):
        return f"the agreement or files of {req.release_id} in the store differ from those audited at its preparation"
    if "identifiability" in at and at["identifiability"] != req.identifiability:
        return f"the level of {req.release_id} in the store differs from the one audited at its preparation"
    if "members" in at and at["members"] != _members(con, req.release_id):
        return f"the members of {req.release_id} in the store differ from those audited at its preparation"
    if AGREEMENT_PIN in at and at[AGREEMENT_PIN] != _stored(con, req, "register_row").get(AGREEMENT_PIN):
        return f"the agreement version of {req.release_id} in the store differs from the one audited at its preparation"
    return None


def _stored(con: duckdb.DuckDBPyConnection, req: Request, column: str) -> dict[str, Any]:
    """A JSON column of the stored request ({} when lost, emptied or not an object: fail closed)."""
    row = con.execute(f"SELECT {column} FROM {REQUESTS} WHERE release_id = ?", [req.release_id]).fetchone()
    found = json.loads(row[0]) if row and row[0] else {}
    return found if isinstance(found, dict) else {}


def _needed(rule: object) -> int:
    """The reviewers a rule needs; the most any rule needs for a rule that is not one."""
    return RULES[rule] if isinstance(rule, str) and rule in RULES else max(RULES.values())


def _approvals(entries: list[audit.Entry]) -> list[audit.Entry]:
    """The approving decisions among ``entries``."""
    return [e for e in entries if e.action == DECIDE_ACTION and e.fields.get("decision") == "approve"]


def _audited_logins(entries: list[audit.Entry]) -> dict[str, set[str | None]]:
    """Each approving person's (:func:`person_key`) OS logins as their decisions' entries record
    them (``None`` for an entry that records none)."""
    found: dict[str, set[str | None]] = {}
    for entry in _approvals(entries):
        login = entry.fields.get("os_user")
        found.setdefault(person_key(entry.actor), set()).add(login if isinstance(login, str) else None)
    return found


def _preparer_logins(prepared: audit.Entry) -> set[str]:
    """The OS logins no reviewer of a request may approve from: those that prepared it (its actor,
    and the login its entry records), whoever ran it: a person at a terminal, a run they started
    from the UI or ``safehaven run``, or the scheduled run's service account. Which path prepared
    it is not who was at the keyboard, so no path is exempt (fail closed: found by review)."""
    login = prepared.fields.get("os_user")
    return {prepared.actor} | ({login} if isinstance(login, str) else set())


def _audited_approvers(entries: list[audit.Entry], files: dict[str, str], prepared: audit.Entry) -> set[str]:
    """The people whose audited decisions approve every file at its prepared hash: not the
    operator (by :func:`person_key`), each from their own known OS login, never the preparer's
    (:func:`_preparer_logins`); people who share a login count as none of them (fail closed)."""
    approved: dict[str, set[str]] = {}
    for entry in _approvals(entries):
        decided = entry.fields.get("files") if isinstance(entry.fields.get("files"), dict) else {}
        names = {name for name, sha in decided.items() if files.get(name) == sha}
        approved.setdefault(person_key(entry.actor), set()).update(names)
    logins, barred = _audited_logins(entries), _preparer_logins(prepared)
    people = {
        who
        for who, names in approved.items()
        if names >= set(files) and who != person_key(prepared.actor) and None not in logins[who]
        and not logins[who] & barred
    }  # fmt: skip
    return {who for who in people if not any(logins[who] & logins[other] for other in people - {who})}


#: what a refusal records when its own description cannot be written (:func:`_refuse_delivery`)
UNRECORDABLE_PROBLEM = "a staged file or its review records are not those reviewed (the details could not be recorded)"


def _refuse_delivery(
    con: duckdb.DuckDBPyConnection,
    req: Request,
    by: str,
    found: list[str],
    kind: str = "reviewed_file_changed",
    *,
    moved: bool = False,
) -> ReviewError:
    """Record the refusal as a near-miss breach (``kind``) and audit it; the error says how to clear it.
    ``moved``: an interrupted delivery had already moved the files into ``releases/``, so it says so.

    The refusal is always recorded, fail closed: the problems are scrubbed (``audit.scrub``), and a
    breach or an audit entry the guard still refuses is recorded with :data:`UNRECORDABLE_PROBLEM`
    instead, so :func:`_not_refused_before` keeps refusing it (CoP 22-23d; found by review)."""
    problems = [audit.scrub(p) for p in found[:5]] or [UNRECORDABLE_PROBLEM]
    where = (
        f"the files of a delivery that was stopped are in releases/{req.agreement_id}/{req.release_id}/ and differ "
        "from those reviewed: withdrawing the request shreds them (investigate first)"
        if moved
        else "nothing was released"
    )
    remedial = (
        f"{where}; investigate who changed the staged files or the review records, "
        "withdraw the request and let the next run prepare it again for review"
    )
    breach, _ = _recorded(
        lambda shown: reg.record_breach(
            con, kind=kind, severity=0, what=f"release {req.release_id} refused at delivery: " + "; ".join(shown),
            remedial_action=remedial, detail={"release_id": req.release_id, "problems": len(found)},
        ),
        problems,
    )  # fmt: skip
    _, said = _recorded(
        lambda shown: audit.append(
            con, actor=by, role="review", action=REFUSED_ACTION, object=_object(req),
            agreement=req.agreement_id, outcome="refused",
            detail={"problems": shown, "breach_id": breach, "kind": kind},
        ),
        problems,
    )  # fmt: skip
    return ReviewError(
        f"release {req.release_id} refused: {said[0]}; withdraw it "
        f"(safehaven review withdraw {req.release_id} --by ... --comment ...) and let the next run prepare it again"
    )


def _recorded(write: Callable[[list[str]], Any], problems: list[str]) -> tuple[Any, list[str]]:
    """``write(problems)``, else ``write`` of :data:`UNRECORDABLE_PROBLEM` when the audit guard refuses
    the problems' text (``ValueError``): a refusal is recorded whatever its details say. Returns what
    ``write`` returned and the problems recorded (the only ones a message may then repeat)."""
    try:
        return write(problems), problems
    except ValueError:
        return write([UNRECORDABLE_PROBLEM]), [UNRECORDABLE_PROBLEM]


def deliver(
    con: duckdb.DuckDBPyConnection, release_id: str, *, home: Home, registry: ContractRegistry, by: str
) -> Request:
    """Deliver an approved request: verify every pinned hash, move the staged directory into
    ``releases/<agreement>/<release-id>/``, and register it, in one step (module docstring).

    ``registry``: the deployment's contracts, whose agreement file must be in force today and be
    the one the request was prepared under (:func:`_agreement_in_force`). For a
    ``two_reviewers_and_custodian`` request the caller must be the vault custodian (the CLI
    checks the vault key is on the host).
    """
    _plain_text(by=by)
    req = get(con, release_id)
    if req.state != APPROVED:
        raise ReviewError(f"request {release_id} is {req.state}; only an approved request is released")
    final = home.releases / req.agreement_id / release_id
    try:
        _refuse_links_on_the_way(req, final)
        _custodian_not_a_reviewer(con, req, by)
        _not_being_disposed_of(home, req)
    except ReviewError as refused:  # audited: who tried, and why it was refused (nothing moved)
        _recorded(
            lambda said: audit.append(
                con, actor=by.strip(), role="review", action=RELEASE_ACTION, object=_object(req),
                agreement=req.agreement_id, outcome="refused",
                detail={"reason": said[0][:500], "os_user": reg.os_login()},
            ),
            [str(refused)],
        )  # fmt: skip
        raise
    moved = final.is_dir() and not req.staging_dir.exists()  # a delivery stopped after its move
    try:
        _cleared(con, req, by, home=home, registry=registry, moved_to=final if moved else None)
    except ReviewError as exc:
        raise ReviewError(f"{exc}{_stopped_hint(con, req) if moved else ''}") from None
    if not moved:
        _move(req, final)
    if not _registered(con, release_id):
        try:
            _register(con, req, datetime.now(UTC))
        except BaseException:
            if not moved:
                os.rename(final, req.staging_dir)
            raise
    if not _delivery_audited(con, release_id):
        _audit_delivery(con, req, by)
    req = _transition(con, req, "release", by=by, why=f"released under the {req.rule} rule")
    reg.export(con, home)
    export(con, home)
    return req


def _cleared(
    con: duckdb.DuckDBPyConnection,
    req: Request,
    by: str,
    *,
    home: Home,
    registry: ContractRegistry,
    moved_to: Path | None,
) -> None:
    """Every check a delivery passes before anything moves or is registered, each refusing (audited)
    with why and what clears it: the review as the audit trail records it, the agreement in force,
    no collection of it held, the objections honoured, the files those reviewed (``moved_to``: where
    a stopped delivery moved them), and no refusal as a breach before."""
    trail = _trail(con, req)
    unaudited = _unaudited_approval(con, req, trail)
    if unaudited or trail is None:  # (the first says so whenever the second holds)
        raise _refuse_delivery(con, req, by, [str(unaudited)], kind="review_not_in_audit_trail")
    agreement = _agreement_in_force(con, req, by, registry, trail[0])
    _collections_not_held(con, req, by, registry, agreement.collections)
    _objections_still_honoured(con, req, home, by, registry)
    found = _verify_staged(con, req, moved_to)
    if found:
        raise _refuse_delivery(con, req, by, found, moved=moved_to is not None)
    _not_refused_before(con, req, by, trail[1])


def _stopped_hint(con: duckdb.DuckDBPyConnection, req: Request) -> str:
    """What a refusal of a stopped delivery adds: where its files are, and what removes them: a
    withdrawal while they are neither registered nor delivered (:func:`_undelivered_release`,
    :func:`_discard`), else only a disposal of the agreement's data, as any registered release's."""
    where = f"; the files of a delivery that was stopped are in releases/{req.agreement_id}/{req.release_id}/"
    if _undelivered_release(con, req) is not None:
        return f"{where}, neither registered nor delivered: withdrawing the request shreds them"
    return (
        f"{where}, registered in the release register: withdrawing the request does not remove them; a "
        f"disposal of the agreement's data does (safehaven dispose --agreement {req.agreement_id})"
    )


def _not_being_disposed_of(home: Home, req: Request) -> None:
    """Refuse (``ReviewError``) a delivery while an interrupted disposal's plan names the request
    among those it withdraws (its data is being destroyed: CoP 43d, 49), or while a disposal journal
    that cannot be read waits (it may). The disposal's resume withdraws it and shreds its files;
    delivered meanwhile, the disposed records left in ``releases/`` (found by review)."""
    from safehaven.dispose.journal import pending  # dispose imports this module
    from safehaven.dispose.model import DisposalError

    try:
        journal = pending(home)
    except DisposalError as exc:
        raise ReviewError(f"not delivered while a disposal is pending: {exc}") from None
    planned = (journal or {}).get("plan", {}).get("staged_requests", [])
    if req.release_id in planned:
        raise ReviewError(
            f"disposal {journal['disposal_id']} (interrupted) withdraws {req.release_id}: its data is being disposed "
            "of; complete the disposal (safehaven dispose --resume), which withdraws it and shreds its files"
        )


def _custodian_not_a_reviewer(con: duckdb.DuckDBPyConnection, req: Request, by: str) -> None:
    """Refuse (``ReviewError``) the delivery of an identifiable release (``two_reviewers_and_custodian``,
    as stored or as audited at preparation) by one of the people who approved it, by name
    (:func:`person_key`) or by the OS login their approval came from: the custodian is a third
    person, so three people stand behind what leaves identifiable (Caldicott 4, 7; SATRE 3.3.04;
    found by review: a reviewer delivered her own approval with the vault passphrase)."""
    if TWO_REVIEWERS_AND_CUSTODIAN not in (req.rule, _audited_rule(con, req)):
        return
    trail = _trail(con, req)
    approved = _audited_logins(trail[1]) if trail is not None else {}
    me, logins = person_key(by), {login for found in approved.values() for login in found}
    if me in approved or reg.os_login() in logins:
        raise ReviewError(
            f"{req.release_id} is identifiable: the vault custodian who delivers it must be a third person, not one "
            "of its two reviewers (by name or by OS login); nothing was released"
        )


def _refuse_links_on_the_way(req: Request, final: Path) -> None:
    """Refuse (``ReviewError``) a delivery whose way passes a symbolic link, or anything but a
    folder, in place of a folder the haven wrote: ``releases/<agreement>/`` (and the release's own
    folder), the staged folder or one above it (``core.files.stand_in``). Moved through it, the
    release would leave the haven's reach while the register says it is in ``releases/`` (CoP 49;
    found by review: the extract was moved outside and registered). Nothing is recorded; the
    request stays approved until a plain folder is put back and it is delivered again."""
    root = req.home.root
    for folder in (final, req.staging_dir):
        _, path = stand_in(root, folder)
        if path is not None:
            raise ReviewError(
                f"{_standing_in(root, path)}: delivering {req.release_id} through it would move the release out of "
                "the haven's reach (CoP 49). Put a plain folder back in its place, then deliver again; nothing was "
                "released"
            )


def _move(req: Request, final: Path) -> None:
    """Move the verified staged directory to ``final`` (``releases/<agreement>/<release-id>/``)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    final.parent.chmod(0o700)
    if final.exists():
        raise ReviewError(f"{final} already exists; nothing was released (move it aside after investigating)")
    os.rename(req.staging_dir, final)


def _registered(con: duckdb.DuckDBPyConnection, release_id: str) -> bool:
    """Whether the release register holds ``release_id`` (a delivery stopped after registering it)."""
    if not table_exists(con, *reg.RELEASE_REGISTER.split(".")):
        return False
    query = f"SELECT count(*) FROM {reg.RELEASE_REGISTER} WHERE release_id = ?"
    return bool(con.execute(query, [release_id]).fetchone()[0])


def _delivery_audited(con: duckdb.DuckDBPyConnection, release_id: str) -> bool:
    """Whether the trail already records ``release_id`` delivered (a delivery stopped after its
    entry): an authentic entry only, so a row written into the log cannot stand in for it."""
    entries = audit.authentic_entries(con, [RELEASE_ACTION])
    return any(e.outcome == "ok" and e.object == f"release:{release_id}" for e in entries)


def deliveries(con: duckdb.DuckDBPyConnection, agreement_id: str) -> dict[str, datetime]:
    """Each release of ``agreement_id`` the audit trail records delivered, with the time of its
    delivery entry (authentic entries only, the first if there are several): when the haven's copy
    was released, as the record says it, never as the store's release register alone dates it
    (CoP 23d, 43d)."""
    out: dict[str, datetime] = {}
    for entry in audit.authentic_entries(con, [RELEASE_ACTION]):
        if entry.outcome == "ok" and entry.agreement == agreement_id and entry.object.startswith("release:"):
            out.setdefault(entry.object.removeprefix("release:"), entry.at)
    return out


def _audit_delivery(con: duckdb.DuckDBPyConnection, req: Request, by: str) -> None:
    """The audit entry of a delivery: rule, reviewers, manifest and shape hashes, files."""
    audit.append(
        con,
        actor=by,
        role="review",
        action=RELEASE_ACTION,
        object=f"release:{req.release_id}",
        agreement=req.agreement_id,
        detail={"release_id": req.release_id, "rule": req.rule, "reviewers": approvers(con, req),
                "manifest_sha256": req.manifest_sha256, "files": len(req.files), "shape_sha256": req.shape_sha256},
    )  # fmt: skip


def _withdraw_hint(req: Request) -> str:
    return f"withdraw it (safehaven review withdraw {req.release_id} --by ... --comment ...)"


def _today() -> date:
    """The day a delivery is judged on, by every check of it (the agreement's dates, the objection
    feed's freshness and the objections in force now): the haven's (UK) day, as a run's ``today``
    (``safehaven.context``; ``safehaven.core.days``: CoP 11-14, objection dates are UK dates)."""
    return haven_today()


def _agreement_in_force(
    con: duckdb.DuckDBPyConnection, req: Request, by: str, registry: ContractRegistry, prepared: audit.Entry
) -> Agreement:
    """Refuse to deliver (audited) unless, on the day of delivery, the agreement is in force as
    the haven stands on it (``safehaven.share.approvals.Standing.in_force``: its file, the store's
    decision on those very bytes as the audit trail records it, a file's own suspension, its start
    and end dates) and its file is the one the request was prepared under (the SHA-256 its
    preparation entry pins). A suspension, an expiry or an end date brought forward takes effect
    on requests already prepared; terms changed and approved again do not carry a request
    prepared under the old ones; a request prepared before the pin was recorded has none and is
    refused the same way (fail closed). Caldicott 1; CoP 41-43. The next run prepares it again
    under the terms in force. The file judged is the caller's (``registry``), so it must also be
    the latest the haven has on record (:func:`_other_file_on_record`): an old copy of the contracts
    cannot carry a request past a suspension written in the deployment's file. Returns the
    agreement in force."""
    found = _not_in_force(con, req, registry, prepared)
    if not isinstance(found, str):
        return found
    audit.append(con, actor=by, role="review", action=RELEASE_ACTION, object=_object(req),
                 agreement=req.agreement_id, outcome="refused", detail={"reason": "agreement"})  # fmt: skip
    raise ReviewError(f"release {req.release_id} not delivered: {found}")


def _not_in_force(
    con: duckdb.DuckDBPyConnection, req: Request, registry: ContractRegistry, prepared: audit.Entry
) -> str | Agreement:
    """Why ``req`` must not leave under its agreement today, with what clears it (else the agreement: it may)."""
    from safehaven.share import approvals
    from safehaven.share.agreements import AgreementError

    try:
        standing = approvals.load_standing(con, req.agreement_id, registry.root)
    except (AgreementError, OSError) as exc:
        return (
            f"{exc}; nothing leaves under an agreement the haven cannot read (check that the contracts given, "
            f"$SAFEHAVEN_CONTRACTS for the command line, are the deployment's), or {_withdraw_hint(req)}"
        )
    ok, why = standing.in_force(_today())
    if not ok:
        return (
            f"{why}; nothing leaves under an agreement that is not in force on the day of delivery: "
            f"{_withdraw_hint(req)}, and the next run prepares it again once the agreement is in force"
        )
    if prepared.fields.get(AGREEMENT_PIN) != standing.sha256:
        return (
            "it was prepared under an earlier version of the agreement (or before requests recorded it): "
            f"{_withdraw_hint(req)}; the next run prepares it again under the current terms"
        )
    return _other_file_on_record(con, req, prepared, standing.sha256) or standing.agreement


#: the key of the agreement file's SHA-256 the caller's contracts held, in an approval's entry
AGREEMENT_SEEN = "agreement_seen_sha256"
#: audit actions that record a file of an agreement -> the key holding its SHA-256
#: (``safehaven.share.approvals`` decisions; preparations; approvals of requests)
FILE_RECORDS = {
    "approve": "sha256",
    "suspend": "sha256",
    PREPARE_ACTION: AGREEMENT_PIN,
    DECIDE_ACTION: AGREEMENT_SEEN,
}


def _agreement_seen(registry: ContractRegistry, agreement_id: str) -> str | None:
    """The SHA-256 of the agreement file the caller's contracts hold (None: none readable), recorded
    with each approval so delivery knows the versions of the file the haven has seen."""
    from safehaven.share.agreements import AgreementError, agreement_path

    try:
        return sha256_file(agreement_path(agreement_id, registry.root))
    except (AgreementError, OSError):
        return None


def _other_file_on_record(
    con: duckdb.DuckDBPyConnection, req: Request, prepared: audit.Entry, judged: str
) -> str | None:
    """Why the agreement file judged at delivery (``judged``, the caller's) is not the latest the
    haven has on record (None: it is): an authentic audit entry since the request's preparation
    records another file of the agreement (:data:`FILE_RECORDS`: a decision of the governance lead,
    a later preparation, a reviewer's approval made with the deployment's contracts). The caller's
    copy is then older or other than the deployment's (a suspension written in the file since, say),
    and nothing leaves until the request is prepared afresh (Caldicott 1; CoP 41-43; fail closed;
    found by review)."""
    for entry in audit.authentic_entries(con, list(FILE_RECORDS)):
        recorded = entry.fields.get(FILE_RECORDS[entry.action])
        if entry.seq > prepared.seq and entry.agreement == req.agreement_id and recorded not in (None, judged):
            return (
                f"the haven has recorded another file of agreement {req.agreement_id} since {req.release_id} was "
                "prepared (the contracts given hold an older or other copy: check they are the deployment's, "
                f"$SAFEHAVEN_CONTRACTS for the command line); {_withdraw_hint(req)} and let the next run prepare it "
                "again under the terms in force"
            )
    return None


def _collections_not_held(
    con: duckdb.DuckDBPyConnection, req: Request, by: str, registry: ContractRegistry, collections: list[str]
) -> None:
    """Refuse to deliver (audited, not a breach) while a collection of the agreement is held
    (``safehaven.intake.validation.refuse_held``: its sender's latest drop was refused, or landed
    but not validated), as preparation refuses: never records of a collection whose sender's latest
    drop the haven could not take (CoP 7-9; found by review). A collection the contracts given do
    not describe is refused too (fail closed). It clears once a corrected drop passes validation;
    the request stays approved until then."""
    from safehaven.intake.validation import CollectionHeld, refuse_held

    try:
        refuse_held(con, registry, collections, "delivery")
    except CollectionHeld as exc:
        audit.append(con, actor=by, role="review", action=RELEASE_ACTION, object=_object(req),
                     agreement=req.agreement_id, outcome="refused", detail={"reason": "collection_held"})  # fmt: skip
        raise ReviewError(
            f"release {req.release_id} not delivered: {exc}; it stays approved and is delivered (deliver it again) "
            f"once a corrected drop passes validation, or {_withdraw_hint(req)}"
        ) from None


def _not_refused_before(con: duckdb.DuckDBPyConnection, req: Request, by: str, since: list[audit.Entry]) -> None:
    """Refuse for ever (audited) a request whose delivery the trail records refused as a near-miss
    breach since its latest preparation (a staged file, or its review records, not those
    reviewed: :func:`_refuse_delivery`): bytes put back after the refusal prove nothing (the
    extract may have been copied out meanwhile), so it must be withdrawn and prepared afresh
    (CoP 23d; fail closed until a person resolves it; found by review)."""
    refused = [e for e in since if e.action == REFUSED_ACTION and e.outcome == "refused" and "breach_id" in e.fields]
    if not refused:
        return
    breach = refused[0].fields["breach_id"]
    audit.append(con, actor=by, role="review", action=RELEASE_ACTION, object=_object(req),
                 agreement=req.agreement_id, outcome="refused",
                 detail={"reason": "refused_before", "breach_id": breach})  # fmt: skip
    raise ReviewError(
        f"release {req.release_id} refused: its delivery was refused before as a breach (breach {breach}: a "
        "staged file or its review records were not those reviewed), and a request so refused never leaves, "
        f"even once its files match again; {_withdraw_hint(req)} and let the next run prepare it afresh for review"
    )


def _objections_still_honoured(
    con: duckdb.DuckDBPyConnection, req: Request, home: Home, by: str, registry: ContractRegistry
) -> None:
    """Refuse to deliver (audited) a record-level request while the objection feed is blocked or
    stale now (under any basis, as at preparation: a faulty, pending or tampered register,
    ``safehaven.protect.feed``), once someone in it has a type 1 objection registered since it was
    prepared (whatever the legal basis: GP records of a type 1 objector never leave, guide Rule
    4B), and, prepared under the opt-out, once someone in it has opted out since: its files were
    filtered against the register as it then stood (NDOP; fail closed). The next run prepares it
    again from the register as it stands. The deployment's contracts (``registry``) are given, as
    at preparation: incoming/ is scanned for unknown entries (``feed.sync_faults``) and an
    objections file waiting for its control file blocks it (``feed.awaiting_control``)."""
    from safehaven.protect import feed

    if req.identifiability == "anonymised":  # not record level: the opt-outs do not cover it (guide Rule 4C)
        return
    decision = _decision(con, req)
    try:  # the feed sound and fresh under any basis, as at preparation (``feed.release_guard``)
        feed.require_sound_feed(con, home, _today(), agreement_days=_window(decision), collections=registry.contracts)
        _no_type1_since(con, req)
        if decision.get("applied") is not False:  # only a recorded "does not apply" skips: a lost one checks
            _no_optout_since(con, req)
    except feed.ObjectionFeedBlocked as exc:
        audit.append(con, actor=by, role="review", action="release", object=_object(req),
                     agreement=req.agreement_id, outcome="refused", detail={"reason": "objections"})  # fmt: skip
        raise ReviewError(
            f"release {req.release_id} not delivered: {exc}; withdraw it (safehaven review withdraw "
            f"{req.release_id} --by ... --comment ...) and let the next run prepare it again"
        ) from None


def _decision(con: duckdb.DuckDBPyConnection, req: Request) -> dict[str, Any]:
    """The opt-out decision stored with the request ({} when lost or emptied: checked as if the
    opt-out applied, fail closed)."""
    return _stored(con, req, "optout_decision")


def _window(decision: dict[str, Any]) -> int:
    """The freshness window the request was prepared under (the agreement's, else the haven's,
    ``safehaven.protect.feed.window_days``); the haven's default for a request prepared before
    requests stored one; one day (the strictest) for a stored value that is not whole days from
    one to :data:`MAX_WINDOW_DAYS` (odd input fails closed)."""
    from safehaven.protect.feed import DEFAULT_WINDOW_DAYS

    if WINDOW_KEY not in decision:
        return DEFAULT_WINDOW_DAYS
    days = decision[WINDOW_KEY]
    ok = isinstance(days, int) and not isinstance(days, bool) and 1 <= days <= MAX_WINDOW_DAYS
    return days if ok else 1


def _members_objecting(con: duckdb.DuckDBPyConnection, req: Request, objectors: str) -> int:
    members = _member_table(con, req.release_id)
    return con.execute(
        f"SELECT count(DISTINCT pid) FROM {members} WHERE release_id = ? AND pid IN ({objectors})",
        [req.release_id],
    ).fetchone()[0]


def _no_optout_since(con: duckdb.DuckDBPyConnection, req: Request) -> None:
    """Members with a national opt-out in force now were not withheld when it was prepared."""
    from safehaven.protect.feed import ObjectionFeedBlocked
    from safehaven.protect.objections import NATIONAL_OPT_OUT, objectors_sql

    since = _members_objecting(con, req, objectors_sql(_today(), (NATIONAL_OPT_OUT,)))
    if since:
        raise ObjectionFeedBlocked(f"{since} person(s) in it have opted out since it was prepared")


def _no_type1_since(con: duckdb.DuckDBPyConnection, req: Request) -> None:
    """Members with a type 1 objection in force now that was not in force, as the register stood,
    when the request was prepared: their GP records may be in its files (a type 1 objector of
    before then had none prepared: ``safehaven.protect.haven``)."""
    from safehaven.protect.feed import ObjectionFeedBlocked
    from safehaven.protect.objections import TYPE1, objectors_sql

    then = objectors_sql(req.prepared_at.date(), (TYPE1,), known_at=req.prepared_at)
    since = _members_objecting(con, req, f"{objectors_sql(_today(), (TYPE1,))} EXCEPT {then}")
    if since:
        raise ObjectionFeedBlocked(
            f"{since} person(s) in it have a type 1 objection registered since it was prepared "
            "(their GP records must not leave the practice)"
        )


def _register(con: duckdb.DuckDBPyConnection, req: Request, released_at: datetime) -> None:
    """Register row, members and opt-out decision, in one transaction."""
    row = json.loads(
        con.execute(f"SELECT register_row FROM {REQUESTS} WHERE release_id = ?", [req.release_id]).fetchone()[0]  # type: ignore[index]
    )
    decision = json.loads(
        con.execute(f"SELECT optout_decision FROM {REQUESTS} WHERE release_id = ?", [req.release_id]).fetchone()[0]  # type: ignore[index]
    )
    row.update(released_at=released_at.isoformat(), review_rule=req.rule,
               reviewed_by="; ".join(approvers(con, req)))  # fmt: skip
    reg.ensure_tables(con)
    cols = list(row)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            f"INSERT INTO {reg.RELEASE_REGISTER} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
            [row[c] for c in cols],
        )
        withheld = decision.pop("withheld")
        decision.pop(WINDOW_KEY, None)
        optouts.record_decision(con, release_id=req.release_id, agreement_id=req.agreement_id,
                                decision=optouts.OptOutDecision(**decision), withheld=withheld)  # fmt: skip
        con.execute(
            f"INSERT INTO {reg.RELEASE_MEMBERS} SELECT release_id, agreement_id, pid, CAST(? AS TIMESTAMPTZ) "
            f"FROM {REQUEST_MEMBERS} WHERE release_id = ?",
            [released_at.isoformat(), req.release_id],
        )
        con.execute(f"DELETE FROM {REQUEST_MEMBERS} WHERE release_id = ?", [req.release_id])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def export(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    """Write the requests (hashes, counts, decisions; no contents) to ``registers/release_requests.*``."""
    ensure_tables(con)
    reg.export_table(con, home, REQUESTS, "release_requests", "prepared_at, release_id")
