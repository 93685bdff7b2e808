"""Retention and secure disposal: first logical (destroy the keys), then physical (CoP 43d, 43f, 48-50).

"Disposal may be initially logical (... putting the data beyond use), but should as soon as
possible be physical (destroying all copies of the data ...)" (CoP 49). The haven disposes of
data when its retention period ends or its agreement ends, records what it did in a disposal
certificate, and can show that the bytes are gone.

What is due (:func:`due`, run every day by the ``disposal`` schedule):

* **A collection's records**, ``retention_days`` after the haven *received* them (the
  ``retention_days`` of the collection's contract, counted from ``governance.batches.landed_at``,
  or from ``quarantined_at`` for a file set aside at ingest). The unit of disposal is the
  received file (the batch): every copy of it is known by its SHA-256, so "all copies" can be
  found and shown to be gone. ``safehaven dispose --collection C --before D`` disposes of
  what was received before day ``D`` (00:00 UTC) by hand. The objections collection is not
  disposed of this way: objections are honoured for as long as the haven holds data.
* **An agreement's data** when the agreement has expired (CoP 43d: the purpose is achieved) or
  has been suspended *for a breach* (CoP 43f: the agreement's ``on_breach`` arrangements): its
  approval reason names a breach, or the breach register holds a breach of severity 1 or 2
  naming the agreement since it was suspended. Any other suspension may be lifted, so it is
  listed for review, never disposed of automatically. An agreement in force is refused
  (suspend it first).
* **One release**, ``retention.days`` after it was made, under an agreement still in force:
  the haven's copy of the extract; the agreement's pseudonym key stays (later releases to the
  same recipient must keep its pseudonyms).

What disposal does, in steps recorded in a journal ``store/disposal.json`` (no values: batch
ids, file names, key ids), so that a crash at any point leaves a state the next run completes
(:func:`resume`; the daily job resumes first):

1. **keys** (logical, crypto-shredding): the agreement's pseudonym salt
   ``keys/agreement-<id>.key`` is overwritten and unlinked (``safehaven.core.keys.destroy``); its
   release pseudonyms can no longer be computed from haven pids by anyone.
2. **rows** (logical), one transaction that also writes the step's counts into
   ``governance.disposal_progress``, so a crash leaves either all or none of it: the disposed
   batches' rows in every landing and haven table (raw, ``_valid``, ``_rejected``, ``haven``:
   every table of the collection with a ``_batch`` column), their identity-vault entries that
   no kept record needs (see below) and every vault data key left with no entry (each is a
   key destroyed), the ``vault.batches`` rows, GP practice registrations learned only from
   them, and the release-zone tables of the releases disposed of. ``governance.batches`` keeps
   a tombstone (status ``disposed``: file name, hash, row count), so the same file sent again
   is not landed again.
3. **files** (physical): every plain copy under ``$SAFEHAVEN_HOME`` is overwritten with random
   bytes, synced and unlinked: the release directories disposed of (extracts, manifest and, for
   a whole agreement, its objection notices and re-key crosswalks), the collection's quarantined
   files received before the date (they are plain identifiable data) with their reason files,
   and any copy of a disposed file waiting in ``incoming/``.
4. **rebuild** (physical): DuckDB's DELETE leaves the bytes in the file (DESIGN.md), so the
   store is copied into a fresh file under a fresh key and swapped in atomically
   (``Store.rebuild``: WAL and temporary files go with the old file). The old store key, which
   could open a copy of the old file, is overwritten and unlinked as the key ring replaces it
   (``safehaven.core.keys``: the bytes, not just the name, are destroyed).
5. **record**: the certificate (what, why, when, by whom, rows per table, files with their
   SHA-256, key ids destroyed, old and new store key ids) goes into
   ``governance.disposal_register``, ``registers/disposal_register.csv|.parquet`` and the audit
   trail (``action="dispose"``). Then the journal is removed.

Identity vault entries. The vault holds one encrypted entry per distinct (pid, field, value)
across all collections, so an entry made from a disposed record may also serve a kept one.
For each value of a disposed record: if no kept record (a remaining row of a vaulted batch of
any collection, the objections included) has that person's field, every entry of that (pid,
field) goes, with no decryption. If a kept record has the person's field with another value
(an old postcode), the entries of that (pid, field) are decrypted with the governance lead's
vault private key, deleted, and the values still needed are encrypted again under a fresh data
key: the disposed value is gone and the kept one is intact. Without the private key such a
disposal is refused before anything is changed (run it as the governance lead).

What stays, and why (documented in every certificate's ``retained``):

* published anonymised aggregates, and anonymised-level release extracts disposed of only
  with their agreement: not confidential (CoP 35-36); the next publication is computed from
  what is left;
* the data release register, ``governance.release_members``, opt-out decisions and notices
  log, the breach register and the audit trail: governance records, keyed by haven pseudonyms
  or holding counts only, needed for CoP 14b notices to recipients that still hold an extract,
  for subject access ("was my record released?") and for accountability (CoP 12, 23d, 32-33);
* validation results, quality measures, type 1 incidents: counts per batch, no values;
* batch tombstones: file name, SHA-256, row count and dates;
* on a collection's disposal, an agreement's objection notices and re-key crosswalks under
  ``releases/<agreement>/`` (recipient pseudonyms, no record values): they go with the agreement.

Beyond the home: backups of the store and of ``keys/`` are not reached. Crypto-shredding
covers a backup of the store file only if no copy of the old store key survives: each
certificate names the old store key id (and any agreement key id) the key custodian must also
destroy in key backups. ``$DAGSTER_HOME`` holds counts and ids only (DESIGN.md).

Nothing here prints or records a value: certificates, journals, logs and metadata carry
counts, ids, file names and hashes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import duckdb

from safehaven.core import audit
from safehaven.core import registers as reg
from safehaven.core.files import sha256_file, shred_file
from safehaven.core.home import Home
from safehaven.core.keys import (
    VAULT,
    KeyRing,
    KeyRingError,
    agreement_ids,
    agreement_purpose,
    check_agreement_id,
    derive_agreement_key,
)
from safehaven.core.store import SimulatedCrash, Store, table_exists
from safehaven.intake.contracts import Contract, ContractRegistry
from safehaven.intake.ingest import BATCHES
from safehaven.intake.rules import q
from safehaven.protect import vault
from safehaven.protect.haven import haven_key
from safehaven.protect.pseudonymise import hmac_sql, install_key
from safehaven.share.agreements import Agreement, AgreementError, agreement_path, load_agreement_file, scan_agreements

JOURNAL = "disposal.json"
REGISTER = "governance.disposal_register"
PROGRESS = "governance.disposal_progress"
EXPORT_STEM = "disposal_register"
STEPS = ("keys", "rows", "files", "rebuild", "record")
PURPOSE = "disposal at the end of retention or of the agreement (CoP 43d, 43f, 48-50)"
RELEASE_REGISTER = reg.RELEASE_REGISTER
_RELEASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

RETAINED = (
    "kept by design: published anonymised aggregates (not confidential); the data release register, "
    "release_members, opt-out decisions and notices log, breach register and audit trail (governance records "
    "keyed by haven pseudonyms or holding counts); validation results and quality measures (counts); batch "
    "tombstones (file name, SHA-256, row count)"
)
METHOD = (
    "logical: keys destroyed (overwritten, synced, unlinked) and rows deleted in one transaction; physical: "
    "plain files overwritten with random bytes, synced and unlinked; store rebuilt into a fresh file under a "
    "fresh key and swapped in atomically; the old store key overwritten and unlinked"
)


class DisposalError(Exception):
    """A disposal that cannot be done as asked; nothing was changed unless the message says so."""


class DisposalPending(DisposalError):
    """Another disposal was interrupted and must be completed first (``safehaven dispose --resume``)."""


# --- what to dispose of ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a disposal is about: one agreement (optionally some of its releases), or a collection's
    records received before a day."""

    kind: str  # "agreement" or "collection"
    agreement: str | None = None
    releases: tuple[str, ...] = ()
    collection: str | None = None
    before: date | None = None

    @classmethod
    def for_agreement(cls, agreement_id: str, releases: tuple[str, ...] | list[str] = ()) -> Target:
        try:
            check_agreement_id(agreement_id)
        except KeyRingError as exc:
            raise DisposalError(str(exc)) from None
        for rid in releases:
            if not _RELEASE_ID.fullmatch(rid):
                raise DisposalError(f"{rid!r} is not a release id")
        return cls("agreement", agreement=agreement_id, releases=tuple(sorted(set(releases))))

    @classmethod
    def for_collection(cls, collection: str, before: date | str) -> Target:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", collection or ""):
            raise DisposalError(f"{collection!r} is not a collection name")
        day = date.fromisoformat(before) if isinstance(before, str) else before
        return cls("collection", collection=collection, before=day)

    def describe(self) -> str:
        if self.kind == "collection":
            return f"collection {self.collection}: records received before {self.before}"
        if self.releases:
            return f"agreement {self.agreement}: release(s) {', '.join(self.releases)}"
        return f"agreement {self.agreement}: all its data"

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "agreement": self.agreement,
            "releases": list(self.releases),
            "collection": self.collection,
            "before": self.before.isoformat() if self.before else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Target:
        if data["kind"] == "collection":
            return cls.for_collection(data["collection"], data["before"])
        return cls.for_agreement(data["agreement"], data.get("releases") or ())


