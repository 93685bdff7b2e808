"""Faults of the objection feed that its quarantine folders hold (``safehaven.protect.feed``,
module docstring, "A standing block"): each arrival a fault of its own, a quarantined file
without its reason file, an objections file quarantined in a content collection's folder, and a
received file named like a reason file (the hostile review's findings 1, 2, 3 and 8); and the
third review's: a misrouted header refused by an earlier header rule, a misrouted file moved in
with rejected rows, a sender's file named as the haven's not-moved reason, and an entry of
incoming/ that is no collection's folder; and the fourth's: a misrouted file refused before its
header was read.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safehaven.core.days import haven_today
from safehaven.intake import ingest
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.ingest import ingest_collection
from safehaven.protect import feed
from tests.governance_helpers import NHS
from tests.unit.feed_helpers import (
    COLUMNS,
    FUTURE,
    Haven,
    misroute,
    opt_out,
    refused,
)

#: a Windows-1252 byte in an otherwise valid objections file: refused whole (``file.encoding``)
UNREADABLE = (",".join(COLUMNS) + f"\n{NHS[30]},national_opt_out,2024-03-01,,\n# caf\xe9\n").encode("latin-1")


def _drop_bytes(haven: Haven, name: str, data: bytes) -> None:
    folder = haven.home.incoming_for("objections")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def _reasons(haven: Haven) -> list[Path]:
    return list(haven.home.quarantine_for("objections").glob("*.reason.json"))


def test_a_later_empty_objections_file_is_a_new_fault_after_an_earlier_one_was_resolved(haven: Haven) -> None:
    """Every 0-byte file has one SHA-256: the second empty export (that day's objections never
    received) is a fault of its own, and blocks until a person resolves it too (finding 1)."""
    haven.drop("base.csv", [opt_out(10)])
    haven.run()
    _drop_bytes(haven, "objections_20241201.csv", b"")
    haven.run()
    feed.resolve(haven.con, haven.home, "objections_20241201.csv", by="Dr Guardian", reason="export glitch")
    assert haven.release().status == "released"
    _drop_bytes(haven, "objections_20241220.csv", b"")
    haven.run()
    assert len(_reasons(haven)) == 2
    feed.sync_faults(haven.con, haven.home)
    [fault] = feed.unresolved(haven.con)
    assert fault.file_name == "objections_20241220.csv" and fault.file_sha256 is not None
    message = refused(haven)
    assert f"received again: fault {fault.sha256[: feed.SHA_SHOWN]}" in message
    assert f"safehaven objections resolve {fault.sha256[: feed.SHA_SHOWN]} --by <name>" in message
    assert feed.resolve(haven.con, haven.home, fault.sha256[:12], by="Dr Guardian", reason="export failed again") == 1
    assert feed.unresolved(haven.con) == []


def test_the_same_unreadable_file_sent_again_after_a_resolution_blocks_again(haven: Haven) -> None:
    """The sender's system retries the very bytes a person resolved: quarantined again, it is a
    new fault, and the objector's records stay in no release until a person decides (finding 1)."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    _drop_bytes(haven, "daily.csv", UNREADABLE)
    haven.run()
    feed.resolve(haven.con, haven.home, "daily.csv", by="Dr Guardian", reason="sender will send a corrected file")
    assert haven.release().status == "released"
    _drop_bytes(haven, "daily.csv", UNREADABLE)
    haven.run()
    for _ in range(2):  # the run that sees it, and a later one
        haven.run()
        assert "daily.csv" in refused(haven)
    assert feed.resolve(haven.con, haven.home, "daily.csv", by="Dr Guardian", reason="sent again by post") == 1
    assert haven.release().status in ("released", "unchanged")  # not refused


