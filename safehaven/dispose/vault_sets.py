"""Identity-vault entries of disposed records: which go, which stay, which are encrypted again.

Rule (``safehaven.dispose`` package docstring, "Identity vault entries"; CoP 49: disposal destroys
the data, CoP 27b: the vault keeps what kept records need): the vault holds one encrypted entry
per distinct (pid, field, value) across all collections, so an entry made from a disposed record
may also serve a kept one. For each value of a disposed record: if no kept record has that
person's field, every entry of that (pid, field) goes, with no decryption. If a kept record has
the person's field with another value, the entries of that (pid, field) are decrypted with the
governance lead's vault private key, deleted, and the values still needed are encrypted again
under a fresh data key. Without the private key such a disposal is refused before anything is
changed.
"""

from __future__ import annotations

from typing import Any

import duckdb

from safehaven.core.home import Home
from safehaven.core.keys import VAULT, KeyRing
from safehaven.core.pins import vault_public
from safehaven.core.store import table_exists
from safehaven.dispose.journal import count
from safehaven.dispose.model import DisposalError
from safehaven.intake.contracts import Contract, ContractRegistry
from safehaven.protect import vault
from safehaven.protect.pseudonymise import hmac_sql

#: The temporary tables this module makes (dropped by :func:`drop_vault_sets`).
VAULT_SETS = ("_disp_raw", "_disp_ids", "_keep_raw", "_gone", "_keep_pairs", "_amb")


def load_batches(con: duckdb.DuckDBPyConnection, batch_ids: list[str]) -> None:
    """Temp table ``_disp_batches``: the ids of the batches being disposed of."""
    con.execute("CREATE OR REPLACE TEMP TABLE _disp_batches (batch_id VARCHAR)")
    if batch_ids:
        con.execute("INSERT INTO _disp_batches SELECT unnest(?::VARCHAR[])", [batch_ids])


def disposed_people(con: duckdb.DuckDBPyConnection, contract: Contract) -> None:
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


def vault_sets(con: duckdb.DuckDBPyConnection, registry: ContractRegistry) -> int:
    """Temp tables describing the vault values of the disposed records (after :func:`disposed_people`);
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
    return count(con, "SELECT count(*) FROM vault.identity WHERE (pid, field) IN (SELECT pid, field FROM _amb)")


def needs_vault_key(keyring: KeyRing, entries: int) -> DisposalError:
    """The refusal when telling disposed vault values from kept ones needs the vault private key, which is
    not on this host (planning and the rows step both refuse before anything is changed)."""
    return DisposalError(
        f"{entries} identity-vault entries belong to people whose other records are kept with a different value "
        "of the same field; telling the disposed values apart needs the governance lead's vault key "
        f"({keyring.path(VAULT)}), which is not on this host. Nothing was changed; run the disposal as the "
        "governance lead"
    )


def drop_vault_sets(con: duckdb.DuckDBPyConnection) -> None:
    """Drop the temporary tables of :func:`vault_sets` and :func:`disposed_people`."""
    for t in VAULT_SETS:
        con.execute(f"DROP TABLE IF EXISTS {t}")


def _reencrypt_kept(
    con: duckdb.DuckDBPyConnection, keyring: KeyRing, ambiguous: int, home: Home | None
) -> tuple[int, int]:
    """Decrypt the ambiguous (pid, field) entries, delete them, encrypt the kept values again.

    Returns (entries deleted, entries encrypted again); refused without the vault private key.
    """
    try:
        private = vault.private_key(keyring)
    except vault.VaultError:
        raise needs_vault_key(keyring, ambiguous) from None
    vault.decrypt_table(con, private, "(v.pid, v.field) IN (SELECT pid, field FROM _amb)", "_amb_plain")
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _amb_keep AS SELECT pid, field, value, min(collection) AS collection "
        "FROM _amb_plain WHERE (pid, field, value) IN "
        "(SELECT i.pid, k.field, k.value FROM _keep_raw k JOIN _disp_ids i USING (nhs)) "
        "GROUP BY pid, field, value"
    )
    con.execute("DROP TABLE _amb_plain")
    deleted = count(con, "DELETE FROM vault.identity WHERE (pid, field) IN (SELECT pid, field FROM _amb)")
    con.execute(f"DELETE FROM {vault.SEEN} WHERE (pid, field) IN (SELECT pid, field FROM _amb)")
    public = vault_public(con, keyring, home)  # pinned, as every vault write
    again = vault.encrypt_by_collection(con, "_amb_keep", public)
    con.execute("DROP TABLE _amb_keep")
    return deleted, again


def dispose_vault(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry, keyring: KeyRing, home: Home | None = None
) -> dict[str, Any]:
    """Delete the vault entries the disposed records alone needed, and the data keys left empty.

    Runs inside the caller's transaction, after :func:`disposed_people` and before the landing
    rows are deleted. Kept values encrypted again are wrapped to the pinned vault key
    (``safehaven.core.pins.vault_public``, checked against ``home``'s audit trail).
    """
    out: dict[str, Any] = {"vault.identity": 0, "vault_entries_reencrypted": 0, "vault_data_keys": []}
    if not table_exists(con, "vault", "identity"):
        return out
    ambiguous = vault_sets(con, registry)
    gone = "pid IN (SELECT pid FROM _disp_ids) AND (pid, field) NOT IN (SELECT pid, field FROM _keep_pairs)"
    out["vault.identity"] = count(con, f"DELETE FROM vault.identity WHERE {gone}")
    vault.ensure_tables(con)
    con.execute(f"DELETE FROM {vault.SEEN} WHERE {gone}")  # each entry's digest goes with it
    if ambiguous:
        deleted, again = _reencrypt_kept(con, keyring, ambiguous, home)
        out["vault.identity"] += deleted - again
        out["vault_entries_reencrypted"] += again
    out["vault_data_keys"] = [
        r[0]
        for r in con.execute(
            "DELETE FROM vault.data_keys WHERE dek_id NOT IN (SELECT DISTINCT dek_id FROM vault.identity) "
            "RETURNING dek_id"
        ).fetchall()
    ]
    return out
