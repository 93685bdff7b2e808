"""Ingest: land each received file whole, or quarantine it whole with a reason.

Rules (CoP 7-9; the project's "bad input loses nothing" standard):

* A file is read as its collection only if it is CSV or Parquet, non-empty, UTF-8 without NUL
  bytes, has exactly the contract's columns (no missing, extra, duplicate, case-colliding or
  hostile names), no ragged rows, at least one row and, for Parquet, columns whose type can
  be the contract's (a column with no value at all, such as pandas writes for a column of
  only ``None``, can be any type: it is read as NULLs). Otherwise the whole file moves to
  ``quarantine/<collection>/`` with ``<file>.reason.json`` saying what is wrong and what to
  do; nothing of it is landed, and data landed earlier is untouched. The reason's ``rule``: ``file.type`` (not CSV or
  Parquet), ``file.empty``, ``file.nul_byte``, ``file.encoding``, ``file.header.missing``,
  ``file.header.delimiter``, ``file.header.duplicate``, ``file.header.case_collision``,
  ``file.header.hostile_name``, ``file.header.columns``, ``file.column_type``,
  ``file.parquet``, ``file.malformed`` (ragged rows, broken quoting), ``file.no_rows``,
  ``file.batch_in_landing`` (rows of its batch already in the landing table, written outside the haven),
  ``file.not_numbered`` (the haven could not number its rows: a fault in the haven) or
  ``file.name`` (a name that is not UTF-8 text), ``file.header.excel_sep`` (Excel's ``sep=``
  first line) or ``file.header.empty_name`` (a column without a name: trailing commas); an
  archive or workbook under a ``.csv`` name is ``file.type``. One UTF-8 byte-order mark (removed before the
  header is parsed; two or more are ``file.encoding``), CRLF line ends and quoted header names
  (every field quoted, as pandas ``QUOTE_ALL`` and Excel write) are accepted.
* **Every file is contained** (the project's "no file can fail a stage" rule): whatever goes
  wrong while reading one file quarantines that file, never the stage, and nothing stays in
  ``incoming/``. A first line longer than ``MAX_HEADER_BYTES`` (e.g. a 10 MB file with no
  line end) is ``file.line_too_long``; a field larger than Python's CSV field limit or a row
  longer than DuckDB's line limit is ``file.field_too_large``; any other error reading it is
  ``file.unreadable`` (the reason names the error's type, never its text, which may quote
  values). An interrupt is not the file's fault: a Ctrl-C or a terminated run that stops DuckDB
  mid-landing (``safehaven.core.store.interrupted``) stops the run, the file left in ``incoming/``
  and nothing of it landed (with more than one thread DuckDB ends the statement it was running
  before the rollback discards it, so a large file's Ctrl-C waits for its insert).
  Nor is a limit of DuckDB's: a well-formed CSV its parallel reader cannot read (quoted fields of
  about a megabyte holding line ends) is read again on one thread (``_insert_file``).
* **Nothing outside the home is read or overwritten** (CoP 27h: a secure environment): a
  symbolic link, a hard link (a file with another name, whose bytes landing would shred: it
  is copied into quarantine and its name here unlinked), a folder, a device or a pipe in a
  collection folder is quarantined as it is (``file.not_regular``) without being followed, and so is a collection folder
  that is itself a link or not a folder (its target is never listed). An entry renamed or
  removed by its sender while the folder is read is left alone (``files_vanished``): the
  stage goes on with the next file.
* **A file still being written is not read** (:func:`still_arriving`): one another process has
  open for writing, or one that changes while it is read (nothing of it is committed), stays
  in the folder for a later run (``files_arriving``); it is neither landed half-way nor
  quarantined. Known limit: a writer that closes the file between chunks, on a system where
  leases work, is not seen between two chunks; transfer tools write under a temporary name or
  keep the file open.
* **A file cut short at a row boundary is not landed as a smaller file** (``safehaven.intake.control``):
  for a contract with ``control: manifest`` a data file waits (``files_arriving``, ``awaiting_control``)
  until its sender's control file ``<file>.ctl.json`` is there, and is quarantined whole with it
  (``file.control.rows``, ``file.control.sha256``, ``file.control.last_row``, ``file.control.unreadable``)
  when it disagrees (or a CSV does not end with a line end: cut inside its last row); the
  rows compared are those DuckDB inserted, in the landing transaction. A control file with no data
  file is ``file.control.orphan``; one that could never be found by its name is ``file.control.name``.
* A received file the haven's user may not overwrite (another account's upload) is unlinked
  once landed and named in ``not_overwritten`` (a person gives the haven's user write access
  to ``incoming/``); the stage goes on.
* **Names from outside are shown safely** (``safehaven.core.audit.shown_name``): in logs,
  metadata, reason files, quarantine and the batch register a received file's name has its
  non-printing characters and non-UTF-8 bytes escaped and any NHS-number-like run withheld.
* Landing is idempotent: a file is known by its SHA-256, and a file already landed is
  skipped. So is a re-saved copy (other bytes, the same records: a spreadsheet adds a
  byte-order mark or CRLF): each batch's records are digested as a multiset
  (``governance.batch_contents``) and a file whose records equal a held batch's is not landed
  again, and is named in the report (``copies``). A file lands in one transaction with its
  batch record and digest. An *objections* file received again is not landed again either, but
  it is not a no-op: it restates that batch's objections (``restated``; ``_note_restatement``).
* Once landed inside the encrypted store, the plain received file is overwritten and removed,
  so identifiable data is held in one protected place (CoP 27b-c): only the entry read (its inode,
  status-change time and size), so a newer file renamed into place meanwhile is judged next run.
* Reasons, logs and metadata carry counts, column names of the contract, line numbers and
  hashes, never a row's values; a received column name is shown only if it is a plain
  identifier, and then as a name from outside (``shown_name``: NHS-number-like runs withheld),
  and a nested Parquet type by its kind only. DuckDB's own parse errors quote lines, so they
  are reduced to their line number here.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import stat
import time
import unicodedata
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from safehaven.core import schema
from safehaven.core.audit import shown_name
from safehaven.core.files import chunks, open_plain, replace_whole, sha256_file, shred_file
from safehaven.core.files import plain as _plain
from safehaven.core.sql import INTEGER_TYPES, PATTERN_CHARACTERS, file_lit, lit, q
from safehaven.core.store import interrupted, transaction
from safehaven.intake import batch_seal, landings
from safehaven.intake import control as totals
from safehaven.intake.batch_seal import Sealer
from safehaven.intake.contracts import Contract
from safehaven.intake.refusals import FileRejected

SUPPORTED = (".csv", ".parquet")
BATCH_CONTENTS = schema.BATCH_CONTENTS
#: where the kernel cannot say whether a file is open for writing (no lease: another owner, a
#: network file system), a file changed within this many seconds is taken as still arriving
ARRIVING_FALLBACK_SECONDS = 60
#: batch statuses whose records are still held and going on: a copy of one of them is not
#: landed again (a refused batch's records may be sent again, and are judged again)
HELD = ("landed", "accepted")
_HELD_SQL = ", ".join(lit(s) for s in HELD)
SAFE_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
BATCHES = schema.BATCHES
RESTATEMENTS = schema.OBJECTION_RESTATEMENTS
#: The longest first line (header) read, in bytes: a header of the contract is far shorter.
MAX_HEADER_BYTES = 1 << 16
#: the suffix of a quarantined entry's reason file (:func:`quarantine`)
REASON_SUFFIX = ".reason.json"
#: the suffix of the reason file of a refused entry left in incoming/ (:func:`_left_in_incoming`)
NOT_MOVED_SUFFIX = ".not-moved.reason.json"
#: the name :func:`_not_moved_name` gives a not-moved reason: ``<shown>.<sha12>[.<n>]`` and the suffix
NOT_MOVED_NAME = re.compile(r"(?P<shown>.+)\.[0-9a-f]{12}(?:\.[0-9]+)?" + re.escape(NOT_MOVED_SUFFIX))
#: a column only the objections contract has: a header naming it is an objections file's
OBJECTIONS_MARK = "objection_type"
#: the key, in a content file's reason details, of the version of the rule that set ``OBJECTIONS_FLAG``:
#: a reason without it was judged by an earlier rule, which missed files the haven cannot read
OBJECTIONS_RULE, OBJECTIONS_RULE_VERSION = "objections_rule", 2
#: the key, in a content file's reason details, of whether it may be an objections file
#: (:func:`may_be_objections`; named when it meant only that its header names ``OBJECTIONS_MARK``)
OBJECTIONS_FLAG = "objections_header"
#: the share of a content collection's fields (patient key aside) a refused file's first line must
#: name, when it names others too, for the haven to read it as that collection's file, not a
#: possible objections file (:func:`_own_header`)
OWN_HEADER_SHARE = 0.5
#: the most bytes read of a content file refused before its header was, to look for ``OBJECTIONS_MARK``
SNIFF_BYTES = 1 << 13
#: the delimiters a header read that way is split on (a comma, or what a spreadsheet chose)
SNIFF_DELIMITERS = re.compile(r"[,;\t|]")
#: a lower-case letter or digit followed by a capital: where :func:`header_name` splits ``CamelCase``
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
#: a run of characters that are neither letters nor digits (:func:`header_name` reads it as ``_``)
_NOT_WORD = re.compile(r"[\W_]+")
#: the distinctive fields a header of only a collection's columns must name to be that collection's: one
#: (a provider's code beside NHS numbers) is what a provider's list of opt-outs looks like (found by review)
SUBSET_DISTINCTIVE = 2
#: the identifiability classes of a content collection's distinctive fields (:func:`_own_header`)
DISTINCTIVE = ("content", "sensitive")
#: an objection as a value anywhere in a content file, in any case, set off as a field: a code of
#: ``data_contracts/code_lists/objection_types.yaml`` (``type1``, ``national_opt_out``), a type 1
#: opt-out as a GP system writes it (a term starting "Type 1 opt-out" or "Dissent", SNOMED CT
#: 827241000000103, Read 9Nu0): rows of objections under a content header, or with no header at all,
#: are a possible objections file (found by review). A bare "Type 1" is not one (a diabetes type, an
#: A&E department type)
_OBJECTION_CODE = re.compile(
    rb"(?i)(?<=[,;\t|\r\n])[\"']?[ ]{0,8}(?:type1|type[ _-]?1[ _-]?(?:opt|obj|dissent)[^,;\t|\r\n\"']{0,40}"
    rb"|national[ _-]?(?:data[ _-]?)?opt[ _-]?out|dissent[^,;\t|\r\n\"']{0,120}|827241000000103|9nu0)"
    rb"[ ]{0,8}[\"']?(?=[,;\t|\r\n])"
)
#: the objections contract's own column in any spelling a byte scan can see (:func:`_names_objections`);
#: both patterns read a bounded run after each starting byte, so a scan is linear in the file's size
#: (an unbounded run of blank lines had made it quadratic, found by review)
_MARK_BYTES = re.compile(rb"(?i)objection[^a-z0-9]{0,4}type")
#: words that name an objections list, or a column of one, in a file's or a column's name
#: (:func:`header_name` spelling); "opt-outs applied" and "type 1 diabetes" are not (found by review)
_OBJECTIONS_NAME = re.compile(
    r"(?:^|_)(?:objections?|objectors?|opt_?outs?|opted_?out|dissents?|ndop|type_?1_?(?:opt|obj|dissent)[a-z_]*)"
    r"(?=_|$)(?!_(?:applied|removed|excluded|filtered))"
)
#: bytes kept from one chunk to the next by :func:`_names_objections`, so no match is cut in two
_SCAN_OVERLAP = 64
#: ``preserve_insertion_order`` for a landing: DuckDB writes rows in the order it reads them
#: (:func:`insert_numbered` numbers them by it)
ROWS_IN_FILE_ORDER = "true"
#: DuckDB's text when its parallel CSV reader cannot read a file it can read on one thread
DUCKDB_READ_ON_ONE_THREAD = "Parallel CSV Reader currently does not support a full read"
#: DuckDB's text when a row is longer than its line limit (``max_line_size``).
DUCKDB_LINE_TOO_LONG = "Maximum line size"


@dataclass
class IngestReport:
    """What one ingest of one collection did (counts and hashes only)."""

    collection: str
    files_landed: int = 0
    #: batches landed whose landing entry the trail refused (``_record_landing``)
    landings_unaudited: int = 0
    #: earlier landings audited by this one (``Sealer.record_unrecorded``, ``landings.record_unrecorded``)
    landings_audited_late: int = 0
    files_skipped: int = 0
    files_quarantined: int = 0
    #: entries gone before they could be read (renamed or removed by the sender meanwhile)
    files_vanished: int = 0
    #: files still being written, or waiting for their control file (left in the folder for a later run)
    files_arriving: int = 0
    #: of those, the files waiting for their sender's control file (shown names; ``safehaven.intake.control``)
    awaiting_control: list[str] = field(default_factory=list)
    rows_landed: int = 0
    quarantined: list[dict[str, str]] = field(default_factory=list)
    #: received files whose records are held but which the haven's user could not overwrite
    not_overwritten: list[str] = field(default_factory=list)
    #: refused files the haven's user could not move to quarantine (left in incoming/): (shown
    #: name, rule, the error's kind)
    not_moved: list[dict[str, str]] = field(default_factory=list)
    #: files not landed because a held batch has the same records (re-saved copies)
    copies: list[dict[str, str]] = field(default_factory=list)
    #: objections files received again, each a restatement of a batch's statements (:func:`_note_restatement`)
    restated: list[dict[str, str]] = field(default_factory=list)
    batches: list[str] = field(default_factory=list)
    #: each drop read (:func:`drop_key`) and what became of it: ``landed``, ``already landed``,
    #: ``same records as <batch>``, ``restates batch <batch>``, ``quarantined (<rule>)``,
    #: ``still arriving``, ``AWAITING_CONTROL`` or ``vanished``
    drops: dict[str, str] = field(default_factory=dict)


def ensure_tables(con: duckdb.DuckDBPyConnection, contract: Contract) -> None:
    """Create the batch register and the collection's landing table (all text)."""
    schema.ensure(con, BATCHES, BATCH_CONTENTS)
    if contract.kind == "objections":
        schema.ensure(con, RESTATEMENTS)
    # by shape from data: the contract's fields (safehaven.core.schema, "made elsewhere")
    cols = ", ".join(f"{q(f)} VARCHAR" for f in contract.field_names)
    con.execute(f"CREATE TABLE IF NOT EXISTS landing.{contract.collection} ({cols}, _batch VARCHAR, _row BIGINT)")


