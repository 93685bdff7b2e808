"""Key rotation keeps linkage and the objection register consistent, and retires old key ids."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from safehaven.context import Haven
from safehaven.core import audit
from safehaven.core.home import Home
from safehaven.core.keys import VAULT, KeyRing, KeyRingError, agreement_key
from safehaven.core.pins import EPOCHS, epoch_key_id
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import register_seal, rotation, vault
from safehaven.protect.haven import haven_key
from safehaven.protect.objections import EVENTS, objectors_sql
from safehaven.protect.optouts import MEMBERS, apply_optouts
from safehaven.protect.optouts import ensure_tables as ensure_optout_tables
from safehaven.protect.pseudonymise import install_key, pseudonym, release_pseudonym
from tests.conftest import copy_haven, custodian_ring
from tests.unit.populate import drop, process
from tests.unit.test_vault import seen_matches_vault

CONTENT = ("gp_events", "hospital_episodes", "social_care")


@pytest.fixture
def haven_home(home: Home, populated_haven: Path) -> Home:
    """``home`` as ``populated(home)`` leaves it: a copy of the session's populated haven."""
    return copy_haven(populated_haven, home)


def _custodian(home: Home, keyring: KeyRing | None = None, registry: ContractRegistry | None = None) -> Haven:
    """The key custodian's context (``keyring``, else the custodian's ring), under ``registry``, else
    the project's contracts."""
    return Haven.open(
        home,
        contracts=registry if registry is not None else ContractRegistry(),
        keyring=keyring if keyring is not None else custodian_ring(home),
        actor="tester",
    )


def _pipeline(home: Home, actor: str) -> Haven:
    """The pipeline's context (no custodian), under the project's contracts."""
    return Haven.open(home, contracts=ContractRegistry(), actor=actor)


def _consistent(con, key: bytes) -> None:
    """Every haven row's pid is the HMAC of its own landing row's NHS number under ``key``."""
    for c in CONTENT:
        rows = con.execute(
            f"SELECT v.nhs_number, h.pid FROM haven.{c} h JOIN landing.{c}_valid v USING (_batch, _row)"
        ).fetchall()
        assert rows and all(pseudonym(key, nhs) == pid for nhs, pid in rows), c
    events = con.execute(
        f"SELECT v.nhs_number, e.pid FROM {EVENTS} e JOIN landing.objections_valid v USING (_batch, _row)"
    ).fetchall()
    assert events and all(pseudonym(key, nhs) == pid for nhs, pid in events)


def _withheld(con) -> dict[str, int]:
    out = {}
    for c in CONTENT:
        _, withheld, _ = apply_optouts(
            con, f"SELECT * FROM haven.{c}", "pid", "section_251", "pseudonymised", gp_sourced=(c == "gp_events")
        )
        out[c] = withheld
    return out


def test_haven_rotation_re_pseudonymises_everything_consistently(haven_home: Home) -> None:
    keyring = KeyRing(haven_home.keys)
    old = keyring.get("haven")
    keyring.get_or_create("haven")
    with Store(haven_home).connect() as con:
        ensure_optout_tables(con)
        some = [r[0] for r in con.execute("SELECT DISTINCT pid FROM haven.hospital_episodes LIMIT 5").fetchall()]
        con.executemany(f"INSERT INTO {MEMBERS} VALUES ('r1', 'study-a', ?, now())", [[p] for p in some])
        before = _withheld(con)
        linked_before = con.execute(
            "SELECT count(*) FROM (SELECT DISTINCT g.pid FROM haven.gp_events g "
            "JOIN haven.hospital_episodes h USING (pid))"
        ).fetchone()[0]
    old_release = {p: release_pseudonym(agreement_key(keyring, "study-a"), p) for p in some}

    report = rotation.rotate(_custodian(haven_home), "haven")

    new = keyring.get("haven")
    assert new.key_id == report.new_key_id != old.key_id == report.old_key_id
    assert keyring.retired_ids("haven") == [old.key_id]
    with Store(haven_home).connect() as con:
        _consistent(con, new.material)
        assert _withheld(con) == before, "the same objectors are withheld after rotation"
        linked_after = con.execute(
            "SELECT count(*) FROM (SELECT DISTINCT g.pid FROM haven.gp_events g "
            "JOIN haven.hospital_episodes h USING (pid))"
        ).fetchone()[0]
        assert linked_after == linked_before > 0, "same person, same pid across collections"
        epochs = con.execute(
            f"SELECT key_id, retired_at IS NOT NULL FROM {EPOCHS} WHERE purpose = 'haven' ORDER BY started_at"
        ).fetchall()
        assert epochs == [(old.key_id, True), (new.key_id, False)]
        members = [r[0] for r in con.execute(f"SELECT pid FROM {MEMBERS}").fetchall()]
        assert sorted(members) == sorted(pseudonym(new.material, n) for n in _nhs_of(con, some, old.material))
        nhs = con.execute("SELECT nhs_number FROM landing.hospital_episodes_valid LIMIT 1").fetchone()[0]
        private = vault.private_key(custodian_ring(haven_home))
        revealed = vault.reveal(con, private, f"SELECT '{pseudonym(new.material, nhs)}' AS pid")
        assert revealed[pseudonym(new.material, nhs)]["nhs_number"] == [nhs]
        assert not con.execute(
            f"SELECT count(*) FROM {vault.IDENTITY} WHERE pid = ?", [pseudonym(old.material, nhs)]
        ).fetchone()[0]
        entries = audit.entries_for(con, object_like="key:haven")
        seen_matches_vault(con, custodian_ring(haven_home))  # digests made again under the new key
    assert entries and entries[-1].action == "key.rotate"
    detail = entries[-1].detail_value
    assert detail["old_key_id"] == old.key_id and detail["new_key_id"] == new.key_id
    assert old.hex not in str(detail) and new.hex not in str(detail)
    # the recipient's crosswalk maps exactly its released people from old to new pseudonyms
    [path] = report.crosswalks
    with open(path) as fh:
        rows = list(csv.reader(fh))[1:]
    assert sorted(r[0] for r in rows) == sorted(old_release.values())
    assert not set(r[1] for r in rows) & set(old_release.values())


