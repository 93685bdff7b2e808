"""The objection feed's view of content-folder files, third review round (review 57): UTF-16
files and Parquet files with undeclared columns are possible objections files, a provider's
opt-out list of only its code and NHS numbers is one, the whole-file scan is linear in the
file's size and reads no code cut at a chunk's edge, and a fault of a content quarantine is
resolved by what a person copies and never by a folder other than its own."""

from __future__ import annotations

import codecs
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from safehaven.core.home import Home
from safehaven.intake import ingest
from safehaven.intake.ingest import ingest_collection
from safehaven.protect import feed
from safehaven.share.releases import ReleaseRefused
from tests.governance_helpers import NHS
from tests.unit.feed_helpers import COLUMNS, Haven, Template, open_haven, opt_out, small_haven_template


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    return small_haven_template(tmp_path_factory.mktemp("small_haven"))


@pytest.fixture
def haven(home: Home, tmp_path: Path, template: Template) -> Iterator[Haven]:
    with open_haven(home, tmp_path, template) as opened:
        yield opened


def _quarantine(haven: Haven, name: str, data: bytes) -> Path:
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    folder = haven.home.incoming_for("hospital_episodes")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    contract = haven.registry.contracts["hospital_episodes"]
    quarantine = haven.home.quarantine_for("hospital_episodes")
    assert ingest_collection(haven.con, contract, folder, quarantine).files_quarantined == 1
    return quarantine


def _must_block(haven: Haven, what: str) -> None:
    haven.run()
    try:
        result = haven.release()
    except ReleaseRefused:
        return
    released = haven.pids[NHS[31]] in haven.members(result.release_id)
    pytest.fail(f"{what}: release {result.status}, objector NHS[31] released: {released}")


EPISODE = ["RXX01", NHS[40], "1970-01-01", "F", "LS1 4AP", "2024-01-01", "2024-01-02", "A00"]


# --- UTF-16 (a Unicode text export): the byte scans cannot read it, so it is a possible objections file
def test_utf16_objections_rows_under_a_content_header_block_releases(haven: Haven) -> None:
    """test_objections_rows_under_a_content_header_block_releases, saved as Excel 'Unicode Text'."""
    fields = haven.registry.contracts["hospital_episodes"].field_names
    text = ",".join(fields) + "\r\n" + ",".join([NHS[31], "national_opt_out", "2024-03-01", "", ""]) + "\r\n"
    _quarantine(haven, "objections_20241201.csv", codecs.BOM_UTF16_LE + text.encode("utf-16-le"))
    _must_block(haven, "UTF-16 content header over objections rows")


def test_utf16_objections_list_appended_past_the_first_bytes_blocks_releases(haven: Haven) -> None:
    fields = haven.registry.contracts["hospital_episodes"].field_names
    rows = [",".join(EPISODE)] * 200
    objections = [",".join(COLUMNS), ",".join([NHS[31], "national_opt_out", "2024-03-01", "", ""])]
    text = "\r\n".join([",".join(fields), *rows, *objections]) + "\r\n"
    data = codecs.BOM_UTF16_LE + text.encode("utf-16-le")
    assert data.index("objection_type".encode("utf-16-le")) > ingest.SNIFF_BYTES
    _quarantine(haven, "daily_20241201.csv", data)
    _must_block(haven, "UTF-16 objections appended after 8 KiB")


# --- Parquet: its values are not read, so a column the contract does not declare makes it one
def _parquet(haven: Haven, tmp_path: Path, extra: str) -> bytes:
    fields = haven.registry.contracts["hospital_episodes"].field_names
    cols = ", ".join(f"NULL::VARCHAR AS {f}" for f in fields if f != "nhs_number")
    path = tmp_path / "x.parquet"
    haven.con.execute(f"COPY (SELECT '{NHS[31]}' AS nhs_number, {cols}, {extra}) TO '{path}' (FORMAT parquet)")
    return path.read_bytes()


def test_parquet_content_schema_with_an_objection_code_column_blocks_releases(haven: Haven, tmp_path: Path) -> None:
    """The same file as CSV is flagged (the byte scan sees 'national_opt_out' as a field)."""
    data = _parquet(haven, tmp_path, "'national_opt_out' AS opt_out")
    _quarantine(haven, "episodes_20241201.parquet", data)
    _must_block(haven, "parquet content schema holding objection codes")


def test_parquet_content_schema_with_objectiontype_unseparated_blocks_releases(haven: Haven, tmp_path: Path) -> None:
    """'OBJECTIONTYPE' (no separator, as many systems export): header_name reads 'objectiontype';
    the CSV byte scan (_MARK_BYTES) would see it, the Parquet path has no byte scan."""
    data = _parquet(haven, tmp_path, "'national_opt_out' AS OBJECTIONTYPE")
    _quarantine(haven, "episodes_20241201.parquet", data)
    _must_block(haven, "parquet content schema with OBJECTIONTYPE")


# --- the whole-file scan reads a bounded run after each byte: linear, whatever the runs of blank lines
def test_the_whole_file_scan_of_a_refused_file_with_blank_lines_is_linear(tmp_path: Path) -> None:
    """A refused CSV (its header has an extra column) followed by 256 KiB of blank lines (an export
    with empty trailing rows). A 400 MB ordinary file scans in ~10 s; this 256 KiB one must not take
    minutes (the quadratic pattern of 3703f28 took about 10 minutes; 1 MiB of blank lines, hours)."""
    path = tmp_path / "episodes.csv"
    path.write_bytes(b"provider_code,nhs_number,notes\r\nRXX01,x,y\r\n" + b"\r\n" * (128 * 1024))
    code = textwrap.dedent(f"""
        from pathlib import Path
        from safehaven.intake import ingest
        print(ingest._names_objections(Path({str(path)!r})))
    """)
    try:
        subprocess.run([sys.executable, "-c", code], timeout=20, check=True, capture_output=True)
    except subprocess.TimeoutExpired:
        pytest.fail("scanning a 256 KiB refused file of blank lines took over 20 s (quadratic _OBJECTION_CODE)")


