"""Reason files are written whole through a temporary file each write makes new
(``safehaven.core.files.replace_whole``, ``O_EXCL``, never through a link). An entry a sender named
like a temporary file, quarantined as it is in the folder the reason is written to, never redirects
the write outside the home or onto the haven's own files, never destroys a quarantined file, and
never fails the stage (review 57, second round: a fixed temporary name had let a sender's link
steer the write; CoP 27h)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from safehaven.core.home import Home
from safehaven.intake.ingest import ingest_collection
from tests.unit.feed_helpers import Haven, Template, open_haven, small_haven_template


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    return small_haven_template(tmp_path_factory.mktemp("small_haven"))


@pytest.fixture
def haven(home: Home, tmp_path: Path, template: Template) -> Iterator[Haven]:
    with open_haven(home, tmp_path, template) as opened:
        yield opened


def _ingest(haven: Haven) -> int:
    contract = haven.registry.contracts["hospital_episodes"]
    folder = haven.home.incoming_for("hospital_episodes")
    return ingest_collection(
        haven.con, contract, folder, haven.home.quarantine_for("hospital_episodes")
    ).files_quarantined


def test_a_senders_link_named_like_a_reason_temp_file_never_has_the_haven_write_outside_the_home(
    haven: Haven, tmp_path: Path
) -> None:
    outside = tmp_path / "outside" / "precious.txt"  # any file the haven's user can write
    outside.parent.mkdir()
    outside.write_text("not the haven's\n")
    folder = haven.home.incoming_for("hospital_episodes")
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, folder / ".a.csv.reason.json.tmp")  # run 1: quarantined as it is (file.not_regular)
    assert _ingest(haven) == 1
    (folder / "a.csv").write_text("not,a,header\n1,2,3\n")  # run 2: any refused file named a.csv
    assert _ingest(haven) == 1
    assert outside.read_text() == "not the haven's\n", "the haven wrote a reason file through a sender's link"


def test_a_senders_link_never_has_the_haven_overwrite_its_own_files(haven: Haven) -> None:
    """The target may be the haven's own: relative from quarantine/hospital_episodes/."""
    head = haven.home.registers / "precious.json"  # stands for e.g. the audit head in registers/
    head.parent.mkdir(parents=True, exist_ok=True)
    head.write_text('{"keep": true}\n')
    rel = os.path.relpath(head, haven.home.quarantine_for("hospital_episodes"))
    folder = haven.home.incoming_for("hospital_episodes")
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink(rel, folder / ".b.csv.reason.json.tmp")
    assert _ingest(haven) == 1
    (folder / "b.csv").write_text("")  # file.empty
    assert _ingest(haven) == 1
    assert head.read_text() == '{"keep": true}\n', "the haven overwrote its own file through a sender's link"


def test_a_quarantined_received_file_named_like_a_reason_temp_file_is_kept_whole(haven: Haven) -> None:
    """Quarantine keeps a refused file whole for a person to act on (an objections file to move into
    incoming/objections/): a later refusal's reason is never written over it."""
    folder = haven.home.incoming_for("hospital_episodes")
    folder.mkdir(parents=True, exist_ok=True)
    body = b"nhs_number,objection_type\n9434765919,national_opt_out\n"
    (folder / ".c.csv.reason.json.tmp").write_bytes(body)
    assert _ingest(haven) == 1  # file.type: kept whole in quarantine
    kept = haven.home.quarantine_for("hospital_episodes") / ".c.csv.reason.json.tmp"
    assert kept.read_bytes() == body
    (folder / "c.csv").write_text("")
    assert _ingest(haven) == 1
    assert kept.exists() and kept.read_bytes() == body, "a quarantined received file was destroyed"


def test_a_folder_named_like_a_reason_temp_file_does_not_fail_the_stage(haven: Haven) -> None:
    """'No file can fail a stage': a sender's folder of that name never makes a reason unwritable."""
    folder = haven.home.incoming_for("hospital_episodes")
    (folder / ".d.csv.reason.json.tmp").mkdir(parents=True)
    assert _ingest(haven) == 1
    (folder / "d.csv").write_text("")
    assert _ingest(haven) == 1
