"""Publication: protected outputs leave the store as open files, only through a guard.

Rules (CoP 35-36, 45-46; ISB 1523; guide Rule 3 part A; ``docs/rules.md`` "Publication"):

* **Never while a collection is held.** A publication whose outputs read a collection held at
  intake (its latest drop refused, or landed and not validated) is refused whole before anything
  is checked or written (``CollectionHeld``, naming the collection and what clears the hold;
  ``safehaven.intake.validation.refuse_held``), as the steps before it are: materialised alone,
  it would state the collection's figures as if its sender had sent nothing since (CoP 7-9).
  What analysts hold stays as it is until the hold clears.
* **Only through the guard.** Before anything is written, every output of the release is
  checked again (:func:`verify_release`): the disclosure invariants on the exact table to be
  exported (``safehaven.publish.disclosure.check_invariants``), the publication guard
  (:func:`guard_table`) and a quality statement built from the same definition. One
  failure refuses the *whole* release (:class:`PublicationRefused`) and no file is written:
  a release is a coherent set, and a half-written one could be differenced against the
  previous one. The asset checks of the aggregate stage block the same run earlier; this
  is the second line, for a publish run on its own.
* **The publication guard** refuses an output that carries

  - by *column name* (normalised: lower case, letters and digits only): the pseudonym
    ``pid`` or a pipeline column (``_batch``, ``_row``); any field the contracts class as
    ``direct_identifier``; a fine-grained quasi-identifier (a ``DATE`` quasi-identifier
    such as a date of birth, a postcode) or the haven's coarsened form of one
    (``birth_week``, ``postcode_district``); a coded quasi-identifier (practice code, sex)
    unless the output declares why publishing it is safe; any column the output does not
    declare; a text ``suppressed`` reason (``disclosure`` rule 8);
  - by *value*, in any text column: a run of 32 hex digits (a pseudonym), a 10-digit
    NHS-number-like string (plain or split 3-3-4), a full UK postcode, a full date
    (ISO, UK or compact); in an integer column: a 10-digit number; in a date column: a day
    other than the first of a month (outputs are monthly, so a day-precise date could be a
    date of birth); a text cell still starting with ``= + - @``, tab or CR (the public
    form neutralises them: OWASP "CSV Injection"); any nested or binary column.

  Findings carry column names, pattern names and counts, never a value.
* **Open formats** (CoP 45): each output as CSV and Parquet, its data dictionary
  (``<output>.dictionary.json``: every column, its role, meaning and code system with a
  resolvable URL, CoP 46) and its quality statement (``.quality.json`` and ``.md``); the
  methods document (``methods.md``); the licence (``LICENCE.txt``); and
  ``published.duckdb``, a separate unencrypted database holding only the published tables,
  their dictionary and quality statements, for analysts (who never get the store key:
  access control by key separation, ``docs/design.md`` "Zones").
* **Open Government Licence v3.0** (CoP 36: the haven is a public body).
* **Atomic.** Files are written to a staging folder outside ``published/``
  (``staging/publish-<release>/`` under the home, same file system) and renamed into place,
  the manifest (``release.json``, with each file's SHA-256) last, so readers never see half a
  file, and a crash leaves nothing half-written in the analysts' folder: stale staging
  folders are removed by the next publication and at the start of every run
  (``assets.runner.recover``). Nothing is ever staged inside ``published/``: an entry named
  like the older layout's ``.staging-*`` is judged as any other (``integrity``). Files of an
  output that a release no longer contains are removed.
* **What is in ``published/`` is checked first** (``safehaven.publish.integrity``): once the
  audit trail verifies, and before the last publication is taken as unchanged, every entry of
  ``published/`` is compared with the store's record. A recorded file with other bytes
  (altered) is copied into an evidence folder in the home and recorded once (audit entry and
  breach register); an entry no publication names (planted) is moved out into that folder and
  recorded. Publishing then goes on, so the fresh release replaces altered files with the
  haven's own (the release audit still refuses first over an altered manifest or previous
  Parquet, as below). What was found is returned (``Release.set_aside``) for the run's log,
  and carried by a refusal (``PublicationRefused.set_aside``).
* Each publication is recorded: the statements in ``governance.output_releases`` (the base
  for "changes since the last release") and one audit entry per output (``publish``, legal
  basis ``anonymised``, the agreement of a linked output).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from safehaven.core import audit, schema
from safehaven.core.files import sha256_file
from safehaven.core.home import PUBLISHED_DB, PUBLISHED_MANIFEST, Home
from safehaven.core.sql import INTEGER_TYPES, lit, q
from safehaven.core.store import insert_values, table_exists
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.validation import refuse_held
from safehaven.protect.pseudonymise import haven_coarsening, haven_column
from safehaven.publish import integrity, reuse
from safehaven.publish.disclosure import REASON, TOTAL_OVER, check_invariants, formula_led_sql
from safehaven.publish.outputs import Output
from safehaven.publish.quality import (
    LICENCE,
    LICENCE_URL,
    OGL,
    finalise,
    load_statement,
    record_release,
    render_markdown,
)
from safehaven.publish.release_audit import audit_release

__all__ = [
    "OGL",
    "PublicationRefused",
    "Release",
    "guard_table",
    "identifying_columns",
    "publish_release",
    "refuse_held_outputs",
    "verify_release",
]

ATTRIBUTION = "Contains public sector information licensed under the Open Government Licence v3.0."
PIPELINE_COLUMNS = ("pid", "_batch", "_row")
METHODS_DOC = Path(__file__).resolve().parents[2] / "docs" / "methods.md"
MANIFEST = PUBLISHED_MANIFEST

#: Value patterns (RE2, partial match) refused in any published text cell.
TEXT_PATTERNS: dict[str, str] = {
    "pseudonym (32 hex digits)": r"[0-9A-Fa-f]{32}",
    "NHS-number-like (10 digits)": r"(^|[^0-9])[0-9]{3}[ .\-/]?[0-9]{3}[ .\-/]?[0-9]{4}([^0-9]|$)",
    "full UK postcode": r"(?i)(^|[^A-Z0-9])[A-Z]{1,2}[0-9][A-Z0-9]? ?[0-9][A-Z]{2}([^A-Z0-9]|$)",
    "full date": (
        r"(^|[^0-9])([0-9]{4}-[0-9]{1,2}-[0-9]{1,2}|[0-9]{1,2}[/.\-][0-9]{1,2}[/.\-][0-9]{2,4}"
        r"|(19|20)[0-9]{2}(0[1-9]|1[0-2])(0[1-9]|[12][0-9]|3[01]))([^0-9]|$)"
    ),
}
_PLAIN_TYPES = ("BOOLEAN", "FLOAT", "DOUBLE", "VARCHAR", "DATE")


class PublicationRefused(Exception):
    """The release failed the guard or the disclosure invariants; nothing was written.

    ``set_aside``: what the check of ``published/`` found before the refusal (``integrity``), one
    line each, also in the message so the run's log says it."""

    def __init__(self, problems: list[str], set_aside: Sequence[str] = ()) -> None:
        found = f"; before it, published/ was checked: {'; '.join(set_aside)}" if set_aside else ""
        super().__init__("publication refused: " + "; ".join(problems[:10]) + found)
        self.problems = problems
        self.set_aside = list(set_aside)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def identifying_columns(registry: ContractRegistry) -> tuple[dict[str, str], dict[str, str]]:
    """Column names that identify, from the contracts: (always refused, refused unless declared).

    Always refused: the pipeline columns, direct identifiers, and each field the haven
    coarsens (``safehaven.protect.pseudonymise.haven_coarsening``: postcode, date of birth) under its
    own name and its haven column (``haven_column``: ``postcode_district``, ``birth_week``).
    Refused unless declared: the other quasi-identifiers. Keys are normalised names; values
    say why (no data values, just the class).
    """
    always: dict[str, str] = {_norm(c): "the haven pseudonym or a pipeline column" for c in PIPELINE_COLUMNS}
    declarable: dict[str, str] = {}
    for contract in registry.contracts.values():
        for f in contract.fields:
            where = f"{contract.collection}.{f.name}"
            if f.identifiability == "direct_identifier" or f.name == contract.patient_key:
                always[_norm(f.name)] = f"a direct identifier ({where})"
            elif haven_coarsening(f) is not None:
                always[_norm(f.name)] = f"a fine-grained quasi-identifier ({where})"
                always[_norm(haven_column(f))] = f"a coarsened form of {where}"
            elif f.identifiability == "quasi_identifier":
                declarable.setdefault(_norm(f.name), f"a quasi-identifier ({where})")
    return always, declarable


