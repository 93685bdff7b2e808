"""Objections files received in a content collection's folder that a first rule still read as
that collection's own file (review 57, second round), each now a possible objections file
(``feed.misrouted``) that blocks record-level releases, so the objector (NHS[31], national opt-out)
is not released: the objections column spelled otherwise under demographic columns, an objections
list appended past the first bytes, objections rows under a content header, a Parquet struct
holding the objections columns; and the fault of a file with no reason names it by its shown name."""

from __future__ import annotations

import json
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


# --- 1. a provider's / practice's objection list with demographic columns -----------------------
# Every content contract shares date_of_birth, sex, postcode; with the sender's own code column that
# is half of hospital_episodes' fields (4 of 7) and of gp_events' (practice_code: 4 of 6), so
# ``_own_header`` reads it as the collection's header. The objection column is named as a person
# writes it, not exactly ``objection_type``, so no line "names" the mark.
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
