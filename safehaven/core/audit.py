"""The audit trail: append-only, hash-chained, anchored where a rollback is seen.

Rule (CoP 12 and 23d; Government response to the Caldicott review, recommendation 1;
``docs/rules.md`` "Audit"): every access to and use of data is recorded: who (``actor``, ``role``), when
(``at``), what (``action`` on ``object``), why (``purpose``, ``legal_basis``), under which
data sharing ``agreement``, with what ``outcome``. Recorded entries cannot be altered,
removed, reordered or cut off without the change being detected, and nothing is added to a
trail that no longer verifies.

How:

* Entries live in ``governance.audit_log`` inside the encrypted store. ``seq`` runs 1, 2, 3,
  ... with no gaps, except across a recorded breach (below). Code only ever inserts; nothing
  here updates or deletes, and DuckDB has no triggers to forbid it, so the guarantee is
  *evidence* of tampering, not prevention.
* Each entry carries ``prev_hash`` (the previous entry's ``entry_hash``; 64 zeros for entry
  1) and ``entry_hash`` = HMAC-SHA256 under the ``audit`` key over a canonical serialisation
  (JSON, sorted keys, no whitespace, UTF-8) of every field including ``seq`` and
  ``prev_hash``. The key lives in ``keys/audit.key`` (see ``safehaven.core.keys``), not in the
  store, so someone holding only the store key cannot rewrite the log and recompute a chain
  that verifies.
* A chain alone cannot show that its last entries were dropped, so every append anchors the
  head outside the store (``safehaven.core.anchors``: the head file, the hash-chained anchor
  history, and an optional write-once target), and the head is published to others in every
  ``published/release.json`` and every row of the data release register.
* **Genesis.** The first entry's hash is also recorded in ``governance.audit_genesis``. A log
  that is empty or missing while the genesis row, an anchor, the audit key, an audit key on
  record (the key ring's history, ``governance.key_epochs``), a published head or any landed,
  pseudonymised, vault, released or published data exists fails verification, and ``check``
  asks the same, so no new entry 1 is written over a wiped trail: emptiness is not innocence.
* **A new trail's key is installed only once its first entry and anchor exist.** The key is
  written staged (``audit-next.key``, not recorded in the key ring), entry 1 is written and
  anchored with it, and only then is it installed as the audit key. A process killed before
  entry 1 commits leaves a staged key and an empty log, which is still a fresh haven (the
  next run writes entry 1 with the same staged key); killed after, it leaves a log that
  verifies under the staged key with no installed key, which the next ``verify`` (every run,
  every audited command, ``safehaven audit verify``) completes (:func:`_finish_genesis`:
  anchor the head if its file is missing, install and record the key), but only while the log
  holds entry 1 alone, no audit key is on record and nothing else shows prior use, so a key
  someone stages after rewriting the log is never adopted. Before this,
  either kill left "an audit key without its log" or "a log without its anchor", both
  refused until a person recorded a breach decision, for a crash and not a breach.
* **Fail closed on append** (``check``): before anything is appended, the tail of the log is
  checked against the anchor: the head file's MAC, its ``seq``, hash and entry count equal to
  the log's last entry and row count, the last anchor history line equal to the head, the
  last entry's own hash, and the write-once target holding no newer anchor. This costs a few
  reads whatever the log's length. It guarantees that no entry was removed from or added to
  the end and that the head was not rolled back; it does not re-hash older entries. If it
  does not pass, a full ``verify`` names the first bad entry and ``AuditTrailBroken`` is
  raised: nothing is written. The nightly run does the full ``verify`` once at its start
  (``begin_run``), which re-hashes every entry and checks every anchor and published head.
* **Breach decisions** (``resolve``): a person records the breach (breach register) and their
  decision as the first entry of a new segment. That entry's ``prev_hash`` is the hash of the
  last entry still stored, and its ``seq`` follows the highest ``seq`` ever anchored or
  published, so sequence numbers are never reused. Its detail declares the damaged range
  (``lost_from`` up to the entry before it); ``verify`` then skips that range (showing the
  break), checks that the log before the decision is still as it was when the decision was
  made (it ended at ``tail_seq``), and checks everything else as usual.

No identifier values, ever (``docs/design.md`` "Keep confidential data inside the store":
metadata and logs carry counts, hashes and versions, never values): callers pass pseudonyms,
table names, agreement references, key ids and counts. As a guard, any text field or ``detail``
value that looks like an NHS number (ten digits, optionally split 3-3-4 by spaces, hyphens,
dots or slashes, as in ``safehaven.core.identifiers``) is refused with ``ValueError``.
Lower-case hex tokens of 16+ characters (hashes, key ids) are exempt, since they may contain
ten digits in a row.

Limits: ``append`` runs its own transaction, so call it outside an open one. If the process
dies between the commit and the anchor write, ``verify`` reports the unanchored entries and a
person re-anchors with ``anchor`` after review; ``anchor`` refuses any other fault (a head file
or anchor history that names entries the log no longer holds, or that was edited or cut back).
The ``audit`` key is not rotated (a new key would fail every existing entry; the anchors record
the key id in use, so a swapped key is reported as the wrong key). Someone holding the audit
key as well as the store can rewrite everything local; only the write-once target and the heads
others hold show that.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from safehaven.core import anchors, schema
from safehaven.core.anchors import GENESIS, HEAD_FILE, Anchor
from safehaven.core.home import PUBLISHED_MANIFEST, Home
from safehaven.core.identifiers import is_valid_nhs, nhs_numbers_in_text
from safehaven.core.keys import KEY_BYTES, Key, KeyRing, KeyRingError, KeySubstituted, staged
from safehaven.core.store import CATALOG, opened_by, table_exists, transaction

__all__ = ["GENESIS", "HEAD_FILE", "TABLE", "AuditTrailBroken", "Entry", "VerifyResult"]

TABLE = schema.AUDIT_LOG
GENESIS_TABLE = schema.AUDIT_GENESIS
KEY_PURPOSE = "audit"
#: the name a new trail's key is staged under until entry 1 is anchored (module docstring, "Genesis")
GENESIS_KEY = staged(KEY_PURPOSE)
#: The action of the first entry of a new segment: a recorded breach and the decision to resume.
SEGMENT_ACTION = "audit_breach_decision"
#: The action recorded at the start of every pipeline run (after a full verification).
RUN_ACTION = "run"
#: Schemas whose rows mean the haven holds landed, pseudonymised (haven), identity (vault), released
#: or published data: none of it is made without an audit entry.
DATA_SCHEMAS = ("landing", "haven", "vault", "release", "published")
KEY_EPOCHS = schema.KEY_EPOCHS
RELEASE_REGISTER = schema.RELEASE_REGISTER
REGISTER_HEADS = schema.RELEASE_AUDIT_HEADS
RESOLVE_HINT = "record the breach and the decision to resume: safehaven audit resolve --decision '...'"

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

#: The fields an entry's hash covers: every column but the hash.
_HASHED = _COLUMNS[:-1]
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


class AuditTrailBroken(Exception):
    """The audit trail does not verify, so nothing is appended and the flow is refused.

    The message is one line: which entry is bad, why, and how to clear it (record the breach
    and the decision with ``safehaven audit resolve``, or restore the audit key).
    """

    def __init__(self, result: VerifyResult) -> None:
        self.result = result
        super().__init__(refusal(result))


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

    @property
    def fields(self) -> dict[str, Any]:
        """``detail`` as a mapping: {} when it is not a JSON object (a reader of decisions on
        record treats an odd detail as saying nothing)."""
        try:
            detail = self.detail_value
        except ValueError:
            return {}
        return detail if isinstance(detail, dict) else {}


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of ``verify``: ``first_bad_seq`` is None when ok or when no entry is at fault.

    ``kind`` says what failed: ``key`` (the audit key is missing, unreadable or not the one the
    trail was written with), ``chain``, ``anchor``, ``empty`` or ``witness`` (a head published or
    anchored elsewhere that the log no longer matches); empty when ok.
    """

    ok: bool
    first_bad_seq: int | None
    reason: str
    kind: str = ""
    #: breaks in the chain covered by recorded breach decisions: (lost_from, decision seq)
    breaks: tuple[tuple[int, int], ...] = ()


def where(result: VerifyResult) -> str:
    """Where verification failed: ``first bad entry: seq N``, ``the anchor`` or ``the audit key``."""
    if result.kind == "key":
        return "the audit key"
    return f"first bad entry: seq {result.first_bad_seq}" if result.first_bad_seq is not None else "the anchor"