def _column_problems(output: Output, columns: list[str], registry: ContractRegistry) -> list[str]:
    always, declarable = identifying_columns(registry)
    declared_qi = {_norm(d.name) for d in output.dimensions if d.quasi_identifier}
    allowed = set(output.dimension_names) | {d.label.column for d in output.dimensions if d.label}
    allowed |= {m.name for m in output.measures} | {REASON} | {f"{d}_{REASON}" for d in output.denominators}
    if output.totals:
        allowed.add(TOTAL_OVER)
    problems = []
    for col in columns:
        n = _norm(col)
        tokens = set(col.lower().split("_"))
        hit = (
            always.get(n)
            or next((why for name, why in always.items() if len(name) >= 6 and name in n), None)
            or ("the haven pseudonym" if "pid" in tokens else None)
        )
        if hit:
            problems.append(f"column {col!r} is {hit}")
        elif n in declarable and n not in declared_qi:
            problems.append(f"column {col!r} is {declarable[n]}; the output does not declare why it may be published")
        if col not in allowed:
            problems.append(f"column {col!r} is not declared by the output")
    return problems


def _value_checks(col: str, dtype: str) -> tuple[list[tuple[str, str]], str | None]:
    """The value checks of one column, as (finding, SQL count) pairs, and a problem with the column itself."""
    c = q(col)
    if dtype == "VARCHAR":
        checks = [
            (label, f"count(*) FILTER (WHERE regexp_matches({c}, {lit(p)}))") for label, p in TEXT_PATTERNS.items()
        ]
        checks.append(("formula-leading text", f"count(*) FILTER (WHERE {formula_led_sql(c)})"))
        reason = col == REASON or col.endswith("_" + REASON)
        return checks, f"column {col!r} publishes the kind of suppression (must be boolean)" if reason else None
    if dtype in INTEGER_TYPES or dtype.startswith("DECIMAL"):
        nhs_like = f"count(*) FILTER (WHERE abs({c}) BETWEEN 1000000000 AND 9999999999)"
        return [("NHS-number-like (10-digit number)", nhs_like)], None
    if dtype == "DATE":
        return [("day-precise date", f"count(*) FILTER (WHERE day({c}) <> 1)")], None
    if dtype.startswith("TIMESTAMP"):
        day = f"count(*) FILTER (WHERE day({c}) <> 1 OR CAST({c} AS TIME) <> TIME '00:00:00')"
        return [("day-precise date", day)], None
    if dtype not in _PLAIN_TYPES:
        return [], f"column {col!r} has type {dtype}, which is not a flat open-data type"
    return [], None


