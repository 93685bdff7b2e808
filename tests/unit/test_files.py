"""Shredding (``safehaven.core.files``; CoP 48-50): a plain copy no longer needed is overwritten with
random bytes, synced, and only then unlinked."""

from __future__ import annotations

import os
import zlib
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


def test_a_shredded_files_bytes_are_overwritten_with_random_ones_before_its_name_goes(tmp_path: Path) -> None:
    """Seen through a second name of the same file: the bytes the shredding wrote stay there."""
    original = b"9434765919,1970-01-01,LS1 4AP\n" * 50_000  # about 1.5 chunks of a drop
    path, other_name = tmp_path / "drop.csv", tmp_path / "other_name.csv"
    path.write_bytes(original)
    os.link(path, other_name)
    assert shred_file(path) == len(original)
    assert not path.exists()
    written = other_name.read_bytes()
    assert len(written) == len(original)
    assert b"9434765919" not in written and b"LS1 4AP" not in written
    assert len(zlib.compress(written)) > len(written) * 0.99, "overwritten with random bytes, not a pattern"


def test_a_file_is_overwritten_to_its_end_when_the_system_writes_less_than_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``os.write`` may write part of what it is given: the rest is written, not left as it was."""
    original = b"9434765919," * 200_000
    path, other_name = tmp_path / "drop.csv", tmp_path / "other_name.csv"
    path.write_bytes(original)
    os.link(path, other_name)
    real_write = os.write
    monkeypatch.setattr(files.os, "write", lambda fd, data: real_write(fd, bytes(data[:4096])))
    assert shred_file(path) == len(original)
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
