"""Minimum-necessary releases under an agreement, with a manifest of the controls applied.

One release is what one agreement lets leave the haven at one time. Rules, in the order they
are applied (each is a SQL statement over whole tables inside DuckDB; nothing loops over rows):

1. **Only under an agreement in force** (CoP 21, 30-31, 41; Caldicott 6). The agreement is
   re-read from its YAML at release time and its approval taken from the store
   (``safehaven.share.approvals``: a decision pinned to the file's SHA-256), so a suspension
   or an edit takes effect at once. An agreement with no decision in the store (its file's
   ``approval:`` block alone approves nothing), a draft, suspended, expired,
   changed-since-approval or not-yet-started agreement releases nothing: :func:`prepare` returns a ``skipped`` result
   (and audits it); no file, request, register row or member is written.
2. **Only a consistent agreement** (``safehaven.share.agreements.problems``): an approved agreement
   that does not validate is refused and goes to the breach register (``no_legal_basis`` when
   the problem is its legal basis, else ``invalid_agreement``; severity 0, stopped).
3. **Only named linkages** (CoP 22, 42b, 43i): several collections released under one
   pseudonym domain must each be joined by a linkage the agreement names, and every join is
   authorised through ``safehaven.share.linkage.authorise_linkage`` (refusal: breach + audit). A
   linked release holds only the *linked cohort*: people present in every collection of the
   agreement (minimum necessary; Caldicott 3).
4. **Objections** (CoP 11-14; ``safehaven.protect.optouts``): the national data opt-out (and type 1
   for GP-sourced collections) is applied or overruled as ``optouts.decide`` says for the
   agreement's legal basis and level; the records withheld are counted and the decision is
   recorded with its reason.
5. **Only the listed fields** (Caldicott 2-3), with quasi-identifiers coarsened to what the
   agreement allows: date of birth to ``birth_year`` or ``birth_week`` (the haven holds only
   the week: a year is the calendar year of the Monday of the week of birth, so a birth on
   1-6 January may show the previous year), postcode to ``postcode_district``. Direct
   identifiers never leave at the pseudonymised level: each person is ``person_id``, the
   agreement's own keyed pseudonym (a per-agreement derived key, so two recipients cannot
   join their extracts; CoP 8a; ``docs/rules.md`` "Pseudonymisation and encryption"), computed
   once per person and joined to their records.
6. **k-anonymity** (CoP 34b; ISB 1523; ``docs/rules.md`` "Statistical disclosure control":
   record-level extracts checked for k-anonymity on their quasi-identifiers), record-level
   releases only. A person's *signature* is the
   set of all released quasi-identifier values on all their records across every file (a
   recipient can join the files by ``person_id``). Every signature must be shared by at
   least ``k`` people (default 5). With ``small_groups: suppress``, people in smaller groups
   have their quasi-identifiers set to NULL one column at a time, the column with the most
   distinct values first (local suppression), re-checking after each. If the people left with
   every quasi-identifier suppressed are still fewer than ``k``, the smallest compliant groups
   are suppressed into theirs until it holds ``k``; anyone still in a smaller group is
   removed from the release. If more than
   ``max_suppressed_share`` of the people would be removed, or with ``small_groups:
   refuse`` if any group is smaller than ``k``, the release is refused.
7. **Anonymised level**: each collection becomes a table of counts of distinct people by the
   listed fields (dates other than date of birth to the month), protected by
   ``safehaven.publish.disclosure.protect`` (suppress 1-7, round to 5, secondary suppression).
8. **Identifiable level** (only under a basis that permits it): the listed direct identifiers
   are decrypted from the identity vault (``safehaven.protect.vault``), which needs the vault's private
   key, sealed under the key custodian's passphrase. The unattended pipeline (a key ring with
   no custodian) never writes an identifiable extract: it records that one is due
   (``safehaven.share.due``), and the custodian makes it with ``safehaven release --agreement <id>``.
   The decryption is audited as a re-identification. k-anonymity does not apply to an
   identifiable release; every other rule does.

What is prepared (CoP 32-33; SATRE 3.3.04-3.3.05 asks for a machine-readable record of the
disclosure controls of each release and for output checking):
``staging/releases/<release-id>/<collection>.parquet`` and ``manifest.json`` (file hashes,
row and people counts, columns, contract and agreement versions and the agreement file's
hash, every control applied with its counts, and the review rule that applies), a checker
summary per file (``safehaven.share.checker``), and a release request
(``safehaven.share.review``). **Unchanged means no release**: when the data files equal those
of the agreement's latest request (released, open, returned or rejected), the staging is
removed and nothing is opened or registered. Nothing reaches ``releases/<agreement>/``, the
data release register, ``governance.release_members`` or the opt-out decisions until the
request is approved (``safehaven.share.review.deliver``). Audit entries record the reads of
each haven table and the preparation. Values never appear in metadata, manifests or audit
entries: counts, hashes, names and versions only.

Call :func:`prepare` outside an open transaction (the audit trail commits its own).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb

from safehaven.context import Haven
from safehaven.core import audit
from safehaven.core import registers as reg
from safehaven.core.files import sha256_file
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing, KeyRingError
from safehaven.core.sql import lit, q
from safehaven.core.store import atomic, table_exists
from safehaven.intake.contracts import Contract, ContractRegistry, FieldSpec
from safehaven.intake.validation import CollectionHeld, refuse_held
from safehaven.protect import feed, optouts, pseudonymise, vault
from safehaven.publish.disclosure import Policy, check_invariants, kanon, protect
from safehaven.publish.disclosure.kanon import KReport
from safehaven.share import approvals, checker, due, release_inputs, review
from safehaven.share.agreements import (
    Agreement,
    AgreementError,
    agreement_path,
    agreements_dir,
    basis_problems,
    field_problems,
    load_agreement_file,
    term_problems,
    unlinked_collections,
)
from safehaven.share.linkage import authorise_linkage

ZONE = "release"
#: Release files are the recipient's data: owner-only until handed over (folders 0700).
FILE_MODE = 0o600
PERSON_ID = "person_id"
MANIFEST = "manifest.json"
#: outcomes of :func:`prepare` (DUE: an identifiable release waits for the key custodian)
PREPARED, UNCHANGED, SKIPPED, RELEASED, DUE = "prepared", "unchanged", "skipped", "released", "due"


class ReleaseRefused(Exception):
    """A release that must not happen; the message says why (no values)."""

    def __init__(self, message: str, breach_id: int | None = None) -> None:
        super().__init__(message)
        self.breach_id = breach_id


@dataclass
class FileRecord:
    name: str
    collection: str
    sha256: str
    rows: int
    people: int | None
    columns: list[dict[str, str]]


@dataclass
class ReleaseResult:
    agreement_id: str
    status: str  # PREPARED, UNCHANGED, SKIPPED, DUE or RELEASED (an automatic routine release)
    reason: str
    release_id: str | None = None
    directory: Path | None = None
    level: str = ""
    files: list[FileRecord] = field(default_factory=list)
    records_released: int = 0
    people_released: int | None = None
    records_withheld: int = 0
    objector_records_included: int = 0
    optouts_applied: bool | None = None
    optouts_reason: str = ""
    #: the objection register's refresh date: the date of the opt-out list applied
    optout_list_date: date | None = None
    #: the freshness window the objection register was held to (the agreement's, else the haven's)
    objections_window_days: int = feed.DEFAULT_WINDOW_DAYS
    k: KReport | None = None
    manifest_sha256: str | None = None
    rule: str | None = None

    def as_metadata(self) -> dict[str, Any]:
        """Counts, ids and hashes for Dagster metadata (never values)."""
        meta: dict[str, Any] = {
            "agreement": self.agreement_id,
            "released": self.status == RELEASED,
            "status": self.status,
            "reason": self.reason,
        }
        if self.status == UNCHANGED:
            meta["same_as"] = self.release_id
        if self.status in (PREPARED, RELEASED):
            meta.update(
                release_id=self.release_id,
                review_rule=self.rule,
                identifiability=self.level,
                files=len(self.files),
                rows_out=self.records_released,
                people_released=self.people_released if self.people_released is not None else -1,
                records_withheld_objections=self.records_withheld,
                objector_records_included=self.objector_records_included,
                opt_outs_applied=bool(self.optouts_applied),
                manifest_sha256=self.manifest_sha256,
            )
            if self.k:
                meta.update(
                    k=self.k.k,
                    people_below_k_before=self.k.people_below_k,
                    people_removed_k_anonymity=self.k.people_removed,
                )
        return meta


# --- column mapping ----------------------------------------------------------------------


def released_column(spec: FieldSpec, agreement: Agreement) -> tuple[str, str]:
    """``(sql over the haven row, released column name)`` for one released field (rule 5).

    A direct identifier (identifiable level only) is its value decrypted from the vault
    (``_ident.id_<name>``). Any other field starts from its haven column
    (``safehaven.protect.pseudonymise.haven_column``): postcode district and birth week leave as the
    haven holds them, except that a birth week becomes its year (``<stem>_year``) unless the
    agreement allows ``dob: week``; other dates of an anonymised release go to the month.
    """
    if spec.identifiability == "direct_identifier":
        return q(f"id_{spec.name}"), spec.name
    column = pseudonymise.haven_column(spec)
    coarsening = pseudonymise.haven_coarsening(spec)
    if coarsening == "week" and agreement.coarsening.dob == "year":
        return f"CAST(year({q(column)}) AS INTEGER)", column.removesuffix("_week") + "_year"
    if coarsening is None and agreement.identifiability == "anonymised" and spec.type == "DATE":
        return f"CAST(date_trunc('month', {q(column)}) AS DATE)", f"{column}_month"
    return q(column), column


def _table_name(agreement_id: str, collection: str) -> str:
    """The ``release``-zone table of one collection of an agreement's release, unquoted."""
    return f"{ZONE}.{agreement_id}__{collection}"