def guard_table(con: duckdb.DuckDBPyConnection, table: str, output: Output, registry: ContractRegistry) -> list[str]:
    """The publication guard on one table (see the module docstring); an empty list passes."""
    types = [(d[0], str(d[1])) for d in con.execute(f"SELECT * FROM {table} LIMIT 0").description]
    problems = [f"{output.name}: {p}" for p in _column_problems(output, [c for c, _ in types], registry)]
    checks: list[tuple[str, str, str]] = []  # (column, finding, SQL count)
    for col, dtype in types:
        found, problem = _value_checks(col, dtype)
        checks += [(col, label, sql) for label, sql in found]
        if problem:
            problems.append(f"{output.name}: {problem}")
    if checks:
        counts = con.execute(f"SELECT {', '.join(sql for _, _, sql in checks)} FROM {table}").fetchone()
        for (col, label, _), n in zip(checks, counts or [], strict=True):
            if n:
                problems.append(f"{output.name}: {n} value(s) in column {col!r} look like a {label}")
    return problems


def verify_release(con: duckdb.DuckDBPyConnection, outputs: Sequence[Output], registry: ContractRegistry) -> list[str]:
    """Everything that must hold before a release is written; an empty list passes."""
    problems: list[str] = []
    for output in outputs:
        table = f"published.{output.name}"
        if not table_exists(con, "published", output.name):
            problems.append(f"{output.name}: no protected table {table}; run its aggregate asset first")
            continue
        problems += [
            f"{output.name}: {p}"
            for p in check_invariants(
                con,
                table,
                output.dimension_names,
                output.count_col,
                output.disclosure_policy,
                margins=output.margins,
                rate_cols=output.rate_cols or None,
            )
        ]
        problems += guard_table(con, table, output, registry)
        statement = load_statement(con, output.name)
        if statement is None:
            problems.append(f"{output.name}: no quality statement")
        elif statement.get("definition_sha256") != output.definition_sha256():
            problems.append(f"{output.name}: the quality statement was built from another definition")
    return problems