def test_a_resolution_clears_only_the_arrival_it_names(haven: Haven) -> None:
    """Two empty files unresolved at once: resolving one (by its key) leaves the other blocking."""
    haven.drop("base.csv", [opt_out(10)])
    haven.run()
    _drop_bytes(haven, "a.csv", b"")
    _drop_bytes(haven, "b.csv", b"")
    haven.run()
    feed.sync_faults(haven.con, haven.home)
    first, second = feed.unresolved(haven.con)
    assert first.sha256 != second.sha256
    assert feed.resolve(haven.con, haven.home, first.sha256[:16], by="Dr Guardian", reason="checked") == 1
    assert [f.sha256 for f in feed.unresolved(haven.con)] == [second.sha256]


def test_a_fault_recorded_by_hash_alone_keeps_its_resolution_and_a_later_arrival_is_new(haven: Haven) -> None:
    """A haven whose faults were keyed by the file's SHA-256 alone (no arrival recorded): its
    resolved fault stays resolved (its reason file is that fault's arrival), and the same bytes
    arriving again are a new fault."""
    haven.drop("base.csv", [opt_out(10)])
    haven.run()
    _drop_bytes(haven, "objections_20241201.csv", b"")
    haven.run()
    feed.resolve(haven.con, haven.home, "objections_20241201.csv", by="Dr Guardian", reason="export glitch")
    haven.con.execute(f"UPDATE {feed.FAULTS} SET arrival = NULL, file_sha256 = NULL")  # as an older haven left it
    feed.sync_faults(haven.con, haven.home)
    assert feed.unresolved(haven.con) == []
    assert haven.con.execute(f"SELECT count(*) FROM {feed.FAULTS}").fetchone()[0] == 1
    _drop_bytes(haven, "objections_20241220.csv", b"")
    haven.run()
    feed.sync_faults(haven.con, haven.home)
    [fault] = feed.unresolved(haven.con)
    assert fault.file_name == "objections_20241220.csv"