def _table(agreement_id: str, collection: str) -> str:
    """``_table_name`` quoted for SQL (an agreement id holds hyphens)."""
    zone, _, table = _table_name(agreement_id, collection).partition(".")
    return f"{zone}.{q(table)}"


def _extract(agreement: Agreement, index: int) -> str:
    """The temporary relation the ``index``-th collection of a record-level release is exported
    from (:func:`_write_files`): a view at the pseudonymised level (:func:`_k_anonymous_release`),
    a table at the identifiable level, never one name for both kinds (one connection may prepare
    both). A record-level extract is never kept in the store: it lives as long as the connection
    that prepares it (the staged file is what is reviewed and delivered), so the store holds no
    second copy of the history per agreement (Caldicott 3; a copy kept in the ``release`` zone
    cost a whole-history write every night, issue 22)."""
    kind = "table" if agreement.identifiability == "identifiable" else "view"
    return f"_extract_{kind}_{index}"


def zone_tables(con: duckdb.DuckDBPyConnection, agreement_id: str) -> list[str]:
    """The ``release``-zone tables of ``agreement_id`` (``release.<agreement>__*``, names
    unquoted, in order): an agreement id holds no underscore, so the prefix is its own."""
    rows = con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database() "
        f"AND table_schema = '{ZONE}' AND starts_with(table_name, ?) ORDER BY 1",
        [f"{agreement_id}__"],
    ).fetchall()
    return [r[0] for r in rows]


# --- pseudonyms --------------------------------------------------------------------------


def _person_ids(con: duckdb.DuckDBPyConnection, agreement_id: str, keyring: KeyRing) -> str:
    """Temp table ``_persons`` (pid, person_id): the release pseudonym of each person of ``_cohort``.

    ``HMAC-SHA256(agreement key, haven pid)`` under the agreement's own derived key
    (``safehaven.protect.pseudonymise.install_agreement_domain``): two recipients cannot join their
    extracts. The HMAC runs once per distinct haven pid, not once per record, and the work
    tables join it back (as ``safehaven.protect.pseudonymise.ids_sql`` does for the haven pseudonym).
    Returns the key id.
    """
    try:  # a lost or swapped salt is refused, never re-created (safehaven.core.pins)
        name, key_id = pseudonymise.install_agreement_domain(con, keyring, agreement_id)
    except KeyRingError as exc:
        raise ReleaseRefused(str(exc)) from None
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _persons AS SELECT pid, {pseudonymise.hmac_sql('pid', name)} "
        f"AS {PERSON_ID} FROM _cohort WHERE pid IS NOT NULL"
    )
    return key_id


def _vault_identifiers(
    con: duckdb.DuckDBPyConnection, agreement: Agreement, contracts: dict[str, Contract], keyring: KeyRing
) -> dict[str, str]:
    """Decrypt the released direct identifiers of the cohort into ``_ident`` (pid, one column per field).

    Needs the vault's private key, held by the governance lead (``safehaven.protect.vault``): the
    pipeline alone cannot make an identifiable release. Values pass through Python once per
    (person, field) because AES-GCM has no DuckDB primitive, and go back through Arrow.
    Returns released field -> column of ``_ident``.
    """
    wanted = sorted(
        {
            f.field
            for c, contract in contracts.items()
            for f in agreement.fields_of(c)
            if contract.field(f.field).identifiability == "direct_identifier"
        }
    )
    try:
        private = vault.private_key(keyring)
    except (vault.VaultError, KeyRingError) as exc:
        raise ReleaseRefused(f"an identifiable release needs the identity vault: {exc}") from None
    fields = ", ".join(lit(w) for w in wanted) or "NULL"
    vault.decrypt_table(con, private, f"v.pid IN (SELECT pid FROM _cohort) AND v.field IN ({fields})", "_ident_rows")
    # the latest value of each field wins (a person who moved is released at their newest postcode)
    pivot = ", ".join(f"arg_max(value, added_at) FILTER (WHERE field = {lit(w)}) AS {q('id_' + w)}" for w in wanted)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _ident AS SELECT pid{', ' + pivot if pivot else ''} "
        "FROM _ident_rows GROUP BY pid"
    )
    con.execute("DROP TABLE _ident_rows")
    return {w: f"id_{w}" for w in wanted}


