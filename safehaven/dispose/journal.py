"""The disposal journal and the small helpers every step shares (CoP 48-50: disposal completes).

A disposal's steps are recorded in ``store/disposal.json`` (no values: batch ids, file names,
key ids), written atomically and synced, so that a crash at any point leaves a state the next
run completes (``safehaven.dispose`` package docstring).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import duckdb

from safehaven.core import audit
from safehaven.core.files import replace_whole
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing, KeyRingError
from safehaven.dispose.model import JOURNAL, DisposalError


def now() -> str:
    """The time now, UTC, to the second (ISO 8601)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def midnight(day: date) -> datetime:
    """00:00 UTC on ``day``: the cut-off for "received before ``day``"."""
    return datetime.combine(day, time(0), tzinfo=UTC)


def count(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> int:
    """The first column of the first row of ``sql`` (a count, or the rows a DML statement changed)."""
    row = con.execute(sql, params or []).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically: a synced temporary file renamed over it. Compact, one
    line: the files step saves the journal after every file it shreds, and indented JSON (Python's
    pure-Python encoder) of a plan naming 2,000 files took 15-20 ms a save, growing with the plan
    (found by review); the MAC covers the canonical form, not the file's layout."""
    replace_whole(path, json.dumps(data, sort_keys=True, separators=(",", ":"), default=str))


#: what the journal's MAC key is derived for (HKDF info, from the audit key)
_MAC_INFO = b"safehaven disposal journal v1"
#: the journal's field holding its MAC
MAC = "mac"


def canonical(value: dict[str, Any]) -> bytes:
    """The one canonical JSON of a journal's parts (keys sorted, no spaces, dates as text): what
    the journal's MAC and the audited plan digest (``safehaven.dispose.run.plan_digest``) cover."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def _mac(keyring: KeyRing, journal: dict[str, Any]) -> str:
    body = {k: v for k, v in journal.items() if k != MAC}
    return hmac.new(audit.key_derived_from(keyring, _MAC_INFO), canonical(body), hashlib.sha256).hexdigest()


def save_journal(home: Home, keyring: KeyRing, journal: dict[str, Any]) -> None:
    """Write the journal with a MAC over all of it under a key derived from the audit key: the file
    is beside the store, and whoever can write there must not be able to say which steps are done
    (a step marked done is skipped, and the certificate would claim it) or what they remove."""
    journal[MAC] = _mac(keyring, journal)
    write_json(journal_path(home), journal)


def journal_sound(keyring: KeyRing, journal: dict[str, Any]) -> bool:
    """Whether the journal is as the haven last wrote it (:func:`save_journal`)."""
    try:
        return hmac.compare_digest(str(journal.get(MAC)), _mac(keyring, journal))
    except (KeyRingError, TypeError, ValueError):
        return False


def journal_path(home: Home) -> Path:
    """``store/disposal.json``: the journal of the disposal under way."""
    return home.store_dir / JOURNAL


#: the fields every journal has, and their types (:func:`_start` of ``safehaven.dispose.run`` writes them)
_SHAPE = {"disposal_id": str, "target": dict, "plan": dict, "steps": dict}


def pending(home: Home) -> dict[str, Any] | None:
    """The journal of an interrupted disposal, if there is one; raises ``DisposalError`` for one that
    cannot be read as a journal (cut short, not JSON, a field missing or of another type), so every
    disposal waits, saying why, until a person removes it. Whether the haven wrote it as it stands
    is checked before it is carried out (``safehaven.dispose.run._started_on_record``)."""
    path = journal_path(home)
    if not path.exists():
        return None
    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        journal = None
    if not isinstance(journal, dict) or any(not isinstance(journal.get(k), t) for k, t in _SHAPE.items()):
        raise DisposalError(
            f"the disposal journal {path} cannot be read as a journal (cut short, or written outside the "
            "haven): nothing was disposed of; check it with the governance lead, restore it from a backup, "
            "or remove it and plan the disposal again"
        )
    return journal


def new_id() -> str:
    """A disposal id: ``D<UTC timestamp>-<6 hex digits>``."""
    return f"D{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"