#: leading bytes of containers sometimes saved under a ``.csv`` name: (magic, what it is)
ARCHIVES = ((b"PK\x03\x04", "a zip archive (an Excel workbook is one)"), (b"\x1f\x8b", "a gzip archive"))


def _check_start(start: bytes) -> None:
    """The file's first bytes: an archive or workbook under a ``.csv`` name is refused as what it
    is (``file.type``), not as a NUL byte at some offset; a UTF-8 byte-order mark is accepted once
    (Excel's "CSV UTF-8"), two or more are refused by name (``file.encoding``), not misread as
    broken CSV."""
    for magic, what in ARCHIVES:
        if start.startswith(magic):
            raise FileRejected(
                "file.type", f"the file is {what}, not CSV text", "export the data itself as CSV (UTF-8) and send that"
            )
    if start.startswith(codecs.BOM_UTF8 * 2):
        raise FileRejected(
            "file.encoding",
            "the file starts with more than one UTF-8 byte-order mark",
            "save the file again as UTF-8 (with one byte-order mark at most)",
        )


def check_bytes(path: Path) -> None:
    """Non-empty, valid UTF-8, no NUL bytes: checked in 1 MiB chunks, not per row."""
    if path.stat().st_size == 0:
        raise FileRejected("file.empty", "the file is empty", "send the file again with its rows")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as fh:
        for chunk in chunks(fh):
            if offset == 0:
                _check_start(chunk)
            if b"\x00" in chunk:
                raise FileRejected(
                    "file.nul_byte",
                    f"the file contains a NUL byte at offset {offset + chunk.index(0)}",
                    "export the file again as plain UTF-8 CSV text",
                )
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise FileRejected(
                    "file.encoding",
                    f"the file is not valid UTF-8 (byte offset {offset + exc.start})",
                    "export the file again with UTF-8 encoding",
                ) from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise FileRejected(
                "file.encoding", "the file ends inside a UTF-8 character", "export the file again with UTF-8 encoding"
            ) from None


def _display(name: str) -> str:
    """A received column name fit for a reason file: shown only if it is a plain identifier, and
    then as any name from outside is (``safehaven.core.audit.shown_name``: an NHS-number-like run
    is withheld, CoP 8a), so a per-patient column (``nhs_9990000018``) names no patient.

    A file without a header has a data row in its first line, so other "names" may be values.
    """
    return shown_name(name) if SAFE_NAME.fullmatch(name) else "<a column name that is not a plain identifier>"


def _spreadsheet_artefacts(names: list[str]) -> None:
    """Refuse, by name, a header line a spreadsheet left: Excel's ``sep=`` line, or columns with
    no name (trailing commas)."""
    if len(names) <= 2 and re.fullmatch(r"sep=.?", ",".join(names).strip()):
        raise FileRejected(
            "file.header.excel_sep",
            "the first line is Excel's 'sep=' line, not the header row",
            "save the file as plain 'CSV UTF-8' (without the sep= line) and send it again",
        )
    if len(names) > 1 and any(not n.strip() for n in names):
        raise FileRejected(
            "file.header.empty_name",
            f"{sum(1 for n in names if not n.strip())} column(s) of the header have no name (trailing commas?)",
            "remove the empty columns (and trailing commas) and send the file again",
        )


def header_name(raw: str) -> str:
    """A header's name as a person reads it, in one spelling: Unicode compatibility forms folded
    (full-width letters), invisible format characters (zero-width, byte-order marks) dropped, words
    of ``CamelCase`` split, case folded, and every run of other characters (spaces, non-breaking
    spaces, hyphens, quotes) one ``_``: ``Objection Type``, ``objection-type`` and ``ObjectionType``
    all read ``objection_type`` (found by review)."""
    text = "".join(c for c in unicodedata.normalize("NFKC", raw) if unicodedata.category(c) != "Cf")
    text = _CAMEL.sub(r"\1_\2", text).casefold()
    return _NOT_WORD.sub("_", text).strip("_")


def objections_header(header: list[str]) -> bool:
    """Whether a header names the objections contract's own column (``OBJECTIONS_MARK``), its names
    read as a person would (:func:`header_name`): a file with that header is an objections file,
    whatever folder it was received in (CoP 11-14)."""
    return OBJECTIONS_MARK in {header_name(h) for h in header}


def _first_bytes(path: Path) -> bytes | None:
    """At most ``SNIFF_BYTES`` of ``path`` if it is a plain file (``safehaven.core.files.open_plain``);
    None for any other entry, or if it cannot be read."""
    fd = open_plain(path)
    if fd is None:
        return None
    try:
        return os.read(fd, SNIFF_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)


def sniffed_lines(start: bytes) -> list[list[str]]:
    """The names of each line of a file's first bytes ``start``, read leniently: UTF-16 if it
    starts with a UTF-16 byte-order mark, else UTF-8 with bad bytes replaced; leading byte-order
    marks, blank lines and Excel's ``sep=`` line skipped; split on ``SNIFF_DELIMITERS``, quotes
    around a name removed, each read as a person reads it (:func:`header_name`)."""
    utf16 = start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    text = start.decode("utf-16" if utf16 else "utf-8", errors="replace").lstrip("\ufeff")
    lines = [line for line in text.splitlines() if line.strip("\ufeff \t")]
    if lines and re.fullmatch(r"sep=.?", lines[0].strip("\ufeff ").lower()):
        lines = lines[1:]
    return [[header_name(name) for name in SNIFF_DELIMITERS.split(line)] for line in lines]


