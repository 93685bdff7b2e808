"""A lost key ring record: ``keys/keyring.json`` deleted or emptied beside the key files.

Every key it has no note of is refused (it was read as "nothing recorded", and any key file
accepted), and the way back is the key custodian's ``safehaven keys recover-record``: each key
file is checked against the encrypted store (the store key by opening it, every other by its
purpose's epoch) and recorded again, audited, only when all agree (CoP 27b-c; fail closed;
``safehaven.protect.key_record.recover_record``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from safehaven.cli.common import PASSPHRASE_ENV
from safehaven.cli.main import main
from safehaven.context import Haven
from safehaven.core import audit, pins, schema
from safehaven.core.home import Home
from safehaven.core.keys import VAULT, Custodian, KeyRing, KeyRingError, key_id, seal_private, x25519_public
from safehaven.core.store import MemoryLimitInvalid, Store, StoreError
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import key_record, rotation
from tests.conftest import TEST_PASSPHRASE, TEST_SCRYPT_N, copy_haven, custodian_ring


def _recover(home: Home) -> list[key_record.Recovered]:
    """``safehaven keys recover-record`` as the key custodian (the passphrase proved)."""
    return key_record.recover_record(home, custodian_ring(home), actor="custodian")


def _rotate(home: Home, purpose: str) -> object:
    """A real rotation of ``purpose``'s key by the key custodian."""
    return rotation.rotate(Haven.open(home, contracts=ContractRegistry(), keyring=custodian_ring(home)), purpose)


def _rotation_killed(home: Home, monkeypatch: pytest.MonkeyPatch, where: tuple[object, str], purpose: str) -> None:
    """A rotation of ``purpose`` killed where ``where`` (an object and an attribute) would run."""

    def killed(*_: object, **__: object) -> None:
        raise KeyboardInterrupt("killed before the install")

    monkeypatch.setattr(*where, killed)
    with pytest.raises(KeyboardInterrupt):
        _rotate(home, purpose)
    monkeypatch.undo()


@pytest.fixture
def haven_home(home: Home, populated_haven: Path) -> Home:
    return copy_haven(populated_haven, home)


def _lose_record(home: Home, how: str) -> dict[str, str]:
    """Delete or empty ``keyring.json``; returns the current key ids it recorded."""
    path = home.keys / "keyring.json"
    current = {p: str(e["current"]) for p, e in json.loads(path.read_text()).items() if e.get("current")}
    forms = {"emptied": "{}", "truncated": "", "another shape": "[]"}
    path.unlink() if how == "deleted" else path.write_text(forms[how])
    return current


def _swap(path: Path) -> None:
    path.write_text(os.urandom(32).hex())
    path.chmod(0o600)


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_lost_record_refuses_every_key_until_the_custodian_records_the_files_again(
    haven_home: Home, how: str
) -> None:
    current = _lose_record(haven_home, how)
    with pytest.raises(KeyRingError, match="safehaven keys recover-record"):
        with Store(haven_home).connect():
            pass
    recovered = _recover(haven_home)
    kept = sorted(p.name for p in haven_home.keys.glob("keyring.json.damaged-*"))
    assert len(kept) == (how in ("truncated", "another shape")), "a damaged record is kept, not overwritten"
    assert {r.purpose: r.key_id for r in recovered} == current
    checked = {r.purpose: r.checked for r in recovered}
    assert checked["store"] == key_record.OPENS_STORE
    assert checked["haven"] == checked["vault"] == key_record.MATCHES_EPOCH
    assert checked["audit"] == key_record.TRAIL_VERIFIES
    ring = KeyRing(haven_home.keys)
    with Store(haven_home).connect() as con:
        pins.verify(con, ring)
        assert audit.verify(con, haven_home).ok
        entry = audit.latest_entry(con, "key:record", [key_record.RECOVER_ACTION])
    assert entry is not None and entry.actor == "custodian"
    assert json.loads(entry.detail or "{}")["recorded"]["haven"] == {
        "key_id": current["haven"],
        "checked": key_record.MATCHES_EPOCH,
    }
    assert _recover(haven_home) == [], "once recorded, nothing to recover"


