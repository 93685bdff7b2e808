"""The objection feed fails closed: no objector's record leaves because a feed was odd or late.

Objections are a *restriction feed*: a missing objection lets a record out that must not
leave, so an odd objections file must stop record-level releases, not just itself (CoP
11-14; guide Rule 4B; the "rules for sharing" page: the national data opt-out is applied
against a current list). Rules:

* **Valid rows are honoured** even when other rows of the same file are bad
  (``safehaven.intake.validation``: for a contract of kind ``objections`` the valid rows of
  every batch go on, whatever its verdict). Honouring too much is safe; too little is not.
* **A standing block.** A *fault* is an objections file quarantined whole at ingest (its
  ``quarantine/objections/<file>.reason.json``) or a landed objections batch with rejected rows
  (``landing.objections_rejected``). ``sync_faults`` records each in
  ``governance.objection_feed_faults`` (file name, SHA-256, rule ids, rows; never a value), once.
  Each *arrival* in quarantine is a fault of its own (its quarantined name and time): the same bytes
  quarantined again (an empty file, a header-only file, an unreadable file sent again) are a new
  fault, whatever was decided about the earlier one. A file in ``quarantine/objections/`` with no
  reason file (the haven stopped, or its disk filled, between moving it and writing why) is a fault
  (``feed.reason_missing``), and so is a file received in a content collection's folder, quarantined
  there, that may be an objections file (``feed.misrouted``; ingest's ``objections_header`` flag,
  whichever rule refused it: ``safehaven.intake.ingest.may_be_objections``): one with a line naming
  the objections contract's own column ``objection_type``, and any the haven could not read as that
  collection's file (a folder, a link, a compressed or binary file, UTF-16 with no byte-order mark,
  a title line above the header: the haven cannot tell those hold no objections). Moved into
  ``incoming/objections/`` it lands, and a person records that with ``--corrected-by``, or a person
  records a decision that it holds none; rows it lands with rejected are a fault of their own, a
  file fault of the same SHA-256 never standing in for a batch's. In a content collection's
  quarantine, as in ``quarantine/objections/``, a file with no reason file and a reason file the
  feed cannot read are faults too: the feed cannot tell they are no objections file. Any entry
  directly in ``incoming/`` that is no known collection's folder is never read, so it is a fault
  (``feed.unknown_incoming``), found by the checks that have the deployment's contracts registry
  (``sync_faults``; never another registry's collections). Only the haven's reason files are read as
  reasons: a received file named ``*.reason.json`` is quarantined with a reason file of its own, and
  is not one. While any fault is unresolved, or an objections batch is landed but not yet validated
  and registered (or a file received again not yet registered as a restatement),
  ``require_sound_feed`` refuses every record-level release, in this run and every later one.
  Anonymised aggregates are not blocked: the opt-out does not cover them (guide Rule 4C).
* **Clearing a fault** needs a person, and only a person: ``safehaven objections resolve
  <file> --by <name> --reason <text>`` records a decision (``resolve``, audited). A later file
  of the same name never clears a fault by itself: the faulty file could not be read, so the
  haven cannot tell a re-sent correction from the sender's next routine file (a sender using
  one fixed name every day would otherwise clear every fault with its next file, and the
  lost objections would never be registered). When a later objections file of that name has
  landed and validated with no rejected row, the refusal names it (file name, SHA-256 prefix,
  the day it landed) and gives the command recording that it corrects the fault: ``safehaven
  objections resolve <fault sha256> --corrected-by <file sha256> --by <name> --reason <text>``
  (resolution ``corrected_file``, audited; the haven checks the file landed after the fault
  and validated cleanly). Until then the block stands. A resolution counts only while it is on
  record: an ``objections.resolve`` entry of the audit trail whose own hash verifies
  (:func:`resolved_on_record`); a fault marked resolved in the store by SQL, or by a resolution
  killed before its entry, still blocks (and ``resolve`` takes it again).
* **Freshness.** The register's *refresh date* is the latest day an objections file landed
  and was validated (its rows honoured; not a drop ``safehaven objections record`` wrote,
  :func:`recorded_drop_name`: one person's objection says nothing of the rest of the list, and
  counting it let a hand-recorded objection make a months-old list look current), or the
  latest clean objections file was received again unchanged and registered as a restatement
  (an unchanged daily list is still a current list; an older file sent again is not: files
  landed after it hold newer statements; ``safehaven.protect.objections.register_restatements``),
  or the latest date a person attested that the
  register matches the current list (``safehaven objections refreshed --as-of``,
  ``attest_refresh``; only attestations on record in the audit trail count, :func:`attested_on`,
  not a date added to the store's table). A record-level release refuses when that date is older than the
  agreement's ``objections_max_age_days`` or else the haven's window (``haven_days``: the
  ``SafeHavenResource`` field ``objections_max_age_days``, or
  ``$SAFEHAVEN_OBJECTIONS_MAX_AGE_DAYS`` read by the CLI; default ``DEFAULT_WINDOW_DAYS`` =
  31 days), or when there is no refresh at all. The
  release register and manifest state the refresh date as the date of the opt-out list
  applied.
* **What a restatement waits for.** A file sent again is registered after every objections
  file that arrived before it (``safehaven.protect.objections.due_restatements``), including
  one still in ``incoming/objections/`` (:func:`waiting_since`). An entry there the haven has
  already judged and refused, but could not move to quarantine (its not-moved reason file,
  ``safehaven.intake.ingest._left_in_incoming``, written since the entry arrived, records that
  very entry: its inode, size and times as judged and, when its bytes were read, their SHA-256,
  which the feed hashes again; never its shown name alone, which entries share), is not
  waited for: nothing of it will ever be registered, so no later statement can be overtaken by
  it, and its fault blocks releases on its own until a person resolves it. Waiting for it would
  hold every later restatement, every GP haven step and every record-level release for ever
  (fail closed, never stuck). An entry not yet judged (still arriving, intake not yet run on it,
  sent again under that name, replaced or changed after it was judged, or unreadable) is still
  waited for. An objections file waiting for its control file (the objections contract says
  ``control: manifest``; :func:`awaiting_control`) is never read while its control file does not
  come, so it refuses record-level releases (and the GP haven step) on its own, and a restatement
  behind it is named as waiting for it: each refusal names the control file to ask the sender for.
  While anything is pending, the refusal names it by kind (:func:`describe_pending`: landed and not
  validated, valid rows not registered, restatements waiting and the shown name of what they
  wait for, and why) and the step that clears it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb

from safehaven.core import audit, schema
from safehaven.core.home import Home
from safehaven.core.registers import current_actor
from safehaven.core.store import table_exists
from safehaven.intake import batch_seal, ingest
from safehaven.intake import control as totals
from safehaven.intake.contracts import Contract
from safehaven.intake.ingest import (
    BATCHES,
    NOT_MOVED_NAME,
    OBJECTIONS_FLAG,
    OBJECTIONS_MARK,
    OBJECTIONS_RULE,
    REASON_SUFFIX,
    arrived,
)
from safehaven.intake.refusals import FileRejected
from safehaven.protect import register_seal
from safehaven.protect.objections import RESTATEMENTS, unregistered_sql
from safehaven.protect.objections import TABLES as REGISTER_TABLES

COLLECTION = "objections"
#: the audit actions of a person's decisions on the feed, and the object naming a fault's file
RESOLVE_ACTION, REFRESH_ACTION = "objections.resolve", "objections.refreshed"
FAULT_OBJECT = "objections_file:"
FAULTS = schema.OBJECTION_FEED_FAULTS
REFRESHES = schema.OBJECTION_REFRESHES
#: The haven's freshness window for the objection register, in days (NDOP: a current list).
DEFAULT_WINDOW_DAYS = 31
#: How ``safehaven objections record`` names the drop it writes: one person's statement, not the
#: current list, so it never refreshes the register (module docstring, "Freshness").
RECORDED_PREFIX = "objections_recorded_"
#: hex characters of a file's SHA-256 shown in a refusal: enough to name it (``objections resolve``
#: takes 12 or more), and a whole hex token, so the audit guard never mistakes its digits for an
#: NHS number (``safehaven.core.audit``)
SHA_SHOWN = 16
#: The validation refusal's reason file (row-level; counted from the rejected table instead). A batch
#: refused because the two checks disagree (``batch.checks_disagree``) is a file-level fault: the
#: rejected table cannot be trusted to list its bad rows.
_BATCH_RULE = "batch.tolerance"
#: what ``--corrected-by`` takes: a file's SHA-256, or 12 or more of its first hex characters
_SHA_KEY = re.compile(r"[0-9a-f]{12,64}")
#: a landed file corrects a fault only if it is not the faulty file itself; a misrouted objections
#: file moved into incoming/objections/ lands with its own bytes, and that is its correction
_NOT_ITSELF = "({f}level = 'misrouted' OR {batch} <> coalesce({f}file_sha256, {f}sha256))"
#: a file's SHA-256, as ingest records it
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: the feed's own rule ids: a reason file that cannot be read, a quarantined file with no reason
#: file, an objections file received in a content collection's folder (its header names
#: ``OBJECTIONS_MARK``, ``safehaven.intake.ingest.objections_header``), an entry of incoming/ that
#: is no collection's folder
REASON_UNREADABLE, REASON_MISSING, MISROUTED = "feed.reason_unreadable", "feed.reason_missing", "feed.misrouted"
#: the steps that clear what is pending (module docstring, "What a restatement waits for")
RUN_INTAKE = "run intake and the objection register again (safehaven run)"
RUN_REGISTER = "run the register step (safehaven run, or governance/objection_register in the Dagster UI)"
UNKNOWN_INCOMING = "feed.unknown_incoming"
#: the faults a batch has of its own (rejected rows, refused at validation): a fault of another
#: level keyed by the same SHA-256 (the misrouted file moved into incoming/objections/, which lands
#: as a batch of that id) never stands in for them
_BATCH_LEVELS = "('rows', 'batch')"


class ObjectionFeedBlocked(Exception):
    """Record-level releases are blocked: the objection feed is incomplete or stale (one line)."""


@dataclass(frozen=True)
class Fault:
    """One unresolved fault of the feed: file, SHA-256, level, rule ids and rows (no values).

    ``later_clean_sha256`` and ``later_clean_on`` (ISO date) name the first later objections
    file of the same name that landed and validated with no rejected row, and
    ``later_clean_files`` counts such files: a candidate correction a person must confirm
    (module docstring, "Clearing a fault"); None and 0 when there is none.
    """

    file_name: str
    sha256: str
    level: str
    rules: str
    rows: int | None
    later_clean_sha256: str | None = None
    later_clean_on: str | None = None
    later_clean_files: int = 0
    #: the file's own SHA-256 when the fault's key (``sha256``) is another's: the same bytes
    #: quarantined again, each arrival a fault of its own
    file_sha256: str | None = None


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    """The fault log and the refresh attestations, and the objection register and batch register
    they stand with (made empty on a haven that has landed nothing yet, so no query here special-cases it)."""
    schema.ensure(con, FAULTS, REFRESHES, *REGISTER_TABLES, BATCHES)


@dataclass(frozen=True)
class _Arrival:
    """One arrival of a file in a quarantine folder that is a fault of the feed (module docstring,
    "A standing block"): the file's SHA-256 (or a stand-in naming its reason file), its shown
    name, the rule, when it arrived, and ``arrival``, which names that arrival alone (its
    quarantined name and time), so the same bytes quarantined again are a fault of their own."""

    sha: str
    name: str
    rule: str
    arrived: str
    arrival: str | None
    level: str = "file"


def _has_reason(path: Path) -> bool:
    """Whether a quarantined entry has its reason file: the haven's own (:func:`_is_reason`), not a
    received file that took that name (which has a reason file of its own; found by review)."""
    reason = path.with_name(path.name + REASON_SUFFIX)
    return os.path.lexists(reason) and _is_reason(reason)


def _is_reason(path: Path) -> bool:
    """A reason file of the haven's: named ``*.reason.json`` and not a received file quarantined
    under that name (which has a reason file of its own), so a sender cannot write one."""
    return path.name.endswith(REASON_SUFFIX) and not os.path.lexists(path.with_name(path.name + REASON_SUFFIX))


def _changed_at(path: Path) -> str:
    """When ``path`` was put where it is (its inode change time; a rename sets it), ISO."""
    return datetime.fromtimestamp(os.lstat(path).st_ctime, UTC).isoformat()


def _reason(path: Path) -> dict | None:
    """The reason file's record, or None when it cannot be read as one."""
    try:
        reason = json.loads(path.read_text())
        return reason if isinstance(reason, dict) and {"sha256", "file", "rule"} <= reason.keys() else None
    except (OSError, ValueError):
        return None


