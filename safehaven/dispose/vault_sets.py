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

A kept record is a remaining landing row of a vaulted batch that was sent: a GP record a type 1
objection in force says should never have been sent (``safehaven.protect.objections.never_sent_sql``)
supports no entry, whether the haven dropped it on entry or purged it later; its landing row stays
until its batch is disposed of, but it keeps no identifier in the vault.

The same sets serve the haven's late type 1 purge (:func:`purge_vault`; guide Rule 4B): the
records it removes are "disposed of" here, row by row instead of batch by batch. It runs in the
nightly pipeline, which holds the vault's public key only, so a (pid, field) with both a purged
and a kept value is not decrypted: its entries are deleted and the kept values, read in clear
from their landing rows, are encrypted again under the public key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import duckdb

from safehaven.core.home import Home
from safehaven.core.keys import VAULT, Key, KeyRing
from safehaven.core.pins import vault_public
from safehaven.core.sql import q
from safehaven.core.store import table_exists
from safehaven.dispose.journal import count
from safehaven.dispose.model import DisposalError
from safehaven.intake import landings
from safehaven.intake.contracts import Contract, ContractRegistry
from safehaven.protect import vault
from safehaven.protect.objections import never_sent_sql
from safehaven.protect.pseudonymise import hmac_sql

#: The temporary tables this module makes (dropped by :func:`drop_vault_sets`).
VAULT_SETS = ("_disp_raw", "_disp_ids", landings.RECEIVED, "_never_sent", "_keep_raw", "_gone", "_keep_pairs", "_amb")
#: the landing rows a disposal disposes of, and those it keeps (over a landing valid table)
DISPOSED = "_batch IN (SELECT batch_id FROM _disp_batches)"
KEPT = "_batch NOT IN (SELECT batch_id FROM _disp_batches)"


def load_batches(con: duckdb.DuckDBPyConnection, batch_ids: list[str]) -> None:
    """Temp table ``_disp_batches``: the ids of the batches being disposed of."""
    con.execute("CREATE OR REPLACE TEMP TABLE _disp_batches (batch_id VARCHAR)")
    if batch_ids:
        con.execute("INSERT INTO _disp_batches SELECT unnest(?::VARCHAR[])", [batch_ids])


def disposed_people(con: duckdb.DuckDBPyConnection, contract: Contract, disposed: str = DISPOSED) -> None:
    """Temp tables ``_disp_raw`` (nhs, field, value) of the vault fields of the disposed records
    (the rows of ``contract``'s landing valid table matching ``disposed``: by default the batches in
    ``_disp_batches``) and ``_disp_ids`` (nhs, pid) of their people. Needs the haven key installed
    as ``haven``."""
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _disp_raw AS SELECT DISTINCT * FROM ({vault.unpivot_sql(contract, disposed)})"
    )
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _disp_ids AS SELECT nhs, {hmac_sql('nhs', 'haven')} AS pid "
        "FROM (SELECT DISTINCT nhs FROM _disp_raw WHERE nhs IS NOT NULL)"
    )


def never_sent(con: duckdb.DuckDBPyConnection, contracts: Iterable[Contract], home: Home | None = None) -> None:
    """Temp table ``_never_sent`` (_batch, _row): the GP landing rows of the people in ``_disp_ids``
    that a type 1 objection says should never have been sent (module docstring), of every GP-sourced
    collection with a landing valid table: by the haven's late purge's rule, each batch landed as
    the audit trail records it (``safehaven.intake.landings.load_received``, with ``home``'s audit key)."""
    gp = [c for c in contracts if c.practice_field and table_exists(con, "landing", f"{c.collection}_valid")]
    parts = [
        f"SELECT l._batch, l._row, i.pid FROM landing.{q(c.collection + '_valid')} l "
        f"JOIN _disp_ids i ON i.nhs = l.{q(c.patient_key)}"
        for c in gp
    ]
    rows = " UNION ALL ".join(parts) or "SELECT NULL::VARCHAR AS _batch, NULL::BIGINT AS _row, NULL AS pid WHERE false"
    received = landings.load_received(con, [c.collection for c in gp], home)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _never_sent AS SELECT _batch, _row FROM ({never_sent_sql(rows, received)})"
    )


