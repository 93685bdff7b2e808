"""The published registers: the data release register and the breach register.

Data release register (CoP 32-33; ``docs/rules.md`` "Registers"): every release that left the haven, one
row per release: the agreement reference and version, the recipient (and whether a public
body), the purposes, the legal basis and its reference (the "legal arrangements", CoP 33),
the collections, the identifiability level, the agreement's dates, when the release was
made, whether national data opt-outs were applied and if not why not (CoP 14, rules for
sharing), how many records were released and how many were withheld for objections
(CoP 14b), and how many people were dropped for k-anonymity, and the review rule under which it was released
and who approved it. Rows are written by ``safehaven.share.review.deliver`` in the same step
as the files are delivered, so the register matches what left, row for row (a release that is
only prepared, or unchanged, adds no row).

Breach register (Government response to the Caldicott review, recommendations 5 and 6;
CoP 22, 42b): what happened, when, how severe, and the remedial action. Processing without a
legal basis is a breach (rec. 6). The severity scale follows the HSCIC incident reporting
scale agreed with the Department and the ICO in 2013 (Govt response 4.10), as three levels:

* **0, near miss**: a control stopped it; no confidential data was processed or disclosed
  without a basis (e.g. a linkage not named by an approved agreement was refused, an
  invalid agreement was refused before any release). Callers saying ``low`` mean this level.
* **1, contained incident**: confidential data was processed without a basis or against an
  objection *inside* the haven, or was sent to the haven when it should not have been
  (type 1 objectors' GP records received and dropped); nothing left the haven.
* **2, serious, reportable**: confidential data left the haven without a basis or against an
  objection, or the integrity of the audit trail cannot be shown, or ``published/`` held files
  the haven did not publish (altered or planted: ``safehaven.publish.integrity``). Reported to
  the SIRO and the board (rec. 6), and assessed for reporting to the ICO.

Known kinds and their usual severity are in :data:`KINDS`; a caller may record another kind
(lower-case words) and must then give the severity. Both registers are tables in the
store's ``governance`` zone and are exported to ``registers/`` as CSV (formula-leading cells
neutralised) and Parquet. They never hold identifier values: agreement ids, counts,
collection names and free text written by the haven itself.
"""

from __future__ import annotations

import json
import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from safehaven.core import schema
from safehaven.core.home import Home
from safehaven.core.sql import lit, q
from safehaven.core.store import table_exists
from safehaven.publish.disclosure import formula_safe_type, neutralise_sql

RELEASE_REGISTER = schema.RELEASE_REGISTER
BREACH_REGISTER = schema.BREACH_REGISTER
RELEASE_MEMBERS = schema.RELEASE_MEMBERS
#: The audit head when each release was first exported, published with the register.
RELEASE_AUDIT_HEADS = schema.RELEASE_AUDIT_HEADS
#: The register as published: every release row with its audit head.
RELEASE_REGISTER_PUBLIC = schema.RELEASE_REGISTER_PUBLIC

SEVERITY_LABELS: dict[int, str] = {
    0: "near miss: stopped by a control, nothing processed or disclosed without a basis",
    1: "contained incident: processed without a basis or against an objection inside the haven",
    2: "serious, reportable: data left without a basis or against an objection, or audit integrity lost",
}
_SEVERITY_ALIASES: dict[str, int] = {
    "0": 0,
    "near_miss": 0,
    "low": 0,
    "level0": 0,
    "1": 1,
    "contained": 1,
    "medium": 1,
    "level1": 1,
    "2": 2,
    "serious": 2,
    "reportable": 2,
    "high": 2,
    "level2": 2,
}


@dataclass(frozen=True)
class BreachKind:
    severity: int
    description: str


