"""The identity vault: AES-GCM bound to its row, envelope-encrypted to a key the pipeline lacks."""

from __future__ import annotations

import threading
from pathlib import Path

import duckdb
import pytest

from safehaven.core.home import Home
from safehaven.core.keys import VAULT, Key, KeyRing, KeyRingError
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import vault
from safehaven.protect.objections import objectors_sql
from safehaven.protect.pseudonymise import hmac_sql, install_key, pseudonym
from tests.conftest import copy_haven, custodian_ring, test_custodian
from tests.unit.populate import drop, populated, process, write_csv


@pytest.fixture
def haven_home(home: Home, populated_haven: Path) -> Home:
    """``home`` as ``populated(home)`` leaves it: a copy of the session's populated haven."""
    return copy_haven(populated_haven, home)


def test_vault_holds_full_identifiers_encrypted(haven_home: Home) -> None:
    keyring = custodian_ring(haven_home)
    with Store(haven_home).connect() as con:
        fields = dict(con.execute(f"SELECT field, count(*) FROM {vault.IDENTITY} GROUP BY 1").fetchall())
        nhs, dob, postcode = con.execute(
            "SELECT nhs_number, CAST(date_of_birth AS VARCHAR), postcode FROM landing.hospital_episodes_valid LIMIT 1"
        ).fetchone()
        pid = pseudonym(keyring.get("haven").material, nhs)
        stored = con.execute(f"SELECT ciphertext FROM {vault.IDENTITY} WHERE pid = ?", [pid]).fetchall()
        revealed = vault.reveal(con, vault.private_key(keyring), f"SELECT '{pid}' AS pid")
    assert set(fields) == {"nhs_number", "date_of_birth", "postcode"}
    assert not any(nhs.encode() in bytes(c) or postcode.encode() in bytes(c) for (c,) in stored)
    assert revealed[pid]["nhs_number"] == [nhs]
    assert dob in revealed[pid]["date_of_birth"] and postcode in revealed[pid]["postcode"]


def test_one_entry_per_distinct_person_field_and_value(haven_home: Home) -> None:
    with Store(haven_home).connect() as con:
        dupes = con.execute(
            f"SELECT count(*) - count(DISTINCT (pid, field)) FROM {vault.IDENTITY} WHERE field = 'nhs_number'"
        ).fetchone()[0]
        before = con.execute(f"SELECT count(*) FROM {vault.IDENTITY}").fetchone()[0]
    assert dupes == 0
    drop(haven_home, seed=7)  # the very same files again: already landed, nothing new
    process(haven_home)
    with Store(haven_home).connect() as con:
        assert con.execute(f"SELECT count(*) FROM {vault.IDENTITY}").fetchone()[0] == before


def test_a_ciphertext_moved_to_another_row_fails_to_decrypt(haven_home: Home) -> None:
    private = vault.private_key(custodian_ring(haven_home))
    with Store(haven_home).connect() as con:
        (a, b) = [
            r[0]
            for r in con.execute(
                f"SELECT pid FROM {vault.IDENTITY} GROUP BY pid HAVING count(DISTINCT field) = 3 ORDER BY pid LIMIT 2"
            ).fetchall()
        ]
        assert vault.reveal(con, private, f"SELECT '{b}' AS pid")
        con.execute(
            f"UPDATE {vault.IDENTITY} AS t SET nonce = s.nonce, ciphertext = s.ciphertext, dek_id = s.dek_id "
            f"FROM {vault.IDENTITY} s WHERE t.pid = ? AND t.field = 'nhs_number' "
            "AND s.pid = ? AND s.field = 'nhs_number'",
            [b, a],
        )
        with pytest.raises(vault.VaultError, match="does not authenticate") as err:
            vault.reveal(con, private, f"SELECT '{b}' AS pid")
        assert "nhs_number" in str(err.value)
        # moved between fields of one person: also refused
        con.execute(
            f"UPDATE {vault.IDENTITY} AS t SET nonce = s.nonce, ciphertext = s.ciphertext, dek_id = s.dek_id "
            f"FROM {vault.IDENTITY} s WHERE t.pid = ? AND t.field = 'postcode' "
            "AND s.pid = ? AND s.field = 'date_of_birth'",
            [a, a],
        )
        with pytest.raises(vault.VaultError):
            vault.reveal(con, private, f"SELECT '{a}' AS pid", ("postcode",))


