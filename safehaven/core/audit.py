"""The audit trail: append-only, hash-chained, anchored outside the store.

Rule (CoP 12 and 23d; Government response to the Caldicott review, recommendation 1;
``docs/rules.md`` "Audit"): every access to and use of data is recorded: who (``actor``, ``role``), when
(``at``), what (``action`` on ``object``), why (``purpose``, ``legal_basis``), under which
data sharing ``agreement``, with what ``outcome``. Recorded entries cannot be altered,
removed, reordered or cut off without the change being detected.

How:

* Entries live in ``governance.audit_log`` inside the encrypted store. ``seq`` runs 1, 2, 3,
  ... with no gaps. Code only ever inserts (``append``, ``append_many``); nothing here
  updates or deletes, and DuckDB has no triggers to forbid it, so the guarantee is
  *evidence* of tampering, not prevention.
* Each entry carries ``prev_hash`` (the previous entry's ``entry_hash``; 64 zeros for entry
  1) and ``entry_hash`` = HMAC-SHA256 under the ``audit`` key over a canonical serialisation
  (JSON, sorted keys, no whitespace, UTF-8) of every field including ``seq`` and
  ``prev_hash``. The key lives in ``keys/audit.key`` (see ``safehaven.core.keys``), not in the
  store, so someone holding only the store file cannot rewrite the log and recompute a
  chain that verifies.
* A chain alone cannot show that its last entries were dropped. After every append the head
  (last ``seq`` and ``entry_hash``, with an HMAC of its own) is written atomically to
  ``registers/audit_head.json``, outside the store. In production the same head would also
  be sent to a write-once log (WORM storage or an external transparency log), so that an
  attacker who can rewrite both files still cannot roll the anchor back.
* ``verify`` walks the chain in ``seq`` order and reports the first bad entry: a gap
  (deleted entry), a ``prev_hash`` that does not match (reordered or inserted entries), a
  hash mismatch (an edited entry), or a head that does not match the anchor (truncation,
  or an altered anchor).

No identifier values, ever (``docs/design.md`` "Keep confidential data inside the store":
metadata and logs carry counts, hashes and versions, never values): callers pass pseudonyms,
table names, agreement references, key ids and counts. As a guard, any text field or ``detail``
value that looks like an NHS number (ten digits, optionally split 3-3-4 by spaces, hyphens,
dots or slashes, as in ``safehaven.core.identifiers``) is refused with ``ValueError``.
Lower-case hex tokens of 16+ characters (hashes, key ids) are exempt, since they may contain
ten digits in a row.

Limits: ``append`` runs its own transaction, so call it outside an open one. If the process
dies between the commit and the anchor write, ``verify`` reports the unanchored entries and a
person re-anchors with ``anchor`` after review. The ``audit`` key is not rotated (a new key
would fail every existing entry; the anchor records the key id in use).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from safehaven.core.home import Home
from safehaven.core.keys import Key, KeyRing, KeyRingError
from safehaven.core.store import CATALOG, table_exists

TABLE = "governance.audit_log"
KEY_PURPOSE = "audit"
HEAD_FILE = "audit_head.json"
GENESIS = "0" * 64

#: Fields a caller supplies, with their defaults (None means required).
_REQUIRED = ("actor", "role", "action", "object")
_OPTIONAL: dict[str, Any] = {
    "purpose": None,
    "legal_basis": None,
    "agreement": None,
    "outcome": "ok",
    "detail": None,
}
#: Columns in table order.
_COLUMNS = ("seq", "at", *_REQUIRED, *_OPTIONAL, "prev_hash", "entry_hash")

_DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    seq BIGINT PRIMARY KEY,
    "at" TIMESTAMPTZ NOT NULL,
    actor VARCHAR NOT NULL,
    role VARCHAR NOT NULL,
    action VARCHAR NOT NULL,
    object VARCHAR NOT NULL,
    purpose VARCHAR,
    legal_basis VARCHAR,
    agreement VARCHAR,
    outcome VARCHAR NOT NULL,
    detail JSON,
    prev_hash VARCHAR NOT NULL,
    entry_hash VARCHAR NOT NULL
)
"""

