"""Possible objections files in a content collection's folder (``safehaven.intake.ingest.may_be_objections``,
``feed.misrouted``), as two more review rounds found them (review 57). Each blocks record-level
releases, so the objector (NHS[31], national opt-out) is not released: the objections column
spelled otherwise under demographic columns, an objections list appended past the first bytes,
objections rows under a content header, UTF-16, a Parquet struct holding the objections columns or
a column its contract does not declare, a provider's opt-out list of its code and NHS numbers.
The byte scan is linear in the file's size and reads no code cut at a chunk's edge; a content
export with headings a person reads blocks nothing. The fault of a file with no reason names it by
its shown name, and is resolved by what a person copies, never by a folder other than its own."""

from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from safehaven.intake import ingest
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.ingest import ingest_collection
from safehaven.protect import feed
from safehaven.share.releases import ReleaseRefused
from tests.governance_helpers import NHS
from tests.unit.feed_helpers import COLUMNS, Haven, misroute, opt_out


def _quarantine(haven: Haven, name: str, data: bytes) -> Path:
    """A haven with one clean objections file registered, and ``data`` misrouted as ``name``."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    return misroute(haven, name, data)


def _must_block(haven: Haven, what: str) -> None:
    haven.run()
    try:
        result = haven.release()
    except ReleaseRefused:
        return
    released = haven.pids[NHS[31]] in haven.members(result.release_id)
    pytest.fail(f"{what}: release {result.status}, objector NHS[31] released: {released}")


# --- 1. a provider's / practice's objection list with demographic columns -----------------------
# Every content contract shares date_of_birth, sex, postcode: they say who the rows are about, not
# what the collection records, so they do not make a header its own (``ingest.DISTINCTIVE``). The
# objection column is named as a person writes it; ``ingest.header_name`` reads each spelling as
# ``objection_type``.
_MARKS = {
    "title_case_space": "Objection Type",
    "hyphen": "objection-type",
    "camel": "ObjectionType",
    "nbsp": "objection\u00a0type",
    "zero_width": "objection\u200b_type",
    "fullwidth": "\uff4f\uff42\uff4a\uff45\uff43\uff54\uff49\uff4f\uff4e\uff3f\uff54\uff59\uff50\uff45",
    "opt_out": "opt_out_type",
}


@pytest.mark.parametrize("mark", sorted(_MARKS))
def test_a_demographic_objections_list_with_the_mark_spelled_otherwise_blocks_releases(haven: Haven, mark: str) -> None:
    header = ["provider_code", "nhs_number", "date_of_birth", "sex", "postcode", _MARKS[mark], "recorded_date"]
    row = ["RXX01", NHS[31], "1970-01-01", "F", "LS1 4AP", "national_opt_out", "2024-03-01"]
    text = ",".join(header) + "\r\n" + ",".join(row) + "\r\n"
    quarantine = _quarantine(haven, "objections_20241201.csv", text.encode())
    [reason] = quarantine.glob("*.reason.json")
    print(mark, json.loads(reason.read_text())["details"])
    _must_block(haven, f"objections list, mark spelled {mark!r}")


# --- 2. the mark beyond the 8 KiB sniffed -------------------------------------------------------
def test_an_episodes_extract_with_an_objections_list_appended_past_the_first_bytes_blocks_releases(
    haven: Haven,
) -> None:
    """A sender's job concatenates its daily extracts (``cat episodes.csv objections.csv``): the
    objections header is a line past ``SNIFF_BYTES``; the file is refused as malformed (ragged)."""
    fields = haven.registry.contracts["hospital_episodes"].field_names
    episode = ["RXX01", NHS[40], "1970-01-01", "F", "LS1 4AP", "2024-01-01", "2024-01-02", "A00"]
    rows = [",".join(episode)] * 200  # ~9 KB
    objections = [",".join(COLUMNS), ",".join([NHS[31], "national_opt_out", "2024-03-01", "", ""])]
    text = "\r\n".join([",".join(fields), *rows, *objections]) + "\r\n"
    assert text.index("objection_type") > ingest.SNIFF_BYTES
    _quarantine(haven, "daily_20241201.csv", text.encode())
    _must_block(haven, "objections appended after 8 KiB")


def test_objections_rows_under_a_content_header_block_releases(haven: Haven) -> None:
    """The sender's template's header, but the objections export's rows (ragged: refused whole)."""
    fields = haven.registry.contracts["hospital_episodes"].field_names
    text = ",".join(fields) + "\r\n" + ",".join([NHS[31], "national_opt_out", "2024-03-01", "", ""]) + "\r\n"
    _quarantine(haven, "objections_20241201.csv", text.encode())
    _must_block(haven, "content header over objections rows")


# --- 3. Parquet: the objections columns nested in a struct ---------------------------------------
def test_a_parquet_file_with_the_objections_columns_in_a_struct_blocks_releases(haven: Haven, tmp_path: Path) -> None:
    fields = haven.registry.contracts["hospital_episodes"].field_names
    cols = ", ".join(f"NULL::VARCHAR AS {f}" for f in fields if f != "nhs_number")
    path = tmp_path / "x.parquet"
    haven.con.execute(
        f"COPY (SELECT '{NHS[31]}' AS nhs_number, {cols}, "
        "{'objection_type': 'national_opt_out', 'recorded_date': '2024-03-01'} AS objection) "
        f"TO '{path}' (FORMAT parquet)"
    )
    _quarantine(haven, "objections_20241201.parquet", path.read_bytes())
    _must_block(haven, "parquet with nested objections")


