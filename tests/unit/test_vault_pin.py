"""The vault public key is the audit trail's (``safehaven.core.pins.check_vault_audited``; CoP 27b-c).

An insider holding the store key and the haven's files can write their own pair's public half to
``keys/vault.pub``, record its id in ``keyring.json`` and in ``governance.key_epochs``: every new
data key would then be wrapped to them. The audit trail, keyed under the audit key, names the vault
key the custodian created or rotated to, so each such substitution is refused before any write.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from safehaven.context import Haven
from safehaven.core import audit, pins
from safehaven.core.home import Home
from safehaven.core.keys import VAULT, KeyRing, KeyRingError, key_id, x25519_private, x25519_public
from safehaven.core.store import Store, table_exists
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import custody, rotation, vault
from tests.conftest import (
    build_populated,
    copy_haven,
    custodian_ring,
    test_custodian,
)
from tests.unit.populate import drop, populated, process

PATIENTS = 60


def _haven(home: Home) -> Haven:
    return Haven.open(home, contracts=ContractRegistry(), keyring=custodian_ring(home), actor="custodian")


def _wrapped_to(home: Home) -> dict[str, int]:
    """Data keys per vault key id they are wrapped to."""
    with Store(home).connect(read_only=True) as con:
        if not table_exists(con, "vault", "data_keys"):
            return {}
        rows = con.execute(f"SELECT vault_key_id, count(*) FROM {vault.DATA_KEYS} GROUP BY 1").fetchall()
    return {str(k): int(n) for k, n in rows}


def _entries(home: Home) -> int:
    with Store(home).connect(read_only=True) as con:
        return con.execute(f"SELECT count(*) FROM {vault.IDENTITY}").fetchone()[0]


def _vault_key_entries(home: Home) -> list[tuple[str, dict]]:
    with Store(home).connect(read_only=True) as con:
        return [(e.action, e.fields) for e in audit.entries_for(con, object_like=pins.VAULT_OBJECT)]


def _substitute(home: Home, *, as_rotation: bool = False) -> str:
    """The attack: the insider's own public half in vault.pub, its id in keyring.json and in the
    store's vault epoch (updated with the store key); ``as_rotation``: dressed up as a rotation
    (the real key retired in ``keyring.json`` and a new epoch started). Returns the substituted id."""
    keyring = KeyRing(home.keys)
    real = keyring.current_id(VAULT)
    public = x25519_public(x25519_private())
    theirs = key_id(public)
    keyring.public_path(VAULT).write_text(public.hex())
    keyring.public_path(VAULT).chmod(0o644)
    if as_rotation:
        keyring._record(VAULT, theirs)
        with Store(home).connect() as con:
            pins.start_epoch(con, VAULT, theirs)
        return theirs
    manifest = home.keys / "keyring.json"
    manifest.write_text(manifest.read_text().replace(real, theirs))
    with Store(home).connect() as con:
        con.execute("UPDATE governance.key_epochs SET key_id = ? WHERE purpose = 'vault'", [theirs])
    return theirs


def _refused_and_nothing_wrapped(home: Home, theirs: str, match: str) -> None:
    before, wrapped = _entries(home), _wrapped_to(home)
    drop(home, patients=30, seed=31)
    with pytest.raises(KeyRingError, match=match):
        process(home)
    assert _entries(home) == before and _wrapped_to(home) == wrapped
    assert theirs not in _wrapped_to(home), "nothing is wrapped to the substituted key"


def _init_vault(root: Path) -> Home:
    """A haven set up as the key custodian does it: ``safehaven keys init-vault`` (audited ``key.create``)."""
    home = Home(root).ensure()
    custody.init_vault(home, KeyRing(home.keys, test_custodian()), actor="custodian")
    return home


@pytest.fixture
def created_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    """A haven set up as the key custodian does it: ``safehaven keys init-vault`` (audited ``key.create``)."""
    root = tmp_path / "created" / "haven"
    monkeypatch.setenv("SAFEHAVEN_HOME", str(root))
    return _init_vault(root)


@pytest.fixture(scope="module")
def populated_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Havens built once for the module, to be copied (``copy_haven``), never changed: ``populated``
    with ``PATIENTS`` after ``init-vault`` (``created_home``: ``key.create`` on record) or after
    ``KeyRing.create_keypair`` (``home``: a pair never audited, adopted by the first night)."""
    return {
        "created_home": build_populated(tmp_path_factory, "populated-created_home", PATIENTS, _init_vault),
        "home": build_populated(tmp_path_factory, "populated-home", PATIENTS),
    }