def _own_header(names: list[str], contract: Contract) -> bool:
    """Whether a first line's ``names`` (:func:`header_name`) read as content collection
    ``contract``'s own header: they name some of its distinctive fields (``DISTINCTIVE``: what it
    records, not who it is about; an objections list may carry a date of birth, sex and postcode as
    any collection does, found by review) and either nothing but its fields (its columns, some
    missing) or at least ``OWN_HEADER_SHARE`` of its distinctive ones (some renamed or added)."""
    fields = {header_name(f) for f in contract.field_names}
    distinctive = {header_name(f.name) for f in contract.fields if f.identifiability in DISTINCTIVE}
    given = {n for n in names if n}
    named = len(distinctive & given)
    if not distinctive or named < min(SUBSET_DISTINCTIVE, len(distinctive)):
        return False  # a GP export of an event date beside NHS numbers is a type 1 list's shape (found by review)
    return given <= fields or named >= OWN_HEADER_SHARE * len(distinctive)


def may_be_objections(start: bytes | None, contract: Contract) -> bool:
    """Whether an entry refused in content collection ``contract``'s folder may be an objections
    file (CoP 11-14; fail closed): it is, unless its first bytes ``start`` were read and hold no
    objections header on any line (:func:`objections_header`) under a first line that reads as the
    collection's own header (:func:`_own_header`), so the haven can tell it is none. An entry the
    haven cannot tell apart is one: a folder or link (``start`` None: not opened), a compressed or
    other binary file, text in an encoding read wrongly (UTF-16 with no byte-order mark), a title
    line above the header, a file with no header. An empty file holds no statement, so it is none."""
    if start is None:
        return True
    if not start:
        return False
    text = _as_utf8(start)
    if b"\x00" in text:
        return True  # UTF-16 with no byte-order mark, UTF-32, or binary: the scans cannot read it (found by review)
    if _OBJECTION_CODE.search(b"\n" + text + b"\n"):
        return True
    lines = sniffed_lines(start)
    if any(objections_header(names) for names in lines):
        return True
    if lines and any(_OBJECTIONS_NAME.search(n) for n in lines[0]):
        return True  # a column named as an opt-out: 'Opt Out Type', 'NDOP Flag' (found by review)
    return not (lines and _own_header(lines[0], contract))


def _parquet_start(path: Path, contract: Contract) -> bool:
    """:func:`may_be_objections` for a Parquet entry: its column names (its footer's schema, read
    from a plain file only) stand for its first line; one whose schema cannot be read may be one."""
    import pyarrow.parquet as pq  # here: only a refused Parquet file needs it

    fd = open_plain(path)
    if fd is None:
        return True
    try:
        with os.fdopen(fd, "rb") as fh:
            schema_ = pq.read_schema(fh)
    except Exception:  # noqa: BLE001 -- any file pyarrow cannot read is one the haven cannot tell apart
        return True
    nested = [header_name(n) for n in _all_names(schema_)]  # a struct's fields too (found by review)
    names = [header_name(n) for n in schema_.names]
    fields = {header_name(f) for f in contract.field_names}
    # its values are not read: a column the contract does not declare may hold objections (found by review)
    marked = any(_MARK_BYTES.search(n.encode()) or _OBJECTIONS_NAME.search(n) for n in nested)
    return marked or not set(names) <= fields or not _own_header(names, contract)


def _all_names(fields: Any) -> Iterator[str]:
    """Every field name of a Parquet schema or type, nested ones (struct, list, map) included."""
    for f in fields:
        yield f.name
        yield from _all_names(_children(f.type))


def _children(kind: Any) -> list[Any]:
    """The fields nested in a pyarrow type (a struct's, a list's values, a map's keys and items)."""
    if hasattr(kind, "value_field"):
        return [kind.value_field]
    if hasattr(kind, "key_field"):
        return [kind.key_field, kind.item_field]
    return [kind.field(i) for i in range(kind.num_fields)] if getattr(kind, "num_fields", 0) else []


def with_objections_flag(path: Path, contract: Contract, details: dict[str, Any]) -> dict[str, Any]:
    """A content file's refusal ``details`` with ``OBJECTIONS_FLAG``: whether it may be an objections
    file (:func:`may_be_objections`, looked at whichever rule refused it: its name, suffix, bytes or
    header), so the objection feed counts it ``feed.misrouted`` until a person looks (CoP 11-14,
    fail closed). Only the flag is recorded, never what was read. A link or other entry that is
    not a plain file is not opened (:func:`_first_bytes`). :func:`quarantine` calls it for every
    refusal."""
    if contract.kind != "content" or details.get(OBJECTIONS_FLAG) is True:
        return {**details, OBJECTIONS_RULE: OBJECTIONS_RULE_VERSION}
    if _OBJECTIONS_NAME.search(header_name(path.name)):
        flag = True  # its sender named it an objections list (found by review)
    elif is_parquet(path):  # not opened unless a plain file (``_parquet_start``)
        flag = _parquet_start(path, contract)
    else:
        flag = may_be_objections(_first_bytes(path), contract) or _names_objections(path)
    return {**details, OBJECTIONS_FLAG: flag, OBJECTIONS_RULE: OBJECTIONS_RULE_VERSION}


def _as_utf8(start: bytes) -> bytes:
    """A file's first bytes as UTF-8: decoded from UTF-16 when they start with its byte-order mark
    (Excel's "Unicode Text"), so the scans read its text (found by review)."""
    if start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return start.decode("utf-16", errors="replace").encode()
    return start


def _text_chunks(fh: Any) -> Iterator[bytes]:
    """A file's bytes a chunk at a time, as UTF-8 when it starts with a UTF-16 byte-order mark."""
    decoder = None
    for n, chunk in enumerate(chunks(fh)):
        if n == 0 and chunk.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            decoder = codecs.getincrementaldecoder("utf-16")(errors="replace")
        yield decoder.decode(chunk).encode() if decoder else chunk


def _names_objections(path: Path) -> bool:
    """Whether any bytes of a plain file, past the first ones too, name the objections contract's
    column or hold an objection type code as a field (``_MARK_BYTES``, ``_OBJECTION_CODE``): an
    objections list appended to a content extract (``cat``), or rows of objections under a content
    header (found by review). Read once, in chunks, only for a refused file; an entry that cannot be
    read is one the haven cannot tell apart."""
    fd = open_plain(path)
    if fd is None:
        return True
    tail = b"\n"  # the file's start is a line's
    try:
        with os.fdopen(fd, "rb") as fh:
            for chunk in _text_chunks(fh):
                window = tail + chunk
                if b"\x00" in chunk or _MARK_BYTES.search(window) or _OBJECTION_CODE.search(window):
                    return True
                tail = window[-_SCAN_OVERLAP:]
    except OSError:
        return True
    return bool(_OBJECTION_CODE.search(tail + b"\n"))  # its end is a line's


def check_header(header: list[str], contract: Contract) -> None:
    """:func:`_check_header`; every refusal of a header it read records whether that header is an
    objections file's (``OBJECTIONS_FLAG``, :func:`objections_header`), whichever rule refused it
    first, so the objection feed sees an objections file received in a content collection's folder
    (``safehaven.protect.feed``, ``feed.misrouted``; CoP 11-14, fail closed)."""
    try:
        _check_header(header, contract)
    except FileRejected as err:
        err.details = {**err.details, OBJECTIONS_FLAG: objections_header(header)}
        raise