# --- the steps ---------------------------------------------------------------------------


def _count(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> int:
    row = con.execute(sql, params or []).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _refuse(
    con: duckdb.DuckDBPyConnection, agreement: Agreement, actor: str, reason: str, *, kind: str | None = None
) -> ReleaseRefused:
    recorded = audit.scrub(reason)  # composed from file names and hashes: recorded, never refused for them
    breach_id = None
    if kind is not None:
        breach_id = reg.record_breach(
            con,
            kind=kind,
            severity=0,
            what=f"release under agreement {agreement.id} refused: {recorded}",
            remedial_action="nothing was released; the governance lead corrects the agreement and re-approves "
            "it, or suspends it",
            detail={"agreement": agreement.id, "agreement_version": agreement.version},
        )
    audit.append(
        con,
        actor=actor,
        role="pipeline",
        action="release",
        object=f"agreement:{agreement.id}",
        purpose=agreement.purposes[0],
        legal_basis=agreement.basis,
        agreement=agreement.id,
        outcome="refused",
        detail={"reason": recorded[:2000], "breach_id": breach_id},
    )
    return ReleaseRefused(reason, breach_id)


def _authorise(
    con: duckdb.DuckDBPyConnection, agreement: Agreement, actor: str, today: date, registry: ContractRegistry
) -> None:
    """Authorise every join the release makes; an unlisted one raises LinkageRefused."""
    cols = agreement.collections
    if len(cols) < 2:
        return
    for lk in agreement.linkages:
        authorise_linkage(
            con, {agreement.id: agreement}, lk.left, lk.right, lk.purpose, today=today, registry=registry, actor=actor
        )
    for c in unlinked_collections(agreement, cols):
        authorise_linkage(
            con,
            {agreement.id: agreement},
            cols[0],
            c,
            f"release of {c} with {cols[0]} under agreement {agreement.id}",
            today=today,
            registry=registry,
            actor=actor,
        )


def _quasi(contract: Contract, agreement: Agreement) -> list[str]:
    out = []
    for f in agreement.fields_of(contract.collection):
        spec = contract.field(f.field)
        if spec.identifiability == "quasi_identifier":
            out.append(released_column(spec, agreement)[1])
    return out


def k_anonymise(
    con: duckdb.DuckDBPyConnection,
    agreement: Agreement,
    tables: dict[str, str],
    qis: dict[str, list[str]],
    records: str | None = None,
) -> KReport:
    """Check and enforce k-anonymity over the work tables (rule 6 of the module docstring).

    The rule lives in ``safehaven.publish.disclosure.kanon`` with the other disclosure code;
    this applies the agreement's settings and refuses the release as :class:`ReleaseRefused`.
    ``records``: the tables hold one row per distinct person and quasi-identifiers, with this
    column counting its records (``kanon.k_anonymise``).
    """
    return kanon.k_anonymise(
        con,
        tables,
        qis,
        k=agreement.k_anonymity,
        small_groups=agreement.small_groups,
        max_suppressed_share=agreement.max_suppressed_share,
        refused=ReleaseRefused,
        records=records,
    )


#: the record count of a row of a k-anonymity table (:func:`_k_anonymous_release`)
_RECORDS = "_records"


def _k_anonymous_release(
    con: duckdb.DuckDBPyConnection, a: Agreement, contracts: dict[str, Contract], work: dict[str, str]
) -> tuple[KReport, dict[str, str]]:
    """Rule 6 over the whole extract, then each collection's extract to export (a view,
    :func:`_extract`); returns the report and, per collection, a table whose ``pid`` are the
    people released.

    The check needs only each person's distinct quasi-identifier values, so it runs on one row
    per distinct (person, quasi-identifiers) with its record count (``_kq_<i>``: memory set by
    the people, not by the history), and the outcome is applied as the extract is read for
    its file (the work view, read again by the export): a column the check set to NULL on
    every row of a person is NULL on every record of theirs (it was suppressed, or NULL on all
    of them already), and a person it removed has no row left, so no record. The same records
    and values as suppressing and deleting in a copy of the whole extract, without the copy.
    The check's statements are one transaction (the caller's, or one of their own); the export
    that reads the extract again follows it (:func:`_disclosure_control` says why that reads the
    same records), and refuses a file whose record count is not the check's (``_kq_<i>``'s
    records of the people kept).
    """
    with atomic(con):
        return _k_anonymous_tables(con, a, contracts, work)


def _distinct_rows_sql(table: str, qis: list[str]) -> str:
    """SQL: one row per person and distinct quasi-identifier values of ``table``, with its record
    count. Values are told apart as the check's signatures tell them apart, by their text
    (``kanon._signatures``): grouped as values, a DOUBLE's ``0.0`` and ``-0.0`` (or two NaNs) were one
    row, and a person unique by them passed the check (found by review)."""
    texts = ", ".join(["pid", *(f"CAST({q(col)} AS VARCHAR)" for col in qis)])
    values = ", ".join(["pid", *(f"any_value({q(col)}) AS {q(col)}" for col in qis)])
    return f"SELECT {values}, count(*) AS {_RECORDS} FROM {table} GROUP BY {texts}"


def _k_anonymous_tables(
    con: duckdb.DuckDBPyConnection, a: Agreement, contracts: dict[str, Contract], work: dict[str, str]
) -> tuple[KReport, dict[str, str]]:
    """:func:`_k_anonymous_release`'s statements (in its transaction)."""
    qis = {c: _quasi(contracts[c], a) for c in a.collections}
    kq = {c: f"_kq_{n}" for n, c in enumerate(work)}
    for c, t in work.items():
        con.execute(f"CREATE OR REPLACE TEMP TABLE {kq[c]} AS {_distinct_rows_sql(t, qis[c])}")
    report = k_anonymise(con, a, kq, qis, records=_RECORDS)
    for n, (c, t) in enumerate(work.items()):
        released = [d[0] for d in con.execute(f"SELECT * FROM {t} LIMIT 0").description if d[0] != "pid"]
        flags = ", ".join(f"bool_and({q(col)} IS NULL) AS {q('_null_' + col)}" for col in qis[c])
        out = ", ".join(
            f"CASE WHEN f.{q('_null_' + name)} THEN NULL ELSE w.{q(name)} END AS {q(name)}"
            if name in qis[c]
            else f"w.{q(name)}"
            for name in released
        )
        kept = f"SELECT pid{', ' + flags if flags else ''} FROM {kq[c]} GROUP BY pid"
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW {_extract(a, n)} AS SELECT {out} FROM {t} AS w JOIN ({kept}) AS f USING (pid)"
        )
    return report, kq