def _from_reason(path: Path) -> _Arrival:
    """The fault of one reason file; an unreadable reason is a fault too."""
    reason = _reason(path)
    if reason is None:
        return _unexplained(path, "unreadable", REASON_UNREADABLE)
    return _Arrival(
        str(reason["sha256"]), str(reason["file"]), str(reason["rule"]), _arrived(reason, path), _arrival(reason, path)
    )


def _arrived(reason: dict, path: Path) -> str:
    """When a reason's file arrived in quarantine: the time it records, else its reason file's."""
    return str(reason.get("quarantined_at") or _changed_at(path))


def _arrival(reason: dict, path: Path) -> str | None:
    """Which arrival a reason file records: the quarantined name and time; the reason file's name for
    a file left in incoming/ (its reason is written again by each run that meets that entry); None
    for a batch refused at validation (no ``quarantined_as``: a landed batch is one arrival, its id)."""
    if "quarantined_as" not in reason:
        return None
    moved = reason["quarantined_as"]
    return f"{moved}@{reason.get('quarantined_at')}" if moved else path.name


def _file_faults(quarantine: Path) -> list[_Arrival]:
    """Each file quarantined whole (from its reason file), and each file in quarantine with no
    reason file (the haven stopped, or its disk filled, between moving it and writing why)."""
    found = []
    for path in sorted(quarantine.iterdir()) if quarantine.is_dir() else []:
        if _is_reason(path):
            found.append(_from_reason(path))
        elif not _has_reason(path):
            found.append(_unexplained(path, "reason_missing", REASON_MISSING))
    return [f for f in found if f.rule != _BATCH_RULE]


