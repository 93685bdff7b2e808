"""Key rotation and runs (issue 17): rotation refuses while a run is alive, a recipient never sees
a crosswalk for a haven key that did not become current, and a rotation killed after its install is
put on record once (real ``kill -9``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safehaven.cli.common import PASSPHRASE_ENV
from safehaven.context import Haven
from safehaven.core import audit, runs
from safehaven.core.home import Home
from safehaven.core.keys import VAULT, KeyRing, KeyRingError, agreement_key, x25519_private
from safehaven.core.pins import vault_public
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import rotation
from safehaven.protect.haven import haven_key
from safehaven.protect.optouts import MEMBERS
from safehaven.protect.optouts import ensure_tables as ensure_optout_tables
from tests.conftest import TEST_PASSPHRASE, copy_haven, custodian_ring, with_vault_keys
from tests.unit.populate import populated

ROOT = Path(__file__).resolve().parents[2]
RUN_ID = "0b7f3c1e-5a2d-4e8f-9c61-2d4b8a7e9f10"

ROTATE_AND_DIE = """
import sys
from pathlib import Path
from tests.crash.harness import arm
arm(sys.argv[2], 1, "before")
from safehaven.context import Haven
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import rotation
from tests.conftest import test_custodian
home = Home(Path(sys.argv[1]))  # a haven rotation re-encrypts the vault: the key custodian runs it
custodian = KeyRing(home.keys, test_custodian())
purpose = sys.argv[3] if len(sys.argv) > 3 else "haven"
rotation.rotate(Haven.open(home, contracts=ContractRegistry(), keyring=custodian, actor="t"), purpose)
"""


def _as_t(home: Home) -> Haven:
    """The pipeline's context (no custodian) as actor ``t``, under the project's contracts."""
    return Haven.open(home, contracts=ContractRegistry(), actor="t")


@pytest.fixture(scope="module")
def haven_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A populated haven with five people released to agreement ``study-a`` (so it gets a
    crosswalk), set up as ``home`` is; built once for the module to be copied, never changed."""
    root = tmp_path_factory.mktemp("rotation-guards") / "haven"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEHAVEN_HOME", str(root))
        mp.setenv(PASSPHRASE_ENV, TEST_PASSPHRASE)
        home = with_vault_keys(Home(root).ensure())
        populated(home)
        agreement_key(KeyRing(home.keys), "study-a")
        with Store(home).connect() as con:
            ensure_optout_tables(con)
            some = [r[0] for r in con.execute("SELECT DISTINCT pid FROM haven.hospital_episodes LIMIT 5").fetchall()]
            con.executemany(f"INSERT INTO {MEMBERS} VALUES ('r1', 'study-a', ?, now())", [[p] for p in some])
    return root


@pytest.fixture
def haven_home(home: Home, haven_template: Path) -> Home:
    """A copy of the module's populated haven with five people released to ``study-a``."""
    return copy_haven(haven_template, home)


def _crosswalks(home: Home) -> list[Path]:
    return sorted(home.releases.glob("*/rekey/*.csv"))


def _rotate_and_die(home: Home, kill_before: str, purpose: str = "haven") -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", ROTATE_AND_DIE, str(home.root), kill_before, purpose]
    done = subprocess.run(argv, env=env, timeout=600)
    assert done.returncode == -9


def test_rotation_refuses_to_start_while_a_run_is_alive(haven_home: Home) -> None:
    old = KeyRing(haven_home.keys).get("store").key_id
    fd = runs.hold(haven_home, RUN_ID)
    try:
        with pytest.raises(rotation.RotationError, match="pipeline run .* holds the store"):
            rotation.rotate(_as_t(haven_home), "store")
    finally:
        runs.release(haven_home, RUN_ID, fd)
    assert KeyRing(haven_home.keys).get("store").key_id == old
    assert rotation.rotate(_as_t(haven_home), "store").new_key_id != old  # once the run has ended