#: the breach kind of a disposal's planned file gone unaccounted for (``safehaven.dispose.steps``)
DISPOSAL_FILE_UNACCOUNTED = "disposal_file_unaccounted"
KINDS: dict[str, BreachKind] = {
    "refused_linkage": BreachKind(
        0, "a linkage not named by an approved, in-date agreement was attempted and refused (CoP 22, 42b)"
    ),
    "no_legal_basis": BreachKind(1, "processing was attempted or done without a legal basis (Govt response rec. 6)"),
    "invalid_agreement": BreachKind(
        0, "a release was attempted under an approved agreement that does not validate; it was refused"
    ),
    "objection_breached": BreachKind(
        2,
        "data about a person with an objection in force left the haven for a purpose the objection covers (CoP 11-14)",
    ),
    "type1_objection_disregarded": BreachKind(
        1,
        "a GP practice sent records about patients with a type 1 "
        "objection in force; they were dropped before the haven "
        "(CoP 11-14; guide Rule 4B)",
    ),
    "integrity_failure": BreachKind(
        2, "the audit trail failed verification: entries edited, deleted, reordered or truncated (CoP 23d)"
    ),
    "published_altered": BreachKind(
        2,
        "a file of a recorded publication in published/ was altered after it was published: analysts may have "
        "been served figures the haven did not publish (CoP 23d, 35; safehaven.publish.integrity)",
    ),
    DISPOSAL_FILE_UNACCOUNTED: BreachKind(
        1,
        "a file the haven wrote (a release's, a staged request's) that a disposal planned to destroy was gone at "
        "its files step with no haven action to account for it: it may have left the haven (CoP 49; "
        "safehaven.dispose.steps)",
    ),
    "published_planted": BreachKind(
        2,
        "an entry no publication names was found in published/, where analysts may have read it; what it held "
        "is not known (CoP 35; safehaven.publish.integrity)",
    ),
}

#: The register tables :func:`ensure_tables` makes (the audit heads and the public view come with an export).
TABLES = (RELEASE_REGISTER, BREACH_REGISTER, RELEASE_MEMBERS)

#: Exported file stems, by table.
EXPORTS = {RELEASE_REGISTER: "data_release_register", BREACH_REGISTER: "breach_register"}


def os_login() -> str:
    """The OS account running this process: the name its real uid has in the user database
    (``uid:<n>`` when it has none), never an environment variable. ``LOGNAME``, ``USER`` and the
    like (what ``getpass.getuser`` reads first) are set by whoever starts the process, so one
    account could name itself anything; the independence of reviewers is judged by the account
    (SATRE 3.3.04-3.3.05: two independent checkers; found by review)."""
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # pragma: no cover - no user database in some containers
        return f"uid:{uid}"


def current_actor() -> str:
    """Who is running this process (its OS account, :func:`os_login`), for audit and register entries."""
    return os_login()


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create the register tables (and ``governance.release_members``) if they do not exist."""
    schema.ensure(con, *TABLES)


def severity_level(severity: int | str | None, kind: str) -> int:
    """The scale level (0-2) of ``severity``; ``None`` takes the kind's usual level."""
    if severity is None:
        if kind not in KINDS:
            raise ValueError(f"breach kind {kind!r} is not a known kind; give its severity (0, 1 or 2)")
        return KINDS[kind].severity
    if isinstance(severity, bool):
        raise ValueError("severity must be 0, 1 or 2")
    key = str(severity).strip().lower().replace(" ", "_").replace("-", "_")
    if key not in _SEVERITY_ALIASES:
        raise ValueError(f"severity {severity!r} is not on the scale (0 near miss, 1 contained, 2 serious)")
    return _SEVERITY_ALIASES[key]


def record_breach(
    con: duckdb.DuckDBPyConnection,
    *,
    kind: str,
    severity: int | str | None,
    what: str,
    remedial_action: str,
    detail: dict[str, Any] | None = None,
) -> int:
    """Add an entry to the breach register; returns its ``breach_id``.

    ``kind`` is one of :data:`KINDS` or another lower-case word; ``severity`` is 0, 1 or 2
    (or ``near_miss``/``contained``/``serious``; ``None`` for a known kind's usual level).
    ``what`` and ``detail`` hold counts, ids and collection names, never identifier values.
    One INSERT, so it is safe inside a caller's transaction (and rolled back with it). It does
    not write the audit log: callers that act on data also call ``safehaven.core.audit.append``
    outside their transaction.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]{1,62}", kind):
        raise ValueError(f"breach kind {kind!r} must be lower-case words joined by underscores")
    if not what.strip() or not remedial_action.strip():
        raise ValueError("a breach needs what happened and the remedial action")
    level = severity_level(severity, kind)
    _check_no_identifier({"what": what, "remedial_action": remedial_action, "detail": detail})
    ensure_tables(con)
    row = con.execute(
        f"INSERT INTO {BREACH_REGISTER} SELECT coalesce(max(breach_id), 0) + 1, now(), ?, ?, ?, ?, ?, "
        f"CAST(? AS JSON) FROM {BREACH_REGISTER} RETURNING breach_id",
        [
            kind,
            level,
            SEVERITY_LABELS[level],
            what,
            remedial_action,
            None if detail is None else json.dumps(detail, sort_keys=True, default=str),
        ],
    ).fetchone()
    assert row is not None
    return int(row[0])


def _check_no_identifier(value: Any) -> None:
    """The audit trail's guard: nothing that looks like an NHS number enters a register."""
    from safehaven.core.audit import _check_no_identifier as guard

    guard(value, "breach")


