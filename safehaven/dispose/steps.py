"""The five steps of a disposal, carried out from its journal (CoP 43d, 43f, 48-50).

Rules: ``safehaven.dispose`` package docstring, "What disposal does": 1 keys (crypto-shredding),
2 rows (one transaction, its counts committed with it; then the staged requests withdrawn),
3 files (plain copies overwritten and unlinked), 4 rebuild (a fresh store under a fresh key; the
old key's bytes destroyed), 5 record (the certificate). Each step is journalled when done, so a
crash between two steps is completed by the next run, and a step run again does nothing twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from safehaven.core import audit
from safehaven.core import registers as reg
from safehaven.core.audit import shown_path
from safehaven.core.files import shred_file, shred_tree
from safehaven.core.home import Home
from safehaven.core.keys import Key, KeyRing
from safehaven.core.schema import OUTPUT_COUNTS
from safehaven.core.sql import q
from safehaven.core.store import COUNTS_ZONE, SimulatedCrash, Store, table_exists
from safehaven.dispose.certificate import build_certificate, ensure_tables, record_certificate
from safehaven.dispose.found import (
    file_entry,
    folder_in_place,
    not_a_link,
    planned_in_place,
    unreadable_refused,
    waiting_by_sha,
)
from safehaven.dispose.journal import count, journal_path, now, save_journal
from safehaven.dispose.model import PROGRESS, DisposalError, Plan
from safehaven.dispose.vault_sets import dispose_vault, disposed_people, drop_vault_sets, load_batches
from safehaven.intake.contracts import Contract, ContractRegistry
from safehaven.intake.ingest import BATCHES
from safehaven.protect.haven import haven_key
from safehaven.protect.pseudonymise import install_key
from safehaven.share import review

#: The crash point prefix that stops a rebuild inside ``Store.rebuild`` (tests only).
REBUILD_CRASH = "rebuild:"


@dataclass
class Run:
    """One disposal carried out from its journal, step by step; ``crash_after`` (tests) stops at a point."""

    home: Home
    journal: dict[str, Any]
    registry: ContractRegistry
    keyring: KeyRing
    crash_after: str | None = None
    plan: Plan = field(init=False)
    store: Store = field(init=False)

    def __post_init__(self) -> None:
        self.plan = Plan.from_dict(self.journal["plan"])
        self.store = Store(self.home, self.keyring)

    @property
    def steps(self) -> dict[str, Any]:
        return self.journal["steps"]

    def save(self) -> None:
        save_journal(self.home, self.keyring, self.journal)

    def crash(self, point: str) -> None:
        if self.crash_after == point:
            raise SimulatedCrash(f"simulated crash after {point}")

    def done(self, step: str, detail: dict[str, Any]) -> None:
        self.steps[step] = {"done_at": now(), **detail}
        self.save()

    def run(self) -> dict[str, Any]:
        """Every step not yet journalled, then the certificate; the journal is removed at the end."""
        for step, action in (("keys", destroy_keys), ("rows", delete_rows), ("files", shred_files)):
            if step not in self.steps:
                action(self)
        if "rebuild" not in self.steps:
            rebuild_store(self)
        certificate = record(self)
        journal_path(self.home).unlink(missing_ok=True)
        return certificate

    def delete(self, con: duckdb.DuckDBPyConnection) -> None:
        """Step 2's deletion on ``con`` (see :func:`delete_in`)."""
        delete_in(self, con)


# 1. keys: crypto-shredding


def destroy_keys(run: Run) -> None:
    """Overwrite and unlink the agreement keys of the plan (``KeyRing.destroy``)."""
    destroyed = []
    for key in run.plan.keys:
        gone = run.keyring.destroy(key["purpose"]) if run.keyring.exists(key["purpose"]) else None
        destroyed.append({**key, "destroyed_by_this_run": gone is not None})
    run.crash("keys")
    run.done("keys", {"destroyed": destroyed})


# 2. rows: one transaction, its counts committed with it


