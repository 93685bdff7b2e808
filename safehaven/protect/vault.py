"""The identity vault: direct identifiers held apart, encrypted, writable but not readable by the pipeline.

Rules (``docs/rules.md`` "Pseudonymisation and encryption" and "Identifiability levels"; CoP 8a, 27b-c;
confidentiality guide Rule 3):

* Haven content tables hold no direct identifier (``safehaven.protect.pseudonymise``). The full
  values a re-identification may lawfully need, the canonical NHS number, the full date of
  birth and the full postcode, are split off into ``vault.identity``: one row per distinct
  (person, field, value), added incrementally as batches arrive, keyed by the haven pid.
* Each value is encrypted with AES-256-GCM. Its associated data binds the ciphertext to its
  row: ``AD = pid | field | data key id``, so a ciphertext copied or moved to another row
  (another person or another field) fails authentication instead of decrypting to a wrong
  identity.
* **Role separation by envelope encryption.** "The governance lead holds the vault key, the
  pipeline the haven key." Each vault write uses a fresh random 256-bit data key; the data
  key is wrapped to the vault's X25519 *public* key (ECIES: an ephemeral X25519 key pair,
  ECDH, HKDF-SHA256 over the shared secret bound to both public keys, AES-256-GCM over the
  data key) and kept only in wrapped form in ``vault.data_keys``. The pipeline holds only
  ``keys/vault.pub``, pinned to the store's vault epoch and to the audit trail's record of the
  vault key (``safehaven.core.pins.vault_public``):
  it can add entries and can never read one back. The private half ``keys/vault.key`` is
  sealed under the key custodian's passphrase (``safehaven.core.keys``) and opened only by
  :func:`private_key` for a custodian command (re-identification, subject access, an
  identifiable release, rotation), each audited. Rotating the vault key re-wraps the data keys
  only, not every entry.
* AES-GCM has no DuckDB SQL primitive (DuckDB's own encryption covers whole database files),
  so encryption is the one place values pass through Python: once per distinct
  (person, field, value), never per record. Candidates are chosen, de-duplicated and keyed in
  DuckDB SQL, which also lays out each plaintext and associated data as bytes; Python makes
  one ``AESGCM.encrypt`` call per entry (measured about 1.7M/s on one core: the calls hold
  the GIL, so a second thread does not help) and the results go back through Arrow, where
  DuckDB inserts one batch while Python encrypts the next (:func:`_encrypt_and_insert`).
* GP records about a person with a type 1 objection in force should never have been sent
  (``safehaven.protect.objections.never_sent_sql``); identifiers from them are not vaulted, and
  none stays vaulted for them: when the objection reaches the haven after the records, the
  haven's late purge removes, in its own transaction, the entries and digests only those records
  supported (``safehaven.protect.haven.purge_late_type1``, ``safehaven.dispose.vault_sets.purge_vault``).
  Their landing rows stay until their batch is disposed of, as those of records dropped on entry
  do, but they support no entry (``safehaven.dispose.vault_sets.never_sent``).
* Incremental and idempotent: a batch is vaulted once (``vault.batches``); a value already
  vaulted from an earlier batch is not added again.
* **Values already vaulted are found by a keyed lookup, not by re-reading history** (issue 22).
  ``vault.seen`` holds, for every entry, its (pid, field) and a 128-bit digest of
  ``pid | field | value`` keyed with a lookup key derived from the haven key
  (HMAC-SHA256(haven key, ``LOOKUP_LABEL``), computed in SQL from the installed key). A night
  digests only its own candidates and anti-joins them with that one narrow column; before,
  it unpivoted every landed row of every vaulted batch, so its cost grew with the history.
  The digest is MD5 over the secret lookup key and the entry (``md5_number``, about twice as
  fast as SHA-256 in DuckDB, measured here): it is compared only inside the encrypted store,
  and without the haven key a value cannot be tested against it. The pipeline, which holds
  the haven key, could test guesses against it (a date of birth in well under a second), but
  the landing zone of the same store holds those values in clear for as long as the records
  they came from are kept: the digest reveals nothing the pipeline cannot read. **This rests
  on landing rows living as long as their vault entries** (disposal removes both together);
  a rule that purged landing rows earlier would have to drop or re-key their digests too.
  Every write of an entry writes its digest (``encrypt_entries``) and every deletion deletes
  it (disposal and the late type 1 purge, ``safehaven.dispose.vault_sets``; haven-key rotation,
  :func:`reencrypt`, which digests again under the new key). The late purge removes entries
  and digests while the landing rows they came from stay: the safe direction of this rule. A
  store whose digests are missing (made before them, or emptied) has them rebuilt once from the
  landed values of its vaulted batches, erring towards a value vaulted twice rather than one not
  vaulted (:func:`_backfill_seen`).
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import duckdb
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from safehaven.core import compaction, schema
from safehaven.core.keys import VAULT, Key, KeyRing, key_id, x25519_public
from safehaven.core.sql import lit, q
from safehaven.core.store import atomic, table_exists, transaction
from safehaven.intake.contracts import Contract
from safehaven.intake.ingest import BATCHES
from safehaven.protect.objections import ever_type1_objectors_sql, type1_objectors_sql
from safehaven.protect.pseudonymise import haven_coarsening, hmac_sql

if TYPE_CHECKING:
    import pyarrow as pa

IDENTITY = schema.VAULT_IDENTITY
DATA_KEYS = schema.VAULT_DATA_KEYS
VAULTED = schema.VAULT_BATCHES
SEEN = schema.VAULT_SEEN
#: the label the vault's lookup key is derived under from the haven key (module docstring)
LOOKUP_LABEL = "safehaven vault lookup v1"
WRAP_INFO = b"safehaven vault key wrap v1"
NONCE = 12


class VaultError(Exception):
    """The vault cannot do what was asked; never carries a value or key material."""


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    schema.ensure(con, DATA_KEYS, IDENTITY, SEEN, VAULTED)


def vault_fields(contract: Contract) -> list[str]:
    """Fields whose full value goes to the vault: the patient key, other direct identifiers,
    and the quasi-identifiers the haven coarsens (full date of birth, full postcode)."""
    names = [contract.patient_key]
    for spec in contract.fields:
        if spec.name in names:
            continue
        if spec.identifiability == "direct_identifier" or haven_coarsening(spec):
            names.append(spec.name)
    return names


def _ad_sql(pid: str, field_name: str, dek_id: str) -> str:
    """SQL for an entry's associated data, ``pid | field | data key id`` as bytes (the one layout):
    arguments are SQL expressions (columns or ``?``), used to encrypt and to decrypt alike."""
    return f"encode({pid} || '|' || {field_name} || '|' || {dek_id})"


def _wrap_ad(dek_id: str, vault_key_id: str) -> bytes:
    """Associated data of a wrapped data key: ``data key id | vault key id``, binding it to both."""
    return f"{dek_id}|{vault_key_id}".encode()


# --- wrapping data keys (ECIES over X25519) -------------------------------------------


def _kek(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=eph_pub + recipient_pub, info=WRAP_INFO).derive(shared)


def wrap(dek: bytes, dek_id: str, public: Key) -> tuple[bytes, bytes, bytes]:
    """Wrap a data key to the vault public key: returns (ephemeral public, nonce, wrapped)."""
    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    shared = eph.exchange(X25519PublicKey.from_public_bytes(public.material))
    nonce = os.urandom(NONCE)
    ad = _wrap_ad(dek_id, key_id(public.material))
    wrapped = AESGCM(_kek(shared, eph_pub, public.material)).encrypt(nonce, dek, ad)
    return eph_pub, nonce, wrapped


def unwrap(private: Key, vault_key_id: str, dek_id: str, eph_pub: bytes, nonce: bytes, wrapped: bytes) -> bytes:
    """Unwrap a data key with the vault private key (governance lead only)."""
    pub = x25519_public(private.material)
    if key_id(pub) != vault_key_id:
        raise VaultError(f"data key {dek_id} is wrapped to vault key {vault_key_id}, not {key_id(pub)}")
    shared = X25519PrivateKey.from_private_bytes(private.material).exchange(X25519PublicKey.from_public_bytes(eph_pub))
    try:
        return AESGCM(_kek(shared, eph_pub, pub)).decrypt(nonce, wrapped, _wrap_ad(dek_id, vault_key_id))
    except InvalidTag:
        raise VaultError(f"data key {dek_id} does not unwrap: tampered, or not for this vault key") from None


# --- the lookup of values already vaulted -----------------------------------------------


def lookup_sql(pid: str, field_name: str, value: str, key: str = "haven") -> str:
    """SQL: an entry's lookup digest (module docstring): MD5 over the lookup key derived from the
    installed HMAC key ``key`` and ``pid | field | value``; arguments are SQL expressions."""
    derived = f"(SELECT unhex(sha256(opad || unhex(sha256(ipad || encode({lit(LOOKUP_LABEL)}))))) FROM _hmac_{key})"
    return f"md5_number({derived} || encode({pid} || '|' || {field_name} || '|' || {value}))"


def remember(con: duckdb.DuckDBPyConnection, table: str) -> None:
    """Add the digests of the entries of ``table`` (pid, field, value, lookup) to ``vault.seen``:
    every table of entries carries its ``lookup`` column, made once by :func:`lookup_sql`."""
    con.execute(f"INSERT INTO {SEEN} SELECT pid, field, lookup FROM {table}")


def _backfill_seen(con: duckdb.DuckDBPyConnection, contracts: Iterable[Contract]) -> None:
    """Rebuild missing digests once (module docstring): when the vault holds entries and
    ``vault.seen`` none, digest the landed values of every vaulted batch that can be in the vault.

    Without the vault private key the entries cannot be read, so the rebuild errs towards a
    value vaulted twice, never towards a value not vaulted: it leaves out the GP values of
    anyone with a type 1 objection ever recorded (such values were not vaulted while it was in
    force) and any value of a (pid, field) with no entry at all.
    """
    held, seen = con.execute(f"SELECT (SELECT count(*) FROM {IDENTITY}), (SELECT count(*) FROM {SEEN})").fetchone()
    parts = [
        f"SELECT nhs, field, value, {bool(c.practice_field)} AS gp FROM ({unpivot_sql(c, _vaulted_where(c))})"
        for c in contracts
        if table_exists(con, "landing", f"{c.collection}_valid")
    ]
    if held == 0 or seen > 0 or not parts:
        return
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _vault_old AS SELECT DISTINCT * FROM ({' UNION ALL '.join(parts)}) "
        "WHERE nhs IS NOT NULL"
    )
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _vault_old_ids AS SELECT nhs, {hmac_sql('nhs', 'haven')} AS pid "
        "FROM (SELECT DISTINCT nhs FROM _vault_old)"
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _vault_old_entries AS SELECT pid, field, "
        f"{lookup_sql('pid', 'field', 'value')} AS lookup FROM (SELECT DISTINCT i.pid, o.field, o.value "
        "FROM _vault_old o JOIN _vault_old_ids i USING (nhs) "
        f"WHERE NOT (o.gp AND i.pid IN ({ever_type1_objectors_sql()})) "
        f"AND (i.pid, o.field) IN (SELECT pid, field FROM {IDENTITY}))"
    )
    remember(con, "_vault_old_entries")
    for t in ("_vault_old_entries", "_vault_old_ids", "_vault_old"):
        con.execute(f"DROP TABLE {t}")


#: the comment ``vault.identity`` carries once its columns are as declared (:func:`_random_bytes_as_declared`)
RANDOM_BYTES_MARK = compaction.RANDOM_BYTES_MARK


def _random_bytes_as_declared(con: duckdb.DuckDBPyConnection) -> bool:
    """Copy ``vault.identity`` once into a table of its declared shape, unless it says it is one.

    A store made before ``schema.RANDOM_BYTES`` keeps the compression its table was created with
    (DuckDB fixes it then, and a rebuild copies the table as it is), so its vault writes would stay
    slow (issue 22). DuckDB shows a column's declared compression nowhere (not in
    ``duckdb_columns``, nor in the table's SQL), and how its segments happen to be stored does not
    tell it either: random bytes are often stored uncompressed under the old declaration too
    (found by review). So the table carries :data:`RANDOM_BYTES_MARK` as its comment, which
    survives a rebuild; a table without it has its rows copied, unchanged, into a new table of the
    declared shape that replaces it, in the caller's transaction (or one of its own). A new
    store's empty table is marked so by its first vault write. Returns whether it copied.

    The copy is ``safehaven.core.compaction.remake_as_declared`` (as compaction remakes the table):
    nothing is left behind, and no table anyone else left in the vault zone stands in its way."""
    zone, name = IDENTITY.split(".")
    comment = con.execute(
        "SELECT comment FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = ? AND table_name = ?",
        [zone, name],
    ).fetchone()
    if comment is not None and comment[0] == RANDOM_BYTES_MARK:
        return False
    with atomic(con):
        compaction.remake_as_declared(con, IDENTITY)
    return True


def _vaulted_where(contract: Contract) -> str:
    """SQL condition over a landing valid table: the row is of a vaulted batch of ``contract``."""
    return f"_batch IN (SELECT batch_id FROM {VAULTED} WHERE collection = {lit(contract.collection)})"


# --- writing ---------------------------------------------------------------------------


#: entries encrypted per batch in :func:`encrypt_entries`: a batch's plaintexts, associated data and
#: ciphertexts are Python objects (about 250 bytes an entry), so a night's 2.6M entries at the
#: benchmark's scale held about 700 MB of them at once; a batch holds about 30 MB (issue 22)
ENCRYPT_BATCH = 1 << 17


def encrypt_entries(con: duckdb.DuckDBPyConnection, table: str, public: Key, collection: str) -> int:
    """Encrypt rows ``(pid, field, value, lookup)`` of temp ``table`` into the vault under one new
    data key, and keep each entry's lookup digest (module docstring).

    DuckDB prepares each entry's plaintext and associated data as bytes (``_ad_sql``), so the
    only per-entry Python is the AES-GCM call itself (see the module docstring), over distinct
    entries only, ``ENCRYPT_BATCH`` at a time (:func:`_encrypt_and_insert`). Nonces are 96 random
    bits each from ``os.urandom``; with a fresh data key per write that is far inside the 2^32
    invocations NIST SP 800-38D section 8.3 allows per key. All or nothing (``store.atomic``: the
    caller's transaction, else one of its own): the data key's row counts every entry, and a
    write stopped between batches leaves none of them (found by review).
    """
    dek_id = secrets.token_hex(8)
    arrow = con.execute(
        f"SELECT pid, field, encode(value) AS plain, {_ad_sql('pid', 'field', '?')} AS ad FROM {table}",
        [dek_id],
    ).fetch_arrow_table()
    n = arrow.num_rows
    if n == 0:
        return 0
    dek = AESGCM.generate_key(bit_length=256)
    eph_pub, wrap_nonce, wrapped = wrap(dek, dek_id, public)
    with atomic(con):
        con.execute(
            f"INSERT INTO {DATA_KEYS} VALUES (?, ?, ?, ?, ?, now(), ?)",
            [dek_id, key_id(public.material), eph_pub, wrap_nonce, wrapped, n],
        )
        _encrypt_and_insert(con, AESGCM(dek), arrow, dek_id, collection)
        remember(con, table)
    return n


def _encrypt_and_insert(
    con: duckdb.DuckDBPyConnection, aead: AESGCM, arrow: pa.Table, dek_id: str, collection: str
) -> None:
    """Encrypt ``arrow``'s entries (pid, field, plain, ad) a batch at a time and add each batch to
    the vault, the insert of one batch overlapping the encryption of the next (issue 22).

    The encryption is Python holding the GIL (module docstring); DuckDB releases it while it
    inserts, so one thread inserts batch i while this one encrypts batch i + 1: at the benchmark's
    2.5M GP entries the inserts (about 3.5 s, one core) ran beside the encryption (about 3.7 s)
    instead of after it. Only one thread uses ``con`` at a time: a batch is handed over only once
    the previous insert has ended. When this raises (a failure, an interrupt), the inserter is told
    to start nothing more and is waited for, whatever further interrupts arrive (:func:`_wait_out`),
    so the caller's rollback never runs beside an insert, nor before one that would then commit
    alone with no data key (found by review: a second Ctrl-C had cut the wait short).
    """
    stop = threading.Event()
    inserter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vault-insert")
    pending: Future[None] | None = None
    try:
        for start in range(0, arrow.num_rows, ENCRYPT_BATCH):
            rows = _encrypted(aead, arrow.slice(start, ENCRYPT_BATCH))
            if pending is not None:
                pending.result()
            pending = inserter.submit(_insert_rows, con, rows, dek_id, collection, stop)
        if pending is not None:
            pending.result()
    except BaseException:
        stop.set()
        _wait_out(pending)
        raise
    finally:
        inserter.shutdown(wait=False)


def _wait_out(pending: Future[None] | None) -> None:
    """Return only once ``pending`` has ended: an interrupt arriving meanwhile is dropped, the
    exception already on its way out (the reason to stop) is raised by the caller after."""
    while pending is not None and not pending.done():
        try:
            wait([pending])
        except BaseException:  # a second Ctrl-C must not cut the wait short
            continue


def _encrypted(aead: AESGCM, part: pa.Table) -> pa.Table:
    """One batch of entries (``part``: pid, field, plain, ad) encrypted: (pid, field, nonce, ciphertext)."""
    import pyarrow as pa  # here: only the vault's encryption needs it, not loading the code location (issue 22)

    n = part.num_rows
    pool = os.urandom(NONCE * n)
    nonces = [pool[i : i + NONCE] for i in range(0, NONCE * n, NONCE)]
    plain, ad = part.column("plain").to_pylist(), part.column("ad").to_pylist()
    ciphertexts = pa.array(list(map(aead.encrypt, nonces, plain, ad)), pa.binary())
    del nonces, plain, ad
    return pa.table(
        {
            "pid": part.column("pid"),
            "field": part.column("field"),
            "nonce": pa.FixedSizeBinaryArray.from_buffers(pa.binary(NONCE), n, [None, pa.py_buffer(pool)]),
            "ciphertext": ciphertexts,
        }
    )


def _insert_rows(
    con: duckdb.DuckDBPyConnection, rows: pa.Table, dek_id: str, collection: str, stop: threading.Event
) -> None:
    """Add one encrypted batch (:func:`_encrypted`) to the vault under data key ``dek_id``, unless
    the write was given up (``stop``: :func:`_encrypt_and_insert`)."""
    if stop.is_set():
        return
    con.register("_vault_rows", rows)
    try:
        con.execute(
            f"INSERT INTO {IDENTITY} SELECT pid, field, nonce, ciphertext, ?, ?, now() FROM _vault_rows",
            [dek_id, collection],
        )
    finally:
        con.unregister("_vault_rows")


def unpivot_sql(contract: Contract, where: str) -> str:
    """SQL (nhs, field, value): the vault fields of the rows of ``contract``'s landing valid table
    matching ``where``, one row per non-null field (the one place the vault reads landing rows)."""
    nhs = q(contract.patient_key)
    parts = [
        f"SELECT {nhs} AS nhs, {lit(f)} AS field, CAST({q(f)} AS VARCHAR) AS value "
        f"FROM landing.{q(contract.collection + '_valid')} WHERE {where} AND {q(f)} IS NOT NULL"
        for f in vault_fields(contract)
    ]
    return " UNION ALL ".join(parts)


def vaulted_values_sql(con: duckdb.DuckDBPyConnection, contracts: Iterable[Contract], extra_where: str = "true") -> str:
    """SQL (nhs, field, value, collection): the vault fields of every vaulted batch (``vault.batches``)
    of every collection whose landing valid table exists, its rows further limited by
    ``extra_where`` (over columns every valid table has, such as ``_batch`` and ``_row``); an empty
    relation when there is none."""
    parts = [
        f"SELECT *, {lit(c.collection)} AS collection "
        f"FROM ({unpivot_sql(c, f'{_vaulted_where(c)} AND ({extra_where})')})"
        for c in contracts
        if table_exists(con, "landing", f"{c.collection}_valid")
    ]
    if not parts:
        return (
            "SELECT NULL::VARCHAR AS nhs, NULL::VARCHAR AS field, NULL::VARCHAR AS value, "
            "NULL::VARCHAR AS collection WHERE false"
        )
    return " UNION ALL ".join(parts)


@dataclass
class VaultReport:
    collection: str
    batches: int = 0
    candidates: int = 0
    entries: int = 0
    type1_rows_skipped: int = 0
    vault_key_id: str = ""
    fields: list[str] = field(default_factory=list)


def _new_entries(con: duckdb.DuckDBPyConnection, contract: Contract) -> None:
    """Temp table ``_vault_enc`` (pid, field, value, lookup): the distinct values of the batches in
    ``_vault_new`` not in the vault yet (found by their digests in ``vault.seen``); one HMAC per
    person of those batches. Needs the haven key installed as ``haven``.

    The rows' distinct tuples of vault fields are taken first (``_vault_cand``: a person's
    identifiers repeat on every record about them, so this is about one row a person) and only
    those are unpivoted to (nhs, field, value): the first statement went from 0.44 s to 0.12 s on
    2.25M GP records of 300,000 people (issue 22, measured here; the vault step about 5% faster).
    Rows without a patient key have no pid, so they are left out here rather than after the join.
    """
    fields = vault_fields(contract)
    nhs = q(contract.patient_key)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _vault_cand AS SELECT DISTINCT {', '.join(q(f) for f in fields)} "
        f"FROM landing.{q(contract.collection + '_valid')} "
        f"WHERE _batch IN (SELECT batch_id FROM _vault_new) AND {nhs} IS NOT NULL"
    )
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _vault_ids AS SELECT nhs, {hmac_sql('nhs', 'haven')} AS pid "
        f"FROM (SELECT DISTINCT {nhs} AS nhs FROM _vault_cand)"
    )
    values = " UNION ALL ".join(
        f"SELECT {nhs} AS nhs, {lit(f)} AS field, CAST({q(f)} AS VARCHAR) AS value "
        f"FROM _vault_cand WHERE {q(f)} IS NOT NULL"
        for f in fields
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _vault_enc AS SELECT pid, field, value, lookup FROM "
        f"(SELECT i.pid, c.field, c.value, {lookup_sql('i.pid', 'c.field', 'c.value')} AS lookup "
        f"FROM (SELECT DISTINCT * FROM ({values})) c JOIN _vault_ids i USING (nhs)) "
        f"WHERE lookup NOT IN (SELECT lookup FROM {SEEN} WHERE lookup IS NOT NULL)"
    )


def vault_collection(
    con: duckdb.DuckDBPyConnection, contract: Contract, contracts: Iterable[Contract], public: Key
) -> VaultReport:
    """Add the identifiers of ``contract``'s accepted, not yet vaulted batches to the vault.

    Needs the haven key installed as ``haven``. ``contracts`` are all collections, so a value
    vaulted from any earlier batch is recognised. The candidates are chosen into temp tables
    first; the writes (entries, digests, data key, batches) then run in one transaction. Choosing
    them inside it cost a second a night at the benchmark's scale: DuckDB reads tables made in an
    open transaction on one thread (issue 22).
    """
    ensure_tables(con)
    c = contract.collection
    report = VaultReport(c, vault_key_id=key_id(public.material), fields=vault_fields(contract))
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _vault_new AS SELECT batch_id FROM {BATCHES} "
        f"WHERE collection = ? AND status = 'accepted' "
        f"AND batch_id NOT IN (SELECT batch_id FROM {VAULTED} WHERE collection = ?)",
        [c, c],
    )
    report.batches = con.execute("SELECT count(*) FROM _vault_new").fetchone()[0]
    if report.batches == 0:
        return report
    with atomic(con):
        _backfill_seen(con, contracts)
        _random_bytes_as_declared(con)
    try:
        _new_entries(con, contract)
        report.candidates = con.execute("SELECT count(*) FROM _vault_enc").fetchone()[0]
        if contract.practice_field:
            report.type1_rows_skipped = con.execute(
                f"DELETE FROM _vault_enc WHERE pid IN ({type1_objectors_sql()})"
            ).fetchone()[0]
        with transaction(con):
            report.entries = encrypt_entries(con, "_vault_enc", public, c)
            con.execute(f"INSERT INTO {VAULTED} SELECT batch_id, ?, now(), ? FROM _vault_new", [c, report.entries])
    finally:  # the candidates hold identifiers in clear: never left on the connection, whatever happened
        for t in ("_vault_enc", "_vault_ids", "_vault_cand"):
            con.execute(f"DROP TABLE IF EXISTS {t}")
    return report


# --- reading (governance lead only) ---------------------------------------------------


def private_key(keyring: KeyRing) -> Key:
    """The vault private key, opened with the key custodian's passphrase (module docstring).

    Refused for a key ring without a custodian (the pipeline's), and when the key is not on
    this host; a wrong passphrase or a substituted key raises ``KeyRingError``.
    """
    if keyring.custodian is None:
        raise VaultError(
            "reading the identity vault needs the key custodian's vault key: run this as the custodian "
            "(the command asks for the passphrase)"
        )
    if not keyring.exists(VAULT):
        raise VaultError(
            f"the vault private key {keyring.path(VAULT)} is not on this host: re-identification and "
            "haven-key rotation need the key custodian's key"
        )
    return keyring.get_private(VAULT)


def _opener(aeads: dict[str, AESGCM]) -> Callable[[str, bytes, bytes, bytes, str, str], bytes]:
    """One entry's AES-GCM decryption under its data key; a failure names the pid and field, never a value."""

    def open_entry(dek_id: str, nonce: bytes, ct: bytes, ad: bytes, pid: str, field_name: str) -> bytes:
        try:
            return aeads[dek_id].decrypt(nonce, ct, ad)
        except (InvalidTag, KeyError):
            raise VaultError(
                f"vault entry ({pid}, {field_name}) does not authenticate: it was altered or moved"
            ) from None

    return open_entry


def decrypt_table(con: duckdb.DuckDBPyConnection, private: Key, where_sql: str, name: str) -> int:
    """Decrypt the vault entries matching ``where_sql`` (over ``v``) into temp table ``name``
    (pid, field, value, collection, added_at), ordered by pid, field and age; returns the number
    of entries.

    Governance-lead only (needs the private key). DuckDB lays out each entry's associated data
    (``_ad_sql``); Python makes one ``AESGCM.decrypt`` call per entry (module docstring) and the
    plaintexts go back as one Arrow column. An entry that does not authenticate against its own
    (pid, field, data key) raises ``VaultError`` naming the pid and field, never a value.
    """
    import pyarrow as pa  # here: only the vault's encryption needs it, not loading the code location (issue 22)

    ensure_tables(con)
    dek_rows = con.execute(
        f"SELECT dek_id, vault_key_id, eph_pub, wrap_nonce, wrapped FROM {DATA_KEYS} "
        f"WHERE dek_id IN (SELECT DISTINCT v.dek_id FROM {IDENTITY} v WHERE {where_sql})"
    ).fetchall()
    aeads = {d: AESGCM(unwrap(private, vkid, d, eph, nonce, wrapped)) for d, vkid, eph, nonce, wrapped in dek_rows}
    arrow = con.execute(
        f"SELECT v.pid, v.field, v.collection, v.added_at, v.dek_id, v.nonce, v.ciphertext, "
        f"{_ad_sql('v.pid', 'v.field', 'v.dek_id')} AS ad FROM {IDENTITY} v "
        f"WHERE {where_sql} ORDER BY v.pid, v.field, v.added_at"
    ).fetch_arrow_table()
    columns = [arrow.column(c).to_pylist() for c in ("dek_id", "nonce", "ciphertext", "ad", "pid", "field")]
    plain = pa.array(map(_opener(aeads), *columns), pa.binary(), size=arrow.num_rows)
    del columns
    rows = pa.table(
        {
            "pid": arrow.column("pid"),
            "field": arrow.column("field"),
            "value": plain,
            "collection": arrow.column("collection"),
            "added_at": arrow.column("added_at"),
        }
    )
    del arrow, plain
    con.register("_vault_plain_rows", rows)
    try:
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT pid::VARCHAR AS pid, field::VARCHAR AS field, "
            "decode(value) AS value, collection::VARCHAR AS collection, added_at FROM _vault_plain_rows"
        )
    finally:
        con.unregister("_vault_plain_rows")
    return rows.num_rows


