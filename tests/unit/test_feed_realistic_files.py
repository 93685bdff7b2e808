"""Realistic files refused in a content collection's folder, judged by ``ingest.with_objections_flag``
(review 57, fourth round): objections exports as GP systems, trusts and councils write them (a type 1
opt-out search, an NDOP flag, an opt-out column) are possible objections files; content extracts with
common quirks, or named "opt-outs applied" or "type 1 diabetes", are not. Accepted the other way: a GP
extract whose two distinctive columns carry the system's own names (``date``, ``snomed_code``) is
taken for a possible objections file (gp_events has only two distinctive fields)."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest

from safehaven.intake import ingest
from safehaven.intake.contracts import ContractRegistry
from tests.governance_helpers import NHS

REG = ContractRegistry()


def _flag(tmp_path: Path, collection: str, name: str, data: bytes) -> bool:
    path = tmp_path / name
    path.write_bytes(data)
    return ingest.with_objections_flag(path, REG.contracts[collection], {})[ingest.OBJECTIONS_FLAG]


def _csv(rows: list[list[str]], sep: str = ",", nl: str = "\r\n") -> bytes:
    return "".join(sep.join(r) + nl for r in rows).encode()


N = NHS[31]
# --- realistic objections exports: each a possible objections file
ESCAPES = {
    # GP system (EMIS/SystmOne search) export of the Type 1 opt-out SNOMED code, dropped in gp_events/
    "gp_snomed_type1": (
        "gp_events",
        "A81001_search_20241201.csv",
        _csv(
            [
                ["Practice Code", "NHS Number", "Event Date", "SNOMED Code", "Term"],
                [
                    "A81001",
                    N,
                    "2024-03-01",
                    "827241000000103",
                    "Dissent from secondary use of general practitioner patient identifiable data",
                ],
            ]
        ),
    ),
    "gp_read_9Nu0": (
        "gp_events",
        "practice_extract.csv",
        _csv(
            [
                ["practice_code", "nhs_number", "event_date", "read_code", "description"],
                ["A81001", N, "2024-03-01", "9Nu0.", "Dissent from secondary use of GP patient identifiable data"],
            ]
        ),
    ),
    "gp_type1_optout_term": (
        "gp_events",
        "A81001_20241201.csv",
        _csv(
            [
                ["Practice Code", "NHS Number", "Event Date", "Opt-out Type"],
                ["A81001", N, "2024-03-01", "Type 1 opt-out"],
            ]
        ),
    ),
    "la_opt_out_list": (
        "social_care",
        "E09000028_20241201.csv",
        _csv(
            [
                ["Local Authority Code", "NHS Number", "Opt Out Type", "Start Date", "End Date"],
                ["E09000028", N, "NDOP", "2024-03-01", ""],
            ]
        ),
    ),
    "trust_suppression_list": (
        "hospital_episodes",
        "RXX_suppress_20241201.csv",
        _csv(
            [
                ["Provider Code", "NHS Number", "Admission Date", "Discharge Date", "NDOP Flag"],
                ["RXX01", N, "2024-03-01", "2024-03-04", "Y"],
            ]
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_a_realistic_objections_export_in_a_content_folder_is_a_possible_objections_file(
    tmp_path: Path, case: str
) -> None:
    collection, name, data = ESCAPES[case]
    assert _flag(tmp_path, collection, name, data) is True, f"{case}: refused in {collection}/ and not flagged"


# --- content files with common quirks: none is one
EPI = list(REG.contracts["hospital_episodes"].field_names)
EPI_ROW = ["RXX01", NHS[5], "1970-01-01", "2", "LS1 4AP", "2024-03-01", "2024-03-04", "E10"]
GP = list(REG.contracts["gp_events"].field_names)
GP_ROW = ["A81001", NHS[5], "1970-01-01", "2", "LS1 4AP", "2024-03-01", "46635009"]

FALSE = {
    # names: a sender says opt-outs were applied, or the subject is type 1 (diabetes, A&E department type)
    "name_optouts_applied": (
        "hospital_episodes",
        "hospital_episodes_20241201_optouts_applied.csv",
        _csv([EPI + ["extra"], EPI_ROW + ["x"]]),
    ),
    "name_ndop_applied": (
        "hospital_episodes",
        "episodes_NDOP_applied_202412.csv",
        _csv([EPI + ["extra"], EPI_ROW + ["x"]]),
    ),
    "name_ae_type1": ("hospital_episodes", "ae_type1_attendances_202412.csv", _csv([EPI + ["extra"], EPI_ROW + ["x"]])),
    "name_type1_diabetes": ("gp_events", "Type1Diabetes_cohort_events.csv", _csv([GP + ["extra"], GP_ROW + ["x"]])),
    "name_type_1_diabetes": ("gp_events", "gp_events_type_1_diabetes.csv", _csv([GP + ["extra"], GP_ROW + ["x"]])),
    # a wrong (extra) column whose value is 'Type 1' (diabetes type; A&E department type)
    "value_diabetes_type": ("gp_events", "gp_events_20241201.csv", _csv([GP + ["diabetes_type"], GP_ROW + ["Type 1"]])),
    "value_ae_dept_type": (
        "hospital_episodes",
        "episodes_20241201.csv",
        _csv([EPI + ["department_type"], EPI_ROW + ["Type 1"]]),
    ),
    # Excel's "Unicode Text (*.txt)": UTF-16LE with BOM, tab-delimited
    "excel_unicode_text": (
        "hospital_episodes",
        "episodes_20241201.txt",
        codecs.BOM_UTF16_LE + _csv([EPI, EPI_ROW], sep="\t").decode().encode("utf-16-le"),
    ),
    # ordinary formatting variations
    "semicolon_bom_crlf": (
        "hospital_episodes",
        "episodes.csv",
        codecs.BOM_UTF8 + _csv([EPI + ["x"], EPI_ROW + ["1"]], sep=";"),
    ),
    "quoted_headers_txt": (
        "hospital_episodes",
        "episodes.txt",
        _csv([[f'"{h}"' for h in EPI] + ['"x"'], EPI_ROW + ["1"]], nl="\n"),
    ),
    "trailing_comma": ("hospital_episodes", "episodes.csv", _csv([EPI + [""], EPI_ROW + [""]])),
    "stray_blank_lines": (
        "hospital_episodes",
        "episodes.csv",
        b"\r\n \r\n" + _csv([EPI + ["x"], EPI_ROW + ["1"], [""], EPI_ROW + ["1"]]),
    ),
    "pipe_missing_column": ("hospital_episodes", "episodes.psv", _csv([EPI[:-1], EPI_ROW[:-1]], sep="|")),
    "human_headings_gp": (
        "gp_events",
        "gp.csv",
        _csv([[h.replace("_", " ").title() for h in GP] + ["X"], GP_ROW + ["1"]]),
    ),
}


@pytest.mark.parametrize("case", sorted(FALSE))
def test_a_common_content_file_refused_in_its_folder_is_not_taken_for_objections(tmp_path: Path, case: str) -> None:
    collection, name, data = FALSE[case]
    assert _flag(tmp_path, collection, name, data) is False, f"{case}: content file flagged as possible objections"