@pytest.mark.parametrize(
    ("purpose", "refusal"),
    [("haven", "made with key {expected}"), ("audit", "the trail's anchors name audit key {expected}")],
)
def test_a_swapped_key_is_not_recorded_and_the_refusal_says_what_the_store_expects(
    haven_home: Home, purpose: str, refusal: str
) -> None:
    current = _lose_record(haven_home, "deleted")
    path = haven_home.keys / f"{purpose}.key"
    original = path.read_text()
    _swap(path)
    expected = refusal.format(expected=current[purpose])
    with pytest.raises(KeyRingError, match=f"{purpose}.key holds key .*{expected}.*nothing recorded"):
        _recover(haven_home)
    assert not (haven_home.keys / "keyring.json").exists(), "nothing recorded, not even the keys that agreed"
    path.write_text(original)  # restored from the custodian's backup
    assert {r.purpose for r in _recover(haven_home)} == set(current)


def test_a_haven_key_swapped_with_the_stores_epoch_beside_a_lost_record_is_refused_by_the_trail(
    haven_home: Home,
) -> None:
    """The store's epoch rewritten to a swapped haven key (with the store key) agrees with the file;
    the audit trail's record of the haven key does not, so nothing is recorded."""
    path = haven_home.keys / "haven.key"
    _swap(path)
    theirs = KeyRing(haven_home.keys).file_key("haven")
    assert theirs is not None
    with Store(haven_home).connect() as con:
        con.execute(
            f"UPDATE {pins.EPOCHS} SET key_id = ? WHERE purpose = 'haven' AND retired_at IS NULL", [theirs.key_id]
        )
    current = _lose_record(haven_home, "deleted")
    with pytest.raises(KeyRingError, match=f"haven.key holds key .*audit trail names haven key {current['haven']}"):
        _recover(haven_home)
    assert not (haven_home.keys / "keyring.json").exists(), "nothing recorded"


def test_a_store_key_that_does_not_open_the_store_is_refused_without_showing_it(haven_home: Home) -> None:
    _lose_record(haven_home, "emptied")
    _swap(haven_home.keys / "store.key")
    swapped = (haven_home.keys / "store.key").read_text()
    with pytest.raises(KeyRingError, match="store.key: key .* does not open the encrypted store") as refused:
        _recover(haven_home)
    assert swapped not in str(refused.value)
    assert json.loads((haven_home.keys / "keyring.json").read_text()) == {}


def test_a_memory_limit_duckdb_cannot_read_is_not_blamed_on_the_store_key(haven_home: Home) -> None:
    """A mistyped ``$SAFEHAVEN_MEMORY_LIMIT`` is the store's configuration, not its key: the recovery
    refuses with that, never with "store.key: ..." (found by review), and records nothing."""
    _lose_record(haven_home, "emptied")
    mistyped = Home(haven_home.root, memory_limit="4 gigs")
    with pytest.raises(MemoryLimitInvalid, match="'4 gigs' is not a size DuckDB reads"):
        _recover(mistyped)
    assert json.loads((haven_home.keys / "keyring.json").read_text()) == {}


def test_an_intact_record_has_nothing_to_recover_and_nothing_is_audited(haven_home: Home) -> None:
    ring = KeyRing(haven_home.keys)
    before = ring.manifest()
    assert _recover(haven_home) == []
    assert ring.manifest() == before
    with Store(haven_home).connect() as con:
        assert audit.latest_entry(con, "key:record", [key_record.RECOVER_ACTION]) is None