@dataclass
class DueItem:
    """Something whose retention or agreement has ended. ``action`` is ``dispose`` (the daily job
    does it), ``review`` (a person decides: a suspension not for a breach, an orphaned key) or
    ``resume`` (an interrupted disposal)."""

    action: str
    reason: str
    target: Target | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason": self.reason,
            "target": self.target.as_dict() if self.target else None,
            "detail": self.detail,
        }


@dataclass
class Plan:
    """Everything one disposal will touch, fixed before anything is changed (journalled; no values)."""

    disposal_id: str
    target: Target
    reason: str
    requested_by: str
    authorised_by: str | None
    planned_at: str
    batches: list[dict[str, Any]] = field(default_factory=list)
    release_ids: list[str] = field(default_factory=list)
    release_tables: list[str] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    keys: list[dict[str, Any]] = field(default_factory=list)
    vault_values_needing_key: int = 0

    @property
    def empty(self) -> bool:
        return not (self.batches or self.release_tables or self.files or self.dirs or self.keys)

    @property
    def batch_ids(self) -> list[str]:
        return [b["batch_id"] for b in self.batches]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = self.target.as_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        data = dict(data)
        data["target"] = Target.from_dict(data["target"])
        return cls(**data)

    def summary(self) -> dict[str, Any]:
        """Counts and ids for a dry run (no values)."""
        return {
            "target": self.target.describe(),
            "reason": self.reason,
            "batches": len(self.batches),
            "rows_in_batches": sum(int(b.get("rows") or 0) for b in self.batches),
            "releases": self.release_ids,
            "release_tables": self.release_tables,
            "files": len(self.files),
            "bytes": sum(int(f["bytes"]) for f in self.files),
            "keys": [{k: v for k, v in key.items() if k != "path"} for key in self.keys],
            "vault_values_needing_the_vault_key": self.vault_values_needing_key,
        }


@dataclass
class DisposalResult:
    """The outcome of :func:`dispose` / :func:`resume`: the certificate, or why there was nothing to do."""

    status: str  # "disposed" or "nothing_to_dispose"
    target: Target
    reason: str
    disposal_id: str | None = None
    certificate: dict[str, Any] | None = None
    resumed: bool = False

    def as_metadata(self) -> dict[str, Any]:
        """Counts and ids for Dagster metadata and CLI output (never values)."""
        meta: dict[str, Any] = {"target": self.target.describe(), "status": self.status, "reason": self.reason}
        if self.certificate:
            c = self.certificate
            meta.update(
                disposal_id=self.disposal_id,
                resumed=self.resumed,
                batches=len(c["batches"]),
                rows_disposed=c["rows_disposed"],
                files_destroyed=c["files_destroyed"],
                bytes_destroyed=c["bytes_destroyed"],
                keys_destroyed=len(c["keys_destroyed"]),
                key_ids_destroyed=", ".join(k["key_id"] for k in c["keys_destroyed"]),
                store_key_old=c["store_key_old"],
                store_key_new=c["store_key_new"],
            )
        return meta