# --- the release -------------------------------------------------------------------------


def _next_release_id(con: duckdb.DuckDBPyConnection, agreement_id: str) -> str:
    """``<agreement>-rNNNN``, one more than any release or request of the agreement so far."""
    review.ensure_tables(con)
    n = _count(
        con,
        "SELECT max(CAST(regexp_extract(release_id, '-r([0-9]+)$', 1) AS INTEGER)) FROM ("
        f"SELECT release_id FROM {reg.RELEASE_REGISTER} WHERE agreement_id = ? "
        f"UNION ALL SELECT release_id FROM {review.REQUESTS} WHERE agreement_id = ?)",
        [agreement_id, agreement_id],
    )
    return f"{agreement_id}-r{n + 1:04d}"


def _export(con: duckdb.DuckDBPyConnection, table: str, path: Path) -> None:
    """Write ``table`` to ``path`` as Parquet, rows in a fixed order (all columns), mode 0600."""
    path.touch(mode=FILE_MODE)
    path.chmod(FILE_MODE)
    con.execute(f"COPY (SELECT * FROM {table} ORDER BY ALL) TO {lit(str(path))} (FORMAT parquet)")
    path.chmod(FILE_MODE)


def prepare(
    con: duckdb.DuckDBPyConnection,
    agreement_id: str,
    *,
    haven: Haven,
    objections_max_age_days: int = feed.DEFAULT_WINDOW_DAYS,
) -> ReleaseResult:
    """Prepare one release under ``agreement_id`` for review, or skip it, or refuse it (module docstring).

    ``haven`` gives the home, the contracts (and the agreements under their root), the key ring
    (the pipeline's: an identifiable release is recorded as due; the key custodian's: it is built),
    the actor audited and the day the agreement must be in force.

    ``objections_max_age_days`` is the haven's objection-register window, used where the
    agreement sets none (``safehaven.protect.feed.window_days``).

    Returns a ``prepared`` result (a request is open, files staged), ``unchanged`` (the content
    equals the agreement's latest request: nothing opened, nothing registered), ``skipped``
    (not in force), or ``released`` (an ``automatic`` routine flow). Raises
    :class:`ReleaseRefused` or ``safehaven.share.linkage.LinkageRefused`` (after recording the
    breach and the audit entry). Delivery is ``safehaven.share.review``'s.
    """
    home, registry, keyring, today, actor = haven.home, haven.contracts, haven.keyring, haven.today, haven.actor
    reg.ensure_tables(con)
    optouts.ensure_tables(con)

    path = agreement_path(agreement_id, registry.root)
    if not path.exists():
        reason = f"agreement {agreement_id} no longer exists ({agreements_dir(registry.root)})"
        return ReleaseResult(agreement_id, SKIPPED, reason)
    try:
        agreement = load_agreement_file(path)
    except AgreementError as exc:
        breach_id = reg.record_breach(
            con,
            kind="invalid_agreement",
            severity=0,
            what=f"release under {agreement_id} refused: {exc}",
            remedial_action="nothing was released; the agreement file must be corrected and re-approved",
        )
        raise ReleaseRefused(str(exc), breach_id) from None
    standing = approvals.standing(con, agreement, path)
    agreement_sha = standing.sha256
    ok, why = standing.in_force(today)
    if not ok:
        audit.append(
            con,
            actor=actor,
            role="pipeline",
            action="release",
            object=f"agreement:{agreement.id}",
            purpose=agreement.purposes[0],
            legal_basis=agreement.basis,
            agreement=agreement.id,
            outcome="skipped",
            detail={"reason": why, "status": standing.status_on(today)},
        )
        return ReleaseResult(agreement.id, SKIPPED, f"nothing released: {why}", level=agreement.identifiability)
    agreement = approvals.effective(standing)

    # linkage problems are left to _authorise, which refuses each unnamed join as its own breach
    basis = basis_problems(agreement)
    found = basis + field_problems(agreement, registry) + term_problems(agreement, today=today)
    if found:
        kind = "no_legal_basis" if basis else "invalid_agreement"
        raise _refuse(
            con, agreement, actor, f"agreement {agreement.id} does not validate: " + "; ".join(found), kind=kind
        )
    _authorise(con, agreement, actor, today, registry)
    for c in agreement.collections:
        if not table_exists(con, "haven", c):
            raise _refuse(con, agreement, actor, f"haven.{c} has not been built yet; run the pipeline first")
    try:  # CoP 7-9: never records of a collection whose sender's latest drop the haven could not take
        refuse_held(con, registry, agreement.collections, "release")
    except CollectionHeld as exc:
        raise _refuse(con, agreement, actor, str(exc)) from None
    if agreement.identifiability == "identifiable" and keyring.custodian is None:
        # the unattended pipeline never writes identifiable data: the key custodian does (safehaven.share.due)
        why = due.record_due(
            con,
            agreement.id,
            agreement.version,
            agreement_sha,
            actor=actor,
            purpose=agreement.purposes[0],
            basis=agreement.basis,
        )
        return ReleaseResult(agreement.id, DUE, why, level=agreement.identifiability)

    audit.append_many(
        con,
        [
            {
                "actor": actor,
                "role": "pipeline",
                "action": "read",
                "object": f"haven.{c}",
                "purpose": agreement.purposes[0],
                "legal_basis": agreement.basis,
                "agreement": agreement.id,
                "detail": {"fields": [f.field for f in agreement.fields_of(c)]},
            }
            for c in agreement.collections
        ],
    )
    try:
        result = _build(
            con,
            agreement,
            agreement_sha,
            home=home,
            registry=registry,
            keyring=keyring,
            today=today,
            actor=actor,
            haven_days=objections_max_age_days,
            scheduled=haven.scheduled,
        )
    except ReleaseRefused as exc:
        raise _refuse(con, agreement, actor, str(exc)) from None
    due.clear_due(con, agreement.id, result.release_id or "")
    return result