def decrypt_rows(
    con: duckdb.DuckDBPyConnection, private: Key, where_sql: str = "true"
) -> list[tuple[str, str, str, str]]:
    """Decrypt vault entries matching ``where_sql`` (over ``v``) as Python rows:
    (pid, field, value, collection), as :func:`decrypt_table` orders and checks them."""
    decrypt_table(con, private, where_sql, "_vault_rows_out")
    rows = con.execute("SELECT pid, field, value, collection FROM _vault_rows_out").fetchall()
    con.execute("DROP TABLE _vault_rows_out")
    return rows


def reveal(
    con: duckdb.DuckDBPyConnection, private: Key, pids_sql: str, fields: tuple[str, ...] | None = None
) -> dict[str, dict[str, list[str]]]:
    """The identifiers of the pids in relation ``pids_sql`` (column ``pid``): pid -> field -> values.

    For re-identification through the CLI only, which records an audit entry.
    """
    where = f"v.pid IN (SELECT pid FROM ({pids_sql}))"
    if fields:
        where += f" AND v.field IN ({', '.join(lit(f) for f in fields)})"
    out: dict[str, dict[str, list[str]]] = {}
    for pid, fname, value, _ in decrypt_rows(con, private, where):
        values = out.setdefault(pid, {}).setdefault(fname, [])
        if value not in values:
            values.append(value)
    return out