# --- small helpers --------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def _count(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> int:
    row = con.execute(sql, params or []).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True, default=str))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _files_under(home: Home, folder: Path, kind: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Every file (with size and hash) and directory under ``folder``, deepest directories first."""
    files: list[dict[str, Any]] = []
    dirs: list[str] = []
    if not folder.exists() or folder.is_symlink():
        return files, dirs
    for root, subdirs, names in os.walk(folder, topdown=False, followlinks=False):
        base = Path(root)
        for name in sorted(names):
            files.append(_file_entry(home, base / name, kind))
        for name in subdirs:
            if (base / name).is_symlink():
                files.append(_file_entry(home, base / name, kind))
        dirs.append(str(base.relative_to(home.root)))
    return files, dirs


def _file_entry(home: Home, path: Path, kind: str) -> dict[str, Any]:
    link = path.is_symlink()
    return {
        "path": str(path.relative_to(home.root)),
        "kind": kind,
        "bytes": 0 if link else path.stat().st_size,
        "sha256": None if link else sha256_file(path),
    }


def journal_path(home: Home) -> Path:
    return home.store_dir / JOURNAL


def pending(home: Home) -> dict[str, Any] | None:
    """The journal of an interrupted disposal, if there is one."""
    path = journal_path(home)
    return json.loads(path.read_text()) if path.exists() else None


def _new_id() -> str:
    return f"D{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


# --- tables ---------------------------------------------------------------------------------


_REGISTER_DDL = f"""
CREATE TABLE IF NOT EXISTS {REGISTER} (
    disposal_id VARCHAR PRIMARY KEY,
    target_kind VARCHAR NOT NULL,
    target VARCHAR NOT NULL,
    agreement_id VARCHAR,
    collection VARCHAR,
    received_before DATE,
    release_ids VARCHAR,
    reason VARCHAR NOT NULL,
    requested_by VARCHAR NOT NULL,
    authorised_by VARCHAR,
    started_at TIMESTAMPTZ NOT NULL,
    logical_done_at TIMESTAMPTZ,
    physical_done_at TIMESTAMPTZ,
    completed_at TIMESTAMPTZ NOT NULL,
    batches BIGINT NOT NULL,
    rows_disposed BIGINT NOT NULL,
    files_destroyed BIGINT NOT NULL,
    bytes_destroyed BIGINT NOT NULL,
    keys_destroyed BIGINT NOT NULL,
    key_ids_destroyed VARCHAR,
    store_key_old VARCHAR,
    store_key_new VARCHAR,
    method VARCHAR NOT NULL,
    retained VARCHAR NOT NULL,
    certificate JSON NOT NULL
)
"""


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create the disposal register and the per-step progress table."""
    con.execute(_REGISTER_DDL)
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {PROGRESS} (disposal_id VARCHAR, step VARCHAR, done_at TIMESTAMPTZ, "
        "detail JSON, PRIMARY KEY (disposal_id, step))"
    )


def certificates(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """The disposal register, oldest first (works on a read-only connection)."""
    if not table_exists(con, "governance", "disposal_register"):
        return []
    cur = con.execute(f"SELECT * FROM {REGISTER} ORDER BY completed_at, disposal_id")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def export_register(con: duckdb.DuckDBPyConnection, home: Home) -> dict[str, Path]:
    """Write ``registers/disposal_register.csv`` (formula-leading cells neutralised) and ``.parquet``."""
    ensure_tables(con)
    return reg.export_table(con, home, REGISTER, EXPORT_STEM, "completed_at, disposal_id")


# --- the identity vault -----------------------------------------------------------------------


def _disposed_people(con: duckdb.DuckDBPyConnection, contract: Contract) -> None:
    """Temp tables ``_disp_raw`` (nhs, field, value) of the vault fields of the disposed records
    (batches in ``_disp_batches``) and ``_disp_ids`` (nhs, pid) of their people. Needs the haven key
    installed as ``haven``."""
    disposed = "_batch IN (SELECT batch_id FROM _disp_batches)"
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _disp_raw AS SELECT DISTINCT * FROM ({vault.unpivot_sql(contract, disposed)})"
    )
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _disp_ids AS SELECT nhs, {hmac_sql('nhs', 'haven')} AS pid "
        "FROM (SELECT DISTINCT nhs FROM _disp_raw WHERE nhs IS NOT NULL)"
    )


def _vault_sets(con: duckdb.DuckDBPyConnection, registry: ContractRegistry) -> int:
    """Temp tables describing the vault values of the disposed records (after :func:`_disposed_people`);
    returns the number of vault entries that need the vault private key to be disposed of precisely.

    ``_keep_raw`` (nhs, field, value) still needed by kept records of vaulted batches of any
    collection; ``_gone`` (pid, field, value) needed no more; ``_keep_pairs`` (pid, field) with some
    value still needed; ``_amb`` the (pid, field) pairs with both.
    """
    kept = vault.vaulted_values_sql(
        con, registry.contracts.values(), "_batch NOT IN (SELECT batch_id FROM _disp_batches)"
    )
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _keep_raw AS SELECT DISTINCT * FROM ({kept}) "
        "WHERE nhs IN (SELECT nhs FROM _disp_ids)"
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _gone AS SELECT i.pid, g.field, g.value FROM "
        "(SELECT nhs, field, value FROM _disp_raw EXCEPT SELECT nhs, field, value FROM _keep_raw) g "
        "JOIN _disp_ids i USING (nhs)"
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _keep_pairs AS SELECT DISTINCT i.pid, k.field FROM _keep_raw k "
        "JOIN _disp_ids i USING (nhs)"
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _amb AS SELECT DISTINCT pid, field FROM _gone "
        "WHERE (pid, field) IN (SELECT pid, field FROM _keep_pairs)"
    )
    return _count(con, "SELECT count(*) FROM vault.identity WHERE (pid, field) IN (SELECT pid, field FROM _amb)")


def _needs_vault_key(keyring: KeyRing, entries: int) -> DisposalError:
    """The refusal when telling disposed vault values from kept ones needs the vault private key, which is
    not on this host (planning and the rows step both refuse before anything is changed)."""
    return DisposalError(
        f"{entries} identity-vault entries belong to people whose other records are kept with a different value "
        "of the same field; telling the disposed values apart needs the governance lead's vault key "
        f"({keyring.path(VAULT)}), which is not on this host. Nothing was changed; run the disposal as the "
        "governance lead"
    )


def _drop_vault_sets(con: duckdb.DuckDBPyConnection) -> None:
    for t in ("_disp_raw", "_disp_ids", "_keep_raw", "_gone", "_keep_pairs", "_amb"):
        con.execute(f"DROP TABLE IF EXISTS {t}")


def _dispose_vault(con: duckdb.DuckDBPyConnection, registry: ContractRegistry, keyring: KeyRing) -> dict[str, Any]:
    """Delete the vault entries the disposed records alone needed, and the data keys left empty.

    Runs inside the caller's transaction, after :func:`_disposed_people` and before the landing
    rows are deleted.
    """
    out: dict[str, Any] = {"vault.identity": 0, "vault_entries_reencrypted": 0, "vault_data_keys": []}
    if not table_exists(con, "vault", "identity"):
        return out
    ambiguous = _vault_sets(con, registry)
    out["vault.identity"] = _count(
        con,
        "DELETE FROM vault.identity WHERE pid IN (SELECT pid FROM _disp_ids) "
        "AND (pid, field) NOT IN (SELECT pid, field FROM _keep_pairs)",
    )
    if ambiguous:
        try:
            private = vault.private_key(keyring)
        except vault.VaultError:
            raise _needs_vault_key(keyring, ambiguous) from None
        vault.decrypt_table(con, private, "(v.pid, v.field) IN (SELECT pid, field FROM _amb)", "_amb_plain")
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _amb_keep AS SELECT pid, field, value, min(collection) AS collection "
            "FROM _amb_plain WHERE (pid, field, value) IN "
            "(SELECT i.pid, k.field, k.value FROM _keep_raw k JOIN _disp_ids i USING (nhs)) "
            "GROUP BY pid, field, value"
        )
        con.execute("DROP TABLE _amb_plain")
        out["vault.identity"] += _count(
            con, "DELETE FROM vault.identity WHERE (pid, field) IN (SELECT pid, field FROM _amb)"
        )
        n = vault.encrypt_by_collection(con, "_amb_keep", keyring.get_public(VAULT))
        out["vault.identity"] -= n
        out["vault_entries_reencrypted"] += n
        con.execute("DROP TABLE _amb_keep")
    out["vault_data_keys"] = [
        r[0]
        for r in con.execute(
            "DELETE FROM vault.data_keys WHERE dek_id NOT IN (SELECT DISTINCT dek_id FROM vault.identity) "
            "RETURNING dek_id"
        ).fetchall()
    ]
    return out


