"""The haven key is the audit trail's (``safehaven.core.pins.check_haven_audited``; CoP 27b-c).

Whoever holds the store key and the haven's files can write a haven key of their own, claim it in
``keyring.json`` and rewrite the store's haven epoch to name it. Its pseudonyms would no longer
match the objection register's, so the records of people who objected would pass unseen. The audit
trail, keyed under the audit key, names the haven key the haven made or rotated to, so such a key
is refused at its first use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from safehaven.context import Haven
from safehaven.core import audit, pins
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing, KeyRingError
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import rotation
from safehaven.protect.haven import haven_key
from tests.conftest import build_populated, copy_haven, custodian_ring
from tests.unit.populate import drop, process

PATIENTS = 40


@pytest.fixture(scope="module")
def processed_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A haven set up as ``home`` is and ``populated`` with ``PATIENTS``: its first haven key made
    and recorded (``key.create``); built once for the module, never changed."""
    return build_populated(tmp_path_factory, "haven-pin", PATIENTS)


@pytest.fixture
def processed(home: Home, processed_template: Path) -> Home:
    """``home`` as ``populated(home, patients=PATIENTS)`` leaves it (a copy of the module's template)."""
    return copy_haven(processed_template, home)


def _haven_key_entries(home: Home) -> list[tuple[str, dict]]:
    with Store(home).connect(read_only=True) as con:
        return [(e.action, e.fields) for e in audit.entries_for(con, object_like=pins.HAVEN_OBJECT)]


def _haven_rows(home: Home) -> int:
    with Store(home).connect(read_only=True) as con:
        return con.execute("SELECT count(*) FROM haven.gp_events").fetchone()[0]


def _swap(home: Home) -> tuple[str, str]:
    """The attack: a new haven key file, ``keyring.json`` claiming it as the haven's only key ever,
    and the store's current haven epoch rewritten to name it (with the store key). Returns (old, new)."""
    keyring = KeyRing(home.keys)
    old = keyring.get("haven").key_id
    new = keyring.write("haven", os.urandom(32), replace=True).key_id
    manifest = json.loads((home.keys / "keyring.json").read_text())
    created = manifest["haven"]["history"][0]["created_at"]
    manifest["haven"] = {"current": new, "history": [{"key_id": new, "created_at": created}]}
    (home.keys / "keyring.json").write_text(json.dumps(manifest))
    with Store(home).connect() as con:
        con.execute(f"UPDATE {pins.EPOCHS} SET key_id = ? WHERE purpose = 'haven' AND retired_at IS NULL", [new])
    return old, new


def test_a_havens_first_haven_key_is_recorded_on_the_trail(processed: Home) -> None:
    entries = _haven_key_entries(processed)
    assert entries == [("key.create", {"key_id": KeyRing(processed.keys).get("haven").key_id})]
    process(processed)  # later uses check it, and record nothing more
    assert len(_haven_key_entries(processed)) == 1


def test_a_haven_key_swapped_with_its_records_and_the_stores_epoch_is_refused_naming_the_trails_key(
    processed: Home,
) -> None:
    """Before this rule the swap passed every check (the file, ``keyring.json`` and the store's epoch
    agree) and the next night pseudonymised its records under the insider's key."""
    old, new = _swap(processed)
    before = _haven_rows(processed)
    drop(processed, patients=20, seed=31)
    with pytest.raises(KeyRingError, match=f"holds haven key {new}, but the audit trail records haven key {old}"):
        process(processed)
    assert _haven_rows(processed) == before, "nothing pseudonymised under the swapped key"