def _misrouted(home: Home) -> list[_Arrival]:
    """Files received in a content collection's folder and quarantined there that may hold
    objections (module docstring, "A standing block"): each a fault, or any objections in them are
    never registered."""
    folders = sorted(home.quarantine.iterdir()) if home.quarantine.is_dir() else []
    return [f for folder in folders if folder.name != COLLECTION and folder.is_dir() for f in _misrouted_in(folder)]


def _objections_header(details: object) -> bool:
    """Whether a reason's details show a file that may be an objections file: ingest's flag
    (``OBJECTIONS_FLAG``, ``safehaven.intake.ingest.may_be_objections``, recorded whichever rule
    refused it), or, in a reason written before that flag, ``OBJECTIONS_MARK`` among the
    unexpected columns."""
    if not isinstance(details, dict):
        return False
    return details.get(OBJECTIONS_FLAG) is True or OBJECTIONS_MARK in (details.get("extra") or [])


def _misrouted_in(folder: Path) -> list[_Arrival]:
    """The faults of a content collection's quarantine ``folder``: each reason whose file may be an
    objections file (:func:`_objections_header`), and, as in quarantine/objections/, each reason the
    feed cannot read and each file with no reason file (the haven stopped, or its disk filled,
    between moving it and writing why): the feed cannot tell those are no objections file (fail
    closed). Their keys and names carry the folder's name."""
    found = []
    for path in sorted(folder.iterdir()):
        if not _is_reason(path):
            if not _has_reason(path):
                found.append(_unexplained(path, "reason_missing", REASON_MISSING, folder.name))
            continue
        reason = _reason(path)
        if reason is None:
            found.append(_unexplained(path, "unreadable", REASON_UNREADABLE, folder.name))
        elif _objections_header(reason.get("details")) or _judged_before(reason):
            arrival = f"{folder.name}/{_arrival(reason, path) or path.name}"
            rule = f"{MISROUTED} in incoming/{folder.name}/"
            found.append(
                _Arrival(str(reason["sha256"]), str(reason["file"]), rule, _arrived(reason, path), arrival, "misrouted")
            )
    return found


def _judged_before(reason: dict) -> bool:
    """Whether a content file's reason was written by an earlier rule (no ``OBJECTIONS_RULE`` in its
    details), which took files the haven cannot read for no objections file (review 57): the file
    may be an objections file until a person looks (fail closed). A batch refused at validation
    (no ``quarantined_as``) was read as its collection's, so it is not."""
    details = reason.get("details")
    return "quarantined_as" in reason and not (isinstance(details, dict) and OBJECTIONS_RULE in details)


def _unexplained(path: Path, kind: str, rule: str, folder: str | None = None) -> _Arrival:
    """The fault of a quarantined entry with no reason the feed can read (``kind``: none, or one it
    cannot read), keyed by its shown name and arrival: in quarantine/objections/ by its name alone,
    in a content collection's quarantine (:func:`_misrouted_in`) by ``folder`` and name."""
    shown = audit.shown_name(path.name)
    at, named = _changed_at(path), f"{folder}/{shown}" if folder else shown
    return _Arrival(f"{kind}:{named}", named, rule, at, f"{named}@{at}")


def _unknown_incoming(home: Home, collections: Iterable[str]) -> list[_Arrival]:
    """Each entry directly in incoming/ that is not a known collection's folder (a file at
    incoming/x.csv, a mistyped folder such as incoming/Objections/, a hidden file): the haven never
    reads it, so objections in it would never be registered; a fault until moved into the right
    collection's folder or removed, or resolved (CoP 11-14; fail closed). Only the names are
    listed (nothing is read); the haven itself writes nothing there but the collections' folders,
    so nothing is excused."""
    known = set(collections)
    entries = sorted(home.incoming.iterdir()) if home.incoming.is_dir() else []
    found = []
    for path in entries:
        if path.name in known and path.is_dir():
            continue
        try:
            shown, at = audit.shown_name(path.name), _changed_at(path)
        except FileNotFoundError:  # removed since the listing (by its sender): no longer there to report
            continue
        arrival = f"incoming/{shown}@{at}"
        found.append(_Arrival(f"{UNKNOWN_INCOMING}:{shown}", shown, UNKNOWN_INCOMING, at, arrival))
    return found


def _record(con: duckdb.DuckDBPyConnection, fault: _Arrival) -> None:
    """Record one arrival's fault once (module docstring, "A standing block"). A batch refused at
    validation (no arrival) is recorded once, by its id; any other arrival by :func:`_record_arrival`."""
    if fault.arrival is None:
        con.execute(
            f"INSERT INTO {FAULTS} (sha256, file_name, level, rules, arrived_at, detected_at, file_sha256) "
            "SELECT ?, ?, ?, ?, CAST(? AS TIMESTAMPTZ), now(), ? "
            f"WHERE NOT EXISTS (SELECT 1 FROM {FAULTS} WHERE sha256 = ?)",
            [fault.sha, fault.name, fault.level, fault.rule, fault.arrived, fault.sha, fault.sha],
        )
        return
    _adopt(con, fault)
    _record_arrival(con, fault)


def _adopt(con: duckdb.DuckDBPyConnection, fault: _Arrival) -> None:
    """A fault an older haven recorded by its file's SHA-256 alone (no arrival) is this arrival when
    its file and time are the same (an unreadable reason's: its name), so its resolution still counts."""
    con.execute(
        f"UPDATE {FAULTS} SET arrival = ?, file_sha256 = sha256 WHERE arrival IS NULL AND level = ? AND sha256 = ? "
        "AND (arrived_at = TRY_CAST(? AS TIMESTAMPTZ) OR starts_with(sha256, 'unreadable:')) "
        f"AND NOT EXISTS (SELECT 1 FROM {FAULTS} WHERE arrival = ?)",
        [fault.arrival, fault.level, fault.sha, fault.arrived, fault.arrival],
    )


def _record_arrival(con: duckdb.DuckDBPyConnection, fault: _Arrival) -> None:
    """A new arrival's fault. Its key is the file's SHA-256 when no fault has it yet (as every fault's
    was before arrivals were told apart), else a SHA-256 of the file's and the arrival's names (also
    the key of a fault with no file hash: a stand-in naming its reason file is no key to type)."""
    real = bool(_SHA256.fullmatch(fault.sha))
    own = hashlib.sha256(f"{fault.sha}\n{fault.arrival}".encode()).hexdigest()
    con.execute(
        f"INSERT INTO {FAULTS} (sha256, file_name, level, rules, arrived_at, detected_at, arrival, file_sha256) "
        f"SELECT CASE WHEN EXISTS (SELECT 1 FROM {FAULTS} WHERE sha256 = $first) THEN $own ELSE $first END, "
        "$name, $level, $rule, CAST($arrived AS TIMESTAMPTZ), now(), $arrival, $file "
        f"WHERE NOT EXISTS (SELECT 1 FROM {FAULTS} WHERE arrival = $arrival)",
        {
            "first": fault.sha if real else own,
            "own": own,
            "file": fault.sha if real else None,
            "name": fault.name,
            "level": fault.level,
            "rule": fault.rule,
            "arrived": fault.arrived,
            "arrival": fault.arrival,
        },
    )