def test_a_quarantined_objections_file_without_its_reason_file_blocks_until_resolved(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reason write fails after the move (disk full, a kill): the file sits in quarantine with
    no reason; it is a fault of its own (``feed.reason_missing``) until a person resolves it (finding 2)."""
    haven.drop("base.csv", [opt_out(10)])
    haven.run()
    _drop_bytes(haven, "objections.csv", ("nhs_number;objection_type\n" + NHS[46] + ";national_opt_out\n").encode())
    real = ingest.replace_whole

    def failing(path: Path, text: str) -> None:
        if path.name.endswith(".reason.json"):
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(ingest, "replace_whole", failing)
    with pytest.raises(OSError):
        haven.run()
    monkeypatch.setattr(ingest, "replace_whole", real)
    haven.run()
    assert not _reasons(haven)
    for _ in range(2):
        message = refused(haven)
        assert "objections.csv" in message and "with no reason file" in message and NHS[46] not in message
    [fault] = feed.unresolved(haven.con)
    assert fault.rules == feed.REASON_MISSING
    assert f"(fault {fault.sha256[: feed.SHA_SHOWN]})" in message
    assert feed.resolve(haven.con, haven.home, fault.sha256[:16], by="Dr Guardian", reason="re-sent") == 1
    assert haven.release().status == "released"


def test_an_objections_file_quarantined_in_a_content_folder_blocks_until_moved_and_recorded(haven: Haven) -> None:
    """An objections file dropped in incoming/hospital_episodes/ is quarantined there as a content
    file; its header shows ``objection_type``, so it is a feed fault naming the file and how to
    clear it; moved into incoming/objections/ it lands, and a person records that (finding 3)."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    folder = haven.home.incoming_for("hospital_episodes")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "objections_20241201.csv").write_text(",".join(COLUMNS) + f"\n{NHS[31]},national_opt_out,2024-03-01,,\n")
    contract = haven.registry.contracts["hospital_episodes"]
    quarantine = haven.home.quarantine_for("hospital_episodes")
    assert ingest_collection(haven.con, contract, folder, quarantine).files_quarantined == 1
    haven.run()
    message = refused(haven)
    assert "objections_20241201.csv" in message and "feed.misrouted in incoming/hospital_episodes/" in message
    assert "move it from quarantine/hospital_episodes/ into incoming/objections/" in message
    assert NHS[31] not in message
    [fault] = feed.unresolved(haven.con)
    (quarantine / "objections_20241201.csv").rename(haven.home.incoming_for("objections") / "objections_20241201.csv")
    haven.run()
    assert "objections_20241201.csv" in refused(haven)  # landed, but only a person clears the fault
    n = feed.resolve(
        haven.con, haven.home, fault.sha256[:16], by="Dr Guardian", reason="moved it", corrected_by=fault.sha256[:16]
    )
    assert n == 1
    result = haven.release()
    assert haven.pids[NHS[31]] not in haven.members(result.release_id)


def test_a_received_file_named_like_a_reason_file_is_not_read_as_the_havens_reason(haven: Haven) -> None:
    """A sender's ``x.reason.json`` is quarantined with a reason file of its own; the feed reads that
    reason, never the sender's bytes as one (finding 8)."""
    haven.drop("base.csv", [opt_out(10)])
    haven.run()
    spoof = {"sha256": "f" * 64, "file": "SPOOFED_BY_SENDER.csv", "rule": "file.empty", "quarantined_at": "2030-01-01"}
    _drop_bytes(haven, "x.reason.json", json.dumps(spoof).encode())
    haven.run()
    feed.sync_faults(haven.con, haven.home)
    assert {f.file_name for f in feed.unresolved(haven.con)} == {"x.reason.json"}


@pytest.mark.parametrize(
    ("header", "sep"),
    [(", ".join(COLUMNS), ", "), (",".join(c.upper() for c in COLUMNS), ",")],
    ids=["spaced", "upper_case"],
)
def test_a_misrouted_objections_header_refused_by_an_earlier_header_rule_still_blocks(
    haven: Haven, header: str, sep: str
) -> None:
    """A header with spaces after its commas, or in capitals, is refused by an earlier header rule
    (``file.header.hostile_name``, ``case_collision``) with no list of unexpected columns; ingest's
    ``objections_header`` flag (names stripped, lower-cased) still makes it a ``feed.misrouted``
    fault, and the objector is not released (review 3, finding 1)."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    row = sep.join([NHS[31], "national_opt_out", "2024-03-01", "", ""])
    misroute(haven, "objections_20241201.csv", f"{header}\n{row}\n")
    haven.run()
    message = refused(haven)
    assert "feed.misrouted in incoming/hospital_episodes/" in message and NHS[31] not in message
    [fault] = feed.unresolved(haven.con)
    assert feed.resolve(haven.con, haven.home, fault.sha256[:16], by="Dr Guardian", reason="re-sent") == 1


@pytest.mark.parametrize(
    ("name", "prefix", "encoding"),
    [
        ("objections_20241201.csv", "sep=,\r\n", "utf-8"),
        ("objections_20241201.csv", "\ufeff\ufeff", "utf-8"),
        ("objections_20241201.txt", "", "utf-8"),
        ("objections_20241201.csv", "\ufeff", "utf-16-le"),
    ],
    ids=["excel_sep_line", "two_boms", "txt_suffix", "utf16"],
)
def test_a_misrouted_objections_file_refused_before_its_header_was_read_still_blocks(
    haven: Haven, name: str, prefix: str, encoding: str
) -> None:
    """An objections file in a content folder refused before its header was parsed (Excel's ``sep=``
    line, two byte-order marks, a ``.txt`` suffix, UTF-16) still has ``objections_header`` in its
    reason (ingest reads its first line leniently), so it is a ``feed.misrouted`` fault and the
    objector is not released; only the flag, nothing read, is in the reason (review 4)."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    row = ",".join([NHS[31], "national_opt_out", "2024-03-01", "", ""])
    folder = haven.home.incoming_for("hospital_episodes")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes((prefix + ",".join(COLUMNS) + "\r\n" + row + "\r\n").encode(encoding))
    contract = haven.registry.contracts["hospital_episodes"]
    quarantine = haven.home.quarantine_for("hospital_episodes")
    assert ingest_collection(haven.con, contract, folder, quarantine).files_quarantined == 1
    [reason] = quarantine.glob("*.reason.json")
    assert json.loads(reason.read_text())["details"][ingest.OBJECTIONS_FLAG] is True
    assert NHS[31] not in reason.read_text() and "national_opt_out" not in reason.read_text()
    haven.run()
    message = refused(haven)
    assert "feed.misrouted in incoming/hospital_episodes/" in message and NHS[31] not in message


def test_a_content_file_refused_before_its_header_was_read_is_not_taken_for_objections(haven: Haven) -> None:
    """A content file refused before its header was parsed (a ``.txt`` suffix) is looked at the same
    way, and recorded as no objections file: it is no ``feed.misrouted`` fault (review 4)."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    fields = haven.registry.contracts["hospital_episodes"].field_names
    quarantine = misroute(haven, "episodes.txt", ",".join(fields) + "\n" + ",".join("x" for _ in fields) + "\n")
    [reason] = quarantine.glob("*.reason.json")
    details = json.loads(reason.read_text())["details"]
    assert details == {ingest.OBJECTIONS_FLAG: False, ingest.OBJECTIONS_RULE: ingest.OBJECTIONS_RULE_VERSION}
    feed.sync_faults(haven.con, haven.home, haven.registry.contracts)
    assert feed.unresolved(haven.con) == []


_OPT_OUT_ROW = ",".join([NHS[31], "national_opt_out", "2024-03-01", "", ""])
_OBJECTIONS_TEXT = ",".join(COLUMNS) + "\r\n" + _OPT_OUT_ROW + "\r\n"


def _place_unreadable(folder: Path, form: str) -> None:
    """An objections file in a form the haven cannot read as a content file (review 57, finding 1)."""
    if form == "utf16le_no_bom":  # a Windows "Unicode" export without its byte-order mark
        (folder / "objections_20241201.csv").write_bytes(_OBJECTIONS_TEXT.encode("utf-16-le"))
    elif form == "utf16be_no_bom":
        (folder / "objections_20241201.csv").write_bytes(_OBJECTIONS_TEXT.encode("utf-16-be"))
    elif form == "gzip":  # the sender's transfer tool compressed it
        (folder / "objections_20241201.csv.gz").write_bytes(gzip.compress(_OBJECTIONS_TEXT.encode()))
    elif form == "subfolder":  # the sender's tool made a dated folder
        (folder / "objections_2024-12").mkdir()
        (folder / "objections_2024-12" / "objections_20241201.csv").write_text(_OBJECTIONS_TEXT)
    elif form == "title_line":  # a report's title above the header
        (folder / "objections_20241201.csv").write_text(
            "National data opt-out extract 2024-12-01\r\n" + _OBJECTIONS_TEXT
        )
    elif form == "unreadable_parquet":
        (folder / "objections_20241201.parquet").write_bytes(b"PAR1" + _OBJECTIONS_TEXT.encode() + b"PAR1")


@pytest.mark.parametrize(
    "form", ["utf16le_no_bom", "utf16be_no_bom", "gzip", "subfolder", "title_line", "unreadable_parquet"]
)
def test_a_file_in_a_content_folder_the_haven_cannot_read_as_that_collections_blocks_as_a_possible_objections_file(
    haven: Haven, form: str
) -> None:
    """A file quarantined in a content collection's folder that the haven cannot read as that
    collection's (UTF-16 with no byte-order mark, compressed, a folder, a title line above the
    header, a Parquet file whose schema cannot be read) may be an objections file: it is a
    ``feed.misrouted`` fault, and no objector is released until a person looks (CoP 11-14; fail
    closed; review 57, finding 1: each was quarantined unflagged, and the objector released)."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    folder = haven.home.incoming_for("hospital_episodes")
    folder.mkdir(parents=True, exist_ok=True)
    _place_unreadable(folder, form)
    contract = haven.registry.contracts["hospital_episodes"]
    quarantine = haven.home.quarantine_for("hospital_episodes")
    assert ingest_collection(haven.con, contract, folder, quarantine).files_quarantined == 1
    [reason] = quarantine.glob("*.reason.json")
    assert json.loads(reason.read_text())["details"][ingest.OBJECTIONS_FLAG] is True
    haven.run()
    message = refused(haven)
    assert "feed.misrouted in incoming/hospital_episodes/" in message and "may be an objections file" in message
    assert NHS[31] not in message and NHS[31] not in reason.read_text()
    [fault] = feed.unresolved(haven.con)
    assert feed.resolve(haven.con, haven.home, fault.sha256[:16], by="Dr Guardian", reason="no objections") == 1
    assert haven.release().status == "released"