@pytest.mark.parametrize("action", ["key.create", "key.rotate"])
def test_a_haven_key_entry_forged_with_the_store_key_is_refused(processed: Home, action: str) -> None:
    """An entry naming their key, written with the store key alone (no audit key): its hash does not
    verify, whether or not an authentic entry of the same action exists."""
    _, new = _swap(processed)
    field = pins.KEY_SET[action]
    with Store(processed).connect() as con:
        con.execute(
            f"INSERT INTO {audit.TABLE} SELECT seq + 1, now(), 'custodian', 'key_custodian', ?, "
            f"'key:haven', NULL, NULL, NULL, 'ok', ?, entry_hash, repeat('0', 64) FROM {audit.TABLE} "
            f"ORDER BY seq DESC LIMIT 1",
            [action, f'{{"{field}": "{new}"}}'],
        )
        with pytest.raises(KeyRingError, match="that set the haven key .* does not verify"):
            haven_key(con, KeyRing(processed.keys))


def _rotate(home: Home) -> tuple[str, str]:
    """A real haven-key rotation by the key custodian; returns (old, new) key ids."""
    ring = custodian_ring(home)
    old = ring.get("haven").key_id
    rotation.rotate(Haven.open(home, contracts=ContractRegistry(), keyring=ring, actor="custodian"), "haven")
    return old, KeyRing(home.keys).get("haven").key_id


def test_a_rotation_entry_hidden_with_the_store_key_does_not_bring_the_old_haven_key_back(processed: Home) -> None:
    """After a rotation, an insider who kept the old key renames the ``key.rotate`` entry with the
    store key, so that the trail's latest haven-key entry names the old key again (the file, note
    and epoch they would put back are checked as in the other tests): a command checks every entry
    from that one on, and the edit breaks them (found by review). So does a pipeline step, though its
    run verified the whole trail at its start: the run does not hold the store between its steps,
    and the edit here is made after that start (found by review)."""
    old, new = _rotate(processed)
    assert new != old
    with Store(processed).connect() as con:
        audit.begin_run(con, processed, actor="pipeline", job="nightly", run_id="r1")  # verifies the trail
        con.execute(
            f"UPDATE {audit.TABLE} SET action = 'key.rotatx' WHERE action = 'key.rotate' AND object = 'key:haven'"
        )
        assert pins.audited_key(con, pins.HAVEN_OBJECT)[1] == old
        with pytest.raises(KeyRingError, match="does not verify"):
            pins.check_haven_audited(con, old, "keys/haven.key")


def test_a_haven_key_swap_dressed_as_an_interrupted_rotation_is_not_recorded_by_resume(processed: Home) -> None:
    """``keyring.json`` claims a rotation to their key and the store's epochs retire the real key for
    it, as a rotation killed after its commit would leave them; no rotation staged it on the trail,
    so ``--resume`` does not record it, and the key stays refused."""
    ring = KeyRing(processed.keys)
    old = ring.get("haven").key_id
    new = ring.write("haven", os.urandom(32), replace=True).key_id
    with Store(processed).connect() as con:
        pins.start_epoch(con, "haven", new)
    done = rotation.resume(Haven.open(processed, contracts=ContractRegistry(), actor="custodian"))
    assert any("no key.rotate.stage entry" in line and "not recorded" in line and new in line for line in done), done
    assert [f for a, f in _haven_key_entries(processed) if a == "key.rotate"] == []
    with Store(processed).connect() as con:
        with pytest.raises(KeyRingError, match=f"audit trail records haven key {old}"):
            haven_key(con, KeyRing(processed.keys), processed)


def _lose_haven_key(home: Home) -> str:
    """The haven key file, its note in ``keyring.json`` and the store's haven epochs all gone;
    returns the id of the key that was lost."""
    ring = KeyRing(home.keys)
    old = ring.get("haven").key_id
    ring.path("haven").unlink()
    manifest = json.loads((home.keys / "keyring.json").read_text())
    del manifest["haven"]
    (home.keys / "keyring.json").write_text(json.dumps(manifest))
    with Store(home).connect() as con:
        con.execute(f"DELETE FROM {pins.EPOCHS} WHERE purpose = 'haven'")
    return old