def test_the_pipeline_writes_the_vault_without_being_able_to_read_it(home: Home) -> None:
    keyring = KeyRing(home.keys)  # the pipeline's: no custodian
    assert keyring.path(VAULT).read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    populated(home)
    with Store(home).connect() as con:
        entries = con.execute(f"SELECT count(*) FROM {vault.IDENTITY}").fetchone()[0]
        with pytest.raises(vault.VaultError, match="key custodian"):
            vault.reveal(con, vault.private_key(keyring), "SELECT pid FROM vault.identity")
        with pytest.raises(KeyRingError, match="sealed"):
            keyring.get_private(VAULT)
        wrong = KeyRing(home.keys, test_custodian("not the passphrase"))
        with pytest.raises(KeyRingError, match="passphrase does not open"):
            vault.private_key(wrong)
        assert vault.reveal(con, vault.private_key(custodian_ring(home)), f"SELECT pid FROM {vault.IDENTITY} LIMIT 3")
    assert entries > 0


def test_a_wrapped_data_key_only_opens_with_its_vault_key(haven_home: Home) -> None:
    keyring = custodian_ring(haven_home)
    old_private = vault.private_key(keyring)
    other = KeyRing(haven_home.root / "other", test_custodian())
    other_public = other.create_keypair(VAULT)
    with Store(haven_home).connect() as con:
        with pytest.raises(vault.VaultError):
            vault.reveal(con, other.get_private(VAULT), "SELECT pid FROM vault.identity LIMIT 1")
        con.execute("BEGIN TRANSACTION")
        n = vault.rewrap_all(con, old_private, other_public)
        con.execute("COMMIT")
        assert n >= 1
        assert vault.reveal(con, other.get_private(VAULT), "SELECT pid FROM vault.identity LIMIT 1")
        with pytest.raises(vault.VaultError):
            vault.reveal(con, old_private, "SELECT pid FROM vault.identity LIMIT 1")


def test_type1_objectors_gp_identifiers_are_not_vaulted(haven_home: Home) -> None:
    with Store(haven_home).connect() as con:
        install_key(con, "haven", KeyRing(haven_home.keys).get("haven"))
        n = con.execute(
            f"SELECT count(*) FROM {vault.IDENTITY} WHERE collection = 'gp_events' "
            f"AND pid IN ({objectors_sql('current_date', ('type1',))})"
        ).fetchone()[0]
    assert n == 0


def test_vault_fields_follow_the_contracts() -> None:
    registry = ContractRegistry()
    assert vault.vault_fields(registry.contracts["gp_events"]) == ["nhs_number", "date_of_birth", "postcode"]
    assert vault.vault_fields(registry.objections()) == ["nhs_number"]


def test_public_key_only_wraps(tmp_path) -> None:
    ring = KeyRing(tmp_path / "keys", test_custodian())
    public = ring.create_keypair(VAULT)
    eph, nonce, wrapped = vault.wrap(b"k" * 32, "d1", public)
    assert vault.unwrap(ring.get_private(VAULT), public.key_id, "d1", eph, nonce, wrapped) == b"k" * 32
    with pytest.raises(vault.VaultError):
        vault.unwrap(ring.get_private(VAULT), public.key_id, "d2", eph, nonce, wrapped)
    assert isinstance(public, Key) and public.material != ring.get_private(VAULT).material


# --- the keyed lookup of values already vaulted (issue 22) ---------------------------------


def seen_matches_vault(con, keyring: KeyRing) -> None:
    """Every vault entry has exactly its digest in ``vault.seen``, under the installed haven key."""
    install_key(con, "haven", keyring.get("haven"))
    vault.decrypt_table(con, vault.private_key(keyring), "true", "_all_plain")
    expected = con.execute(
        f"SELECT pid, field, {vault.lookup_sql('pid', 'field', 'value')} FROM _all_plain ORDER BY ALL"
    ).fetchall()
    assert con.execute(f"SELECT pid, field, lookup FROM {vault.SEEN} ORDER BY ALL").fetchall() == expected