def test_a_content_parquet_file_with_its_collections_columns_is_not_taken_for_objections(haven: Haven) -> None:
    """A Parquet file refused in its collection's folder (a column of the wrong type) whose schema
    names that collection's columns is no possible objections file: its schema stands for a CSV
    file's first line (``ingest._parquet_start``)."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    folder = haven.home.incoming_for("hospital_episodes")
    folder.mkdir(parents=True, exist_ok=True)
    fields = haven.registry.contracts["hospital_episodes"].field_names
    columns = ", ".join(f"[1, 2] AS {f}" for f in fields)  # a list where text is declared
    haven.con.execute(f"COPY (SELECT {columns}) TO '{folder / 'episodes.parquet'}' (FORMAT parquet)")
    contract = haven.registry.contracts["hospital_episodes"]
    quarantine = haven.home.quarantine_for("hospital_episodes")
    assert ingest_collection(haven.con, contract, folder, quarantine).files_quarantined == 1
    [reason] = quarantine.glob("*.reason.json")
    assert json.loads(reason.read_text())["details"][ingest.OBJECTIONS_FLAG] is False
    feed.sync_faults(haven.con, haven.home, haven.registry.contracts)
    assert feed.unresolved(haven.con) == []


@pytest.mark.parametrize(
    ("damage", "rule"), [("missing", feed.REASON_MISSING), ("half_written", feed.REASON_UNREADABLE)]
)
def test_a_file_in_a_content_quarantine_without_a_whole_reason_file_blocks_until_resolved(
    haven: Haven, damage: str, rule: str
) -> None:
    """A run killed between moving a refused file into quarantine/hospital_episodes/ and writing its
    reason, or a reason file left half-written, leaves the feed unable to tell the file is no
    objections file: a fault naming the folder, as in quarantine/objections/ (review 57, finding 2:
    the feed read only whole reasons there, and a misrouted objector was released)."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    quarantine = misroute(haven, "objections_20241201.csv", _OBJECTIONS_TEXT)
    [reason] = quarantine.glob("*.reason.json")
    if damage == "missing":
        reason.unlink()  # as a kill between the move and the reason leaves it
    else:
        reason.write_bytes(reason.read_bytes()[:40])  # as a file written in place, cut short, would be
    haven.run()
    message = refused(haven)
    assert "quarantine/hospital_episodes/" in message and NHS[31] not in message
    [fault] = feed.unresolved(haven.con)
    assert fault.rules == rule and fault.file_name.startswith("hospital_episodes/")
    assert feed.resolve(haven.con, haven.home, fault.sha256[:16], by="Dr Guardian", reason="looked: none") == 1
    assert haven.release().status == "released"