def _rows_progress(run: Run, con: duckdb.DuckDBPyConnection) -> Any:
    return con.execute(
        f"SELECT detail FROM {PROGRESS} WHERE disposal_id = ? AND step = 'rows'", [run.plan.disposal_id]
    ).fetchone()


def delete_rows(run: Run) -> None:
    """Delete the rows in one transaction, unless a previous attempt committed it (its progress row);
    then withdraw the staged requests of the plan."""
    with run.store.connect() as con:
        ensure_tables(con)
        row = _rows_progress(run, con)
        if row is None:
            delete_in(run, con)
            row = _rows_progress(run, con)
        withdrawn = withdraw_staged(run, con)
    run.crash("rows")
    run.done("rows", {**json.loads(row[0]), "staged_requests_withdrawn": withdrawn})


def withdraw_staged(run: Run, con: duckdb.DuckDBPyConnection) -> list[str]:
    """Withdraw the plan's requests still staged, audited, why ``disposed: <disposal id>``; the ids withdrawn
    by this disposal (run again, the same). Their staged files are shredded by the files step."""
    plan = run.plan
    withdrawn = [
        rid
        for rid in plan.staged_requests
        if review.withdraw_for_disposal(con, rid, by=plan.requested_by, disposal_id=plan.disposal_id)
    ]
    if plan.staged_requests:
        review.export(con, run.home)
    return withdrawn


def delete_in(run: Run, con: duckdb.DuckDBPyConnection) -> None:
    """The rows step on ``con``: deletions and their counts in one transaction (all or nothing)."""
    load_batches(con, run.plan.batch_ids)
    # checked (and recorded on the trail if it never was) before the transaction: found by review
    key = haven_key(con, run.keyring, run.home) if _vaults(run, con) else None
    con.execute("BEGIN TRANSACTION")
    try:
        detail = _delete_all(run, con, key)
        con.execute(
            f"INSERT INTO {PROGRESS} VALUES (?, 'rows', now(), ?)",
            [run.plan.disposal_id, json.dumps(detail, sort_keys=True)],
        )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        drop_vault_sets(con)
        con.execute("DROP TABLE IF EXISTS _disp_batches")