@pytest.fixture
def populated_created_home(created_home: Home, populated_templates: dict[str, Path]) -> Home:
    """``created_home`` as ``populated(created_home, patients=PATIENTS)`` leaves it (a copy)."""
    return copy_haven(populated_templates["created_home"], created_home)


@pytest.fixture
def populated_home(home: Home, populated_templates: dict[str, Path]) -> Home:
    """``home`` as ``populated(home, patients=PATIENTS)`` leaves it (a copy)."""
    return copy_haven(populated_templates["home"], home)


# --- the attack ------------------------------------------------------------------------------


def test_a_vault_key_substituted_with_its_records_is_refused_naming_the_trails_key(
    populated_created_home: Home,
) -> None:
    expected = KeyRing(populated_created_home.keys).current_id(VAULT)
    assert _vault_key_entries(populated_created_home) == [("key.create", {"key_id": expected})]
    theirs = _substitute(populated_created_home)
    _refused_and_nothing_wrapped(
        populated_created_home,
        theirs,
        f"holds vault key {theirs}, but the audit trail records vault key {expected}.*custodian's backup",
    )


def test_a_vault_key_substituted_as_a_rotation_is_not_recorded_by_resume_and_stays_refused(
    populated_created_home: Home,
) -> None:
    """The insider dresses the substitution up as a rotation (``keyring.json`` retiring the real key
    for theirs, the store's vault epoch retired and a new one started with the store key) and runs
    ``safehaven keys rotate --resume``, which needs no passphrase: no ``key.rotate`` is recorded for
    it (the vault key is never recorded late), and vault writes stay refused."""
    real = KeyRing(populated_created_home.keys).current_id(VAULT)
    theirs = _substitute(populated_created_home, as_rotation=True)
    assert theirs != real and real in KeyRing(populated_created_home.keys).retired_ids(VAULT)
    rotation.resume(_haven(populated_created_home))
    assert [
        kid for action, d in _vault_key_entries(populated_created_home) for kid in (d.get("new_key_id"),) if kid
    ] == []
    _refused_and_nothing_wrapped(populated_created_home, theirs, "audit trail records vault key")


def test_an_adopted_vault_key_cannot_be_substituted_either(populated_home: Home) -> None:
    """A pair never audited (made by ``KeyRing.create_keypair``) is adopted at the first night, then pinned."""
    expected = KeyRing(populated_home.keys).current_id(VAULT)
    assert _vault_key_entries(populated_home) == [("key.adopt", {"key_id": expected})]
    theirs = _substitute(populated_home)
    _refused_and_nothing_wrapped(populated_home, theirs, f"audit trail records vault key {expected}")