# --- planning -------------------------------------------------------------------------------


def _quarantine_files(home: Home, collection: str, cutoff: datetime, batch_ids: set[str]) -> list[dict[str, Any]]:
    """Quarantined files of ``collection`` received before ``cutoff`` (with their reason files), and the
    reason files of refused batches being disposed of."""
    folder = home.quarantine_for(collection)
    if not folder.is_dir():
        return []
    chosen: list[Path] = []

    def when(reason: Path, data: Path | None) -> tuple[datetime | None, dict[str, Any]]:
        info: dict[str, Any] = {}
        if reason.exists():
            try:
                info = json.loads(reason.read_text())
                return datetime.fromisoformat(str(info["quarantined_at"])), info
            except (OSError, ValueError, KeyError, TypeError):
                pass
        source = data if data is not None and data.exists() else reason
        if source.exists():
            return datetime.fromtimestamp(source.lstat().st_mtime, UTC), info
        return None, info

    for path in sorted(folder.iterdir()):
        if path.is_dir() and not path.is_symlink():
            continue
        if path.name.endswith(".reason.json"):
            data = path.with_name(path.name[: -len(".reason.json")])
            if data.exists() or data.is_symlink():
                continue  # judged with its data file
            at, info = when(path, None)
            if info.get("sha256") in batch_ids or (at is not None and at < cutoff):
                chosen.append(path)
            continue
        reason = path.with_name(path.name + ".reason.json")
        at, _ = when(reason, path)
        if at is not None and at < cutoff:
            chosen.append(path)
            if reason.exists():
                chosen.append(reason)
    return [_file_entry(home, p, "quarantine") for p in chosen]


def _incoming_copies(home: Home, collection: str, batch_ids: set[str]) -> list[dict[str, Any]]:
    folder = home.incoming_for(collection)
    if not folder.is_dir() or not batch_ids:
        return []
    out = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink()):
        if sha256_file(path) in batch_ids:
            out.append(_file_entry(home, path, "incoming"))
    return out


def _release_tables(con: duckdb.DuckDBPyConnection | None, agreement_id: str) -> list[str]:
    if con is None:
        return []
    rows = con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database() "
        "AND table_schema = 'release' AND starts_with(table_name, ?) ORDER BY 1",
        [f"{agreement_id}__"],
    ).fetchall()
    return [r[0] for r in rows]


def _agreement_file(registry: ContractRegistry, agreement_id: str) -> Agreement | None:
    """The agreement, or ``None`` when it has no file; an unreadable file is refused (its status is unknown)."""
    try:
        path = agreement_path(agreement_id, registry.root)
    except AgreementError:
        return None
    if not path.exists():
        return None
    try:
        return load_agreement_file(path)
    except AgreementError as exc:
        raise DisposalError(f"{exc}; fix the agreement file before disposing of its data") from None


def _plan_agreement(
    plan: Plan,
    con: duckdb.DuckDBPyConnection | None,
    home: Home,
    registry: ContractRegistry,
    keyring: KeyRing,
    today: date,
) -> None:
    t = plan.target
    assert t.agreement is not None
    aid = t.agreement
    folder = home.releases / aid
    registered: list[tuple[str, datetime]] = []
    if con is not None and table_exists(con, "governance", "release_register"):
        registered = [
            (r[0], r[1])
            for r in con.execute(
                f"SELECT release_id, released_at FROM {RELEASE_REGISTER} WHERE agreement_id = ? "
                "ORDER BY released_at, release_id",
                [aid],
            ).fetchall()
        ]
    if t.releases:
        for rid in t.releases:
            files, dirs = _files_under(home, folder / rid, "release")
            plan.files += files
            plan.dirs += dirs
        plan.release_ids = list(t.releases)
        if registered and registered[-1][0] in t.releases:
            plan.release_tables = _release_tables(con, aid)
        return
    agreement = _agreement_file(registry, aid)
    if agreement is not None:
        in_force, why = agreement.in_force(today)
        if in_force:
            raise DisposalError(
                f"agreement {aid} is in force ({why}); data under an agreement in force is not disposed of. "
                f"Suspend it first (safehaven agreements suspend {aid}), or dispose of single releases past their "
                "retention with --release"
            )
    plan.files, plan.dirs = _files_under(home, folder, "release")
    plan.release_ids = (
        sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in ("notices", "rekey"))
        if folder.is_dir()
        else []
    )
    plan.release_tables = _release_tables(con, aid)
    purpose = agreement_purpose(aid)
    if keyring.exists(purpose):
        salt = keyring.get(purpose)
        entry: dict[str, Any] = {"kind": "agreement_pseudonym_salt", "purpose": purpose, "key_id": salt.key_id}
        if keyring.exists("haven"):
            entry["derived_key_id"] = derive_agreement_key(keyring.get("haven").material, salt.material, aid).key_id
        plan.keys.append(entry)


def _plan_collection(
    plan: Plan, con: duckdb.DuckDBPyConnection | None, home: Home, registry: ContractRegistry, keyring: KeyRing
) -> None:
    t = plan.target
    assert t.collection is not None and t.before is not None
    contract = registry.contracts.get(t.collection)
    if contract is None:
        raise DisposalError(f"there is no contract for collection {t.collection!r}")
    if contract.kind != "content":
        raise DisposalError(
            f"{t.collection} holds objections, which are honoured for as long as the haven holds data; "
            "they are not disposed of by receipt date"
        )
    cutoff = _midnight(t.before)
    if con is not None and table_exists(con, "governance", "batches"):
        rows = con.execute(
            f"SELECT batch_id, file_name, rows, landed_at, status FROM {BATCHES} WHERE collection = ? "
            "AND landed_at < ? AND status <> 'disposed' ORDER BY landed_at, batch_id",
            [t.collection, cutoff],
        ).fetchall()
        plan.batches = [
            {"batch_id": b, "file_name": f, "rows": n, "landed_at": at.isoformat(), "status": s}
            for b, f, n, at, s in rows
        ]
    ids = set(plan.batch_ids)
    accepted = [b for b in plan.batches if b["status"] == "accepted"]  # only these reached the haven
    if accepted and con is not None and table_exists(con, "governance", "release_register"):
        first = min(datetime.fromisoformat(b["landed_at"]) for b in accepted)
        releases = con.execute(
            f"SELECT release_id, agreement_id FROM {RELEASE_REGISTER} WHERE identifiability <> 'anonymised' "
            "AND list_contains(string_split(collections, ', '), ?) AND released_at >= ? "
            "ORDER BY released_at, release_id",
            [t.collection, first],
        ).fetchall()
        for rid, aid in releases:
            plan.release_ids.append(rid)
            files, dirs = _files_under(home, home.releases / aid / rid, "release")
            plan.files += files
            plan.dirs += dirs
        for aid in sorted({a for _, a in releases}):
            plan.release_tables += _release_tables(con, aid)
    plan.files += _quarantine_files(home, t.collection, cutoff, ids)
    plan.files += _incoming_copies(home, t.collection, ids)
    if (
        ids
        and con is not None
        and table_exists(con, "vault", "identity")
        and keyring.exists("haven")
        and table_exists(con, "landing", f"{t.collection}_valid")
    ):
        install_key(con, "haven", keyring.get("haven"))
        _load_batches(con, plan.batch_ids)
        _disposed_people(con, contract)
        plan.vault_values_needing_key = _vault_sets(con, registry)
        _drop_vault_sets(con)