_EPISODES = ContractRegistry().contracts["hospital_episodes"]
#: what a hospital episode records (not who it is about): a header naming none of these may be an
#: objections list carrying demographics (review 57)
_RECORDS = [f.name for f in _EPISODES.fields if f.identifiability in ingest.DISTINCTIVE]
_WHO = [
    f.name for f in _EPISODES.fields if f.identifiability not in ingest.DISTINCTIVE and f.name != _EPISODES.patient_key
]
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\n,;\t|"), max_size=12)


@settings(max_examples=80, deadline=None)
@given(
    records=st.lists(st.sampled_from(_RECORDS), min_size=ingest.SUBSET_DISTINCTIVE, unique=True),
    who=st.lists(st.sampled_from(_WHO), unique=True),
    rows=st.lists(st.lists(_TEXT, min_size=1, max_size=9), max_size=6),
    marked=st.none() | st.integers(min_value=0, max_value=6),
)
def test_a_content_file_may_be_objections_exactly_when_a_line_names_objection_type_or_its_first_line_is_not_its_own(
    records: list[str], who: list[str], rows: list[list[str]], marked: int | None
) -> None:
    """``ingest.may_be_objections``, the rule written out: under a header of the collection's own
    columns (any of them, in any order, some missing, two or more of what it records), a file is no
    possible objections file unless some line names ``objection_type`` or holds an objection type;
    a first line that is not such a header (a title, values, only who the rows are about) makes any
    file one (fail closed)."""
    lines = [",".join([_EPISODES.patient_key, *who, *records])] + [",".join(r) for r in rows]
    if marked is not None:
        lines[min(marked, len(lines) - 1)] += ",Objection Type"
    data = "\r\n".join(lines).encode()
    names_mark = marked is not None or any(
        ingest.header_name(c)
        in (ingest.OBJECTIONS_MARK, "type1", "type_1", "national_opt_out", "national_data_opt_out")
        for line in lines
        for c in line.split(",")
    )
    assert ingest.may_be_objections(data, _EPISODES) is names_mark
    assert ingest.may_be_objections(b"Extract of 2024-12-01\r\n" + data, _EPISODES) is True
    assert ingest.may_be_objections(data + b"\r\n\x00", _EPISODES) is True  # a NUL: UTF-16, or binary
    assert ingest.may_be_objections(",".join([_EPISODES.patient_key, *who]).encode() + b"\r\n" + data, _EPISODES)