def _redeliver(home: Home) -> None:
    """The same people again in new files (an earlier reporting period, sent late): their NHS numbers and
    postcodes recur, their dates of birth in this synthetic population do not."""
    from datetime import date

    from safehaven.tools import synthetic

    synthetic.generate(home.incoming, patients=300, seed=7, defect_rate=0.0, period_end=date(2026, 10, 31))


def _duplicates(con, keyring: KeyRing) -> int:
    vault.decrypt_table(con, vault.private_key(keyring), "true", "_dup_plain")
    return con.execute("SELECT count(*) - count(DISTINCT (pid, field, value)) FROM _dup_plain").fetchone()[0]


def test_values_already_vaulted_are_found_without_reading_the_landing_history(haven_home: Home) -> None:
    """The rule: a night compares its own values with the digests of the vault's entries, so the
    landed rows of earlier batches are not read. Shown by removing them before the next drop:
    the recurring NHS numbers and postcodes are still not vaulted twice."""
    keyring = custodian_ring(haven_home)
    with Store(haven_home).connect() as con:
        for c in ("gp_events", "hospital_episodes", "social_care", "objections"):
            con.execute(f"DELETE FROM landing.{c}_valid")
        postcodes = con.execute(f"SELECT count(*) FROM {vault.IDENTITY} WHERE field = 'postcode'").fetchone()[0]
    _redeliver(haven_home)
    process(haven_home)
    with Store(haven_home).connect() as con:
        assert _duplicates(con, keyring) == 0
        assert con.execute(f"SELECT count(*) FROM {vault.IDENTITY} WHERE field = 'postcode'").fetchone()[0] == postcodes
        seen_matches_vault(con, keyring)


def test_missing_digests_are_rebuilt_from_the_landed_values_once(haven_home: Home) -> None:
    keyring = custodian_ring(haven_home)
    with Store(haven_home).connect() as con:
        con.execute(f"DELETE FROM {vault.SEEN}")  # a store made before the digests, or emptied by hand
        before = con.execute(f"SELECT count(*) FROM {vault.IDENTITY}").fetchone()[0]
    _redeliver(haven_home)
    process(haven_home)
    with Store(haven_home).connect() as con:
        assert _duplicates(con, keyring) == 0
        assert con.execute(f"SELECT count(*) FROM {vault.IDENTITY}").fetchone()[0] > before  # new dates of birth


def test_every_entry_has_its_digest(haven_home: Home) -> None:
    with Store(haven_home).connect() as con:
        seen_matches_vault(con, custodian_ring(haven_home))


def test_rebuilt_digests_never_mark_a_value_that_was_not_vaulted(haven_home: Home) -> None:
    """A type 1 objector's GP identifiers were not vaulted; rebuilt digests must not claim they
    were, or the same person's hospital record (which type 1 does not cover) would add nothing.
    The person has no hospital or social care record (either would vault their identifiers; which
    type 1 objector comes first depends on the session's random haven key)."""
    with Store(haven_home).connect() as con:
        install_key(con, "haven", KeyRing(haven_home.keys).get("haven"))
        nhs, dob, postcode, pid = con.execute(
            f"SELECT g.nhs_number, CAST(g.date_of_birth AS VARCHAR), g.postcode, {hmac_sql('g.nhs_number', 'haven')} "
            f"AS p FROM landing.gp_events_valid g WHERE p IN ({objectors_sql('current_date', ('type1',))}) "
            "AND g.nhs_number NOT IN (SELECT nhs_number FROM landing.hospital_episodes_valid) "
            "AND g.nhs_number NOT IN (SELECT nhs_number FROM landing.social_care_valid) ORDER BY p LIMIT 1"
        ).fetchone()
        assert _fields_of(con, pid) == ["nhs_number"]  # from the objections collection only
        con.execute(f"DELETE FROM {vault.SEEN}")  # a store made before the digests
    header = "provider_code,nhs_number,date_of_birth,sex,postcode,admission_date,discharge_date,primary_diagnosis"
    write_csv(
        haven_home.incoming / "hospital_episodes" / "hospital_episodes_20261130b.csv",
        header.split(","),
        [["RR1", nhs, dob, "2", postcode, "2026-11-01", "2026-11-03", "E86"]],
    )
    process(haven_home)
    with Store(haven_home).connect() as con:
        assert _fields_of(con, pid) == ["date_of_birth", "nhs_number", "postcode"]


