"""Plain files inside the haven home: hashing, shredding, writing through a descriptor to the
end (``write_fully``) and replacing a file whole (``replace_whole``), in one place.

Rule (CoP 48-50; ``docs/rules.md`` "Disposal"): a plain copy of confidential data that is no longer
needed (a landed drop, a disposed release or quarantined file) is overwritten with random
bytes, synced, and only then unlinked. A symbolic link is unlinked without following it: its
target is outside what the haven disposes of.

The random bytes are the keystream of AES-256 in counter mode (the ``cryptography`` package's)
under a key and initial counter block drawn from ``os.urandom`` for each file and never kept
(:func:`random_stream`): without the key, the bytes cannot be told from ``os.urandom``'s own, and
no two files are overwritten alike. The file is overwritten in place, from its first byte to its
last, synced, and only then unlinked: truncated and written again, or unlinked first, it would
free its old blocks with the original bytes still on them. Every landing shreds the file it
landed (issue 22): drawn from ``os.urandom`` a megabyte at a time, 800 MB of random bytes took
1.4 s here, as a keystream 0.12 s; shredding the benchmark's 408 MB GP drop (written, synced,
unlinked) took 1.02 s before and 0.40 s after.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CHUNK = 1 << 20


def chunks(fh: BinaryIO) -> Iterator[bytes]:
    """The rest of ``fh``'s bytes in blocks of at most :data:`CHUNK`: the one loop by which a whole
    file is read (hashed, checked, counted), never a row at a time."""
    return iter(lambda: fh.read(CHUNK), b"")


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in chunks(fh):
            digest.update(chunk)
    return digest.hexdigest()


def plain(entry: os.stat_result) -> bool:
    """Whether a ``stat`` result is a plain file: regular (no link, folder, device or pipe) with
    one name (no hard link elsewhere, perhaps outside the home)."""
    return stat.S_ISREG(entry.st_mode) and entry.st_nlink == 1


def regular(entry: os.stat_result) -> bool:
    """Whether a ``stat`` result is a regular file (no link, folder, device or pipe), whatever
    other names it has."""
    return stat.S_ISREG(entry.st_mode)


def open_plain(path: Path, kind: Callable[[os.stat_result], bool] = plain) -> int | None:
    """A read-only descriptor of ``path`` if it is of ``kind`` (:func:`plain` by default; from
    ``lstat``, opened without following a link and checked again once open), else ``None``
    (missing, a link, a hard link for :func:`plain`, anything else). The caller closes it."""
    try:
        if not kind(os.lstat(path)):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    if kind(os.fstat(fd)):
        return fd
    os.close(fd)
    return None


def sha256_plain(path: Path, kind: Callable[[os.stat_result], bool] = plain) -> str | None:
    """SHA-256 of ``path`` if it is of ``kind`` (:func:`open_plain`), else ``None``. What the
    haven wrote and must vouch for is hashed so, never through a link (CoP 27h; fail closed)."""
    fd = open_plain(path, kind)
    if fd is None:
        return None
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as fh:
        for chunk in chunks(fh):
            digest.update(chunk)
    return digest.hexdigest()


#: what the keystream of :func:`random_stream` is taken from: counter mode XORs it onto these bytes
_ZEROS = bytes(CHUNK)


def random_stream(size: int) -> Iterator[bytes]:
    """``size`` random bytes, in blocks of at most ``CHUNK``, to overwrite a file with (module
    docstring): the AES-256-CTR keystream under a 256-bit key and a 128-bit initial counter block
    from ``os.urandom``, new for each call, so no two files are overwritten alike."""
    keystream = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    zeros = memoryview(_ZEROS)
    for start in range(0, size, CHUNK):
        yield keystream.update(zeros[: min(CHUNK, size - start)])


def write_fully(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` at ``fd`` (its offset, or its end when opened to append), the one
    place the haven writes through a descriptor: ``os.write`` may write fewer bytes than it is given,
    and a file shredded short keeps some of its bytes, an anchor line written short is half a line."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"the file could not be overwritten: {written} bytes written of {len(view)}")
        view = view[written:]


#: the suffix of the temporary file :func:`replace_whole` writes before renaming it into place
TEMP_SUFFIX = ".tmp"


def replace_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: into a new temporary file beside it (``.<name>.``,
    a random part and :data:`TEMP_SUFFIX`), synced, renamed over ``path``, and the folder synced. A
    run killed, or a disk filling, part-way leaves ``path`` as it was (absent, or its old text), never
    half of the new one: a safeguard reading ``path`` (a quarantined file's reason) sees it whole or
    missing. The temporary file is made new (``O_EXCL``, never through a link): its folder may hold
    names a sender chose (quarantine), and a fixed name there was a link a sender could plant, which
    the write followed (found by review). Only the file this call made is removed on failure."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """Sync a folder's entries (a rename into it, a file made in it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shred_file(path: Path) -> int:
    """Overwrite a regular file with random bytes, sync it, and unlink it; returns its size."""
    if not stat.S_ISREG(os.lstat(path).st_mode):  # a link, pipe or device holds no bytes of ours
        path.unlink()
        return 0
    fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    try:
        size = os.fstat(fd).st_size
        for block in random_stream(size):
            write_fully(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
    return size


def shred_tree(root: Path, before: Callable[[Path], object] | None = None) -> int:
    """Shred every regular file under ``root`` (``shred_file``, in path order; ``before`` is
    called on each first), then remove its folders, deepest first; returns the files shredded.
    A missing ``root`` is nothing to do. Links, pipes and other special files are removed
    (``shred_file``: never opened nor followed), so none is left to stop a folder's removal."""
    if not root.exists() and not root.is_symlink():
        return 0
    if root.is_symlink() or root.is_file():
        shred_file(root)
        return 1
    files = sorted(p for p in root.rglob("*") if p.is_symlink() or not p.is_dir())
    for path in files:
        if before is not None:
            before(path)
        shred_file(path)
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        folder.rmdir()
    root.rmdir()
    return len(files)


def written_parents(root: Path, folder: Path) -> list[Path]:
    """The folders between the home ``root``'s own area folder (``releases/``, ``staging/``: an
    operator may put one on another disk through a link) and ``folder``: the haven wrote them
    (``releases/<agreement>``)."""
    if not folder.is_relative_to(root):
        return []
    parts = folder.relative_to(root).parts
    return [root.joinpath(*parts[:depth]) for depth in range(2, len(parts))]


def stand_in(root: Path, folder: Path, *, inside: bool = False) -> tuple[bool, Path | None]:
    """Whether ``folder``, one the haven wrote under the home ``root``, is there, and the first path
    that stands in for what the haven wrote: a symbolic link (dangling or not), or anything but a
    folder, in its place or in place of a folder above it (:func:`written_parents`), or, with
    ``inside``, a link inside it. The rule (CoP 49; CoP 27b): such a path may stand for files moved
    out of the haven's reach; walked through, files outside the haven would be destroyed, and
    unlinked, files recorded destroyed would survive. So a disposal (``safehaven.dispose.found``)
    and a withdrawal (``safehaven.share.review``) refuse it, never following it."""
    for path in [*written_parents(root, folder), folder]:
        if not os.path.lexists(path):
            return False, None
        if path.is_symlink() or not path.is_dir():
            return True, path
    if inside:
        return True, next((p for p in sorted(folder.rglob("*")) if p.is_symlink()), None)
    return True, None