def _load_batches(con: duckdb.DuckDBPyConnection, batch_ids: list[str]) -> None:
    con.execute("CREATE OR REPLACE TEMP TABLE _disp_batches (batch_id VARCHAR)")
    if batch_ids:
        con.execute("INSERT INTO _disp_batches SELECT unnest(?::VARCHAR[])", [batch_ids])


def make_plan(
    home: Home,
    target: Target,
    *,
    registry: ContractRegistry | None = None,
    keyring: KeyRing | None = None,
    reason: str | None = None,
    authorised_by: str | None = None,
    actor: str | None = None,
    today: date | None = None,
) -> Plan:
    """What disposing of ``target`` would touch (read-only; a dry run prints its summary)."""
    registry = registry or ContractRegistry()
    keyring = keyring or KeyRing(home.keys)
    today = today or date.today()
    plan = Plan(
        _new_id(),
        target,
        reason or _default_reason(target, registry, today),
        actor or reg.current_actor(),
        authorised_by,
        _now(),
    )
    store = Store(home, keyring)
    if home.store_file.exists():
        with store.connect(read_only=True) as con:
            _plan_target(plan, con, home, registry, keyring, today)
    else:
        _plan_target(plan, None, home, registry, keyring, today)
    if plan.vault_values_needing_key and not keyring.exists(VAULT):
        raise _needs_vault_key(keyring, plan.vault_values_needing_key)
    return plan


def _plan_target(
    plan: Plan,
    con: duckdb.DuckDBPyConnection | None,
    home: Home,
    registry: ContractRegistry,
    keyring: KeyRing,
    today: date,
) -> None:
    if plan.target.kind == "agreement":
        _plan_agreement(plan, con, home, registry, keyring, today)
    else:
        _plan_collection(plan, con, home, registry, keyring)


def _default_reason(target: Target, registry: ContractRegistry, today: date) -> str:
    if target.kind == "collection":
        contract = registry.contracts.get(target.collection or "")
        days = (
            f"; the contract's retention is {contract.retention_days} days"
            if contract and contract.retention_days
            else ""
        )
        return f"records of {target.collection} received before {target.before} are no longer required{days}"
    agreement = _agreement_file(registry, target.agreement or "")
    if target.releases:
        return (
            f"the haven's copy of release(s) {', '.join(target.releases)} under agreement {target.agreement} "
            "is no longer required"
        )
    if agreement is None:
        return f"agreement {target.agreement} has no agreement file; its data is no longer required"
    status = agreement.status_on(today)
    if status == "expired":
        return f"agreement {agreement.id} expired on {agreement.end_date} (CoP 43d): {agreement.retention.destruction}"
    if status == "suspended":
        return (
            f"agreement {agreement.id} suspended: {agreement.approval.reason} (CoP 43f): "
            f"{agreement.retention.on_breach}"
        )
    return f"agreement {agreement.id} ({status}): its data is no longer required"


# --- doing it -------------------------------------------------------------------------------