def _vaults(run: Run, con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the disposal removes batches whose collection has landed valid rows (their vault
    entries go too, which needs the haven key): a haven that never pseudonymised makes no key here."""
    collection = run.plan.target.collection or ""
    return bool(run.plan.batch_ids) and table_exists(con, "landing", f"{collection}_valid")


def _delete_all(run: Run, con: duckdb.DuckDBPyConnection, key: Key | None) -> dict[str, Any]:
    """Every deletion of the plan; the step's detail (rows per table, vault data keys destroyed).
    ``key``: the haven key, checked before the transaction (:func:`delete_in`), when batches go."""
    counts: dict[str, int] = {}
    vault_out: dict[str, Any] = {"vault_data_keys": [], "vault_entries_reencrypted": 0}
    if run.plan.batch_ids:
        contract = run.registry.contracts[run.plan.target.collection or ""]
        if key is not None:  # _vaults: the collection has landed valid rows
            vault_out = _delete_vault(run, con, contract, counts, key)
        counts.update(_delete_batches(run, con, contract.collection))
        counts.update(_drop_counts(con))
    counts.update(_drop_release_tables(con, run.plan.release_tables))
    return {
        "rows": counts,
        "vault_data_keys_destroyed": vault_out["vault_data_keys"],
        "vault_entries_reencrypted": int(vault_out["vault_entries_reencrypted"]),
    }


def _delete_vault(
    run: Run, con: duckdb.DuckDBPyConnection, contract: Contract, counts: dict[str, int], key: Key
) -> dict[str, Any]:
    """The vault entries and data keys only the disposed records needed, and practice registrations."""
    install_key(con, "haven", key)
    disposed_people(con, contract)
    out = dispose_vault(con, run.registry, run.keyring, run.home)
    counts["vault.identity"] = int(out["vault.identity"])
    counts["vault.data_keys"] = len(out["vault_data_keys"])
    counts.update(_registrations(con, contract, run.registry.contracts.values()))
    return out


def _delete_batches(run: Run, con: duckdb.DuckDBPyConnection, collection: str) -> dict[str, int]:
    """The disposed batches' rows in the vault batch list and every landing and haven table; tombstones."""
    disposed = "(SELECT batch_id FROM _disp_batches)"
    counts: dict[str, int] = {}
    if table_exists(con, "vault", "batches"):
        counts["vault.batches"] = count(con, f"DELETE FROM vault.batches WHERE batch_id IN {disposed}")
    for schema, table in _batch_tables(run, con, collection):
        counts[f"{schema}.{table}"] = count(con, f"DELETE FROM {schema}.{q(table)} WHERE _batch IN {disposed}")
    counts["governance.batches (marked disposed)"] = count(
        con, f"UPDATE {BATCHES} SET status = 'disposed' WHERE batch_id IN {disposed}"
    )
    return counts


def _drop_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Every output's true counts (``safehaven.publish.counting``), which the deleted rows may be in:
    dropped with their fingerprints, so the next run counts them again from the haven that remains."""
    counts: dict[str, int] = {}
    tables = con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() AND schema_name = ?",
        [COUNTS_ZONE],
    ).fetchall()
    for (table,) in tables:
        counts[f"{COUNTS_ZONE}.{table}"] = count(con, f"SELECT count(*) FROM {COUNTS_ZONE}.{q(table)}")
        con.execute(f"DROP TABLE {COUNTS_ZONE}.{q(table)}")
    if table_exists(con, *OUTPUT_COUNTS.split(".")):
        con.execute(f"DELETE FROM {OUTPUT_COUNTS}")
    return counts


def _drop_release_tables(con: duckdb.DuckDBPyConnection, tables: list[str]) -> dict[str, int]:
    """Drop the release-zone tables of the plan; their row counts."""
    counts: dict[str, int] = {}
    for table in tables:
        if table_exists(con, "release", table):
            counts[f"release.{table}"] = count(con, f"SELECT count(*) FROM release.{q(table)}")
            con.execute(f"DROP TABLE release.{q(table)}")
    return counts


def _batch_tables(run: Run, con: duckdb.DuckDBPyConnection, collection: str) -> list[tuple[str, str]]:
    """Every landing and haven table of ``collection`` that records its batch (raw, valid, rejected, haven)."""
    others = [c for c in run.registry.contracts if c != collection and c.startswith(collection + "_")]
    rows = con.execute(
        "SELECT t.table_schema, t.table_name FROM information_schema.tables t JOIN information_schema.columns c "
        "USING (table_catalog, table_schema, table_name) WHERE t.table_catalog = current_database() "
        "AND t.table_schema IN ('landing', 'haven') AND t.table_type = 'BASE TABLE' AND c.column_name = '_batch' "
        "AND (t.table_name = ? OR starts_with(t.table_name, ?)) ORDER BY 1, 2",
        [collection, collection + "_"],
    ).fetchall()
    return [(s, t) for s, t in rows if not any(t == o or t.startswith(o + "_") for o in others)]


def _registrations(con: duckdb.DuckDBPyConnection, contract: Contract, contracts: Iterable[Contract]) -> dict[str, int]:
    """GP practice registrations learned only from the disposed records (list sizes of the
    objection monitor): a disposed person's (practice, pid) pair goes unless a kept record of any
    collection with a practice field still shows it (a pair is recorded once, under the
    collection that showed it first, so its tag alone cannot say what still backs it)."""
    if not contract.practice_field or not table_exists(con, "governance", "practice_registrations"):
        return {}
    kept = [
        _kept_pairs_sql(c, disposed=c.collection == contract.collection)
        for c in contracts
        if c.practice_field and table_exists(con, "landing", f"{c.collection}_valid")
    ]
    n = count(
        con,
        "DELETE FROM governance.practice_registrations WHERE pid IN (SELECT pid FROM _disp_ids) "
        f"AND (practice, pid) NOT IN ({' UNION '.join(kept)})",
    )
    return {"governance.practice_registrations": n}


def _kept_pairs_sql(contract: Contract, *, disposed: bool) -> str:
    """SELECT (practice, pid) of the disposed people in ``contract``'s kept valid records (the
    disposed batches left out when ``disposed``: they are the collection being disposed of)."""
    practice, nhs = q(str(contract.practice_field)), q(contract.patient_key)
    where = " WHERE v._batch NOT IN (SELECT batch_id FROM _disp_batches)" if disposed else ""
    return (
        f"SELECT DISTINCT v.{practice}, i.pid FROM landing.{q(contract.collection + '_valid')} v "
        f"JOIN _disp_ids i ON i.nhs = v.{nhs}{where}"
    )


# 3. files: plain copies overwritten and unlinked


#: the files step's journal of its own progress: what it has shredded so far, so a resumed step
#: certifies a copy an interrupted attempt destroyed, and every file of a folder it emptied
PROGRESS_KEY = "files_progress"

#: the kinds of planned file the haven wrote itself (a release, a staged request): re-checked in
#: place before each is shredded (``found.planned_in_place``)
WRITTEN = ("release", "staged")
#: the breach kind of planned files the haven wrote, gone at the files step unaccounted for
FILE_UNACCOUNTED = reg.DISPOSAL_FILE_UNACCOUNTED
#: the audit action that records that breach (object ``disposal:<id>``)
UNACCOUNTED_ACTION = "dispose.files_unaccounted"


def _progress(run: Run) -> dict[str, Any]:
    return run.journal.setdefault(PROGRESS_KEY, {"shredded": [], "found_after_plan": []})


def _shred_folder(run: Run, folder: Path) -> None:
    """Shred every file under ``folder`` (written there since the plan, too) and remove its
    directories; each file is journalled by its shown path (a quarantined folder holds a
    sender's names) before it is shredded."""
    rel = folder.relative_to(run.home.root)
    kind = "quarantine" if rel.parts[0] == run.home.quarantine.name else "release"
    listed = _progress(run)["found_after_plan"]

    def before(path: Path) -> None:
        if kind != "quarantine":  # a link in a folder the haven wrote, since the plan (CoP 49)
            not_a_link(run.home, path)
        entry = {**file_entry(run.home, path, kind), "path": shown_path(str(path.relative_to(run.home.root)))}
        if entry["path"] not in {e["path"] for e in listed}:
            listed.append(entry)
            run.save()

    shred_tree(folder, before=before)


def _planned_file(run: Run, entry: dict[str, Any], waiting: dict[Path, dict[str, list[Path]]]) -> Path | None:
    """The file a planned entry stands for, if it is still there (a copy in incoming/ by its hash,
    from ``waiting``: each folder's files hashed once per step). The folders the haven wrote on the
    way are re-checked first, as at planning: a link in place of one refuses the disposal, never
    walked through (``found.folder_in_place``; a release's or staged request's file itself:
    ``found.planned_in_place``; CoP 49)."""
    path = run.home.root / entry["path"]
    if not folder_in_place(run.home, path.parent):
        return None
    if entry["kind"] == "incoming":
        if path.parent not in waiting:
            waiting[path.parent] = waiting_by_sha(run.home, path.parent)
        copies = waiting[path.parent].get(entry["sha256"], [])
        return copies.pop(0) if copies else None
    if entry["kind"] in WRITTEN:
        return path if planned_in_place(run.home, path, plain=entry["sha256"] is not None) else None
    return path if os.path.lexists(path) else None


def _not_there(run: Run, entry: dict[str, Any], missing: list[str]) -> None:
    """A planned file no longer found, unless this step's own journal says it shredded it (or was
    shredding it: an attempt a crash stopped after the unlink): listed as not found, never
    certified destroyed (CoP 49: the certificate is true). A copy in incoming/ renamed or removed
    by its sender, a quarantined file a person released, a staged request's file shredded
    meanwhile by a withdrawal, rejection or supersession, or one moved out of the haven's reach. None of
    these can be put back, so none refuses: refusing wedged the disposal for ever, with every
    later one waiting behind it (found by review); a file the haven wrote that no haven action
    accounts for is recorded as a breach (:func:`_record_unaccounted`). A link or a file standing
    in the way refuses (:func:`_planned_file`): that a person can clear."""
    progress = _progress(run)
    if entry["path"] == progress.get("shredding"):
        progress["shredded"].append(entry["path"])
    if entry["path"] not in progress["shredded"]:
        missing.append(entry["path"])


def _accounted_for(run: Run, con: duckdb.DuckDBPyConnection, entry: dict[str, Any]) -> bool:
    """Whether a haven action other than this disposal accounts for a planned file gone: only a
    staged request's (``staging/releases/<id>/``, or ``releases/<agreement>/<id>/`` a stopped
    delivery left), when the request was closed or delivered by a person or a run after the plan
    rather than withdrawn by this disposal (``review._discard`` shreds what will never leave;
    delivery moves the files). Nothing but a disposal shreds a release's files, and disposals run
    one at a time (``DisposalPending``), so a release's file gone is never accounted for; nor is
    one a disposal withdrew for itself, whose files only it shreds."""
    if entry["kind"] != "staged":
        return entry["kind"] not in WRITTEN
    try:
        req = review.get(con, Path(entry["path"]).parts[2])
    except (review.ReviewError, IndexError):
        return False
    return req.comment != f"{review.DISPOSED_PREFIX}{run.plan.disposal_id}"


def _record_unaccounted(run: Run, missing: list[str]) -> int | None:
    """Record in the breach register (kind :data:`FILE_UNACCOUNTED`) and the audit trail, once per
    disposal (a resume finds its own record), the planned files the haven wrote that are gone with
    no haven action to account for them (:func:`_accounted_for`): they may have left the haven,
    and the certificate cannot say they were destroyed (CoP 49; found by review). Returns the
    breach id, or None when every file gone is accounted for. The disposal goes on: nothing it
    can do brings them back."""
    entries = {e["path"]: e for e in run.plan.files}
    with run.store.connect() as con:
        lost = [p for p in missing if not _accounted_for(run, con, entries[p])]
        if not lost:
            return None
        recorded = [b for b in reg.breaches(con) if b["kind"] == FILE_UNACCOUNTED and run.plan.disposal_id in b["what"]]
        if recorded:
            return int(recorded[0]["breach_id"])
        shown = sorted(shown_path(p) for p in lost)
        what = (
            f"disposal {run.plan.disposal_id}: {len(lost)} planned file(s) the haven wrote (a release's or a staged "
            "request's) were gone at its files step, and no haven action accounts for them"
        )
        breach_id = reg.record_breach(
            con, kind=FILE_UNACCOUNTED, severity=None, what=what,
            remedial_action="find where the files went (they may have left the haven) and destroy every copy; "
            "the disposal certificate lists them as not found, never destroyed",
            detail={"disposal_id": run.plan.disposal_id, "files": shown},
        )  # fmt: skip
        audit.append(
            con, actor=reg.current_actor(), role="governance", action=UNACCOUNTED_ACTION,
            object=f"disposal:{run.plan.disposal_id}", agreement=run.plan.target.agreement,
            detail={"breach_id": breach_id, "files": shown}, home=run.home, keyring=run.keyring,
        )  # fmt: skip
        reg.export(con, run.home)
    return breach_id


def _shred_planned(run: Run, entry: dict[str, Any], path: Path) -> None:
    """Shred one planned file and journal it as shredded."""
    progress = _progress(run)
    progress["shredding"] = entry["path"]  # gone at a resume: this attempt's unlink (:func:`_not_there`)
    run.save()
    try:
        with unreadable_refused(run.home, path, "overwrite"):
            shred_file(path)
    except DisposalError:  # refused, the file left: one a person then removes is not this attempt's
        del progress["shredding"]
        run.save()
        raise
    progress["shredded"].append(entry["path"])
    run.save()


def _shred_dirs(run: Run) -> None:
    """The planned folders, deepest first, each re-checked in place (``found.folder_in_place``): a
    release's or staged request's by its own path, a quarantined folder by its collection's."""
    for rel in run.plan.dirs:
        folder = run.home.root / rel
        quarantined = folder.relative_to(run.home.root).parts[0] == run.home.quarantine.name
        if not folder_in_place(run.home, folder.parent if quarantined else folder):
            continue
        not_a_link(run.home, folder)  # a quarantined folder linked out since the plan (CoP 49)
        if folder.is_dir():
            with unreadable_refused(run.home, folder, "overwrite the files of"):
                _shred_folder(run, folder)


def shred_files(run: Run) -> None:
    """Overwrite, sync and unlink every planned file, then the planned folders (deepest first).

    The plan was made before it was shown and confirmed, or before a crash (``--resume``, the
    sweep's resume): each file is found again where it was planned, and a link (dangling or not)
    or anything but a folder now standing in place of a folder the haven wrote on its way, or a
    link in place of the file, refuses the disposal (``DisposalError``; :func:`_planned_file`),
    never shredding through it. The journal is kept, so every resume refuses again until a person
    removes it, having put the files back or found them (CoP 49: physical disposal destroys all
    copies). A planned file gone is listed as not found, not certified (:func:`_not_there`); one
    the haven wrote that no haven action accounts for is a breach (:func:`_record_unaccounted`).
    """
    destroyed, missing = 0, []
    waiting: dict[Path, dict[str, list[Path]]] = {}
    for entry in run.plan.files:
        path = _planned_file(run, entry, waiting)
        if path is None:
            _not_there(run, entry, missing)
            continue
        _shred_planned(run, entry, path)
        destroyed += 1
    _shred_dirs(run)
    breach_id = _record_unaccounted(run, missing)
    run.crash("files")
    extra = _progress(run)["found_after_plan"]
    detail = {"shredded_by_this_run": destroyed, "found_after_plan": extra, "not_found": missing}
    run.done("files", {**detail, "unaccounted_breach_id": breach_id})


# 4. rebuild: a fresh store under a fresh key; the old key's bytes destroyed


def rebuild_store(run: Run) -> None:
    """Rebuild the store under a fresh key (once: the old key id is journalled first)."""
    run.store.check()  # completes or undoes an interrupted rebuild
    if "old_store_key_id" not in run.journal:
        run.journal["old_store_key_id"] = run.keyring.get("store").key_id
        run.save()
    old_id = run.journal["old_store_key_id"]
    if run.keyring.get("store").key_id == old_id:
        at = run.crash_after or ""
        crash = at.split(":", 1)[1] if at.startswith(REBUILD_CRASH) else None
        run.store.rebuild(rekey=True, _crash_after=crash)  # raises SimulatedCrash at ``crash``
    run.crash("rebuild")
    # the key ring shredded the old key file as it replaced it; a crash in between left it
    # under ``store.key.retired``, shredded here
    run.keyring.shred_leftovers()
    run.done(
        "rebuild",
        {
            "old_store_key_id": old_id,
            "new_store_key_id": run.keyring.get("store").key_id,
            "old_store_key_overwritten": run.keyring.shreds_replaced_keys(),
        },
    )


# 5. the certificate


def record(run: Run) -> dict[str, Any]:
    """Write the certificate (once) to the register, its export and the audit trail; returns it as stored."""
    cert = build_certificate(run.plan, run.steps)
    with run.store.connect() as con:
        stored = record_certificate(con, run.home, run.keyring, run.plan, cert)
    run.crash("record")
    if "record" not in run.steps:
        run.done("record", {})
    return stored
