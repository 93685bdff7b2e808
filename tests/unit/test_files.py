"""Shredding (``safehaven.core.files``; CoP 48-50): a plain copy no longer needed is overwritten with
random bytes, synced, and only then unlinked."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from safehaven.core import files
from safehaven.core.files import CHUNK, random_stream, shred_file


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_the_stream_is_exactly_the_size_asked_in_blocks_of_at_most_a_chunk(size: int) -> None:
    blocks = list(random_stream(size))
    assert sum(len(b) for b in blocks) == size
    assert all(0 < len(b) <= CHUNK for b in blocks)


def test_no_two_streams_are_alike_and_neither_is_zeros_or_repeats_itself() -> None:
    first, second = b"".join(random_stream(2 * CHUNK)), b"".join(random_stream(2 * CHUNK))
    assert first != second
    assert first.count(0) < len(first) // 128, "about one byte in 256 is zero in random bytes"
    assert first[:CHUNK] != first[CHUNK:], "the counter runs on across blocks: no block repeats"
    assert len(zlib.compress(first)) > len(first) * 0.99, "random bytes do not compress"


def _with_second_name(tmp_path: Path, content: bytes) -> tuple[Path, Path]:
    """A file holding ``content`` and a second name (a hard link) of it: what shredding writes into
    the file stays readable through the second name once the first is gone."""
    path, other_name = tmp_path / "drop.csv", tmp_path / "other_name.csv"
    path.write_bytes(content)
    os.link(path, other_name)
    return path, other_name


def test_a_shredded_files_bytes_are_overwritten_with_random_ones_before_its_name_goes(tmp_path: Path) -> None:
    """Seen through a second name of the same file: the bytes the shredding wrote stay there."""
    original = b"9434765919,1970-01-01,LS1 4AP\n" * 50_000  # about 1.5 chunks of a drop
    path, other_name = _with_second_name(tmp_path, original)
    assert shred_file(path) == len(original)
    assert not path.exists()
    written = other_name.read_bytes()
    assert len(written) == len(original)
    assert b"9434765919" not in written and b"LS1 4AP" not in written
    assert len(zlib.compress(written)) > len(written) * 0.99, "overwritten with random bytes, not a pattern"


def _watched(monkeypatch: pytest.MonkeyPatch, path: Path, write: Callable[[int, bytes], int]) -> list[tuple]:
    """The calls ``shred_file`` makes on ``path``'s descriptor, in order, its writes made by ``write``;
    other descriptors are written as usual."""
    calls: list[tuple] = []
    real_open, real_write, real_fsync = os.open, os.write, os.fsync
    watched: set[int] = set()

    def opened(file: object, flags: int, *args: object, **kwargs: object) -> int:
        fd = real_open(file, flags, *args, **kwargs)
        if Path(str(file)) == path:
            watched.add(fd)
            calls.append(("open", flags))
        return fd

    def written(fd: int, data: bytes) -> int:
        if fd not in watched:
            return real_write(fd, data)
        calls.append(("write", os.lseek(fd, 0, os.SEEK_CUR)))
        n = write(fd, data)
        calls[-1] += (n,)
        return n

    def synced(fd: int) -> None:
        calls.append(("fsync",) if fd in watched else ("fsync another",))
        real_fsync(fd)

    real_unlink = Path.unlink
    monkeypatch.setattr(files.os, "open", opened)
    monkeypatch.setattr(files.os, "write", written)
    monkeypatch.setattr(files.os, "fsync", synced)
    monkeypatch.setattr(files.os, "ftruncate", lambda *_: calls.append(("ftruncate",)))
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: (calls.append(("unlink", self)), real_unlink(self))[1])
    return calls


def test_a_file_is_overwritten_in_place_from_its_start_to_its_end_synced_and_only_then_unlinked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In place: truncated and written again, or unlinked first, a file frees its old blocks with the
    original bytes still on them; unsynced, the overwrite may never reach the disk (found by review:
    a second name of the file cannot tell these apart)."""
    path = tmp_path / "drop.csv"
    path.write_bytes(b"9434765919," * 300_000)  # a little over three chunks
    calls = _watched(monkeypatch, path, os.write)
    assert shred_file(path) == 3_300_000
    (_, flags), *writes, synced, unlinked = calls
    assert not flags & (os.O_TRUNC | os.O_APPEND) and ("ftruncate",) not in calls
    assert [w[0] for w in writes] == ["write"] * len(writes)
    assert writes[0][1] == 0 and writes[-1][1] + writes[-1][2] == 3_300_000
    assert all(a[1] + a[2] == b[1] for a, b in zip(writes[:-1], writes[1:], strict=True)), "back to back, none skipped"
    assert (synced, unlinked) == (("fsync",), ("unlink", path))


def test_a_file_is_overwritten_to_its_end_when_the_system_writes_less_than_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``os.write`` may write part of what it is given: the rest is written, not left as it was."""
    original = b"9434765919," * 200_000
    path, other_name = _with_second_name(tmp_path, original)
    real_write = os.write
    calls = _watched(monkeypatch, path, lambda fd, data: real_write(fd, bytes(data[:4096])))
    assert shred_file(path) == len(original)
    assert all(w[2] <= 4096 for w in calls if w[0] == "write")
    written = other_name.read_bytes()
    assert len(written) == len(original) and b"9434765919" not in written


def test_a_link_is_unlinked_without_touching_its_target(tmp_path: Path) -> None:
    target = tmp_path / "outside.csv"
    target.write_bytes(b"kept")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    assert shred_file(link) == 0
    assert not link.exists() and not link.is_symlink()
    assert target.read_bytes() == b"kept"


def test_a_file_replaced_whole_is_its_old_text_or_its_new_one_never_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``files.replace_whole`` (a quarantined file's reason, the audit head, the disposal journal): a
    write that fails part-way (a full disk, here at the sync) leaves the file as it was and no
    temporary file beside it; one that goes through replaces it whole (review 57, finding 2)."""
    path = tmp_path / "x.csv.reason.json"
    files.replace_whole(path, "old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError):
        files.replace_whole(path, "new text")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    monkeypatch.undo()
    files.replace_whole(path, "new text")
    assert path.read_text() == "new text" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
