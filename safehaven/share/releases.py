"""Minimum-necessary releases under an agreement, with a manifest of the controls applied.

One release is what one agreement lets leave the haven at one time. Rules, in the order they
are applied (each is a SQL statement over whole tables inside DuckDB; nothing loops over rows):

1. **Only under an agreement in force** (CoP 21, 30-31, 41; Caldicott 6). The agreement is
   re-read from its YAML at release time, so a suspension takes effect at once. A draft,
   suspended, expired or not-yet-started agreement releases nothing: :func:`release` returns
   a ``skipped`` result (and audits it); no file, register row or member is written.
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
   join their extracts; CoP 8a, BRIEF), computed once per person and joined to their records.
6. **k-anonymity** (CoP 34b; ISB 1523; BRIEF "record-level extracts checked for k-anonymity
   on their quasi-identifiers"), record-level releases only. A person's *signature* is the
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

What is written (CoP 32-33; SATRE asks for a machine-readable record of the disclosure
controls of each release): ``releases/<agreement>/<release-id>/<collection>.parquet`` and
``manifest.json`` (file hashes, row and people counts, columns, contract and agreement
versions and the agreement file's hash, and every control applied with its counts); a row in
the data release register; the haven pseudonyms of everyone released in
``governance.release_members`` (for objection notices and subject access); the opt-out
decision; and audit entries for the reads of each haven table and for the release. The
registers are re-exported to ``registers/``. Values never appear in metadata, manifests or
audit entries: counts, hashes, names and versions only.

Call :func:`release` outside an open transaction (the audit trail commits its own).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb

from safehaven.core import audit
from safehaven.core import registers as reg
from safehaven.core.files import sha256_file
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing, KeyRingError
from safehaven.core.store import table_exists
from safehaven.intake.contracts import Contract, ContractRegistry, FieldSpec
from safehaven.intake.rules import lit, q
from safehaven.protect import optouts, pseudonymise, vault
from safehaven.publish.disclosure import Policy, check_invariants, protect
from safehaven.share import due
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
class KReport:
    """What the k-anonymity step found and did (counts only)."""

    k: int
    small_groups: str
    quasi_identifiers: dict[str, list[str]]
    people_checked: int = 0
    groups_below_k: int = 0
    people_below_k: int = 0
    suppression_order: list[str] = field(default_factory=list)
    people_generalised: dict[str, int] = field(default_factory=dict)
    people_merged_into_suppressed_group: int = 0
    people_removed: int = 0
    records_removed: int = 0
    smallest_group_after: int | None = None


@dataclass
class ReleaseResult:
    agreement_id: str
    status: str  # "released" or "skipped"
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
    k: KReport | None = None
    manifest_sha256: str | None = None

    def as_metadata(self) -> dict[str, Any]:
        """Counts, ids and hashes for Dagster metadata (never values)."""
        meta: dict[str, Any] = {
            "agreement": self.agreement_id,
            "released": self.status == "released",
            "status": self.status,
            "reason": self.reason,
        }
        if self.status == "released":
            meta.update(
                release_id=self.release_id,
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
    breach_id = None
    if kind is not None:
        breach_id = reg.record_breach(
            con,
            kind=kind,
            severity=0,
            what=f"release under agreement {agreement.id} refused: {reason}",
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
        detail={"reason": reason[:2000], "breach_id": breach_id},
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


def _signatures(con: duckdb.DuckDBPyConnection, tables: dict[str, str], qis: dict[str, list[str]], k: int) -> None:
    """(Re)build ``_ksig`` (pid, signature, n) and ``_kviol`` (pid) over all work tables."""
    parts = []
    for collection, table in tables.items():
        cols = qis[collection]
        if cols:
            rendered = ", ".join(f"coalesce(CAST({q(c)} AS VARCHAR), '*')" for c in cols)
            parts.append(f"SELECT pid, concat_ws(chr(31), {lit(collection)}, {rendered}) AS sig FROM {table}")
        else:
            parts.append(f"SELECT pid, NULL::VARCHAR AS sig FROM {table}")
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _ksig AS SELECT pid, signature, count(*) OVER (PARTITION BY signature) AS n "
        "FROM (SELECT pid, list_sort(list(DISTINCT sig) FILTER (WHERE sig IS NOT NULL)) AS signature "
        f"FROM ({' UNION ALL '.join(parts)}) GROUP BY pid)"
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE _kviol AS SELECT pid FROM _ksig WHERE n < {int(k)}")


def k_anonymise(
    con: duckdb.DuckDBPyConnection, agreement: Agreement, tables: dict[str, str], qis: dict[str, list[str]]
) -> KReport:
    """Check and enforce k-anonymity over the work tables (rule 6 of the module docstring)."""
    k = agreement.k_anonymity
    report = KReport(k, agreement.small_groups, {c: list(v) for c, v in qis.items()})
    _signatures(con, tables, qis, k)
    report.people_checked = _count(con, "SELECT count(*) FROM _ksig")
    report.people_below_k = _count(con, "SELECT count(*) FROM _kviol")
    report.groups_below_k = _count(con, f"SELECT count(DISTINCT signature) FROM _ksig WHERE n < {k}")
    if report.people_below_k and agreement.small_groups == "refuse":
        raise ReleaseRefused(
            f"k-anonymity: {report.people_below_k} people in {report.groups_below_k} groups of released "
            f"quasi-identifiers are in groups smaller than k={k}, and the agreement says small_groups: refuse"
        )
    # local suppression: the column with the most distinct values first
    columns = sorted({c for v in qis.values() for c in v})
    distinct: dict[str, int] = {}
    for col in columns:
        union = " UNION ".join(f"SELECT {q(col)} AS v FROM {t}" for c, t in tables.items() if col in qis[c])
        distinct[col] = _count(con, f"SELECT count(DISTINCT v) FROM ({union})")
    report.suppression_order = sorted(columns, key=lambda c: (-distinct[c], c))
    for col in report.suppression_order:
        if not _count(con, "SELECT count(*) FROM _kviol"):
            break
        having = [t for c, t in tables.items() if col in qis[c]]
        touched = " UNION ".join(
            f"SELECT pid FROM {t} WHERE {q(col)} IS NOT NULL AND pid IN (SELECT pid FROM _kviol)" for t in having
        )
        report.people_generalised[col] = _count(con, f"SELECT count(DISTINCT pid) FROM ({touched})")
        for t in having:
            con.execute(f"UPDATE {t} SET {q(col)} = NULL WHERE pid IN (SELECT pid FROM _kviol)")
        _signatures(con, tables, qis, k)
    remaining = _count(con, "SELECT count(*) FROM _kviol")
    if 0 < remaining < k and columns:
        # the fully suppressed group is too small: merge the smallest compliant groups into it
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _kborrow AS SELECT pid FROM _ksig WHERE signature IN ("
            "SELECT signature FROM (SELECT signature, sum(n) OVER (ORDER BY n, signature) - n AS before "
            f"FROM (SELECT DISTINCT signature, n FROM _ksig WHERE n >= {k})) WHERE before < {k - remaining})"
        )
        report.people_merged_into_suppressed_group = _count(con, "SELECT count(*) FROM _kborrow")
        for c, t in tables.items():
            if qis[c]:
                nulls = ", ".join(f"{q(col)} = NULL" for col in qis[c])
                con.execute(f"UPDATE {t} SET {nulls} WHERE pid IN (SELECT pid FROM _kborrow)")
        _signatures(con, tables, qis, k)
    report.people_removed = _count(con, "SELECT count(*) FROM _kviol")
    if report.people_removed:
        share = report.people_removed / max(report.people_checked, 1)
        if share > agreement.max_suppressed_share:
            raise ReleaseRefused(
                f"k-anonymity: after local suppression {report.people_removed} of {report.people_checked} people "
                f"({share:.1%}) are still in groups smaller than k={k}; removing them would exceed the agreement's "
                f"max_suppressed_share of {agreement.max_suppressed_share:.1%}"
            )
        for t in tables.values():
            report.records_removed += _count(con, f"SELECT count(*) FROM {t} WHERE pid IN (SELECT pid FROM _kviol)")
            con.execute(f"DELETE FROM {t} WHERE pid IN (SELECT pid FROM _kviol)")
        _signatures(con, tables, qis, k)
    smallest = con.execute("SELECT min(n) FROM _ksig").fetchone()
    report.smallest_group_after = int(smallest[0]) if smallest and smallest[0] is not None else None
    if report.smallest_group_after is not None and report.smallest_group_after < k:  # pragma: no cover
        raise ReleaseRefused("k-anonymity could not be established")  # the steps above make this impossible
    return report


# --- the release -------------------------------------------------------------------------


def _next_release_id(con: duckdb.DuckDBPyConnection, agreement_id: str) -> str:
    n = _count(con, f"SELECT count(*) FROM {reg.RELEASE_REGISTER} WHERE agreement_id = ?", [agreement_id])
    return f"{agreement_id}-r{n + 1:04d}"


def _export(con: duckdb.DuckDBPyConnection, table: str, path: Path) -> None:
    """Write ``table`` to ``path`` as Parquet, rows in a fixed order (all columns), mode 0600."""
    path.touch(mode=FILE_MODE)
    path.chmod(FILE_MODE)
    con.execute(f"COPY (SELECT * FROM {table} ORDER BY ALL) TO {lit(str(path))} (FORMAT parquet)")
    path.chmod(FILE_MODE)


def release(
    con: duckdb.DuckDBPyConnection,
    agreement_id: str,
    *,
    home: Home,
    registry: ContractRegistry | None = None,
    keyring: KeyRing | None = None,
    today: date | None = None,
    actor: str | None = None,
) -> ReleaseResult:
    """Make one release under ``agreement_id``, or skip it, or refuse it (module docstring).

    Returns a ``released`` or ``skipped`` result. Raises :class:`ReleaseRefused` or
    ``safehaven.share.linkage.LinkageRefused`` (after recording the breach and the audit entry).
    """
    registry = registry or ContractRegistry()
    keyring = keyring or KeyRing(home.keys)
    today = today or date.today()
    actor = actor or reg.current_actor()
    reg.ensure_tables(con)
    optouts.ensure_tables(con)

    path = agreement_path(agreement_id, registry.root)
    if not path.exists():
        reason = f"agreement {agreement_id} no longer exists ({agreements_dir(registry.root)})"
        return ReleaseResult(agreement_id, "skipped", reason)
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
    agreement_sha = sha256_file(path)

    ok, why = agreement.in_force(today)
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
            detail={"reason": why, "status": agreement.status_on(today)},
        )
        return ReleaseResult(agreement.id, "skipped", f"nothing released: {why}", level=agreement.identifiability)

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
        return ReleaseResult(agreement.id, "due", why, level=agreement.identifiability)

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
            con, agreement, agreement_sha, home=home, registry=registry, keyring=keyring, today=today, actor=actor
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
) -> ReleaseResult:
    a = agreement
    contracts = {c: registry.contracts[c] for c in a.collections}
    record_level = a.identifiability != "anonymised"
    result = ReleaseResult(a.id, "released", "", level=a.identifiability)

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
        work[c] = f"_work_{i}"
        source = f"({filtered})"
        if identified:
            source += " LEFT JOIN _ident USING (pid)"
        if record_level:
            source += " LEFT JOIN _persons USING (pid)"
        con.execute(f"CREATE OR REPLACE TEMP TABLE _work_{i} AS SELECT pid, {person}{select} FROM {source}")
    assert decision is not None
    decision = replace(decision, overruled=overruled)
    result.optouts_applied, result.optouts_reason = decision.applied, decision.reason
    result.objector_records_included = overruled

    # 6-7. disclosure control
    sdc: dict[str, Any] = {}
    if record_level:
        if not identified:
            result.k = k_anonymise(con, a, work, {c: _quasi(contracts[c], a) for c in a.collections})
        for c, t in work.items():
            con.execute(f"CREATE OR REPLACE TABLE {_table(a.id, c)} AS SELECT * EXCLUDE (pid) FROM {t}")
    else:
        policy = Policy()
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

    # write the files into a fresh directory, then record everything
    release_id = _next_release_id(con, a.id)
    released_at = datetime.now(UTC)
    folder = home.releases / a.id
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    final, tmp = folder / release_id, folder / f".{release_id}.tmp"
    for stale in (final, tmp):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(mode=0o700)
    people_sets = []
    for c in a.collections:
        table = _table(a.id, c)
        path = tmp / f"{c}.parquet"
        _export(con, table, path)
        columns = [{"name": n, "type": t} for n, t, *_ in con.execute(f"DESCRIBE {table}").fetchall()]
        rows = _count(con, f"SELECT count(*) FROM {table}")
        people = _count(con, f"SELECT count(DISTINCT {PERSON_ID}) FROM {table}") if record_level else None
        result.files.append(FileRecord(path.name, c, sha256_file(path), rows, people, columns))
        result.records_released += rows
        if record_level:
            people_sets.append(f"SELECT pid FROM {work[c]}")
    if record_level:
        result.people_released = _count(con, f"SELECT count(DISTINCT pid) FROM ({' UNION '.join(people_sets)})")

    manifest = _manifest(a, agreement_sha, contracts, result, release_id, released_at, key_id, cohort_excluded, sdc)
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    with os.fdopen(fd, "wb") as fh:
        fh.write(manifest_bytes)
    result.manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    tmp.rename(final)
    result.release_id, result.directory = release_id, final
    result.reason = f"released {result.records_released} records under agreement {a.id}"

    try:
        con.execute("BEGIN TRANSACTION")
        _register(con, a, agreement_sha, result, released_at)
        optouts.record_decision(
            con, release_id=release_id, agreement_id=a.id, decision=decision, withheld=result.records_withheld
        )
        if record_level:
            con.execute(
                f"INSERT INTO {reg.RELEASE_MEMBERS} SELECT DISTINCT ?, ?, pid, CAST(? AS TIMESTAMPTZ) "
                f"FROM ({' UNION '.join(people_sets)})",
                [release_id, a.id, released_at.isoformat()],
            )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        shutil.rmtree(final, ignore_errors=True)
        raise
    audit.append(
        con,
        actor=actor,
        role="pipeline",
        action="release",
        object=f"release:{release_id}",
        purpose=a.purposes[0],
        legal_basis=a.basis,
        agreement=a.id,
        outcome="ok",
        detail={
            "release_id": release_id,
            "identifiability": a.identifiability,
            "files": len(result.files),
            "records": result.records_released,
            "people": result.people_released,
            "withheld_objections": result.records_withheld,
            "manifest_sha256": result.manifest_sha256,
            "recipient": a.recipient.name,
        },
    )
    reg.export(con, home)
    return result


def _register(
    con: duckdb.DuckDBPyConnection, a: Agreement, agreement_sha: str, r: ReleaseResult, released_at: datetime
) -> None:
    con.execute(
        f"INSERT INTO {reg.RELEASE_REGISTER} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
        "CAST(? AS TIMESTAMPTZ), ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            r.release_id,
            a.id,
            a.version,
            agreement_sha,
            a.recipient.name,
            a.recipient.public_body,
            "; ".join(a.purposes),
            a.basis,
            a.legal_basis.reference,
            ", ".join(a.collections),
            a.identifiability,
            a.start_date,
            a.end_date,
            a.approval.approver,
            a.approval.date,
            released_at.isoformat(),
            bool(r.optouts_applied),
            r.optouts_reason,
            len(r.files),
            r.records_released,
            r.people_released,
            r.records_withheld,
            r.objector_records_included,
            r.k.people_removed if r.k else 0,
            r.manifest_sha256,
        ],
    )


def _manifest(
    a: Agreement,
    agreement_sha: str,
    contracts: dict[str, Contract],
    r: ReleaseResult,
    release_id: str,
    released_at: datetime,
    key_id: str,
    cohort_excluded: dict[str, int],
    sdc: dict[str, Any],
) -> dict[str, Any]:
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
        "released_at": released_at.isoformat(timespec="seconds"),
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