def _build(
    con: duckdb.DuckDBPyConnection,
    agreement: Agreement,
    agreement_sha: str,
    *,
    home: Home,
    registry: ContractRegistry,
    keyring: KeyRing,
    today: date,
    actor: str,
    haven_days: int,
    scheduled: bool = False,
) -> ReleaseResult:
    a = agreement
    contracts = {c: registry.contracts[c] for c in a.collections}
    record_level = a.identifiability != "anonymised"
    result = ReleaseResult(a.id, PREPARED, "", level=a.identifiability)
    result.optout_list_date = _objection_guard(con, a, home, today, haven_days, registry.contracts)
    result.objections_window_days = feed.window_days(a.objections_max_age_days, haven_days)
    inputs = _inputs(con, a, agreement_sha, today, keyring, contracts)
    known = release_inputs.known_unchanged(con, a.id, inputs) if inputs else None
    if known is not None:  # the same inputs as the content of the latest request: nothing to build
        return _unchanged_result(con, a, known, actor, known.content_sha256)

    # 3. the linked cohort (each person once)
    cohort = " INTERSECT ".join(f"SELECT pid FROM haven.{q(c)}" for c in a.collections)
    con.execute(f"CREATE OR REPLACE TEMP TABLE _cohort AS SELECT DISTINCT pid FROM ({cohort})")
    cohort_excluded = (
        {
            c: _count(con, f"SELECT count(*) FROM haven.{q(c)} WHERE pid NOT IN (SELECT pid FROM _cohort)")
            for c in a.collections
        }
        if len(a.collections) > 1
        else {}
    )

    # 8. identifiers from the vault (identifiable level only), audited as a re-identification
    identified = a.identifiability == "identifiable"
    if identified:
        _vault_identifiers(con, a, contracts, keyring)
        audit.append(
            con,
            actor=actor,
            role="governance",
            action="reidentify",
            object="vault.identity",
            purpose=a.purposes[0],
            legal_basis=a.basis,
            agreement=a.id,
            detail={
                "people": _count(con, "SELECT count(*) FROM _ident"),
                "fields": [d[0] for d in con.execute("SELECT * FROM _ident LIMIT 0").description if d[0] != "pid"],
            },
        )

    # 4-5. objections, then the listed fields only, coarsened, under the agreement's pseudonyms
    key_id = ""
    if record_level:
        key_id = _person_ids(con, a.id, keyring)
    work: dict[str, str] = {}
    decision = None
    overruled = 0
    for i, (c, contract) in enumerate(contracts.items()):
        base = f"SELECT * FROM haven.{q(c)} WHERE pid IN (SELECT pid FROM _cohort)"
        filtered, withheld, decision_c = optouts.apply_optouts(
            con,
            base,
            "pid",
            a.basis,
            a.identifiability,
            today.isoformat(),
            gp_sourced=contract.practice_field is not None,
        )
        result.records_withheld += withheld
        overruled += decision_c.overruled
        decision = decision_c
        cols = [released_column(contract.field(f.field), a) for f in a.fields_of(c)]
        select = ", ".join(f"{sql} AS {q(name)}" for sql, name in cols)
        person = f"_persons.{PERSON_ID}, " if record_level else ""
        source = f"({filtered})"
        if identified:
            source += " LEFT JOIN _ident USING (pid)"
        if record_level:
            source += " LEFT JOIN _persons USING (pid)"
        # a pseudonymised record-level extract is every record the agreement covers, over the whole
        # history: a view, not a copy, read by the check and again by the export (_disclosure_control);
        # the others are read again after they are written (people, members), so they stay a snapshot
        kind = "VIEW" if record_level and not identified else "TABLE"
        work[c] = f"_work_{i}" if kind == "TABLE" else f"_work_view_{i}"  # never one name for both kinds
        con.execute(f"CREATE OR REPLACE TEMP {kind} {work[c]} AS SELECT pid, {person}{select} FROM {source}")
    assert decision is not None
    decision = replace(decision, overruled=overruled)
    result.optouts_applied, result.optouts_reason = decision.applied, decision.reason
    result.objector_records_included = overruled

    # 6-7. disclosure control and the files it describes, then open a request (or find nothing changed)
    with _staging(home, con, a.id) as (release_id, tmp):
        work, sdc = _disclosure_control(con, a, contracts, work, result)
        files = _write_files(con, a, contracts, result, tmp, work)
        return _stage(con, a, agreement_sha, contracts, result, home=home, registry=registry, actor=actor,
                      scheduled=scheduled, work=work, staged=(release_id, tmp, files),
                      extra=_Extras(key_id, cohort_excluded, sdc, decision, inputs))  # fmt: skip


def _disclosure_control(
    con: duckdb.DuckDBPyConnection, a: Agreement, contracts: dict[str, Contract], work: dict[str, str],
    result: ReleaseResult,
) -> tuple[dict[str, str], dict[str, Any]]:  # fmt: skip
    """Rules 6-8: k-anonymity over a pseudonymised extract (its report in ``result``), none over
    an identifiable one, protected counts at the anonymised level. Returns, per collection, a
    table whose ``pid`` are the people released, and the anonymised level's SDC reports.

    The export (:func:`_write_files`) reads the extract after the check's transaction has ended,
    not inside it: held open over the sort of the whole extract, the check's work raised the
    step's peak memory by about 140 MiB (100,000 patients, four nights). It reads what the check
    read: nothing else can write the store while the step holds it (DuckDB's lock keeps other
    processes out, and a second attach of the file in this process is refused), the step writes
    no haven table in between, and a file whose record count is not the check's, or that is not
    k-anonymous as written, is refused (:func:`_as_checked`)."""
    _drop_kept_extracts(con, a)
    if a.identifiability == "anonymised":
        return work, _aggregate(con, a, contracts, work)
    if a.identifiability == "identifiable":
        for n, t in enumerate(work.values()):
            con.execute(f"CREATE OR REPLACE TEMP TABLE {_extract(a, n)} AS SELECT * EXCLUDE (pid) FROM {t}")
        return work, {}
    result.k, kept = _k_anonymous_release(con, a, contracts, work)
    return kept, {}


def _drop_kept_extracts(con: duckdb.DuckDBPyConnection, a: Agreement) -> None:
    """Drop every ``release``-zone table of this agreement that its release does not write, and
    every record-level extract an earlier version kept for any agreement (now never kept:
    :func:`_extract`; one holds the ``person_id`` pseudonym, which no anonymised table does):
    whatever an agreement lists or its level now (found by review: a collection the agreement no
    longer lists kept its extract), and for agreements never built again (suspended, expired). An
    anonymised release rewrites the tables of its own collections."""
    written = (
        {_table_name(a.id, c).partition(".")[2] for c in a.collections} if a.identifiability == "anonymised" else set()
    )
    record_level = con.execute(
        "SELECT DISTINCT table_name FROM information_schema.columns WHERE table_catalog = current_database() "
        f"AND table_schema = '{ZONE}' AND column_name = ?",
        [PERSON_ID],
    ).fetchall()
    for name in sorted({n for n in zone_tables(con, a.id) if n not in written} | {r[0] for r in record_level}):
        con.execute(f"DROP TABLE {ZONE}.{q(name)}")


def _objection_guard(
    con: duckdb.DuckDBPyConnection, a: Agreement, home: Home, today: date, haven_days: int, collections: Iterable[str]
) -> date | None:
    """The opt-out list date the release applies; refuses while the objection feed is blocked
    (``safehaven.protect.feed``: it fails closed)."""
    try:
        return feed.release_guard(
            con,
            home,
            today,
            record_level=a.identifiability != "anonymised",
            agreement_days=a.objections_max_age_days,
            haven_days=haven_days,
            collections=collections,
        )
    except feed.ObjectionFeedBlocked as exc:
        raise ReleaseRefused(str(exc)) from None