def failure(result: VerifyResult) -> str:
    """What failed, in one line: ``the audit trail failed verification (<where>): <reason>``.

    The one wording used for the breach register and every refusal, so a failure already
    recorded by ``audit verify`` is recognised by ``resolve``.
    """
    return f"the audit trail failed verification ({where(result)}): {result.reason}"


def refusal(result: VerifyResult) -> str:
    """The one-line refusal for a trail that does not verify."""
    fix = "fix the audit key as stated" if result.kind == "key" else RESOLVE_HINT
    return f"{failure(result)}. Refused: nothing is recorded until you {fix}"


# --- canonical form and hashing ---------------------------------------------------------


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def _canonical(fields: Mapping[str, Any]) -> bytes:
    return anchors.canonical(fields)


def entry_hash(key: Key, entry: Mapping[str, Any]) -> str:
    """HMAC-SHA256 (hex) over the canonical JSON of every field except ``entry_hash``.

    ``at`` is hashed as an ISO 8601 UTC string with microseconds and ``detail`` as its stored
    JSON text, so any change to the stored bytes changes the hash.
    """
    fields = {name: entry[name] for name in _HASHED}
    fields["at"] = _iso(fields["at"])
    return _hash_fields(key, fields)


def _hash_fields(key: Key, fields: Mapping[str, Any]) -> str:
    """The entry hash of an entry's fields, ``at`` already in its ISO form (:func:`entry_hash`)."""
    return hmac.new(key.material, _canonical(fields), hashlib.sha256).hexdigest()


def _row_ok(key: Key, row: Sequence[Any]) -> bool:
    """Whether a row as :data:`_SELECT` reads it holds its own entry hash (:func:`entry_hash`,
    with the fields taken from the row: the walk's hot path builds no ``Entry``)."""
    fields = dict(zip(_HASHED, row[:-1], strict=True))
    try:
        fields["at"] = _iso(_EPOCH + timedelta(microseconds=row[1]))
        return hmac.compare_digest(_hash_fields(key, fields), row[-1])
    except (TypeError, ValueError, OverflowError):  # a value of the wrong type (an edit): not as the haven wrote it
        return False


def _head_mac(key: Key, head: Mapping[str, Any]) -> str:
    return anchors.mac(key, head)


def _entry_ok(key: Key, entry: Entry) -> bool:
    try:
        return hmac.compare_digest(entry_hash(key, vars(entry)), entry.entry_hash)
    except (TypeError, ValueError):  # a value of the wrong type (an edit): not as the haven wrote it
        return False


# --- the identifier guard ---------------------------------------------------------------


#: what ``scrub`` puts where a run of digits looked like an NHS number
WITHHELD = "[number withheld]"


def scrub(text: str) -> str:
    """Machine-made text (a refusal naming a file, a hash prefix) made safe to record: every run
    that looks like an NHS number, hex tokens aside, becomes ``WITHHELD``. The guard below still
    refuses such a run in anything a person typed; this is for text the haven composed itself,
    whose digits come from file names and hashes, so recording the refusal never fails on them."""
    kept: list[str] = []
    last = 0
    for token in _HEX_TOKEN.finditer(text):
        kept.append(_NHS_LIKE.sub(WITHHELD, text[last : token.start()]))
        kept.append(token.group(0))
        last = token.end()
    kept.append(_NHS_LIKE.sub(WITHHELD, text[last:]))
    return "".join(kept)


def shown_name(name: str) -> str:
    """A received file's name as the haven shows and records it: in logs, Dagster metadata,
    reason files, quarantine and the batch register (the one rule for names from outside).

    First, on the raw name, every run of digits that spells a valid NHS number however it is
    grouped or written (any characters but letters between its digits, digits of any script
    or width: ``identifiers.nhs_numbers_in_text``), and every run of ten digits
    split 3-3-4 by at most two such characters (spaces, tabs, line feeds, ``_ , : ( )``,
    zero-width or non-UTF-8 characters), or not split at all, valid or not, is withheld, with
    no exception for hex-looking runs (CoP 8a: identifiers never reach logs or metadata).
    Postcodes and dates in a name are kept (a date names most extracts). Then bytes that are not UTF-8 and
    characters that do not print are written as backslash escapes, so a name can neither
    break a log line nor forge one. At most ``SHOWN_NAME_BYTES`` bytes are kept (the suffix
    stays), so the name and its reason file fit a file system's name limit. The name on the
    sender's side is unchanged."""
    for start, end in reversed(nhs_numbers_in_text(name)):
        name = name[:start] + WITHHELD + name[end:]
    withheld = _NAME_NHS_LIKE.sub(WITHHELD, name)
    try:
        raw = withheld.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no file system name decodes to
        raw = withheld.encode("utf-8", "surrogatepass")
    text = raw.decode("utf-8", "backslashreplace")
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return _at_most(shown, SHOWN_NAME_BYTES)


def shown_path(relative: str) -> str:
    """A path under the home as the haven records it: each part a :func:`shown_name` (a received
    file keeps its sender's name on disk until it is landed or shredded; a record of it, such as a
    disposal certificate, shows it as logs do)."""
    for start, end in reversed(nhs_numbers_in_text(relative)):  # a number spread over folders too
        relative = relative[:start] + WITHHELD + relative[end:]
    return "/".join(shown_name(part) for part in relative.split("/"))


#: ten digits, 3-3-4, each gap at most two characters that are neither letters nor digits
_NAME_NHS_LIKE = re.compile(r"(?<!\d)\d{3}[\W_]{0,2}\d{3}[\W_]{0,2}\d{4}(?!\d)")
#: bytes of a shown name: room for a SHA-256 prefix and ``.reason.json`` under the usual 255
SHOWN_NAME_BYTES = 200


def _at_most(name: str, limit: int) -> str:
    """``name`` cut to ``limit`` UTF-8 bytes, its suffix kept, the cut marked with ``~``."""
    if len(name.encode()) <= limit:
        return name
    dot = name.rfind(".")
    suffix = name[dot:] if 0 < dot and len(name) - dot <= 16 else ""
    stem = name[: len(name) - len(suffix)]
    while len((stem + "~" + suffix).encode()) > limit:
        stem = stem[:-1]
    return stem + "~" + suffix


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


#: what a command says when a person's text may hold an NHS number (:func:`holds_identifier`)
NO_IDENTIFIER_IN_TEXT = (
    "{what} looks like it holds an NHS number; it would be kept in the store, the audit trail and the exported "
    "registers, which never hold identifiers: write it without one (a release id, a pseudonym or a count); "
    "nothing was changed"
)


#: ten single digits each set apart by one space, dash or dot ("9 9 9 0 1 0 7 1 5 7")
_SPACED_DIGITS = re.compile(r"(?<![\d\w])\d(?:[ \-.]\d){9}(?![\w\d])")


def holds_identifier(*texts: str | None) -> bool:
    """Whether free text a person typed (a comment, a reason, a name) may hold an NHS number: ten
    digits as the audit log refuses them (:func:`_check_no_identifier`: in a row, or 3-3-4 with a
    separator), or ten single digits spaced out that pass the mod-11 check. A command asks this
    before it changes anything, so a refusal leaves nothing recorded without its audit entry
    (found by review). Dates, times and release ids pass (``2026-12-06 09:15``,
    ``statutory-gp-audit-r0001 2026-12-19``): the file-name rule (``nhs_numbers_in_text``), which
    joins every digit not parted by a letter, refused one comment in four of them."""
    for text in texts:
        if not text:
            continue
        if _NHS_LIKE.search(_HEX_TOKEN.sub(" ", text)):
            return True
        if any(is_valid_nhs(re.sub(r"\D", "", m.group())) for m in _SPACED_DIGITS.finditer(text)):
            return True
    return False


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
    """The ``Home`` whose store is attached to ``con`` as ``store`` (see ``safehaven.core.store``).

    The home that opened ``con`` comes first, with its configuration (its write-once anchor
    target); a connection opened some other way gets the home its attached file lies in.
    """
    opener = opened_by(con)
    if opener is not None:
        return opener
    row = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = ?", [CATALOG]).fetchone()
    if row and row[0]:
        path = Path(row[0])
        home = Home(path.parent.parent)
        if home.store_file.resolve() == path.resolve():
            return home
    raise ValueError("cannot tell the haven home from this connection; pass home=")


def _keyring(con: duckdb.DuckDBPyConnection, home: Home | None, keyring: KeyRing | None) -> tuple[Home, KeyRing]:
    """The home and key ring the trail is checked and written with: ``home`` else the one that opened
    ``con`` (``home_of``), and ``keyring`` else that home's ``keys/``.

    The one default of this module, kept on purpose (issue 13): the audit key is never sealed, so
    a custodian's ring reads the same ``keys/audit.key`` as the home's own, and every production
    caller means the connection's home. A ``keyring`` is given only to check the trail with
    another key directory (a swapped or missing key, ``tests/unit/test_audit.py``).
    """
    home = home or home_of(con)
    return home, keyring or KeyRing(home.keys)