def test_a_dead_runs_lock_does_not_block_rotation(haven_home: Home) -> None:
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from safehaven.cli.common import home_from_env; from safehaven.core import runs; "
            f"runs.hold(home_from_env(), {RUN_ID!r})",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT), "SAFEHAVEN_HOME": str(haven_home.root)},
        check=True,
    )
    assert runs.is_alive(haven_home, RUN_ID) is False
    assert runs.live_runs(haven_home) == []
    rotation.rotate(_as_t(haven_home), "store")


def test_killed_before_commit_no_crosswalk_reaches_a_recipient(haven_home: Home) -> None:
    old = KeyRing(haven_home.keys).get("haven").key_id
    _rotate_and_die(haven_home, "safehaven.protect.rotation:_retire_epoch")
    assert _crosswalks(haven_home) == [], "no crosswalk for a key that has not committed"
    assert list((haven_home.staging / "rekey").glob("*/*.csv")), "the staged crosswalks wait outside releases/"
    done = rotation.resume(_as_t(haven_home))
    assert any("discarded" in line for line in done) and any("crosswalk" in line for line in done)
    assert not list((haven_home.staging / "rekey").glob("*/*.csv"))
    assert _crosswalks(haven_home) == [] and KeyRing(haven_home.keys).get("haven").key_id == old


def test_killed_after_commit_resume_delivers_the_crosswalks(haven_home: Home) -> None:
    _rotate_and_die(haven_home, "safehaven.protect.rotation:_finish_haven")
    assert _crosswalks(haven_home) == []
    done = rotation.resume(_as_t(haven_home))
    assert any("finished" in line for line in done)
    new = KeyRing(haven_home.keys).get("haven").key_id
    delivered = _crosswalks(haven_home)
    assert delivered and all(p.name.endswith(f"-{new}.csv") for p in delivered)
    assert not list((haven_home.staging / "rekey").glob("*/*.csv"))
    assert [r["new_key_id"] for r in _rotations(haven_home, "haven")] == [new], (
        "the rotation resume finished is on record"
    )


# --- a rotation installed but killed before its audit entry is put on record, once ----------------


def _rotations(home: Home, purpose: str) -> list[dict[str, object]]:
    """The details of the authentic ``key.rotate`` entries of ``purpose``'s key."""
    with Store(home).connect(read_only=True) as con:
        return [e.fields for e in audit.authentic_entries(con, ["key.rotate"]) if e.object == f"key:{purpose}"]


def _entries(home: Home) -> int:
    with Store(home).connect(read_only=True) as con:
        return con.execute(f"SELECT count(*) FROM {audit.TABLE}").fetchone()[0]


def _use_key(home: Home, purpose: str) -> None:
    """Use ``purpose``'s key as the pipeline does (the haven key, or a vault write's public key)."""
    keyring = KeyRing(home.keys)
    with Store(home).connect() as con:
        haven_key(con, keyring) if purpose == "haven" else vault_public(con, keyring)


@pytest.mark.parametrize("purpose", ["haven"])
def test_a_rotation_killed_after_its_install_is_recorded_late_once_by_resume(haven_home: Home, purpose: str) -> None:
    """The new key is installed, then the process dies before ``key.rotate`` is appended: the key is
    refused until ``--resume`` records the rotation (``"late": true``, old and new ids), once. (The
    vault key is never recorded late: its rotation's entries come before its install,
    ``tests/unit/test_vault_pin.py``.)"""
    keyring = KeyRing(haven_home.keys)
    old = keyring.current_id(purpose)
    _rotate_and_die(haven_home, "safehaven.protect.rotation:_audit", purpose)
    new = keyring.current_id(purpose)
    assert new != old and not rotation.pending(keyring), "the rotation was installed"
    assert not [r for r in _rotations(haven_home, purpose) if r["new_key_id"] == new]
    with pytest.raises(KeyRingError, match="keys rotate --resume"):
        _use_key(haven_home, purpose)
    done = rotation.resume(_as_t(haven_home))
    assert any("late" in line and new in line for line in done), done
    recorded = [r for r in _rotations(haven_home, purpose) if r["new_key_id"] == new]
    assert len(recorded) == 1 and recorded[0]["old_key_id"] == old and recorded[0]["late"] is True, recorded
    before = _entries(haven_home)
    assert rotation.resume(_as_t(haven_home)) == [] and _entries(haven_home) == before, "a second resume adds nothing"
    _use_key(haven_home, purpose)
    with Store(haven_home).connect(read_only=True) as con:
        assert audit.verify(con, haven_home).ok