def encrypt_by_collection(con: duckdb.DuckDBPyConnection, table: str, public: Key, lookup_key: str = "haven") -> int:
    """Encrypt the distinct (pid, field, value) of temp ``table`` (pid, field, value, collection)
    into the vault, one fresh data key per collection (an entry keeps the collection it came from);
    digests under the installed key ``lookup_key``."""
    total = 0
    collections = con.execute(f"SELECT DISTINCT collection FROM {table} ORDER BY 1").fetchall()
    for (collection,) in collections:  # per collection, not per row
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _vault_enc AS SELECT pid, field, value, "
            f"{lookup_sql('pid', 'field', 'value', lookup_key)} AS lookup "
            f"FROM (SELECT DISTINCT pid, field, value FROM {table} WHERE collection IS NOT DISTINCT FROM ?)",
            [collection],
        )
        total += encrypt_entries(con, "_vault_enc", public, collection)
    con.execute("DROP TABLE IF EXISTS _vault_enc")
    return total


def reencrypt(con: duckdb.DuckDBPyConnection, plain: str, public: Key, pid_map: str, new_key: str = "haven_new") -> int:
    """Re-encrypt every vault entry under new pids (haven-key rotation); ``pid_map`` has (old, new),
    and the new haven key is installed as ``new_key`` (the entries' digests are made again under it).

    ``plain`` is the whole vault decrypted (:func:`decrypt_table` with ``true``): every entry is
    replaced, so a table missing any is refused. The associated data binds each ciphertext to its
    pid, so a new pid needs a new ciphertext; the old data keys are deleted. Call inside the
    rotation's transaction.
    """
    held, given = con.execute(f"SELECT (SELECT count(*) FROM {IDENTITY}), (SELECT count(*) FROM {plain})").fetchone()
    if held != given:
        raise VaultError(f"{plain} holds {given} of the vault's {held} entries; rotation stopped")
    missing = con.execute(
        f"SELECT count(DISTINCT pid) FROM {plain} WHERE pid NOT IN (SELECT old FROM {pid_map})"
    ).fetchone()[0]
    if missing:
        raise VaultError(f"{missing} vault people have no new pid; rotation stopped")
    con.execute(f"DELETE FROM {IDENTITY}")
    con.execute(f"DELETE FROM {SEEN}")
    con.execute(f"DELETE FROM {DATA_KEYS}")
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _vault_remapped AS SELECT m.new AS pid, p.field, p.value, p.collection "
        f"FROM {plain} p JOIN {pid_map} m ON m.old = p.pid"
    )
    total = encrypt_by_collection(con, "_vault_remapped", public, new_key)
    con.execute("DROP TABLE _vault_remapped")
    return total


def rewrap_all(con: duckdb.DuckDBPyConnection, private: Key, new_public: Key) -> int:
    """Re-wrap every data key to a new vault public key (vault key rotation): O(data keys)."""
    ensure_tables(con)
    rows = con.execute(f"SELECT dek_id, vault_key_id, eph_pub, wrap_nonce, wrapped FROM {DATA_KEYS}").fetchall()
    for dek_id, vkid, eph_pub, nonce, wrapped in rows:  # one per vault write, not per entry
        dek = unwrap(private, vkid, dek_id, eph_pub, nonce, wrapped)
        e2, n2, w2 = wrap(dek, dek_id, new_public)
        con.execute(
            f"UPDATE {DATA_KEYS} SET vault_key_id = ?, eph_pub = ?, wrap_nonce = ?, wrapped = ? WHERE dek_id = ?",
            [key_id(new_public.material), e2, n2, w2, dek_id],
        )
    return len(rows)