def _inputs(
    con: duckdb.DuckDBPyConnection,
    a: Agreement,
    agreement_sha: str,
    today: date,
    keyring: KeyRing,
    contracts: dict[str, Contract],
) -> str:
    """The digest of this preparation's inputs (``safehaven.share.release_inputs``); "" when
    the release is always built (identifiable: the custodian's, with the vault)."""
    if a.identifiability == "identifiable":
        return ""
    key_id = ""
    if a.identifiability != "anonymised":
        try:  # a lost or swapped salt is refused, never re-created (safehaven.core.pins)
            key_id = pseudonymise.install_agreement_domain(con, keyring, a.id)[1]
        except KeyRingError as exc:
            raise ReleaseRefused(str(exc)) from None
    return release_inputs.inputs_sha(con, a, agreement_sha, today, key_id, contracts)


def _aggregate(
    con: duckdb.DuckDBPyConnection, a: Agreement, contracts: dict[str, Contract], work: dict[str, str]
) -> dict[str, Any]:
    """Rule 7: each collection as protected counts of distinct people; returns the SDC reports."""
    policy = Policy()
    sdc: dict[str, Any] = {}
    for c, t in work.items():
        dims = [name for _, name in (released_column(contracts[c].field(f.field), a) for f in a.fields_of(c))]
        dim_list = ", ".join(q(d) for d in dims)
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _true_{t} AS SELECT {dim_list}, count(DISTINCT pid) AS people "
            f"FROM {t} GROUP BY ALL"
        )
        target = _table_name(a.id, c)  # safehaven.publish.disclosure quotes it
        report = protect(con, f"_true_{t}", target, dims, count_col="people", policy=policy)
        violations = check_invariants(con, target, dims, "people", policy)
        if violations:  # pragma: no cover - protect guarantees these
            raise ReleaseRefused(f"disclosure control failed on {c}: {'; '.join(violations[:3])}")
        # one marker in the released file: "secondary" would tell a reader the cell is 0 or above 7
        con.execute(f"UPDATE {_table(a.id, c)} SET suppressed = 'suppressed' WHERE suppressed IS NOT NULL")
        sdc[c] = report.as_metadata()
    return sdc


@dataclass
class _Extras:
    """What the build found that the manifest and the request carry (counts and ids only)."""

    key_id: str
    cohort_excluded: dict[str, int]
    sdc: dict[str, Any]
    decision: optouts.OptOutDecision
    #: the digest of the preparation's inputs ("" when not kept)
    inputs_sha: str = ""


def staging_dir(home: Home, release_id: str) -> Path:
    """``staging/releases/<release-id>/``: inside the haven home, outside ``releases/`` (0700)."""
    return home.staged_release(release_id)


def _private_dir(path: Path) -> None:
    for d in (path.parent.parent, path.parent):
        d.mkdir(exist_ok=True)
        d.chmod(0o700)


def _write_files(
    con: duckdb.DuckDBPyConnection, a: Agreement, contracts: dict[str, Contract], result: ReleaseResult, tmp: Path,
    work: dict[str, str],
) -> list[dict[str, Any]]:  # fmt: skip
    """Export each collection's release table (:func:`_extract` at record level) to ``tmp``
    (0600); returns the checker summary of each file (:func:`_file_summary`), whose counts its
    record carries. A k-anonymous release's file must be what its check judged, or the release is
    refused (:func:`_as_checked`)."""
    record_level = a.identifiability != "anonymised"
    summaries, people_sets = [], []
    for i, c in enumerate(a.collections):
        table = _extract(a, i) if record_level else _table(a.id, c)
        path = tmp / f"{c}.parquet"
        _export(con, table, path)
        columns = [{"name": n, "type": t} for n, t, *_ in con.execute(f"DESCRIBE {table}").fetchall()]
        summary = _file_summary(con, a, contracts[c], path)
        if result.k is not None:
            _as_checked(con, a, work[c], summary)
        rows = int(summary["rows"])
        result.files.append(FileRecord(path.name, c, sha256_file(path), rows, summary.get("people"), columns))
        result.records_released += rows
        summaries.append(summary)
        people_sets.append(f"SELECT pid FROM {work[c]}")
    if record_level:
        result.people_released = _count(con, f"SELECT count(DISTINCT pid) FROM ({' UNION '.join(people_sets)})")
    return summaries


def _file_summary(con: duckdb.DuckDBPyConnection, a: Agreement, contract: Contract, path: Path) -> dict[str, Any]:
    """The checker summary of one staged file (``safehaven.share.checker``): counts read from the
    file itself, its columns' classes, and k per person on its quasi-identifiers."""
    record_level = a.identifiability != "anonymised"
    classes = {released_column(contract.field(f.field), a)[1]: contract.field(f.field).identifiability
               for f in a.fields_of(contract.collection)}  # fmt: skip
    classes.update({PERSON_ID: checker.PSEUDONYM_CLASS, "people": checker.COUNT_CLASS})
    return checker.file_summary(
        con, path, classes=classes, quasi_identifiers=_quasi(contract, a), k=a.k_anonymity,
        person=PERSON_ID if record_level else None, count_col=None if record_level else "people",
    )  # fmt: skip


def _as_checked(con: duckdb.DuckDBPyConnection, a: Agreement, checked: str, summary: dict[str, Any]) -> None:
    """Refuse a k-anonymous release whose staged file is not what its check judged (CoP 34b): the
    file must hold the records of the people the check kept (``checked``, a ``_kq_<i>`` table,
    counts each row's records), and be k-anonymous as the checker reads it (no one in a group
    smaller than k on its quasi-identifiers). After the check every person's signature across the
    files is shared by k people, so each file's is too. Only a change to the haven between the
    check and the export could break either (:func:`_disclosure_control`; found by review: a value
    changed in between kept the record count). What leaves is checked, not only what was judged."""
    expected = _count(con, f"SELECT coalesce(sum({_RECORDS}), 0) FROM {checked}")
    below = summary["k_per_person"]["people_below_k"]
    if summary["rows"] == expected and not below:
        return
    found = (
        f"holds {summary['rows']} records but the k-anonymity check kept {expected}"
        if summary["rows"] != expected
        else f"is not {a.k_anonymity}-anonymous as written: {below} people in smaller groups"
    )
    raise ReleaseRefused(
        f"{a.id}: the staged file {summary['file']} {found}: the haven changed while the release was prepared; "
        "nothing was released, run it again"
    )


def _content_sha(files: list[FileRecord]) -> str:
    """What a recipient would receive: the data files' names and hashes (not the manifest's timestamps)."""
    return hashlib.sha256(json.dumps(sorted((f.name, f.sha256) for f in files)).encode()).hexdigest()