# --- files -----------------------------------------------------------------------------


def dictionary(con: duckdb.DuckDBPyConnection, output: Output, registry: ContractRegistry) -> dict[str, Any]:
    """The data dictionary of one output: every column's role, meaning and code system."""
    types = dict(
        (d[0], str(d[1])) for d in con.execute(f"SELECT * FROM published.{q(output.name)} LIMIT 0").description
    )
    described: dict[str, dict[str, Any]] = {}
    for dim in output.dimensions:
        entry: dict[str, Any] = {"role": "dimension", "description": " ".join(dim.description.split())}
        if dim.domain.code_list:
            cl = registry.code_list(dim.domain.code_list)
            entry["code_list"] = {
                "name": cl.name,
                "title": cl.title,
                "system": cl.system,
                "version": cl.version,
                "holds": dim.domain.field,
            }
        if dim.code_system:
            entry["code_system"] = dim.code_system
        described[dim.name] = entry
        if dim.label:
            cl = registry.code_list(dim.label.code_list)
            described[dim.label.column] = {
                "role": "label",
                "description": f"The {dim.label.field} of {dim.name} in code list {cl.name}.",
                "code_list": {"name": cl.name, "system": cl.system, "version": cl.version},
            }
    for m in output.measures:
        described[m.name] = {"role": "measure", "kind": m.kind, "description": " ".join(m.description.split())}
    described[REASON] = {
        "role": "marker",
        "description": f"true where {output.count_col} is suppressed to protect confidentiality (the ONS [c] "
        f"marker); {output.count_col} is then empty. It does not say why a cell was suppressed.",
    }
    for den in output.denominators:
        described[f"{den}_{REASON}"] = {"role": "marker", "description": f"true where {den} is suppressed."}
    described[TOTAL_OVER] = {
        "role": "total",
        "description": "On total rows, the dimensions summed over; totals are sums of the published cells.",
    }
    columns = [{"name": name, "type": types[name], **described.get(name, {})} for name in types]
    policy = output.disclosure_policy
    rounding = "nearest 5" if policy.rounding == "nearest5" else "midpoint 6 (0 stays 0; 1-6 -> 3, 7-12 -> 9, ...)"
    return {
        "name": output.name,
        "title": output.title,
        "version": output.version,
        "description": " ".join(output.description.split()),
        "licence": LICENCE,
        "licence_url": LICENCE_URL,
        "attribution": ATTRIBUTION,
        "unit": "people",
        "dimensions": output.dimension_names,
        "columns": columns,
        "disclosure_control": (
            f"Counts of 1-{policy.threshold} people are suppressed; other counts are rounded to the {rounding}; "
            "further cells are suppressed where a row or column would otherwise reveal a suppressed one. "
            + ("Zero cells are true zeros." if not policy.suppress_zeros else "Zero cells are suppressed too.")
            + _structural_note(output)
        ),
        "coherence": list(output.coherence),
        "quality_statement": f"{output.name}.quality.md",
        "methods": "methods.md",
    }