# --- 6. the new faults' messages name the entry as it is -----------------------------------------
def test_the_fault_of_a_content_quarantines_file_with_no_reason_names_it_by_its_shown_name(haven: Haven) -> None:
    """``feed._unexplained`` names the entry by its shown name (``audit.shown_name``): a file a person
    put back in quarantine/hospital_episodes/ under its sender's name carries no NHS number into the
    refusal, the fault table or the logs (CoP 8a)."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    quarantine = haven.home.quarantine_for("hospital_episodes")
    quarantine.mkdir(parents=True, exist_ok=True)
    (quarantine / f"letter_{NHS[31]}.csv").write_text("x\n")
    haven.run()
    with pytest.raises(ReleaseRefused) as exc:
        haven.release()
    [fault] = feed.unresolved(haven.con)
    assert NHS[31] not in str(exc.value) and NHS[31] not in fault.file_name


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
    NDOP list is a list of NHS numbers): every name is a hospital_episodes field, but one distinctive
    field is a list's shape, not an extract's (``ingest.SUBSET_DISTINCTIVE``)."""
    text = "provider_code,nhs_number\r\n" + f"RXX01,{NHS[31]}\r\n"
    _quarantine(haven, "national_opt_outs_20241201.csv", text.encode())
    _must_block(haven, "provider's opt-out list (provider_code,nhs_number)")


# --- resolving the new faults by what the haven prints and a person copies
def test_the_printed_command_for_one_reason_missing_fault_clears_only_that_one(haven: Haven) -> None:
    """Two files left with no reason in one content quarantine are two faults; the command the
    haven prints for one clears that one only."""
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
    n = feed.resolve(haven.con, haven.home, key, by="Dr Guardian", reason="looked at a.csv: none")
    left = feed.unresolved(haven.con)
    assert n == 1 and len(left) == 1, f"resolve {key!r} cleared {n} fault(s); left {left}"


@pytest.mark.parametrize("typed", ["hospital_episodes/a.csv", "quarantine/hospital_episodes/a.csv", "<home path>"])
def test_a_reason_missing_fault_resolves_by_folder_and_name(haven: Haven, typed: str) -> None:
    """By its folder and name, with or without ``quarantine/``, or by the entry's path under the home
    (what ``ls`` or a file manager gives)."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    quarantine = haven.home.quarantine_for("hospital_episodes")
    quarantine.mkdir(parents=True, exist_ok=True)
    (quarantine / "a.csv").write_text("x\n")
    haven.run()
    typed = str(quarantine / "a.csv") if typed == "<home path>" else typed
    assert feed.resolve(haven.con, haven.home, typed, by="Dr Guardian", reason="looked") == 1
    assert feed.unresolved(haven.con) == []


# --- the byte scan reads no code cut at a chunk's edge
def _contract():
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


@pytest.mark.parametrize("style", ["human", "camel"])
def test_a_content_export_with_headings_a_person_reads_blocks_no_release(haven: Haven, style: str) -> None:
    """'Provider Code,NHS Number,Date Of Birth,...' (a spreadsheet's or BI tool's headings) names only
    sex and postcode exactly: 2 of 7, so not the collection's own header."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    fields = haven.registry.contracts["hospital_episodes"].field_names
    if style == "human":
        header = [f.replace("_", " ").title() for f in fields]
    else:
        header = ["".join(p.title() for p in f.split("_")) for f in fields]
    folder = haven.home.incoming_for("hospital_episodes")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "episodes_20241201.csv").write_text(",".join(header) + "\r\nRXX01,x,1970-01-01,F,LS1,a,b,c\r\n")
    contract = haven.registry.contracts["hospital_episodes"]
    assert (
        ingest_collection(haven.con, contract, folder, haven.home.quarantine_for("hospital_episodes")).files_quarantined
        == 1
    )
    haven.run()
    try:
        haven.release()
    except ReleaseRefused as exc:
        pytest.fail(f"{style}: a content export blocks record-level releases: {str(exc)[:300]}")


# --- reasons are written whole, through a temporary file each write makes new:
# Reason files are written whole through a temporary file each write makes new
# (``safehaven.core.files.replace_whole``, ``O_EXCL``, never through a link). An entry a sender named
# like a temporary file, quarantined as it is in the folder the reason is written to, never redirects
# the write outside the home or onto the haven's own files, never destroys a quarantined file, and
# never fails the stage (review 57, second round: a fixed temporary name had let a sender's link
# steer the write; CoP 27h).
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


@pytest.mark.parametrize(
    "term", ["Dissent from secondary use of general practitioner patient identifiable data", "Type 1 opt-out"]
)
def test_a_gp_type1_opt_out_export_in_gp_events_blocks_releases(haven: Haven, term: str) -> None:
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    folder = haven.home.incoming_for("gp_events")
    folder.mkdir(parents=True, exist_ok=True)
    text = (
        "Practice Code,NHS Number,Event Date,SNOMED Code,Term\r\n"
        + f"A81001,{NHS[31]},2024-03-01,827241000000103,{term}\r\n"
    )
    (folder / "A81001_search_20241201.csv").write_bytes(text.encode())
    contract = haven.registry.contracts["gp_events"]
    q = haven.home.quarantine_for("gp_events")
    assert ingest.ingest_collection(haven.con, contract, folder, q).files_quarantined == 1
    _must_block(haven, f"GP type 1 export ({term!r})")