def vault_sets(
    con: duckdb.DuckDBPyConnection, contracts: Iterable[Contract], kept_rows: str = KEPT, home: Home | None = None
) -> int:
    """Temp tables describing the vault values of the disposed records (after :func:`disposed_people`);
    returns the number of vault entries that need the vault private key to be disposed of precisely.

    ``_keep_raw`` (nhs, field, value, collection) still needed by kept records (landing rows
    matching ``kept_rows``, by default those of batches not disposed of, less the never-sent ones:
    :func:`never_sent`) of vaulted batches of any collection; ``_gone`` (pid, field, value) needed
    no more; ``_keep_pairs`` (pid, field) with some value still needed; ``_amb`` the (pid, field)
    pairs with both.
    """
    contracts = list(contracts)
    never_sent(con, contracts, home)
    kept = vault.vaulted_values_sql(
        con, contracts, f"({kept_rows}) AND (_batch, _row) NOT IN (SELECT _batch, _row FROM _never_sent)"
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


def _replace_ambiguous(con: duckdb.DuckDBPyConnection, public: Key) -> tuple[int, int]:
    """Delete the entries of the ambiguous (pid, field) pairs with their digests, and encrypt the
    values still needed (``_amb_keep``: pid, field, value, collection) again; returns (entries
    deleted, entries encrypted again)."""
    deleted = count(con, "DELETE FROM vault.identity WHERE (pid, field) IN (SELECT pid, field FROM _amb)")
    con.execute(f"DELETE FROM {vault.SEEN} WHERE (pid, field) IN (SELECT pid, field FROM _amb)")
    again = vault.encrypt_by_collection(con, "_amb_keep", public)
    con.execute("DROP TABLE _amb_keep")
    return deleted, again


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
    return _replace_ambiguous(con, vault_public(con, keyring, home))  # pinned, as every vault write


def _reencrypt_from_landing(con: duckdb.DuckDBPyConnection, public: Key) -> tuple[int, int]:
    """The late purge's ambiguous pairs (module docstring): the kept values are read in clear from
    their landing rows (``_keep_raw``), never decrypted, and encrypted again under ``public``."""
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _amb_keep AS SELECT i.pid, k.field, k.value, min(k.collection) AS collection "
        "FROM _keep_raw k JOIN _disp_ids i USING (nhs) WHERE (i.pid, k.field) IN (SELECT pid, field FROM _amb) "
        "GROUP BY i.pid, k.field, k.value"
    )
    return _replace_ambiguous(con, public)


def _remove_unsupported(
    con: duckdb.DuckDBPyConnection,
    contracts: Iterable[Contract],
    kept_rows: str,
    reencrypt: Callable[[int], tuple[int, int]],
    home: Home | None = None,
) -> dict[str, Any]:
    """Delete the vault entries (and digests) of the disposed people (``_disp_ids``) no kept record
    supports; ``reencrypt`` handles the ambiguous pairs (:func:`vault_sets`), given their number.
    Then the data keys left with no entry go."""
    out: dict[str, Any] = {"vault.identity": 0, "vault_entries_reencrypted": 0, "vault_data_keys": []}
    ambiguous = vault_sets(con, contracts, kept_rows, home)
    gone = "pid IN (SELECT pid FROM _disp_ids) AND (pid, field) NOT IN (SELECT pid, field FROM _keep_pairs)"
    out["vault.identity"] = count(con, f"DELETE FROM vault.identity WHERE {gone}")
    vault.ensure_tables(con)
    con.execute(f"DELETE FROM {vault.SEEN} WHERE {gone}")  # each entry's digest goes with it
    if ambiguous:
        deleted, again = reencrypt(ambiguous)
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


def dispose_vault(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry, keyring: KeyRing, home: Home | None = None
) -> dict[str, Any]:
    """Delete the vault entries the disposed records alone needed, and the data keys left empty.

    Runs inside the caller's transaction, after :func:`disposed_people` and before the landing
    rows are deleted. Kept values encrypted again are wrapped to the pinned vault key
    (``safehaven.core.pins.vault_public``, checked against ``home``'s audit trail).
    """
    if not table_exists(con, "vault", "identity"):
        return {"vault.identity": 0, "vault_entries_reencrypted": 0, "vault_data_keys": []}
    return _remove_unsupported(
        con, registry.contracts.values(), KEPT, lambda ambiguous: _reencrypt_kept(con, keyring, ambiguous, home), home
    )


def purge_vault(
    con: duckdb.DuckDBPyConnection,
    contract: Contract,
    contracts: Iterable[Contract],
    purged: str,
    public: Callable[[], Key],
) -> int:
    """Delete the vault entries and digests that only the records of ``purged`` supported: the
    late type 1 purge's records (``safehaven.protect.haven.purge_late_type1``; guide Rule 4B),
    a relation (_batch, _row) of ``contract``'s records. Returns the number of entries removed.

    The purged records are never-sent (:func:`never_sent`), so every other landing row of a
    vaulted batch is kept; an entry one of them also supports stays (of any collection: the vault
    is shared). ``public`` gives the vault public key, asked for only when a (pid, field) has both a
    purged and a kept value (module docstring). Runs inside the caller's transaction; needs the
    haven key installed as ``haven``.
    """
    if not table_exists(con, "vault", "identity"):
        return 0
    disposed_people(con, contract, f"(_batch, _row) IN (SELECT _batch, _row FROM ({purged}))")
    out = _remove_unsupported(con, contracts, "true", lambda _n: _reencrypt_from_landing(con, public()))
    drop_vault_sets(con)
    return int(out["vault.identity"])