def _shape_sha(a: Agreement, result: ReleaseResult) -> str:
    """The release's fields and checks (routine flows compare these; no counts)."""
    shape = {
        "identifiability": a.identifiability,
        "basis": a.basis,
        "fields": [(f.collection, f.field) for f in a.fields],
        "coarsening": a.coarsening.model_dump(),
        "k": [a.k_anonymity, a.small_groups, a.max_suppressed_share],
        "opt_outs_applied": result.optouts_applied,
        "files": [(f.name, f.columns) for f in result.files],
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()


def review_rule(con: duckdb.DuckDBPyConnection, a: Agreement, shape: str) -> tuple[str, str]:
    """Which review rule applies to a prepared release, and why (``safehaven.share.review``)."""
    if a.identifiability == "identifiable":
        return review.TWO_REVIEWERS_AND_CUSTODIAN, "identifiable releases always need two reviewers and the custodian"
    if a.routine_release is None:
        return review.TWO_REVIEWERS, "the agreement declares no routine flow"
    if shape in review.two_reviewer_shapes(con, a.id):
        return a.routine_release, (
            f"routine_release: {a.routine_release}; the same fields and checks as a release approved by two reviewers"
        )
    return review.TWO_REVIEWERS, (
        "routine_release is declared but no earlier release with the same fields and checks was approved by two "
        "reviewers"
    )


def _summary(a: Agreement, result: ReleaseResult, files: list[dict[str, Any]], rule: tuple[str, str]) -> dict[str, Any]:
    """The checker summary of the release (``safehaven.share.checker``): ``files``, those of its
    staged files (:func:`_write_files`), and its own controls."""
    k = result.k
    return {
        "release_id": result.release_id,
        "agreement": a.id,
        "identifiability": a.identifiability,
        "rule": rule[0],
        "rule_reason": rule[1],
        "records_withheld_objections": result.records_withheld,
        "objector_records_included": result.objector_records_included,
        "k_anonymity": None if k is None else {
            "k": k.k, "people_below_k_before": k.people_below_k, "people_generalised": k.people_generalised,
            "people_removed": k.people_removed, "records_removed": k.records_removed,
            "smallest_group_after": k.smallest_group_after,
        },
        "files": files,
    }  # fmt: skip


def _unchanged(con: duckdb.DuckDBPyConnection, a: Agreement, result: ReleaseResult, tmp: Path, actor: str,
               content: str) -> ReleaseResult | None:  # fmt: skip
    """An ``unchanged`` result when the content equals the agreement's latest request; else None."""
    last = review.latest_comparable(con, a.id)
    if last is None or last.content_sha256 != content:
        return None
    shutil.rmtree(tmp, ignore_errors=True)
    return _unchanged_result(con, a, last, actor, content)


def _unchanged_result(con: duckdb.DuckDBPyConnection, a: Agreement, last: review.Request, actor: str,
                      content: str) -> ReleaseResult:  # fmt: skip
    """Nothing new to release: the content equals request ``last``'s (audited)."""
    audit.append(con, actor=actor, role="pipeline", action="release", object=f"agreement:{a.id}",
                 purpose=a.purposes[0], legal_basis=a.basis, agreement=a.id, outcome="unchanged",
                 detail={"same_as": last.release_id, "state": last.state, "content_sha256": content})  # fmt: skip
    return ReleaseResult(a.id, UNCHANGED, f"nothing new to release: the content equals {last.release_id} "
                         f"({last.state})", release_id=last.release_id, level=a.identifiability)  # fmt: skip


def _stage(
    con: duckdb.DuckDBPyConnection,
    a: Agreement,
    agreement_sha: str,
    contracts: dict[str, Contract],
    result: ReleaseResult,
    *,
    home: Home,
    registry: ContractRegistry,
    actor: str,
    scheduled: bool,
    work: dict[str, str],
    staged: tuple[str, Path, list[dict[str, Any]]],
    extra: _Extras,
) -> ReleaseResult:
    """Open a request for the files staged in ``staged`` (the release id and its folder, from
    :func:`_staging`, and the files' checker summaries, :func:`_write_files`) unless nothing
    changed (module docstring)."""
    release_id, tmp, files = staged
    final = staging_dir(home, release_id)
    content = _content_sha(result.files)
    unchanged = _unchanged(con, a, result, tmp, actor, content)
    if unchanged is not None:
        if extra.inputs_sha:
            release_inputs.remember(con, a.id, extra.inputs_sha, unchanged.release_id or "")
        return unchanged
    result.release_id = release_id
    shape = _shape_sha(a, result)
    rule = review_rule(con, a, shape)
    prepared_at = datetime.now(UTC)
    manifest = _manifest(a, agreement_sha, contracts, result, release_id, prepared_at, extra, rule)
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    with os.fdopen(fd, "wb") as fh:
        fh.write(manifest_bytes)
    result.manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    summary = _summary(a, result, files, rule)
    tmp.rename(final)
    decision = {
        **asdict(extra.decision),
        "withheld": result.records_withheld,
        review.WINDOW_KEY: result.objections_window_days,  # delivery holds the register to it again
    }
    try:
        review.open_request(
            con, release_id=release_id, agreement_id=a.id, identifiability=a.identifiability, rule=rule,
            staging_dir=final, content_sha256=content, shape_sha256=shape, manifest_sha256=result.manifest_sha256,
            files=[asdict(f) for f in result.files], summary=summary,
            register_row=_register_row(a, agreement_sha, result), optout_decision=decision,
            agreement_sha256=agreement_sha,
            members_sql=" UNION ".join(f"SELECT pid FROM {t}" for t in work.values())
            if a.identifiability != "anonymised" else None,
            actor=actor, scheduled=scheduled,
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    if extra.inputs_sha:
        release_inputs.remember(con, a.id, extra.inputs_sha, release_id)
    result.status, result.directory, result.rule = PREPARED, final, rule[0]
    result.reason = f"prepared {release_id} for review ({rule[0]}): {result.records_released} records"
    if rule[0] == review.AUTOMATIC:
        req = review.auto_approve(con, release_id, home=home, registry=registry, actor=actor)
        result.status, result.directory = RELEASED, home.releases / a.id / req.release_id
        result.reason = f"released {release_id} under the automatic routine rule"
    else:
        review.export(con, home)
    return result


@contextmanager
def _staging(home: Home, con: duckdb.DuckDBPyConnection, agreement_id: str) -> Iterator[tuple[str, Path]]:
    """The next release id of ``agreement_id`` and its staging folder (:func:`_fresh_staging`),
    removed if the preparation fails before :func:`_stage` gives it its final name: no file of a
    release that was not prepared stays under the home (found by review: a checker that failed
    left the extract in the hidden folder)."""
    release_id, tmp = _fresh_staging(home, con, agreement_id)
    try:
        yield release_id, tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fresh_staging(home: Home, con: duckdb.DuckDBPyConnection, agreement_id: str) -> tuple[str, Path]:
    """The next release id of ``agreement_id`` and its empty, private staging folder (a leftover
    of an interrupted preparation under that id removed)."""
    release_id = _next_release_id(con, agreement_id)
    final = staging_dir(home, release_id)
    _private_dir(final)
    tmp = final.with_name(f".{release_id}.tmp")
    for stale in (final, tmp):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(mode=0o700)
    return release_id, tmp


def _register_row(a: Agreement, agreement_sha: str, r: ReleaseResult) -> dict[str, Any]:
    """The data release register row of a prepared release (``released_at`` is set at delivery)."""
    return {
        "release_id": r.release_id,
        "agreement_id": a.id,
        "agreement_version": a.version,
        "agreement_sha256": agreement_sha,
        "recipient": a.recipient.name,
        "recipient_public_body": a.recipient.public_body,
        "purposes": "; ".join(a.purposes),
        "legal_basis": a.basis,
        "legal_basis_reference": a.legal_basis.reference,
        "collections": ", ".join(a.collections),
        "identifiability": a.identifiability,
        "agreement_start": a.start_date.isoformat(),
        "agreement_end": a.end_date.isoformat(),
        "approved_by": a.approval.approver,
        "approved_on": a.approval.date.isoformat() if a.approval.date else None,
        "opt_outs_applied": bool(r.optouts_applied),
        "opt_outs_reason": r.optouts_reason,
        "files": len(r.files),
        "records_released": r.records_released,
        "people_released": r.people_released,
        "records_withheld_objections": r.records_withheld,
        "objector_records_included": r.objector_records_included,
        "people_suppressed_k_anonymity": r.k.people_removed if r.k else 0,
        "manifest_sha256": r.manifest_sha256,
        "optout_list_date": r.optout_list_date.isoformat() if r.optout_list_date else None,
    }


def _manifest(
    a: Agreement,
    agreement_sha: str,
    contracts: dict[str, Contract],
    r: ReleaseResult,
    release_id: str,
    prepared_at: datetime,
    extra: _Extras,
    rule: tuple[str, str],
) -> dict[str, Any]:
    key_id, cohort_excluded, sdc = extra.key_id, extra.cohort_excluded, extra.sdc
    controls: dict[str, Any] = {
        "minimum_necessary": {
            "rule": "only the fields the agreement lists, each with its justification (Caldicott 2-3)",
            "fields": [
                {"collection": f.collection, "field": f.field, "justification": f.justification} for f in a.fields
            ],
        },
        "opt_outs": {
            "applied": r.optouts_applied,
            "reason": r.optouts_reason,
            "records_withheld": r.records_withheld,
            "objector_records_included": r.objector_records_included,
            "objection_list_date": r.optout_list_date.isoformat() if r.optout_list_date else None,
        },
        "linkage": {
            "linkages": [lk.model_dump() for lk in a.linkages],
            "cohort": "people present in every collection of the agreement" if len(a.collections) > 1 else "all",
            "records_outside_cohort": cohort_excluded,
        },
    }
    if r.level != "anonymised":
        controls["pseudonymisation"] = {
            "column": PERSON_ID,
            "method": "HMAC-SHA256 of the haven pseudonym under a key derived for this agreement "
            "(recipients cannot join each other's extracts)",
            "key_id": key_id,
            "direct_identifiers_released": identified_fields(a, contracts),
        }
        controls["coarsening"] = {"date_of_birth": a.coarsening.dob, "postcode": a.coarsening.postcode}
        if r.k:
            controls["k_anonymity"] = {
                "k": r.k.k,
                "small_groups": r.k.small_groups,
                "max_suppressed_share": a.max_suppressed_share,
                "quasi_identifiers": r.k.quasi_identifiers,
                "people_checked": r.k.people_checked,
                "groups_below_k_before": r.k.groups_below_k,
                "people_below_k_before": r.k.people_below_k,
                "suppression_order": r.k.suppression_order,
                "people_generalised": r.k.people_generalised,
                "people_merged_into_suppressed_group": r.k.people_merged_into_suppressed_group,
                "people_removed": r.k.people_removed,
                "records_removed": r.k.records_removed,
                "smallest_group_after": r.k.smallest_group_after,
                "signature": "all released quasi-identifier values of a person across every file",
            }
        else:
            controls["k_anonymity"] = {
                "applied": False,
                "reason": f"identifiable release under {a.basis}: the recipient is entitled to identify each person",
            }
    else:
        controls["coarsening"] = {"date_of_birth": a.coarsening.dob, "other_dates": "month"}
        controls["statistical_disclosure_control"] = {
            "policy": "suppress 1-7, round to nearest 5, secondary suppression (safehaven.publish.disclosure)",
            "tables": sdc,
        }
    return {
        "release_id": release_id,
        "prepared_at": prepared_at.isoformat(timespec="seconds"),
        "review": {"rule": rule[0], "reason": rule[1], "reviewers_needed": review.RULES[rule[0]]},
        "agreement": {
            "id": a.id,
            "version": a.version,
            "sha256": agreement_sha,
            "title": a.title,
            "instrument": a.instrument,
            "recipient": a.recipient.name,
            "recipient_public_body": a.recipient.public_body,
            "purposes": a.purposes,
            "legal_basis": a.basis,
            "legal_basis_reference": a.legal_basis.reference,
            "identifiability": a.identifiability,
            "start_date": a.start_date.isoformat(),
            "end_date": a.end_date.isoformat(),
            "approved_by": a.approval.approver,
            "approved_on": a.approval.date.isoformat() if a.approval.date else None,
            "onward_sharing": a.onward_sharing.model_dump(),
            "publication": a.publication.model_dump(),
            "retention": a.retention.model_dump(),
        },
        "contracts": {c: contracts[c].version for c in a.collections},
        "files": [
            {
                "name": f.name,
                "collection": f.collection,
                "sha256": f.sha256,
                "rows": f.rows,
                "people": f.people,
                "columns": f.columns,
            }
            for f in r.files
        ],
        "records_released": r.records_released,
        "people_released": r.people_released,
        "controls": controls,
    }


def identified_fields(agreement: Agreement, contracts: dict[str, Contract]) -> list[str]:
    """The direct identifiers an agreement releases (only ever at the identifiable level)."""
    return [
        f"{f.collection}.{f.field}"
        for f in agreement.fields
        if f.collection in contracts and contracts[f.collection].field(f.field).identifiability == "direct_identifier"
    ]


def verify_release(directory: Path) -> list[str]:
    """Problems with a release directory: files missing, extra, or not matching the manifest."""
    manifest = json.loads((directory / MANIFEST).read_text())
    found = []
    listed = {f["name"]: f for f in manifest["files"]}
    on_disk = {p.name for p in directory.iterdir() if p.name != MANIFEST}
    for name in sorted(on_disk - set(listed)):
        found.append(f"{name} is not in the manifest")
    for name, f in listed.items():
        path = directory / name
        if not path.exists():
            found.append(f"{name} is missing")
        elif sha256_file(path) != f["sha256"]:
            found.append(f"{name} does not match its manifest hash")
    return found
