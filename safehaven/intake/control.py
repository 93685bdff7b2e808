"""Control totals: a file cut short at a row boundary is refused, not landed as a smaller file.

A truncated transfer (cut off, or the sender's disk full) that ends after a whole row reads as a
valid file with fewer rows: nothing in the file says rows are missing. A collection whose contract
says ``control: manifest`` (``safehaven.intake.contracts.Contract.control``) has each data file
sent with its sender's control file beside it in ``incoming/<collection>/``, named
``<data file name>.ctl.json`` (``CONTROL_SUFFIX``; ``extract.csv`` -> ``extract.csv.ctl.json``),
written last, holding a JSON object::

    {"rows": 1200, "sha256": "<hex SHA-256 of the data file's bytes>"}

``rows`` (required): the data rows, not counting the header; ``sha256`` (optional). No other key
is read, so none is accepted (a misspelt ``sha256`` would otherwise drop its check unseen). Rules
(the project's "fail closed" standard; CoP 7-9), applied by ``safehaven.intake.ingest``:

* a data file whose control file has not arrived (or is still being written) is not judged: it
  stays in ``incoming/`` for a later run, named as waiting for its control file;
* a control file that cannot be read as that object (not a plain file, larger than
  ``MAX_CONTROL_BYTES``, not UTF-8 JSON, a duplicate key, an unknown key, ``rows`` missing,
  negative or not a whole number, ``sha256`` not 64 hex characters) is ``file.control.unreadable``;
  a SHA-256 other than the file's is ``file.control.sha256``; a CSV that does not end with a line
  end was cut inside its last row (a row count cannot see that: the cut row still reads as a row,
  its last value shortened), ``file.control.last_row``; a row count other than the rows
  DuckDB read from the file (``file.control.rows``, checked inside the landing transaction, so
  nothing of the file commits) refuses the whole data file; its control file goes to quarantine
  with it;
* a landed (or already held) file's control file is removed with it, first (a run stopped between
  the two leaves a data file waiting, never an orphan), and each only while it is the entry read
  (:func:`identity`: a newer file of the name renamed into place stays for the next run);
* a data file whose control file could never be found by its name, because that name would exceed
  the file system's limit (:func:`unnameable`) or the control file is there named in another
  Unicode normalisation (:func:`near_miss`), is ``file.control.name`` (never left waiting for ever);
* a control file is checked again once open (``fstat``): one swapped for a folder or a link after
  it was checked, or any error reading it, is ``file.control.unreadable``, never a failed stage;
* a control file with no data file beside it, once it is complete, is ``file.control.orphan``.

Reasons carry counts (shown as names from outside are: an NHS-number-like count is withheld) and
never a value of the control file otherwise.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path

from safehaven.core.audit import shown_name
from safehaven.core.files import plain
from safehaven.intake.contracts import Contract
from safehaven.intake.refusals import FileRejected

#: the contract's ``control`` value asking for a control file with each data file
MANIFEST = "manifest"
#: a data file's control file is named ``<data file name>`` + this
CONTROL_SUFFIX = ".ctl.json"
#: the largest control file read, in bytes: ``{"rows": N, "sha256": "..."}`` is about 100
MAX_CONTROL_BYTES = 4096
ROWS, SHA256 = "rows", "sha256"
KEYS = frozenset({ROWS, SHA256})
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
RULE_UNREADABLE = "file.control.unreadable"
RULE_ROWS = "file.control.rows"
RULE_SHA256 = "file.control.sha256"
RULE_ORPHAN = "file.control.orphan"
RULE_LAST_ROW = "file.control.last_row"
RULE_NAME = "file.control.name"
#: the longest file name, in bytes, where the file system does not say (POSIX ``NAME_MAX``)
DEFAULT_NAME_MAX = 255
#: the one Unicode normal form names are compared in to find a near-miss (Linux tools write NFC)
NORMAL_FORM = "NFC"
_RESEND = "ask the sender to send the file again, with its control file written last"


@dataclass(frozen=True)
class Control:
    """What a control file says of its data file: its data rows and, if given, its SHA-256; and
    ``entry``, the identity (:func:`identity`) of the control file it was read from, so that only
    that entry is ever removed with its data file (a newer one renamed into place stays)."""

    rows: int
    sha256: str | None = None
    entry: tuple[int, int, int] | None = field(default=None, compare=False)


def identity(entry: os.stat_result) -> tuple[int, int, int]:
    """An entry's identity as read: inode, status-change time and size. A sender can set a file's
    modification time back (``os.utime``, ``cp -p``), never its status-change time, which the host
    sets on every write and rename; an entry renamed into place has another inode."""
    return entry.st_ino, entry.st_ctime_ns, entry.st_size


def controlled(contract: Contract) -> bool:
    """Whether the collection's data files each come with a control file (``control: manifest``)."""
    return contract.control == MANIFEST