# --- a header of one distinctive field and NHS numbers is what a provider's opt-out list looks like
def test_a_providers_opt_out_list_with_its_provider_code_blocks_releases(haven: Haven) -> None:
    """A provider's list of its opted-out patients, 'provider_code,nhs_number' (no type column: the
    NDOP list is a list of NHS numbers): every name is a hospital_episodes field and provider_code is
    'content', so _own_header reads it as that collection's file; refused (columns missing), unflagged."""
    text = "provider_code,nhs_number\r\n" + f"RXX01,{NHS[31]}\r\n"
    _quarantine(haven, "national_opt_outs_20241201.csv", text.encode())
    _must_block(haven, "provider's opt-out list (provider_code,nhs_number)")


# --- resolving the new faults by what the haven prints and a person copies
def test_the_printed_command_for_one_reason_missing_fault_clears_only_that_one(haven: Haven) -> None:
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    quarantine = haven.home.quarantine_for("hospital_episodes")
    quarantine.mkdir(parents=True, exist_ok=True)
    (quarantine / "a.csv").write_text("x\n")  # a run killed between move and reason, twice
    (quarantine / "b.csv").write_text("y\n")
    haven.run()
    with pytest.raises(ReleaseRefused):
        haven.release()
    faults = feed.unresolved(haven.con)
    assert len(faults) == 2, faults
    printed = feed.how_to_clear(faults[0])
    key = printed.split("safehaven objections resolve ")[-1].split(" ")[0]
    print(printed)
    n = feed.resolve(haven.con, haven.home, key, by="Dr Guardian", reason="looked at a.csv: none")
    left = feed.unresolved(haven.con)
    assert n == 1 and len(left) == 1, f"resolve {key!r} cleared {n} fault(s); left {left}"


@pytest.mark.parametrize("typed", ["hospital_episodes/a.csv", "quarantine/hospital_episodes/a.csv"])
def test_a_reason_missing_fault_resolves_by_folder_and_name(haven: Haven, typed: str) -> None:
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    quarantine = haven.home.quarantine_for("hospital_episodes")
    quarantine.mkdir(parents=True, exist_ok=True)
    (quarantine / "a.csv").write_text("x\n")
    haven.run()
    assert feed.resolve(haven.con, haven.home, typed, by="Dr Guardian", reason="looked") == 1
    assert feed.unresolved(haven.con) == []


def test_a_reason_missing_fault_resolves_by_the_path_a_person_copies(haven: Haven) -> None:
    """The path of the entry under the home (what `ls` or a file manager gives)."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    quarantine = haven.home.quarantine_for("hospital_episodes")
    quarantine.mkdir(parents=True, exist_ok=True)
    (quarantine / "a.csv").write_text("x\n")
    haven.run()
    typed = str(quarantine / "a.csv")
    try:
        n = feed.resolve(haven.con, haven.home, typed, by="Dr Guardian", reason="looked")
    except ValueError as exc:
        pytest.fail(f"resolve {typed!r}: {exc}")
    assert n == 1


# --- the byte scan reads no code cut at a chunk's edge
def _contract():
    from safehaven.intake.contracts import ContractRegistry

    return ContractRegistry().contracts["hospital_episodes"]


def test_a_code_cut_at_the_scan_chunk_boundary_is_not_read_as_type1(tmp_path: Path) -> None:
    """'$' (and '^') match at each 1 MiB window's edge, not only at a line's: ',type10,' cut after
    'type1' reads as the code 'type1'."""
    fields = _contract().field_names
    head = (",".join(fields) + "\r\n").encode()
    filler = b"x" * ((1 << 20) - len(head) - len(b",type1"))
    path = tmp_path / "episodes.csv"
    path.write_bytes(head + filler + b",type10,\r\n")
    assert ingest._names_objections(path) is False


def test_resolve_by_one_folder_never_clears_a_fault_of_another_folder(haven: Haven) -> None:
    """Only social_care/extract.csv may hold objections; a person types hospital_episodes/extract.csv
    (yesterday's command from the shell's history, or the wrong folder): _fault_key finds no fault of
    that folder/name, falls back to the bare name, and clears social_care's fault unseen."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    folder = haven.home.incoming_for("social_care")
    folder.mkdir(parents=True, exist_ok=True)
    text = "nhs_number,objection_type\r\n" + f"{NHS[31]},national_opt_out\r\n"
    (folder / "extract.csv").write_bytes(text.encode())
    contract = haven.registry.contracts["social_care"]
    assert (
        ingest_collection(haven.con, contract, folder, haven.home.quarantine_for("social_care")).files_quarantined == 1
    )
    haven.run()
    feed.sync_faults(haven.con, haven.home)
    [fault] = feed.unresolved(haven.con)
    assert fault.file_name == "extract.csv", fault
    with pytest.raises(ValueError):
        feed.resolve(haven.con, haven.home, "hospital_episodes/extract.csv", by="Dr Guardian", reason="looked: none")