def _nhs_of(con, pids: list[str], key: bytes) -> list[str]:
    numbers = [r[0] for r in con.execute("SELECT DISTINCT nhs_number FROM landing.hospital_episodes_valid").fetchall()]
    by_pid = {pseudonym(key, n): n for n in numbers}
    return [by_pid[p] for p in pids]


def test_new_batches_after_rotation_link_to_old_data(haven_home: Home) -> None:
    rotation.rotate(_custodian(haven_home), "haven")
    drop(haven_home, seed=8)  # a new drop (different population seed, new files)
    process(haven_home)
    key = KeyRing(haven_home.keys).get("haven")
    with Store(haven_home).connect() as con:
        _consistent(con, key.material)


def test_rotation_refuses_without_the_vault_key_and_changes_nothing(haven_home: Home) -> None:
    keyring = KeyRing(haven_home.keys)
    old = keyring.get("haven")
    os.rename(keyring.path(VAULT), haven_home.root / "vault.key.offline")
    with pytest.raises(vault.VaultError):
        rotation.rotate(_custodian(haven_home), "haven")
    assert keyring.get("haven").material == old.material and not rotation.pending(keyring)


def test_a_swapped_haven_key_is_refused(haven_home: Home) -> None:
    keyring = KeyRing(haven_home.keys)
    keyring.write("haven", os.urandom(32), replace=True)
    with Store(haven_home).connect() as con:
        with pytest.raises(KeyRingError, match="pseudonyms were made with key"):
            haven_key(con, keyring)


def test_interrupted_haven_rotation_is_finished_or_undone(haven_home: Home) -> None:
    keyring = KeyRing(haven_home.keys)
    old = keyring.get("haven")
    # crash before commit: a staged key but the store still on the old epoch -> discarded
    keyring.write("haven-next", os.urandom(32), record=False)
    with pytest.raises(rotation.RotationError, match="resume"):
        rotation.rotate(_pipeline(haven_home, "t"), "haven")
    assert "discarded" in rotation.resume(_pipeline(haven_home, "t"))[0]
    assert keyring.get("haven").material == old.material
    # crash after commit: the store's epoch names the staged key -> installed
    staged = keyring.write("haven-next", os.urandom(32), record=False)
    with Store(haven_home).connect() as con:
        con.execute(f"UPDATE {EPOCHS} SET retired_at = now() WHERE purpose = 'haven'")
        con.execute(f"INSERT INTO {EPOCHS} VALUES ('haven', ?, now(), NULL)", [staged.key_id])
    assert "finished" in rotation.resume(_pipeline(haven_home, "t"))[0]
    assert keyring.get("haven").key_id == staged.key_id and old.key_id in keyring.retired_ids("haven")


def test_store_rotation_re_encrypts_and_retires_the_old_key(haven_home: Home) -> None:
    keyring = KeyRing(haven_home.keys)
    old = keyring.get("store")
    with Store(haven_home).connect() as con:
        before = con.execute("SELECT count(*) FROM haven.gp_events").fetchone()[0]
    report = rotation.rotate(_pipeline(haven_home, "tester"), "store")
    assert report.old_key_id == old.key_id and keyring.get("store").key_id == report.new_key_id
    assert old.key_id in keyring.retired_ids("store")
    with Store(haven_home).connect() as con:
        assert con.execute("SELECT count(*) FROM haven.gp_events").fetchone()[0] == before
        assert audit.entries_for(con, object_like="key:store")[-1].action == "key.rotate"
        assert audit.verify(con, haven_home).ok
    import duckdb

    from safehaven.core.store import httpfs_extension_path

    probe = duckdb.connect()
    probe.execute(f"LOAD '{httpfs_extension_path()}'")
    with pytest.raises(duckdb.Error):
        probe.execute(f"ATTACH '{haven_home.store_file}' AS s (ENCRYPTION_KEY '{old.hex}', READ_ONLY)")