def _check_header(header: list[str], contract: Contract) -> None:
    """Exactly the contract's columns, each once, as plain lower-case identifiers.

    Reasons, most specific first: a first line that names none of the contract's columns
    (no header, or a data row), a delimiter other than a comma, duplicate names, names that
    differ only by case, names that are not plain identifiers (spaces, quotes, other
    characters; the names themselves are not repeated), missing or unexpected columns.
    """
    expected = contract.field_names
    names = [h.lstrip("\ufeff") if i == 0 else h for i, h in enumerate(header)]
    normalised = [n.strip().lower() for n in names]
    _spreadsheet_artefacts(names)
    if len(names) == 1 and any(sep in names[0] for sep in (";", "\t", "|")):
        raise FileRejected(
            "file.header.delimiter",
            "the header is one column: the fields are not separated by commas",
            "export the file as comma-separated values (CSV) with a header row",
        )
    if not set(normalised) & set(expected):
        raise FileRejected(
            "file.header.missing",
            "the first line names none of the contract's columns (is the header row missing?)",
            f"send the file with a header row naming the contract's columns: {', '.join(expected)}",
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    lowered = [n.lower() for n in names]
    collide = sorted({n for n in lowered if lowered.count(n) > 1} - {d.lower() for d in dupes})
    hostile = [n for n in names if not SAFE_NAME.fullmatch(n)]
    if dupes:
        raise FileRejected(
            "file.header.duplicate",
            f"duplicate column names: {', '.join(map(_display, dupes))}",
            "send the file with each column once",
            {"duplicates": [_display(d) for d in dupes]},
        )
    if collide:
        raise FileRejected(
            "file.header.case_collision",
            "column names that differ only by case: " + ", ".join(map(_display, collide)),
            "send the file with each column once, in lower case",
        )
    if hostile:
        near = sorted({n.strip().lower() for n in hostile} & set(expected))
        hint = f" (differing from the contract's only by spaces or case: {', '.join(near)})" if near else ""
        raise FileRejected(
            "file.header.hostile_name",
            f"{len(hostile)} column name(s) are not plain lower-case identifiers (letters, digits, underscore){hint}",
            f"use exactly the contract's columns: {', '.join(expected)}",
            {"not_plain": len(hostile), "near_contract_names": near},
        )
    missing = [c for c in expected if c not in names]
    extra = [n for n in names if n not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing columns: " + ", ".join(missing))
        if extra:
            parts.append("unexpected columns: " + ", ".join(map(_display, extra)))
        raise FileRejected(
            "file.header.columns",
            "; ".join(parts),
            f"send the file with exactly the contract's columns "
            f"({contract.collection} v{contract.version}): {', '.join(expected)}",
            {"missing": missing, "extra": [_display(e) for e in extra]},
        )


#: Parquet (DuckDB) column types that can hold each contract type without loss.
READABLE_AS: dict[str, tuple[str, ...]] = {
    "VARCHAR": ("VARCHAR", *INTEGER_TYPES),
    "DATE": ("VARCHAR", "DATE"),
    "INTEGER": ("VARCHAR", *INTEGER_TYPES),
    "DOUBLE": ("VARCHAR", "FLOAT", "DOUBLE", *INTEGER_TYPES),
}


#: a DuckDB type shown as it is in a reason: a name, digit parameters (``DECIMAL(9,2)``), array
#: marks; any other (``STRUCT(...)``, ``ENUM(...)``, ``MAP(...)``) holds names or values from the file
_PLAIN_TYPE = re.compile(r"[A-Z][A-Z0-9 ]*(\(\d+(, ?\d+)?\))?(\[\d*\])*")


def _shown_type(physical: str) -> str:
    """A Parquet column's type fit for a reason file: a nested or enumerated type is named by its
    kind only, since its parameters are the sender's field names or values (CoP 8a)."""
    return physical if _PLAIN_TYPE.fullmatch(physical) else physical.split("(")[0] + "(...)"


def mistyped_columns(types: dict[str, str], contract: Contract) -> list[str]:
    """The contract's columns whose Parquet (DuckDB) type cannot be read as the contract's type.

    Text can be anything (it is checked row by row); a code held as an integer is text
    without loss; a DATE must be a date or ISO text. A float for a code, a timestamp for a
    date, booleans, binary or nested columns cannot be the contract's type.
    """
    wrong = []
    for spec in contract.fields:
        base = types.get(spec.name, "").split("(")[0]
        decimal_for_double = spec.type == "DOUBLE" and base == "DECIMAL"
        if base not in READABLE_AS[spec.type] and not decimal_for_double:
            wrong.append(spec.name)
    return wrong


def columns_without_values(con: duckdb.DuckDBPyConnection, path: Path, names: list[str]) -> set[str]:
    """Those of ``names`` that hold no value in the Parquet file at ``path`` (every row NULL).

    pandas/Arrow writes a column of only ``None`` (an objections list with no withdrawals) with
    Arrow's null type, which DuckDB reads as INTEGER, and its statistics carry no null count: so
    the values are counted, in SQL, for the columns asked about only.
    """
    if not names:
        return set()
    counts = ", ".join(f"count({q(n)})" for n in names)
    try:
        found = con.execute(f"SELECT {counts} FROM read_parquet({file_lit(path)})").fetchone()
    except duckdb.Error:
        raise _parquet_rows_unreadable() from None
    return {n for n, c in zip(names, found, strict=True) if c == 0}


def _parquet_rows_unreadable() -> FileRejected:
    """A Parquet file whose schema reads but whose rows do not (``file.parquet``)."""
    return FileRejected("file.parquet", "the file's rows cannot be read as Parquet", "export the file again as Parquet")


def check_column_types(types: dict[str, str], contract: Contract, empty: Collection[str] = ()) -> None:
    """Each Parquet column's type can be read as the contract's (:func:`mistyped_columns`), or
    the column holds no value at all (``empty``, :func:`columns_without_values`): a column with
    no values can be any type, and is read as NULLs of the contract's (the "bad input loses
    nothing" standard: an everyday file is not refused for a type its values never had).
    """
    wrong = [
        f"{name} is {_shown_type(types.get(name, ''))}, the contract's type is {contract.field(name).type}"
        for name in mistyped_columns(types, contract)
        if name not in empty
    ]
    if wrong:
        raise FileRejected(
            "file.column_type",
            "columns whose type cannot be the contract's type: " + "; ".join(wrong),
            "export the file again with text, integer or date columns as the contract says",
            {"columns": wrong},
        )


def _csv_header(path: Path) -> list[str]:
    """The header's names: the byte-order mark removed first (``utf-8-sig``), then parsed as CSV,
    so a quoted header (pandas ``QUOTE_ALL``, Excel) reads as the plain names."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        first = fh.readline(MAX_HEADER_BYTES + 1)
    if len(first) > MAX_HEADER_BYTES:
        raise FileRejected(
            "file.line_too_long",
            f"the first line is longer than {MAX_HEADER_BYTES:,} characters (no header row, or no line ends)",
            "export the file again as CSV with one row per line and a header row naming the contract's columns",
        )
    if not first.strip():
        raise FileRejected(
            "file.header.missing",
            "the file has no header row",
            "send the file with a header row naming the contract's columns",
        )
    try:
        return next(csv.reader(io.StringIO(first)))
    except csv.Error as exc:
        raise _csv_rejection(exc, "the header row") from None


def _csv_rejection(exc: csv.Error, where: str) -> FileRejected:
    """A Python CSV error as a reason (its text names limits, never values)."""
    if "field larger than field limit" in str(exc):
        return FileRejected(
            "file.field_too_large",
            f"{where} holds a field larger than {csv.field_size_limit():,} characters",
            "check the export: no field of the contract is that long; send the file again",
        )
    return FileRejected(
        "file.malformed",
        f"{where} is not well-formed CSV (broken quoting)",
        "fix the file's quoting and send it again",
    )


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def _line_of(error: str) -> str:
    match = re.search(r"[Ll]ine:? (\d+)", error)
    return f" (first at line {match.group(1)})" if match else ""


def read_relation_sql(path: Path, contract: Contract, parallel: bool = True) -> str:
    """A SQL relation over the file, every column as text, in contract order (a CSV read on one
    thread if not ``parallel``: :func:`_insert_file`)."""
    cols = ", ".join(f"CAST({q(f)} AS VARCHAR) AS {q(f)}" for f in contract.field_names)
    if is_parquet(path):
        return f"SELECT {cols} FROM read_parquet({file_lit(path)})"
    columns = "{" + ", ".join(f"{lit(f)}: 'VARCHAR'" for f in _csv_header(path)) + "}"
    return (
        f"SELECT {cols} FROM read_csv({file_lit(path)}, header=true, delim=',', quote='\"', "
        f"escape='\"', columns={columns}, strict_mode=true, null_padding=false, "
        f"encoding='utf-8', auto_detect=false{'' if parallel else ', parallel=false'})"
    )


def inspect_file(con: duckdb.DuckDBPyConnection, path: Path, contract: Contract) -> None:
    """Raise FileRejected if ``path`` cannot be read whole as ``contract``'s collection."""
    if path.suffix.lower() not in SUPPORTED:
        raise FileRejected(
            "file.type",
            f"unsupported file type {shown_name(path.suffix) or '(none)'!r}",
            "send CSV (.csv) or Parquet (.parquet)",
        )
    if path.stat().st_size == 0:
        raise FileRejected("file.empty", "the file is empty", "send the file again with its rows")
    if is_parquet(path):
        try:
            described = con.execute(f"DESCRIBE SELECT * FROM read_parquet({file_lit(path)})").fetchall()
        except duckdb.Error:
            raise FileRejected(
                "file.parquet", "the file is not readable Parquet", "export the file again as Parquet"
            ) from None
        check_header([r[0] for r in described], contract)
        types = {r[0]: str(r[1]) for r in described}
        check_column_types(types, contract, columns_without_values(con, path, mistyped_columns(types, contract)))
    else:
        check_bytes(path)  # text only: Parquet is binary (it holds NUL bytes by design)
        check_header(_csv_header(path), contract)


def quarantine(
    path: Path, dest_dir: Path, contract: Contract, sha: str, err: FileRejected, entry: dict[str, Any] | None = None
) -> Path:
    """Move the whole file to quarantine with a reason file a person can act on, written whole or not
    at all (``safehaven.core.files.replace_whole``): a run killed between the move and the reason
    leaves the file with none, which the objection feed counts as a fault (fail closed). One that
    cannot be moved (:class:`NotMoved`) still gets its reason file, marked as left in incoming/, with
    the entry's raw identity as judged (``entry``, :func:`entry_identity`), so every safeguard that
    reads reasons (the objection feed) sees the refusal, and of which entry (fail closed)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest_dir.chmod(0o700)
    shown = Path(shown_name(path.name))
    dest = free_name(dest_dir, shown, sha)
    reason = {
        "collection": contract.collection,
        "contract_version": contract.version,
        "file": shown.name,
        "quarantined_as": dest.name,
        "sha256": sha,
        "quarantined_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rule": err.rule,
        "reason": err.reason,
        "what_to_do": err.action + "; then place the corrected file in "
        f"incoming/{contract.collection}/. Nothing of this file was landed.",
        "details": with_objections_flag(path, contract, err.details),
    }
    try:
        _move_whole(path, dest)
    except OSError as exc:  # its message names the raw path: never raised or logged as it is
        if os.path.lexists(path) and os.path.isfile(dest) and not os.path.islink(dest):
            with contextlib.suppress(OSError):  # a regular file's copy; the received file is whole
                dest.unlink()
        _left_in_incoming(dest_dir, shown, sha, {**reason, "entry": entry}, contract.collection)
        raise NotMoved(shown.name, type(exc).__name__) from None
    replace_whole(dest.with_name(dest.name + REASON_SUFFIX), json.dumps(reason, indent=2))
    return dest


def entry_identity(entry: os.stat_result | None, hashed: bool) -> dict[str, Any] | None:
    """An entry's raw identity as the haven judged it (from ``lstat``: inode, size, modification and
    status-change times, none of which names anyone) and whether the reason's ``sha256`` is its
    bytes' hash (``hashed``; else it stands in for one, :func:`_name_hash`). A not-moved reason records
    it, so the objection feed takes an entry for the refused one only while it is that entry
    (``safehaven.protect.feed.refused_in_place``); None when the entry could not be seen."""
    if entry is None:
        return None
    return {
        "ino": entry.st_ino,
        "size": entry.st_size,
        "mtime_ns": entry.st_mtime_ns,
        "ctime_ns": entry.st_ctime_ns,
        "hashed": hashed,
    }


def _seen(path: Path) -> os.stat_result | None:
    """The entry's ``lstat``, or None when it cannot be had."""
    try:
        return os.lstat(path)
    except OSError:
        return None


def _left_in_incoming(dest_dir: Path, shown: Path, sha: str, reason: dict[str, Any], collection: str) -> None:
    """The reason file of a refused entry that could not be moved: one per entry and content
    (written again, not added to, by each run that meets it), with the entry's identity as judged
    (``reason["entry"]``, :func:`entry_identity`)."""
    left = {
        **reason,
        "quarantined_as": None,
        "left_in": f"incoming/{collection}/",
        "what_to_do": f"give the haven's user write access to incoming/{collection}/ (or remove the file); "
        + reason["what_to_do"],
    }
    # not suppressed: a haven that cannot write its own quarantine fails the stage (shown names only)
    replace_whole(_not_moved_name(dest_dir, shown, sha), json.dumps(left, indent=2))


def _not_moved_name(dest_dir: Path, shown: Path, sha: str) -> Path:
    """The not-moved reason's name: the first of ``<shown>.<sha12>[.<n>].not-moved.reason.json``
    that is free (:func:`free_name`'s test) or is this entry's own not-moved reason, written by an
    earlier run; never a file of another kind (a received file quarantined under that name, a
    link), so a sender who sends a file of that name first never has the haven's reason overwrite
    it and read as a received file (fail closed)."""
    for n in range(10_000):
        stem = f"{shown.name}.{sha[:12]}" + (f".{n}" if n else "")
        dest = dest_dir / f"{stem}{NOT_MOVED_SUFFIX}"
        if not os.path.lexists(dest) and not os.path.lexists(dest_dir / (dest.name + ".reason.json")):
            return dest
        if _own_not_moved(dest, sha):
            return dest
    raise FileExistsError(dest_dir / shown.name)


def _own_not_moved(path: Path, sha: str) -> bool:
    """Whether ``path`` is the haven's not-moved reason of the entry with SHA-256 ``sha``: a regular
    file (not a link), with no reason file of its own, recording that entry as left in incoming/."""
    if path.is_symlink() or not path.is_file() or os.path.lexists(path.with_name(path.name + ".reason.json")):
        return False
    try:
        reason = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(reason, dict) and reason.get("sha256") == sha and reason.get("quarantined_as", "") is None


class NotMoved(Exception):
    """A refused entry the haven's user could not move to quarantine (the folder's permissions):
    it stays in incoming/, named by its shown name only, and each run tries again."""

    def __init__(self, shown: str, kind: str):
        super().__init__(f"{shown} could not be moved to quarantine ({kind})")
        self.shown, self.kind = shown, kind


class SameRecords(Exception):
    """The file holds exactly the records of a batch already held: a re-saved copy (other bytes,
    e.g. a byte-order mark or CRLF added by a spreadsheet), not landed again."""

    def __init__(self, batch_id: str, file_name: str):
        super().__init__(batch_id)
        self.batch_id, self.file_name = batch_id, file_name


def _digest_sql(contract: Contract) -> str:
    """SQL of a batch's records digest over ``landing.<collection>`` rows (grouped by the caller)."""
    cols = ", ".join(q(f) for f in contract.field_names)
    return f"sum(hash({cols})::HUGEINT)::VARCHAR || ':' || sum(hash({cols}, 'second')::HUGEINT)::VARCHAR"


def _backfill_contents(con: duckdb.DuckDBPyConnection, contract: Contract) -> None:
    """Digest, once, the held batches landed before ``governance.batch_contents`` existed (the
    landing table is read only when there are such batches)."""
    missing = con.execute(
        f"SELECT list(batch_id) FROM {BATCHES} WHERE collection = ? AND status IN ({_HELD_SQL}) "
        f"AND batch_id NOT IN (SELECT batch_id FROM {BATCH_CONTENTS})",
        [contract.collection],
    ).fetchone()[0]
    if not missing:
        return
    con.execute(
        f"INSERT INTO {BATCH_CONTENTS} SELECT _batch, ?, count(*), {_digest_sql(contract)} "
        f"FROM landing.{q(contract.collection)} WHERE list_contains(?, _batch) GROUP BY _batch",
        [contract.collection, missing],
    )


def _refuse_copy(con: duckdb.DuckDBPyConnection, contract: Contract, sha: str, rows: int) -> None:
    """Record the new batch's records digest, or raise ``SameRecords`` when a held batch of the
    collection has the same records (as a multiset: order and bytes aside). Inside the landing
    transaction, over the new batch's rows only. Two independent 64-bit row hashes summed with
    the row count: a different file matches only by a 128-bit accident."""
    digest = con.execute(
        f"SELECT {_digest_sql(contract)} FROM landing.{q(contract.collection)} WHERE _batch = ?", [sha]
    ).fetchone()[0]
    same = con.execute(
        f"SELECT b.batch_id, b.file_name FROM {BATCH_CONTENTS} c JOIN {BATCHES} b USING (batch_id) "
        f"WHERE c.collection = ? AND c.rows = ? AND c.digest = ? AND b.status IN ({_HELD_SQL}) LIMIT 1",
        [contract.collection, rows, digest],
    ).fetchone()
    if same is not None:
        raise SameRecords(same[0], same[1])
    con.execute(f"INSERT INTO {BATCH_CONTENTS} VALUES (?, ?, ?, ?)", [sha, contract.collection, rows, digest])


class StillArriving(Exception):
    """The file is still being written (or changed while it was read): a later run reads it."""


def still_arriving(path: Path) -> bool:
    """Whether another process has ``path`` open for writing: the kernel grants a read lease
    only when none has (Linux ``F_SETLEASE``; the lease is released at once, and a lease break
    in between would signal ``SIGURG``, which is ignored, never the default ``SIGIO``). Where no
    lease can be taken, a file changed in the last ``ARRIVING_FALLBACK_SECONDS`` (and not in the
    future: a sender's clock ahead of ours) is taken as arriving. A file that cannot be opened
    is not arriving (reading it fails next, and it is quarantined with that reason); an entry
    that is no longer a plain file is refused as such (never opened in a way that blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise
    except OSError:
        return False
    try:
        entry = os.fstat(fd)
        if not stat.S_ISREG(entry.st_mode):
            raise not_regular(path) or _unreadable(OSError("not a regular file"))
        if not hasattr(fcntl, "F_SETLEASE"):
            return _changed_lately(entry)
        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_SETSIG", 10), signal.SIGURG)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            return exc.errno in (errno.EAGAIN, errno.EBUSY) or _changed_lately(entry)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def _changed_lately(entry: os.stat_result) -> bool:
    """Changed within the last ``ARRIVING_FALLBACK_SECONDS`` (an mtime ahead of now is not)."""
    return 0 <= time.time() - entry.st_mtime < ARRIVING_FALLBACK_SECONDS


def _unchanged_since(path: Path, seen: os.stat_result) -> None:
    """Raise ``StillArriving`` if ``path`` changed since ``seen`` (written to while it was read): its
    inode, size, modification time or status-change time (``safehaven.intake.control.identity``), the
    last of which a sender cannot set back, so a file rewritten in place after its SHA-256 was taken,
    its size and modification time kept, is never landed as the bytes that were hashed."""
    now = os.stat(path, follow_symlinks=False)
    if (totals.identity(now), now.st_mtime_ns) != (totals.identity(seen), seen.st_mtime_ns):
        raise StillArriving(path.name)


def free_name(folder: Path, shown: Path, sha: str) -> Path:
    """A name in ``folder`` that neither a file nor a reason file has, nor is the reason slot of an
    entry there (``<entry>.reason.json``: a received file must never stand in for the reason of a
    file whose reason was lost, found by review): ``shown``, else with the SHA-256 prefix, else with
    a counter as well (no quarantined file or reason is overwritten)."""
    numbered = (f"{shown.stem}.{sha[:12]}.{n}{shown.suffix}" for n in range(1, 10_000))
    for name in itertools.chain([shown.name, f"{shown.stem}.{sha[:12]}{shown.suffix}"], numbered):
        dest, slot_of = folder / name, folder / name.removesuffix(REASON_SUFFIX)
        taken = os.path.lexists(dest) or os.path.lexists(folder / (name + REASON_SUFFIX))
        if not taken and not (name.endswith(REASON_SUFFIX) and os.path.lexists(slot_of)):
            return dest
    raise FileExistsError(folder / shown.name)


def _move_whole(path: Path, dest: Path) -> None:
    """Move an entry to quarantine as it is; a file with another hard link is copied and its
    name unlinked, so quarantine holds a file of its own and a later shred of it (disposal)
    never overwrites the bytes of the other name, which may be outside the home."""
    entry = os.lstat(path)
    if not stat.S_ISREG(entry.st_mode):
        os.rename(path, dest)  # a folder, link or special file moves whole or not at all: never copied
        return
    if entry.st_nlink > 1:
        shutil.copyfile(path, dest, follow_symlinks=False)
        path.unlink()
        return
    shutil.move(str(path), dest)


def land_file(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    contract: Contract,
    sha: str,
    seen: os.stat_result | None = None,
    drop: str | None = None,
    sealer: Sealer | None = None,
    declared: totals.Control | None = None,
) -> int:
    """Insert the file's rows into ``landing.<collection>`` with its batch record (naming its
    ``drop``, :func:`drop_key`), atomically; nothing is committed if the file changed since
    ``seen`` (its state when it was hashed), or if it does not hold the rows its control file
    ``declared`` (``safehaven.intake.control.check_rows``: the rows DuckDB inserted are counted).
    An objections batch is sealed in the same transaction (``sealer``: ``safehaven.intake.batch_seal``)."""
    con.execute("BEGIN TRANSACTION")
    try:
        rows = _insert_file(con, path, contract, sha)
        if declared is not None:
            totals.check_rows(declared, rows)
        if rows == 0:
            raise FileRejected("file.no_rows", "the file has a header but no rows", "send the file again with its rows")
        _refuse_copy(con, contract, sha, rows)
        if seen is not None:
            _unchanged_since(path, seen)
        con.execute(
            f"INSERT INTO {BATCHES} VALUES (?, ?, ?, ?, ?, ?, 'landed', NULL, NULL, ?, ?, to_timestamp(?))",
            [
                sha,
                contract.collection,
                shown_name(path.name),
                sha,
                rows,
                landings.clock(contract.collection),
                contract.version,
                drop,
                arrived(seen or os.lstat(path)),
            ],
        )
        if sealer is not None:  # its rows and its batch record (what orders its statements)
            sealer.seal(con, batch_seal.LANDED, [sha])
        con.execute("COMMIT")
        return int(rows)
    except (FileRejected, SameRecords, StillArriving):
        con.execute("ROLLBACK")
        raise
    except duckdb.Error as exc:
        con.execute("ROLLBACK")
        if interrupted(exc):  # not the file's fault: _ingest_one stops the run for it
            raise
        text = str(exc)
        if is_parquet(path):
            raise _parquet_rows_unreadable() from None
        if DUCKDB_LINE_TOO_LONG in text:
            raise FileRejected(
                "file.field_too_large",
                f"a row is longer than the reader's line limit: it holds a field far larger than "
                f"any the contract allows{_line_of(text)}",
                "check the export (a field may have swallowed line ends or a file); send the file again",
            ) from None
        raise FileRejected(
            "file.malformed",
            f"the file is not well-formed CSV: rows with a different number "
            f"of fields than the header, or broken quoting{_line_of(text)}",
            "fix the file so every row has one field per header column, and send it again",
        ) from None


def _insert_file(con: duckdb.DuckDBPyConnection, path: Path, contract: Contract, sha: str) -> int:
    """The file's rows inserted, numbered (:func:`insert_numbered`), as the first statement of the
    caller's open transaction. DuckDB's parallel CSV reader cannot read some well-formed files
    (quoted fields of about a megabyte holding line ends: "does not support a full read on this
    file", :data:`DUCKDB_READ_ON_ONE_THREAD`); such a file is read again on one thread, in a
    transaction begun again, rather than refused as malformed (found by review).

    DuckDB's one-thread reader drops a last row whose quoted field is never closed, where the
    parallel one refuses it (found by review): a file cut short inside a long field would land
    short. So only a file whose quotes are all closed (:func:`_quotes_closed`) is read again; any
    other is refused as malformed, as the parallel reader would have refused it."""
    table = f"landing.{contract.collection}"
    try:
        return insert_numbered(con, table, contract.field_names, sha, read_relation_sql(path, contract))
    except duckdb.NotImplementedException as exc:
        if DUCKDB_READ_ON_ONE_THREAD not in str(exc):
            raise
    if not _quotes_closed(path):
        raise FileRejected(
            "file.malformed",
            "the file is not well-formed CSV: a quoted field is never closed (the file may have been cut short)",
            "fix the file so every quoted field is closed (or send the whole file again)",
        )
    con.execute("ROLLBACK")
    con.execute("BEGIN TRANSACTION")
    return insert_numbered(con, table, contract.field_names, sha, read_relation_sql(path, contract, parallel=False))


def _quotes_closed(path: Path) -> bool:
    """Whether the file holds an even number of quote characters: in CSV quoted as the haven reads
    it (``"`` quotes a field and is doubled inside one) every quote is one of a pair, so an odd
    count is a field left open, as by a transfer cut short inside it."""
    with open(path, "rb") as fh:
        return sum(chunk.count(b'"') for chunk in chunks(fh)) % 2 == 0


def insert_numbered(con: duckdb.DuckDBPyConnection, table: str, names: list[str], batch: str, relation: str) -> int:
    """Insert ``relation``'s rows into ``table`` as batch ``batch``, each with ``_row``, its row
    number in the file (1, 2, ...: the number a reason or a person names it by, and the order an
    objections file's statements are applied in); returns the rows inserted. Inside the caller's
    transaction; raises :class:`FileRejected` (``file.batch_in_landing``) when the table already
    holds rows of the batch, which only an edit made outside the haven leaves (a batch's rows
    are landed once, with its batch record).

    Rows are inserted in parallel and numbered after (issue 22): ``row_number() OVER ()`` over the
    file made DuckDB read and write on one thread (the 6.8M-row GP drop: 7.2 s, against 4.1 s this
    way). The rows a transaction adds get consecutive row ids, and with ``preserve_insertion_order``
    on (DuckDB's default, set here: :data:`ROWS_IN_FILE_ORDER`) in the order they were read, so a
    row's number is its row id less the first one's, plus 1. The order rests on that setting
    alone: nothing after the insert can tell rows written out of order from rows in order
    (``tests/unit/test_ingest_numbering.py`` lands a file read on several threads, and fails with
    the setting off)."""
    cols = ", ".join(q(f) for f in names)
    if con.execute(f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE _batch = ? LIMIT 1)", [batch]).fetchone()[0]:
        raise _batch_in_landing(table)
    con.execute(f"SET preserve_insertion_order = {ROWS_IN_FILE_ORDER}")
    inserted = con.execute(f"INSERT INTO {table} ({cols}, _batch) SELECT {cols}, {lit(batch)} FROM ({relation})")
    rows = int(inserted.fetchone()[0])
    first, last = con.execute(f"SELECT min(rowid), max(rowid) FROM {table} WHERE _batch = ?", [batch]).fetchone()
    if not _one_run(first, last, rows):
        raise _not_numbered()
    con.execute(f"UPDATE {table} SET _row = rowid - {int(first or 0)} + 1 WHERE _batch = ?", [batch])
    return rows


def _one_run(first: int | None, last: int | None, rows: int) -> bool:
    """Whether the row ids ``first`` to ``last`` are one run of ``rows`` (always so for the rows one
    insert adds, as measured: the check keeps a file from landing misnumbered should it not be)."""
    return rows == 0 or (first is not None and last is not None and last - first + 1 == rows)


def _not_numbered() -> FileRejected:
    """The haven's fault, not the sender's: said so, rather than ``file.unreadable`` (found by review)."""
    return FileRejected(
        "file.not_numbered",
        "the haven could not number the file's rows by their place in it (their row ids are not one run): "
        "a fault in the haven, not in the file",
        "report it to the haven's data engineers, and send the file again once they have mended it",
    )


def _batch_in_landing(table: str) -> FileRejected:
    return FileRejected(
        "file.batch_in_landing",
        f"{table} already holds rows of this file's batch, though the batch was never landed: they were "
        "written outside the haven",
        f"find out who wrote them and remove them from {table} (rows whose _batch is this file's SHA-256, "
        "in the reason's sha256), then send the file again",
    )


def not_regular(path: Path) -> FileRejected | None:
    """Why ``path`` is not a plain file of the home (``file.not_regular``), from ``lstat`` only.

    A symbolic link is never followed (its target may be anywhere, e.g. ``/etc/passwd``), so
    it is refused whatever it points to; so are folders, devices, pipes and sockets, and a
    file with another hard link (its bytes are also a name elsewhere, perhaps outside the
    home, which landing would shred).
    """
    entry = os.lstat(path)
    if stat.S_ISREG(entry.st_mode) and entry.st_nlink == 1:
        return None
    if stat.S_ISREG(entry.st_mode):
        kind = "a hard link (the same file also has another name)"
    elif stat.S_ISLNK(entry.st_mode):
        kind = "a symbolic link"
    else:
        kind = "a folder" if stat.S_ISDIR(entry.st_mode) else "not a regular file"
    return FileRejected(
        "file.not_regular",
        f"the entry is {kind}; only plain files placed in the collection folder are read "
        "(links are not followed, their targets were not read)",
        "place the file itself (a copy, not a link) in the collection folder",
        {"kind": kind},
    )


def bad_name(path: Path) -> FileRejected | None:
    """Why ``path``'s name cannot be read as given (``file.name``): bytes that are not UTF-8, or a
    character DuckDB's readers would take as a pattern (``* ? [``) or as a folder separator inside
    one (``\\``): such a name could make the reader take in other files, even one outside the
    home through a quarantined link (``..\\..\\quarantine\\...[1].csv``), so it is never read.
    ``safehaven.core.sql.file_lit`` escapes the same characters in the paths the haven chooses."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        return FileRejected(
            "file.name",
            f"the file name is not UTF-8 text (shown as {shown_name(path.name)!r}); the file was not read",
            "rename the file with letters, digits, '-', '_' and '.' only, and place it again",
        )
    if PATTERN_CHARACTERS & set(path.name):
        return FileRejected(
            "file.name",
            "the file name holds a character the reader takes as a pattern or a folder (* ? [ \\); "
            "the file was not read",
            "rename the file with letters, digits, '-', '_' and '.' only, and place it again",
        )
    return None


def _name_hash(path: Path) -> str:
    """Stands in for the content hash of an entry that is not read: SHA-256 of its name and of
    this sighting (inode, size, times, now), so two entries of one name never share a key (a
    quarantined copy, a reason file, a feed fault)."""
    try:
        entry = os.lstat(path)
        seen = f"{entry.st_ino}:{entry.st_size}:{entry.st_mtime_ns}:{entry.st_ctime_ns}"
    except OSError:
        seen = ""
    return hashlib.sha256(os.fsencode(path.name) + f"\0{seen}\0{time.time_ns()}".encode()).hexdigest()


#: characters of a drop key's digest (:func:`drop_key`)
DROP_DIGEST_HEX = 8
_DOTS = re.compile(r"\.{3,}")


def drop_key(path: Path, entry: os.stat_result | None = None) -> str:
    """A drop's key: the partition of the collection's intake assets it lands and is validated in.

    A drop is one entry of a collection folder as it was received. Its key is its shown name
    (``safehaven.core.audit.shown_name``: nothing identifiable reaches Dagster's event storage)
    and ``@`` a digest of its raw name, size and modification time, so two files sent under one
    name (each night's ``extract.csv``) are two drops, and the sensor, which never reads a file,
    and the landing, which does, name a drop alike. The digest also covers the entry's inode and
    status-change time, which a sender cannot set: a corrected file copied in with the old one's
    name, size and time kept (``cp -p``, ``rsync -t``) is still another drop. An entry changed after
    it was seen is a new drop (landing does not read an entry while it is still being written).
    From ``lstat`` (links are not followed; ``entry`` when the caller has it).
    """
    entry = entry or os.lstat(path)
    seen = f"\0{entry.st_size}:{entry.st_mtime_ns}:{entry.st_ino}:{entry.st_ctime_ns}".encode()
    digest = hashlib.sha256(os.fsencode(path.name) + seen).hexdigest()[:DROP_DIGEST_HEX]
    # '...' separates the first and last key of a range in Dagster's partition syntax
    return f"{_DOTS.sub(lambda m: ' '.join(m.group()), shown_name(path.name))}@{digest}"


def waiting_drops(incoming: Path, contract: Contract | None = None) -> dict[str, Path]:
    """The drops waiting in a collection folder (:func:`drop_key` -> entry), in the order they
    arrived (:func:`arrived`, then name: a drop's runs, one each, validate them in that order, so
    the latest drop is the one that arrived last); files still being written
    (:func:`still_arriving`) are left out until they are complete, and so, for a ``contract``
    asking for control files, are data files whose control file has not arrived
    (:func:`_control_missing`) and the control files of data files present (:func:`_companion`:
    each lands or is refused with its data file). Reads no file's bytes (the sensor calls this
    every minute)."""
    if not incoming.is_dir() or incoming.is_symlink():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(incoming.iterdir(), key=_arrival):
        try:
            if contract is not None and (_companion(path, contract) or _control_missing(path, contract)):
                continue
            if not (os.path.isfile(path) and not os.path.islink(path) and still_arriving(path)):
                found[drop_key(path)] = path
        except FileNotFoundError:
            continue  # renamed or removed meanwhile
        except FileRejected:
            with contextlib.suppress(FileNotFoundError):  # its message would name the raw path
                found[drop_key(path)] = path  # not a plain file: landing quarantines it
    return found


def arrived(entry: os.stat_result) -> float:
    """When an entry arrived in its collection folder, in seconds since the epoch: its status-change
    time, set by this host when the file was created or renamed into the folder. Not its
    modification time, which a sender sets (``cp -p``, ``rsync -t``, an unzipped archive): a refused
    drop must never pass for an older one (``safehaven.intake.validation.refusal_outstanding``)."""
    return entry.st_ctime


def _arrived_at(path: Path, seen: os.stat_result | None) -> float:
    return arrived(seen or os.lstat(path))


def _arrival(path: Path) -> tuple[float, str]:
    try:
        return arrived(os.lstat(path)), path.name
    except FileNotFoundError:
        return 0.0, path.name


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back the landing's transaction, if one is open. A second Ctrl-C while it waits (with
    more than one thread DuckDB finishes the statement a first one stopped before it rolls back:
    found by review) is an interrupt still; the transaction has ended either way."""
    try:
        con.execute("ROLLBACK")
    except Exception as exc:
        if interrupted(exc):
            raise KeyboardInterrupt from None
        if not isinstance(exc, duckdb.Error):
            raise
        # a DuckDB error: no transaction was open


def _refuse_folder(incoming: Path, quarantine_dir: Path, contract: Contract, report: IngestReport) -> bool:
    """Quarantine a collection folder that is a link or not a folder; True if nothing is to be read."""
    if not os.path.lexists(incoming):
        return True
    mode = os.lstat(incoming).st_mode
    if stat.S_ISDIR(mode):
        return False
    kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a folder"
    err = FileRejected(
        "file.not_regular",
        f"the collection folder incoming/{contract.collection} is {kind}; it was not listed or followed",
        f"make incoming/{contract.collection} a plain folder and place the files themselves in it",
        {"kind": kind},
    )
    try:
        _record(report, quarantine(incoming, quarantine_dir, contract, _name_hash(incoming), err), err, "")
    except NotMoved as stuck:
        report.not_moved.append({"file": stuck.shown, "rule": err.rule, "error": stuck.kind})
    return True


def _record(report: IngestReport, dest: Path, err: FileRejected, sha: str) -> None:
    report.files_quarantined += 1
    report.quarantined.append({"file": dest.name, "rule": err.rule, "sha256": sha})


def _hash(path: Path) -> str:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _unreadable(exc) from None


def _unreadable(exc: BaseException) -> FileRejected:
    return FileRejected(
        "file.unreadable",
        f"the file could not be read ({type(exc).__name__})",
        "check the file's permissions and format, and send it again",
        {"error": type(exc).__name__},
    )


def _ingest_one(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    contract: Contract,
    sha: str,
    report: IngestReport,
    seen: os.stat_result,
    drop: str,
    sealer: Sealer | None = None,
    declared: totals.Control | None = None,
) -> None:
    """Land or skip one regular file, the drop ``drop``; raises FileRejected for any reason it
    cannot be read (or its rows are not those its control file ``declared``), and StillArriving if
    it changed while it was read. Its control file, if any, is removed with it."""
    try:
        known = con.execute(f"SELECT status FROM {BATCHES} WHERE batch_id = ?", [sha]).fetchone()
        if known is not None:
            report.files_skipped += 1
            report.drops[drop] = "already landed"
            _note_restatement(con, contract, sha, path, seen, drop, report, sealer)
            _remove_held(path, report, seen, declared)
            return
        inspect_file(con, path, contract)
        rows = land_file(con, path, contract, sha, seen, drop, sealer, declared)
    except SameRecords as copy:
        report.files_skipped += 1
        report.copies.append({"file": shown_name(path.name), "same_records_as": copy.batch_id[:16]})
        report.drops[drop] = f"same records as batch {copy.batch_id[:12]}"
        _note_restatement(con, contract, copy.batch_id, path, seen, drop, report, sealer)
        _remove_held(path, report, seen, declared)
        return
    except (FileRejected, StillArriving):
        raise
    except csv.Error as exc:
        raise _csv_rejection(exc, "the file") from None
    except Exception as exc:  # contained: one file never fails the stage
        _rollback(con)
        if interrupted(exc):  # a Ctrl-C or a terminated run stops the run; the file stays for the next
            raise KeyboardInterrupt from None
        raise _unreadable(exc) from None
    if not _record_landing(con, contract, sha, rows, sealer):
        report.landings_unaudited += 1
    report.files_landed += 1
    report.rows_landed += rows
    report.batches.append(sha)
    report.drops[drop] = "landed"
    _remove_held(path, report, seen, declared)


def _remove_held(path: Path, report: IngestReport, seen: os.stat_result, declared: totals.Control | None) -> None:
    """Remove a received file whose records the store holds (:func:`_remove_received`) and the
    control file it was read with (``declared``), which has no use once its file is held: each only
    while it is the entry read (``seen``, ``declared.entry``), so a newer file (or control file) of the
    same name renamed into place meanwhile stays in incoming/ for the next run, never shredded unread.
    The control file goes first: a run killed between the two leaves a data file without its control
    file, which waits (and is known as landed once a control file comes), never a control file
    refused as an orphan (``file.control.orphan``) though its data file landed."""
    if declared is not None and declared.entry is not None:
        _remove_received(totals.control_path(path), report, declared.entry)
    _remove_received(path, report, totals.identity(seen))


def _record_landing(
    con: duckdb.DuckDBPyConnection, contract: Contract, sha: str, rows: int, sealer: Sealer | None
) -> bool:
    """Audit a landing once it has committed: an objections batch by its sealer
    (``safehaven.intake.batch_seal``), a content batch with the time retention counts from
    (``safehaven.intake.landings``); False when the trail refused the entry."""
    if sealer is not None:
        return sealer.record_landed(con, sha, rows)
    if contract.kind != "content":
        return True
    landed_at = con.execute(f"SELECT landed_at FROM {BATCHES} WHERE batch_id = ?", [sha]).fetchone()[0]
    return landings.record(con, contract.collection, sha, landed_at)


def _note_restatement(
    con: duckdb.DuckDBPyConnection,
    contract: Contract,
    batch_id: str,
    path: Path,
    seen: os.stat_result,
    drop: str,
    report: IngestReport,
    sealer: Sealer | None = None,
) -> None:
    """An objections file received again (the bytes or the records of the batch ``batch_id``) is
    a *restatement*: its sender states those objections again today, e.g. to undo a withdrawal
    sent by mistake, or sends an unchanged daily list. It is recorded in
    ``governance.objection_restatements`` by its drop and arrival time, and the objection register
    registers its statements in arrival order (``safehaven.protect.objections.register_restatements``),
    so re-sending a file is never silently a no-op for the register (CoP 11-14). The batch's own
    drop seen again (a run repeated after a crash, before the file was shredded) restates nothing.
    Its record is sealed with it (``sealer``, ``safehaven.intake.batch_seal``: its arrival orders
    it); noted without one, it is never registered."""
    if contract.kind != "objections":
        return
    own = con.execute(
        f"SELECT drop_key FROM {BATCHES} WHERE batch_id = ? AND collection = ?", [batch_id, contract.collection]
    ).fetchone()
    if own is None or own[0] == drop:
        return
    with transaction(con):
        (noted,) = con.execute(
            f"INSERT OR IGNORE INTO {RESTATEMENTS} (drop_key, batch_id, file_name, arrived_at, noted_at) "
            "VALUES (?, ?, ?, to_timestamp(?), now())",
            [drop, batch_id, shown_name(path.name), arrived(seen)],
        ).fetchone()
        if noted and sealer is not None:  # a record already noted keeps the seal it was noted with
            sealer.seal_restatement(con, drop)
    report.restated.append({"file": shown_name(path.name), "restates": batch_id[:16]})
    report.drops[drop] = f"restates batch {batch_id[:12]} (registered by the objection register)"


def _remove_received(path: Path, report: IngestReport, read: tuple[int, int, int]) -> None:
    """Shred a received file whose records the store holds (module docstring), if it is still the
    entry read (``read``: ``safehaven.intake.control.identity``); another entry now of its name is
    left for the next run. One the haven's user may not overwrite (another account's upload) is
    unlinked if the folder allows it, and named in ``not_overwritten`` either way: a person must
    give the haven's user write access to its incoming folder, or remove the file; the stage goes on."""
    try:
        if totals.identity(os.lstat(path)) != read:
            return  # replaced since it was read: a new drop, judged by the next run
        shred_file(path)
    except FileNotFoundError:
        return  # removed meanwhile by its sender
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()
        report.not_overwritten.append(shown_name(path.name))


def ingest_collection(
    con: duckdb.DuckDBPyConnection,
    contract: Contract,
    incoming: Path,
    quarantine_dir: Path,
    drops: Collection[str] | None = None,
    sealer: Sealer | None = None,
) -> IngestReport:
    """Land every new file in ``incoming`` (or only the ``drops`` named, :func:`drop_key`), in the
    order they arrived (:func:`arrived`, then name: objections are numbered by landing, and the
    latest statement wins); quarantine bad ones; skip ones already landed. An objections batch
    is sealed as it lands by ``sealer`` (``safehaven.intake.batch_seal.sealer_for``); landed
    without one, the register step never takes it in.

    Containment (module docstring): an entry that is not a regular file is quarantined
    unread; any error reading a file quarantines that file, and the next file is read. A
    collection folder that is itself a link or not a folder is refused whichever drops are asked.
    """
    ensure_tables(con, contract)
    _backfill_contents(con, contract)
    report = IngestReport(contract.collection)
    if sealer is not None:  # landings an earlier run could not audit (killed, or the trail refused)
        report.landings_audited_late = len(sealer.record_unrecorded(con))
    elif contract.kind == "content":
        report.landings_audited_late = len(landings.record_unrecorded(con, contract.collection))
    if _refuse_folder(incoming, quarantine_dir, contract, report):
        return report
    for path in sorted(incoming.iterdir(), key=_arrival):  # arrival order: the later statement lands later
        if _companion(path, contract):
            continue
        try:
            drop = drop_key(path)
            if drops is None or drop in drops:
                _ingest_entry(con, path, contract, quarantine_dir, report, drop, sealer)
        except FileNotFoundError:  # renamed or removed (perhaps sent again) meanwhile: next run
            report.files_vanished += 1
    return report


def _ingest_entry(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    contract: Contract,
    quarantine_dir: Path,
    report: IngestReport,
    drop: str,
    sealer: Sealer | None = None,
) -> None:
    """Land one entry of the collection folder, the drop ``drop`` (:func:`drop_key`), or quarantine
    it whole (with its control file, ``safehaven.intake.control``); or leave it for a later run."""
    first, seen = _seen(path), None  # the entry as judged: its identity goes in a not-moved reason
    sha = named = _name_hash(path)
    err = not_regular(path) or bad_name(path)
    if err is None:
        try:
            if still_arriving(path):
                raise StillArriving(path.name)
            declared = _declared(path, contract)
            seen = os.stat(path, follow_symlinks=False)
            sha = _hash(path)
            if declared is not None:
                _check_declared(path, declared, sha)
            _ingest_one(con, path, contract, sha, report, seen, drop, sealer, declared)
            return
        except StillArriving as waiting:
            _left_for_later(report, drop, path, waiting)
            return
        except FileRejected as rejected:
            err = rejected
    if not os.path.lexists(path):
        raise FileNotFoundError(path)
    _refuse_entry(path, contract, quarantine_dir, report, drop, err, sha, entry_identity(seen or first, sha != named))


def _refuse_entry(
    path: Path,
    contract: Contract,
    quarantine_dir: Path,
    report: IngestReport,
    drop: str,
    err: FileRejected,
    sha: str,
    judged: dict[str, Any] | None,
) -> None:
    """Quarantine a refused entry (as ``judged``, :func:`entry_identity`) and its control file; one
    that cannot be moved is named in ``not_moved`` with a reason left beside quarantine."""
    try:
        _record(report, quarantine(path, quarantine_dir, contract, sha, err, judged), err, sha)
    except NotMoved as stuck:
        report.not_moved.append({"file": stuck.shown, "rule": err.rule, "error": stuck.kind})
        report.drops[drop] = f"refused ({err.rule}), left in incoming/: it could not be moved to quarantine"
        return
    report.drops[drop] = f"quarantined ({err.rule})"
    _refuse_control(path, contract, quarantine_dir, report, err)


#: a drop's outcome while it waits for its control file (``safehaven.intake.control``)
AWAITING_CONTROL = f"waiting for its control file (<file name>{totals.CONTROL_SUFFIX}, which its sender writes last)"


class AwaitingControl(StillArriving):
    """A data file whose control file has not arrived, or is still being written: a later run reads it."""


def _left_for_later(report: IngestReport, drop: str, path: Path, waiting: StillArriving) -> None:
    """Note a file left in incoming/ for a later run: still being written, or waiting for its control file."""
    report.files_arriving += 1
    if isinstance(waiting, AwaitingControl):
        report.awaiting_control.append(shown_name(path.name))
        report.drops[drop] = AWAITING_CONTROL
    else:
        report.drops[drop] = "still arriving"


def _companion(path: Path, contract: Contract) -> bool:
    """Whether ``path`` is the control file of a data file beside it (landed or refused with that
    file, never on its own; also when the data file's name is in another Unicode normalisation,
    ``safehaven.intake.control.near_miss``: refused with it, naming that), or a control file gone
    since the folder was listed (taken away with its data file by this run); a control file whose
    data file is absent is judged as an orphan."""
    if not (totals.controlled(contract) and totals.is_control(path)):
        return False
    data = totals.data_path(path)
    return os.path.lexists(data) or not os.path.lexists(path) or totals.near_miss(data, data.name) is not None


def _control_missing(path: Path, contract: Contract) -> bool:
    """Whether ``path`` is a data file (a supported suffix) of a collection asking for control files
    whose control file has not arrived, or is still being written (:func:`still_arriving`). One whose
    control file could never be named, or is there under its name in another Unicode normalisation
    (:func:`_misnamed_control`), is not waiting: it is refused, saying why."""
    if not totals.controlled(contract) or totals.is_control(path) or path.suffix.lower() not in SUPPORTED:
        return False
    ctl = totals.control_path(path)
    if _misnamed_control(path) is not None:
        return False
    return not os.path.lexists(ctl) or (_plain(os.lstat(ctl)) and still_arriving(ctl))


def awaiting_control(path: Path, contract: Contract) -> bool:
    """Whether the entry ``path`` of ``contract``'s folder is a data file an intake run leaves there
    waiting for its control file (:func:`_control_missing`; ``safehaven.intake.control``): what the
    objection feed blocks record-level releases on (``safehaven.protect.feed.awaiting_control``)."""
    return _control_missing(path, contract)


def _misnamed_control(path: Path) -> FileRejected | None:
    """``file.control.name`` for a data file whose control file cannot be found by its name: the name
    would be longer than the file system holds (``safehaven.intake.control.unnameable``), or the
    control file is there named in another Unicode normalisation (``safehaven.intake.control.misnamed``)."""
    ctl = totals.control_path(path)
    too_long = totals.unnameable(path)
    if too_long is not None:
        return too_long
    return totals.misnamed(path) if totals.near_miss(ctl, ctl.name) is not None else None


def _declared(path: Path, contract: Contract) -> totals.Control | None:
    """What the control file of the entry ``path`` declares (``safehaven.intake.control``); None where
    the contract asks for none, or the entry is refused whatever it says (not CSV or Parquet).
    Raises AwaitingControl while it has not arrived; ``file.control.orphan`` for a control file
    judged on its own (no data file beside it); ``file.control.unreadable`` for one not readable."""
    if not totals.controlled(contract):
        return None
    if totals.is_control(path):
        raise totals.orphan()
    misnamed = _misnamed_control(path) if path.suffix.lower() in SUPPORTED else None
    if misnamed is not None:
        raise misnamed
    if _control_missing(path, contract):
        raise AwaitingControl(path.name)
    if path.suffix.lower() not in SUPPORTED:
        return None
    try:
        return totals.read_control(totals.control_path(path))
    except FileNotFoundError:  # removed since it was seen: the file waits for it again
        raise AwaitingControl(path.name) from None


def _check_declared(path: Path, declared: totals.Control, sha: str) -> None:
    """What can be checked of a file against its control file before it is read: its SHA-256 and, for
    a CSV, a whole last row (its rows are counted as it lands, :func:`land_file`)."""
    totals.check_sha256(declared, sha)
    if not is_parquet(path):
        totals.check_last_row(path)


def _refuse_control(
    path: Path, contract: Contract, quarantine_dir: Path, report: IngestReport, err: FileRejected
) -> None:
    """Move a refused data file's control file (or the one named in another Unicode normalisation,
    ``safehaven.intake.control.near_miss``) to quarantine with it, with a reason naming the data
    file and its refusal (``safehaven.intake.control.companion``); a control file is never judged on
    its own while its data file is here."""
    ctl = totals.control_path(path)
    if not totals.controlled(contract) or totals.is_control(path):
        return
    ctl = ctl if os.path.lexists(ctl) else totals.near_miss(ctl, ctl.name)
    if ctl is None:
        return
    why = totals.companion(err, shown_name(path.name))
    sha, judged = _name_hash(ctl), entry_identity(_seen(ctl), hashed=False)
    try:
        _record(report, quarantine(ctl, quarantine_dir, contract, sha, why, judged), why, sha)
    except NotMoved as stuck:
        report.not_moved.append({"file": stuck.shown, "rule": why.rule, "error": stuck.kind})