#: Read back with ``at`` as epoch microseconds, so hashing never depends on time zones.
_SELECT = (
    'SELECT seq, epoch_us("at"), actor, role, action, object, purpose, legal_basis, '
    f"agreement, outcome, detail, prev_hash, entry_hash FROM {TABLE}"
)

_NHS_LIKE = re.compile(r"(?<!\d)\d{3}[\s\-./]?\d{3}[\s\-./]?\d{4}(?!\d)")
#: lower-case hex runs of 16+ characters (pseudonyms, hashes, key ids) standing as whole words,
#: e.g. ``person:<pseudonym>``: they often contain ten digits in a row and are not identifiers.
_HEX_TOKEN = re.compile(r"(?<![0-9A-Za-z])[0-9a-f]{16,}(?![0-9A-Za-z])")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Entry:
    """One audit entry as stored; ``detail`` is the stored JSON text (or None)."""

    seq: int
    at: datetime
    actor: str
    role: str
    action: str
    object: str
    purpose: str | None
    legal_basis: str | None
    agreement: str | None
    outcome: str
    detail: str | None
    prev_hash: str
    entry_hash: str

    @property
    def detail_value(self) -> Any:
        """``detail`` parsed from JSON."""
        return None if self.detail is None else json.loads(self.detail)


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of ``verify``: ``first_bad_seq`` is None when ok or when no entry is at fault."""

    ok: bool
    first_bad_seq: int | None
    reason: str


# --- canonical form and hashing ---------------------------------------------------------


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def _canonical(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(
        fields,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")


def entry_hash(key: Key, entry: Mapping[str, Any]) -> str:
    """HMAC-SHA256 (hex) over the canonical JSON of every field except ``entry_hash``.

    ``at`` is hashed as an ISO 8601 UTC string with microseconds and ``detail`` as its stored
    JSON text, so any change to the stored bytes changes the hash.
    """
    fields = {name: entry[name] for name in _COLUMNS if name != "entry_hash"}
    fields["at"] = _iso(fields["at"])
    return hmac.new(key.material, _canonical(fields), hashlib.sha256).hexdigest()


def _head_mac(key: Key, head: Mapping[str, Any]) -> str:
    fields = {name: value for name, value in head.items() if name != "mac"}
    return hmac.new(key.material, _canonical(fields), hashlib.sha256).hexdigest()


# --- the identifier guard ---------------------------------------------------------------


def _check_no_identifier(value: Any, where: str) -> None:
    """Raise ValueError if ``value`` (or anything inside it) looks like an NHS number."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_no_identifier(k, f"{where} key")
            _check_no_identifier(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_no_identifier(v, f"{where}[{i}]")
    elif isinstance(value, str | int | float) and not isinstance(value, bool):
        text = str(value)
        if _NHS_LIKE.search(_HEX_TOKEN.sub(" ", text)):
            raise ValueError(
                f"audit {where} looks like an NHS number; the audit log never holds "
                "identifier values: pass a pseudonym, an id or a count instead"
            )


def _prepare(item: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one caller entry; ``detail`` becomes canonical JSON text."""
    unknown = set(item) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise ValueError(f"unknown audit fields: {sorted(unknown)}")
    entry = {**_OPTIONAL, **item}
    for name in (*_REQUIRED, "outcome"):
        if not isinstance(entry.get(name), str) or not entry[name]:
            raise ValueError(f"audit field {name!r} must be a non-empty string")
    for name in ("purpose", "legal_basis", "agreement"):
        if entry[name] is not None and not isinstance(entry[name], str):
            raise ValueError(f"audit field {name!r} must be a string or None")
    for name in (*_REQUIRED, *_OPTIONAL):
        _check_no_identifier(entry[name], name)
    if entry["detail"] is not None:
        try:
            entry["detail"] = _canonical(entry["detail"]).decode("utf-8")
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"audit detail must be plain JSON (dict, list, str, int, finite float, bool, None): {exc}"
            ) from None
    return entry


# --- store and key plumbing -------------------------------------------------------------


def home_of(con: duckdb.DuckDBPyConnection) -> Home:
    """The ``Home`` whose store is attached to ``con`` as ``store`` (see ``safehaven.core.store``)."""
    row = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = ?", [CATALOG]).fetchone()
    if row and row[0]:
        path = Path(row[0])
        home = Home(path.parent.parent)
        if home.store_file.resolve() == path.resolve():
            return home
    raise ValueError("cannot tell the haven home from this connection; pass home=")


def _keyring(con: duckdb.DuckDBPyConnection, home: Home | None, keyring: KeyRing | None) -> tuple[Home, KeyRing]:
    home = home or home_of(con)
    return home, keyring or KeyRing(home.keys)


def _table_exists(con: duckdb.DuckDBPyConnection) -> bool:
    return table_exists(con, *TABLE.split("."))


def ensure_table(con: duckdb.DuckDBPyConnection) -> None:
    """Create ``governance.audit_log`` if it does not exist."""
    con.execute(_DDL)


def _row_entry(row: Sequence[Any]) -> Entry:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["at"] = _EPOCH + timedelta(microseconds=values["at"])
    return Entry(**values)


def _read_head(home: Home) -> dict[str, Any] | None:
    path = home.registers / HEAD_FILE
    if not path.exists():
        return None
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return head if isinstance(head, dict) else {}


def _write_head(home: Home, key: Key, seq: int, head_hash: str) -> None:
    """Write the head anchor atomically (temp file, fsync, rename, fsync the directory)."""
    head: dict[str, Any] = {
        "seq": seq,
        "entry_hash": head_hash,
        "key_id": key.key_id,
        "anchored_at": _iso(datetime.now(UTC)),
    }
    head["mac"] = _head_mac(key, head)
    home.registers.mkdir(parents=True, exist_ok=True)
    path = home.registers / HEAD_FILE
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(head, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(home.registers, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _last(con: duckdb.DuckDBPyConnection) -> tuple[int, str]:
    row = con.execute(f"SELECT seq, entry_hash FROM {TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
    return (int(row[0]), str(row[1])) if row else (0, GENESIS)


# --- the API ----------------------------------------------------------------------------


def append_many(
    con: duckdb.DuckDBPyConnection,
    entries: Iterable[Mapping[str, Any]],
    *,
    home: Home | None = None,
    keyring: KeyRing | None = None,
) -> list[int]:
    """Append entries (one per event, e.g. per release; never per patient row).

    Each entry is a mapping with the keyword arguments of ``append``. All are written in one
    transaction by one columnar INSERT and share one timestamp; the head is then anchored.
    Returns the new ``seq`` values. Raises ValueError for a malformed or identifier-bearing
    entry (then nothing is written).
    """
    prepared = [_prepare(item) for item in entries]
    if not prepared:
        return []
    home, keyring = _keyring(con, home, keyring)
    ensure_table(con)
    con.execute("BEGIN TRANSACTION")
    try:
        seq, prev = _last(con)
        key = keyring.get_or_create(KEY_PURPOSE, allow_create=seq == 0 and _read_head(home) is None)
        at = datetime.now(UTC)
        first = seq + 1
        for entry in prepared:
            seq += 1
            entry.update(seq=seq, at=at, prev_hash=prev)
            entry["entry_hash"] = prev = entry_hash(key, entry)
        # One columnar INSERT: each column is bound as one list and unnested in step.
        others = [name for name in _COLUMNS if name not in ("seq", "at")]
        con.execute(
            f"INSERT INTO {TABLE} SELECT unnest(?::BIGINT[]), CAST(? AS TIMESTAMPTZ), "
            + ", ".join("unnest(?::VARCHAR[])" for _ in others),
            [
                [e["seq"] for e in prepared],
                _iso(at),
                *([e[n] for e in prepared] for n in others),
            ],
        )
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):  # DuckDB may have rolled back already
            con.execute("ROLLBACK")
        raise
    _write_head(home, key, seq, prev)
    return list(range(first, seq + 1))


def append(
    con: duckdb.DuckDBPyConnection,
    *,
    actor: str,
    role: str,
    action: str,
    object: str,
    purpose: str | None = None,
    legal_basis: str | None = None,
    agreement: str | None = None,
    outcome: str = "ok",
    detail: Any = None,
    home: Home | None = None,
    keyring: KeyRing | None = None,
) -> int:
    """Append one entry and anchor the head; returns its ``seq``.

    ``object`` names what was acted on (``haven.gp_events``, a release id, a pseudonym),
    never an identifier value. ``detail`` is plain JSON: counts, ids, versions. ``home``
    defaults to the haven whose store ``con`` has attached; ``keyring`` to its ``keys/``.
    """
    entry = {
        "actor": actor,
        "role": role,
        "action": action,
        "object": object,
        "purpose": purpose,
        "legal_basis": legal_basis,
        "agreement": agreement,
        "outcome": outcome,
        "detail": detail,
    }
    return append_many(con, [entry], home=home, keyring=keyring)[0]


def verify(
    con: duckdb.DuckDBPyConnection,
    home: Home | None = None,
    *,
    keyring: KeyRing | None = None,
) -> VerifyResult:
    """Check the chain, then the head anchor; report the first bad ``seq`` and why.

    Works on a read-only connection and never creates a key. ``first_bad_seq`` is the entry
    a person should look at first: the first missing, moved or altered entry, or for a
    truncated log the first entry that should exist but does not (last stored ``seq`` + 1).
    """
    home, keyring = _keyring(con, home, keyring)
    head = _read_head(home)
    try:
        key = keyring.get(KEY_PURPOSE) if keyring.exists(KEY_PURPOSE) else None
    except KeyRingError as exc:
        return VerifyResult(False, None, f"cannot read the audit key: {exc}")
    if key is None:
        if head is None and not (_table_exists(con) and _last(con)[0]):
            return VerifyResult(True, None, "the audit log is empty and nothing was anchored")
        return VerifyResult(
            False,
            None,
            f"the audit key {keyring.path(KEY_PURPOSE)} is missing, so the audit log cannot be "
            "verified; restore it from the key custodian's backup",
        )
    bad, last_seq, last_hash = _check_chain(con, key)
    return bad or _check_head(con, key, head, last_seq, last_hash)


def _check_chain(con: duckdb.DuckDBPyConnection, key: Key) -> tuple[VerifyResult | None, int, str]:
    """Walk the entries in ``seq`` order: the first gap, chain break or altered entry."""
    if not _table_exists(con):
        return None, 0, GENESIS
    breach = "restore the log from backup and record a breach"
    expected, prev = 1, GENESIS
    cursor = con.execute(_SELECT + " ORDER BY seq")
    while batch := cursor.fetchmany(10_000):
        for row in batch:
            entry = _row_entry(row)
            if entry.seq != expected:
                reason = (
                    f"audit entry {expected} is missing (the next stored entry is {entry.seq}): "
                    f"entries were deleted; {breach}"
                )
                return VerifyResult(False, expected, reason), expected - 1, prev
            if entry.prev_hash != prev:
                reason = (
                    f"audit entry {entry.seq} does not follow entry {entry.seq - 1} (its "
                    "prev_hash does not match): entries were reordered, inserted or replaced; " + breach
                )
                return VerifyResult(False, entry.seq, reason), expected - 1, prev
            if not hmac.compare_digest(entry_hash(key, vars(entry)), entry.entry_hash):
                reason = (
                    f"audit entry {entry.seq} has been altered since it was written (its hash "
                    f"does not match its content under the audit key); {breach}"
                )
                return VerifyResult(False, entry.seq, reason), expected - 1, prev
            expected, prev = expected + 1, entry.entry_hash
    return None, expected - 1, prev


def _check_head(
    con: duckdb.DuckDBPyConnection,
    key: Key,
    head: Mapping[str, Any] | None,
    last_seq: int,
    last_hash: str,
) -> VerifyResult:
    """Compare a verified chain ending at ``last_seq`` with the anchored head."""
    where = f"registers/{HEAD_FILE}"
    if head is None:
        if last_seq == 0:
            return VerifyResult(True, None, "the audit log is empty and nothing was anchored")
        return VerifyResult(
            False,
            None,
            f"the head anchor {where} is missing, so truncation of the audit log cannot be "
            "ruled out; restore the anchor from the write-once copy and verify again",
        )
    try:
        seq, anchored = int(head["seq"]), str(head["entry_hash"])
        mac_ok = hmac.compare_digest(_head_mac(key, head), str(head["mac"]))
    except (KeyError, TypeError, ValueError):
        reason = f"the head anchor {where} is unreadable; restore it from the write-once copy"
        return VerifyResult(False, None, reason)
    advice = (
        f"; the anchor's own MAC does not verify either, so {where} was edited outside the "
        "haven: restore it from the write-once copy and verify again"
        if not mac_ok
        else "; restore the log from backup and record a breach"
    )
    if seq > last_seq:
        return VerifyResult(
            False,
            last_seq + 1,
            f"the audit log ends at entry {last_seq} but the head anchor records entry {seq}: "
            f"entries {last_seq + 1}-{seq} were removed (truncation){advice}",
        )
    if seq == last_seq:
        stored = last_hash
    else:
        row = con.execute(f"SELECT entry_hash FROM {TABLE} WHERE seq = ?", [seq]).fetchone()
        stored = str(row[0]) if row else GENESIS
    if not hmac.compare_digest(stored, anchored):
        return VerifyResult(
            False,
            max(seq, 1),
            f"audit entry {seq} does not match the hash the head anchor records for it: the "
            f"log was rewritten from there, or the anchor is wrong{advice}",
        )
    if not mac_ok:
        return VerifyResult(
            False,
            None,
            f"the head anchor {where} matches the log but its MAC does not verify, so the "
            "anchor file was edited outside the haven; restore it from the write-once copy",
        )
    if seq < last_seq:
        return VerifyResult(
            False,
            seq + 1,
            f"audit entries {seq + 1}-{last_seq} were written after the last anchored head "
            f"(entry {seq}): an append was interrupted before anchoring, or entries were added "
            "outside the haven; review them, then re-anchor with safehaven.core.audit.anchor",
        )
    return VerifyResult(
        True,
        None,
        f"the audit log verifies: {last_seq} entries, chain intact, head anchored",
    )


def anchor(
    con: duckdb.DuckDBPyConnection,
    home: Home | None = None,
    *,
    keyring: KeyRing | None = None,
) -> int:
    """Re-anchor the head at the last entry, after a person has reviewed unanchored entries.

    Refuses if the chain itself does not verify. Returns the anchored ``seq``.
    """
    home, keyring = _keyring(con, home, keyring)
    key = keyring.get(KEY_PURPOSE)
    bad, last_seq, last_hash = _check_chain(con, key)
    if bad is not None:
        raise ValueError(f"will not anchor an audit log that fails verification: {bad.reason}")
    _write_head(home, key, last_seq, last_hash)
    return last_seq


def entries_for(
    con: duckdb.DuckDBPyConnection,
    *,
    object_like: str | None = None,
    agreement: str | None = None,
    since: datetime | None = None,
) -> list[Entry]:
    """Entries in ``seq`` order, filtered by ``object LIKE object_like``, agreement, and time.

    For subject access reports (CoP 12; ``docs/rules.md`` "Audit"): find every use of a dataset, release
    or pseudonym. ``since`` must be time-zone aware.
    """
    if not _table_exists(con):
        return []
    where, params = ["true"], []
    if object_like is not None:
        where.append("object LIKE ?")
        params.append(object_like)
    if agreement is not None:
        where.append("agreement = ?")
        params.append(agreement)
    if since is not None:
        if since.tzinfo is None:
            raise ValueError("since must be time-zone aware (e.g. datetime(..., tzinfo=UTC))")
        where.append('"at" >= CAST(? AS TIMESTAMPTZ)')
        params.append(_iso(since))
    sql = f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY seq"
    return [_row_entry(row) for row in con.execute(sql, params).fetchall()]
