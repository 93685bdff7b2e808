"""The plain copies a disposal reaches: release folders, staged release requests, quarantined
files, incoming copies (CoP 49).

Physical disposal destroys *all copies* (CoP 49): every file is listed with its size and SHA-256
when the disposal is planned, so the certificate can show what was destroyed. A symbolic link is
never followed. A received one (in quarantine/) is listed and later unlinked. A link in a folder
the haven wrote (a release, a staged request, the folder a stopped delivery left), or a link or
anything but a folder in that folder's place, refuses the disposal (:func:`files_under`): the
files it stands for may have been moved out of the disposal's reach.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from safehaven.core.audit import shown_path
from safehaven.core.files import sha256_file, stand_in
from safehaven.core.home import Home
from safehaven.core.store import table_exists
from safehaven.dispose.model import DisposalError
from safehaven.share import review
from safehaven.share.releases import staging_dir, zone_tables

REASON_SUFFIX = ".reason.json"


def file_entry(home: Home, path: Path, kind: str) -> dict[str, Any]:
    """One file of a plan: its path under the home, kind, size and SHA-256 (none for a link or a
    special file: a quarantined pipe would block a read for ever)."""
    with unreadable_refused(home, path):
        plain = stat.S_ISREG(os.lstat(path).st_mode)  # a link, pipe or device is never opened
        return {
            "path": str(path.relative_to(home.root)),
            "kind": kind,
            "bytes": path.stat().st_size if plain else 0,
            "sha256": sha256_file(path) if plain else None,
        }


@contextmanager
def unreadable_refused(home: Home, path: Path, doing: str = "read") -> Iterator[None]:
    """Refuse the disposal (``DisposalError``) when a file it must read or overwrite cannot be:
    a file it cannot read may be a copy it must destroy (fail closed). The OSError's own message
    names the raw path, which in incoming/ is a sender's name (CoP 8a): the refusal shows it as a
    shown name (``audit.shown_path``) with what to do."""
    try:
        yield
    except OSError as exc:
        raise DisposalError(
            f"cannot {doing} {_shown(home, path)} ({type(exc).__name__}): give the haven's user access to it, or "
            "remove it, then run the disposal again (an interrupted one: safehaven dispose --resume)"
        ) from None


def _shown(home: Home, path: Path) -> str:
    """``path`` as a refusal names it: under the home, each part shown (``audit.shown_path``)."""
    return shown_path(str(path.relative_to(home.root)) if path.is_relative_to(home.root) else path.name)


def files_under(home: Home, folder: Path, kind: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Every file (with size and hash) and directory under ``folder``, deepest directories first;
    none when nothing is there.

    The haven writes only plain files and folders there (a release, a staged request, the folder a
    stopped delivery left). A symbolic link (dangling or not) at ``folder`` or under it, or anything
    but a folder at ``folder``, may stand for files moved out of the disposal's reach: unlinking it
    would certify them destroyed while they survive (CoP 49: physical disposal destroys all copies).
    So the disposal is refused (``DisposalError``) naming it, at every run until a person puts the
    files back or destroys them and removes it (fail closed). A link is never followed. The folders
    the haven wrote above ``folder`` (``releases/<agreement>``) are held to the same rule, and a
    folder that cannot be listed refuses it too (:func:`_unlisted`).
    """
    files: list[dict[str, Any]] = []
    dirs: list[str] = []
    if not folder_in_place(home, folder, inside=True):
        return files, dirs
    for root, _subdirs, names in os.walk(folder, topdown=False, onerror=_unlisted(home), followlinks=False):
        base = Path(root)
        files += [file_entry(home, base / name, kind) for name in sorted(names)]
        dirs.append(str(base.relative_to(home.root)))
    return files, dirs


def planned_in_place(home: Home, path: Path, *, plain: bool) -> bool:
    """Whether a file a plan names in a folder the haven wrote (a release, a staged request) is
    still where it was planned; ``False`` when nothing is there (the files step decides then).

    The rule of :func:`files_under`, held again when the plan is carried out (after it was shown
    and confirmed, or at ``--resume``): a link, or anything but a folder, in place of a folder
    between the home's area (``releases/``, ``staging/``) and the file, or a link (or a folder;
    for a file planned with its hash, anything but a plain file) in place of the file, refuses the
    disposal (``DisposalError``). Shredding through the link would destroy files outside the
    haven; unlinking it would certify destroyed files that survive (CoP 49). A link is never
    followed.
    """
    if not folder_in_place(home, path.parent) or not os.path.lexists(path):
        return False
    mode = os.lstat(path).st_mode
    _refuse_stand_in(home, path, stat.S_ISLNK(mode) or stat.S_ISDIR(mode) or (plain and not stat.S_ISREG(mode)))
    return True