def sync_faults(con: duckdb.DuckDBPyConnection, home: Home, collections: Iterable[str] | None = None) -> int:
    """Record faults not yet known (file-level from quarantine, one per arrival; misrouted files
    from the content collections' quarantine; row-level from the rejected table; refused batches;
    and entries of incoming/ that are no collection's folder, only when ``collections`` names the
    deployment's collections).

    Without ``collections`` (delivery, ``safehaven.share.review.deliver``, which has no registry at
    hand) incoming/ is not scanned: any other registry (the packaged contracts') would take a
    deployment's own collection folder for an unknown entry, a spurious fault after every night.
    Those callers rely on the faults already recorded by the checks that have the deployment's
    registry (every release's guard, re-identification, the objection_feed asset, the objections
    CLI), which still block while unresolved (fail closed).

    Returns the number of new faults. It never clears one: only a person does (``resolve``).
    """
    ensure_tables(con)
    before = _scalar(con, f"SELECT count(*) FROM {FAULTS}")
    unknown = _unknown_incoming(home, collections) if collections is not None else []
    for fault in _file_faults(home.quarantine_for(COLLECTION)) + _misrouted(home) + unknown:
        _record(con, fault)
    if table_exists(con, "landing", f"{COLLECTION}_rejected"):
        _record_batch_faults(con, _row_faults_sql())
    # a refused batch is a fault in its own right, from the batch register (committed with the
    # verdict), not only from its reason file, which is written after that commit
    _record_batch_faults(
        con,
        "SELECT batch_id AS batch, file_name, 'batch' AS level, 'batch.refused' AS rules, invalid_rows AS n, "
        f"landed_at FROM {BATCHES} WHERE collection = '{COLLECTION}' AND status = 'refused'",
    )
    return _scalar(con, f"SELECT count(*) FROM {FAULTS}") - before


def _row_faults_sql() -> str:
    """SQL (batch, file_name, level, rules, n, landed_at): each objections batch with rejected rows,
    its rules the distinct rules its rows failed, sorted (NULL where they name none). The rules
    are gathered from distinct (batch, rule) pairs, never as a list of every rejected row's
    rules: DuckDB cannot spill a list being built, and this reads every rejected row ever
    landed (found by review: 10M rejected rows failed under a 1 GiB limit)."""
    rejected = f"landing.{COLLECTION}_rejected"
    return (
        "SELECT c._batch AS batch, b.file_name, 'rows' AS level, x.rules, c.n, b.landed_at "
        f"FROM (SELECT _batch, count(*) AS n FROM {rejected} GROUP BY _batch) c "
        f"JOIN {BATCHES} b ON b.batch_id = c._batch "
        "LEFT JOIN (SELECT _batch, array_to_string(list_sort(list(rule)), ', ') AS rules "
        f"FROM (SELECT DISTINCT _batch, rule FROM (SELECT _batch, unnest(failed_rules) AS rule FROM {rejected})) "
        "WHERE rule IS NOT NULL GROUP BY _batch) x ON x._batch = c._batch"
    )


def _record_batch_faults(con: duckdb.DuckDBPyConnection, found_sql: str) -> None:
    """Record the batch faults ``found_sql`` lists (batch, file_name, level, rules, n, landed_at)
    that the batch has not yet (a rows or batch fault of its, ``_BATCH_LEVELS``): a fault of
    another level with the same key (a misrouted file's, moved in and landed) does not stand in
    for them (CoP 11-14; fail closed). Keyed by the batch id, or, when a fault has that key, by
    a SHA-256 of it and the level (``file_sha256`` then names the batch)."""
    con.execute(
        f"INSERT INTO {FAULTS} (sha256, file_name, level, rules, rows, arrived_at, detected_at, file_sha256) "
        f"SELECT CASE WHEN EXISTS (SELECT 1 FROM {FAULTS} f WHERE f.sha256 = x.batch) "
        "THEN sha256(x.batch || chr(10) || x.level) ELSE x.batch END, "
        "x.file_name, x.level, x.rules, x.n, x.landed_at, now(), x.batch "
        f"FROM ({found_sql}) x WHERE NOT EXISTS (SELECT 1 FROM {FAULTS} f WHERE "
        f"coalesce(f.file_sha256, f.sha256) = x.batch AND f.level IN {_BATCH_LEVELS})"
    )


def _clean_batches_sql(con: duckdb.DuckDBPyConnection) -> str:
    """Objections batches that landed, were accepted and have no rejected row (batch_id, file_name, landed_at)."""
    if not table_exists(con, *BATCHES.split(".")):
        return "SELECT NULL::VARCHAR AS batch_id, NULL::VARCHAR AS file_name, NULL::TIMESTAMPTZ AS landed_at LIMIT 0"
    rejected = (
        f"SELECT _batch FROM landing.{COLLECTION}_rejected"
        if table_exists(con, "landing", f"{COLLECTION}_rejected")
        else "SELECT NULL::VARCHAR AS _batch WHERE false"
    )
    return (
        f"SELECT batch_id, file_name, landed_at FROM {BATCHES} WHERE collection = '{COLLECTION}' "
        f"AND status = 'accepted' AND validated_at IS NOT NULL AND batch_id NOT IN ({rejected})"
    )