def _fields_of(con, pid: str) -> list[str]:
    return sorted(
        r[0] for r in con.execute(f"SELECT DISTINCT field FROM {vault.IDENTITY} WHERE pid = ?", [pid]).fetchall()
    )


def test_entries_encrypted_in_batches_are_each_stored_once_under_one_data_key_and_decrypt(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A night's entries are encrypted ``ENCRYPT_BATCH`` at a time (issue 22: Python holds one
    batch of plaintexts and ciphertexts, not the night's); the vault is the one a single batch
    makes: every entry once, one data key per write counting all its entries, each decrypting
    to the landed value under its own row."""
    monkeypatch.setattr(vault, "ENCRYPT_BATCH", 7)  # several batches, the last one short
    populated(home, patients=40)
    with Store(home).connect(read_only=True) as con:
        per_key = con.execute(
            f"SELECT k.entries, count(i.pid) FROM {vault.DATA_KEYS} k JOIN {vault.IDENTITY} i USING (dek_id) "
            "GROUP BY k.dek_id, k.entries"
        ).fetchall()
        dupes = con.execute(
            f"SELECT count(*) - count(DISTINCT (pid, field, ciphertext)) FROM {vault.IDENTITY}"
        ).fetchone()[0]
        nhs = {r[0] for r in con.execute("SELECT nhs_number FROM landing.gp_events_valid").fetchall()}
        rows = vault.decrypt_rows(con, vault.private_key(custodian_ring(home)))
    assert per_key and all(entries == found for entries, found in per_key)
    assert any(entries > 7 for entries, _ in per_key)  # a write that took more than one batch
    assert dupes == 0
    assert len(rows) == sum(found for _, found in per_key)
    assert nhs and nhs <= {value for _, field, value, _ in rows if field == "nhs_number"}


#: where a write of 10 entries, 3 a batch (4 batches), is stopped: which function, at which of its calls
STOPS = {
    "insert of the 2nd batch": ("_insert_rows", 2),
    "insert of the last batch": ("_insert_rows", 4),
    "encryption of the 3rd batch": ("_encrypted", 3),
}


@pytest.mark.parametrize("stop", STOPS.keys())
@pytest.mark.parametrize("callers_transaction", [False, True], ids=["alone", "in the caller's transaction"])
def test_a_vault_write_stopped_between_batches_stores_none_of_it(
    haven_home: Home, monkeypatch: pytest.MonkeyPatch, callers_transaction: bool, stop: str
) -> None:
    """A write stopped after its first batch of entries (a failure, an interrupt) leaves neither
    those entries, nor their digests, nor its data key, whether or not the caller holds a
    transaction: the vault never holds part of a write whose data key counts all of it. Batches
    are inserted by a second thread while the next is encrypted (``_encrypt_and_insert``): a
    stop in either thread, the last insert's included, reaches the caller, after every insert
    has ended."""
    monkeypatch.setattr(vault, "ENCRYPT_BATCH", 3)
    name, at = STOPS[stop]
    real, calls, inserted = getattr(vault, name), [], []
    real_insert = vault._insert_rows

    def stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt(f"stopped at {stop}")
        return real(*args, **kwargs)

    def counted_insert(*args, **kwargs):
        out = (stopped if name == "_insert_rows" else real_insert)(*args, **kwargs)
        inserted.append(1)
        return out

    monkeypatch.setattr(vault, name, stopped)
    monkeypatch.setattr(vault, "_insert_rows", counted_insert)
    public = custodian_ring(haven_home).get_public(VAULT)
    with Store(haven_home).connect() as con:
        install_key(con, "haven", KeyRing(haven_home.keys).get("haven"))
        before = [
            con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in (vault.IDENTITY, vault.SEEN, vault.DATA_KEYS)
        ]
        con.execute(
            "CREATE TEMP TABLE _v AS SELECT *, "
            f"{vault.lookup_sql('pid', 'field', 'value')} AS lookup FROM "
            "(SELECT 'p' || i AS pid, 'nhs_number' AS field, '999000000' || i AS value FROM range(10) r(i))"
        )
        if callers_transaction:
            con.execute("BEGIN TRANSACTION")
        with pytest.raises(KeyboardInterrupt):
            vault.encrypt_entries(con, "_v", public, "hospital_episodes")
        if callers_transaction:
            con.execute("ROLLBACK")
        after = [
            con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in (vault.IDENTITY, vault.SEEN, vault.DATA_KEYS)
        ]
    assert inserted  # at least the first batch was stored before the stop
    assert after == before


@pytest.mark.parametrize("second_interrupt", [False, True], ids=["one stop", "a second Ctrl-C while waiting"])
def test_a_write_stopped_while_a_batch_is_being_inserted_raises_only_once_that_insert_has_ended(
    haven_home: Home, monkeypatch: pytest.MonkeyPatch, second_interrupt: bool
) -> None:
    """The encryption of batch 2 fails while batch 1 is still being inserted by the other thread:
    the write raises only after that insert has ended, so the rollback never runs beside it or
    before it (an insert after the rollback would commit alone, entries with no data key; found by
    review), and a second interrupt during that wait does not cut it short."""
    monkeypatch.setattr(vault, "ENCRYPT_BATCH", 3)
    real_insert, real_encrypted, real_wait = vault._insert_rows, vault._encrypted, vault.wait
    gate, ended, encrypted = threading.Event(), threading.Event(), []

    def slow_insert(*args, **kwargs):
        gate.wait(timeout=30)  # held until the encryption of the next batch has failed
        real_insert(*args, **kwargs)
        ended.set()

    def failing_encrypted(*args, **kwargs):
        encrypted.append(1)
        if len(encrypted) == 2:
            threading.Timer(0.5, gate.set).start()
            raise KeyboardInterrupt("stopped while batch 1 is inserted")
        return real_encrypted(*args, **kwargs)

    def interrupted_wait(*args, **kwargs):
        monkeypatch.setattr(vault, "wait", real_wait)
        raise KeyboardInterrupt("a second Ctrl-C")

    monkeypatch.setattr(vault, "_insert_rows", slow_insert)
    monkeypatch.setattr(vault, "_encrypted", failing_encrypted)
    if second_interrupt:
        monkeypatch.setattr(vault, "wait", interrupted_wait)
    public = custodian_ring(haven_home).get_public(VAULT)
    with Store(haven_home).connect() as con:
        counts = f"SELECT (SELECT count(*) FROM {vault.IDENTITY}), (SELECT count(*) FROM {vault.DATA_KEYS})"
        before = con.execute(counts).fetchone()
        install_key(con, "haven", KeyRing(haven_home.keys).get("haven"))
        con.execute(
            "CREATE TEMP TABLE _v AS SELECT *, "
            f"{vault.lookup_sql('pid', 'field', 'value')} AS lookup FROM "
            "(SELECT 'p' || i AS pid, 'nhs_number' AS field, '999000000' || i AS value FROM range(10) r(i))"
        )
        with pytest.raises(KeyboardInterrupt, match="stopped while batch 1"):
            vault.encrypt_entries(con, "_v", public, "hospital_episodes")
        assert ended.is_set()  # the insert had ended when the write raised
        after = con.execute(counts).fetchone()
    assert after == before


#: the columns of ``vault.identity`` declared ``schema.RANDOM_BYTES`` (stored uncompressed)
RANDOM_COLUMNS = ("nonce", "ciphertext")


def _compression(con: duckdb.DuckDBPyConnection, table: str, column: str) -> set[str]:
    """How DuckDB stored ``column`` of ``table`` (its data segments' compression), after a checkpoint."""
    con.execute("CHECKPOINT")
    rows = con.execute(
        f"SELECT DISTINCT compression FROM pragma_storage_info('{table}') "
        "WHERE column_name = ? AND segment_type <> 'VALIDITY'",
        [column],
    ).fetchall()
    return {r[0] for r in rows} - {"Constant"}


def test_nonces_and_ciphertexts_are_stored_uncompressed_also_after_a_rebuild(store: Store) -> None:
    """Random bytes are not offered to DuckDB's compression (``schema.RANDOM_BYTES``, issue 22): the
    declaration holds even for bytes that would compress, and a rebuild of the store keeps it."""
    with store.connect() as con:
        vault.ensure_tables(con)
        con.execute(
            f"INSERT INTO {vault.IDENTITY} (pid, field, nonce, ciphertext) "
            "SELECT 'p' || (i % 7), 'f', repeat('n', 12)::BLOB, repeat('c', 40)::BLOB FROM range(200000) r(i)"
        )
        for column in RANDOM_COLUMNS:
            assert _compression(con, vault.IDENTITY, column) == {"Uncompressed"}, column
        assert _compression(con, vault.IDENTITY, "pid") != {"Uncompressed"}  # the others are still compressed
    store.rebuild()
    with store.connect() as con:
        for column in RANDOM_COLUMNS:
            assert _compression(con, vault.IDENTITY, column) == {"Uncompressed"}, column


#: ``vault.identity`` as stores made before ``schema.RANDOM_BYTES`` declared it
IDENTITY_BEFORE = (
    "pid VARCHAR, field VARCHAR, nonce BLOB, ciphertext BLOB, dek_id VARCHAR, collection VARCHAR, added_at TIMESTAMPTZ"
)


def _as_older_stores_made_it(con: duckdb.DuckDBPyConnection) -> None:
    """``vault.identity`` as an older version made it: the old declaration, no comment."""
    con.execute(f"CREATE TABLE vault.identity_old ({IDENTITY_BEFORE})")
    con.execute(f"INSERT INTO vault.identity_old SELECT * FROM {vault.IDENTITY}")
    con.execute(f"DROP TABLE {vault.IDENTITY}")
    con.execute("ALTER TABLE vault.identity_old RENAME TO identity")


def _raw(con: duckdb.DuckDBPyConnection, where: str = "true") -> list[tuple]:
    """Every stored column of the vault's entries matching ``where``, in a fixed order."""
    return con.execute(f"SELECT * FROM {vault.IDENTITY} WHERE {where} ORDER BY ALL").fetchall()


def test_an_older_stores_vault_is_copied_once_as_declared_by_the_next_vault_write_entry_for_entry(
    haven_home: Home,
) -> None:
    """Whatever DuckDB happened to store its bytes as (often uncompressed under the old declaration
    too), an older store's table is copied once, each entry's stored bytes and times unchanged, and
    nothing is left beside it."""
    private = vault.private_key(custodian_ring(haven_home))
    with Store(haven_home).connect() as con:
        _as_older_stores_made_it(con)
        old_keys = [r[0] for r in con.execute(f"SELECT DISTINCT dek_id FROM {vault.IDENTITY}").fetchall()]
        where = f"dek_id IN ({', '.join(repr(k) for k in old_keys)})"
        before, decrypted = _raw(con, where), vault.decrypt_rows(con, private)
    drop(haven_home, patients=40, seed=8)  # a new drop: the nightly vault write
    process(haven_home)
    with Store(haven_home).connect() as con:
        assert _raw(con, where) == before  # entry for entry: no entry lost, doubled or changed
        assert len(_raw(con)) > len(before)  # and the night's new entries added
        assert set(decrypted) <= set(vault.decrypt_rows(con, private))
        for column in RANDOM_COLUMNS:
            assert _compression(con, vault.IDENTITY, column) == {"Uncompressed"}, column
        listed = con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'vault'").fetchall()
        tables = {r[0] for r in listed}
        assert tables == {"identity", "seen", "data_keys", "batches"}
        assert not vault._random_bytes_as_declared(con)  # once


def test_a_table_someone_left_in_the_vault_zone_neither_stops_the_copy_nor_is_touched(haven_home: Home) -> None:
    with Store(haven_home).connect() as con:
        _as_older_stores_made_it(con)
        con.execute(f"CREATE TABLE vault.identity_compressed AS SELECT * FROM {vault.IDENTITY}")
        left = con.execute("SELECT * FROM vault.identity_compressed ORDER BY ALL").fetchall()
        assert vault._random_bytes_as_declared(con)
        assert con.execute("SELECT * FROM vault.identity_compressed ORDER BY ALL").fetchall() == left
        assert _raw(con) == left  # the vault itself copied entry for entry
        listed = con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'vault'").fetchall()
        assert {r[0] for r in listed} == {"identity", "identity_compressed", "seen", "data_keys", "batches"}