@pytest.mark.parametrize("purpose", ["haven"])
def test_a_rotation_claimed_by_an_edited_key_ring_is_never_recorded(haven_home: Home, purpose: str) -> None:
    """``keyring.json`` edited to claim an earlier rotation, then a key file replaced and recorded as
    one: the store's key epochs show neither, so resume names them and records no ``key.rotate``."""
    manifest = haven_home.keys / "keyring.json"
    data = json.loads(manifest.read_text())
    first = data[purpose]["history"][0]
    forged = "0123456789abcdef"
    when = first["created_at"]
    data[purpose]["history"].insert(0, {"key_id": forged, "created_at": when, "retired_at": when})
    manifest.write_text(json.dumps(data))
    keyring = custodian_ring(haven_home)
    old = keyring.current_id(purpose)
    if purpose == VAULT:
        keyring.seal_keypair(VAULT, x25519_private())
    else:
        keyring.write("haven", os.urandom(32), replace=True)
    new = keyring.current_id(purpose)
    assert new != old and old in keyring.retired_ids(purpose) and forged in keyring.retired_ids(purpose)
    for _ in range(2):
        done = rotation.resume(_as_t(haven_home))
        assert any("not recorded" in line and forged in line for line in done), done
        assert any("not recorded" in line and new in line for line in done), done
        assert _rotations(haven_home, purpose) == []


# --- a resume killed after it installs a vault pair is finished by the next resume ----------------

DIE_IN = """
import sys
from pathlib import Path
from tests.crash.harness import arm
arm(sys.argv[2], int(sys.argv[3]), "before")
from safehaven.context import Haven
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import rotation
from tests.conftest import test_custodian
home = Home(Path(sys.argv[1]))
ring = KeyRing(home.keys, test_custodian()) if sys.argv[4] == "rotate" else KeyRing(home.keys)
context = Haven.open(home, contracts=ContractRegistry(), keyring=ring, actor="t")
rotation.rotate(context, "vault") if sys.argv[4] == "rotate" else rotation.resume(context)
"""


def _die_in(home: Home, target: str, nth: int, what: str) -> None:
    argv = [sys.executable, "-c", DIE_IN, str(home.root), target, str(nth), what]
    assert subprocess.run(argv, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600).returncode == -9


def test_a_resume_killed_after_installing_the_vault_pair_is_finished_by_the_next_resume(
    home: Home, populated_haven: Path
) -> None:
    """A vault rotation killed after its commit and before ``key.rotate``; its ``--resume`` installs the
    pair and is killed before recording it. The next ``--resume`` records it (the stage entry names
    the key ``vault.pub`` and the store hold), once, and vault writes go on: before, nothing staged
    was left, nothing recorded it, and every vault write was refused for good (found by review)."""
    copy_haven(populated_haven, home)  # as populated(home) leaves it
    old = KeyRing(home.keys).current_id(VAULT)
    _die_in(home, "safehaven.protect.rotation:_audit", 2, "rotate")  # the stage entry written, not key.rotate
    assert rotation.pending(KeyRing(home.keys)) == [VAULT]
    _die_in(home, "safehaven.protect.rotation:_resumed_vault_key", 1, "resume")  # after the install
    new = KeyRing(home.keys).current_id(VAULT)
    assert new != old and rotation.pending(KeyRing(home.keys)) == []
    done = rotation.resume(_as_t(home))
    assert any(new in line for line in done), done
    recorded = [r for r in _rotations(home, VAULT) if r["new_key_id"] == new]
    assert len(recorded) == 1 and recorded[0]["resumed"] is True
    assert rotation.resume(_as_t(home)) == []
    with Store(home).connect() as con:
        assert vault_public(con, KeyRing(home.keys)).key_id == new
