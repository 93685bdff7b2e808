"""Where the audit head is anchored outside the store, so that rolling the log back is seen.

Rule (CoP 12 and 23d; Government response to the Caldicott review, recommendation 1): the
audit trail cannot be quietly altered. A hash chain alone cannot show that its newest entries
were cut off, so the head (last ``seq`` and its chained ``entry_hash``) is written to places
that the store key does not reach:

* **The head file** ``registers/audit_head.json``: the latest head, with an HMAC under the
  audit key. Replaced atomically on every anchor.
* **The anchor history** ``registers/audit_anchors.jsonl``: one line per anchor, append-only,
  each line numbered ``n`` from 1 and carrying the previous line's MAC (``prev``; the genesis
  for line 1) and its own MAC under the audit key, so lines cut off the front are seen as well
  as lines cut from the middle. ``seq`` never goes down along it, and every anchored ``seq``
  must still be in the log with the anchored hash; so replaying an older (genuine) head file
  after cutting the log back is caught by the newer lines. A line with ``segment_start`` true begins the section written
  after a recorded breach decision (``safehaven.core.audit.resolve``); sections before the
  last such line were judged by a person when the breach was recorded and are kept as
  evidence, not re-checked.
* **An external write-once target** (optional; ``Home.audit_worm``): a directory on
  WORM storage (or mounted object storage with object lock) where each anchor is created as
  ``anchor-<seq>.json`` with ``O_CREAT | O_EXCL``, mode 0444, and never overwritten. Someone
  who can rewrite the whole haven home, audit key included, still cannot remove or change an
  anchor there. Without it, a rollback that also rewrites the head file and cuts the anchor
  history back is only seen through the heads published to others (``release.json`` and the
  data release register).

Anchors hold sequence numbers, hashes and key ids only, never entry content.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safehaven.core.files import replace_whole, sync_folder, write_fully
from safehaven.core.home import Home
from safehaven.core.keys import Key

HEAD_FILE = "audit_head.json"
HISTORY_FILE = "audit_anchors.jsonl"
WORM_PREFIX = "anchor-"
GENESIS = "0" * 64
#: The last line of the history is read from this many bytes at the end of the file.
_TAIL_BYTES = 8192


@dataclass(frozen=True)
class Anchor:
    """A head to anchor: the last ``seq``, its ``entry_hash`` and how many entries the log holds."""

    seq: int
    entry_hash: str
    entries: int
    segment_start: bool = False


#: The encoder of :func:`canonical`, made once (``json.dumps`` with these settings makes one per call).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical(fields: Mapping[str, Any]) -> bytes:
    """JSON with sorted keys and no whitespace (the one canonical form of the audit trail)."""
    return _CANONICAL.encode(fields).encode("utf-8")


def mac(key: Key, fields: Mapping[str, Any]) -> str:
    """HMAC-SHA256 (hex) under ``key`` over every field except ``mac``."""
    body = {name: value for name, value in fields.items() if name != "mac"}
    return hmac.new(key.material, canonical(body), hashlib.sha256).hexdigest()


def mac_ok(key: Key, fields: Mapping[str, Any]) -> bool:
    """Whether ``fields["mac"]`` is the MAC of the other fields under ``key``."""
    try:
        return hmac.compare_digest(mac(key, fields), str(fields["mac"]))
    except (KeyError, TypeError, ValueError):
        return False


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# --- the head file ----------------------------------------------------------------------


def head_path(home: Home) -> Path:
    return home.registers / HEAD_FILE


def read_head(home: Home) -> dict[str, Any] | None:
    """The head file as a dict; None when absent, ``{}`` when unreadable."""
    path = head_path(home)
    if not path.exists():
        return None
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return head if isinstance(head, dict) else {}


def write_head(home: Home, key: Key, anchor: Anchor) -> dict[str, Any]:
    """Replace the head file atomically (temp file, fsync, rename, fsync the directory)."""
    head: dict[str, Any] = {
        "seq": anchor.seq,
        "entry_hash": anchor.entry_hash,
        "entries": anchor.entries,
        "key_id": key.key_id,
        "anchored_at": _now(),
        "worm": home.audit_worm is not None,  # so dropping the target's setting later is seen (verify)
    }
    head["mac"] = mac(key, head)
    home.registers.mkdir(parents=True, exist_ok=True)
    replace_whole(head_path(home), json.dumps(head, indent=2, sort_keys=True) + "\n")
    return head


# --- the anchor history -----------------------------------------------------------------


def history_path(home: Home) -> Path:
    return home.registers / HISTORY_FILE


def _parse(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def read_history(home: Home) -> list[dict[str, Any]] | None:
    """Every line of the anchor history (``{}`` for an unreadable line); None when absent."""
    path = history_path(home)
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    return [_parse(line) for line in text.splitlines() if line.strip()]


def last_history_line(home: Home) -> dict[str, Any] | None:
    """The newest line without reading the whole file; None when the history is absent or empty."""
    path = history_path(home)
    if not path.exists():
        return None
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - _TAIL_BYTES))
        lines = [line for line in fh.read().decode("utf-8", errors="replace").splitlines() if line.strip()]
    return _parse(lines[-1]) if lines else None


def append_history(home: Home, key: Key, anchor: Anchor) -> dict[str, Any]:
    """Append one anchor line, chained to the previous line's MAC, and fsync it."""
    last = last_history_line(home)
    line: dict[str, Any] = {
        "n": _int(last.get("n", 0)) + 1 if last else 1,  # an edited n must not stop resolve from anchoring
        "seq": anchor.seq,
        "entry_hash": anchor.entry_hash,
        "entries": anchor.entries,
        "key_id": key.key_id,
        "anchored_at": _now(),
        "segment_start": anchor.segment_start,
        "prev": str(last.get("mac", GENESIS)) if last else GENESIS,
    }
    line["mac"] = mac(key, line)
    home.registers.mkdir(parents=True, exist_ok=True)
    fd = os.open(history_path(home), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        write_fully(fd, canonical(line) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return line


def check_history(key: Key, lines: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """Check the section of the history after its last breach decision; returns (problem, section).

    Guarantees for that section (CoP 23d: nothing removed from the trail's evidence unseen):
    every line is readable and MACed under the audit key; its first line follows what came
    before it (with nothing before: ``n`` 1 and ``prev`` the genesis; after a segment start's
    predecessor: that line's ``n`` + 1 and MAC, as :func:`append_history` wrote it), so lines
    deleted from the front are seen; every later line is numbered one more than the line before
    and links to its MAC; and ``seq`` never decreases. The caller compares the section's
    anchored heads with the log and its last line with the head file.
    """
    start = max((i for i, line in enumerate(lines) if line.get("segment_start") and mac_ok(key, line)), default=0)
    section = lines[start:]
    before = lines[start - 1] if start else {}
    n, prev_mac, prev_seq = _int(before.get("n", 0)), str(before.get("mac", GENESIS)), 0
    for i, line in enumerate(section, start=start + 1):
        problem = _line_problem(key, line, i, n + 1, prev_mac) or _went_back(line, i, prev_seq)
        if problem:
            return problem, section
        n, prev_mac, prev_seq = int(line["n"]), str(line["mac"]), int(line["seq"])
    return None, section


def _int(value: Any) -> int:
    """``value`` as :func:`append_history` read it (``int``), or -1 when it is not a number (an edit)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _line_problem(key: Key, line: dict[str, Any], i: int, n: int, prev_mac: str) -> str | None:
    """Line ``i`` of the history: MACed under ``key``, numbered ``n`` and linked to ``prev_mac``."""
    if not mac_ok(key, line):
        return f"line {i} of the anchor history is unreadable or was edited (its MAC does not verify)"
    if line.get("prev") == prev_mac and line.get("n") == n:
        return None
    if i == 1:
        return f"line 1 of the anchor history is anchor {line.get('n')}, not {n}: the lines before it were removed"
    return f"line {i} of the anchor history does not follow line {i - 1}: lines were removed"


def _went_back(line: dict[str, Any], i: int, prev_seq: int) -> str | None:
    """Line ``i`` anchors an older entry than the line before it: an older anchor was replayed."""
    if int(line["seq"]) < prev_seq:
        return (
            f"line {i} of the anchor history goes back from entry {prev_seq} to entry {line['seq']}: "
            "an older anchor was replayed"
        )
    return None


# --- the external write-once target -----------------------------------------------------


def _worm_file(directory: Path, seq: int) -> Path:
    return directory / f"{WORM_PREFIX}{seq:012d}.json"


def read_worm(directory: Path | None, seq: int) -> dict[str, Any] | None:
    """The write-once anchor for ``seq`` in ``directory``; None when there is no target or no such anchor."""
    if directory is None or not _worm_file(directory, seq).exists():
        return None
    return _parse(_worm_file(directory, seq).read_text(encoding="utf-8", errors="replace"))


def worm_seqs(directory: Path | None) -> list[int]:
    """Every ``seq`` anchored in the write-once target ``directory``, ascending (empty without a target)."""
    if directory is None or not directory.is_dir():
        return []
    found = []
    for name in os.listdir(directory):
        stem = name.removeprefix(WORM_PREFIX).removesuffix(".json")
        if name.startswith(WORM_PREFIX) and stem.isdigit():
            found.append(int(stem))
    return sorted(found)


def write_worm(directory: Path | None, key: Key, anchor: Anchor) -> None:
    """Create ``anchor-<seq>.json`` in the write-once target ``directory``; never overwrite one.

    An existing anchor for the same ``seq`` and hash is left as it is (a re-anchor); one with a
    different hash means the log was rolled back and rewritten, so ``FileExistsError`` is raised.
    Does nothing when no target is configured (``directory`` None).
    """
    if directory is None:
        return
    fields: dict[str, Any] = {"seq": anchor.seq, "entry_hash": anchor.entry_hash, "key_id": key.key_id}
    fields["mac"] = mac(key, fields)
    path = _worm_file(directory, anchor.seq)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    except FileExistsError:
        if (read_worm(directory, anchor.seq) or {}).get("entry_hash") == anchor.entry_hash:
            return
        raise FileExistsError(
            f"the write-once target already holds a different anchor for entry {anchor.seq} ({path})"
        ) from None
    try:
        write_fully(fd, canonical(fields) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    sync_folder(directory)


def write_all(home: Home, key: Key, anchor: Anchor) -> None:
    """Anchor ``anchor`` everywhere: the history first, then the head file, then ``home.audit_worm``."""
    append_history(home, key, anchor)
    write_head(home, key, anchor)
    write_worm(home.audit_worm, key, anchor)