def is_control(path: Path) -> bool:
    """Whether ``path`` is named as a control file (``CONTROL_SUFFIX``)."""
    return path.name.endswith(CONTROL_SUFFIX) and len(path.name) > len(CONTROL_SUFFIX)


def control_path(data: Path) -> Path:
    """The control file of the data file ``data``: beside it, ``<its name>.ctl.json``."""
    return data.with_name(data.name + CONTROL_SUFFIX)


def data_path(control: Path) -> Path:
    """The data file the control file ``control`` is for."""
    return control.with_name(control.name.removesuffix(CONTROL_SUFFIX))


def name_max(folder: Path) -> int:
    """The longest file name ``folder``'s file system holds, in bytes (``DEFAULT_NAME_MAX`` if it does not say)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX


def unnameable(data: Path) -> FileRejected | None:
    """``file.control.name`` when the control file of ``data`` could never be written: its name
    (``<data file name>.ctl.json``) is longer than the file system holds, so the data file would
    wait for ever for a file its sender cannot send (fail closed: refuse it, saying why)."""
    if len(os.fsencode(control_path(data).name)) <= name_max(data.parent):
        return None
    return FileRejected(
        RULE_NAME,
        f"the file's control file could never be placed: its name ({len(CONTROL_SUFFIX)} characters longer than "
        f"the file's) would exceed the file system's limit of {name_max(data.parent)} bytes; the file was not read",
        f"ask the sender to rename the file at least {len(CONTROL_SUFFIX)} bytes shorter and send it again, "
        "with its control file written last",
    )


def _normal(name: str) -> str:
    return unicodedata.normalize(NORMAL_FORM, name)


def near_miss(path: Path, name: str) -> Path | None:
    """An entry beside ``path`` named ``name`` in another Unicode normalisation (NFD for NFC, as a
    macOS sender's tools may write one name and not the other): the same letters to a person, other
    bytes to the file system; None if there is none, or ``name`` itself is there."""
    folder = path.parent
    if os.path.lexists(folder / name):
        return None
    try:
        return next((e for e in folder.iterdir() if e.name != name and _normal(e.name) == _normal(name)), None)
    except OSError:
        return None


def misnamed(data: Path) -> FileRejected:
    """``file.control.name``: the data file's control file is there under its name in another
    Unicode normalisation (:func:`near_miss`). Not paired by a normalised name: two names a person
    cannot tell apart never silently become one file's; the sender renames, or sends both again."""
    return FileRejected(
        RULE_NAME,
        "the file's control file is beside it under a name that looks the same but is written in another "
        "Unicode form (e.g. an accented letter as two characters, as some systems write names); the file was "
        "not read",
        "ask the sender to send the file and its control file again, both named from one system (the control "
        f"file named exactly the file's name and {CONTROL_SUFFIX})",
        {"control_for": shown_name(data.name)},
    )


def read_control(path: Path) -> Control:
    """The control file at ``path`` (:class:`Control`, with the identity of the entry read), or
    ``file.control.unreadable`` naming what is wrong with it (module docstring). Read without
    following a link; raises FileNotFoundError if it is gone."""
    data, entry = _control_bytes(path)
    return replace(parse_control(data), entry=identity(entry))


_NOT_PLAIN = "it is a link, a folder or another entry that is not a plain file; it was not read"


def _control_bytes(path: Path) -> tuple[bytes, os.stat_result]:
    """At most ``MAX_CONTROL_BYTES`` of a plain file (regular, one link; never followed), and the
    ``fstat`` of the descriptor read: the entry is checked again once open (it may have been
    swapped for a folder or a link since ``lstat``), and any error reading it is
    ``file.control.unreadable``, never an error that fails the stage (the ingest module's rule)."""
    if not plain(os.lstat(path)):
        raise unreadable(_NOT_PLAIN)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise unreadable(f"it could not be opened ({type(exc).__name__})") from None
    try:
        entry = os.fstat(fd)
        if not plain(entry):
            raise unreadable(_NOT_PLAIN)
        data = _read_at_most(fd, MAX_CONTROL_BYTES + 1)
    except OSError as exc:
        raise unreadable(f"it could not be read ({type(exc).__name__})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONTROL_BYTES:
        raise unreadable(f"it is larger than {MAX_CONTROL_BYTES:,} bytes")
    return data, entry


def _read_at_most(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of the open descriptor ``fd``."""
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def parse_control(data: bytes) -> Control:
    """A control file's bytes as :class:`Control` (module docstring), or ``file.control.unreadable``."""
    try:
        found = json.loads(data.decode("utf-8-sig"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise unreadable("it is not one UTF-8 JSON object with each key once") from None
    if not isinstance(found, dict):
        raise unreadable('it is not a JSON object ({"rows": N})')
    if set(found) - KEYS:
        raise unreadable(f"it holds {len(set(found) - KEYS)} key(s) other than rows and sha256")
    rows, sha = found.get(ROWS), found.get(SHA256)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise unreadable("its rows is missing, or not a whole number of 0 or more")
    if SHA256 in found and not (isinstance(sha, str) and _HEX64.fullmatch(sha)):
        raise unreadable("its sha256 is not 64 hexadecimal characters")
    return Control(rows, sha.lower() if isinstance(sha, str) else None)


def shown_count(n: int) -> str:
    """A count from outside as a reason shows it: grouped, an NHS-number-like one withheld (CoP 8a)."""
    return shown_name(f"{n:,}")


def unreadable(why: str) -> FileRejected:
    """The control file cannot be read as one (``file.control.unreadable``)."""
    return FileRejected(
        RULE_UNREADABLE,
        f"the file's control file cannot be read: {why}; the file was not landed",
        'ask the sender to write the control file again as {"rows": N} (optionally with "sha256"), '
        "and to send the file again with it",
    )


def check_sha256(control: Control, sha: str) -> None:
    """The control file's SHA-256, if it gives one, is the data file's (``file.control.sha256``)."""
    if control.sha256 is not None and control.sha256 != sha.lower():
        raise FileRejected(
            RULE_SHA256,
            "the control file's SHA-256 is not the file's: the file is not the one the sender "
            "described (cut short, changed or corrupted in transfer)",
            _RESEND,
        )


def check_last_row(path: Path) -> None:
    """A CSV ends with a line end, so its last row is whole (``file.control.last_row``): a transfer
    cut inside the last row leaves a row DuckDB still reads, one value shortened, which its count
    cannot show. Every CSV writer ends its last row so (the csv module, pandas, Excel, DuckDB)."""
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return  # refused as empty (``file.empty``) when it is read
            fh.seek(-1, os.SEEK_END)
            last = fh.read(1)
    except OSError:
        return  # refused as unreadable when it is read
    if last != b"\n":
        raise FileRejected(
            RULE_LAST_ROW,
            "the file does not end with a line end: the transfer was cut short inside its last row",
            _RESEND,
        )


def check_rows(control: Control, rows: int) -> None:
    """The file holds the data rows its control file says (``file.control.rows``): ``rows`` is
    what DuckDB read from it, so a CRLF, a byte-order mark or a quoted line break is never counted
    as a row, and the header never is."""
    if rows != control.rows:
        said, held = shown_count(control.rows), shown_count(rows)
        cause = "the transfer was cut short" if rows < control.rows else "the file holds rows its sender did not count"
        raise FileRejected(
            RULE_ROWS,
            f"the control file says {said} rows, the file holds {held}: {cause}",
            _RESEND,
            {"control_rows": said, "file_rows": held},
        )


def orphan() -> FileRejected:
    """A complete control file with no data file beside it (``file.control.orphan``)."""
    return FileRejected(
        RULE_ORPHAN,
        "a control file with no data file beside it (the data file was not sent, was renamed, or was "
        "removed before it was read)",
        "ask the sender to send the data file and its control file again, the control file written last",
    )


def companion(err: FileRejected, data_shown: str) -> FileRejected:
    """The refusal of a refused data file's control file, which goes to quarantine with it."""
    return FileRejected(
        err.rule,
        f"the control file of {data_shown}, refused with it: {err.reason}",
        err.action,
        {"control_for": data_shown},
    )