def test_the_commands_name_the_unnoted_keys_and_record_them_again(haven_home: Home) -> None:
    current = _lose_record(haven_home, "deleted")
    listed = CliRunner().invoke(main, ["keys", "list"])
    assert listed.exit_code == 0, listed.output
    assert f"keyring.json has no note of: {', '.join(sorted(current))}" in listed.output
    refused = CliRunner().invoke(main, ["audit", "verify"])
    assert refused.exit_code == 1 and "safehaven keys recover-record" in refused.output
    recovered = CliRunner().invoke(main, ["keys", "recover-record"])
    assert recovered.exit_code == 0, recovered.output
    assert f"haven: key {current['haven']} recorded (the store's epoch)" in recovered.output
    assert recovered.output.strip().endswith("audited")
    assert "no note" not in CliRunner().invoke(main, ["keys", "list"]).output


def test_only_the_key_custodian_records_key_files_again(haven_home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recovery is the custodian's (CoP 27b-c; NIST SP 800-57 Part 2 roles): without the passphrase,
    with a wrong one, or without the sealed vault private key on this host to prove it against,
    nothing is recorded; the command asks for it and proves it."""
    current = _lose_record(haven_home, "deleted")
    ring = KeyRing(haven_home.keys)
    with pytest.raises(KeyRingError, match="key custodian's: run `safehaven keys recover-record` as the custodian"):
        key_record.recover_record(haven_home, ring, actor="someone")
    with pytest.raises(KeyRingError, match="passphrase does not open .*vault.key"):
        key_record.recover_record(haven_home, KeyRing(haven_home.keys, Custodian.of("not it")), actor="someone")
    sealed = haven_home.keys / "vault.key"
    kept = sealed.read_bytes()
    sealed.unlink()
    with pytest.raises(KeyRingError, match="vault.key is not on this host, so the custodian's passphrase cannot"):
        _recover(haven_home)
    assert not (haven_home.keys / "keyring.json").exists(), "nothing recorded"
    sealed.write_bytes(seal_private(os.urandom(32), TEST_PASSPHRASE.encode(), n=TEST_SCRYPT_N))  # another pair's
    sealed.chmod(0o600)
    with pytest.raises(KeyRingError, match="vault.key is not the haven.s vault key"):
        _recover(haven_home)
    sealed.write_bytes(kept)
    monkeypatch.setenv(PASSPHRASE_ENV, "not it")
    refused = CliRunner().invoke(main, ["keys", "recover-record"])
    assert refused.exit_code == 1 and "passphrase does not open" in refused.output
    monkeypatch.setenv(PASSPHRASE_ENV, TEST_PASSPHRASE)
    public = haven_home.keys / "vault.pub"
    kept_public = public.read_bytes()
    sealed.unlink()
    public.unlink()  # no pair to prove the passphrase against: not a way round the proof
    with pytest.raises(KeyRingError, match="vault key pair .* is missing, but the haven's vault key is"):
        key_record.recover_record(haven_home, ring, actor="someone")
    sealed.write_bytes(kept)
    sealed.chmod(0o600)
    public.write_bytes(kept_public)
    assert {r.purpose for r in _recover(haven_home)} == set(current)


def test_a_vault_pair_of_someone_elses_does_not_pass_for_the_custodian(haven_home: Home) -> None:
    """Only the haven key's note is lost, so the vault pair is not among the files recovered: both
    halves replaced by a pair sealed under a passphrase of the replacer's own pass for nothing, as
    the proof is against the store's vault key, not the files beside it (found by review)."""
    manifest = json.loads((haven_home.keys / "keyring.json").read_text())
    manifest.pop("haven")
    (haven_home.keys / "keyring.json").write_text(json.dumps(manifest))
    theirs = os.urandom(32)
    (haven_home.keys / "vault.key").write_bytes(seal_private(theirs, b"theirs", n=TEST_SCRYPT_N))
    (haven_home.keys / "vault.pub").write_text(x25519_public(theirs).hex())
    with pytest.raises(KeyRingError, match="vault.key is not the haven's vault key"):
        key_record.recover_record(haven_home, KeyRing(haven_home.keys, Custodian.of("theirs")), actor="x")
    assert "haven" not in KeyRing(haven_home.keys).manifest()


def test_a_refused_recovery_leaves_a_damaged_record_where_it_was(haven_home: Home) -> None:
    (haven_home.keys / "keyring.json").write_text('{"haven": ')  # cut short
    with pytest.raises(KeyRingError, match="passphrase does not open"):
        key_record.recover_record(haven_home, KeyRing(haven_home.keys, Custodian.of("not it")), actor="x")
    assert (haven_home.keys / "keyring.json").read_text() == '{"haven": '
    assert not list(haven_home.keys.glob("keyring.json.damaged-*"))
    recovered = _recover(haven_home)
    assert recovered and list(haven_home.keys.glob("keyring.json.damaged-*")), "set aside once recorded"


def test_a_vault_private_key_from_before_sealing_proves_itself(haven_home: Home) -> None:
    """A haven from before sealing keeps its vault private key raw: it is the store's vault key, so
    whoever holds it holds the custodian's key, and the recovery goes on (then `safehaven keys
    seal-vault` seals it); a raw key of another pair is refused."""
    raw = custodian_ring(haven_home).get_private(VAULT).material
    current = _lose_record(haven_home, "deleted")
    (haven_home.keys / "vault.key").write_text(os.urandom(32).hex())
    with pytest.raises(KeyRingError, match="vault.key is not the haven's vault key"):
        key_record.recover_record(haven_home, KeyRing(haven_home.keys), actor="x")
    (haven_home.keys / "vault.key").write_text(raw.hex())
    assert {r.purpose for r in key_record.recover_record(haven_home, KeyRing(haven_home.keys), actor="x")} == set(
        current
    )


def test_a_haven_rotation_committed_but_not_installed_is_recovered_then_resumed(
    haven_home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store moved to the new haven key, the process was killed before installing it, and the
    record was lost: the old key is recorded as the previous epoch's, and ``--resume`` then installs
    the new one (before, each command named the other and neither could run)."""
    old = KeyRing(haven_home.keys).get("haven").key_id
    _rotation_killed(haven_home, monkeypatch, (rotation, "_finish_haven"), "haven")
    _lose_record(haven_home, "emptied")
    ring = KeyRing(haven_home.keys)
    recovered = {r.purpose: r for r in _recover(haven_home)}
    assert (recovered["haven"].key_id, recovered["haven"].checked) == (old, key_record.ROTATION_PENDING)
    rotation.resume(Haven.open(haven_home, contracts=ContractRegistry(), keyring=custodian_ring(haven_home)))
    with Store(haven_home).connect() as con:
        assert ring.get("haven").key_id == pins.epoch_key_id(con, "haven") != old


def test_a_vault_rotation_committed_but_not_installed_is_recovered_by_the_custodian_then_resumed(
    haven_home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store moved to the new vault key and the process was killed before installing the pair:
    ``vault.key`` is still the old key, a retired epoch of the haven's, which proves the custodian
    (found by review: the proof against the current epoch alone refused it, and resume needed the
    record)."""
    _rotation_killed(haven_home, monkeypatch, (KeyRing, "install_staged_pair"), "vault")
    _lose_record(haven_home, "emptied")
    recovered = {r.purpose: r for r in _recover(haven_home)}
    assert recovered["vault"].checked == key_record.ROTATION_PENDING
    done = rotation.resume(Haven.open(haven_home, contracts=ContractRegistry(), keyring=custodian_ring(haven_home)))
    assert any(line.startswith("vault: finished") for line in done), done


def test_the_store_s_vault_epochs_deleted_with_the_store_key_are_no_way_round_the_custodian(haven_home: Home) -> None:
    """The trail still records the vault key: with the pair and the record gone too, nothing is
    recorded without the custodian (found by review)."""
    with Store(haven_home).connect() as con:
        con.execute(f"DELETE FROM {schema.KEY_EPOCHS} WHERE purpose = 'vault'")
    _lose_record(haven_home, "deleted")
    (haven_home.keys / "vault.key").unlink()
    (haven_home.keys / "vault.pub").unlink()
    with pytest.raises(KeyRingError, match="vault key pair .* is missing, but the haven's vault key is"):
        key_record.recover_record(haven_home, KeyRing(haven_home.keys), actor="x")


def test_an_epoch_row_naming_a_pair_of_someone_elses_does_not_pass_for_the_custodian(haven_home: Home) -> None:
    """The store's epochs are the store key holder's to write: a retired vault epoch naming their own
    pair, sealed under their own passphrase, does not make it the haven's while the audit trail
    records the vault key (found by review)."""
    theirs = os.urandom(32)
    with Store(haven_home).connect() as con:
        con.execute(
            f"INSERT INTO {schema.KEY_EPOCHS} SELECT purpose, ?, started_at, now() FROM {schema.KEY_EPOCHS} "
            "WHERE purpose = 'vault' LIMIT 1",
            [key_id(x25519_public(theirs))],
        )
    _lose_record(haven_home, "deleted")
    (haven_home.keys / "vault.key").write_bytes(seal_private(theirs, b"theirs", n=TEST_SCRYPT_N))
    (haven_home.keys / "vault.pub").write_text(x25519_public(theirs).hex())
    with pytest.raises(KeyRingError, match="vault.key is not the haven's vault key"):
        key_record.recover_record(haven_home, KeyRing(haven_home.keys, Custodian.of("theirs")), actor="x")


@pytest.mark.parametrize("public", ["the current one", "the retired key's"])
def test_a_retired_vault_key_does_not_pass_for_the_custodian(haven_home: Home, public: str) -> None:
    """A key the custodian rotated away from may be why it was rotated: holding it proves nothing,
    beside the current public half or its own (found by review)."""
    old = custodian_ring(haven_home).get_private(VAULT).material
    _rotate(haven_home, "vault")
    _lose_record(haven_home, "deleted")
    (haven_home.keys / "vault.key").write_text(old.hex())
    if public == "the retired key's":
        (haven_home.keys / "vault.pub").write_text(x25519_public(old).hex())
    with pytest.raises(KeyRingError, match="vault.key is not the haven's vault key"):
        key_record.recover_record(haven_home, KeyRing(haven_home.keys), actor="x")


def test_a_rotation_entry_hidden_from_a_partly_lost_record_does_not_bring_back_the_old_vault_key(
    haven_home: Home,
) -> None:
    """Only the haven key's note is lost, so the audit key is read from the record: the trail must
    verify, or a later vault ``key.rotate`` renamed with the store key would make the retired key
    the latest one the trail names (found by review)."""
    old = custodian_ring(haven_home).get_private(VAULT).material
    _rotate(haven_home, "vault")
    with Store(haven_home).connect() as con:
        renamed = "action = 'key.rotatx' WHERE action = 'key.rotate' AND object = 'key:vault'"
        con.execute(f"UPDATE {audit.TABLE} SET {renamed}")
    manifest = json.loads((haven_home.keys / "keyring.json").read_text())
    manifest.pop("haven")
    (haven_home.keys / "keyring.json").write_text(json.dumps(manifest))
    (haven_home.keys / "vault.key").write_text(old.hex())
    (haven_home.keys / "vault.pub").write_text(x25519_public(old).hex())
    with pytest.raises(KeyRingError, match="the audit trail does not verify"):
        key_record.recover_record(haven_home, KeyRing(haven_home.keys), actor="x")


@pytest.mark.parametrize("lost", ["only the haven key's note", "the whole record"])
def test_a_breach_decision_after_the_vault_keys_entry_refuses_the_proof(haven_home: Home, lost: str) -> None:
    """A later vault ``key.rotate`` renamed with the store key, then the trail resumed by a breach
    decision that writes it off: the retired key would be the latest the trail names. Which vault key
    is current cannot be told, so nothing is recorded, with the retired key or the current one, and
    the refusal says why (found by review)."""
    old = custodian_ring(haven_home).get_private(VAULT).material
    _rotate(haven_home, "vault")
    with Store(haven_home).connect() as con:
        renamed = "action = 'key.rotatx' WHERE action = 'key.rotate' AND object = 'key:vault'"
        con.execute(f"UPDATE {audit.TABLE} SET {renamed}")
        audit.resolve(con, haven_home, actor="ig-lead", decision="entry renamed; investigated; resume")
    if lost == "the whole record":
        _lose_record(haven_home, "deleted")
    else:
        manifest = json.loads((haven_home.keys / "keyring.json").read_text())
        manifest.pop("haven")
        (haven_home.keys / "keyring.json").write_text(json.dumps(manifest))
    with pytest.raises(KeyRingError, match="breach decision .* after the entry that names the vault key"):
        _recover(haven_home)  # the custodian, with the current pair
    (haven_home.keys / "vault.key").write_text(old.hex())
    (haven_home.keys / "vault.pub").write_text(x25519_public(old).hex())
    with pytest.raises(KeyRingError, match="breach decision .* after the entry that names the vault key"):
        key_record.recover_record(haven_home, KeyRing(haven_home.keys), actor="x")


def test_a_vault_private_key_of_someone_elses_beside_the_real_public_half_does_not_pass(haven_home: Home) -> None:
    theirs = os.urandom(32)
    _lose_record(haven_home, "deleted")
    (haven_home.keys / "vault.key").write_text(theirs.hex())
    with pytest.raises(KeyRingError, match="vault.key is not the haven's vault key"):
        key_record.recover_record(haven_home, KeyRing(haven_home.keys), actor="x")


def test_a_haven_key_without_an_epoch_in_a_store_holding_data_is_refused(haven_home: Home) -> None:
    """With its epoch removed (the store edited), a swapped haven key would start a new epoch and
    change every pseudonym: "no epoch" is accepted only where nothing is made with the key."""
    with Store(haven_home).connect() as con:
        con.execute(f"DELETE FROM {schema.KEY_EPOCHS} WHERE purpose = 'haven'")
    _lose_record(haven_home, "deleted")
    _swap(haven_home.keys / "haven.key")
    with pytest.raises(KeyRingError, match="no epoch of the haven key though it holds data made with one"):
        _recover(haven_home)


def test_a_store_in_use_is_not_blamed_on_its_key(haven_home: Home) -> None:
    _lose_record(haven_home, "deleted")
    script = (
        "import sys, time, duckdb; from safehaven.core.store import httpfs_extension_path; c = duckdb.connect(); "
        "c.execute(f\"LOAD '{httpfs_extension_path()}'\"); "
        "c.execute(f\"ATTACH '{sys.argv[1]}' AS s (ENCRYPTION_KEY '{sys.argv[2]}')\"); print('held', flush=True); "
        "time.sleep(60)"
    )
    key = (haven_home.keys / "store.key").read_text().strip()
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(haven_home.store_file), key], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(KeyRingError, match="in use by another process; run this again") as refused:
            _recover(haven_home)
        assert "not the store's key" not in str(refused.value) and key not in str(refused.value)
    finally:
        holder.kill()
        holder.wait()


def test_notes_are_taken_back_when_the_audit_entry_cannot_be_written(
    haven_home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    _lose_record(haven_home, "deleted")

    def broken(*_: object, **__: object) -> None:
        raise audit.AuditTrailBroken(audit.VerifyResult(False, 1, "broken for the test", "chain"))

    monkeypatch.setattr(audit, "append", broken)
    with pytest.raises(audit.AuditTrailBroken):
        _recover(haven_home)
    assert KeyRing(haven_home.keys).manifest() == {}, "recorded with its entry, or not at all"


def test_a_store_swap_interrupted_beside_a_lost_record_is_finished_and_the_new_key_recorded(haven_home: Home) -> None:
    """A store-key rotation killed between its journal and its swap: the swap is finished (it needs
    no pin: the key it replaces is shredded) and records the new store key, and the rest are
    recovered (before, the swap read the unnoted key and refused, naming this very command)."""
    store = Store(haven_home)
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.rebuild(_crash_after="journal")
    new = json.loads(store.journal.read_text())["new_key_id"]
    _lose_record(haven_home, "deleted")
    ring = KeyRing(haven_home.keys)
    recovered = {r.purpose for r in _recover(haven_home)}
    assert ring.current_id("store") == new and not store.journal.exists(), "the swap installs and records its key"
    assert recovered == {"haven", "audit", "vault"}


def test_a_vault_pair_missing_its_public_half_is_refused_naming_it(haven_home: Home) -> None:
    _lose_record(haven_home, "emptied")
    (haven_home.keys / "vault.pub").unlink()
    with pytest.raises(KeyRingError, match="vault.pub is missing or unreadable; restore the public half of key"):
        _recover(haven_home)


def test_a_missing_store_file_is_not_taken_for_a_new_haven(haven_home: Home) -> None:
    """Without the store nothing can be checked; the anchors show the haven was used, so the keys
    are not recorded unchecked (and no new store is made)."""
    _lose_record(haven_home, "deleted")
    haven_home.store_file.rename(haven_home.store_file.with_name("elsewhere.duckdb"))
    with pytest.raises(KeyRingError, match="store .* is missing, so no key can be checked .*restore the store"):
        _recover(haven_home)
    assert not haven_home.store_file.exists()


def test_files_that_are_not_the_havens_keys_are_left_alone(haven_home: Home) -> None:
    current = _lose_record(haven_home, "deleted")
    for name in ("tls.key", "store.old.key"):
        _swap(haven_home.keys / name)
    recovered = _recover(haven_home)
    assert {r.purpose for r in recovered} == set(current)


def _forge_swap(home: Home, *, next_file: bool) -> bytes:
    """A ``store/rebuild.json`` saying a swap was interrupted, beside a random ``store-next.key``
    (and, with ``next_file``, a stray ``haven.duckdb.next``); returns the real store key's bytes."""
    real = (home.keys / "store.key").read_bytes()
    staged = KeyRing(home.keys).write("store-next", os.urandom(32), record=False)
    (home.store_dir / "rebuild.json").write_text(json.dumps({"state": "swapping", "new_key_id": staged.key_id}))
    if next_file:
        (home.store_dir / "haven.duckdb.next").write_bytes(os.urandom(4096))
    return real


@pytest.mark.parametrize("next_file", [True, False], ids=["forged new file", "new file removed"])
def test_a_store_swap_whose_key_does_not_open_the_file_is_refused_and_nothing_is_shredded(
    haven_home: Home, next_file: bool
) -> None:
    """A forged or stale journal (or a new file someone removed) named a staged key that opens
    nothing, and the swap shredded the only key that opened the store (found by review)."""
    real = _forge_swap(haven_home, next_file=next_file)
    for _ in range(2):  # and again at the next attempt
        with pytest.raises(StoreError, match="rebuild.json says a store swap to key .* no key file .* opens"):
            with Store(haven_home).connect():
                pass
    assert (haven_home.keys / "store.key").read_bytes() == real
    (haven_home.store_dir / "rebuild.json").unlink()  # the custodian moves it aside
    with Store(haven_home).connect(read_only=True) as con:
        assert audit.verify(con, haven_home).ok


def test_an_unreadable_rebuild_journal_is_refused_naming_it(haven_home: Home) -> None:
    (haven_home.store_dir / "rebuild.json").write_text('{"state": "swapp')
    with pytest.raises(StoreError, match="rebuild journal .*rebuild.json cannot be read"):
        with Store(haven_home).connect():
            pass