def test_a_content_files_reason_written_by_the_earlier_rule_is_a_possible_objections_file(haven: Haven) -> None:
    """A reason written before the haven judged unreadable files (no ``objections_rule`` in its
    details, its flag false: what the earlier rule wrote for a UTF-16 objections file) is judged
    again by the feed as a possible objections file until a person looks (review 57); a batch
    refused at validation, read as its collection's, is not."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    quarantine = misroute(haven, "objections_20241201.csv", _OBJECTIONS_TEXT)
    [reason_path] = quarantine.glob("*.reason.json")
    reason = json.loads(reason_path.read_text())
    reason["details"] = {ingest.OBJECTIONS_FLAG: False}  # as 9cd775e wrote it
    reason_path.write_text(json.dumps(reason, indent=2))
    haven.run()
    assert "may be an objections file" in refused(haven)
    [fault] = feed.unresolved(haven.con)
    assert fault.level == "misrouted"


def test_a_received_file_never_takes_the_reason_slot_of_a_quarantined_file(haven: Haven) -> None:
    """A file whose reason was lost (a kill between the move and the reason) stays a fault when a
    received file of its reason's name is quarantined after it: ``free_name`` gives that one another
    name, and the feed reads only the haven's own reason files (review 57, finding 5)."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    quarantine = misroute(haven, "o.csv", _OBJECTIONS_TEXT)
    (quarantine / "o.csv.reason.json").unlink()
    fields = haven.registry.contracts["hospital_episodes"].field_names
    misroute(haven, "o.csv.reason.json", ",".join(fields) + "\r\n")
    assert not (quarantine / "o.csv.reason.json").exists()
    haven.run()
    assert "quarantine/hospital_episodes/ with no reason file" in refused(haven)