class _Run:
    """One disposal carried out from its journal, step by step (see the module docstring)."""

    def __init__(
        self, home: Home, journal: dict[str, Any], registry: ContractRegistry, keyring: KeyRing, crash_after: str | None
    ) -> None:
        self.home, self.journal, self.registry, self.keyring = home, journal, registry, keyring
        self.plan = Plan.from_dict(journal["plan"])
        self.crash_after = crash_after
        self.store = Store(home, keyring)

    @property
    def steps(self) -> dict[str, Any]:
        return self.journal["steps"]

    def _save(self) -> None:
        _write_json(journal_path(self.home), self.journal)

    def _crash(self, point: str) -> None:
        if self.crash_after == point:
            raise SimulatedCrash(f"simulated crash after {point}")

    def _done(self, step: str, detail: dict[str, Any]) -> None:
        self.steps[step] = {"done_at": _now(), **detail}
        self._save()

    def run(self) -> dict[str, Any]:
        if "keys" not in self.steps:
            self._keys()
        if "rows" not in self.steps:
            self._rows()
        if "files" not in self.steps:
            self._files()
        if "rebuild" not in self.steps:
            self._rebuild()
        certificate = self._record(self._certificate())
        journal_path(self.home).unlink(missing_ok=True)
        return certificate

    # 1. keys: crypto-shredding
    def _keys(self) -> None:
        destroyed = []
        for key in self.plan.keys:
            now = self.keyring.destroy(key["purpose"]) if self.keyring.exists(key["purpose"]) else None
            destroyed.append({**key, "destroyed_by_this_run": now is not None})
        self._crash("keys")
        self._done("keys", {"destroyed": destroyed})

    # 2. rows: one transaction, its counts committed with it
    def _rows(self) -> None:
        with self.store.connect() as con:
            ensure_tables(con)
            row = con.execute(
                f"SELECT detail FROM {PROGRESS} WHERE disposal_id = ? AND step = 'rows'", [self.plan.disposal_id]
            ).fetchone()
            if row is None:
                self._delete(con)
                row = con.execute(
                    f"SELECT detail FROM {PROGRESS} WHERE disposal_id = ? AND step = 'rows'", [self.plan.disposal_id]
                ).fetchone()
        self._crash("rows")
        self._done("rows", json.loads(row[0]))

    def _delete(self, con: duckdb.DuckDBPyConnection) -> None:
        plan = self.plan
        counts: dict[str, int] = {}
        data_keys: list[str] = []
        reencrypted = 0
        _load_batches(con, plan.batch_ids)
        con.execute("BEGIN TRANSACTION")
        try:
            if plan.batch_ids:
                contract = self.registry.contracts[plan.target.collection or ""]
                if table_exists(con, "landing", f"{contract.collection}_valid"):
                    install_key(con, "haven", haven_key(con, self.keyring))
                    _disposed_people(con, contract)
                    v = _dispose_vault(con, self.registry, self.keyring)
                    counts["vault.identity"] = int(v["vault.identity"])
                    data_keys, reencrypted = v["vault_data_keys"], int(v["vault_entries_reencrypted"])
                    counts["vault.data_keys"] = len(data_keys)
                    counts.update(self._registrations(con, contract))
                if table_exists(con, "vault", "batches"):
                    counts["vault.batches"] = _count(
                        con, "DELETE FROM vault.batches WHERE batch_id IN (SELECT batch_id FROM _disp_batches)"
                    )
                for schema, table in self._batch_tables(con, contract.collection):
                    counts[f"{schema}.{table}"] = _count(
                        con, f"DELETE FROM {schema}.{q(table)} WHERE _batch IN (SELECT batch_id FROM _disp_batches)"
                    )
                counts["governance.batches (marked disposed)"] = _count(
                    con,
                    f"UPDATE {BATCHES} SET status = 'disposed' WHERE batch_id IN (SELECT batch_id FROM _disp_batches)",
                )
            for table in plan.release_tables:
                if table_exists(con, "release", table):
                    counts[f"release.{table}"] = _count(con, f"SELECT count(*) FROM release.{q(table)}")
                    con.execute(f"DROP TABLE release.{q(table)}")
            detail = {"rows": counts, "vault_data_keys_destroyed": data_keys, "vault_entries_reencrypted": reencrypted}
            con.execute(
                f"INSERT INTO {PROGRESS} VALUES (?, 'rows', now(), ?)",
                [plan.disposal_id, json.dumps(detail, sort_keys=True)],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            _drop_vault_sets(con)
            con.execute("DROP TABLE IF EXISTS _disp_batches")

    def _batch_tables(self, con: duckdb.DuckDBPyConnection, collection: str) -> list[tuple[str, str]]:
        """Every landing and haven table of ``collection`` that records its batch (raw, valid, rejected, haven)."""
        others = [c for c in self.registry.contracts if c != collection and c.startswith(collection + "_")]
        rows = con.execute(
            "SELECT t.table_schema, t.table_name FROM information_schema.tables t JOIN information_schema.columns c "
            "USING (table_catalog, table_schema, table_name) WHERE t.table_catalog = current_database() "
            "AND t.table_schema IN ('landing', 'haven') AND t.table_type = 'BASE TABLE' AND c.column_name = '_batch' "
            "AND (t.table_name = ? OR starts_with(t.table_name, ?)) ORDER BY 1, 2",
            [collection, collection + "_"],
        ).fetchall()
        return [(s, t) for s, t in rows if not any(t == o or t.startswith(o + "_") for o in others)]

    def _registrations(self, con: duckdb.DuckDBPyConnection, contract: Contract) -> dict[str, int]:
        """GP practice registrations learned only from the disposed records (list sizes of the objection monitor)."""
        if not contract.practice_field or not table_exists(con, "governance", "practice_registrations"):
            return {}
        practice, nhs = q(contract.practice_field), q(contract.patient_key)
        valid = f"landing.{q(contract.collection + '_valid')}"
        n = _count(
            con,
            "DELETE FROM governance.practice_registrations WHERE collection = ? AND pid IN (SELECT pid FROM _disp_ids) "
            f"AND (practice, pid) NOT IN (SELECT DISTINCT v.{practice}, i.pid FROM {valid} v "
            f"JOIN _disp_ids i ON i.nhs = v.{nhs} WHERE v._batch NOT IN (SELECT batch_id FROM _disp_batches))",
            [contract.collection],
        )
        return {"governance.practice_registrations": n}

    # 3. files: plain copies overwritten and unlinked
    def _files(self) -> None:
        destroyed = 0
        for entry in self.plan.files:
            path = self.home.root / entry["path"]
            if path.exists() or path.is_symlink():
                shred_file(path)
                destroyed += 1
        extra = []
        for rel in self.plan.dirs:  # deepest first; anything written there since the plan goes too
            folder = self.home.root / rel
            if folder.is_dir() and not folder.is_symlink():
                for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
                    extra.append(_file_entry(self.home, path, "release"))
                    shred_file(path)
                for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    sub.rmdir()
                folder.rmdir()
        self._crash("files")
        self._done("files", {"shredded_by_this_run": destroyed, "found_after_plan": extra})

    # 4. rebuild: a fresh store under a fresh key; the old key's bytes destroyed
    def _rebuild(self) -> None:
        self.store.check()  # completes or undoes an interrupted rebuild
        if "old_store_key_id" not in self.journal:
            self.journal["old_store_key_id"] = self.keyring.get("store").key_id
            self._save()
        old_id = self.journal["old_store_key_id"]
        if self.keyring.get("store").key_id == old_id:
            crash = self.crash_after.split(":", 1)[1] if (self.crash_after or "").startswith("rebuild:") else None
            self.store.rebuild(rekey=True, _crash_after=crash)  # raises SimulatedCrash at ``crash``
        self._crash("rebuild")
        # the key ring shredded the old key file as it replaced it; a crash in between left it
        # under ``store.key.retired``, shredded here
        self.keyring.shred_leftovers()
        new_id = self.keyring.get("store").key_id
        self._done(
            "rebuild",
            {
                "old_store_key_id": old_id,
                "new_store_key_id": new_id,
                "old_store_key_overwritten": self.keyring.shreds_replaced_keys(),
            },
        )

    # 5. the certificate
    def _certificate(self) -> dict[str, Any]:
        plan, steps = self.plan, self.steps
        rows = steps["rows"]["rows"]
        keys = [
            {
                "kind": k["kind"],
                "purpose": k["purpose"],
                "key_id": k["key_id"],
                **({"derived_key_id": k["derived_key_id"]} if "derived_key_id" in k else {}),
            }
            for k in steps["keys"]["destroyed"]
        ]
        keys += [{"kind": "vault_data_key", "key_id": d} for d in steps["rows"]["vault_data_keys_destroyed"]]
        keys.append(
            {
                "kind": "store",
                "purpose": "store",
                "key_id": steps["rebuild"]["old_store_key_id"],
                "overwritten": steps["rebuild"]["old_store_key_overwritten"],
            }
        )
        files = plan.files + steps["files"]["found_after_plan"]
        t = plan.target
        return {
            "disposal_id": plan.disposal_id,
            "target": t.as_dict(),
            "target_description": t.describe(),
            "reason": plan.reason,
            "requested_by": plan.requested_by,
            "authorised_by": plan.authorised_by,
            "started_at": plan.planned_at,
            "logical_done_at": steps["rows"]["done_at"],
            "physical_done_at": steps["rebuild"]["done_at"],
            "completed_at": steps.get("record", {}).get("done_at") or _now(),
            "batches": plan.batches,
            "releases": plan.release_ids,
            "release_tables_dropped": plan.release_tables,
            "rows_by_table": rows,
            "rows_disposed": sum(v for k, v in rows.items() if not k.startswith("governance.batches")),
            "vault_entries_reencrypted": steps["rows"]["vault_entries_reencrypted"],
            "files": files,
            "files_destroyed": len(files),
            "bytes_destroyed": sum(int(f["bytes"]) for f in files),
            "keys_destroyed": keys,
            "store_key_old": steps["rebuild"]["old_store_key_id"],
            "store_key_new": steps["rebuild"]["new_store_key_id"],
            "method": METHOD,
            "retained": RETAINED,
        }

    def _record(self, cert: dict[str, Any]) -> dict[str, Any]:
        """Write the certificate (once) to the register, its export and the audit trail; returns it as stored."""
        t = self.plan.target
        with self.store.connect() as con:
            ensure_tables(con)
            if not _count(con, f"SELECT count(*) FROM {REGISTER} WHERE disposal_id = ?", [cert["disposal_id"]]):
                con.execute(
                    f"INSERT INTO {REGISTER} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, CAST(? AS TIMESTAMPTZ), "
                    "CAST(? AS TIMESTAMPTZ), CAST(? AS TIMESTAMPTZ), CAST(? AS TIMESTAMPTZ), ?, ?, ?, ?, ?, ?, ?, ?, "
                    "?, ?, ?)",
                    [
                        cert["disposal_id"],
                        t.kind,
                        cert["target_description"],
                        t.agreement,
                        t.collection,
                        t.before,
                        ", ".join(cert["releases"]) or None,
                        cert["reason"],
                        cert["requested_by"],
                        cert["authorised_by"],
                        cert["started_at"],
                        cert["logical_done_at"],
                        cert["physical_done_at"],
                        cert["completed_at"],
                        len(cert["batches"]),
                        cert["rows_disposed"],
                        cert["files_destroyed"],
                        cert["bytes_destroyed"],
                        len(cert["keys_destroyed"]),
                        ", ".join(k["key_id"] for k in cert["keys_destroyed"]),
                        cert["store_key_old"],
                        cert["store_key_new"],
                        cert["method"],
                        cert["retained"],
                        json.dumps(cert, sort_keys=True, default=str),
                    ],
                )
            export_register(con, self.home)
            done = [
                e
                for e in audit.entries_for(con, object_like=f"disposal:{cert['disposal_id']}")
                if e.action == "dispose" and e.outcome == "ok"
            ]
            if not done:
                audit.append(
                    con,
                    actor=self.plan.requested_by,
                    role="governance",
                    action="dispose",
                    object=f"disposal:{cert['disposal_id']}",
                    purpose=PURPOSE,
                    agreement=t.agreement,
                    outcome="ok",
                    home=self.home,
                    keyring=self.keyring,
                    detail={
                        "target": t.as_dict(),
                        "authorised_by": cert["authorised_by"],
                        "batches": [b["batch_id"] for b in cert["batches"]],
                        "releases": cert["releases"],
                        "rows_disposed": cert["rows_disposed"],
                        "files_destroyed": cert["files_destroyed"],
                        "keys_destroyed": [k["key_id"] for k in cert["keys_destroyed"]],
                        "store_key_new": cert["store_key_new"],
                    },
                )
            stored = con.execute(
                f"SELECT certificate FROM {REGISTER} WHERE disposal_id = ?", [cert["disposal_id"]]
            ).fetchone()[0]
        self._crash("record")
        if "record" not in self.steps:
            self._done("record", {})
        return json.loads(stored)


def _run(
    home: Home,
    journal: dict[str, Any],
    registry: ContractRegistry,
    keyring: KeyRing,
    crash_after: str | None,
    resumed: bool,
) -> DisposalResult:
    plan = Plan.from_dict(journal["plan"])
    if resumed:
        with Store(home, keyring).connect() as con:
            audit.append(
                con,
                actor=reg.current_actor(),
                role="governance",
                action="dispose",
                object=f"disposal:{plan.disposal_id}",
                purpose=PURPOSE,
                agreement=plan.target.agreement,
                outcome="resumed",
                home=home,
                keyring=keyring,
                detail={"steps_done": sorted(journal["steps"])},
            )
    certificate = _Run(home, journal, registry, keyring, crash_after).run()
    return DisposalResult("disposed", plan.target, plan.reason, plan.disposal_id, certificate, resumed)


def dispose(
    home: Home,
    target: Target,
    *,
    registry: ContractRegistry | None = None,
    keyring: KeyRing | None = None,
    reason: str | None = None,
    authorised_by: str | None = None,
    actor: str | None = None,
    today: date | None = None,
    plan: Plan | None = None,
    _crash_after: str | None = None,
) -> DisposalResult:
    """Dispose of ``target``: logically, then physically, then certify (module docstring).

    Idempotent: a target already disposed of has nothing left and returns ``nothing_to_dispose``
    without a new certificate. If the same target's disposal was interrupted it is resumed; if
    another's was, :class:`DisposalPending` is raised. ``plan`` (from :func:`make_plan`, e.g. the one a
    person confirmed) is carried out as it stands. ``_crash_after`` (tests only) stops after
    a step's action and before its journal entry: ``plan``, ``keys``, ``rows``, ``files``,
    ``rebuild:build``, ``rebuild:journal`` (inside ``Store.rebuild``), ``rebuild``, ``record``.
    """
    registry = registry or ContractRegistry()
    keyring = keyring or KeyRing(home.keys)
    home.ensure()
    journal = pending(home)
    if journal is not None:
        if Target.from_dict(journal["target"]) == target:
            return _run(home, journal, registry, keyring, _crash_after, resumed=True)
        raise DisposalPending(
            f"disposal {journal['disposal_id']} ({Target.from_dict(journal['target']).describe()}) was interrupted; "
            "complete it first: safehaven dispose --resume"
        )
    if plan is None or plan.target != target:
        plan = make_plan(
            home,
            target,
            registry=registry,
            keyring=keyring,
            reason=reason,
            authorised_by=authorised_by,
            actor=actor,
            today=today,
        )
    if plan.empty:
        return DisposalResult("nothing_to_dispose", target, f"nothing is held for {target.describe()}")
    journal = {"disposal_id": plan.disposal_id, "target": target.as_dict(), "plan": plan.as_dict(), "steps": {}}
    _write_json(journal_path(home), journal)
    with Store(home, keyring).connect() as con:
        ensure_tables(con)
        audit.append(
            con,
            actor=plan.requested_by,
            role="governance",
            action="dispose",
            object=f"disposal:{plan.disposal_id}",
            purpose=PURPOSE,
            agreement=target.agreement,
            outcome="started",
            home=home,
            keyring=keyring,
            detail={
                "target": target.as_dict(),
                "reason": plan.reason[:500],
                **{k: v for k, v in plan.summary().items() if k in ("batches", "files", "releases")},
            },
        )
    if _crash_after == "plan":
        raise SimulatedCrash("simulated crash after plan")
    return _run(home, journal, registry, keyring, _crash_after, resumed=False)


def resume(
    home: Home,
    *,
    registry: ContractRegistry | None = None,
    keyring: KeyRing | None = None,
    _crash_after: str | None = None,
) -> DisposalResult | None:
    """Complete an interrupted disposal from its journal; ``None`` when there is none."""
    journal = pending(home)
    if journal is None:
        return None
    return _run(
        home, journal, registry or ContractRegistry(), keyring or KeyRing(home.keys), _crash_after, resumed=True
    )


# --- what is due ------------------------------------------------------------------------------


def _suspended_for_breach(agreement: Agreement, con: duckdb.DuckDBPyConnection | None) -> str | None:
    """Why a suspended agreement counts as suspended for a breach (CoP 43f), or ``None``."""
    ap = agreement.approval
    if re.search(r"\bbreach", ap.reason or "", re.IGNORECASE):
        return f"suspended for a breach: {ap.reason}"
    if con is not None and table_exists(con, "governance", "breach_register"):
        since = _midnight(ap.suspended_on or ap.date or date.min)
        row = con.execute(
            f"SELECT breach_id, kind FROM {reg.BREACH_REGISTER} WHERE severity >= 1 AND recorded_at >= ? "
            "AND json_extract_string(detail, '$.agreement') = ? ORDER BY breach_id LIMIT 1",
            [since, agreement.id],
        ).fetchone()
        if row:
            return f"suspended after breach {row[0]} ({row[1]}) in the breach register"
    return None


def _holds(home: Home, keyring: KeyRing, con: duckdb.DuckDBPyConnection | None, agreement_id: str) -> bool:
    folder = home.releases / agreement_id
    return (
        keyring.exists(agreement_purpose(agreement_id))
        or (folder.is_dir() and any(folder.iterdir()))
        or bool(_release_tables(con, agreement_id))
    )


def due(
    home: Home, *, registry: ContractRegistry | None = None, keyring: KeyRing | None = None, today: date | None = None
) -> list[DueItem]:
    """Everything whose retention period or agreement has ended (module docstring), oldest rule first."""
    registry = registry or ContractRegistry()
    keyring = keyring or KeyRing(home.keys)
    today = today or date.today()
    items: list[DueItem] = []
    journal = pending(home)
    if journal is not None:
        items.append(
            DueItem(
                "resume",
                f"disposal {journal['disposal_id']} was interrupted",
                Target.from_dict(journal["target"]),
                {"steps_done": sorted(journal["steps"])},
            )
        )
    if home.store_file.exists():
        with Store(home, keyring).connect(read_only=True) as con:
            _due_in(items, home, registry, keyring, con, today)
    else:
        _due_in(items, home, registry, keyring, None, today)
    return items


def _due_in(
    items: list[DueItem],
    home: Home,
    registry: ContractRegistry,
    keyring: KeyRing,
    con: duckdb.DuckDBPyConnection | None,
    today: date,
) -> None:
    for contract in registry.content():
        if not contract.retention_days:
            continue
        cutoff = today - timedelta(days=contract.retention_days)
        batches = (
            _count(
                con,
                f"SELECT count(*) FROM {BATCHES} WHERE collection = ? AND landed_at < ? AND status <> 'disposed'",
                [contract.collection, _midnight(cutoff)],
            )
            if con is not None and table_exists(con, "governance", "batches")
            else 0
        )
        files = _quarantine_files(home, contract.collection, _midnight(cutoff), set())
        if batches or files:
            items.append(
                DueItem(
                    "dispose",
                    f"{contract.collection}: received before {cutoff}, more than the contract's retention of "
                    f"{contract.retention_days} days ago (contract v{contract.version})",
                    Target.for_collection(contract.collection, cutoff),
                    {"batches": batches, "quarantined_files": len(files)},
                )
            )
    found, _errors = scan_agreements(registry.root)
    for aid, a in sorted(found.items()):
        if not _holds(home, keyring, con, aid):
            continue
        status = a.status_on(today)
        if status == "expired":
            items.append(
                DueItem(
                    "dispose",
                    f"agreement {aid} expired on {a.end_date} (CoP 43d): {a.retention.destruction}",
                    Target.for_agreement(aid),
                    {"status": status},
                )
            )
        elif status == "suspended":
            breach = _suspended_for_breach(a, con)
            if breach:
                items.append(
                    DueItem(
                        "dispose",
                        f"agreement {aid} {breach} (CoP 43f): {a.retention.on_breach}",
                        Target.for_agreement(aid),
                        {"status": status},
                    )
                )
            else:
                items.append(
                    DueItem(
                        "review",
                        f"agreement {aid} is suspended ({a.approval.reason}), not for a "
                        "recorded breach; a suspension can be lifted, so its data is not disposed of "
                        "automatically",
                        Target.for_agreement(aid),
                        {"status": status},
                    )
                )
        elif con is not None and table_exists(con, "governance", "release_register"):
            cutoff = _midnight(today - timedelta(days=a.retention.days))
            old = [
                r[0]
                for r in con.execute(
                    f"SELECT release_id FROM {RELEASE_REGISTER} WHERE agreement_id = ? AND released_at < ? "
                    "ORDER BY released_at, release_id",
                    [aid, cutoff],
                ).fetchall()
                if (home.releases / aid / r[0]).exists()
            ]
            if old:
                items.append(
                    DueItem(
                        "dispose",
                        f"{len(old)} release(s) under agreement {aid} were made more than "
                        f"its retention of {a.retention.days} days ago",
                        Target.for_agreement(aid, old),
                        {"status": status},
                    )
                )
    for aid in agreement_ids(keyring):
        if aid not in found and aid not in _errors:
            items.append(
                DueItem(
                    "review",
                    f"a pseudonym key exists for agreement {aid}, which has no agreement file",
                    Target.for_agreement(aid),
                    {},
                )
            )


@dataclass
class SweepReport:
    """What one daily run did: results of the disposals made, and the items left for a person."""

    results: list[DisposalResult] = field(default_factory=list)
    review: list[DueItem] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)