def _structural_note(output: Output) -> str:
    """The declared structural zeros, for the dictionary: combinations that are not rows."""
    zeros = output.zeros.structural
    if not zeros:
        return ""
    listed = "; ".join(f"{z.label()} ({' '.join(z.reason.split())})" for z in zeros)
    return f" Combinations that cannot occur (structural zeros) are not rows: {listed}."


def _copy_to(con: duckdb.DuckDBPyConnection, table: str, path: Path, options: str) -> None:
    con.execute(f"COPY (SELECT * FROM {table}) TO {lit(str(path))} ({options})")


def _write_db(
    con: duckdb.DuckDBPyConnection,
    outputs: Sequence[Output],
    path: Path,
    dictionaries: dict[str, dict[str, Any]],
    statements: dict[str, dict[str, Any]],
) -> None:
    """``published.duckdb``: the published tables, their dictionary and quality statements only."""
    path.unlink(missing_ok=True)
    con.execute(f"ATTACH {lit(str(path))} AS pub")
    try:
        for output in outputs:
            con.execute(f"CREATE TABLE pub.main.{q(output.name)} AS SELECT * FROM published.{q(output.name)}")
            _comment(con, f"pub.main.{q(output.name)}", dictionaries[output.name])
        schema.create_published_file_tables(con, "pub")  # dictionary, quality
        rows = [
            (name, c["name"], c["type"], c.get("role"), c.get("description"))
            for name, d in dictionaries.items()
            for c in d["columns"]
        ]
        if rows:
            insert_values(con, "pub.main.dictionary", "(?, ?, ?, ?, ?)", rows)
        for name, st in statements.items():
            con.execute(
                "INSERT INTO pub.main.quality VALUES (?, ?, ?, ?, ?)",
                [name, st["release"]["id"], st["release"]["published_at"], json.dumps(st), render_markdown(st)],
            )
    finally:
        con.execute("DETACH pub")


def _comment(con: duckdb.DuckDBPyConnection, table: str, entry: dict[str, Any]) -> None:
    """The dictionary as the table's and its columns' comments, so ``duckdb_columns()`` and ``DESCRIBE`` show it."""
    con.execute(f"COMMENT ON TABLE {table} IS {lit(entry['title'] + '. ' + entry['disclosure_control'])}")
    for column in entry["columns"]:
        if column.get("description"):
            con.execute(f"COMMENT ON COLUMN {table}.{q(column['name'])} IS {lit(column['description'])}")


def _licence_text() -> str:
    return (
        f"{ATTRIBUTION}\n\nThe files in this folder are published under the {LICENCE}:\n{LICENCE_URL}\n\n"
        "You are free to copy, publish, distribute, transmit and adapt the information, and to exploit it "
        "commercially and non-commercially, provided that you acknowledge the source with the attribution "
        "statement above. The statistics are anonymised: do not attempt to identify any person from them.\n"
    )


@dataclass
class Release:
    """What one publication wrote (counts and names only)."""

    release_id: str
    published_at: datetime
    outputs: list[str]
    rows: int = 0
    files: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    #: what the check of ``published/`` found altered or planted, one line each (``integrity``)
    set_aside: list[str] = field(default_factory=list)
    #: the content equals the last publication's, whose files are all in place: nothing written
    unchanged: bool = False


#: What the release audit adds to a statement (``safehaven.publish.release_audit``): derived from
#: the tables and the previous publication, and timed, so not part of a publication's content.
AUDIT_NOTES = ("disclosure_audit", "revisions")