def breaches(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """The breach register, oldest first (works on a read-only connection)."""
    if not table_exists(con, *BREACH_REGISTER.split(".")):
        return []
    cur = con.execute(f"SELECT * FROM {BREACH_REGISTER} ORDER BY breach_id")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def releases(con: duckdb.DuckDBPyConnection, agreement_id: str | None = None) -> list[dict[str, Any]]:
    """The data release register, oldest first, optionally for one agreement (works read-only)."""
    if not table_exists(con, *RELEASE_REGISTER.split(".")):
        return []
    where, params = ("WHERE agreement_id = ?", [agreement_id]) if agreement_id else ("", [])
    cur = con.execute(f"SELECT * FROM {RELEASE_REGISTER} {where} ORDER BY released_at, release_id", params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def export_table(con: duckdb.DuckDBPyConnection, home: Home, table: str, stem: str, order: str) -> dict[str, Path]:
    """Write register ``table`` (``schema.name``) to ``registers/<stem>.csv`` and ``.parquet``, each
    atomically (a temporary file renamed into place), rows ordered by ``order``; returns the paths.

    Text cells of the CSV are neutralised (``disclosure.neutralise_sql``: a cell that a
    spreadsheet would read as a formula is prefixed), the one rule for every register export;
    cells of every type but numbers, dates, times and booleans count as text
    (``disclosure.formula_safe_type``).
    """
    home.registers.mkdir(parents=True, exist_ok=True)
    described = con.execute(f"SELECT * FROM {table} LIMIT 0").description  # names and types, in order
    cols = [(d[0], str(d[1])) for d in described]
    csv_cols = ", ".join(
        q(n) if formula_safe_type(t) else f"{neutralise_sql(f'CAST({q(n)} AS VARCHAR)')} AS {q(n)}" for n, t in cols
    )
    written: dict[str, Path] = {}
    for fmt, select in (("csv", f"SELECT {csv_cols} FROM {table}"), ("parquet", f"SELECT * FROM {table}")):
        path = home.registers / f"{stem}.{fmt}"
        tmp = path.with_name(f".{path.name}.tmp")
        options = "FORMAT csv, HEADER true" if fmt == "csv" else "FORMAT parquet"
        con.execute(f"COPY ({select} ORDER BY {order}) TO {lit(str(tmp))} ({options})")
        tmp.replace(path)
        written[path.name] = path
    return written


def stamp_audit_heads(con: duckdb.DuckDBPyConnection, home: Home) -> int:
    """Give each release not yet exported the current audit head; returns how many were stamped.

    Rule (CoP 23d; Govt response rec. 1): the head (``seq`` and chained hash) goes out with the
    public register, so rolling the audit log back below it is seen by everyone who holds a
    copy, and ``safehaven.core.audit.verify`` checks every stamped head against the log. The
    head is checked against its anchor first (``audit.head`` refuses a broken trail).
    """
    from safehaven.core import audit

    schema.ensure(con, RELEASE_AUDIT_HEADS)  # and the register as published, its view
    pending = f"SELECT release_id FROM {RELEASE_REGISTER} EXCEPT SELECT release_id FROM {RELEASE_AUDIT_HEADS}"
    if not con.execute(f"SELECT count(*) FROM ({pending})").fetchone()[0]:  # type: ignore[index]
        return 0
    head = audit.head(con, home)
    row = con.execute(
        f"INSERT INTO {RELEASE_AUDIT_HEADS} SELECT release_id, ?, ? FROM ({pending}) RETURNING 1",
        [head["seq"], head["entry_hash"]],
    ).fetchall()
    return len(row)


def export(con: duckdb.DuckDBPyConnection, home: Home) -> dict[str, Path]:
    """Write both registers to ``registers/`` as CSV and Parquet (atomically); returns the paths.

    The data release register is exported with each release's audit head (``stamp_audit_heads``).
    """
    ensure_tables(con)
    stamp_audit_heads(con, home)
    order = {RELEASE_REGISTER: "released_at, release_id", BREACH_REGISTER: "breach_id"}
    source = {RELEASE_REGISTER: RELEASE_REGISTER_PUBLIC}
    written: dict[str, Path] = {}
    for table, stem in EXPORTS.items():
        written.update(export_table(con, home, source.get(table, table), stem, order[table]))
    return written