def test_a_misrouted_file_moved_in_with_a_rejected_row_is_a_rows_fault_of_its_own(haven: Haven) -> None:
    """The misrouted fault is keyed by the file's SHA-256, and the file moved into incoming/objections/
    lands as the batch of that id; its rejected row is still a rows fault, which a decision on the
    misrouted fault does not clear (review 3, finding 2)."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    rows = f"{NHS[31]},national_opt_out,2024-03-01,,\n{NHS[32]},national_opt_out,{FUTURE},,\n"
    quarantine = misroute(haven, "objections_20241201.csv", ",".join(COLUMNS) + "\n" + rows)
    haven.run()
    feed.sync_faults(haven.con, haven.home)
    [misrouted] = feed.unresolved(haven.con)
    (quarantine / "objections_20241201.csv").rename(haven.home.incoming_for("objections") / "objections_20241201.csv")
    haven.run()
    feed.sync_faults(haven.con, haven.home)
    assert [f.level for f in feed.unresolved(haven.con)] == ["misrouted", "rows"]
    assert feed.resolve(haven.con, haven.home, misrouted.sha256[:16], by="Dr Guardian", reason="moved it") == 1
    [rows_fault] = feed.unresolved(haven.con)
    assert rows_fault.level == "rows" and rows_fault.rows == 1
    message = refused(haven)
    assert "1 row(s) rejected" in message and f"sha256 {misrouted.sha256[: feed.SHA_SHOWN]}" in message


def test_a_sender_file_named_as_the_not_moved_reason_is_never_overwritten_and_the_refusal_blocks(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender first sends a file named ``<shown>.<sha12>.not-moved.reason.json`` of the file it then
    sends; when that file cannot be moved, the haven's reason goes under a free name, the sender's
    file is left as it was, and the refusal is a fault (review 3, finding 3)."""
    folder = haven.home.incoming_for("objections")
    folder.mkdir(parents=True, exist_ok=True)
    haven.drop("base.csv", [opt_out(10)])
    haven.run()
    bad = ("sep=,\r\n" + ",".join(COLUMNS) + "\r\n" + ",".join(opt_out(32)) + "\r\n").encode()
    decoy = f"optouts.csv.{hashlib.sha256(bad).hexdigest()[:12]}.not-moved.reason.json"
    (folder / decoy).write_text("{}")
    haven.run()
    feed.sync_faults(haven.con, haven.home)
    [junk] = feed.unresolved(haven.con)
    assert feed.resolve(haven.con, haven.home, junk.sha256[:16], by="Dr Guardian", reason="junk from sender") == 1
    (folder / "optouts.csv").write_bytes(bad)

    def refused_move(path: Path, dest: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ingest, "_move_whole", refused_move)
    quarantine = haven.home.quarantine_for("objections")
    for _ in range(2):  # each run meets the entry again: its own reason is rewritten, never a second one
        report = ingest_collection(haven.con, haven.registry.objections(), folder, quarantine)
        assert [m["file"] for m in report.not_moved] == ["optouts.csv"]
    assert (quarantine / decoy).read_text() == "{}"
    assert len(list(quarantine.glob("*.not-moved.reason.json"))) == 2  # the decoy and the haven's one
    feed.sync_faults(haven.con, haven.home)
    [fault] = feed.unresolved(haven.con)
    assert fault.file_name == "optouts.csv" and fault.rules == "file.header.excel_sep"


@pytest.mark.parametrize("where", [".", "Objections"], ids=["incoming_itself", "mistyped_folder"])
def test_an_entry_of_incoming_outside_every_collection_folder_blocks_until_resolved(haven: Haven, where: str) -> None:
    """A file at incoming/x.csv, or in a folder no contract names (incoming/Objections/), is never
    read; it is a fault (``feed.unknown_incoming``) naming the entry and how to clear it, and the
    objector is not released (review 3, finding 4)."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    folder = haven.home.incoming / where
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "objections_20241201.csv").write_text(",".join(COLUMNS) + f"\n{NHS[31]},national_opt_out,2024-03-01,,\n")
    haven.run()
    message = refused(haven)
    entry = "objections_20241201.csv" if where == "." else where
    assert f"incoming/{entry} (fault " in message and feed.UNKNOWN_INCOMING in feed.unresolved(haven.con)[0].rules
    assert "move it into its collection's folder" in message and NHS[31] not in message
    [fault] = feed.unresolved(haven.con)
    assert feed.resolve(haven.con, haven.home, fault.sha256[:16], by="Dr Guardian", reason="moved it") == 1
    assert haven.release().status == "released"


def test_delivery_never_takes_a_deployment_collection_folder_for_an_unknown_entry(haven: Haven) -> None:
    """Never stuck (review: a spurious fault after every night): a deployment ($SAFEHAVEN_CONTRACTS)
    has a collection the packaged contracts lack. Delivery's feed check, which has no registry at
    hand (``safehaven.share.review``), does not scan incoming/ with another registry's collections,
    so the deployment's folder is never recorded as ``feed.unknown_incoming``, however often its
    files come and go; the checks with the deployment's registry find nothing wrong either."""
    root = haven.registry.root
    text = (root / "collections" / "social_care.yaml").read_text()
    community = text.replace("collection: social_care", "collection: community_care", 1)
    (root / "collections" / "community_care.yaml").write_text(community)
    deployment = ContractRegistry(root).contracts
    assert "community_care" in deployment and "community_care" not in ContractRegistry().contracts
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    folder = haven.home.incoming_for("community_care")
    folder.mkdir(parents=True)
    for night in range(2):
        time.sleep(0.05)
        (folder / f"cc{night}.csv").write_text("x\n")
        (folder / f"cc{night}.csv").unlink()  # landed and shredded: the folder's times change
        feed.require_sound_feed(haven.con, haven.home, haven_today())  # delivery's check, as it calls it: not refused
        assert feed.feed_problems(haven.con, haven.home, haven_today(), 31, deployment) == []
    assert feed.unresolved(haven.con) == []