def test_a_refused_first_use_writes_no_key_and_starts_no_epoch(processed: Home) -> None:
    """The store's haven epochs, the key file and its note all gone: the trail still records the
    haven key, so none is made again (its backup can then be restored as it was)."""
    ring = KeyRing(processed.keys)
    old = _lose_haven_key(processed)
    with Store(processed).connect() as con:
        with pytest.raises(KeyRingError, match=f"records haven key {old}"):
            haven_key(con, KeyRing(processed.keys), processed)
        assert pins.epoch_key_id(con, "haven") is None
    assert not ring.path("haven").exists()


def test_a_haven_key_made_before_the_rule_is_adopted_once(home: Home) -> None:
    """A haven whose key and epoch were made before the trail recorded haven keys: adopted at its
    first use (``key.adopt``), and checked against that entry from then on."""
    keyring = KeyRing(home.keys)
    with Store(home).connect() as con:
        audit.append(con, actor="pipeline", role="pipeline", action="run", object="job:test", home=home)
        kid = keyring.get_or_create("haven").key_id
        pins.start_epoch(con, "haven", kid)
        assert haven_key(con, keyring).key_id == kid
        assert haven_key(con, keyring).key_id == kid
    assert _haven_key_entries(home) == [("key.adopt", {"key_id": kid})]


def test_a_haven_key_record_hidden_with_the_store_key_is_not_replaced_by_adoption(processed: Home) -> None:
    """The insider renames the ``key.create`` entry so the trail seems to record no haven key: a key
    is adopted only while the whole trail verifies, so theirs is refused."""
    _, new = _swap(processed)
    with Store(processed).connect() as con:
        con.execute(
            f"UPDATE {audit.TABLE} SET action = 'key.seal' WHERE action = 'key.create' AND object = 'key:haven'"
        )
    with Store(processed).connect() as con:
        with pytest.raises(KeyRingError, match="records no haven key and does not verify"):
            haven_key(con, KeyRing(processed.keys))
    assert [a for a, _ in _haven_key_entries(processed)] == ["key.seal"], "nothing adopted"
    assert new


def test_a_haven_key_record_hidden_before_a_first_use_makes_no_new_key(processed: Home) -> None:
    """Key file, note and epochs gone and the ``key.create`` entry renamed with the store key: the
    trail then seems to record no haven key, but a key is made and recorded only while the whole
    trail verifies (found by review)."""
    ring = KeyRing(processed.keys)
    _lose_haven_key(processed)
    with Store(processed).connect() as con:
        con.execute(
            f"UPDATE {audit.TABLE} SET action = 'key.creatx' WHERE action = 'key.create' AND object = 'key:haven'"
        )
        with pytest.raises(KeyRingError, match="is to be made, but the audit trail records no haven key and does not"):
            haven_key(con, KeyRing(processed.keys), processed)
        assert pins.epoch_key_id(con, "haven") is None
    assert not ring.path("haven").exists()


def test_an_agreements_key_is_not_derived_from_a_swapped_haven_key(processed: Home) -> None:
    """Releases and re-identification derive each agreement's pseudonym key from the haven key
    (``pins.agreement_key``): the swap is refused there too (found by review)."""
    old, _ = _swap(processed)
    with Store(processed).connect() as con:
        with pytest.raises(KeyRingError, match=f"audit trail records haven key {old}"):
            pins.agreement_key(con, KeyRing(processed.keys), "study-z")


def test_a_first_haven_key_asked_for_inside_a_transaction_is_refused_before_anything_is_written(home: Home) -> None:
    """Its ``key.create`` entry needs a transaction of its own: refused first, so no key file is
    left without its entry (found by re-reading: it was refused after the key was made)."""
    with Store(home).connect() as con:
        audit.append(con, actor="pipeline", role="pipeline", action="run", object="job:test", home=home)
        con.execute("BEGIN TRANSACTION")
        with pytest.raises(KeyRingError, match="cannot be recorded inside this transaction"):
            haven_key(con, KeyRing(home.keys), home)
        con.execute("ROLLBACK")
        assert pins.epoch_key_id(con, "haven") is None
    assert not KeyRing(home.keys).exists("haven")
    assert _haven_key_entries(home) == []