def sweep(
    home: Home,
    *,
    registry: ContractRegistry | None = None,
    keyring: KeyRing | None = None,
    today: date | None = None,
    authorised_by: str | None = None,
) -> SweepReport:
    """Resume an interrupted disposal, then dispose of everything due (the daily job)."""
    registry = registry or ContractRegistry()
    keyring = keyring or KeyRing(home.keys)
    report = SweepReport()
    resumed = resume(home, registry=registry, keyring=keyring)
    if resumed is not None:
        report.results.append(resumed)
    for item in due(home, registry=registry, keyring=keyring, today=today):
        if item.action == "review":
            report.review.append(item)
            continue
        if item.action != "dispose" or item.target is None:
            continue
        try:
            report.results.append(
                dispose(
                    home,
                    item.target,
                    registry=registry,
                    keyring=keyring,
                    reason=item.reason,
                    authorised_by=authorised_by,
                    today=today,
                )
            )
        except DisposalPending:
            raise
        except DisposalError as exc:
            report.failed.append({"target": item.target.describe(), "error": str(exc)})
    return report


__all__ = [
    "DisposalError",
    "DisposalPending",
    "DisposalResult",
    "DueItem",
    "Plan",
    "SweepReport",
    "Target",
    "certificates",
    "dispose",
    "due",
    "ensure_tables",
    "export_register",
    "journal_path",
    "make_plan",
    "pending",
    "resume",
    "shred_file",
    "sweep",
]