def test_an_entry_removed_from_incoming_while_it_is_listed_stops_no_check(
    haven: Haven, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender may remove its own stray entry between the listing of incoming/ and its inspection:
    the feed's check goes on (the entry is no longer there to report) instead of failing with the
    file system's error, and an entry still there is still a fault."""
    (haven.home.incoming / "gone.csv").write_text("x\n")
    (haven.home.incoming / "stays.csv").write_text("x\n")
    real = feed._changed_at

    def vanished(path: Path) -> str:
        if path.name == "gone.csv":
            raise FileNotFoundError(path)
        return real(path)

    monkeypatch.setattr(feed, "_changed_at", vanished)
    found = feed._unknown_incoming(haven.home, haven.registry.contracts)
    assert [f.name for f in found] == ["stays.csv"]


_RULES = st.lists(st.one_of(st.none(), st.sampled_from(["nhs.check_digit", "date.future", "type.enum", "é ∑"])))


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from(["b1", "b2", "b3"]), st.one_of(st.none(), _RULES)), max_size=12))
def test_a_batchs_rules_are_the_distinct_rules_its_rejected_rows_failed_gathered_without_a_list_of_every_row(
    rows: list[tuple[str, list[str | None] | None]],
) -> None:
    """A batch with rejected objection rows is recorded with the sorted distinct rules its rows
    failed, as flattening every row's rules would give it, but gathered from distinct (batch, rule)
    pairs: DuckDB cannot spill a list being built, and the query reads every rejected row ever
    landed (issue 22; found by review: 10M rejected rows failed under a 1 GiB limit)."""
    import duckdb

    con = duckdb.connect()
    con.execute("CREATE SCHEMA landing; CREATE SCHEMA governance")
    con.execute("CREATE TABLE landing.objections_rejected (_batch VARCHAR, failed_rules VARCHAR[])")
    con.executemany("INSERT INTO landing.objections_rejected VALUES (?, ?)", rows) if rows else None
    con.execute(f"CREATE TABLE {ingest.BATCHES} AS SELECT * FROM (VALUES ('b1', 'f1'), ('b2', 'f2'), ('b3', 'f3')) "
                "t(batch_id, file_name), (SELECT now() AS landed_at)")  # fmt: skip
    every_row = con.execute(
        "SELECT r._batch, array_to_string(list_sort(list_distinct(flatten(list(r.failed_rules)))), ', '), count(*) "
        f"FROM landing.objections_rejected r JOIN {ingest.BATCHES} b ON b.batch_id = r._batch GROUP BY 1 ORDER BY 1"
    ).fetchall()
    gathered = con.execute(f"SELECT batch, rules, n FROM ({feed._row_faults_sql()}) ORDER BY 1").fetchall()
    assert gathered == every_row