def _table_exists(con: duckdb.DuckDBPyConnection, table: str = TABLE) -> bool:
    return table_exists(con, *table.split("."))


def ensure_table(con: duckdb.DuckDBPyConnection) -> None:
    """Create ``governance.audit_log`` and ``governance.audit_genesis`` if they do not exist."""
    schema.ensure(con, TABLE, GENESIS_TABLE)


def _row_entry(row: Sequence[Any]) -> Entry:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["at"] = _EPOCH + timedelta(microseconds=values["at"])
    return Entry(**values)


@dataclass(frozen=True)
class _Tail:
    """The last stored entry (``seq`` 0 and the genesis hash for an empty log) and the row count."""

    seq: int
    entry_hash: str
    entries: int


def _tail(con: duckdb.DuckDBPyConnection) -> _Tail:
    if not _table_exists(con):
        return _Tail(0, GENESIS, 0)
    row = con.execute(
        f"SELECT seq, entry_hash, (SELECT count(*) FROM {TABLE}) FROM {TABLE} ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    return _Tail(int(row[0]), str(row[1]), int(row[2])) if row else _Tail(0, GENESIS, 0)


def _entry_at(con: duckdb.DuckDBPyConnection, seq: int) -> Entry | None:
    row = con.execute(_SELECT + " WHERE seq = ?", [seq]).fetchone()
    return _row_entry(row) if row else None


def _genesis(con: duckdb.DuckDBPyConnection) -> tuple[int, str] | None:
    if not _table_exists(con, GENESIS_TABLE):
        return None
    row = con.execute(f"SELECT seq, entry_hash FROM {GENESIS_TABLE} ORDER BY seq LIMIT 1").fetchone()
    return (int(row[0]), str(row[1])) if row else None


def _genesis_key(keyring: KeyRing) -> Key:
    """The key a new trail is written with, staged until its first entry is anchored (module
    docstring); the one an interrupted genesis staged, if any."""
    if keyring.exists(GENESIS_KEY):
        return keyring.get(GENESIS_KEY)
    return keyring.write(GENESIS_KEY, secrets.token_bytes(KEY_BYTES), record=False)


def _install_genesis_key(keyring: KeyRing, key: Key) -> Key:
    """Install the staged key as the audit key (recorded in the key ring) and shred the staged file."""
    installed = keyring.write(KEY_PURPOSE, key.material)
    keyring.discard(GENESIS_KEY)
    return installed


def _finish_genesis(con: duckdb.DuckDBPyConnection, home: Home, keyring: KeyRing) -> None:
    """Complete a genesis a crash interrupted (module docstring), before anything reads the key.

    Installed and recorded but the staged copy left: the copy is shredded. Installed, not
    recorded, or not installed with the log verifying under the staged key: completed only for
    a genesis (:func:`_unfinished_genesis`: the log holds entry 1 alone, and nothing else shows the
    trail or the haven was used before), by anchoring the head if its file is missing and
    installing and recording the key. Anything else (no staged key, a key the log does not verify
    under, a log past entry 1, an audit key on record) is left for ``verify`` to judge, so a key
    someone staged after rewriting the log is never adopted (CoP 23d).
    """
    if not keyring.exists(GENESIS_KEY):
        return
    staged_key = keyring.get(GENESIS_KEY)
    if keyring.exists(KEY_PURPOSE):
        _finish_installed(con, home, keyring, staged_key)
        return
    if not _unfinished_genesis(con, home, keyring, staged_key):
        return  # with no entry 1 the next append uses the staged key
    bad, last_seq, last_hash = _check_chain(con, staged_key, _breaks(con, staged_key))
    if bad is not None:
        return
    if anchors.read_head(home) is None:  # killed before (or while) anchoring entry 1
        _anchor_everywhere(home, staged_key, Anchor(last_seq, last_hash, _tail(con).entries))
    _install_genesis_key(keyring, staged_key)


def _finish_installed(con: duckdb.DuckDBPyConnection, home: Home, keyring: KeyRing, staged_key: Key) -> None:
    """The staged key was installed: record it if a genesis was killed before its record, and
    shred the staged copy once the installed key is on record (:func:`_finish_genesis`)."""
    if keyring.get(KEY_PURPOSE).material != staged_key.material:
        return
    if not keyring.recorded(KEY_PURPOSE):  # killed between the key file and its record
        if not _unfinished_genesis(con, home, keyring, staged_key):
            return
        keyring.write(KEY_PURPOSE, staged_key.material, replace=True)
    keyring.discard(GENESIS_KEY)


def _unfinished_genesis(con: duckdb.DuckDBPyConnection, home: Home, keyring: KeyRing, staged_key: Key) -> bool:
    """Whether the log is a new trail's first entry alone, written with ``staged_key`` and not yet
    complete: entry 1 is the only entry, nothing shows prior use (:func:`_prior_use`: no audit key
    on record, no other key's epoch, no published head, no data in the store), and no anchor
    names a later entry (CoP 23d: a trail is started once, by the haven)."""
    tail = _tail(con)
    if (tail.seq, tail.entries) != (1, 1) or _prior_use(con, home, keyring, own=staged_key.key_id) is not None:
        return False
    head = anchors.read_head(home)
    anchored = [*([] if head is None else [head.get("seq")]), *(h.get("seq") for h in anchors.read_history(home) or [])]
    return all(seq == 1 for seq in anchored) and set(anchors.worm_seqs(home.audit_worm)) <= {1}


def _read_key(keyring: KeyRing) -> Key | None:
    """The audit key, or None when it does not exist; KeyRingError when it is unsafe or unreadable."""
    return keyring.get(KEY_PURPOSE) if keyring.exists(KEY_PURPOSE) else None


# --- fail closed on append --------------------------------------------------------------


def _tail_matches_anchor(con: duckdb.DuckDBPyConnection, home: Home, key: Key, tail: _Tail) -> bool:
    """The cheap pre-append test (see the module docstring): True when the tail is the anchored head."""
    head = anchors.read_head(home)
    if not head or not anchors.mac_ok(key, head):
        return False
    if (head.get("seq"), head.get("entry_hash")) != (tail.seq, tail.entry_hash):
        return False
    if "entries" in head:  # heads written before the anchor history have no count and no history
        last = anchors.last_history_line(home)
        if head["entries"] != tail.entries or not last or not anchors.mac_ok(key, last):
            return False
        if (last.get("seq"), last.get("entry_hash")) != (tail.seq, tail.entry_hash):
            return False
    entry = _entry_at(con, tail.seq)
    worm_ok = _worm_setting(head, home.audit_worm) is None and _worm_agrees(home.audit_worm, tail)
    return entry is not None and _entry_ok(key, entry) and worm_ok


def _worm_setting(head: Mapping[str, Any], worm: Path | None) -> str | None:
    """Why the write-once target is not usable as configured (None: it is, or none is needed): one
    is configured but is not a directory (not mounted), or the head was anchored with one and none
    is configured now. Without it a complete local rollback would pass unseen (found by review)."""
    if worm is not None and not worm.is_dir():
        return (
            f"the write-once target {worm} is configured but is not a directory (not mounted?): mount or "
            "create it, then run again"
        )
    if worm is None and head.get("worm") is True:
        return (
            "the audit trail was anchored in a write-once target, and none is configured now (the resource's "
            "audit_worm_dir, or $SAFEHAVEN_AUDIT_WORM for commands): configure it again, then run again"
        )
    return None


def _worm_agrees(worm: Path | None, tail: _Tail) -> bool:
    """The write-once target ``worm`` (if any) holds the tail's anchor and nothing newer than it."""
    if worm is None:
        return True
    newer = anchors.read_worm(worm, tail.seq + 1)
    current = anchors.read_worm(worm, tail.seq)
    return newer is None and current is not None and current.get("entry_hash") == tail.entry_hash


def _fresh(con: duckdb.DuckDBPyConnection, home: Home, keyring: KeyRing) -> bool:
    """An empty log that nothing says was ever written: the one test of ``verify`` for an empty log
    (:func:`_evidence_of_use`: no anchor, genesis row, audit key or key on record, published head,
    or data in the store), so ``check`` never lets a wiped trail start again (CoP 23d)."""
    return _evidence_of_use(con, home, keyring) is None


def check(
    con: duckdb.DuckDBPyConnection,
    home: Home | None = None,
    *,
    keyring: KeyRing | None = None,
) -> _Tail:
    """Raise ``AuditTrailBroken`` unless the log may be appended to (rule in the module docstring);
    return its tail, as checked (for the append that follows, which need not read it again).

    Cheap when the tail matches its anchor; otherwise, or while a staged genesis key waits to be
    completed (:func:`_finish_genesis`, which only a log holding entry 1 alone may complete), a
    full ``verify`` finds the first bad entry.
    """
    home, keyring = _keyring(con, home, keyring)
    tail = _tail(con)
    try:
        key = _read_key(keyring)
    except KeyRingError:
        key = None
    if tail.seq == 0 and _fresh(con, home, keyring):
        return tail
    # a genesis to complete first (verify does: _finish_genesis), only ever for a log of entry 1 alone
    unfinished = tail.seq <= 1 and keyring.exists(GENESIS_KEY)
    if key is not None and tail.seq and not unfinished and _tail_matches_anchor(con, home, key, tail):
        return tail
    result = verify(con, home, keyring=keyring)
    if not result.ok:
        raise AuditTrailBroken(result)
    return _tail(con)


#: Inside :func:`one_walk`: per connection, the first ``seq`` of a walk that found the trail sound,
#: and the tail it ended at.
_WALKED: contextvars.ContextVar[dict[int, tuple[int, _Tail, tuple]] | None] = contextvars.ContextVar(
    "safehaven_audit_walked", default=None
)


@contextlib.contextmanager
def one_walk() -> Iterator[None]:
    """Within the block, :func:`authentic_from` walks the trail once per connection: a later call
    for an entry at or after the start of a sound walk, with the tail and the breach decisions
    unchanged, is answered from it (the entries it asks about were checked by that walk). For a
    caller that checks several decisions at once, in its own code with the store held (every
    agreement's decision: ``safehaven.share.approvals.effective_agreements``); outside a block,
    every call walks."""
    token = _WALKED.set({})
    try:
        yield
    finally:
        _WALKED.reset(token)


def authentic_from(con: duckdb.DuckDBPyConnection, seq: int, home: Home | None = None) -> bool:
    """Whether the entries from ``seq`` to the end are as the haven wrote them: the tail checked
    against its anchor (:func:`check`), then each entry's hash under the audit key and its link to
    the entry before, passing over a range written off by a breach decision (:func:`verify`'s
    walk from ``seq``; an entry inside such a range is not authentic). For a caller that trusts
    one recent entry (the objection register's seal, ``safehaven.protect.register_seal``; an
    agreement's decision): it costs the entries since ``seq`` (about 14 microseconds each)."""
    try:
        home, keyring = _keyring(con, home, None)  # the home's ring: the audit key is never sealed
        tail = check(con, home, keyring=keyring)
        key = _read_key(keyring)
    except (AuditTrailBroken, KeyRingError):
        return False
    if key is None or _entry_at(con, seq) is None:
        return False
    breaks = _breaks(con, key)  # a range a person wrote off after a breach is passed over, as verify does
    if _covered(breaks, seq):
        return False
    walked = _WALKED.get()
    done = walked.get(id(con)) if walked is not None else None
    decision = any(b.seq == seq for b in breaks)  # a walk from a decision checks it as a start: walk
    if done is not None and done[0] <= seq and done[1:] == (tail, tuple(breaks)) and not decision:
        return True
    sound = _check_chain(con, key, breaks, start=seq)[0] is None
    if sound and walked is not None:
        walked[id(con)] = (seq, tail, tuple(breaks))
    return sound


def derived_key(con: duckdb.DuckDBPyConnection, info: bytes, home: Home | None = None) -> bytes:
    """A key derived (HKDF-SHA256, ``info`` naming its use) from the audit key, for a seal that
    someone holding only the store key must not be able to make (the objections batches' MACs,
    ``safehaven.intake.batch_seal``). Raises KeyRingError when there is no audit key yet."""
    _, keyring = _keyring(con, home, None)  # the home's ring: the audit key is never sealed
    return key_derived_from(keyring, info)


def key_derived_from(keyring: KeyRing, info: bytes) -> bytes:
    """:func:`derived_key` from a key ring (a caller with no store connection: the disposal journal)."""
    key = _read_key(keyring)
    if key is None:
        raise KeyRingError("there is no audit key yet: the audit trail has no entry")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(key.material)


def head(
    con: duckdb.DuckDBPyConnection,
    home: Home | None = None,
    *,
    keyring: KeyRing | None = None,
) -> dict[str, Any]:
    """The checked head to publish: ``{"seq", "entry_hash"}`` (seq 0 for an empty log).

    Raises ``AuditTrailBroken`` when the trail does not verify against its anchor, so nothing
    is published with a head that a rollback produced.
    """
    tail = check(con, home, keyring=keyring)
    return {"seq": tail.seq, "entry_hash": tail.entry_hash}


# --- the API ----------------------------------------------------------------------------


def _insert(con: duckdb.DuckDBPyConnection, key: Key, prepared: list[dict[str, Any]], seq: int, prev: str) -> str:
    """Hash and insert ``prepared`` from ``seq`` on after ``prev``, in the caller's transaction.

    One columnar INSERT; records the genesis when entry 1 is among them. Returns the last hash.
    """
    at = datetime.now(UTC)
    for entry in prepared:
        entry.update(seq=seq, at=at, prev_hash=prev)
        entry["entry_hash"] = prev = entry_hash(key, entry)
        seq += 1
    others = [name for name in _COLUMNS if name not in ("seq", "at")]
    con.execute(
        f"INSERT INTO {TABLE} SELECT unnest(?::BIGINT[]), CAST(? AS TIMESTAMPTZ), "
        + ", ".join("unnest(?::VARCHAR[])" for _ in others),
        [[e["seq"] for e in prepared], _iso(at), *([e[n] for e in prepared] for n in others)],
    )
    if prepared[0]["seq"] == 1 or _genesis(con) is None:
        con.execute(
            f"INSERT INTO {GENESIS_TABLE} SELECT seq, entry_hash, ?, now() FROM {TABLE} "
            f"WHERE seq = (SELECT min(seq) FROM {TABLE}) ON CONFLICT DO NOTHING",
            [key.key_id],
        )
    return prev


def _transaction(con: duckdb.DuckDBPyConnection, work: Any) -> Any:
    with transaction(con):
        return work()


def _anchor_everywhere(home: Home, key: Key, anchor: Anchor) -> None:
    """Write the anchor; a write-once target that refuses it is a rollback, reported as such."""
    try:
        anchors.write_all(home, key, anchor)
    except OSError as exc:
        raise AuditTrailBroken(
            VerifyResult(False, anchor.seq, f"the anchor of entry {anchor.seq} could not be written: {exc}", "anchor")
        ) from None


def append_many(
    con: duckdb.DuckDBPyConnection,
    entries: Iterable[Mapping[str, Any]],
    *,
    home: Home | None = None,
    keyring: KeyRing | None = None,
) -> list[int]:
    """Append entries (one per event, e.g. per release; never per patient row).

    Each entry is a mapping with the keyword arguments of ``append``. The log is first checked
    against its anchor (``check``; ``AuditTrailBroken`` when it does not verify, and nothing is
    written). All are then written in one transaction by one columnar INSERT and share one
    timestamp; the head is then anchored. Returns the new ``seq`` values. Raises ValueError for
    a malformed or identifier-bearing entry (then nothing is written).
    """
    prepared = [_prepare(item) for item in entries]
    if not prepared:
        return []
    home, keyring = _keyring(con, home, keyring)
    ensure_table(con)
    tail = check(con, home, keyring=keyring)
    genesis = tail.seq == 0 and _fresh(con, home, keyring)
    key = _genesis_key(keyring) if genesis else keyring.get_or_create(KEY_PURPOSE, allow_create=False)
    last = _transaction(con, lambda: _insert(con, key, prepared, tail.seq + 1, tail.entry_hash))
    seq = tail.seq + len(prepared)
    _anchor_everywhere(home, key, Anchor(seq, last, tail.entries + len(prepared)))
    if genesis:
        _install_genesis_key(keyring, key)
    return list(range(tail.seq + 1, seq + 1))


def append_if_sound(con: duckdb.DuckDBPyConnection, entries: Sequence[Mapping[str, Any]]) -> bool:
    """:func:`append_many` for a step that must not fail for its record (a landing already
    committed): False, with nothing written, when the trail refuses the entries (it does not
    verify, or the store cannot be written); the caller records them again later."""
    try:
        append_many(con, entries)
    except (AuditTrailBroken, ValueError, duckdb.Error):
        return False
    return True


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
    Raises ``AuditTrailBroken`` (nothing written) when the log does not verify.
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


def begin_run(
    con: duckdb.DuckDBPyConnection,
    home: Home,
    *,
    actor: str,
    job: str,
    run_id: str,
    keyring: KeyRing | None = None,
) -> int:
    """Start of a pipeline run: a full ``verify``, then an entry recording the run; returns its seq.

    Raises ``AuditTrailBroken`` when the trail does not verify, so the run does nothing (fail
    closed; CoP 23d). Recording every run also sets the genesis before any data lands.
    """
    result = verify(con, home, keyring=keyring)
    if not result.ok:
        raise AuditTrailBroken(result)
    return append(
        con,
        actor=actor,
        role="pipeline",
        action=RUN_ACTION,
        object=f"job:{job}",
        purpose="scheduled processing under the haven's agreements",
        detail={"run_id": run_id.replace("-", "")},
        home=home,
        keyring=keyring,
    )


# --- verification -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Break:
    """A recorded breach decision at ``seq``: entries ``lost_from`` .. ``seq - 1`` are written off."""

    lost_from: int
    seq: int
    tail_seq: int
    #: the decision could not know how many entries were lost (:func:`_end_unknown`)
    loss_unknown: bool = False

    def covers(self, seq: int) -> bool:
        return self.lost_from <= seq < self.seq


def _covered(breaks: Sequence[_Break], seq: int) -> bool:
    return any(b.covers(seq) for b in breaks)


def written_off(con: duckdb.DuckDBPyConnection, key: Key) -> tuple[tuple[int, int], ...]:
    """The ranges of entries breach decisions wrote off, as ``VerifyResult.breaks`` gives them
    ((lost_from, decision seq), in order), read under ``key``: for a caller that must know no entry
    it relies on was lost (the key custodian's recovery, ``safehaven.protect.key_record``)."""
    return tuple((b.lost_from, b.seq) for b in _breaks(con, key))


def _breaks(con: duckdb.DuckDBPyConnection, key: Key) -> list[_Break]:
    """The breach decisions whose own hash verifies under the audit key (nobody else can write one)."""
    found = []
    for row in con.execute(_SELECT + " WHERE action = ? ORDER BY seq", [SEGMENT_ACTION]).fetchall():
        entry = _row_entry(row)
        detail = entry.detail_value if _entry_ok(key, entry) else None
        if isinstance(detail, dict) and {"lost_from", "tail_seq"} <= set(detail):
            unknown = detail.get(LOSS_UNKNOWN) is True
            found.append(_Break(int(detail["lost_from"]), entry.seq, int(detail["tail_seq"]), unknown))
    return found


_BREACH = "restore the log from backup and record a breach"


def _check_entry(key: Key, entry: Entry, expected: int, prev: str) -> VerifyResult | None:
    """One ordinary entry: a gap before it, a broken link, or altered content."""
    if entry.seq != expected:
        reason = (
            f"audit entry {expected} is missing (the next stored entry is {entry.seq}): entries were deleted; {_BREACH}"
        )
        return VerifyResult(False, expected, reason, "chain")
    if entry.prev_hash != prev:
        reason = (
            f"audit entry {entry.seq} does not follow entry {entry.seq - 1} (its prev_hash does not match): "
            f"entries were reordered, inserted or replaced; {_BREACH}"
        )
        return VerifyResult(False, entry.seq, reason, "chain")
    if not _entry_ok(key, entry):
        reason = (
            f"audit entry {entry.seq} has been altered since it was written (its hash does not match its "
            f"content under the audit key); {_BREACH}"
        )
        return VerifyResult(False, entry.seq, reason, "chain")
    return None


def _check_decision(entry: Entry, brk: _Break, expected: int, prev: str) -> VerifyResult | None:
    """A breach decision: nothing missing before its range, and the log before it unchanged since."""
    if expected < brk.lost_from:
        reason = f"audit entry {expected} is missing (the next stored entry is {entry.seq}): entries were deleted"
        return VerifyResult(False, expected, f"{reason}; {_BREACH}", "chain")
    if expected - 1 != brk.tail_seq or entry.prev_hash != prev:
        reason = (
            f"the log before the breach decision at entry {entry.seq} is not as it was when the decision was "
            f"recorded (it ended at entry {brk.tail_seq}): entries were removed or added since; {_BREACH}"
        )
        return VerifyResult(False, entry.seq, reason, "chain")
    return None


def _check_row(key: Key, row: Sequence[Any], brk: _Break | None, expected: int, prev: str) -> VerifyResult | None:
    """A row the walk's quick test did not pass: a breach decision, or what is wrong with the entry."""
    entry = _row_entry(row)
    return _check_decision(entry, brk, expected, prev) if brk else _check_entry(key, entry, expected, prev)


def _check_chain(
    con: duckdb.DuckDBPyConnection, key: Key, breaks: Sequence[_Break] = (), start: int = 1
) -> tuple[VerifyResult | None, int, str]:
    """Walk the entries in ``seq`` order from ``start``: the first gap, chain break or altered entry.

    Entries inside a range written off by a breach decision are passed over (their stored hash
    still links the walk to the decision). A walk from a later ``start`` takes the link of the
    entry it starts at as given (:func:`authentic_from`). Returns the problem (or None), the last
    stored ``seq`` walked and its hash.
    """
    if not _table_exists(con):
        return None, 0, GENESIS
    decisions = {b.seq: b for b in breaks}
    expected, prev = start, GENESIS
    cursor = con.execute(_SELECT + " WHERE seq >= ? ORDER BY seq", [start])
    while batch := cursor.fetchmany(10_000):
        for row in batch:
            seq, prev_hash = row[0], row[-2]
            if seq == start > 1:
                prev = prev_hash
            if not _covered(breaks, seq):
                brk = decisions.get(seq)
                sound = brk is None and seq == expected and prev_hash == prev and _row_ok(key, row)
                bad = None if sound else _check_row(key, row, brk, expected, prev)
                if bad:
                    return bad, expected - 1, prev
            expected, prev = seq + 1, row[-1]
    return None, expected - 1, prev


def _qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def holds_data(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether any landed, released or published table (or the data release register) has a row."""
    tables = con.execute(
        "SELECT table_schema, table_name FROM information_schema.tables WHERE table_catalog = current_database() "
        f"AND table_type = 'BASE TABLE' AND table_schema IN ({', '.join('?' for _ in DATA_SCHEMAS)})",
        list(DATA_SCHEMAS),
    ).fetchall()
    if _table_exists(con, RELEASE_REGISTER):  # not the breach register: a refusal records its breach first
        tables.append(tuple(RELEASE_REGISTER.split(".")))
    return any(
        con.execute(f"SELECT EXISTS (SELECT 1 FROM {_qi(s)}.{_qi(t)})").fetchone()[0]  # type: ignore[index]
        for s, t in tables
    )


Witness = tuple[int, str, str]


def _published_heads(con: duckdb.DuckDBPyConnection, home: Home) -> list[Witness]:
    """Heads given to others: each data release register row's, and ``published/release.json``'s."""
    found: list[Witness] = []
    if _table_exists(con, REGISTER_HEADS):
        rows = con.execute(f"SELECT release_id, audit_head_seq, audit_head_hash FROM {REGISTER_HEADS}").fetchall()
        found += [(int(s), str(h), f"the data release register (release {r})") for r, s, h in rows]
    manifest = home.published / PUBLISHED_MANIFEST
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError, AttributeError):
        published = json.loads(manifest.read_text(encoding="utf-8"))["audit_head"]
        found.append((int(published["seq"]), str(published["entry_hash"]), f"published/{PUBLISHED_MANIFEST}"))
    return [w for w in found if w[0] > 0]


def _worm_witnesses(worm: Path | None) -> list[Witness]:
    """The oldest and newest anchors of the write-once target ``worm`` (none without one)."""
    seqs = anchors.worm_seqs(worm)
    picked = sorted({seqs[0], seqs[-1]}) if seqs else []
    return [
        (seq, str(anchor.get("entry_hash")), f"the write-once anchor for entry {seq}")
        for seq in picked
        if (anchor := anchors.read_worm(worm, seq)) is not None
    ]


def _evidence_of_use(con: duckdb.DuckDBPyConnection, home: Home, keyring: KeyRing) -> str | None:
    """What shows that an empty log once held entries (or should have), or None (CoP 23d)."""
    checks = (
        (lambda: anchors.read_head(home) is not None, f"the head anchor registers/{HEAD_FILE} exists"),
        (lambda: bool(anchors.read_history(home)), f"the anchor history registers/{anchors.HISTORY_FILE} has lines"),
        (lambda: _genesis(con) is not None, f"the genesis record {GENESIS_TABLE} holds the first entry's hash"),
        (lambda: keyring.exists(KEY_PURPOSE), "the audit key exists (it is created with the first entry)"),
        (lambda: bool(anchors.worm_seqs(home.audit_worm)), "the write-once target holds anchors"),
    )
    return next((text for test, text in checks if test()), None) or _prior_use(con, home, keyring)


def _prior_use(con: duckdb.DuckDBPyConnection, home: Home, keyring: KeyRing, *, own: str | None = None) -> str | None:
    """What shows the haven was used before, apart from the trail's own records (its anchors,
    genesis row and key): an audit key on record, published heads, data in the store; or None.
    ``own``: the id of the key a genesis is being completed with, whose epoch may already be
    on record (:func:`_unfinished_genesis`)."""
    checks = (
        (lambda: keyring.recorded(KEY_PURPOSE), "the key ring records an audit key (current, retired or destroyed)"),
        (lambda: _audit_epoch(con, own), f"{KEY_EPOCHS} records an audit key"),
        (lambda: bool(_published_heads(con, home)), "audit heads were published with releases"),
        (lambda: home.published.is_dir() and any(home.published.iterdir()), "published/ holds files"),
        (lambda: holds_data(con), "the store holds landed, released or published data (or haven or vault rows)"),
    )
    return next((text for test, text in checks if test()), None)


def _audit_epoch(con: duckdb.DuckDBPyConnection, own: str | None = None) -> bool:
    """Whether ``governance.key_epochs`` has a row for an audit key other than ``own``
    (``safehaven.core.pins``)."""
    if not _table_exists(con, KEY_EPOCHS):
        return False
    row = con.execute(
        f"SELECT EXISTS (SELECT 1 FROM {KEY_EPOCHS} WHERE purpose = ? AND key_id IS DISTINCT FROM ?)",
        [KEY_PURPOSE, own],
    ).fetchone()
    return bool(row and row[0])


def _check_empty(con: duckdb.DuckDBPyConnection, home: Home, keyring: KeyRing) -> VerifyResult:
    """An empty or missing log verifies only on a haven with no sign of ever having been used."""
    evidence = _evidence_of_use(con, home, keyring)
    if evidence is None:
        return VerifyResult(True, None, "the audit log is empty and nothing was anchored")
    reason = f"the audit log is empty or missing but {evidence}: every entry was removed (truncation); {_BREACH}"
    return VerifyResult(False, 1, reason, "empty")


def _key_problem(home: Home, keyring: KeyRing, key: Key) -> VerifyResult | None:
    """A swapped audit key: the key ring's record or every anchor names another key id."""
    try:
        pinned = keyring.current_id(KEY_PURPOSE)
    except (OSError, ValueError):
        pinned = None
    anchored = [
        str(r["key_id"]) for r in (anchors.read_head(home), anchors.last_history_line(home)) if r and r.get("key_id")
    ]
    if pinned and pinned != key.key_id:
        recorded = pinned
    elif anchored and all(k != key.key_id for k in anchored):
        recorded = anchored[0]
    else:
        return None
    return _swapped(keyring, key.key_id, recorded)


def _swapped(keyring: KeyRing, found: str, recorded: str) -> VerifyResult:
    return VerifyResult(
        False,
        None,
        f"the audit key {keyring.path(KEY_PURPOSE)} (id {found}) is not the key the audit trail was written "
        f"with (id {recorded}): it was swapped or replaced; restore the original key file from the key "
        "custodian's backup",
        "key",
    )


def _check_head_at(
    con: duckdb.DuckDBPyConnection,
    key: Key,
    head: Mapping[str, Any] | None,
    last_seq: int,
    last_hash: str,
) -> VerifyResult | None:
    """The head file is present, readable and MACed under ``key``, and names an entry still in the
    log ending at ``last_seq`` with the hash the log holds for it (entries after it aside)."""
    where = f"registers/{HEAD_FILE}"
    if head is None:
        return VerifyResult(
            False,
            None,
            f"the head anchor {where} is missing, so truncation of the audit log cannot be ruled out; "
            "restore the anchor from the write-once copy, or " + RESOLVE_HINT,
            "anchor",
        )
    try:
        seq, anchored = int(head["seq"]), str(head["entry_hash"])
    except (KeyError, TypeError, ValueError):
        reason = f"the head anchor {where} is unreadable; restore it from the write-once copy, or {RESOLVE_HINT}"
        return VerifyResult(False, None, reason, "anchor")
    mac_ok = anchors.mac_ok(key, head)
    advice = (
        f"; the anchor's own MAC does not verify either, so {where} was edited outside the "
        "haven: restore it from the write-once copy and verify again"
        if not mac_ok
        else f"; {_BREACH}"
    )
    if seq > last_seq:
        return VerifyResult(
            False,
            last_seq + 1,
            f"the audit log ends at entry {last_seq} but the head anchor records entry {seq}: "
            f"entries {last_seq + 1}-{seq} were removed (truncation){advice}",
            "anchor",
        )
    entry = _entry_at(con, seq)
    stored = last_hash if seq == last_seq else (entry.entry_hash if entry else GENESIS)
    if not hmac.compare_digest(stored, anchored):
        return VerifyResult(
            False,
            max(seq, 1),
            f"audit entry {seq} does not match the hash the head anchor records for it: the "
            f"log was rewritten from there, or the anchor is wrong{advice}",
            "anchor",
        )
    if not mac_ok:
        return VerifyResult(
            False,
            None,
            f"the head anchor {where} matches the log but its MAC does not verify, so the "
            "anchor file was edited outside the haven; restore it from the write-once copy",
            "anchor",
        )
    return None


def _check_head(
    con: duckdb.DuckDBPyConnection,
    key: Key,
    head: Mapping[str, Any] | None,
    last_seq: int,
    last_hash: str,
) -> VerifyResult | None:
    """Compare a verified chain ending at ``last_seq`` with the anchored head: :func:`_check_head_at`,
    then entries written after the head (the one failure ``anchor`` may clear)."""
    bad = _check_head_at(con, key, head, last_seq, last_hash)
    if bad or head is None:
        return bad
    seq = int(head["seq"])
    if seq < last_seq:
        return VerifyResult(
            False,
            seq + 1,
            f"audit entries {seq + 1}-{last_seq} were written after the last anchored head "
            f"(entry {seq}): an append was interrupted before anchoring, or entries were added "
            "outside the haven; review them, then re-anchor with: safehaven audit anchor",
            "anchor",
        )
    return None


def _history(home: Home, key: Key, head: Mapping[str, Any]) -> tuple[VerifyResult | None, list[dict[str, Any]]]:
    """The anchor history's last section (see ``anchors.check_history``), or the problem with it."""
    lines = anchors.read_history(home)
    where = f"registers/{anchors.HISTORY_FILE}"
    if not lines:  # missing, or emptied: every earlier anchored head would be lost unseen (found by review)
        if "entries" not in head:  # a head written before the anchor history existed
            return None, []
        state = "missing" if lines is None else "empty"
        return VerifyResult(False, None, f"the anchor history {where} is {state}; {RESOLVE_HINT}", "anchor"), []
    problem, section = anchors.check_history(key, lines)
    if problem:
        return VerifyResult(False, None, f"{problem}; {RESOLVE_HINT}", "anchor"), []
    return None, section


def _check_witnesses(
    con: duckdb.DuckDBPyConnection, breaks: Sequence[_Break], last_seq: int, witnesses: list[Witness]
) -> VerifyResult | None:
    """Every head anchored or published elsewhere must still be in the log with the same hash.

    A head beyond the end of the log means entries were cut off and the local anchor rolled
    back (a replayed anchor); a different hash means the log was rewritten from that entry.
    Heads inside a range written off by a breach decision are passed over.
    """
    live = [w for w in witnesses if w[0] > 0 and not _covered(breaks, w[0])]
    ahead = [w for w in live if w[0] > last_seq]
    if ahead:
        seq, _, where = max(ahead)
        reason = (
            f"{where} records entry {seq} but the audit log ends at entry {last_seq}: entries "
            f"{last_seq + 1}-{seq} were removed and the anchor rolled back; {_BREACH}"
        )
        return VerifyResult(False, last_seq + 1, reason, "witness")
    stored = dict(
        con.execute(
            f"SELECT w.seq, a.entry_hash FROM (SELECT unnest(?::BIGINT[]) AS seq) w JOIN {TABLE} a USING (seq)",
            [[w[0] for w in live]],
        ).fetchall()
    )
    for seq, anchored, where in sorted(live):
        if stored.get(seq) != anchored:
            reason = (
                f"audit entry {seq} does not match the hash {where} records for it: the log was rewritten; {_BREACH}"
            )
            return VerifyResult(False, seq, reason, "witness")
    return None


def _check_latest(section: list[dict[str, Any]], head: Mapping[str, Any], worm: Path | None) -> VerifyResult | None:
    """The newest history line and the write-once target ``worm`` are not behind the head file."""
    if section and (section[-1].get("seq"), section[-1].get("entry_hash")) != (head.get("seq"), head.get("entry_hash")):
        reason = (
            f"the anchor history ends at entry {section[-1].get('seq')} but the head anchor is at entry "
            f"{head.get('seq')}: history lines were cut off; {RESOLVE_HINT}"
        )
        return VerifyResult(False, None, reason, "anchor")
    seqs = anchors.worm_seqs(worm)
    if seqs and seqs[-1] < int(head["seq"]):
        reason = (
            f"the write-once target's newest anchor is entry {seqs[-1]} but the head is at entry {head['seq']}: "
            "anchors could not be written there; check the target, then re-anchor with: safehaven audit anchor"
        )
        return VerifyResult(False, None, reason, "anchor")
    return None


def _check_anchors(
    con: duckdb.DuckDBPyConnection, home: Home, key: Key, breaks: Sequence[_Break], last_seq: int, last_hash: str
) -> VerifyResult | None:
    """The head file, the anchor history, the genesis record, published heads and the write-once target."""
    head = anchors.read_head(home)
    bad = _check_head(con, key, head, last_seq, last_hash)
    if bad or head is None:
        return bad
    unusable = _worm_setting(head, home.audit_worm)
    if unusable:
        return VerifyResult(False, None, unusable, "anchor")
    bad, section = _history(home, key, head)
    if bad:
        return bad
    witnesses = _anchored_heads(con, home, section)
    return _check_witnesses(con, breaks, last_seq, witnesses) or _check_latest(section, head, home.audit_worm)


def _anchored_heads(con: duckdb.DuckDBPyConnection, home: Home, section: list[dict[str, Any]]) -> list[Witness]:
    """Every head recorded outside the log but the head file: the anchor history's last
    ``section``, the genesis record, published heads and the write-once target."""
    genesis = _genesis(con)
    return [
        *(
            (int(line["seq"]), str(line["entry_hash"]), f"line {line.get('n')} of the anchor history")
            for line in section
        ),
        *([(genesis[0], genesis[1], f"the genesis record {GENESIS_TABLE}")] if genesis else []),
        *_published_heads(con, home),
        *_worm_witnesses(home.audit_worm),
    ]


def _shown(b: _Break) -> str:
    """One recorded breach decision as ``verify`` reports it."""
    if b.lost_from < b.seq:
        written_off = f"written off by the breach decision at entry {b.seq}"
        shown = f"; chain broken at entries {b.lost_from}-{b.seq - 1} ({written_off})"
    else:
        shown = f"; breach decision recorded at entry {b.seq}"
    return shown + (f" ({UNKNOWN_LOSS})" if b.loss_unknown else "")


def _ok(entries: int, breaks: Sequence[_Break]) -> VerifyResult:
    shown = "".join(_shown(b) for b in breaks)
    reason = f"the audit log verifies: {entries} entries, chain intact, head anchored{shown}"
    return VerifyResult(True, None, reason, "", tuple((b.lost_from, b.seq) for b in breaks))


def verify(
    con: duckdb.DuckDBPyConnection,
    home: Home | None = None,
    *,
    keyring: KeyRing | None = None,
) -> VerifyResult:
    """Check the key, the chain, then every anchor and published head; report the first bad ``seq``.

    Works on a read-only connection and never creates a key. ``first_bad_seq`` is the entry
    a person should look at first: the first missing, moved or altered entry, or for a
    truncated log the first entry that should exist but does not (last stored ``seq`` + 1).
    Guarantees when ok: every entry's hash verifies under the audit key and links to the one
    before (across recorded breach decisions, which are shown); the head file, the anchor
    history, the genesis record, every published head and the write-once target all name
    entries still in the log with the same hash, none beyond its end. A genesis a crash
    interrupted is completed first (``_finish_genesis``: it writes key and anchor files only).
    """
    home, keyring = _keyring(con, home, keyring)
    _finish_genesis(con, home, keyring)
    try:
        key = _read_key(keyring)
    except KeySubstituted as exc:  # the key ring pins every key (safehaven.core.keys)
        return _swapped(keyring, exc.found, exc.recorded)
    except KeyRingError as exc:
        return VerifyResult(False, None, f"cannot read the audit key: {exc}", "key")
    tail = _tail(con)
    if tail.seq == 0:
        return _check_empty(con, home, keyring)
    if key is None:
        return VerifyResult(
            False,
            None,
            f"the audit key {keyring.path(KEY_PURPOSE)} is missing, so the audit log cannot be "
            "verified; restore it from the key custodian's backup",
            "key",
        )
    bad = _key_problem(home, keyring, key)
    if bad:
        return bad
    breaks = _breaks(con, key)
    bad, last_seq, last_hash = _check_chain(con, key, breaks)
    return bad or _check_anchors(con, home, key, breaks, last_seq, last_hash) or _ok(tail.entries, breaks)


# --- re-anchoring and breach decisions --------------------------------------------------


def anchor(
    con: duckdb.DuckDBPyConnection,
    home: Home | None = None,
    *,
    keyring: KeyRing | None = None,
) -> int:
    """Re-anchor the head at the last entry, after a person has reviewed unanchored entries.

    Only for a trail whose one fault is that its anchors are behind it (CoP 23d): the chain
    verifies, the head file's MAC verifies and it names an entry still in the log with its hash
    (entries written after it: an append interrupted before anchoring), the anchor history
    verifies (``anchors.check_history``) and is not behind the head file, and every head anchored
    or published elsewhere is still in the log; or a write-once target that was unavailable.
    Refuses anything else (ValueError): a broken chain, a swapped key, a missing or edited head
    file, or a head beyond the log (a truncation, even with the history cut back to match) needs
    a recorded breach decision (``resolve``). Returns the anchored ``seq``.
    """
    home, keyring = _keyring(con, home, keyring)
    key = keyring.get(KEY_PURPOSE)
    breaks = _breaks(con, key)
    bad, last_seq, last_hash = _check_chain(con, key, breaks)
    if bad is not None:
        raise ValueError(f"will not anchor an audit log that fails verification: {bad.reason}")
    bad = _key_problem(home, keyring, key)
    if bad is not None:
        raise ValueError(f"will not anchor with this audit key: {bad.reason}")
    bad = _not_only_behind(con, home, key, breaks, last_seq, last_hash)
    if bad is not None:
        raise ValueError(f"will not anchor over a rollback: {bad.reason}")
    _anchor_everywhere(home, key, Anchor(last_seq, last_hash, _tail(con).entries))
    return last_seq


def _not_only_behind(
    con: duckdb.DuckDBPyConnection, home: Home, key: Key, breaks: Sequence[_Break], last_seq: int, last_hash: str
) -> VerifyResult | None:
    """What ``verify`` finds wrong with the anchors of a chain that verifies, other than their
    being behind it (:func:`anchor`): the head file (:func:`_check_head_at`), the anchor history
    (its MACs, links and numbering, and not behind the head file), and every anchored or
    published head still in the log with the same hash; None when re-anchoring is safe."""
    head = anchors.read_head(home)
    bad = _check_head_at(con, key, head, last_seq, last_hash)
    if bad or head is None:
        return bad
    bad, section = _history(home, key, head)
    if bad:
        return bad
    if section and int(section[-1]["seq"]) < int(head["seq"]):  # the history cut back behind the head
        return _check_latest(section, head, None)
    return _check_witnesses(con, breaks, last_seq, _anchored_heads(con, home, section))


def _lines(home: Home) -> list[dict[str, Any]]:
    lines = anchors.read_history(home) or []
    return [line for line in lines if isinstance(line.get("seq"), int)]


#: the field of a breach decision recording that how many entries were lost cannot be known
LOSS_UNKNOWN = "loss_unknown"
UNKNOWN_LOSS = (
    "how many entries were lost is unknown: no head anchor or write-once anchor that verifies showed where the "
    "log ended, so the stored tail was the only sign of it"
)


def _end_unknown(home: Home, key: Key, tail: _Tail) -> bool:
    """Whether nothing shows where the log ended but the stored tail: no head anchor whose MAC
    verifies under the audit key and names the tail or an entry beyond it, and no write-once anchor
    at or beyond it. Those two are written at every append; a published head or an older line of
    the anchor history may be out of date, and says nothing of entries cut after it. A decision
    then cannot say how many entries were lost (entries cut from the tail leave no trace), so it
    says that rather than "none" (found by review: it recorded nothing lost, and started its segment
    at a cut entry's seq)."""
    head = anchors.read_head(home)
    if head and anchors.mac_ok(key, head) and isinstance(head.get("seq"), int) and head["seq"] >= tail.seq:
        return False
    for seq in (s for s in anchors.worm_seqs(home.audit_worm) if s >= tail.seq):
        anchor = anchors.read_worm(home.audit_worm, seq)
        if anchor and anchors.mac_ok(key, anchor) and anchor.get("seq") == seq:
            return False
    return True


def _resume_seq(con: duckdb.DuckDBPyConnection, home: Home, tail: _Tail) -> int:
    """The ``seq`` of a new segment: after every ``seq`` ever stored, anchored or published."""
    head = anchors.read_head(home) or {}
    seen = [
        tail.seq,
        head.get("seq") if isinstance(head.get("seq"), int) else 0,
        *(int(line["seq"]) for line in _lines(home)),
        *anchors.worm_seqs(home.audit_worm),
        *(w[0] for w in _published_heads(con, home)),
        (_genesis(con) or (0, GENESIS))[0],
    ]
    return max(seen) + 1


@dataclass(frozen=True)
class Decision:
    """A recorded breach decision: the entry that starts the new segment and what it wrote off."""

    seq: int
    breach_id: int
    lost_from: int
    lost_to: int
    #: nothing left showed where the log had ended (:func:`_end_unknown`)
    loss_unknown: bool = False


def _breach_id(con: duckdb.DuckDBPyConnection, result: VerifyResult, decision: str) -> int:
    """The breach already recorded for this failure by ``audit verify``, or a new one (CoP 23d)."""
    from safehaven.core import registers as reg

    what = failure(result)
    for b in reversed(reg.breaches(con)):
        if b["kind"] == "integrity_failure" and b["what"] == what:
            return int(b["breach_id"])
    return reg.record_breach(
        con,
        kind="integrity_failure",
        severity=2,
        what=what,
        remedial_action=decision,
        detail={"first_bad_seq": result.first_bad_seq},
    )


def resolve(
    con: duckdb.DuckDBPyConnection,
    home: Home | None = None,
    *,
    actor: str,
    decision: str,
    keyring: KeyRing | None = None,
) -> Decision:
    """Record the breach of a trail that fails verification and the decision to resume.

    The breach goes in the breach register (severity 2, unless ``audit verify`` recorded this
    very failure already) and the decision is audited as the first entry of a new segment,
    linked to the last entry still stored (module docstring). Afterwards the trail verifies
    again and shows the break. Refused (ValueError) when the trail verifies, or when the audit
    key is the problem: restore the key first, since a decision signed with another key would
    disown every earlier entry.
    """
    home, keyring = _keyring(con, home, keyring)
    if not decision.strip():
        raise ValueError("a breach decision needs the decision: what was found and why work may resume")
    result = verify(con, home, keyring=keyring)
    if result.ok:
        raise ValueError("the audit trail verifies: there is no breach to resolve")
    if result.kind == "key":
        raise ValueError(f"{result.reason}; a breach decision needs the right audit key")
    ensure_table(con)
    tail = _tail(con)
    key = keyring.get_or_create(KEY_PURPOSE, allow_create=tail.seq == 0)
    resume = _resume_seq(con, home, tail)
    lost_from = min(result.first_bad_seq or resume, resume)
    unknown = _end_unknown(home, key, tail)

    def work() -> tuple[int, str]:
        breach = _breach_id(con, result, decision)
        entry = _prepare(
            {
                "actor": actor,
                "role": "governance",
                "action": SEGMENT_ACTION,
                "object": f"audit:breach-{breach}",
                "purpose": "resume the audit trail after a recorded breach of its integrity (CoP 23d)",
                "outcome": "resumed",
                "detail": {
                    "breach_id": breach,
                    "first_bad_seq": result.first_bad_seq,
                    "lost_from": lost_from,
                    "tail_seq": tail.seq,
                    "tail_hash": tail.entry_hash,
                    "reason": result.reason,
                    "decision": decision,
                    **({LOSS_UNKNOWN: True} if unknown else {}),
                },
            }
        )
        return breach, _insert(con, key, [entry], resume, tail.entry_hash)

    breach, last = _transaction(con, work)
    _anchor_everywhere(home, key, Anchor(resume, last, tail.entries + 1, segment_start=True))
    return Decision(resume, breach, lost_from, resume - 1, unknown)


def key_problem(con: duckdb.DuckDBPyConnection, home: Home, key: Key) -> str | None:
    """Why ``key`` is not the key this haven's trail was written with, or None when it is: every
    entry verifies under it and links to the one before, and no anchor names another key; never with
    an empty trail (a new trail's key is staged, ``audit-next``, until its first entry is anchored,
    so an installed key beside an empty log means the log was emptied). The key custodian's check
    of an audit key file the key ring has no note of (``safehaven.protect.key_record``): a swapped
    key beside an emptied log is not taken for a new trail's (found by review)."""
    if not _table_exists(con) or _tail(con).seq == 0:
        evidence = evidence_of_use(con, home) or "an installed audit key exists (a new trail's is staged until entry 1)"
        return f"the audit trail is empty, but {evidence}"
    anchored = [
        str(r["key_id"]) for r in (anchors.read_head(home), anchors.last_history_line(home)) if r and r.get("key_id")
    ]
    if anchored and all(k != key.key_id for k in anchored):
        return f"the trail's anchors name audit key {anchored[0]}"
    bad, _, _ = _check_chain(con, key, _breaks(con, key))
    return None if bad is None else "the audit trail does not verify under it"


def evidence_of_use(con: duckdb.DuckDBPyConnection, home: Home) -> str | None:
    """What shows an empty trail once held entries (or should have), judged without the key ring:
    anchors, the genesis record, published heads, data in the store; or None (:func:`key_problem`)."""
    checks = (
        (lambda: anchors.read_head(home) is not None, f"the head anchor registers/{HEAD_FILE} exists"),
        (lambda: bool(anchors.read_history(home)), f"the anchor history registers/{anchors.HISTORY_FILE} has lines"),
        (lambda: _genesis(con) is not None, f"the genesis record {GENESIS_TABLE} holds the first entry's hash"),
        (lambda: bool(anchors.worm_seqs(home.audit_worm)), "the write-once target holds anchors"),
        (lambda: bool(_published_heads(con, home)), "audit heads were published with releases"),
        (lambda: holds_data(con), "the store holds landed, released or published data (or haven or vault rows)"),
    )
    return next((text for test, text in checks if test()), None)


def latest_entry(con: duckdb.DuckDBPyConnection, object: str, actions: Sequence[str]) -> Entry | None:
    """The latest entry on ``object`` with one of ``actions``, as stored (unverified: a caller
    that trusts it checks it with :func:`authentic_from`)."""
    if not _table_exists(con):
        return None
    row = con.execute(
        f"{_SELECT} WHERE object = ? AND list_contains(?::VARCHAR[], action) ORDER BY seq DESC LIMIT 1",
        [object, list(actions)],
    ).fetchone()
    return None if row is None else _row_entry(row)


def authentic_entries(
    con: duckdb.DuckDBPyConnection, actions: Sequence[str], home: Home | None = None, *, key: Key | None = None
) -> list[Entry]:
    """The entries with one of ``actions`` whose own hash verifies under the audit key, in order:
    each was written by the haven and reads as it was written (a copy at another place in the
    trail fails: the hash covers its number and link). For a caller that needs a decision to be
    on record (a fault resolved, a refresh attested: ``safehaven.protect.feed``); that none was
    removed is not checked, which can only make such a caller stricter. None without an audit key.
    ``key``: the audit key as read from its file by the key custodian's recovery of a lost key
    record (``safehaven.protect.key_record``), which the key ring refuses until it is recorded."""
    if not _table_exists(con):
        return []
    try:
        key = key or _read_key(_keyring(con, home, None)[1])
    except KeyRingError:
        return []
    if key is None:
        return []
    rows = con.execute(f"{_SELECT} WHERE list_contains(?::VARCHAR[], action) ORDER BY seq", [list(actions)]).fetchall()
    return [_row_entry(row) for row in rows if _row_ok(key, row)]


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