def resolved_on_record(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The faults (SHA-256) whose resolution is on record: an ``objections.resolve`` entry of the
    audit trail whose own hash verifies. A fault marked resolved in the store without one (set
    with SQL by someone holding the store key, or a resolution killed before its entry) is still
    unresolved (module docstring, "Clearing a fault")."""
    entries = audit.authentic_entries(con, [RESOLVE_ACTION])
    return [e.object.removeprefix(FAULT_OBJECT) for e in entries if e.object.startswith(FAULT_OBJECT)]


def unresolved(con: duckdb.DuckDBPyConnection) -> list[Fault]:
    """Unresolved faults, oldest first, each with the later clean file of its name, if any
    (``Fault``); resolved ones count only with their resolution on record (:func:`resolved_on_record`)."""
    ensure_tables(con)
    rows = con.execute(
        "SELECT f.file_name, f.sha256, f.level, f.rules, f.rows, arg_min(c.batch_id, c.landed_at), "
        "strftime(min(c.landed_at), '%Y-%m-%d'), count(c.batch_id), nullif(f.file_sha256, f.sha256) "
        f"FROM {FAULTS} f LEFT JOIN ({_clean_batches_sql(con)}) c ON c.file_name = f.file_name "
        f"AND c.landed_at > f.arrived_at AND {_NOT_ITSELF.format(f='f.', batch='c.batch_id')} "
        "WHERE (f.resolved_at IS NULL OR NOT list_contains(?::VARCHAR[], f.sha256)) "
        "GROUP BY f.file_name, f.sha256, f.level, f.rules, f.rows, f.file_sha256, f.arrived_at "
        "ORDER BY f.arrived_at, f.sha256",
        [resolved_on_record(con)],
    ).fetchall()
    return [Fault(*r) for r in rows]


@dataclass(frozen=True)
class Pending:
    """What keeps objections out of the register, by kind (module docstring, "What a restatement
    waits for"): batches landed and not validated, validated batches with valid rows not
    registered, and files received again whose restatement is not registered."""

    landed: int = 0
    unregistered: int = 0
    restated: int = 0

    @property
    def total(self) -> int:
        return self.landed + self.unregistered + self.restated


def pending(con: duckdb.DuckDBPyConnection) -> Pending:
    """The objections batches and restatements not yet in the register, by kind (:class:`Pending`)."""
    if not table_exists(con, *BATCHES.split(".")):
        return Pending()
    ensure_tables(con)
    landed = _scalar(con, f"SELECT count(*) FROM {BATCHES} WHERE collection = ? AND status = 'landed'", [COLLECTION])
    if not table_exists(con, "landing", f"{COLLECTION}_valid"):
        return Pending(landed)
    unregistered = _scalar(
        con,
        f"SELECT count(DISTINCT v._batch) FROM landing.{COLLECTION}_valid v WHERE {unregistered_sql()}",
    )
    restated = _scalar(con, f"SELECT count(*) FROM {RESTATEMENTS} WHERE registered_at IS NULL")
    return Pending(landed, unregistered, restated)


def pending_batches(con: duckdb.DuckDBPyConnection) -> int:
    """Objections batches landed but not validated, validated batches with valid rows not
    registered, and objections files received again whose restatement is not registered."""
    return pending(con).total


@dataclass(frozen=True)
class _RefusedInPlace:
    """One not-moved reason of incoming/objections/: the refused entry's shown name, SHA-256 and raw
    identity as judged (``safehaven.intake.ingest.entry_identity``), and when the reason was written."""

    shown: str
    sha256: str
    entry: dict
    written: float


def refused_in_place(home: Home) -> list[_RefusedInPlace]:
    """The entries of incoming/objections/ the haven judged and refused but could not move, from
    their not-moved reason files (the haven's reason files only, :func:`_is_reason`, naming that
    folder, recording the entry's identity; one written before identities were recorded names no
    entry, so its entry is waited for until the next run writes it again, as each run that meets
    such an entry does)."""
    found = []
    folder = home.quarantine_for(COLLECTION)
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        named = NOT_MOVED_NAME.fullmatch(path.name)
        reason = _reason(path) if named and _is_reason(path) else None
        if reason and reason.get("left_in") == f"incoming/{COLLECTION}/" and reason["file"] == named["shown"]:
            with contextlib.suppress(FileNotFoundError):
                written = os.lstat(path).st_ctime
                entry = reason.get("entry")
                if isinstance(entry, dict):
                    found.append(_RefusedInPlace(named["shown"], str(reason["sha256"]), entry, written))
    return found


def _content_sha256(entry: Path) -> str | None:
    """The SHA-256 of a regular file's bytes now (links not followed), or None when it cannot be read."""
    try:
        with open(entry, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None


def _is_refused(entry: Path, seen: os.stat_result, refused: list[_RefusedInPlace]) -> bool:
    """Whether ``entry`` (``seen``: its ``lstat`` now) IS an entry the haven refused in place: a
    not-moved reason of its shown name, written since it arrived, records its identity as it is now
    (inode, size, times) and, when the haven read its bytes, their SHA-256, which it hashes again.
    An entry replaced, changed, or sharing only a shown name with a refused one is not (never
    matched on the shown name alone: withheld digits, truncation and escapes collide)."""
    shown, at = audit.shown_name(entry.name), arrived(seen)
    now = ingest.entry_identity(seen, hashed=True)
    for one in refused:
        same = one.shown == shown and one.written >= at and {**one.entry, "hashed": True} == now
        if same and (not one.entry.get("hashed") or _content_sha256(entry) == one.sha256):
            return True
    return False


def first_waiting(home: Home) -> tuple[datetime, str] | None:
    """The entry of incoming/objections/ that arrived first (``safehaven.intake.ingest.arrived``)
    and is not yet judged, with its shown name; None when there is none. An entry refused in place
    (:func:`_is_refused`: it is the very entry a not-moved reason records) is not waiting (module
    docstring, "What a restatement waits for"); anything else, or anything that cannot be read, is.
    Reads the bytes of an entry only when a reason records an entry of its shown name and identity:
    a name, size and times are the sender's to repeat, the bytes' SHA-256 is what the haven judged."""
    waiting = _waiting(home)
    if not waiting:
        return None
    at, shown = min(waiting)
    return datetime.fromtimestamp(at, UTC), shown


def _waiting(home: Home) -> list[tuple[float, str]]:
    """Each entry of incoming/objections/ not yet judged (:func:`first_waiting`): when it arrived, and
    its shown name."""
    refused, waiting = refused_in_place(home), []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in home.incoming_for(COLLECTION).iterdir():
            with contextlib.suppress(FileNotFoundError):
                seen = os.lstat(entry)
                if not _is_refused(entry, seen, refused):
                    waiting.append((arrived(seen), audit.shown_name(entry.name)))
    return waiting


def waiting_to_land(home: Home, objections: Contract | None = None) -> str | None:
    """The objections files in incoming/objections/ not yet landed (:func:`_waiting`; those waiting
    for their control file are named apart, :func:`describe_pending`), as a refusal of record-level
    releases: their objections are in no register yet, so a release prepared or delivered before
    intake runs would carry the people who objected (``safehaven objections record`` writes such a
    file; CoP 11-14; found by review: a request approved and delivered meanwhile held the objector).
    None when nothing waits."""
    parked = awaiting_control(home, objections)
    shown = sorted({name for _, name in _waiting(home)} - set(parked))
    if not shown:
        return None
    names = ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
    return (
        f"objections file(s) {names} in incoming/{COLLECTION}/ not yet landed and registered, so their "
        f"objections are not applied: {RUN_INTAKE}"
    )


def waiting_since(home: Home) -> datetime | None:
    """When the earliest objections entry still waiting in incoming/ arrived (:func:`first_waiting`):
    what the register step's restatements wait for (``safehaven.protect.objections.due_restatements``)."""
    first = first_waiting(home)
    return first[0] if first else None


#: what clears an objections file waiting for its control file (:func:`awaiting_control`)
ASK_FOR_CONTROL = (
    "ask the sender for {control} (written after the file), then run intake (safehaven run); a file the haven "
    "landed before it stopped while removing it is known as landed once its control file comes"
)


def awaiting_control(home: Home, objections: Contract | None) -> dict[str, str]:
    """The objections files in incoming/objections/ that wait for their control file (the
    objections contract ``objections`` asks for one, ``control: manifest``;
    ``safehaven.intake.ingest.awaiting_control``): shown name -> its control file's shown name.
    Nothing of such a file is read, so its objections are not applied, for as long as its control
    file does not come: it blocks record-level releases (:func:`describe_pending`), named with
    the file it waits for (module docstring, "What a restatement waits for"; CoP 11-14; fail closed)."""
    if objections is None or not totals.controlled(objections):
        return {}
    found = {}
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in sorted(home.incoming_for(COLLECTION).iterdir()):
            with contextlib.suppress(FileNotFoundError, FileRejected):
                if ingest.awaiting_control(entry, objections):
                    found[audit.shown_name(entry.name)] = audit.shown_name(totals.control_path(entry).name)
    return found


def _objections_of(collections: Iterable[str] | Mapping[str, Contract] | None) -> Contract | None:
    """The objections contract among the deployment's contracts (``collections``, when given as
    the registry's name -> contract), else None."""
    if not isinstance(collections, Mapping):
        return None
    return next((c for c in collections.values() if isinstance(c, Contract) and c.kind == "objections"), None)


def _unless_controlled(shown: str, objections: Contract | None) -> str:
    """Where the caller has no objections contract to say whether a file waits for its control
    file, the refusal still names that possibility and its remedy (never advice that may not clear it)."""
    if objections is not None:
        return ""
    ctl = f"{shown}{totals.CONTROL_SUFFIX}"
    return f", waiting for its control file {ctl} if the objections contract asks for one (ask the sender for {ctl})"


def _restatements_wait_for(
    con: duckdb.DuckDBPyConnection, home: Home | None, parked: dict[str, str], objections: Contract | None
) -> str:
    """What the pending restatements wait for, by shown name, why, and the step that clears it:
    the earliest objections file landed and not validated, or still waiting in incoming/ (for
    its control file, ``parked``: :func:`awaiting_control`; named as a possibility where the
    ``objections`` contract is not known, :func:`_unless_controlled`)."""
    landed = con.execute(
        f"SELECT coalesce(arrived_at, landed_at), file_name FROM {BATCHES} WHERE collection = ? "
        "AND status = 'landed' ORDER BY 1 LIMIT 1",
        [COLLECTION],
    ).fetchone()
    entry = first_waiting(home) if home is not None else None
    if landed and (entry is None or landed[0] <= entry[0]):
        return f"they wait for {audit.shown_name(str(landed[1]))}, landed but not validated: {RUN_INTAKE}"
    if entry and entry[1] in parked:
        return (
            f"they wait for {entry[1]}, which arrived before them and is still in incoming/{COLLECTION}/, waiting "
            f"for its control file {parked[entry[1]]}: " + ASK_FOR_CONTROL.format(control=parked[entry[1]])
        )
    if entry:
        return (
            f"they wait for {entry[1]}, which arrived before them and is still in incoming/{COLLECTION}/, not "
            f"yet landed (still arriving{_unless_controlled(entry[1], objections)}, or intake has not run on it): "
            f"{RUN_INTAKE}"
        )
    return (
        "nothing that arrived before them is waiting (unless a batch differs from its seal, named apart): "
        f"{RUN_REGISTER}"
    )


def describe_pending(
    con: duckdb.DuckDBPyConnection, home: Home | None = None, objections: Contract | None = None
) -> str | None:
    """What keeps objections out of the register, by kind, with the step that clears each (module
    docstring, "What a restatement waits for"), and, given ``home`` and the ``objections``
    contract, the objections files waiting for their control file (:func:`awaiting_control`);
    None when nothing does. Shown names only."""
    now = pending(con)
    parked = awaiting_control(home, objections) if home is not None else {}
    parts = [
        f"objections file {name} is in incoming/{COLLECTION}/ waiting for its control file {ctl}, so its "
        f"objections are not applied: " + ASK_FOR_CONTROL.format(control=ctl)
        for name, ctl in parked.items()
    ]
    if now.landed:
        parts.append(f"{now.landed} objections file(s) landed but not yet validated: {RUN_INTAKE}")
    if now.unregistered:
        parts.append(f"{now.unregistered} validated objections batch(es) with rows not registered: {RUN_REGISTER}")
    if now.restated:
        parts.append(
            f"{now.restated} objections file(s) sent again whose restatement is not registered; "
            + _restatements_wait_for(con, home, parked, objections)
        )
    return "; ".join(parts) or None


def recorded_drop_name(stamp: str) -> str:
    """The name of a drop ``safehaven objections record`` writes (:data:`RECORDED_PREFIX`)."""
    return f"{RECORDED_PREFIX}{stamp}.csv"


def refreshed_on(con: duckdb.DuckDBPyConnection) -> date | None:
    """The register's refresh date: the latest objections file validated (a hand-recorded drop
    never counts), or one sent again unchanged, or an attestation (module docstring, "Freshness")."""
    ensure_tables(con)
    dropped = con.execute(
        f"SELECT max(CAST(landed_at AS DATE)) FROM {BATCHES} WHERE collection = ? AND validated_at IS NOT NULL "
        "AND NOT coalesce(starts_with(file_name, ?), false)",
        [COLLECTION, RECORDED_PREFIX],
    ).fetchone()[0]
    restated = con.execute(  # the latest clean file, sent again unchanged (module docstring, "Freshness")
        f"SELECT max(CAST(r.noted_at AS DATE)) FROM {RESTATEMENTS} r JOIN ({_clean_batches_sql(con)}) c "
        "USING (batch_id) WHERE r.registered_at IS NOT NULL AND r.statements > 0 "
        "AND NOT coalesce(starts_with(c.file_name, ?), false) "
        f"AND NOT EXISTS (SELECT 1 FROM {BATCHES} later WHERE later.collection = '{COLLECTION}' "
        "AND later.landed_at > c.landed_at AND NOT coalesce(starts_with(later.file_name, ?), false))",
        [RECORDED_PREFIX, RECORDED_PREFIX],
    ).fetchone()[0]
    known = [d for d in (dropped, restated, attested_on(con)) if d is not None]
    return max(known) if known else None


def window_days(agreement_days: int | None = None, haven_days: int = DEFAULT_WINDOW_DAYS) -> int:
    """The freshness window (module docstring, "Freshness"): the agreement's, else the haven's.

    Raises :class:`ObjectionFeedBlocked` for a window under one day (fails closed).
    """
    days = int(agreement_days if agreement_days is not None else haven_days)
    if days < 1:
        raise ObjectionFeedBlocked(f"the objection register's window of {days} days is not a whole number of days")
    return days


def parse_window(text: str, source: str) -> int:
    """A haven window given as text (``source`` names where, e.g. an environment variable).

    Empty text is the default (``DEFAULT_WINDOW_DAYS``); anything but whole days of at least
    one raises :class:`ObjectionFeedBlocked`, so a mistyped window never widens the check.
    """
    text = text.strip()
    if not text:
        return DEFAULT_WINDOW_DAYS
    if not text.isdigit() or int(text) < 1:
        raise ObjectionFeedBlocked(
            f"{source}={text!r} is not a whole number of days; set it to whole days of at least one "
            f"(e.g. 31), or unset it for the default of {DEFAULT_WINDOW_DAYS}"
        )
    return int(text)


def feed_problems(
    con: duckdb.DuckDBPyConnection,
    home: Home,
    today: date,
    max_age_days: int,
    collections: Iterable[str] | None = None,
) -> list[str]:
    """Why record-level releases must not run now (empty when the feed is complete and fresh);
    ``collections``: the deployment's collections (``sync_faults``; given as the registry's
    contracts, its objections contract says whether an objections file waits for a control file,
    :func:`awaiting_control`)."""
    sync_faults(con, home, collections)
    problems = [_describe(f) for f in unresolved(con)]
    for tampered in (register_seal.problem(con, home), batch_seal.problem(con, COLLECTION, home)):
        if tampered:
            problems.append(tampered)
    waiting = describe_pending(con, home, _objections_of(collections))
    if waiting:
        problems.append(f"objections not yet validated and registered: {waiting}")
    unlanded = waiting_to_land(home, _objections_of(collections))
    if unlanded:
        problems.append(unlanded)
    refreshed = refreshed_on(con)
    if refreshed is None:
        problems.append(
            "the objection register has never been refreshed: land the current objections file, or attest it "
            "with: safehaven objections refreshed --as-of <date> --by <name> --reason <text>"
        )
    elif (today - refreshed).days > max_age_days:
        problems.append(
            f"the objection register was last refreshed on {refreshed.isoformat()}, more than {max_age_days} days "
            f"before {today.isoformat()}: land the current objections file, or attest it with: "
            "safehaven objections refreshed --as-of <date> --by <name> --reason <text>"
        )
    return problems


def _describe(fault: Fault) -> str:
    if fault.rules == UNKNOWN_INCOMING:
        return (
            f"incoming/{fault.file_name} ({_named(fault)}) is in incoming/ but no collection's folder, so the haven "
            f"never reads it and any objections in it were never registered; {how_to_clear(fault)}"
        )
    folder, _, name = fault.file_name.rpartition("/")
    if fault.rules in (REASON_MISSING, REASON_UNREADABLE):
        why = "no reason file" if fault.rules == REASON_MISSING else "a reason file the haven cannot read"
        return (
            f"file {name} ({_named(fault)}): found in quarantine/{folder or COLLECTION}/ with {why} (the haven "
            "stopped, or its disk was full, while quarantining it), so any objections in it were never "
            f"registered; {how_to_clear(fault)}"
        )
    what = {
        "rows": f"{fault.rows} row(s) rejected ({fault.rules})",
        "batch": f"the batch refused at validation ({fault.rules}; its reason file was not written)",
        "misrouted": "it may be an objections file (its bytes name the objections contract's "
        f"{OBJECTIONS_MARK} or hold an objection type, the haven could not read it as that collection's, or "
        "it was quarantined before the haven judged such files) and was received and quarantined as a "
        f"content file ({fault.rules}), so any objections in it were never registered",
    }.get(fault.level, f"the whole file quarantined ({fault.rules})")
    kind = "file" if fault.level == "misrouted" else "objections file"
    return f"{kind} {fault.file_name} ({_named(fault)}): {what}; {how_to_clear(fault)}"


def _named(fault: Fault) -> str:
    """The fault's key as a person types it: the file's SHA-256, or the key of its own arrival."""
    key = fault.sha256[:SHA_SHOWN]
    if fault.rules in (REASON_MISSING, REASON_UNREADABLE, UNKNOWN_INCOMING):
        return f"fault {key}"
    if fault.file_sha256 is not None and fault.level in ("rows", "batch"):
        return f"sha256 {fault.file_sha256[:SHA_SHOWN]}: fault {key}"
    if fault.file_sha256 is not None:
        return f"sha256 {fault.file_sha256[:SHA_SHOWN]}, received again: fault {key}"
    return f"sha256 {key}"


def how_to_clear(fault: Fault) -> str:
    """What a person does to clear ``fault``, with the exact commands (module docstring, "Clearing a fault")."""
    me = fault.sha256[:SHA_SHOWN]
    decide = f"safehaven objections resolve {me} --by <name> --reason <text>"
    if fault.rules == UNKNOWN_INCOMING:
        return (
            "move it into its collection's folder (incoming/objections/ for objections) and run intake "
            f"(safehaven run), or remove it, then record that: {decide}"
        )
    if fault.level == "misrouted" and fault.later_clean_sha256 is None:
        folder = fault.rules.rsplit("incoming/", 1)[-1]
        return (
            f"if it holds objections, move it from quarantine/{folder} into incoming/objections/ (as plain "
            "UTF-8 CSV) and run intake (safehaven run; any row it lands with rejected is a fault of its own), "
            f"then record that it landed cleanly: safehaven objections resolve {me} --corrected-by "
            f"<sha256 of the landed file> --by <name> --reason <text>; if it holds none, record that decision: {decide}"
        )
    if fault.later_clean_sha256 is None:
        return (
            "have the sender re-send its objections, then record that the new file corrects it: "
            f"safehaven objections resolve {me} --corrected-by <sha256 of the new file> --by <name> --reason <text>; "
            f"or record a decision: {decide}"
        )
    later = fault.later_clean_sha256[:SHA_SHOWN]
    first = f" (the first of {fault.later_clean_files})" if fault.later_clean_files > 1 else ""
    return (
        f"a later file of that name, {fault.file_name} (sha256 {later}), landed and validated cleanly on "
        f"{fault.later_clean_on}{first}, but the haven cannot tell a correction from the sender's next routine "
        "file, so the block stands until a person decides: if that file re-sends this one's objections, record it: "
        f"safehaven objections resolve {me} --corrected-by {later} --by <name> --reason <text>; "
        f"otherwise have them re-sent, or record a decision: {decide}"
    )


def require_sound_feed(
    con: duckdb.DuckDBPyConnection,
    home: Home,
    today: date,
    agreement_days: int | None = None,
    haven_days: int = DEFAULT_WINDOW_DAYS,
    collections: Iterable[str] | None = None,
) -> date:
    """The guard of every record-level release: the objection feed is complete and fresh
    within the agreement's window, else the haven's (``window_days``); ``collections``: the
    deployment's collections, without which incoming/ is not scanned for unknown entries
    (``sync_faults``).

    Returns the register's refresh date (the date of the opt-out list applied). Raises
    :class:`ObjectionFeedBlocked` with every reason on one line otherwise.
    """
    problems = feed_problems(con, home, today, window_days(agreement_days, haven_days), collections)
    if problems:
        raise ObjectionFeedBlocked("record-level releases are blocked: " + " | ".join(problems))
    refreshed = refreshed_on(con)
    assert refreshed is not None
    return refreshed


def release_guard(
    con: duckdb.DuckDBPyConnection,
    home: Home,
    today: date,
    *,
    record_level: bool,
    agreement_days: int | None,
    haven_days: int = DEFAULT_WINDOW_DAYS,
    collections: Iterable[str] | None = None,
) -> date | None:
    """The one check a release makes: record-level releases need a complete, fresh feed
    (``require_sound_feed``); anonymised ones are not blocked (guide Rule 4C). Returns the date
    of the opt-out list applied (None when the register was never refreshed)."""
    if record_level:
        return require_sound_feed(con, home, today, agreement_days, haven_days, collections)
    return refreshed_on(con)


def resolve(
    con: duckdb.DuckDBPyConnection,
    home: Home,
    file: str,
    *,
    by: str,
    reason: str,
    corrected_by: str | None = None,
    collections: Iterable[str] | None = None,
) -> int:
    """A person's decision clearing the unresolved faults of ``file`` (its name or SHA-256), audited.

    ``corrected_by`` (a file's SHA-256 or 12 or more of its first characters) records that the
    person judged that objections file to correct the fault (resolution ``corrected_file``): it
    must have landed after the fault and validated with no rejected row. Without it the
    resolution is a ``decision``. Returns the number of faults resolved; raises ``ValueError``
    when none matches.
    """
    if not by.strip() or not reason.strip():
        raise ValueError("a decision needs --by <name> and --reason <text>")
    sync_faults(con, home, collections)
    key = _fault_key(con, file)
    _one_fault_by_name(con, key)
    batch, landed, resolution, note = None, None, "decision", reason
    if corrected_by is not None:
        batch, landed = _correcting_batch(con, corrected_by)
        resolution, note = "corrected_file", f"corrected by {batch}: {reason}"
    rows = con.execute(
        f"UPDATE {FAULTS} SET resolved_at = now(), resolved_by = ?, resolution = ?, reason = ? "
        "WHERE (resolved_at IS NULL OR NOT list_contains(?::VARCHAR[], sha256)) "
        "AND (file_name = ? OR sha256 = ? OR (length(?) >= 12 AND sha256 LIKE ? || '%')) "
        "AND (CAST(? AS TIMESTAMPTZ) IS NULL OR (arrived_at < CAST(? AS TIMESTAMPTZ) AND "
        f"{_NOT_ITSELF.format(f='', batch='?')})) "
        "RETURNING sha256, level, rows",
        [by, resolution, note, resolved_on_record(con), key, key, key, key, landed, landed, batch or ""],
    ).fetchall()
    if not rows:
        later = f" that arrived before the file {batch[:SHA_SHOWN]}" if batch else ""
        raise ValueError(f"no unresolved objections fault for {key!r}{later}; see: safehaven objections faults")
    for sha, level, n in rows:
        detail = {"level": level, "rows": n, "resolution": resolution, "reason": reason[:500]}
        audit.append(
            con,
            actor=by,
            role="governance",
            action=RESOLVE_ACTION,
            object=f"{FAULT_OBJECT}{sha}",
            outcome="ok",
            detail={**detail, **({"corrected_by_batch": batch} if batch else {}), "recorded_by": current_actor()},
        )
    return len(rows)


def _fault_key(con: duckdb.DuckDBPyConnection, file: str) -> str:
    """What a person typed to name a fault, as faults are named: its SHA-256 (or 12 or more of its
    first characters), a file name, or a path into quarantine (``quarantine/`` and anything before
    it cut: a path copied from the home). A content quarantine's fault of a file with no readable
    reason is named by its folder and name (``hospital_episodes/x.csv``); a folder typed that names
    no such fault is refused rather than read as the bare name, which would clear a fault of
    another folder unseen (found by review)."""
    typed = file.strip()
    if "/" not in typed:
        return typed
    inside = typed.rsplit("quarantine/", 1)[-1]
    if "/" not in inside or inside.startswith(f"{COLLECTION}/"):
        return Path(inside).name
    if any(f.file_name == inside for f in unresolved(con)):
        return inside
    raise ValueError(
        f"no unresolved objections fault is named {inside!r}: name it by the key the refusal shows "
        "(its sha256, or fault <key>), as listed by: safehaven objections faults"
    )


def _one_fault_by_name(con: duckdb.DuckDBPyConnection, key: str) -> None:
    """A decision given by file name clears one fault only: several unresolved faults of that name
    (files sent under one name on different days; one may have arrived after the person looked)
    are resolved each by its SHA-256, so none is cleared unseen (fail closed)."""
    if _SHA_KEY.fullmatch(key.lower()):
        return
    named = sum(1 for fault in unresolved(con) if fault.file_name == key)
    if named > 1:
        raise ValueError(
            f"{named} unresolved objections faults are named {key!r}: resolve each by its SHA-256 "
            "(12 or more of its first characters), as shown by: safehaven objections faults"
        )


def _correcting_batch(con: duckdb.DuckDBPyConnection, corrected_by: str) -> tuple[str, datetime]:
    """The one objections file (batch id, landed at) whose SHA-256 is or starts with ``corrected_by``
    and that landed and validated with no rejected row; ``ValueError`` otherwise."""
    key = corrected_by.strip().lower()
    if not _SHA_KEY.fullmatch(key):
        raise ValueError(
            "--corrected-by takes the SHA-256 of the correcting objections file, or 12 or more of its first "
            "characters, as shown by: safehaven objections faults"
        )
    found = con.execute(
        f"SELECT batch_id, landed_at FROM ({_clean_batches_sql(con)}) WHERE starts_with(batch_id, ?)", [key]
    ).fetchall()
    if not found:
        raise ValueError(
            f"--corrected-by {key} names no objections file that landed and validated with no rejected row; "
            "see: safehaven objections faults"
        )
    if len(found) > 1:
        raise ValueError(f"--corrected-by {key} names more than one objections file; give more of its SHA-256")
    return found[0][0], found[0][1]


def attest_refresh(con: duckdb.DuckDBPyConnection, as_of: date, *, by: str, reason: str, today: date) -> None:
    """A person attests that the register matched the current opt-out list on ``as_of`` (audited)."""
    if not by.strip() or not reason.strip():
        raise ValueError("an attestation needs --by <name> and --reason <text>")
    if as_of > today:
        raise ValueError(f"--as-of {as_of.isoformat()} is in the future")
    ensure_tables(con)
    con.execute(f"INSERT INTO {REFRESHES} VALUES (?, now(), ?, ?)", [as_of, by, reason])
    audit.append(
        con,
        actor=by,
        role="governance",
        action=REFRESH_ACTION,
        object="governance.objection_events",
        detail={"as_of": as_of.isoformat(), "reason": reason[:500], "recorded_by": current_actor()},
    )


def attested_on(con: duckdb.DuckDBPyConnection) -> date | None:
    """The latest date a person attested the register current, from the attestations on record
    (``objections.refreshed`` entries whose own hash verifies), not from the store's table, which
    someone holding the store key could add a date to."""
    dates = []
    for entry in audit.authentic_entries(con, [REFRESH_ACTION]):
        try:
            dates.append(date.fromisoformat(str(entry.fields.get("as_of"))))
        except ValueError:
            continue
    return max(dates, default=None)


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> int:
    row = con.execute(sql, params or []).fetchone()
    return int(row[0]) if row and row[0] is not None else 0