def test_vault_rotation_rewraps_data_keys(haven_home: Home) -> None:
    keyring = custodian_ring(haven_home)
    old_private = keyring.get_private(VAULT)
    old_id = keyring.current_id(VAULT)
    report = rotation.rotate(_custodian(haven_home, keyring), "vault")
    assert report.old_key_id == old_id and keyring.current_id(VAULT) == report.new_key_id
    assert old_id in keyring.retired_ids(VAULT)
    assert keyring.path(VAULT).read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with Store(haven_home).connect() as con:
        assert vault.reveal(con, keyring.get_private(VAULT), f"SELECT pid FROM {vault.IDENTITY} LIMIT 3")
        with pytest.raises(vault.VaultError):
            vault.reveal(con, old_private, f"SELECT pid FROM {vault.IDENTITY} LIMIT 3")
        assert con.execute(f"SELECT DISTINCT vault_key_id FROM {vault.DATA_KEYS}").fetchall() == [(report.new_key_id,)]
        assert epoch_key_id(con, VAULT) == report.new_key_id


def test_objection_register_follows_the_rotation(haven_home: Home) -> None:
    keyring = KeyRing(haven_home.keys)
    with Store(haven_home).connect() as con:
        n_before = len(con.execute(objectors_sql()).fetchall())
    rotation.rotate(_custodian(haven_home), "haven")
    with Store(haven_home).connect() as con:
        install_key(con, "haven", keyring.get("haven"))
        assert len(con.execute(objectors_sql()).fetchall()) == n_before
        ids = {r[0] for r in con.execute(f"SELECT DISTINCT key_id FROM {EVENTS}").fetchall()}
    assert ids == {keyring.get("haven").key_id}
    with Store(haven_home).connect() as con:  # the re-keyed register is sealed again (register_seal)
        assert register_seal.problem(con) is None and register_seal.last_seal(con) == register_seal.state(con)


@pytest.mark.parametrize("purpose", ["store", "haven", "vault"])
def test_rotation_shreds_the_old_key_file(
    haven_home: Home, tmp_path_factory: pytest.TempPathFactory, purpose: str
) -> None:
    """Crypto-shredding needs the old key gone, not just unlinked: after ``keys rotate`` the old
    key file's bytes are overwritten, and no staged or retired key file is left in ``keys/``."""
    keyring = KeyRing(haven_home.keys)
    old = keyring.path(purpose).read_bytes()
    spy = tmp_path_factory.mktemp("spies") / "old.key"
    os.link(keyring.path(purpose), spy)
    registry = ContractRegistry()
    rotation.rotate(_custodian(haven_home, registry=registry), purpose)
    assert keyring.path(purpose).read_bytes() != old
    assert old not in spy.read_bytes()
    assert not [
        p.name
        for p in haven_home.keys.iterdir()
        if p.name.endswith((".retired", ".tmp")) or "next" in p.name or "staged" in p.name
    ]


def test_a_rotation_killed_before_its_seal_is_sealed_by_the_next_register_step(
    haven_home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pseudonym changed, so the register differs from its seal; the next register step finds
    a haven key rotation after the seal in the trail and every event stating its landed row under
    the new key, and seals it: a crash, not a breach, needs no one."""
    with Store(haven_home).connect() as con:
        register_seal.seal(con, haven_home, actor="the night's register step")

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed before the seal")

    monkeypatch.setattr(register_seal, "seal", killed)
    with pytest.raises(KeyboardInterrupt):
        rotation.rotate(_custodian(haven_home), "haven")
    monkeypatch.undo()
    rotation.resume(_pipeline(haven_home, "tester"))
    keyring = KeyRing(haven_home.keys)
    with Store(haven_home).connect() as con:
        assert register_seal.problem(con) is not None
        install_key(con, "haven", keyring.get("haven"))
        contract = ContractRegistry().objections()
        _, intact = register_seal.register_and_seal(con, contract, keyring.get("haven").key_id, haven_home, actor="t")
        assert intact and register_seal.problem(con) is None
        con.execute("DELETE FROM governance.objection_events WHERE event_id = (SELECT max(event_id) FROM "
                    "governance.objection_events)")  # fmt: skip
        assert register_seal.problem(con) is not None, "an edit after it is still caught"