def _as_built(statement: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored statement without the release audit's notes."""
    if statement is None:
        return None
    accuracy = {k: v for k, v in statement.get("accuracy", {}).items() if k not in AUDIT_NOTES}
    return {**statement, "accuracy": accuracy}


def publication_sha(
    con: duckdb.DuckDBPyConnection, outputs: Sequence[Output], registry: ContractRegistry, methods: Path
) -> str:
    """SHA-256 of what a publication would carry: each protected table (row hash), its quality
    statement as built and its dictionary, the methods and the licence."""
    return reuse.sha_of(
        {
            "outputs": {
                o.name: [
                    reuse.table_sha(con, f"published.{q(o.name)}"),
                    _as_built(load_statement(con, o.name)),
                    dictionary(con, o, registry),
                ]
                for o in outputs
            },
            "methods": sha256_file(methods) if methods.exists() else None,
            "licence": _licence_text(),
        }
    )


def _move_order(name: str) -> tuple[bool, str]:
    """Each output's Parquet goes into ``published/`` before any other file of the release: a crash
    part way leaves no new figure public whose Parquet, the next release's disclosure base, is not
    in place too (``safehaven.publish.release_audit``)."""
    return (not name.endswith(".parquet"), name)


def publish_release(
    con: duckdb.DuckDBPyConnection,
    outputs: Sequence[Output],
    registry: ContractRegistry,
    home: Home,
    *,
    methods: Path | None = None,
    now: datetime | None = None,
    actor: str = "safehaven",
) -> Release:
    """Verify, then write the release to ``home.published`` atomically (see the module docstring).

    Refused first (``CollectionHeld``, nothing checked or written) while a collection an output
    reads is held (:func:`refuse_held_outputs`).

    A publication whose content equals the last one's, with every file of it still in place,
    is not re-issued (``safehaven.publish.reuse``): the returned release is that one, marked
    ``unchanged``, and nothing is written or registered.
    """
    refuse_held_outputs(con, outputs, registry)
    problems = verify_release(con, outputs, registry)
    if problems:
        raise PublicationRefused(problems)
    audit_head = audit.head(con, home)  # refuses (AuditTrailBroken) before any file is written
    set_aside = integrity.set_aside(con, home, actor=actor)  # altered or planted: evidence, audit, breach
    if set_aside:
        audit_head = audit.head(con, home)  # the head published covers the incident's entries
    methods = methods or METHODS_DOC
    content = publication_sha(con, outputs, registry, methods)
    same = reuse.unchanged_publication(con, content, home.published)
    if same is not None:
        _refresh_head(con, home, same[0], audit_head)
        outputs_named = [o.name for o in outputs]
        return Release(same[0], datetime.now(UTC), outputs_named, rows=same[1], unchanged=True, set_aside=set_aside)
    problems = audit_release(con, outputs, home.published)[1]
    if problems:
        raise PublicationRefused(problems, set_aside)
    now = now or datetime.now(UTC)
    release = Release(f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}", now, [o.name for o in outputs])
    release.set_aside = set_aside
    out = home.published
    out.mkdir(parents=True, exist_ok=True)
    staging = _fresh_staging(home, release.release_id)
    statements: dict[str, dict[str, Any]] = {}
    dictionaries: dict[str, dict[str, Any]] = {}
    try:
        for output in outputs:
            table = f"published.{q(output.name)}"
            _copy_to(con, table, staging / f"{output.name}.csv", "FORMAT csv, HEADER true")
            _copy_to(con, table, staging / f"{output.name}.parquet", "FORMAT parquet")
            release.rows += int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            dictionaries[output.name] = {**dictionary(con, output, registry), "release_id": release.release_id}
            (staging / f"{output.name}.dictionary.json").write_text(json.dumps(dictionaries[output.name], indent=2))
            statement = finalise(load_statement(con, output.name) or {}, release.release_id, now)
            statements[output.name] = statement
            (staging / f"{output.name}.quality.json").write_text(json.dumps(statement, indent=2))
            (staging / f"{output.name}.quality.md").write_text(render_markdown(statement))
        _write_db(con, outputs, staging / PUBLISHED_DB, dictionaries, statements)
        if methods.exists():
            shutil.copyfile(methods, staging / "methods.md")
        (staging / "LICENCE.txt").write_text(_licence_text())
        names = sorted(p.name for p in staging.iterdir())
        release.files = {name: sha256_file(staging / name) for name in names}
        previous = _previous_files(out)
        manifest = {
            "release_id": release.release_id,
            "published_at": now.isoformat(timespec="seconds"),
            "licence": OGL,
            "attribution": ATTRIBUTION,
            "outputs": release.outputs,
            "files": release.files,
            "audit_head": audit_head,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        written = {**release.files, MANIFEST: sha256_file(staging / MANIFEST)}
        reuse.record_pending(con, release.release_id, written)  # a crash from here on leaves its files known
        for name in sorted(names, key=_move_order):
            os.replace(staging / name, out / name)
        os.replace(staging / MANIFEST, out / MANIFEST)
        for name in sorted(previous - set(names) - {MANIFEST}):
            if "/" not in name and (out / name).is_file():
                (out / name).unlink()
                release.removed.append(name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record_release(con, list(statements.values()))
    reuse.record_publication(con, release.release_id, content, written, release.rows)
    audit.append_many(
        con,
        [
            {
                "actor": actor,
                "role": "pipeline",
                "action": "publish",
                "object": f"published/{name}",
                "purpose": "open publication of anonymised statistics (CoP 35)",
                "legal_basis": "anonymised",
                "agreement": statements[name]["accuracy"]["linkage"]["agreement"]
                if statements[name]["accuracy"].get("linkage")
                else None,
                "detail": {"release_id": release.release_id, "files": [f for f in names if f.startswith(name + ".")]},
            }
            for name in release.outputs
        ],
    )
    return release


def refuse_held_outputs(con: duckdb.DuckDBPyConnection, outputs: Sequence[Output], registry: ContractRegistry) -> None:
    """Refuse the whole publication (``CollectionHeld``) while a collection any of its outputs reads is
    held (``safehaven.intake.validation.refuse_held``; CoP 7-9). The publication is the step that
    states the figures to the public: materialised alone, it must not publish a held collection's
    figures as if its sender had sent nothing since. The whole release is refused, as for any
    failure (a release is a coherent set), and what analysts hold stays as it is; the message names
    the collection and what clears the hold (a corrected drop that passes, or the intake run again)."""
    refuse_held(con, registry, {c for o in outputs for c in o.collections}, "publication")


def _refresh_head(con: duckdb.DuckDBPyConnection, home: Home, release_id: str, audit_head: dict[str, Any]) -> None:
    """An unchanged publication still carries tonight's audit head (``safehaven.core.anchors``):
    its manifest alone is rewritten, atomically, with the same release id and files."""
    path = home.published / MANIFEST
    manifest = json.loads(path.read_text())
    if manifest.get("audit_head") == audit_head:
        return
    staging = _fresh_staging(home, f"{release_id}-head")
    try:
        (staging / MANIFEST).write_text(json.dumps({**manifest, "audit_head": audit_head}, indent=2))
        sha = sha256_file(staging / MANIFEST)
        reuse.record_pending(con, release_id, {MANIFEST: sha})  # a crash before its record: still the haven's
        os.replace(staging / MANIFEST, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    reuse.record_manifest(con, release_id, MANIFEST, sha)


def _fresh_staging(home: Home, release_id: str) -> Path:
    """An empty staging folder outside ``published/``; earlier ones (a crashed publish) are removed.
    Nothing in ``published/`` is removed here: an entry there the record does not name, whatever its
    name, is evidence (``safehaven.publish.integrity``), moved out before this runs."""
    home.staging.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in home.staging.glob("publish-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = home.staging / f"publish-{release_id}"
    staging.mkdir()
    return staging


def _previous_files(out: Path) -> set[str]:
    path = out / MANIFEST
    try:
        return set(json.loads(path.read_text()).get("files", {})) if path.exists() else set()
    except (OSError, ValueError):
        return set()