def test_a_vault_with_entries_and_no_key_on_record_is_refused(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """A haven whose vault was written before the rule, its key never audited: nothing is adopted."""
    with monkeypatch.context() as before_the_rule:
        before_the_rule.setattr(pins, "check_vault_audited", lambda *a, **k: None)
        populated(home, patients=PATIENTS)
    assert _entries(home) and _vault_key_entries(home) == []
    theirs = _substitute(home)
    _refused_and_nothing_wrapped(home, theirs, f"holds vault key {theirs}, but the audit trail records no vault key")
    assert _vault_key_entries(home) == [], "the substituted key was not adopted"


def test_a_vault_key_entry_forged_with_the_store_key_is_refused(populated_created_home: Home) -> None:
    theirs = _substitute(populated_created_home)
    with Store(populated_created_home).connect() as con:  # a key.rotate entry naming their key, without the audit key
        con.execute(
            f"INSERT INTO {audit.TABLE} SELECT seq + 1, now(), 'custodian', 'key_custodian', 'key.rotate', "
            f"'key:vault', NULL, NULL, NULL, 'ok', ?, entry_hash, repeat('0', 64) FROM {audit.TABLE} "
            f"ORDER BY seq DESC LIMIT 1",
            [f'{{"new_key_id": "{theirs}"}}'],
        )
    _refused_and_nothing_wrapped(populated_created_home, theirs, "does not verify")


def test_a_key_record_hidden_with_the_store_key_before_the_first_night_is_not_replaced_by_adoption(
    created_home: Home,
) -> None:
    """Before any entry, the insider renames the ``key.create`` entry (not the trail's last) so the
    trail seems to record no vault key: the key is adopted only if the whole trail verifies."""
    with Store(created_home).connect() as con:
        audit.append(con, actor="pipeline", role="pipeline", action="run", object="job:test", home=created_home)
    theirs = _substitute(created_home)
    with Store(created_home).connect() as con:
        con.execute(f"UPDATE {audit.TABLE} SET action = 'key.seal' WHERE action = 'key.create'")
    drop(created_home, patients=30, seed=37)
    with Store(created_home).connect() as con:  # the vault write's own check
        with pytest.raises(KeyRingError, match="records no vault key and does not verify"):
            pins.vault_public(con, KeyRing(created_home.keys))
    # the night: refused before any vault write (the haven key, to be made first, is refused alike)
    with pytest.raises(KeyRingError, match="records no (vault|haven) key and does not verify"):
        process(created_home)
    assert not _wrapped_to(created_home)
    assert [a for a, _ in _vault_key_entries(created_home)] == ["key.seal"], "nothing adopted"
    assert theirs


def test_a_pair_staged_outside_a_rotation_is_installed_by_resume_but_never_used(populated_created_home: Home) -> None:
    """``resume`` needs no passphrase: a pair staged with the insider's own, its id made the store's
    epoch, is installed as before, but the trail does not record it, so no vault write uses it."""
    expected = KeyRing(populated_created_home.keys).current_id(VAULT)
    insider = KeyRing(populated_created_home.keys, test_custodian("the insider's own passphrase"))
    theirs = insider.seal_keypair(VAULT, x25519_private(), stage=True).key_id
    with Store(populated_created_home).connect() as con:
        con.execute("UPDATE governance.key_epochs SET key_id = ? WHERE purpose = 'vault'", [theirs])
    rotation.resume(Haven.open(populated_created_home, contracts=ContractRegistry(), actor="insider"))
    assert KeyRing(populated_created_home.keys).current_id(VAULT) == theirs
    _refused_and_nothing_wrapped(populated_created_home, theirs, f"audit trail records vault key {expected}")


# --- the legitimate paths --------------------------------------------------------------------


@pytest.mark.parametrize("setup", ["created_home", "home"])
def test_a_fresh_haven_vaults_on_its_first_and_next_nights(setup: str, request: pytest.FixtureRequest) -> None:
    """Set up by ``init-vault`` (``key.create`` on record) or with a pair never audited (``home``:
    ``KeyRing.create_keypair``, adopted by the first night's ``key.adopt``); the next night vaults too."""
    home: Home = request.getfixturevalue(f"populated_{setup}")
    kid = KeyRing(home.keys).current_id(VAULT)
    first = _entries(home)
    drop(home, patients=30, seed=41)
    process(home)
    assert _entries(home) > first > 0
    assert set(_wrapped_to(home)) == {kid}
    recorded = "key.create" if setup == "created_home" else "key.adopt"
    assert _vault_key_entries(home) == [(recorded, {"key_id": kid})], "recorded once, never adopted over a record"


def test_a_night_after_a_vault_key_rotation_wraps_to_the_new_key(populated_created_home: Home) -> None:
    report = rotation.rotate(_haven(populated_created_home), VAULT)
    before = _entries(populated_created_home)
    drop(populated_created_home, patients=30, seed=43)
    process(populated_created_home)
    assert _entries(populated_created_home) > before
    assert set(_wrapped_to(populated_created_home)) == {report.new_key_id}
    actions = [(a, f.get("new_key_id")) for a, f in _vault_key_entries(populated_created_home)]
    assert actions[-2:] == [("key.rotate.stage", report.new_key_id), ("key.rotate", report.new_key_id)]


def test_a_resumed_vault_key_rotation_is_recorded_and_the_next_night_uses_its_key(
    populated_created_home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after its commit, before its ``key.rotate`` entry: resume installs the pair and records it."""
    audit_step = rotation._audit

    def killed(con, home, actor, report, *, action=rotation.ROTATE_ACTION):  # noqa: ANN001, ANN202
        if action == rotation.ROTATE_ACTION:
            raise SystemExit("killed after the commit")
        return audit_step(con, home, actor, report, action=action)

    with monkeypatch.context() as m:
        m.setattr(rotation, "_audit", killed)
        with pytest.raises(SystemExit):
            rotation.rotate(_haven(populated_created_home), VAULT)
    new = KeyRing(populated_created_home.keys).staged_public_id(VAULT)
    assert new and rotation.pending(KeyRing(populated_created_home.keys))
    drop(populated_created_home, patients=30, seed=47)
    with pytest.raises(KeyRingError, match="pending"):
        process(populated_created_home)
    rotation.resume(Haven.open(populated_created_home, contracts=ContractRegistry(), actor="custodian"))
    assert KeyRing(populated_created_home.keys).current_id(VAULT) == new
    last = _vault_key_entries(populated_created_home)[-1]
    assert last[0] == "key.rotate" and last[1]["new_key_id"] == new and last[1]["resumed"] is True
    before = _entries(populated_created_home)
    process(populated_created_home)
    assert _entries(populated_created_home) > before
    assert set(_wrapped_to(populated_created_home)) == {new}
