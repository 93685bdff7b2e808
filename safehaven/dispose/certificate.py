"""The disposal register and the certificate of each disposal (CoP 48-50; CoP 23d, 32-33 accountability).

Rule (``safehaven.dispose`` package docstring, step 5 "record"): the certificate (what, why, when,
by whom, rows per table, files with their SHA-256, key ids destroyed, old and new store key ids)
goes into ``governance.disposal_register``, ``registers/disposal_register.csv|.parquet`` and the
audit trail (``action="dispose"``), each exactly once even when the step is run again after a
crash. A certificate carries counts, ids, file names and hashes, never a value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb

from safehaven.core import audit, schema
from safehaven.core import registers as reg
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.store import table_exists
from safehaven.dispose.journal import count, now
from safehaven.dispose.model import ACTION, EXPORT_STEM, FINISHED, METHOD, PROGRESS, PURPOSE, REGISTER, RETAINED, Plan


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create the disposal register and the per-step progress table."""
    schema.ensure(con, REGISTER, PROGRESS)


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


def _keys_destroyed(steps: dict[str, Any]) -> list[dict[str, Any]]:
    """Every key the disposal destroyed: agreement salts, vault data keys, the old store key."""
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
    return keys


def build_certificate(plan: Plan, steps: dict[str, Any]) -> dict[str, Any]:
    """The certificate of a disposal whose four steps are journalled in ``steps``."""
    rows = steps["rows"]["rows"]
    # paths as shown names: a copy waiting in incoming/ still has its sender's name (CoP 8a)
    gone = set(steps["files"].get("not_found", []))  # not there at the files step: not certified
    planned = [f for f in plan.files if f["path"] not in gone]
    files = [{**f, "path": audit.shown_path(f["path"])} for f in planned + steps["files"]["found_after_plan"]]
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
        "completed_at": steps.get("record", {}).get("done_at") or now(),
        "batches": plan.batches,
        "releases": plan.release_ids,
        "release_tables_dropped": plan.release_tables,
        "staged_requests": plan.staged_requests,
        "staged_requests_withdrawn": steps["rows"].get("staged_requests_withdrawn", []),
        "rows_by_table": rows,
        "rows_disposed": sum(v for k, v in rows.items() if not k.startswith("governance.batches")),
        "vault_entries_reencrypted": steps["rows"]["vault_entries_reencrypted"],
        "files": files,
        "files_destroyed": len(files),
        # planned files the files step no longer found (a copy its sender renamed or removed, a
        # file shredded meanwhile or by an interrupted attempt, one moved out of the haven's
        # reach: safehaven.dispose.steps._not_there): listed, never certified destroyed
        "files_not_found": sorted(audit.shown_path(p) for p in gone),
        # of those, files the haven wrote that no haven action accounts for: a breach (steps._record_unaccounted)
        "files_unaccounted_breach_id": steps["files"].get("unaccounted_breach_id"),
        "bytes_destroyed": sum(int(f["bytes"]) for f in files),
        "keys_destroyed": _keys_destroyed(steps),
        "store_key_old": steps["rebuild"]["old_store_key_id"],
        "store_key_new": steps["rebuild"]["new_store_key_id"],
        "method": METHOD,
        "retained": RETAINED,
    }


def _register_row(plan: Plan, cert: dict[str, Any]) -> list[Any]:
    """The certificate as a row of ``governance.disposal_register``."""
    t = plan.target
    return [
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
    ]


def _insert_once(con: duckdb.DuckDBPyConnection, plan: Plan, cert: dict[str, Any]) -> None:
    """Insert the certificate into the register unless a previous attempt already did."""
    if count(con, f"SELECT count(*) FROM {REGISTER} WHERE disposal_id = ?", [cert["disposal_id"]]):
        return
    con.execute(
        f"INSERT INTO {REGISTER} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, CAST(? AS TIMESTAMPTZ), "
        "CAST(? AS TIMESTAMPTZ), CAST(? AS TIMESTAMPTZ), CAST(? AS TIMESTAMPTZ), ?, ?, ?, ?, ?, ?, ?, ?, "
        "?, ?, ?)",
        _register_row(plan, cert),
    )


def _audit_once(con: duckdb.DuckDBPyConnection, home: Home, keyring: KeyRing, plan: Plan, cert: dict[str, Any]) -> None:
    """The audit entry ``dispose``/``ok`` of the disposal, unless a previous attempt already wrote it."""
    done = [
        e
        for e in audit.entries_for(con, object_like=f"disposal:{cert['disposal_id']}")
        if e.action == ACTION and e.outcome == FINISHED
    ]
    if done:
        return
    t = plan.target
    audit.append(
        con,
        actor=plan.requested_by,
        role="governance",
        action=ACTION,
        object=f"disposal:{cert['disposal_id']}",
        purpose=PURPOSE,
        agreement=t.agreement,
        outcome=FINISHED,
        home=home,
        keyring=keyring,
        detail={
            "target": t.as_dict(),
            "authorised_by": cert["authorised_by"],
            "batches": [b["batch_id"] for b in cert["batches"]],
            "releases": cert["releases"],
            "staged_requests_withdrawn": cert["staged_requests_withdrawn"],
            "rows_disposed": cert["rows_disposed"],
            "files_destroyed": cert["files_destroyed"],
            "keys_destroyed": [k["key_id"] for k in cert["keys_destroyed"]],
            "store_key_new": cert["store_key_new"],
        },
    )


def certificate_of(con: duckdb.DuckDBPyConnection, disposal_id: str) -> dict[str, Any] | None:
    """The certificate of ``disposal_id`` as the register holds it; None when it has none."""
    if not table_exists(con, *REGISTER.split(".")):
        return None
    stored = con.execute(f"SELECT certificate FROM {REGISTER} WHERE disposal_id = ?", [disposal_id]).fetchone()
    return None if stored is None else json.loads(stored[0])


def record_certificate(
    con: duckdb.DuckDBPyConnection, home: Home, keyring: KeyRing, plan: Plan, cert: dict[str, Any]
) -> dict[str, Any]:
    """Write the certificate (once) to the register, its export and the audit trail; returns it as stored."""
    ensure_tables(con)
    _insert_once(con, plan, cert)
    export_register(con, home)
    _audit_once(con, home, keyring, plan, cert)
    stored = certificate_of(con, cert["disposal_id"])
    assert stored is not None  # inserted above
    return stored