def folder_in_place(home: Home, folder: Path, *, inside: bool = False) -> bool:
    """Whether ``folder`` (one the haven wrote: a release, a staged request, ``quarantine/`` or
    ``incoming/<collection>``) is there; ``False`` when it or a folder above it is not. A link (dangling
    or not), or anything but a folder, in its place or in place of a folder between the home's area
    and it (with ``inside``, a link inside it too) refuses the disposal (``DisposalError``): the files
    it stands for may have been moved out of the disposal's reach, and walking through it would shred
    files outside the haven (CoP 49; the rule's one statement: ``safehaven.core.files.stand_in``)."""
    present, found = stand_in(home.root, folder, inside=inside)
    if found is not None:
        _refuse_stand_in(home, found, True)
    return present


def not_a_link(home: Home, path: Path) -> None:
    """Refuse the disposal when ``path``, in a folder the haven wrote, is a link (:func:`files_under`)."""
    _refuse_stand_in(home, path, path.is_symlink())


def _unlisted(home: Home) -> Callable[[OSError], None]:
    """``os.walk``'s error handler: a folder it cannot list refuses the disposal (its files may be
    copies it must destroy: fail closed), where ``os.walk`` alone would skip it unplanned."""

    def refuse(error: OSError) -> None:
        with unreadable_refused(home, Path(error.filename or home.root), "list"):
            raise error

    return refuse


def _refuse_stand_in(home: Home, path: Path, refused: bool) -> None:
    """Refuse the disposal when ``refused``: ``path`` is a link, or not a folder, where the haven
    wrote a file or folder (:func:`files_under`); says what to do, naming it by its shown path."""
    if not refused:
        return
    kinds = ((path.is_symlink, "a symbolic link"), (path.is_file, "a file"), (path.is_dir, "a folder"))
    what = next((name for test, name in kinds if test()), "something other than a file or folder")
    raise DisposalError(
        f"{_shown(home, path)} is {what}, not what the haven wrote there: the files that were there may "
        "have been moved out of the disposal's reach, and would survive it (CoP 49). Put them back in its "
        "place, or remove it once you have found and destroyed the files it stood for, then run the "
        "disposal again"
    )


def _quarantined_at(reason: Path, data: Path | None) -> tuple[datetime | None, dict[str, Any]]:
    """When a file was set aside (its reason file's ``quarantined_at``, else the file's mtime)."""
    info: dict[str, Any] = {}
    if reason.exists():
        try:
            info = json.loads(reason.read_text())
            return datetime.fromisoformat(str(info["quarantined_at"])), info
        except (OSError, ValueError, KeyError, TypeError):
            pass
    source = data if data is not None and data.exists() else reason
    if source.exists():
        return datetime.fromtimestamp(source.lstat().st_mtime, UTC), info
    return None, info


def _lone_reason_due(path: Path, cutoff: datetime, batch_ids: set[str]) -> list[Path]:
    """A reason file without its data file: due if its batch is disposed of or it is older than ``cutoff``."""
    data = path.with_name(path.name[: -len(REASON_SUFFIX)])
    if data.exists() or data.is_symlink():
        return []  # judged with its data file
    at, info = _quarantined_at(path, None)
    return [path] if info.get("sha256") in batch_ids or (at is not None and at < cutoff) else []


def _data_file_due(path: Path, cutoff: datetime) -> list[Path]:
    """A quarantined data file received before ``cutoff``, with its reason file."""
    reason = path.with_name(path.name + REASON_SUFFIX)
    at, _ = _quarantined_at(reason, path)
    if at is None or at >= cutoff:
        return []
    return [path, reason] if reason.exists() else [path]


def quarantine_files(
    home: Home, collection: str, cutoff: datetime, batch_ids: set[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Quarantined entries of ``collection`` received before ``cutoff`` (with their reason files), and
    the reason files of refused batches being disposed of: (files, folders). A folder received
    where a file should be was quarantined whole; it goes whole, every file in it (CoP 49). A link
    (or anything but a folder) in place of ``quarantine/<collection>`` refuses the disposal
    (:func:`folder_in_place`): walked through, it would shred files outside the home, and the
    files it stands for may have been moved out of the disposal's reach."""
    folder = home.quarantine_for(collection)
    if not folder_in_place(home, folder):
        return [], []
    chosen: list[Path] = []
    for path in sorted(folder.iterdir()):
        if path.name.endswith(REASON_SUFFIX):
            chosen += _lone_reason_due(path, cutoff, batch_ids)
        else:
            chosen += _data_file_due(path, cutoff)
    # a folder is planned by its own (shown) name only: the names inside it are a sender's, kept
    # out of the plain journal; the files step shreds all it holds and lists each in the certificate
    dirs = [str(p.relative_to(home.root)) for p in chosen if p.is_dir() and not p.is_symlink()]
    files = [file_entry(home, p, "quarantine") for p in chosen if not (p.is_dir() and not p.is_symlink())]
    return files, dirs


def incoming_copies(home: Home, collection: str, batch_ids: set[str]) -> list[dict[str, Any]]:
    """Copies of the disposed batches still waiting in ``incoming/<collection>`` (found by SHA-256).
    A link (or anything but a folder) in place of that folder refuses the disposal, as for
    quarantine (:func:`folder_in_place`; CoP 49), naming it by its shown path."""
    folder = home.incoming_for(collection)
    if not batch_ids or not folder_in_place(home, folder):
        return []
    return [
        {**file_entry(home, path, "incoming"), "path": shown_path(str(path.relative_to(home.root)))}
        for path in _waiting(folder)
        if _sha(home, path) in batch_ids
    ]


def _waiting(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink()) if folder.is_dir() else []


def waiting_by_sha(home: Home, folder: Path) -> dict[str, list[Path]]:
    """The files waiting in an incoming folder by SHA-256, in name order (each hashed once): how
    the files step finds again the copies a plan names by shown path and hash (the journal is a
    plain file, and a sender's name may hold an NHS number)."""
    found: dict[str, list[Path]] = {}
    for path in _waiting(folder):
        found.setdefault(_sha(home, path), []).append(path)
    return found


def _sha(home: Home, path: Path) -> str:
    with unreadable_refused(home, path):
        return sha256_file(path)


def release_tables(con: duckdb.DuckDBPyConnection | None, agreement_id: str) -> list[str]:
    """The release-zone tables of ``agreement_id`` (``safehaven.share.releases.zone_tables``)."""
    return [] if con is None else zone_tables(con, agreement_id)


def staged_requests(
    con: duckdb.DuckDBPyConnection | None,
    *,
    agreement: str | None = None,
    release_ids: tuple[str, ...] = (),
    collection: str | None = None,
    since: datetime | None = None,
) -> list[str]:
    """Release requests still staged (not yet delivered nor closed: ``review.OPEN``) that a disposal reaches.

    Of an agreement (all of them, or only ``release_ids``); or, for a collection, every
    record-level request holding it prepared since ``since`` (when its first disposed batch
    landed), as for the releases made from it.
    """
    if con is None or not table_exists(con, "governance", "release_requests"):
        return []
    where = [f"state IN ({', '.join('?' for _ in review.OPEN)})"]
    params: list[Any] = list(review.OPEN)
    if agreement is not None:
        where.append("agreement_id = ?")
        params.append(agreement)
    if release_ids:
        where.append("list_contains(?, release_id)")
        params.append(list(release_ids))
    if collection is not None:
        held = "string_split(json_extract_string(register_row, '$.collections'), ', ')"
        where += ["identifiability <> 'anonymised'", "prepared_at >= ?", f"list_contains({held}, ?)"]
        params += [since, collection]
    rows = con.execute(
        f"SELECT release_id FROM {review.REQUESTS} WHERE {' AND '.join(where)} ORDER BY prepared_at, release_id",
        params,
    ).fetchall()
    return [r[0] for r in rows]


def staged_files(
    con: duckdb.DuckDBPyConnection | None, home: Home, release_ids: list[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every file (kind ``staged``) and directory of the staging areas of ``release_ids``, and of
    the folder in ``releases/`` a stopped delivery of one of them moved its files into while it is
    neither registered nor delivered (``review.undelivered_folder``): withdrawn by the disposal,
    the request will never leave, so those files are shredded and certified with its staged ones,
    as a person's withdrawal shreds them (CoP 27b)."""
    files: list[dict[str, Any]] = []
    dirs: list[str] = []
    for rid in release_ids:
        undelivered = review.undelivered_folder(con, rid) if con is not None else None
        for folder in (staging_dir(home, rid), *([undelivered] if undelivered is not None else [])):
            found, subdirs = files_under(home, folder, "staged")
            files += found
            dirs += subdirs
    return files, dirs
